"""The engines in a process of their own (`looplm serve` by default; `--no-engine-process` keeps them in a thread).

One Python process has one interpreter lock. With the engines in a thread of the HTTP process, every step's
Python (scheduling, the per-token bookkeeping around the kernels) waits on the lock whenever the event loop
parses a body or writes an SSE chunk, and the other way round; on a small model, where a step is mostly
Python, the server got 3.1–3.6× one-request-at-a-time where the engine alone gets 4.7×. So, as vLLM runs its
EngineCore, the engines live in a child process (started with `spawn`, so no thread or OpenMP pool is
forked) that loads the model itself and runs the engines' loop (driver.EngineLoop, the one the thread runs
too) over a pipe: the commands go down it, and the child's first message, ("ready", info) or ("failed",
why), then one message per step come back.

`EngineProcess` has the thread `Driver`'s interface (start, stop, queued, add, abort, error), so the app
serves either. A reader thread in the parent delivers each step's message (`Admission.deliver`). If the
child dies, every request in flight gets a 500, new ones a 503, and /health says why (the server does not
restart the engines by itself; a supervisor restarts the server).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
import traceback

from .driver import Admission, EngineLoop
from .protocol import APIError

log = logging.getLogger("looplm.server")


class EngineProcess(Admission):
    def __init__(self, load, opts, *, max_queue: int):
        """`load()` → (model, tokenizer, name) runs in the child, so it must pickle (a module-level function, or
        functools.partial of one)."""
        super().__init__(max_queue)
        self._load, self._opts = load, opts
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
            if not self._stopping and self._error is None:
                self._send(("stop",))
            self._stopping = True
        if self._reader is not None:
            self._reader.join(timeout)
        if self._proc is not None:
            self._proc.join(5 if timeout is None else max(1.0, timeout))
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(5)

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
            self.deliver(msg)

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

    def send(msg: tuple) -> None:
        try:
            conn.send(msg)
        except OSError as e:  # the parent is gone
            raise EOFError from e

    EngineLoop(engines, conn.recv, conn.poll, send).run()
    if store is not None:  # the prefix store's queued writes reach their tiers
        store.flush()
    try:
        conn.send(("stopped",))
        conn.close()
    except OSError:
        pass

