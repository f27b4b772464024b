"""Drive the chat page in headless Chromium as a person would: upload an image, type a question,
send, wait for the streamed answer, and save a screenshot (docs/serving.md).

    python scripts/chat_page_screenshot.py --job.config_file train_configs/debug_vlm_chat.toml \\
        [--weights DIR] [--image assets/sample_data/images/00600.png] [--prompt "What do you see?"] \\
        [--out docs/serving_chat_page.png]

Starts the server in this process on a free port, and Chromium (Debian's ``chromium``) with the
DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages ending in a NUL byte on file
descriptors 3 and 4), so nothing beyond the standard library is needed. Prints the answer the page
shows.
"""

import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class DevTools:
    """A Chromium started with the DevTools protocol on a pipe; ``call`` sends one command and
    returns its result (events that arrive meanwhile are dropped)."""

    def __init__(self, chromium: str = "chromium", width: int = 900, height: int = 640):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Chromium's helper processes may still write to the profile as it is removed
        self.profile = tempfile.TemporaryDirectory(ignore_cleanup_errors=True)

        def as_fds_3_and_4():  # the protocol pipe's fixed descriptors in the child
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        self.proc = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, "--remote-debugging-pipe", f"--user-data-dir={self.profile.name}",
             f"--window-size={width},{height}", "about:blank"],
            # descriptors 3 and 4 stay open in the child: close_fds runs after preexec_fn
            pass_fds=(3, 4), preexec_fn=as_fds_3_and_4, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next_id, self._buffer = 0, b""
        self.session = None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)

    def call(self, method: str, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _read(self) -> dict:
        while b"\0" not in self._buffer:
            data = os.read(self._from_chrome, 1 << 16)
            if not data:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buffer += data
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:60]}...: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self):
        """Close the browser, its helper processes (renderer, GPU, crash handler) too, then its profile."""
        try:
            self.session = None
            self.call("Browser.close")
            self.proc.wait(timeout=10)
        except (OSError, RuntimeError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever of its process group is left
        except ProcessLookupError:
            pass
        self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)
        self.profile.cleanup()


def chat_in_page(url: str, image_path: str, prompt: str, screenshot: str, chromium: str = "chromium",
                 timeout_s: float = 120) -> str:
    """Open the chat page at ``url``, upload ``image_path`` through its file input, send ``prompt``,
    wait until the answer has streamed in, save a PNG screenshot; returns the answer shown."""
    with open(image_path, "rb") as f:
        image = base64.b64encode(f.read()).decode()
    browser = DevTools(chromium)
    try:
        browser.call("Page.navigate", url=url)
        deadline = time.time() + timeout_s
        while browser.evaluate("document.readyState") != "complete" or not browser.evaluate(
                "document.getElementById('model').textContent"):
            if time.time() > deadline:
                raise TimeoutError(f"the chat page at {url} did not load")
            time.sleep(0.2)
        # the page's own upload path: a File in the file input, then its change event
        browser.evaluate(f"""(async () => {{
            const bytes = Uint8Array.from(atob("{image}"), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "{os.path.basename(image_path)}", {{type: "image/png"}}));
            fileInput.files = transfer.files;
            fileInput.dispatchEvent(new Event("change"));
            while (preview.style.display !== "block") await new Promise(r => setTimeout(r, 20));
            promptBox.value = {json.dumps(prompt)};
            form.requestSubmit();
        }})()""")
        while browser.evaluate("sendButton.disabled"):
            if time.time() > deadline:
                raise TimeoutError("the answer did not finish streaming")
            time.sleep(0.2)
        answer = browser.evaluate("[...document.querySelectorAll('.turn')].pop().textContent")
        png = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
        with open(screenshot, "wb") as f:
            f.write(png)
        return answer
    finally:
        browser.close()


def main(argv: list[str]) -> int:
    from titan_mm.config import parse_args, split_script_options
    from titan_mm.generate import load_model_for_inference
    from titan_mm.serve.engine import ModelEngine
    from titan_mm.serve.server import ChatServer

    opts, rest = split_script_options(argv, {"--weights": None, "--image": "assets/sample_data/images/00600.png",
                                             "--prompt": "What do you see?", "--out": "docs/serving_chat_page.png"})
    cfg, _ = parse_args(rest)
    im = load_model_for_inference(cfg, checkpoint=opts["--weights"])
    name = f"{cfg.model.name}-{cfg.model.flavor}:{os.path.basename(im.source.rstrip('/'))}"
    server = ChatServer(("127.0.0.1", 0), ModelEngine(im, name))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        answer = chat_in_page(f"http://127.0.0.1:{server.server_address[1]}/", opts["--image"], opts["--prompt"],
                              opts["--out"])
    finally:
        server.shutdown()
        server.server_close()
    print(f"answer shown: {answer!r}\nscreenshot: {opts['--out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
