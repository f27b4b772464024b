"""An OpenAI-compatible chat server on the standard library (docs/serving.md).

``ThreadingHTTPServer`` gives each connection a thread: reading and checking requests, fetching
images and writing responses happen in parallel. The model runs on one worker thread that takes
requests from a bounded queue in arrival order, so requests never share the model and a slow
client never holds it (its tokens wait in its own queue); a full queue answers 503. A client that
goes away cancels its generation at the next token. Any failure is answered with a JSON error
(4xx for the request's fault, 500 for the server's) or, once a stream has started, an error event;
the server keeps serving.

Endpoints: ``GET /`` the chat page, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /health``.
"""

import itertools
import json
import logging
import queue
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, Protocol

from titan_mm.serve.openai_api import (ChatRequest, Limits, RequestError, chunk, completion, completion_id,
                                       parse_request, sse)

logger = logging.getLogger(__name__)

CHAT_PAGE = Path(__file__).with_name("chat.html")


@dataclass
class Delta:
    """A piece of a streamed answer; the last one has ``finish_reason`` ("stop" or "length") and
    the token counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ChatEngine(Protocol):
    """What the server needs of a model (titan_mm/serve/engine.py)."""

    name: str

    def stream(self, request: ChatRequest) -> Iterator[Delta]: ...


class Job:
    """One request on its way through the model worker: its deltas (or the exception that ended it)
    arrive in ``out``; None marks the end."""

    def __init__(self, request: ChatRequest):
        self.request = request
        self.out: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()


class ChatServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], engine: ChatEngine, limits: Limits | None = None,
                 max_queued: int = 16):
        super().__init__(address, ChatHandler)
        self.engine, self.limits = engine, limits or Limits()
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queued)
        self.worker = threading.Thread(target=self.run_model, name="model", daemon=True)
        self.worker.start()

    def run_model(self):
        """The model worker: one request at a time, in arrival order."""
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                for delta in self.engine.stream(job.request):
                    job.out.put(delta)
                    if job.cancelled.is_set():
                        break
            except Exception as e:  # noqa: BLE001 - a failed request must not end the worker
                logger.exception("generation failed")
                job.out.put(e)
            job.out.put(None)

    def submit(self, request: ChatRequest) -> Job:
        job = Job(request)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise RequestError(503, f"the server is busy ({self.jobs.maxsize} requests waiting); retry later") from None
        return job

    def server_close(self):
        try:
            self.jobs.put_nowait(None)  # ends the worker after the requests queued before it
        except queue.Full:
            pass  # the worker is a daemon thread: it ends with the process
        super().server_close()


class ChatHandler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"
    timeout = 120
    """Seconds a socket read or write may wait: idle keep-alive connections and stalled clients are
    dropped (a stream's client that stops reading cancels its generation)."""

    def log_message(self, format, *args):
        logger.info("%s %s", self.address_string(), format % args)

    # --- routes ---------------------------------------------------------------------------------

    def do_GET(self):
        path = self.path.split("?")[0]
        if path in ("/", "/index.html"):
            self.send_bytes(200, CHAT_PAGE.read_bytes(), "text/html; charset=utf-8")
        elif path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [
                {"id": self.server.engine.name, "object": "model", "created": 0, "owned_by": "titan_mm"}]})
        elif path == "/health":
            self.send_json(200, {"status": "ok"})
        else:
            self.send_error_json(RequestError(404, f"no such page {path}; the API is POST /v1/chat/completions"))

    def do_POST(self):
        try:
            if self.path.split("?")[0] != "/v1/chat/completions":
                self.close_connection = True  # its body is not read
                raise RequestError(404, f"no such endpoint {self.path}; use POST /v1/chat/completions")
            request = parse_request(self.read_body(), self.server.limits)
            job = self.server.submit(request)
        except RequestError as e:
            self.send_error_json(e)
            return
        except Exception as e:  # noqa: BLE001 - a bad request must not end the connection thread silently
            logger.exception("request failed")
            self.send_error_json(RequestError(500, f"internal error: {e}"))
            return
        if request.stream:
            self.stream_answer(job)
        else:
            self.send_answer(job)

    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise RequestError(411, "chunked request bodies are not accepted; send Content-Length")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise RequestError(411, "a Content-Length header is required")
        if int(length) > self.server.limits.max_request_bytes:
            # the body is not read: the connection is closed after the answer
            self.close_connection = True
            raise RequestError(413, f"the request body has {length} bytes, over the limit of "
                                    f"{self.server.limits.max_request_bytes}")
        return self.rfile.read(int(length))

    # --- answers ---------------------------------------------------------------------------------

    def deltas(self, job: Job) -> Iterator[Delta]:
        """The job's deltas as they come; raises what the worker raised."""
        while True:
            item = job.out.get()
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            yield item

    def send_answer(self, job: Job):
        cid, text, last = completion_id(), [], None
        try:
            for delta in self.deltas(job):
                text.append(delta.text)
                last = delta
        except Exception as e:  # noqa: BLE001 - answered, the server goes on
            self.send_error_json(as_request_error(e))
            return
        self.send_json(200, completion(cid, self.model_name(job), "".join(text), last.finish_reason,
                                       last.prompt_tokens, last.completion_tokens))

    def stream_answer(self, job: Job):
        """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``. The status is
        sent with the first delta, so that a request the model refuses still gets its 4xx."""
        cid, model = completion_id(), self.model_name(job)
        deltas = self.deltas(job)
        try:
            first = next(deltas, None)
        except Exception as e:  # noqa: BLE001
            self.send_error_json(as_request_error(e))
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            self.write(sse(chunk(cid, model, {"role": "assistant", "content": ""})))
            for delta in itertools.chain([first] if first else [], deltas):
                if delta.text:
                    self.write(sse(chunk(cid, model, {"content": delta.text})))
                if delta.finish_reason:
                    self.write(sse(chunk(cid, model, {}, delta.finish_reason)))
            self.write(sse("[DONE]"))
        except (BrokenPipeError, ConnectionResetError):
            job.cancelled.set()  # the client left: stop generating for it
        except Exception as e:  # noqa: BLE001 - the status is sent: report in the stream
            job.cancelled.set()
            try:
                self.write(sse(as_request_error(e).body()))
            except OSError:
                pass

    def model_name(self, job: Job) -> str:
        return job.request.model or self.server.engine.name

    # --- writing ---------------------------------------------------------------------------------

    def write(self, data: bytes):
        self.wfile.write(data)
        self.wfile.flush()

    def send_bytes(self, status: int, body: bytes, content_type: str):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status: int, obj: dict):
        self.send_bytes(status, json.dumps(obj).encode(), "application/json")

    def send_error_json(self, error: RequestError):
        self.send_json(error.status, error.body())


def as_request_error(error: Exception) -> RequestError:
    """A failure as the error the client gets: its own RequestError, else a 500."""
    if isinstance(error, RequestError):
        return error
    return RequestError(500, f"generation failed: {type(error).__name__}: {error}")


def serve(engine: ChatEngine, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None):
    """Serve until interrupted."""
    server = ChatServer((host, port), engine, limits)
    logger.info("serving %s on http://%s:%d/ (chat page) and /v1/chat/completions", engine.name, host,
                server.server_address[1])
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

