"""The engine driver: one thread owns the engines (one per KV strategy) and steps them; HTTP handlers, on
the asyncio loop, talk to it only through `add` and `abort`.

`looplm.batching.Engine` is neither thread-safe nor async, so nothing but this thread touches an engine:
`add` and `abort` put commands on a queue that the thread drains between steps, and every RequestOutput
goes back to its handler's asyncio queue through `loop.call_soon_threadsafe`. What a handler receives on
its queue, per request id: RequestOutput items, then either the finished one, `Aborted`, or an APIError
(its add was refused, or a step failed).

A step that raises (a bug, an out-of-memory) fails the requests of that engine with a 500 and the thread
goes on: a failing request never takes the server down (issue 14).

`looplm serve` runs the same loop in a child process by default (engine_process.py, the same interface);
this thread is what `--no-engine-process`, Ray Serve replicas and in-process apps (tests) use.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import traceback
from dataclasses import dataclass

from .metrics import Metrics
from .protocol import APIError

log = logging.getLogger("looplm.server")


@dataclass(frozen=True)
class Aborted:
    request_id: str


@dataclass(eq=False)
class _Sub:
    kv: str
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue

    def deliver(self, item: object) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


def _put_all(pairs: list[tuple[asyncio.Queue, object]]) -> None:
    for out, item in pairs:
        out.put_nowait(item)


class Admission:
    """What both drivers (this thread, and engine_process.EngineProcess) check at the door: the --max-queue
    bound, counted over the adds not yet taken by an engine and the requests its queue holds, and shutdown."""

    def __init__(self, max_queue: int, metrics: Metrics | None = None):
        if max_queue < 1:
            raise ValueError(f"max_queue must be ≥ 1, got {max_queue}")
        self.max_queue, self.metrics = max_queue, metrics
        self._lock = threading.Lock()
        self._queued = 0  # adds sent, not yet in an engine
        self._waiting = 0  # requests in the engines' waiting queues after the last step
        self._stopping = False

    @property
    def queued(self) -> int:
        with self._lock:
            return self._queued + self._waiting

    def _admit(self) -> None:
        """Count one more add, or raise APIError 503 (shutting down, or a full queue). Under self._lock."""
        if self._stopping:
            raise APIError("the server is shutting down", status=503, type="service_unavailable")
        if self._queued + self._waiting >= self.max_queue:
            if self.metrics is not None:
                self.metrics.rejected.labels(self.metrics.model_name).inc()
            raise APIError(f"the queue is full: {self._queued + self._waiting} requests wait "
                           f"(--max-queue {self.max_queue}); retry later", status=503, type="service_unavailable",
                           code="queue_full")
        self._queued += 1


class Driver(Admission):
    def __init__(self, engines: dict, *, max_queue: int, metrics: Metrics | None = None):
        super().__init__(max_queue, metrics)
        self.engines = engines
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._subs: dict[str, _Sub] = {}  # the driver thread's own
        self._thread = threading.Thread(target=self._run, name="looplm-engine", daemon=True)

    # ------------------------------------------------------------------ any thread

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish the running and queued ones, end the thread; the prefix store's queued
        writes reach their tiers."""
        with self._lock:
            self._stopping = True
        self._commands.put(("wake",))
        self._thread.join(timeout)
        for engine in self.engines.values():  # one store serves every engine
            if engine.store is not None:
                engine.store.flush()
                break

    @property
    def error(self) -> None:
        """Why the engines are down (an engine process that died); a thread's engines do not die alone."""
        return None

    def add(self, kv: str, request_id: str, prompt: list[int], args: dict, out: asyncio.Queue) -> None:
        """Queue a request for the engine of `kv`; its outputs go to `out` (an asyncio queue of the running
        loop). Raises APIError 503 when --max-queue requests already wait, or while shutting down."""
        loop = asyncio.get_running_loop()
        with self._lock:
            self._admit()
        self._commands.put(("add", kv, request_id, prompt, args, _Sub(kv, loop, out)))

    def abort(self, request_id: str) -> None:
        """Drop a request wherever it is (no-op once it finished); its KV row is freed before the next step."""
        self._commands.put(("abort", request_id))

    # ------------------------------------------------------------------ the driver thread

    def _run(self) -> None:
        while True:
            busy = any(e.has_unfinished_requests() for e in self.engines.values())
            if not busy:
                with self._lock:
                    if self._stopping and self._queued == 0:
                        return
            try:  # idle: block until a command comes; busy: take what is there and step
                cmd = self._commands.get_nowait() if busy else self._commands.get()
            except queue.Empty:
                cmd = None
            while cmd is not None:
                self._command(cmd)
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
            for kv, engine in self.engines.items():
                if engine.has_unfinished_requests():
                    self._step(kv, engine)
            self._update_stats()

    def _command(self, cmd: tuple) -> None:
        if cmd[0] == "add":
            _, kv, rid, prompt, args, sub = cmd
            try:
                self.engines[kv].add_request(prompt, request_id=rid, **args)
                self._subs[rid] = sub
            except ValueError as e:  # checked at the edge already; what is left is still the client's input
                sub.deliver(APIError(str(e), param=_param_of(str(e)), code="invalid_value"))
            except Exception as e:  # noqa: BLE001 — one bad request must not end the thread
                log.error("add_request failed: %s", traceback.format_exc())
                sub.deliver(APIError(f"internal error: {e}", status=500, type="server_error"))
            finally:
                with self._lock:
                    self._queued -= 1
        elif cmd[0] == "abort":
            sub = self._subs.pop(cmd[1], None)
            if sub is not None:
                try:
                    self.engines[sub.kv].abort(cmd[1])
                except KeyError:  # finished in the step that is being delivered
                    pass
                sub.deliver(Aborted(cmd[1]))

    def _step(self, kv: str, engine) -> None:
        try:
            outputs = engine.step()
        except Exception as e:  # noqa: BLE001
            log.error("engine step (kv=%s) failed; failing its requests: %s", kv, traceback.format_exc())
            for rid, sub in list(self._subs.items()):
                if sub.kv == kv:
                    try:
                        engine.abort(rid)
                    except Exception:  # noqa: BLE001
                        pass
                    sub.deliver(APIError(f"internal error in the engine: {e}", status=500, type="server_error"))
                    del self._subs[rid]
            return
        batches: dict[asyncio.AbstractEventLoop, list] = {}  # one wake-up per event loop per step, not per token
        for out in outputs:
            sub = self._subs.get(out.request_id)
            if sub is None:
                continue
            if self.metrics is not None and out.loops:
                self.metrics.tokens(kv, out.loops)
            batches.setdefault(sub.loop, []).append((sub.out, out))
            if out.finished:
                del self._subs[out.request_id]
        for loop, pairs in batches.items():
            loop.call_soon_threadsafe(_put_all, pairs)

    def _update_stats(self) -> None:
        waiting = 0
        for kv, engine in self.engines.items():
            stats = engine.stats()
            waiting += stats["waiting"]
            if self.metrics is not None:
                self.metrics.pool_stats(kv, stats)
        with self._lock:
            self._waiting = waiting


PARAMS = ("num_loops", "exit", "max_new_tokens", "temperature", "top_k", "top_p", "prompt")


def _param_of(message: str) -> str | None:
    """The request field an engine's ValueError is about (its messages start with the argument's name)."""
    for p in PARAMS:
        if message.startswith(p) or message.startswith(f"{p.replace('_', ' ')}"):
            return "max_tokens" if p == "max_new_tokens" else p
    return None
