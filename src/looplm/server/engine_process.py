"""The engines in a process of their own (`looplm serve` by default; `--no-engine-process` keeps them in a thread).

One Python process has one interpreter lock. With the engines in a thread of the HTTP process, every step's
Python (scheduling, the per-token bookkeeping around the kernels) waits on the lock whenever the event loop
parses a body or writes an SSE chunk, and the other way round; on a small model, where a step is mostly
Python, the server got 3.1–3.6× one-request-at-a-time where the engine alone gets 4.7×. So, as vLLM runs its
EngineCore, the engines live in a child process (started with `spawn`, so no thread or OpenMP pool is
forked) that loads the model itself, and the two talk over a pipe:

    parent → child   ("add", kv, request_id, prompt, args) · ("abort", request_id) · ("stop",)
    child → parent   ("ready", info) | ("failed", why), then per step or batch of commands
                     ("step", outputs, stats, adds_taken, waiting, errors, aborted), and ("stopped",) last

`EngineProcess` has the thread `Driver`'s interface (start, stop, queued, add, abort, error), so the app
serves either. A reader thread in the parent turns each "step" message into the metrics and the handlers'
asyncio queues, with one wake-up of the event loop per step. If the child dies, every request in flight
gets a 500, new ones a 503, and /health says why (the server does not restart the engines by itself; a
supervisor restarts the server).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import threading
import traceback

from .driver import Aborted, Admission, _param_of, _put_all, _Sub
from .protocol import APIError

log = logging.getLogger("looplm.server")


class EngineProcess(Admission):
    def __init__(self, load, opts, *, max_queue: int):
        """`load()` → (model, tokenizer, name) runs in the child, so it must pickle (a module-level function, or
        functools.partial of one)."""
        super().__init__(max_queue)
        self._load, self._opts = load, opts
        self._subs: dict[str, _Sub] = {}
        self._error: str | None = None
        self._proc = self._conn = self._reader = None

    # ------------------------------------------------------------------ lifecycle

    def launch(self) -> dict:
        """Start the child and wait until its model and engines are ready; returns what the app needs of the
        model (config, tokenizer, name, exit_gate, max_loops, tiers). RuntimeError if the child fails."""
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, args=(child, self._load, self._opts), name="looplm-engine",
                                 daemon=True)
        self._proc.start()
        child.close()
        try:
            msg = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise RuntimeError(f"the engine process exited while loading (exit code {self._proc.exitcode})") from None
        if msg[0] != "ready":
            self._proc.join(5)
            raise RuntimeError(msg[1])
        return msg[1]

    def start(self) -> None:
        """Start delivering the child's outputs (set `metrics` first)."""
        self._reader = threading.Thread(target=self._read, name="looplm-engine-reader", daemon=True)
        self._reader.start()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, let the child finish the running and queued ones (and flush the prefix store),
        then end it."""
        with self._lock:
            self._stopping = True
            if self._error is None:
                self._send(("stop",))
        if self._reader is not None:
            self._reader.join(timeout)
        if self._proc is not None:
            self._proc.join(5 if timeout is None else max(1.0, timeout))
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(5)

    @property
    def error(self) -> str | None:
        return self._error

    # ------------------------------------------------------------------ handlers (the event loop's thread)

    def add(self, kv: str, request_id: str, prompt: list[int], args: dict, out: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._error is not None:
                raise APIError(f"the engine is down: {self._error}", status=503, type="service_unavailable")
            self._admit()
            self._subs[request_id] = _Sub(kv, loop, out)
            self._send(("add", kv, request_id, prompt, args))

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._subs and self._error is None:
                self._send(("abort", request_id))

    def _send(self, msg: tuple) -> None:  # under self._lock
        try:
            self._conn.send(msg)
        except (OSError, ValueError):  # the child is gone; the reader reports it
            pass

    # ------------------------------------------------------------------ the reader thread

    def _read(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                self._died()
                return
            if msg[0] == "stopped":
                return
            _, outputs, stats, taken, waiting, errors, aborted = msg
            batches: dict[asyncio.AbstractEventLoop, list] = {}
            with self._lock:
                self._queued -= taken
                self._waiting = waiting
                for rid, err in errors:
                    sub = self._subs.pop(rid, None)
                    if sub is not None:
                        batches.setdefault(sub.loop, []).append((sub.out, err))
                for rid in aborted:
                    sub = self._subs.pop(rid, None)
                    if sub is not None:
                        batches.setdefault(sub.loop, []).append((sub.out, Aborted(rid)))
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

    def _died(self) -> None:
        self._proc.join(5)
        code = self._proc.exitcode
        with self._lock:
            if self._stopping and code == 0:
                return
            self._error = f"the engine process exited (exit code {code})"
            subs, self._subs = self._subs, {}
            self._queued = self._waiting = 0
        log.error("%s; failing %d requests in flight", self._error, len(subs))
        for rid, sub in subs.items():
            sub.deliver(APIError(f"internal error: {self._error}", status=500, type="server_error"))


# --------------------------------------------------------------------------- the child


def _child_main(conn, load, opts) -> None:
    """The engine process: load the model, build one engine per strategy, then step them while there is work
    and block on the pipe when there is none."""
    import signal

    from .app import make_engines

    # A terminal's Ctrl-C or a supervisor's SIGTERM reaches the whole process group: the parent stops taking
    # requests and tells this process to finish what runs ("stop"); it must not die under them first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        model, tokenizer, name = load()
        engines, store = make_engines(model, opts)
    except BaseException as e:  # noqa: BLE001 — reported to the parent, which reports it on /health
        log.error("the engine process failed to load: %s", traceback.format_exc())
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", {"config": model.config, "tokenizer": tokenizer, "name": name,
                         "exit_gate": model.early_exit_gate is not None,
                         "max_loops": next(iter(engines.values())).max_loops,
                         "tiers": [t.name for t in store.tiers] if store is not None else []}))
    _Loop(conn, engines).run()
    if store is not None:  # the prefix store's queued writes reach their tiers
        store.flush()
    try:
        conn.send(("stopped",))
        conn.close()
    except OSError:
        pass


class _Loop:
    def __init__(self, conn, engines: dict):
        self.conn, self.engines = conn, engines
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
                    self.command(self.conn.recv())
                while self.conn.poll():
                    self.command(self.conn.recv())
            except EOFError:  # the parent is gone: nobody to serve
                return
            outputs = []
            for kv, engine in self.engines.items():
                if engine.has_unfinished_requests():
                    outputs.append((kv, self.step(kv, engine)))
            if outputs or self.taken or self.errors or self.aborted:
                stats = {kv: e.stats() for kv, e in self.engines.items()}
                waiting = sum(s["waiting"] for s in stats.values())
                try:
                    self.conn.send(("step", outputs, stats, self.taken, waiting, self.errors, self.aborted))
                except OSError:  # the parent is gone
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
