"""The engines' loop and the two ways the server runs it: in a thread of its own process (`Driver`) or in a
child process (engine_process.py, what `looplm serve` does by default).

`looplm.batching.Engine` is neither thread-safe nor async, so one loop (`EngineLoop`) owns the engines (one
per KV strategy) and steps them; HTTP handlers, on the asyncio loop, talk to it only through `add` and
`abort`. The loop takes commands from a channel between steps and answers with one message per step:

    to the loop     ("add", kv, request_id, prompt, args) · ("abort", request_id) · ("stop",)
    from the loop   ("step", outputs, stats, adds_taken, waiting, errors, aborted), and ("stopped",) last

`Admission.deliver` turns each "step" message into the metrics and the handlers' asyncio queues, with one
wake-up of the event loop per step. What a handler receives on its queue, per request id: RequestOutput
items, then either the finished one, `Aborted`, or an APIError (its add was refused, or a step failed).

A step that raises (a bug, an out-of-memory) fails the requests of that engine with a 500 and the loop goes
on: a failing request never takes the server down (issue 14). `Driver` (this module) runs the loop in a
thread over a queue: `--no-engine-process`, Ray Serve replicas and in-process apps (tests) use it.
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
    """The server's side of the engines' loop, whichever way it runs: the door (the --max-queue bound, counted
    over the adds not yet taken by an engine and the requests its queue holds; shutdown), the handlers'
    queues, and the delivery of each step's message. Subclasses send the commands (`_send`)."""

    def __init__(self, max_queue: int, metrics: Metrics | None = None):
        if max_queue < 1:
            raise ValueError(f"max_queue must be ≥ 1, got {max_queue}")
        self.max_queue, self.metrics = max_queue, metrics
        self._lock = threading.Lock()
        self._queued = 0  # adds sent, not yet in an engine
        self._waiting = 0  # requests in the engines' waiting queues after the last step
        self._stopping = False
        self._subs: dict[str, _Sub] = {}
        self._error: str | None = None

    @property
    def queued(self) -> int:
        with self._lock:
            return self._queued + self._waiting

    @property
    def error(self) -> str | None:
        """Why the engines are down (an engine process that died), or None."""
        return self._error

    def add(self, kv: str, request_id: str, prompt: list[int], args: dict, out: asyncio.Queue) -> None:
        """Queue a request for the engine of `kv`; its outputs go to `out` (an asyncio queue of the running
        loop). Raises APIError 503 when --max-queue requests already wait, while shutting down, or when the
        engines are down."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._error is not None:
                raise APIError(f"the engine is down: {self._error}", status=503, type="service_unavailable")
            if self._stopping:
                raise APIError("the server is shutting down", status=503, type="service_unavailable")
            if self._queued + self._waiting >= self.max_queue:
                if self.metrics is not None:
                    self.metrics.rejected.labels(self.metrics.model_name).inc()
                raise APIError(f"the queue is full: {self._queued + self._waiting} requests wait "
                               f"(--max-queue {self.max_queue}); retry later", status=503,
                               type="service_unavailable", code="queue_full")
            self._queued += 1
            self._subs[request_id] = _Sub(kv, loop, out)
            self._send(("add", kv, request_id, prompt, args))

    def abort(self, request_id: str) -> None:
        """Drop a request wherever it is (no-op once it finished); its KV row is freed before the next step."""
        with self._lock:
            if request_id in self._subs and self._error is None:
                self._send(("abort", request_id))

    def _send(self, msg: tuple) -> None:  # under self._lock
        raise NotImplementedError

    def deliver(self, msg: tuple) -> None:
        """One "step" message of the loop: its outputs, refusals and aborts to the handlers' queues (one
        wake-up per event loop), its stats and tokens to the metrics."""
        _, outputs, stats, taken, waiting, errors, aborted = msg
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            self._queued -= taken
            self._waiting = waiting
            for rid, item in [*errors, *((rid, Aborted(rid)) for rid in aborted)]:
                sub = self._subs.pop(rid, None)
                if sub is not None:
                    batches.setdefault(sub.loop, []).append((sub.out, item))
            for kv, outs in outputs:
                for out in outs:
                    sub = self._subs.get(out.request_id)
                    if sub is None:
                        continue
                    batches.setdefault(sub.loop, []).append((sub.out, out))
                    if out.finished:
                        del self._subs[out.request_id]
        if self.metrics is not None:
            for kv, outs in outputs:
                for out in outs:
                    if out.loops:
                        self.metrics.tokens(kv, out.loops)
            for kv, s in stats.items():
                self.metrics.pool_stats(kv, s)
        for loop, pairs in batches.items():
            loop.call_soon_threadsafe(_put_all, pairs)


class EngineLoop:
    """Steps the engines while there is work and blocks on the channel when there is none. `recv()` blocks for
    the next command, `poll()` says whether one waits, `send(msg)` answers; EOFError from either ends the
    loop (nobody is left to serve)."""

    def __init__(self, engines: dict, recv, poll, send):
        self.engines, self.recv, self.poll, self.send = engines, recv, poll, send
        self.kv_of: dict[str, str] = {}  # request id → its engine's strategy, while it runs or waits
        self.stopping = False
        self.taken, self.errors, self.aborted = 0, [], []

    def run(self) -> None:
        while True:
            busy = any(e.has_unfinished_requests() for e in self.engines.values())
            if not busy and self.stopping:
                return
            try:
                if not busy:  # idle: block until a command comes
                    self.command(self.recv())
                while self.poll():
                    self.command(self.recv())
            except EOFError:
                return
            outputs = []
            for kv, engine in self.engines.items():
                if engine.has_unfinished_requests():
                    outputs.append((kv, self.step(kv, engine)))
            if outputs or self.taken or self.errors or self.aborted:
                stats = {kv: e.stats() for kv, e in self.engines.items()}
                waiting = sum(s["waiting"] for s in stats.values())
                try:
                    self.send(("step", outputs, stats, self.taken, waiting, self.errors, self.aborted))
                except EOFError:
                    return
                self.taken, self.errors, self.aborted = 0, [], []

    def command(self, cmd: tuple) -> None:
        if cmd[0] == "add":
            _, kv, rid, prompt, args = cmd
            self.taken += 1
            try:
                self.engines[kv].add_request(prompt, request_id=rid, **args)
                self.kv_of[rid] = kv
            except ValueError as e:  # checked at the edge already; what is left is still the client's input
                self.errors.append((rid, APIError(str(e), param=_param_of(str(e)), code="invalid_value")))
            except Exception as e:  # noqa: BLE001 — one bad request must not end the engines
                log.error("add_request failed: %s", traceback.format_exc())
                self.errors.append((rid, APIError(f"internal error: {e}", status=500, type="server_error")))
        elif cmd[0] == "abort":
            kv = self.kv_of.pop(cmd[1], None)
            if kv is not None:
                self.engines[kv].abort(cmd[1])
                self.aborted.append(cmd[1])
        elif cmd[0] == "stop":
            self.stopping = True

    def step(self, kv: str, engine) -> list:
        try:
            outputs = engine.step()
        except Exception as e:  # noqa: BLE001 — fail this engine's requests, keep serving
            log.error("engine step (kv=%s) failed; failing its requests: %s", kv, traceback.format_exc())
            for rid in [r for r, k in self.kv_of.items() if k == kv]:
                try:
                    engine.abort(rid)
                except Exception:  # noqa: BLE001
                    pass
                del self.kv_of[rid]
                self.errors.append((rid, APIError(f"internal error in the engine: {e}", status=500,
                                                  type="server_error")))
            return []
        for out in outputs:
            if out.finished:
                self.kv_of.pop(out.request_id, None)
        return outputs


class Driver(Admission):
    """The engines' loop in a thread of this process, over a queue; its messages are delivered from there."""

    def __init__(self, engines: dict, *, max_queue: int, metrics: Metrics | None = None):
        super().__init__(max_queue, metrics)
        self.engines = engines
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        loop = EngineLoop(engines, self._commands.get, lambda: not self._commands.empty(), self.deliver)
        self._thread = threading.Thread(target=loop.run, name="looplm-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish the running and queued ones, end the thread; the prefix store's queued
        writes reach their tiers."""
        with self._lock:
            if not self._stopping:
                self._stopping = True
                self._send(("stop",))
        self._thread.join(timeout)
        for engine in self.engines.values():  # one store serves every engine
            if engine.store is not None:
                engine.store.flush()
                break

    def _send(self, msg: tuple) -> None:
        self._commands.put(msg)


PARAMS = ("num_loops", "exit", "max_new_tokens", "temperature", "top_k", "top_p", "prompt")


def _param_of(message: str) -> str | None:
    """The request field an engine's ValueError is about (its messages start with the argument's name)."""
    for p in PARAMS:
        if message.startswith(p) or message.startswith(f"{p.replace('_', ' ')}"):
            return "max_tokens" if p == "max_new_tokens" else p
    return None
