"""The OpenAI-compatible server (titan_mm/serve), through a real HTTP client (http.client): plain and
streamed answers, images as data URLs and from a local http server, bad and oversized requests,
concurrent requests, and the chat page (in headless Chromium when it is installed)."""

import base64
import functools
import http.client
import http.server
import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import load_script, make_config

from titan_mm.generate import load_model_for_inference
from titan_mm.serve.engine import ModelEngine, held_back
from titan_mm.serve.openai_api import Limits
from titan_mm.serve.server import ChatServer

IMAGES = "assets/sample_data/images"
MAX_REQUEST_BYTES = 100_000
MAX_IMAGE_BYTES = 50_000


def png_data_url(name: str) -> str:
    with open(os.path.join(IMAGES, name), "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server on a free port with the debug chat VLM (random-init weights from a seed checkpoint)."""
    tmp = tmp_path_factory.mktemp("serve")
    cfg = make_config(tmp, "--job.config_file", "train_configs/debug_vlm_chat.toml")
    load_script("create_seed_checkpoint").create_seed_checkpoint(cfg, str(tmp / "seed"))
    im = load_model_for_inference(cfg, checkpoint=str(tmp / "seed"))
    chat = ChatServer(("127.0.0.1", 0), ModelEngine(im, "debug"),
                      Limits(max_request_bytes=MAX_REQUEST_BYTES, max_image_bytes=MAX_IMAGE_BYTES, max_new_tokens=64))
    thread = threading.Thread(target=chat.serve_forever, daemon=True)
    thread.start()
    yield chat.server_address[1]
    chat.shutdown()
    chat.server_close()


@pytest.fixture(scope="module")
def image_server():
    """A local http server of the bundled images (no download happens in tests)."""
    handler = functools.partial(QuietHandler, directory=IMAGES)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def post(port: int, body, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of a POST to /v1/chat/completions; ``body`` a dict (sent as JSON) or bytes."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", "/v1/chat/completions", data, {"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    out = response.status, dict(response.getheaders()), response.read()
    conn.close()
    return out


def question(image_url: str, text: str = "What do you see?", **fields) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                      {"type": "text", "text": text}]}],
            "temperature": 0, "max_tokens": 8, **fields}


def answer(port: int, body: dict) -> dict:
    status, _, data = post(port, body)
    assert status == 200, data
    return json.loads(data)


def streamed(port: int, body: dict) -> tuple[list[dict], list[str]]:
    """The chunks of a streamed answer and its raw event lines."""
    status, headers, data = post(port, {**body, "stream": True})
    assert status == 200, data
    assert headers["Content-Type"] == "text/event-stream"
    events = [e for e in data.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events
    assert events[-1] == "data: [DONE]"
    return [json.loads(e.removeprefix("data: ")) for e in events[:-1]], events


def test_streamed_chunks_add_up_to_the_plain_answer(server):
    body = question(png_data_url("00600.png"))
    plain = answer(server, body)
    message = plain["choices"][0]
    assert plain["object"] == "chat.completion" and message["message"]["role"] == "assistant"
    assert plain["usage"]["completion_tokens"] > 0 and message["finish_reason"] in ("stop", "length")
    chunks, _ = streamed(server, body)
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": message["finish_reason"]}
    assert len(chunks) > 3  # the answer arrives in pieces
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == message["message"]["content"]


def test_image_from_an_http_url_answers_like_the_same_data_url(server, image_server):
    by_url = answer(server, question(f"{image_server}/00601.png"))
    by_data = answer(server, question(png_data_url("00601.png")))
    assert by_url["choices"][0]["message"] == by_data["choices"][0]["message"]
    status, _, data = post(server, question(f"{image_server}/missing.png"))
    assert status == 400 and b"cannot fetch" in data


@pytest.mark.parametrize("body, status, message", [
    (question("data:image/png;base64,not base64!"), 400, "invalid base64"),
    (question("data:image/png;base64," + base64.b64encode(b"plain text, not a picture").decode()), 400,
     "cannot be decoded"),
    (question("file:///etc/passwd"), 400, "must be http(s) or base64 data URLs"),
    (b"{not json", 400, "not valid JSON"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "'temperature' must be a number"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}, 400, "'max_tokens' must be an integer"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "'stream' must be true or false"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {}}, 400, "unknown field(s) ['logit_bias']"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "must be {'type': 'text'"),
    ({"messages": []}, 400, "'messages' must be a non-empty list"),
])
def test_bad_requests_get_4xx_with_a_message_and_the_server_goes_on(server, body, status, message):
    got, headers, data = post(server, body)
    assert got == status, data
    assert message in json.loads(data)["error"]["message"]
    assert answer(server, question(png_data_url("00602.png"), max_tokens=2))["choices"]


def test_oversized_request_is_refused_unread_with_413(server):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=60)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(MAX_REQUEST_BYTES + 1))
    conn.endheaders()  # the body is never sent: the server answers from the header alone
    response = conn.getresponse()
    assert response.status == 413
    assert "over the limit of 100000" in json.loads(response.read())["error"]["message"]
    conn.close()
    # an image over its own limit inside a body under the request limit
    big = "data:image/png;base64," + "A" * (MAX_REQUEST_BYTES - 1000)
    status, _, data = post(server, question(big))
    assert status == 413 and b"the image is over 50000 bytes" in data, data


def test_concurrent_requests_each_get_their_own_answer(server):
    """Four clients at once, plain and streamed: each answer equals the one it gets alone."""
    bodies = [question(png_data_url(f"0060{i}.png"), text) for i, text in
              enumerate(["What do you see?", "Which colours do you see?", "Describe this image.", "Hello"])]
    alone = [answer(server, b)["choices"][0]["message"]["content"] for b in bodies]

    def ask(i):
        if i % 2:
            chunks, _ = streamed(server, bodies[i])
            return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        return answer(server, bodies[i])["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, range(4)))
    assert together == alone


def test_streamed_text_waits_for_whole_characters_and_stop_strings():
    assert held_back("abc\ufffd", ()) == 1
    assert held_back("the end is ne", ("near",)) == 2
    assert held_back("the end", ("near",)) == 0


def test_chat_page_and_models_are_served(server):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=60)
    conn.request("GET", "/")
    page = conn.getresponse()
    assert page.status == 200 and page.getheader("Content-Type").startswith("text/html")
    assert b"/v1/chat/completions" in page.read()
    conn.request("GET", "/v1/models")
    assert json.loads(conn.getresponse().read())["data"][0]["id"] == "debug"
    conn.close()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_chat_page_in_headless_chromium_shows_the_streamed_answer(server, tmp_path):
    """Upload an image on the page, send a question: the page shows the answer the API gives."""
    shot = tmp_path / "chat.png"
    shown = load_script("chat_page_screenshot").chat_in_page(
        f"http://127.0.0.1:{server}/", os.path.join(IMAGES, "00603.png"), "What do you see?", str(shot))
    # the page's defaults: greedy, 64 tokens
    expected = answer(server, question(png_data_url("00603.png"), max_tokens=64))["choices"][0]["message"]["content"]
    assert shown == expected
    assert shot.stat().st_size > 5000
