"""The FastAPI app of `looplm serve`: OpenAI's endpoints on top of the engine driver (issue 14).

    app = create_app(load, ServerOptions(kvs=["last", "per_loop"]))   # load() → (model, tokenizer, name)
    uvicorn.run(app, host="127.0.0.1", port=8000)

The app answers at once and loads the model in a thread: /health says 503 until it is ready, and so does
every endpoint that needs the model.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response

from .completions import Job, respond
from .driver import Driver
from .metrics import Metrics
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                       check_budget, check_max_tokens)

log = logging.getLogger("looplm.server")
STATIC = Path(__file__).parent / "static"
PROTECTED = ("/v1/", "/tokenize", "/detokenize")  # what --api-key guards (health, metrics and the page stay open)


class _Auth:
    """--api-key: requests to PROTECTED paths need `Authorization: Bearer <key>`, else a 401 in OpenAI's shape."""

    def __init__(self, app, *, api_key: str):
        self.app, self.want = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED):
            got = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if got != self.want:
                err = APIError("missing or wrong API key: send the header 'Authorization: Bearer <key>'", status=401,
                               code="invalid_api_key")
                await JSONResponse(err.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_DEFAULT_MAX_TOKENS = 512  # chat has no default in OpenAI's API: what the context leaves, at most this


@dataclass
class ServerOptions:
    model_name: str | None = None  # default: the name load() returns (the model dir's)
    kvs: list[str] = field(default_factory=lambda: ["last"])
    max_loops: int | None = None  # default: the model's num_loops
    max_batch_size: int = 32
    max_queue: int = 256
    max_kv_tokens: int | None = None  # KV positions each engine may reserve; default max(8192, the context)
    api_key: str | None = None
    chat_template: str | None = None  # a Jinja template for models whose tokenizer has none
    kv_store: list[str] = field(default_factory=list)  # prefix store tiers in order, e.g. ["host:4GiB", "redis://..."]
    kv_chunk_size: int = 256  # prompt positions per stored chunk
    prefix_kv: str = "loops"  # what a stored chunk holds: every loop's KV, or the committed KV (docs/memory.md)
    engine_process: bool = False  # the engines in a child process (load() must pickle); else in a thread


@dataclass
class ServerState:
    config: object  # the model's LoopConfig
    exit_gate: bool  # the model has a learned exit gate (Q-exit)
    tokenizer: object
    driver: object  # Driver (engines in a thread) or EngineProcess (engines in a child process)
    metrics: Metrics
    model_name: str
    kvs: list[str]
    max_loops: int
    context: int
    stop_ids: list[int]
    chat_template: str | None

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def load_model(model: str | None, dtype: str, device: str, core: tuple[int, int] | None, threads: int | None = None):
    """What `looplm serve` loads: (model, tokenizer, name). Module-level, so that an engine process and a Ray
    replica can be sent it (functools.partial of it pickles)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from looplm.checkpoint import default_model_dir, load, load_tokenizer

    path = model or str(default_model_dir())
    net = load(path, core=core, dtype=getattr(torch, dtype), device=device)
    return net, load_tokenizer(getattr(net, "name_or_path", path)), Path(path).name


def make_engines(model, opts: ServerOptions) -> tuple[dict, object]:
    """One engine (one KV pool) per strategy in opts.kvs, and the prefix store they share (or None)."""
    from looplm.batching import Engine

    max_loops = model.resolve_loops(opts.max_loops)
    max_kv = opts.max_kv_tokens or max(8192, model.config.max_position_embeddings)
    store = None
    if opts.kv_store:  # one store for every pool: what it holds (every loop's KV) serves each strategy
        from looplm.store import PrefixStore
        store = PrefixStore.from_specs(opts.kv_store, chunk_size=opts.kv_chunk_size, device=model.device)
    engines = {kv: Engine(model, kv=kv, max_loops=max_loops, max_batch_size=opts.max_batch_size, max_tokens=max_kv,
                          kv_store=store, prefix_kv=opts.prefix_kv)
               for kv in opts.kvs}
    return engines, store


def _state(config, exit_gate: bool, tokenizer, driver, tiers: list[str], max_loops: int,
           opts: ServerOptions) -> ServerState:
    from looplm.engine import stop_tokens_for

    metrics = Metrics(opts.model_name, opts.kvs, max_loops, tiers)
    driver.metrics = metrics
    driver.start()
    template = opts.chat_template or getattr(tokenizer, "chat_template", None) or None
    return ServerState(config, exit_gate, tokenizer, driver, metrics, opts.model_name, list(opts.kvs), max_loops,
                       config.max_position_embeddings, stop_tokens_for(config, tokenizer), template)


def build_state(model, tokenizer, opts: ServerOptions) -> ServerState:
    """Engines (one per kv strategy, one pool each) in a thread of this process, the metrics, started."""
    engines, store = make_engines(model, opts)
    driver = Driver(engines, max_queue=opts.max_queue)
    return _state(model.config, model.early_exit_gate is not None, tokenizer, driver,
                  [t.name for t in store.tiers] if store else [], next(iter(engines.values())).max_loops, opts)


def launch_state(load, opts: ServerOptions) -> ServerState:
    """The same with the engines in a child process (`load` runs there; engine_process.py says why)."""
    from .engine_process import EngineProcess

    proc = EngineProcess(load, opts, max_queue=opts.max_queue)
    info = proc.launch()
    opts.model_name = opts.model_name or info["name"]
    return _state(info["config"], info["exit_gate"], info["tokenizer"], proc, info["tiers"], info["max_loops"], opts)


def create_app(load: Callable[[], tuple[object, object, str]], opts: ServerOptions) -> FastAPI:
    """The app; `load()` returns (model, tokenizer, name) and runs in a thread when the app starts, or in the
    engine process with `opts.engine_process`."""
    status = {"state": None, "error": None}

    def loader() -> None:
        try:
            if opts.engine_process:
                status["state"] = launch_state(load, opts)
            else:
                model, tokenizer, name = load()
                opts.model_name = opts.model_name or name
                status["state"] = build_state(model, tokenizer, opts)
            log.info("model %s ready: kv %s, max loops %d", opts.model_name, opts.kvs, status["state"].max_loops)
        except Exception as e:  # noqa: BLE001 — reported by /health and the log
            log.exception("loading the model failed")
            status["error"] = f"{type(e).__name__}: {e}"

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        thread = threading.Thread(target=loader, name="looplm-load", daemon=True)
        thread.start()
        yield
        st = status["state"]
        if st is not None:  # SIGTERM: uvicorn stopped accepting and let open requests end; now the engines
            st.driver.stop(timeout=30)  # (and the prefix store's queued writes reach their tiers)

    app = FastAPI(title="looplm", lifespan=lifespan, docs_url=None, redoc_url=None)

    def ready() -> ServerState:
        st = status["state"]
        if st is None:
            why = status["error"] or "the model is loading"
            raise APIError(why, status=503, type="service_unavailable")
        if st.driver.error is not None:
            raise APIError(f"the engine is down: {st.driver.error}", status=503, type="service_unavailable")
        return st

    def check_model(st: ServerState, name: str | None) -> None:
        if name is not None and name != st.model_name:
            raise APIError(f"model={name!r} does not exist; this server serves {st.model_name!r}", status=404,
                           param="model", code="model_not_found")

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        value = err.get("input")
        msg = f"{param}={value!r}: {err.get('msg')}" if param else str(err.get("msg"))
        return JSONResponse(APIError(msg, param=param, code="invalid_value").body(), status_code=400)

    if opts.api_key:  # a plain ASGI middleware: Starlette's BaseHTTPMiddleware would relay every SSE chunk
        app.add_middleware(_Auth, api_key=opts.api_key)  # through a task and a memory stream

    @app.get("/health")
    async def health():
        st = status["state"]
        if st is None:
            return JSONResponse({"status": "error" if status["error"] else "loading", "error": status["error"]},
                                status_code=503)
        if st.driver.error is not None:
            return JSONResponse({"status": "error", "error": st.driver.error}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        st = ready()
        return Response(st.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def playground():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/v1/models")
    async def models():
        st = ready()
        cfg = st.config
        return {"object": "list", "data": [{
            "id": st.model_name, "object": "model", "created": 0, "owned_by": "looplm", "max_model_len": st.context,
            "looplm": {"kv": st.kvs, "max_loops": st.max_loops, "num_loops": min(cfg.num_loops, st.max_loops),
                       "exit_gate": st.exit_gate, "chat_template": st.chat_template is not None},
        }]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        st = ready()
        check_model(st, body.model)
        budget = check_budget(body, kvs=st.kvs, max_loops=st.max_loops, default_kv=st.kvs[0])
        if body.echo:
            raise APIError("echo=True is not supported", param="echo", code="invalid_value")
        if body.logprobs is not None and not 0 <= body.logprobs <= 5:
            raise APIError(f"logprobs={body.logprobs!r}: must be in [0, 5]", param="logprobs", code="invalid_value")
        prompts = _completion_prompts(st, body.prompt)
        max_new = [check_max_tokens(body.max_tokens, "max_tokens", prompt_len=len(p), context=st.context,
                                    default=COMPLETION_DEFAULT_MAX_TOKENS) for p in prompts]
        return await respond(_job(st, body, budget, prompts, max_new, chat=False, logprobs=body.logprobs is not None,
                                  top_logprobs=body.logprobs or 0), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        st = ready()
        check_model(st, body.model)
        budget = check_budget(body, kvs=st.kvs, max_loops=st.max_loops, default_kv=st.kvs[0])
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
            raise APIError(f"top_logprobs={body.top_logprobs!r}: must be in [0, 20]", param="top_logprobs",
                           code="invalid_value")
        if body.top_logprobs and not body.logprobs:
            raise APIError(f"top_logprobs={body.top_logprobs!r} needs logprobs=true", param="top_logprobs",
                           code="invalid_value")
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise APIError("max_tokens and max_completion_tokens both given; send one", param="max_tokens")
        param = "max_tokens" if body.max_tokens is not None else "max_completion_tokens"
        prompt = _chat_prompt(st, body.messages)
        value = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
        max_new = check_max_tokens(value, param, prompt_len=len(prompt),
                                   context=st.context, default=CHAT_DEFAULT_MAX_TOKENS)
        return await respond(_job(st, body, budget, [prompt], [max_new], chat=True, logprobs=body.logprobs,
                                  top_logprobs=body.top_logprobs or 0), request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        st = ready()
        check_model(st, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError("send exactly one of prompt and messages", param="prompt")
        ids = _encode(st, body.prompt) if body.prompt is not None else \
            _chat_prompt(st, body.messages, add_generation_prompt=body.add_generation_prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": st.context}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        st = ready()
        check_model(st, body.model)
        _check_ids(st, body.tokens, "tokens")
        return {"prompt": st.decode(body.tokens)}

    return app


def _job(st: ServerState, body, budget, prompts, max_new, *, chat: bool, logprobs: bool, top_logprobs: int) -> Job:
    return Job(st, chat, budget, prompts, max_new, stream=body.stream,
               include_usage=bool(body.stream_options and body.stream_options.include_usage),
               return_loops=body.return_loops, return_token_ids=body.return_token_ids, logprobs=logprobs,
               ignore_eos=body.ignore_eos, top_logprobs=top_logprobs)


def _encode(st: ServerState, text: str) -> list[int]:
    try:
        return list(st.tokenizer(text)["input_ids"])
    except Exception as e:  # noqa: BLE001 — e.g. a character this tokenizer has no token for
        raise APIError(f"prompt={text[:80]!r} cannot be tokenized: {e}", param="prompt", code="invalid_value") from None


def _check_ids(st: ServerState, ids: list[int], param: str) -> None:
    V = st.config.vocab_size
    bad = [t for t in ids if not 0 <= t < V]
    if bad:
        raise APIError(f"{param}: token ids must be in [0, {V}); got {bad[:5]}", param=param, code="invalid_value")


def _completion_prompts(st: ServerState, prompt) -> list[list[int]]:
    """A text, a list of texts, a list of ids or a list of id lists → one id list per prompt."""
    if isinstance(prompt, str):
        prompts = [_encode(st, prompt)]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = [_encode(st, p) for p in prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = [list(p) for p in prompt]
    if not prompts or any(not p for p in prompts):
        raise APIError(f"prompt={prompt!r}: every prompt needs at least one token", param="prompt",
                       code="invalid_value")
    if len(prompts) > 64:
        raise APIError(f"prompt: {len(prompts)} prompts in one request; at most 64", param="prompt")
    for p in prompts:
        _check_ids(st, p, "prompt")
    return prompts


def _chat_prompt(st: ServerState, messages, *, add_generation_prompt: bool = True) -> list[int]:
    if st.chat_template is None:
        raise APIError(f"{st.model_name!r} has no chat template; use /v1/completions, or start the server with "
                       "--chat-template", param="messages", code="no_chat_template")
    if not messages:
        raise APIError("messages=[]: at least one message", param="messages", code="invalid_value")
    msgs = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        out = st.tokenizer.apply_chat_template(msgs, chat_template=st.chat_template, tokenize=True,
                                               add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 — a template that raises on these messages, an unknown character
        raise APIError(f"messages cannot be rendered and tokenized: {e}", param="messages", code="invalid_value") from None
    ids = list(out["input_ids"] if hasattr(out, "keys") else out)
    if not ids:
        raise APIError("messages render to an empty prompt", param="messages", code="invalid_value")
    return ids


def wait_ready(url: str, timeout: float = 120.0) -> None:
    """Poll url/health until 200 (for scripts and tests)."""
    import httpx

    t = time.time()
    while time.time() - t < timeout:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout} s")
