"""From checked prompts to an OpenAI response: submit each choice to the driver, gather its outputs, and
answer whole or as server-sent events. Shared by /v1/completions and /v1/chat/completions (`chat`)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from .driver import Aborted
from .protocol import APIError, Budget
from .text import TextStream


@dataclass(eq=False)
class _Choice:
    index: int
    prompt_index: int
    rid: str
    text: TextStream
    tokens: list[int] = field(default_factory=list)
    loops: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)  # per token, when top logprobs are asked
    finish_reason: str | None = None
    cached: int = 0  # prompt tokens whose KV came from the prefix store
    sent: int = 0  # tokens already covered by a streamed chunk
    t_last: float | None = None


@dataclass
class Job:
    """One HTTP request's choices and how to answer it."""

    state: object  # the app's ServerState
    chat: bool
    budget: Budget
    prompts: list[list[int]]
    max_new: list[int]  # per prompt
    stream: bool
    include_usage: bool
    return_loops: bool
    return_token_ids: bool
    logprobs: bool
    ignore_eos: bool
    top_logprobs: int = 0  # alternatives per token (completions: logprobs=N; chat: top_logprobs=N)
    id: str = ""
    created: int = 0
    choices: dict[str, _Choice] = field(default_factory=dict)


async def respond(job: Job, request: Request):
    """Submit every choice, then answer (JSON or SSE); any way out aborts what is still running."""
    st = job.state
    job.id = f"{'chatcmpl' if job.chat else 'cmpl'}-{uuid.uuid4().hex}"
    job.created = int(time.time())
    t0 = time.perf_counter()
    out: asyncio.Queue = asyncio.Queue()
    stop_ids = [] if job.ignore_eos else st.stop_ids
    try:
        for p, (prompt, max_new) in enumerate(zip(job.prompts, job.max_new)):
            for j in range(job.budget.n):
                index = p * job.budget.n + j
                args = dict(job.budget.engine_args, max_new_tokens=max_new, stop_tokens=stop_ids,
                            top_logprobs=job.top_logprobs)
                if args["seed"] is not None:  # choice j of a seeded request draws with seed + j
                    args["seed"] += j
                rid = f"{job.id}-{index}"
                text = TextStream(st.decode, stop=job.budget.stop, stop_ids=st.stop_ids)
                job.choices[rid] = _Choice(index, p, rid, text)
                st.driver.add(job.budget.kv, rid, prompt, args, out)
        st.metrics.prompt_tokens.labels(st.model_name).inc(sum(len(p) for p in job.prompts))
    except BaseException:
        _abort(job)
        raise
    events = _events(job, out, t0)
    if job.stream:
        return StreamingResponse(_sse(job, events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    watcher = asyncio.create_task(_watch_disconnect(job, request))
    try:
        async for _ in events:
            pass
    finally:
        watcher.cancel()
        _abort(job)
    return JSONResponse(_whole(job))


def _abort(job: Job) -> None:
    for c in job.choices.values():
        if c.finish_reason is None:
            job.state.driver.abort(c.rid)


async def _watch_disconnect(job: Job, request: Request) -> None:
    """A client that hangs up on a non-streamed request: abort its choices (their KV rows free at once)."""
    while True:
        await asyncio.sleep(0.2)
        if await request.is_disconnected():
            _abort(job)
            return


async def _events(job: Job, out: asyncio.Queue, t0: float) -> AsyncIterator[tuple[_Choice, str]]:
    """(choice, new text) for every output of every choice, until all are done; records the latencies."""
    st, live = job.state, set(job.choices)
    m, name = st.metrics, st.model_name
    while live:
        item = await out.get()
        if isinstance(item, APIError):
            raise item
        if isinstance(item, Aborted):
            if item.request_id in live:  # aborted from outside (a disconnect): nothing more comes
                live.discard(item.request_id)
                job.choices[item.request_id].finish_reason = "abort"
            continue
        c = job.choices[item.request_id]
        if c.rid not in live:
            continue
        now = time.perf_counter()
        if item.new_tokens:
            (m.ttft if c.t_last is None else m.itl).labels(name).observe(now - (t0 if c.t_last is None else c.t_last))
            c.t_last = now
            c.tokens += item.new_tokens
            c.loops += item.loops
            c.cached = item.cached_tokens
            c.logprobs += item.logprobs
            c.top += item.top_logprobs
        delta = c.text.add(item.new_tokens)
        if c.text.stopped:  # a stop string: the choice ends here, whatever the engine would do next
            c.finish_reason = "stop"
            st.driver.abort(c.rid)
        elif item.finished:
            c.finish_reason = item.finish_reason
            delta += c.text.finish()
        if c.finish_reason is not None:
            live.discard(c.rid)
            m.e2e.labels(name).observe(now - t0)
            m.requests.labels(name, c.finish_reason).inc()
        yield c, delta


# --------------------------------------------------------------------------- response bodies


def _usage(job: Job) -> dict:
    n_tokens = sum(len(c.tokens) for c in job.choices.values())
    loops = sum(sum(c.loops) for c in job.choices.values())
    prompt = sum(len(p) for p in job.prompts)
    cached: dict[int, int] = {}  # per prompt: the most any of its choices reused
    for c in job.choices.values():
        cached[c.prompt_index] = max(cached.get(c.prompt_index, 0), c.cached)
    return {"prompt_tokens": prompt, "completion_tokens": n_tokens, "total_tokens": prompt + n_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(cached.values())},
            "mean_loops": round(loops / n_tokens, 4) if n_tokens else 0.0}


def _logprobs(job: Job, c: _Choice, start: int) -> dict | None:
    if not job.logprobs:
        return None
    decode = job.state.decode
    strs = [decode([t]) for t in c.tokens]  # one token's text each
    lps = c.logprobs[start:]
    tops = [[(decode([t]), lp) for t, lp in top] for top in c.top[start:]] if job.top_logprobs else None
    if job.chat:
        return {"content": [{"token": s, "logprob": lp, "bytes": list(s.encode()),
                             "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top]}
                            for s, lp, top in zip(strs[start:], lps, tops or [[]] * len(lps))]}
    offsets = [sum(len(s) for s in strs[:i]) for i in range(start, len(strs))]
    top_dicts = None  # legacy completions: a dict per token, likeliest first (two alternatives that decode to
    if tops is not None:  # the same text keep the likelier)
        top_dicts = [{} for _ in tops]
        for d, top in zip(top_dicts, tops):
            for t, v in top:
                d.setdefault(t, v)
    return {"tokens": strs[start:], "token_logprobs": lps, "top_logprobs": top_dicts, "text_offset": offsets}


def _extras(job: Job, c: _Choice, start: int) -> dict:
    extra = {}
    if job.return_loops:
        extra["loops"] = c.loops[start:]
    if job.return_token_ids:
        extra["token_ids"] = c.tokens[start:]
    return extra


def _whole(job: Job) -> dict:
    choices = []
    for c in sorted(job.choices.values(), key=lambda c: c.index):
        body = {"index": c.index}
        if job.chat:
            body["message"] = {"role": "assistant", "content": c.text.text}
        else:
            body["text"] = c.text.text
        body.update(logprobs=_logprobs(job, c, 0), finish_reason=c.finish_reason, **_extras(job, c, 0))
        choices.append(body)
    return {"id": job.id, "object": "chat.completion" if job.chat else "text_completion", "created": job.created,
            "model": job.state.model_name, "choices": choices, "usage": _usage(job)}


def _chunk(job: Job, choices: list[dict], usage: dict | None = None) -> str:
    body = {"id": job.id, "object": "chat.completion.chunk" if job.chat else "text_completion",
            "created": job.created, "model": job.state.model_name, "choices": choices}
    if job.include_usage:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


async def _sse(job: Job, events: AsyncIterator[tuple[_Choice, str]]) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text (and one per finish), the usage chunk when asked, [DONE].
    A client that hangs up cancels this generator; `finally` aborts its choices and frees their KV."""
    try:
        if job.chat:  # the role first, as OpenAI sends it
            yield _chunk(job, [{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None} for c in sorted(job.choices.values(), key=lambda c: c.index)])
        async for c, delta in events:
            if not delta and c.finish_reason is None:
                continue  # text held back (a split character, a possible stop string): its tokens go with the next
            start, c.sent = c.sent, len(c.tokens)
            extras = _extras(job, c, start)
            if job.chat:
                body = {"index": c.index, "delta": {"content": delta, **extras}}
            else:
                body = {"index": c.index, "text": delta, **extras}
            body.update(logprobs=_logprobs(job, c, start), finish_reason=c.finish_reason)
            yield _chunk(job, [body])
        if job.include_usage:
            yield _chunk(job, [], _usage(job))
        yield "data: [DONE]\n\n"
    except APIError as e:  # the headers are sent: the error goes in the stream, as OpenAI does
        yield f"data: {json.dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        _abort(job)
