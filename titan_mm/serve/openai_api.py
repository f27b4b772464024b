"""OpenAI's chat-completions request and response format (docs/serving.md): a request body checked
field by field into a ChatRequest, images fetched and decoded, and the response / stream chunk
objects. Every problem with a request is a RequestError, answered with its HTTP status."""

import base64
import binascii
import io
import json
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field

from titan_mm.data.image import MediaError, load_image


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx) and a message naming the fix."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": None}}


@dataclass
class Limits:
    """What one request may ask for."""

    max_request_bytes: int = 16 << 20
    """Request bodies above this are refused with 413 (a base64 image is 4/3 of its bytes)."""
    max_image_bytes: int = 8 << 20
    """An image (decoded data URL or fetched URL) above this is refused with 413."""
    max_images: int = 8
    """Images per request."""
    max_new_tokens: int = 512
    """The largest max_tokens a request may ask for (and the default)."""
    url_timeout_s: float = 10.0
    """Fetching an http(s) image URL gives up after this many seconds (400)."""


@dataclass
class ChatRequest:
    messages: list[dict]
    """OpenAI-style messages; each image part as {"type": "image", "image": encoded bytes}."""
    max_new_tokens: int
    stream: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    model: str = ""


def _number(body: dict, key: str, default, *, low: float, high: float, integer: bool = False):
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise RequestError(400, f"'{key}' must be {kind} in [{low}, {high}], got {value!r}", key)
    return value


FIELDS = {"model", "messages", "stream", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "stop", "seed", "n", "stream_options", "user"}
"""Request fields this server reads ("user" and "stream_options" are accepted and ignored; n must
be 1)."""


def parse_request(raw: bytes, limits: Limits) -> ChatRequest:
    """The checked request of a chat-completions body (images fetched and decoded)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise RequestError(400, f"unknown field(s) {unknown}; this server reads {sorted(FIELDS)}", unknown[0])
    if not isinstance(body.get("model", ""), str):
        raise RequestError(400, "'model' must be a string", "model")
    if not isinstance(body.get("stream", False), bool):
        raise RequestError(400, f"'stream' must be true or false, got {body['stream']!r}", "stream")
    if body.get("n", 1) != 1:
        raise RequestError(400, "'n' must be 1: this server returns one choice", "n")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
        raise RequestError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    max_tokens_key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(400, f"'seed' must be an integer, got {seed!r}", "seed")
    return ChatRequest(
        messages=parse_messages(body.get("messages"), limits),
        max_new_tokens=_number(body, max_tokens_key, limits.max_new_tokens, low=1, high=limits.max_new_tokens,
                               integer=True),
        stream=body.get("stream", False),
        temperature=_number(body, "temperature", 1.0, low=0.0, high=2.0),
        top_p=_number(body, "top_p", 1.0, low=1e-6, high=1.0),
        top_k=_number(body, "top_k", 0, low=0, high=1 << 30, integer=True),
        stop=stop, seed=seed, model=body.get("model", ""))


def parse_messages(messages, limits: Limits) -> list[dict]:
    """OpenAI messages -> the chat pipeline's messages (titan_mm/data/chat.py), images as bytes."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list", "messages")
    out, images = [], 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise RequestError(400, f"{where} must be an object with 'role' system, user or assistant", where)
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": message["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise RequestError(400, f"{where}.content must be a string or a list of parts", where)
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                if message["role"] != "user":
                    raise RequestError(400, f"{where}: images may appear in user messages only", where)
                images += 1
                if images > limits.max_images:
                    raise RequestError(400, f"more than {limits.max_images} images in one request", where)
                parts.append({"type": "image", "image": image_bytes(part.get("image_url"), limits,
                                                                    f"{where}.content[{j}]")})
            else:
                raise RequestError(400, f"{where}.content[{j}] must be {{'type': 'text', 'text': ...}} or "
                                        f"{{'type': 'image_url', 'image_url': {{'url': ...}}}}, got {part!r:.100}",
                                   where)
        out.append({"role": message["role"], "content": parts})
    if out[-1]["role"] == "assistant":
        raise RequestError(400, "the last message must not be the assistant's: there is nothing to answer",
                           "messages")
    return out


def image_bytes(image_url, limits: Limits, where: str) -> bytes:
    """An image_url part's image: a base64 data URL or an http(s) URL, checked to decode."""
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str):
        raise RequestError(400, f"{where}: image_url must be {{'url': ...}}", where)
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise RequestError(400, f"{where}: a data URL must be data:<mime>;base64,<data>", where)
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise RequestError(413, f"{where}: the image is over {limits.max_image_bytes} bytes", where)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestError(400, f"{where}: invalid base64 in the data URL ({e})", where) from None
    elif url.startswith(("http://", "https://")):
        data = fetch_image(url, limits, where)
    else:
        raise RequestError(400, f"{where}: image URLs must be http(s) or base64 data URLs, got {url[:40]!r}", where)
    try:
        load_image(io.BytesIO(data))
    except MediaError:
        raise RequestError(400, f"{where}: the image ({len(data)} bytes) cannot be decoded; send a PNG, JPEG, "
                                f"WebP or another format Pillow reads", where) from None
    return data


def fetch_image(url: str, limits: Limits, where: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=limits.url_timeout_s) as response:
            data = response.read(limits.max_image_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise RequestError(400, f"{where}: cannot fetch {url}: {e}", where) from None
    if len(data) > limits.max_image_bytes:
        raise RequestError(413, f"{where}: the image at {url} is over {limits.max_image_bytes} bytes", where)
    return data


# --- responses ------------------------------------------------------------------------------------

def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def chunk(cid: str, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def sse(payload: dict | str) -> bytes:
    """One server-sent event: ``data: <json>`` (or ``data: [DONE]``) and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()
