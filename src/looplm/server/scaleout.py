"""`looplm serve --replicas N`: the same OpenAI app on Ray Serve replicas that share the working memory
(issue 16). Imported only with --replicas: nothing else in looplm imports Ray.

    client ──HTTP──▶ Ray's proxy ──▶ Ingress (FastAPI, reads the body, hashes the prompt's token chunks)
                                         │ handle call, PrefixRouter picks the replica
                                         ▼
                     Replica 1 … N: the whole `looplm serve` app (engine thread, KV pool, metrics) run
                     in-process by AppRunner; one PrefixStore each: host RAM, then the shared Redis

Two tiers because Ray's router never sees an HTTP body (it routes before the replica pulls it from the
proxy): the ingress parses the request and calls the replica deployment with plain data, and the
router then sees the prompt's chunk hashes. `PrefixRouter` sends a request to the replica that served
the longest run of its leading chunks (its host tier likely holds them), falling back to the least
loaded replica; `--router pow2` is Ray's default power-of-two-choices, for comparison. Whatever replica
serves it, the Redis tier makes a prefix computed on one replica a hit on another.

A replica that dies is replaced by Ray's controller; its in-flight requests fail with 503
`{"error": {"type": "service_unavailable", "code": "replica_died", ...}}` (retryable); the others go on.
"""

# No `from __future__ import annotations` here: Ray ships the ingress class by value (cloudpickle), with only
# the globals its code names, so FastAPI could not resolve string annotations such as "Request".
import asyncio
import json
import logging
import os
import signal
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from fastapi import Request
from ray import serve
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from .app import load_model
from .protocol import APIError

log = logging.getLogger("looplm.server")
APP_NAME = "looplm"
ROUTED = ("/v1/completions", "/v1/chat/completions")  # requests whose prompt picks the replica


@dataclass
class Forward:
    """One HTTP request, as plain data from the ingress to a replica."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    prefix: list[str] = field(default_factory=list)  # the prompt's leading token-chunk hashes (routing only)


# --------------------------------------------------------------------------- routing


class PrefixRouter(RequestRouter):
    """The replica that served the longest run of the request's leading chunks, then the others (Serve
    takes the shortest queue that accepts within each group: the fallback is the least loaded)."""

    def initialize_state(self, max_entries: int = 100_000):
        self._owner: OrderedDict[str, str] = OrderedDict()  # chunk hash → replica id (LRU)
        self._max = max_entries

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        prefix = _prefix_of(pending_request)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        best = None
        for key in prefix:  # the chain: a later chunk's owner also holds the earlier ones
            owner = self._owner.get(key)
            if owner is None or owner not in by_id:
                break
            best = owner
        if best is None:
            return [candidate_replicas]
        return [[by_id[best]], [r for r in candidate_replicas if r.replica_id.unique_id != best]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        for key in _prefix_of(pending_request):
            self._owner[key] = replica_id.unique_id
            self._owner.move_to_end(key)
        while len(self._owner) > self._max:
            self._owner.popitem(last=False)

    def on_replica_actor_died(self, replica_id) -> None:
        dead = replica_id.unique_id
        for key in [k for k, v in self._owner.items() if v == dead]:
            del self._owner[key]


def _prefix_of(pending: PendingRequest | None) -> list[str]:
    if pending is None or not pending.args or not isinstance(pending.args[0], Forward):
        return []
    return pending.args[0].prefix


# --------------------------------------------------------------------------- the replicas


@serve.deployment
class Replica:
    """The whole `looplm serve` app, one engine (per --kv) and its own KV pool; ready once the model is."""

    async def __init__(self, load_args: tuple, opts):
        from .app import create_app
        from .asgi import AppRunner

        self.runner = AppRunner(create_app(lambda: load_model(*load_args), opts))
        await self.runner.startup()
        t = time.time()
        while True:  # the app loads in a thread; Serve routes here only when __init__ returns
            status, _, body = await self._whole(Forward("GET", "/health", "", [], b""))
            if status == 200:
                break
            if b'"error"' in body and b'"loading"' not in body:
                raise RuntimeError(f"the model did not load: {body.decode()}")
            if time.time() - t > 600:
                raise RuntimeError("the model did not load in 600 s")
            await asyncio.sleep(0.2)

    async def _whole(self, req: Forward) -> tuple[int, list, bytes]:
        status, headers, body = 500, [], b""
        async for m in self.runner.request(req.method, req.path, query=req.query, headers=req.headers,
                                           body=req.body):
            if m["type"] == "http.response.start":
                status, headers = m["status"], m.get("headers", [])
            elif m["type"] == "http.response.body":
                body += m.get("body", b"")
        return status, headers, body

    async def handle(self, req: Forward):
        """The app's answer: first (status, headers), then the body's chunks as they come."""
        async for m in self.runner.request(req.method, req.path, query=req.query, headers=req.headers,
                                           body=req.body):
            if m["type"] == "http.response.start":  # which replica answered: x-looplm-replica (its pid)
                yield m["status"], [(k.decode("latin-1"), v.decode("latin-1")) for k, v in m.get("headers", [])] + \
                    [("x-looplm-replica", str(os.getpid()))]
            elif m["type"] == "http.response.body" and m.get("body"):
                yield m["body"]

    def pid(self) -> int:
        return os.getpid()

    async def __del__(self):  # noqa: D105 — Serve stops a replica: finish what runs, flush the store
        await self.runner.shutdown()


# --------------------------------------------------------------------------- the ingress


@serve.deployment
@serve.ingress()
class Ingress:
    def __init__(self, replicas, tokenizer_dir: str, chat_template: str | None, chunk_size: int):
        self.replicas = replicas
        self.tokenizer_dir, self.template, self.chunk_size = tokenizer_dir, chat_template, chunk_size

    def __serve_build_asgi_app__(self):
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse, Response, StreamingResponse

        from looplm.checkpoint import load_tokenizer

        tok = load_tokenizer(self.tokenizer_dir)
        template = self.template or getattr(tok, "chat_template", None) or None
        app = FastAPI(title="looplm (Ray Serve)", docs_url=None, redoc_url=None)

        @app.get("/health")
        async def health():
            """The deployment: 200 while at least one replica runs."""
            status = serve.status().applications.get(APP_NAME)
            states = {}
            if status is not None:
                dep = status.deployments.get("Replica")
                states = {str(k.value if hasattr(k, "value") else k): v for k, v in (dep.replica_states if dep else {}).items()}
            ok = states.get("RUNNING", 0) > 0
            return JSONResponse({"status": "ok" if ok else "unavailable", "replicas": states},
                                status_code=200 if ok else 503)

        @app.api_route("/{path:path}", methods=["GET", "POST"])
        async def forward(path: str, request: Request):
            body = await request.body()
            path = "/" + path
            prefix = self._prefix(tok, template, path, body) if path in ROUTED else []
            req = Forward(request.method, path, request.url.query, list(request.headers.items()), body, prefix)
            gen = self.replicas.options(stream=True, method_name="handle").remote(req)
            try:
                status, headers = await gen.__anext__()
            except Exception as e:  # noqa: BLE001 — a replica that died, a full queue: retryable
                return _unavailable(e)
            hdrs = {k: v for k, v in headers if k.lower() not in ("content-length", "transfer-encoding")}

            async def rest():
                try:
                    async for chunk in gen:
                        yield chunk
                except Exception as e:  # noqa: BLE001 — the replica died mid-stream: say so, end the stream
                    log.warning("replica failed mid-response: %s", e)
                    err = APIError(f"the replica serving this request died: {e}; retry", status=503,
                                   type="service_unavailable", code="replica_died")
                    yield f"data: {json.dumps(err.body())}\n\n".encode()

            media = hdrs.pop("content-type", None)
            if media is not None and media.startswith("text/event-stream"):
                return StreamingResponse(rest(), status_code=status, headers=hdrs, media_type=media)
            content = b""
            try:
                async for chunk in gen:
                    content += chunk
            except Exception as e:  # noqa: BLE001
                return _unavailable(e)
            return Response(content, status_code=status, headers=hdrs, media_type=media)

        def _unavailable(e: Exception):
            err = APIError(f"no replica could answer ({type(e).__name__}: {e}); retry", status=503,
                           type="service_unavailable", code="replica_died")
            return JSONResponse(err.body(), status_code=503)

        return app

    def _prefix(self, tok, template, path: str, body: bytes) -> list[str]:
        """Hashes of the prompt's leading token chunks (the first prompt of a completions batch); [] when the
        body does not parse (the replica answers with the proper error)."""
        from looplm.store import chunk_keys

        try:
            data = json.loads(body)
            if path == "/v1/chat/completions":
                msgs = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
                         "".join(p.get("text", "") for p in m["content"])} for m in data["messages"]]
                ids = tok.apply_chat_template(msgs, chat_template=template, tokenize=True, add_generation_prompt=True)
                ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            else:
                p = data["prompt"]
                p = p[0] if isinstance(p, list) and p and not isinstance(p[0], int) else p
                ids = list(p) if isinstance(p, list) else list(tok(p)["input_ids"])
            return chunk_keys("route", [int(t) for t in ids], self.chunk_size)
        except Exception:  # noqa: BLE001
            return []


# --------------------------------------------------------------------------- the command


def run(*, opts, load_args: tuple, replicas: int, max_replicas: int | None, ray_address: str | None,
        host: str, port: int, router: str, tokenizer_dir: str) -> None:
    """Start (or join) Ray, deploy ingress + N replicas, serve until SIGTERM/SIGINT, then shut down."""
    import dataclasses

    import ray
    from ray.serve.config import AutoscalingConfig, RequestRouterConfig

    opts = dataclasses.replace(opts, engine_process=False)  # a replica is a process of its own already

    if ray_address:
        ray.init(address=ray_address, logging_level=logging.WARNING)
    else:
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
    cpus = ray.cluster_resources().get("CPU", 1.0)
    gpus = ray.cluster_resources().get("GPU", 0.0)
    most = max_replicas or replicas
    ingress_cpus = 0.1  # it parses JSON and hashes token ids
    per = int(100 * min(1.0, (cpus - ingress_cpus) / most)) / 100  # small machines: fractional CPUs
    actor = {"num_gpus": 1} if load_args[2].startswith("cuda") and gpus >= 1 else {"num_cpus": per}
    options = dict(ray_actor_options=actor, max_ongoing_requests=opts.max_batch_size + opts.max_queue,
                   health_check_period_s=5, health_check_timeout_s=30, graceful_shutdown_timeout_s=60)
    if max_replicas and max_replicas > replicas:
        options["autoscaling_config"] = AutoscalingConfig(min_replicas=replicas, max_replicas=max_replicas,
                                                          target_ongoing_requests=max(1, opts.max_batch_size // 2))
    else:
        options["num_replicas"] = replicas
    if router == "prefix":
        options["request_router_config"] = RequestRouterConfig(request_router_class=PrefixRouter)
    backend = Replica.options(**options).bind(load_args, opts)
    ingress = Ingress.options(num_replicas=1, ray_actor_options={"num_cpus": ingress_cpus},
                              max_ongoing_requests=10_000).bind(backend, tokenizer_dir, opts.chat_template,
                                                                opts.kv_chunk_size)
    serve.start(http_options={"host": host, "port": port})
    serve.run(ingress, name=APP_NAME, route_prefix="/")
    log.warning("looplm serve: %d replica(s) on Ray Serve at http://%s:%d", replicas, host, port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
