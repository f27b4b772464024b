"""Talk to a running scripts/serve.py with the official ``openai`` client (``pip install openai``; not
a dependency of titan_mm): list the model, ask one question with a data-URL image plainly and
streamed (the two answers must agree), and check that an unimplemented field and an undecodable
image come back as 400s (docs/serving.md).

    python scripts/openai_client_check.py [--port 8000] [--image assets/sample_data/images/00600.png]
"""

import argparse
import base64
import sys

import openai


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--image", default="assets/sample_data/images/00600.png")
    opts = parser.parse_args(argv)
    client = openai.OpenAI(base_url=f"http://{opts.host}:{opts.port}/v1", api_key="unused")
    with open(opts.image, "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What do you see?"}]}]
    model = client.models.list().data[0].id
    print("model:", model)
    plain = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=16)
    text = plain.choices[0].message.content
    print(f"plain: {text!r} ({plain.choices[0].finish_reason}, {plain.usage.completion_tokens} tokens)")
    chunks = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=16,
                                            stream=True, stream_options={"include_usage": True})
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    print(f"streamed: {streamed!r}")
    failures = [] if streamed == text else ["the streamed answer differs from the plain one"]
    bad = {"an unimplemented field": dict(messages=messages, frequency_penalty=0.5),
           "an undecodable image": dict(messages=[{"role": "user", "content": [
               {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])}
    for what, request in bad.items():
        try:
            client.chat.completions.create(model=model, max_tokens=4, **request)
            failures.append(f"{what} was answered")
        except openai.BadRequestError as e:
            print(f"{what}: {e.status_code} {e.message}")
    print("FAILED: " + "; ".join(failures) if failures else "ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
