"""Request bodies of the OpenAI API (the fields looplm reads), its error shape, and the checks that turn a
body into engine arguments. Bad input raises `APIError` naming the field and the value (issue 14).

Unknown fields are ignored, as OpenAI-compatible servers do: clients send `user`, `frequency_penalty`, ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict


class APIError(Exception):
    """An error the client caused (or 5xx ones the server reports): becomes an OpenAI error body."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.type, self.code = message, status, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by completions and chat completions: OpenAI's, then looplm's extra body fields."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # looplm's budgets and extras (the openai client's extra_body)
    num_loops: int | None = None
    exit: str | None = None
    kv: str | None = None
    top_k: int | None = None
    return_loops: bool = False
    return_token_ids: bool = False  # each choice carries token_ids (as vLLM's field of the same name)
    ignore_eos: bool = False  # generate past the end-of-sequence token (vLLM's field of the same name)


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = None
    echo: bool = False


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


# --------------------------------------------------------------------------- checks


@dataclass
class Budget:
    """What one choice asks of an engine: `Engine.add_request`'s keyword arguments and the pool to use."""

    kv: str
    engine_args: dict[str, Any]  # num_loops, exit, temperature, top_k, top_p, seed (max_new_tokens added later)
    stop: list[str]
    n: int


def _bad(param: str, value: Any, why: str) -> APIError:
    return APIError(f"{param}={value!r}: {why}", param=param, code="invalid_value")


def check_budget(req: _Common, *, kvs: list[str], max_loops: int, default_kv: str) -> Budget:
    """The checks that need no model: ranges, kv strategy, exit spec. Raises APIError naming the field."""
    from looplm.exits import parse_exit

    if not 1 <= req.n <= 16:
        raise _bad("n", req.n, "must be an integer in [1, 16]")
    if req.temperature is not None and not 0 <= req.temperature <= 2:
        raise _bad("temperature", req.temperature, "must be in [0, 2]")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise _bad("top_p", req.top_p, "must be in (0, 1]")
    top_k = req.top_k
    if top_k is not None and top_k in (0, -1):  # vLLM's "no top-k"
        top_k = None
    if top_k is not None and top_k < 1:
        raise _bad("top_k", req.top_k, "must be ≥ 1 (or 0 / -1 for none)")
    if req.num_loops is not None and not 1 <= req.num_loops <= max_loops:
        raise _bad("num_loops", req.num_loops, f"must be an integer in [1, {max_loops}] (the server's --max-loops)")
    if req.exit is not None:
        try:
            parse_exit(req.exit)
        except ValueError as e:
            raise _bad("exit", req.exit, str(e)) from None
    kv = default_kv if req.kv is None else req.kv
    if kv not in kvs:
        raise _bad("kv", req.kv, f"this server runs the kv strategies {kvs} (its --kv)")
    stop = [] if req.stop is None else [req.stop] if isinstance(req.stop, str) else list(req.stop)
    if len(stop) > 4 or any(not s for s in stop):
        raise _bad("stop", req.stop, "up to 4 non-empty strings")
    if req.seed is not None and req.seed < 0:
        raise _bad("seed", req.seed, "must be ≥ 0")
    if req.stream_options is not None and not req.stream:
        raise _bad("stream_options", req.stream_options.model_dump(), "is only allowed with stream=true")
    temperature = 1.0 if req.temperature is None else req.temperature  # OpenAI's default
    args = dict(num_loops=req.num_loops, exit=req.exit, temperature=temperature, top_k=top_k, top_p=req.top_p,
                seed=req.seed)
    return Budget(kv, args, stop, req.n)


def check_max_tokens(value: int | None, param: str, *, prompt_len: int, context: int, default: int | None) -> int:
    """max_tokens for a prompt: ≥ 1, and prompt + max_tokens within the context; default: `default`, or
    what the context leaves."""
    if value is not None and value < 1:
        raise _bad(param, value, "must be ≥ 1")
    room = context - prompt_len
    if room < 1:
        raise APIError(f"the prompt has {prompt_len} tokens; this model's context is {context} tokens, which "
                       f"leaves no room to generate", param="messages" if param == "max_completion_tokens" else "prompt",
                       code="context_length_exceeded")
    if value is None:
        return room if default is None else min(default, room)
    if prompt_len + value > context:
        raise APIError(f"{param}={value}: the prompt has {prompt_len} tokens and {prompt_len} + {value} exceeds this "
                       f"model's context of {context} tokens", param=param, code="context_length_exceeded")
    return value
