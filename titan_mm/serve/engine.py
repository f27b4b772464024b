"""The model behind the server: a chat request -> a prompt in the model's chat format -> tokens from
``titan_mm.generate.generate_stream`` -> text deltas. Text is released only once it is final: a
trailing incomplete UTF-8 character, or the start of a stop string, waits for the next token."""

from typing import Iterator

from titan_mm.data.documents import SampleError
from titan_mm.generate import InferenceModel, Sampling, chat_prompt, completion_text, generate_stream
from titan_mm.serve.openai_api import ChatRequest, RequestError
from titan_mm.serve.server import Delta


class ModelEngine:
    """Answers chat requests with one InferenceModel (one request at a time: the server's model
    worker calls ``stream``)."""

    def __init__(self, im: InferenceModel, name: str):
        self.im, self.name = im, name

    def stream(self, request: ChatRequest) -> Iterator[Delta]:
        try:
            prompt = chat_prompt(self.im, request.messages)
        except SampleError as e:
            raise RequestError(400, f"cannot build a prompt from these messages: {e}") from None
        stops = tuple(request.stop)
        sampling = Sampling(max_new_tokens=request.max_new_tokens, temperature=request.temperature,
                            top_k=request.top_k, top_p=request.top_p, stop_strings=stops, seed=request.seed)
        ids, sent, stopped = [], "", False
        for step_tokens in generate_stream(self.im, [prompt], sampling):
            token = step_tokens[0]
            if token is None:  # a stop token: not part of the answer
                stopped = True
                break
            ids.append(token)
            text = completion_text(self.im.tokenizer, ids, stops)
            if len(text) < len(self.im.tokenizer.decode(ids)):  # a stop string completed
                stopped = True
                break
            final = text[:len(text) - held_back(text, stops)]
            if len(final) > len(sent):
                yield Delta(final[len(sent):])
                sent = final
        text = completion_text(self.im.tokenizer, ids, stops)
        yield Delta(text[len(sent):], "stop" if stopped else "length", prompt_tokens=len(prompt.tokens),
                    completion_tokens=len(ids))


def held_back(text: str, stop_strings: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` may still change: an incomplete UTF-8 character
    (decoded as U+FFFD) or the beginning of a stop string."""
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    for k in range(min(len(text), max((len(s) for s in stop_strings), default=0)), 0, -1):
        if any(s.startswith(text[-k:]) for s in stop_strings):
            return k
    return 0
