"""`looplm serve` under load (issue 14), `vllm bench serve`-style, against one-request-at-a-time serving.

A seeded trace of requests (all at once by default, or Poisson arrivals at --rate; token-id prompts of mixed lengths, mixed max_tokens,
mixed per-request budgets: num_loops 2 / 3 / 4 and Q-exit q:0.5 / q:0.3) is sent to a real `looplm serve`
subprocess on a free localhost port through /v1/completions, every request streamed (SSE), at most
--concurrency in flight (vllm bench's --max-concurrency: a request whose arrival time has come waits for a
free client). Token-id prompts need no chat template, so any --model works; `ignore_eos` makes every request
generate its max_tokens (as vllm bench's random dataset does), so both servers produce the same tokens.

Per request, from the moment it is sent: TTFT (to the first token), TPOT ((latency − TTFT) / (tokens − 1)),
ITL (the gaps between streamed chunks) and end-to-end latency; per run: output tokens/s and requests/s over
the run's wall time, and goodput: requests/s that met the SLO (TTFT ≤ --slo-ttft-ms and TPOT ≤ --slo-tpot-ms).

The baseline, on the same trace in the same run, is the same server started with `--max-batch-size 1`: an
engine of one row runs one request at a time and queues the rest, which is what a plain transformers server
(one `generate` call per request) does. The engine run uses `--max-batch-size` rows (continuous batching,
loop-granular). Issue 14's goal: ≥ 4× output tokens/s at 16 concurrent clients with p99 TTFT no worse.

    python benchmarks/serve.py                                    # bundled chain-r4, 200 requests, 16 clients, 3 pairs
    python benchmarks/serve.py --model DIR --requests 200 --rate 8 --concurrency 32 --max-batch-size 32

Prints progress to stderr, a table, the ratios, then one JSON line (machine, commit, config, figures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

import looplm

BUDGETS = [{"num_loops": 2}, {"num_loops": 3}, {"num_loops": 4}, {"exit": "q:0.5"}, {"exit": "q:0.3"}]


# --------------------------------------------------------------------------- the trace


@dataclass
class Request:
    arrival: float  # seconds after the run starts
    prompt: list[int]
    max_tokens: int
    budget: dict


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    latency: float = 0.0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    mean_loops: float = 0.0

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.tokens - 1) if self.tokens > 1 else None


def make_trace(args, vocab_size: int) -> list[Request]:
    """Poisson arrivals (exponential gaps at --rate), uniform prompt lengths and max_tokens, a random budget each."""
    rng = random.Random(args.seed)
    lo_p, hi_p = (int(x) for x in args.prompt_len.split(":"))
    lo_o, hi_o = (int(x) for x in args.max_tokens.split(":"))
    budgets = [b for b in BUDGETS if "exit" not in b or args.exit_gate]
    t, trace = 0.0, []
    for _ in range(args.requests):
        t += rng.expovariate(args.rate) if args.rate > 0 else 0.0
        prompt = [rng.randrange(2, vocab_size) for _ in range(rng.randint(lo_p, hi_p))]  # 0, 1: pad, eos in chain-r4
        trace.append(Request(t, prompt, rng.randint(lo_o, hi_o), dict(rng.choice(budgets))))
    return trace


# --------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`looplm serve` in a subprocess on a free port; `stop()`: SIGTERM, then kill after 30 s."""

    def __init__(self, args, max_batch_size: int, log: Path):
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "looplm", "serve", "--model", args.model, "--port", str(self.port),
               "--max-batch-size", str(max_batch_size), "--max-queue", str(max(256, args.requests)),
               "--threads", str(args.threads), "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout: float = 300) -> dict:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"looplm serve exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return httpx.get(f"{self.url}/v1/models", timeout=10).json()["data"][0]
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"looplm serve not ready in {timeout:.0f} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --------------------------------------------------------------------------- the client


async def send(client: httpx.AsyncClient, model: str, req: Request) -> Result:
    """One streamed completion; times from the send to each chunk that carries tokens."""
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
            "return_token_ids": True, **req.budget}
    res, t0 = Result(), time.perf_counter()
    last = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = chunk["error"]["message"]
                    return res
                now = time.perf_counter()
                n = sum(len(c.get("token_ids") or []) for c in chunk["choices"])
                if n:
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last, res.tokens = now, res.tokens + n
                if chunk.get("usage"):
                    res.mean_loops = chunk["usage"]["mean_loops"]
        res.latency = time.perf_counter() - t0
        res.ok = res.tokens == req.max_tokens
        if not res.ok:
            res.error = f"{res.tokens} of {req.max_tokens} tokens"
    except httpx.HTTPError as e:
        res.error = repr(e)
    return res


async def run_trace(url: str, model: str, trace: list[Request], concurrency: int,
                    label: str) -> tuple[list[Result], float]:
    """Each request is sent at its arrival time, when one of `concurrency` clients is free; (results, wall s)."""
    sem, done = asyncio.Semaphore(concurrency), 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        t_start = time.perf_counter()

        async def one(req: Request) -> Result:
            nonlocal done
            await asyncio.sleep(max(0.0, req.arrival - (time.perf_counter() - t_start)))
            async with sem:
                res = await send(client, model, req)
            done += 1
            if done % max(1, len(trace) // 8) == 0 or done == len(trace):
                print(f"  [{label}] {done}/{len(trace)} done, {time.perf_counter() - t_start:.1f} s",
                      file=sys.stderr, flush=True)
            return res

        results = await asyncio.gather(*(one(r) for r in trace))
        return list(results), time.perf_counter() - t_start


# --------------------------------------------------------------------------- figures


def pct(xs: list[float], p: float) -> float:
    """The p-th percentile (linear interpolation, as numpy's default); nan for no data."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    i = int(k)
    return xs[i] + (xs[min(i + 1, len(xs) - 1)] - xs[i]) * (k - i)


def summarize(results: list[Result], wall: float, args) -> dict:
    ok = [r for r in results if r.ok]
    tpots = [r.tpot for r in ok if r.tpot is not None]
    good = [r for r in ok if r.ttft * 1e3 <= args.slo_ttft_ms and (r.tpot is None or r.tpot * 1e3 <= args.slo_tpot_ms)]
    tokens = sum(r.tokens for r in ok)

    def ms(xs: list[float], p: float) -> float:
        return pct(xs, p) * 1e3

    itl = [x for r in ok for x in r.itl]
    return {"completed": len(ok), "failed": len(results) - len(ok), "wall_s": wall, "output_tokens": tokens,
            "output_tok_s": tokens / wall, "req_s": len(ok) / wall, "goodput_req_s": len(good) / wall,
            "mean_loops": sum(r.mean_loops * r.tokens for r in ok) / tokens if tokens else float("nan"),
            "ttft_p50_ms": ms([r.ttft for r in ok], 50), "ttft_p99_ms": ms([r.ttft for r in ok], 99),
            "tpot_p50_ms": ms(tpots, 50), "tpot_p99_ms": ms(tpots, 99),
            "itl_p50_ms": ms(itl, 50), "itl_p99_ms": ms(itl, 99),
            "e2e_p50_ms": ms([r.latency for r in ok], 50), "e2e_p99_ms": ms([r.latency for r in ok], 99),
            "errors": sorted({r.error for r in results if not r.ok})[:3]}


def bench(args, trace: list[Request], name: str, max_batch_size: int, logdir: Path) -> dict:
    print(f"[{name}] starting looplm serve --max-batch-size {max_batch_size}", file=sys.stderr, flush=True)
    server = Server(args, max_batch_size, logdir / f"{name}.log")
    try:
        info = server.wait_ready()
        # two short requests first: first-call costs (allocation, lazy imports) stay out of the timing
        warm = [Request(0.0, trace[i].prompt, 4, trace[i].budget) for i in range(2)]
        asyncio.run(run_trace(server.url, info["id"], warm, 2, f"{name} warm-up"))
        results, wall = asyncio.run(run_trace(server.url, info["id"], trace, args.concurrency, name))
    finally:
        server.stop()
    return {"run": name, "max_batch_size": max_batch_size, **summarize(results, wall, args)}


COLUMNS = [("run", "{:<13}", "run"), ("max_batch_size", "{:>5}", "batch"), ("completed", "{:>4}", "ok"),
           ("output_tok_s", "{:>7.1f}", "tok/s"), ("req_s", "{:>6.2f}", "req/s"),
           ("goodput_req_s", "{:>7.2f}", "goodput"), ("mean_loops", "{:>5.2f}", "loops"),
           ("ttft_p50_ms", "{:>8.0f}", "TTFT p50"), ("ttft_p99_ms", "{:>8.0f}", "TTFT p99"),
           ("tpot_p50_ms", "{:>8.1f}", "TPOT p50"), ("tpot_p99_ms", "{:>8.1f}", "TPOT p99"),
           ("itl_p50_ms", "{:>7.1f}", "ITL p50"), ("itl_p99_ms", "{:>7.1f}", "ITL p99"),
           ("e2e_p50_ms", "{:>7.0f}", "E2E p50"), ("e2e_p99_ms", "{:>7.0f}", "E2E p99")]


def print_table(rows: list[dict]) -> None:
    widths = [len(fmt.format(rows[0][key])) for key, fmt, _ in COLUMNS]
    print("  ".join(h.rjust(w) if i else h.ljust(w) for i, ((_, _, h), w) in enumerate(zip(COLUMNS, widths))))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(fmt.format(row[key]) for key, fmt, _ in COLUMNS))


def engine_alone(args, trace: list[Request], rows: int) -> float:
    """The trace's requests through `looplm.Engine` in this process, without HTTP (one torch thread, as the
    server runs): --concurrency in flight, the next added when one finishes. Output tokens/s."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        model = looplm.load(args.model)
        engine = looplm.Engine(model, kv="last", max_batch_size=rows, max_loops=4)
        pending, tokens = list(trace), 0
        for _ in range(min(args.concurrency, len(pending))):
            r = pending.pop(0)
            engine.add_request(r.prompt, max_new_tokens=r.max_tokens, stop_tokens=[], **r.budget)
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens += len(out.new_tokens)
                if out.finished and pending:
                    r = pending.pop(0)
                    engine.add_request(r.prompt, max_new_tokens=r.max_tokens, stop_tokens=[], **r.budget)
        return tokens / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(looplm.bundled_model_dir()), help="model dir (default: bundled chain-r4)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rate", type=float, default=0.0,
                    help="Poisson arrivals per second; 0 (the default): all at once, so --concurrency clients each "
                         "send their next request as soon as the last one ends (a closed loop: the servers' capacity)")
    ap.add_argument("--concurrency", type=int, default=16, help="most requests in flight (vllm's --max-concurrency)")
    ap.add_argument("--max-batch-size", type=int, default=16, help="the engine run's rows; the baseline has 1")
    ap.add_argument("--prompt-len", default="8:64", help="prompt tokens, uniform in MIN:MAX")
    ap.add_argument("--max-tokens", default="8:48", help="generated tokens, uniform in MIN:MAX")
    ap.add_argument("--slo-ttft-ms", type=float, default=1000.0, help="goodput: TTFT at most this")
    ap.add_argument("--slo-tpot-ms", type=float, default=100.0, help="goodput: TPOT at most this")
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads (the client needs a core)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3,
                    help="baseline and engine runs, alternated (this machine's speed drifts); the median ratio counts")
    args = ap.parse_args()

    config = json.loads((Path(args.model) / "config.json").read_text())
    args.exit_gate = bool(config.get("exit_gate"))  # q:... budgets only for a model with an exit gate
    trace = make_trace(args, config["vocab_size"])
    load_before = os.getloadavg()
    print(f"model {args.model}: {len(trace)} requests, Poisson {args.rate}/s over {trace[-1].arrival:.1f} s, "
          f"concurrency {args.concurrency}, prompts {args.prompt_len}, max_tokens {args.max_tokens}, budgets "
          f"{sorted({json.dumps(r.budget) for r in trace})}, SLO TTFT ≤ {args.slo_ttft_ms:g} ms and TPOT ≤ "
          f"{args.slo_tpot_ms:g} ms, server threads {args.threads}, load average {load_before[0]:.2f}")
    rows, pairs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):  # alternated, so a slow spell of the machine hits both
            pair = [bench(args, trace, "one-at-a-time", 1, Path(tmp)),
                    bench(args, trace, "engine", args.max_batch_size, Path(tmp))]
            rows += pair
            pairs.append(pair)
    load_after = os.getloadavg()
    print_table(rows)
    per_pair = [{"output_tok_s": eng["output_tok_s"] / base["output_tok_s"],
                 "goodput": eng["goodput_req_s"] / base["goodput_req_s"] if base["goodput_req_s"] else float("inf"),
                 "ttft_p99": eng["ttft_p99_ms"] / base["ttft_p99_ms"]} for base, eng in pairs]
    ratios = {k: statistics.median(r[k] for r in per_pair) for k in per_pair[0]}
    spread = [round(r["output_tok_s"], 2) for r in per_pair]
    print(f"engine / one-at-a-time, median of {len(pairs)} alternated pairs: output tok/s {ratios['output_tok_s']:.2f}x "
          f"(pairs {spread}; goal ≥ 4x), p99 TTFT {ratios['ttft_p99']:.2f}x (goal ≤ 1), goodput "
          f"{ratios['goodput']:.2f}x; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    alone = {n: engine_alone(args, trace, n) for n in (1, args.max_batch_size)}
    ratios["engine_alone"] = alone[args.max_batch_size] / alone[1]
    print(f"the engine alone (no HTTP, same trace): {alone[1]:.0f} tok/s with 1 row, {alone[args.max_batch_size]:.0f} "
          f"with {args.max_batch_size}: {ratios['engine_alone']:.2f}x")
    for row in rows:
        if row["errors"]:
            print(f"{row['run']}: {row['failed']} failed: {row['errors']}")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = None
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_before": load_before[0],
               "load_avg_after": load_after[0]}
    print(json.dumps({"machine": machine, "dtype": "float32", "commit": commit, "config": vars(args),
                      "figures": rows, "ratios": ratios, "pair_ratios": per_pair}))


if __name__ == "__main__":
    main()
