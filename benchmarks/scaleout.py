"""`looplm serve --replicas N` on Ray Serve (issue 16), in the same run:

1. throughput — the serve benchmark's trace (benchmarks/serve.py: Poisson arrivals, mixed budgets, streamed)
   against 1 and 2 replicas on this machine: output tokens/s, p50/p99 TTFT. On 2 cores two replicas share
   the same cores, so expect little or no gain here; each replica is a whole engine, so on a machine with
   cores (or GPUs) for each, throughput adds up replica by replica, while the routers keep prefixes local.
2. cross-replica — long prompts (real text, --prefix tokens) each sent twice to 2 replicas under Ray's
   power-of-two router: TTFT of the cold first request, and of the second one when it lands on the other
   replica (a hit from the shared Redis) or on the same one (host RAM).
3. routers — the same prompts sent once each, then again, under --router prefix and --router pow2: how
   often the second send lands on the replica holding the prefix, and its mean TTFT.

    python benchmarks/scaleout.py                      # bundled chain-r4 for 1; SmolLM2 core 10:14 R=4 for 2
    python benchmarks/scaleout.py --parts throughput --requests 100

Prints a table per part, then one JSON line (machine, commit, config, figures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_result  # noqa: E402
from prefix_store import start_redis  # noqa: E402
from serve import Request, free_port, make_trace, print_table, run_trace, summarize  # noqa: E402

import looplm  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


class RayServer:
    def __init__(self, log: Path, *args: str):
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "looplm", "serve", "--port", str(self.port), *args],
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait(self, replicas: int, timeout: float = 900) -> dict:
        t = time.time()
        while time.time() - t < timeout:
            if self.proc.poll() is not None:
                sys.exit(f"looplm serve exited:\n{self.log.read_text(errors='replace')[-3000:]}")
            try:
                h = httpx.get(f"{self.url}/health", timeout=5).json()
                if h.get("replicas", {}).get("RUNNING") == replicas:
                    return httpx.get(f"{self.url}/v1/models", timeout=30).json()["data"][0]
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        sys.exit(f"{replicas} replicas not running in {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True)


def part_throughput(args, logdir: Path) -> list[dict]:
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    args.exit_gate = bool(cfg.get("exit_gate"))  # q:... budgets only for a model with an exit gate (as serve.py)
    trace = make_trace(args, cfg["vocab_size"])
    rows = []
    for n in (1, 2):
        print(f"[{n} replica(s)] starting", file=sys.stderr, flush=True)
        s = RayServer(logdir / f"throughput-{n}.log", "--model", args.model, "--replicas", str(n), "--threads", "1",
                      "--max-batch-size", str(args.max_batch_size), "--max-queue", "1024", "--log-level", "warning")
        try:
            info = s.wait(n)
            warm = [Request(0.0, trace[i].prompt, 4, trace[i].budget) for i in range(4)]
            asyncio.run(run_trace(s.url, info["id"], warm, 4, "warm-up"))
            results, wall = asyncio.run(run_trace(s.url, info["id"], trace, args.concurrency, f"{n} replicas"))
        finally:
            s.stop()
        rows.append({"run": f"{n} replica(s)", "max_batch_size": args.max_batch_size, **summarize(results, wall, args)})
    print_table(rows)
    print(f"2 replicas / 1: {rows[1]['output_tok_s'] / rows[0]['output_tok_s']:.2f}× output tokens/s, "
          f"p99 TTFT {rows[1]['ttft_p99_ms']:.0f} vs {rows[0]['ttft_p99_ms']:.0f} ms")
    return rows


def part_cross(args, logdir: Path, redis_url: str) -> dict:
    from looplm.checkpoint import load_tokenizer

    path = str(looplm.default_model_dir())
    tok = load_tokenizer(path)
    text = (DATA / "text" / "tinystories_val.txt").read_text()
    docs = [tok.decode(tok.encode(text[i * 40_000 : (i + 1) * 40_000], add_special_tokens=False)[: args.prefix])
            for i in range(args.prompts)]
    s = RayServer(logdir / "cross.log", "--replicas", "2", "--router", "pow2", "--threads", "1",
                  "--core", args.core, "--max-loops", "4", "--kv-store", "host:4GiB", "--kv-store", redis_url, "--log-level", "warning")
    rows = []
    try:
        s.wait(2)
        for i, doc in enumerate(docs):
            got = []
            for attempt in range(2 + args.extra):  # the same prompt again, until one lands on each replica
                t0 = time.perf_counter()
                r = httpx.post(f"{s.url}/v1/completions", timeout=1800, json={
                    "prompt": doc + " The end.", "max_tokens": 1, "temperature": 0, "num_loops": 4})
                dt = time.perf_counter() - t0
                body = r.json()
                if r.status_code != 200:
                    sys.exit(f"the server answered {r.status_code}: {body}")
                got.append(dict(ttft_s=dt, cached=body["usage"]["prompt_tokens_details"]["cached_tokens"],
                                replica=int(r.headers["x-looplm-replica"]), text=body["choices"][0]["text"]))
                if attempt >= 1 and any(g["replica"] != got[0]["replica"] for g in got[1:]):
                    break
                time.sleep(1.0)  # the store's writer reaches Redis
            cold = got[0]
            for g in got[1:]:
                kind = "same replica (host RAM)" if g["replica"] == cold["replica"] else "other replica (Redis)"
                rows.append(dict(prompt=i, kind=kind, cold_s=cold["ttft_s"], warm_s=g["ttft_s"], cached=g["cached"],
                                 speedup=cold["ttft_s"] / g["ttft_s"], same_text=g["text"] == cold["text"]))
                print(f"prompt {i}: cold {cold['ttft_s']:.2f} s → {kind}: {g['ttft_s']:.2f} s "
                      f"({rows[-1]['speedup']:.1f}×, reused {g['cached']})", flush=True)
    finally:
        s.stop()
    return {"prefix_tokens": args.prefix, "rows": rows}


def part_routers(args, logdir: Path, redis_url: str) -> list[dict]:
    """--prompts long prompts sent once each, then each again in the same order, through 2 replicas under
    each router: where the second sends land (the replica holding the prefix in RAM, or the other, which
    reads Redis) and their time to first token."""
    from looplm.checkpoint import load_tokenizer

    tok = load_tokenizer(str(looplm.default_model_dir()))
    text = (DATA / "text" / "tinystories_val.txt").read_text()
    docs = [tok.decode(tok.encode(text[i * 40_000 : (i + 1) * 40_000], add_special_tokens=False)[: args.prefix])
            for i in range(args.prompts)]
    rows = []
    for router in ("prefix", "pow2"):
        subprocess.run([sys.executable, "-c", f"import redis; redis.Redis.from_url({redis_url!r}).flushall()"])
        s = RayServer(logdir / f"router-{router}.log", "--replicas", "2", "--router", router, "--threads", "1",
                      "--core", args.core, "--max-loops", "4", "--kv-store", "host:4GiB", "--kv-store", redis_url,
                      "--log-level", "warning")
        try:
            s.wait(2)
            first, second = {}, []
            for rnd in range(2):
                for i, doc in enumerate(docs):
                    t0 = time.perf_counter()
                    r = httpx.post(f"{s.url}/v1/completions", timeout=1800, json={
                        "prompt": doc + f" Question {rnd}.", "max_tokens": 1, "temperature": 0, "num_loops": 4})
                    dt, body = time.perf_counter() - t0, r.json()
                    if r.status_code != 200:
                        sys.exit(f"the server answered {r.status_code}: {body}")
                    pid = int(r.headers["x-looplm-replica"])
                    if rnd == 0:
                        first[i] = (pid, dt)
                        time.sleep(1.0)  # the store's writer reaches Redis
                    else:
                        second.append(dict(same=pid == first[i][0], ttft_s=dt,
                                           cached=body["usage"]["prompt_tokens_details"]["cached_tokens"]))
        finally:
            s.stop()
        row = dict(router=router, prompts=len(docs), same_replica=sum(x["same"] for x in second) / len(second),
                   cold_ttft_s=sum(t for _, t in first.values()) / len(first),
                   warm_ttft_s=sum(x["ttft_s"] for x in second) / len(second),
                   reused=sum(x["cached"] for x in second) / len(second))
        rows.append(row)
        print(f"router {router:<6}: second sends on the replica holding the prefix {row['same_replica']:.0%}, "
              f"mean TTFT cold {row['cold_ttft_s']:.2f} s → warm {row['warm_ttft_s']:.2f} s "
              f"({row['cold_ttft_s'] / row['warm_ttft_s']:.1f}×, {row['reused']:.0f} tokens reused)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="throughput,cross,routers")
    ap.add_argument("--model", default=str(looplm.bundled_model_dir()), help="throughput part's model")
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--rate", type=float, default=32.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--prompt-len", default="8:64", help="prompt tokens, uniform in MIN:MAX (as serve.py)")
    ap.add_argument("--max-tokens", default="8:48", help="generated tokens, uniform in MIN:MAX")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=100.0)
    ap.add_argument("--core", default="10:14", help="cross part: SmolLM2's looped block")
    ap.add_argument("--prefix", type=int, default=1024, help="cross part: prompt tokens")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--extra", type=int, default=4, help="cross part: more sends to reach the other replica")
    args = ap.parse_args()
    parts = args.parts.split(",")
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        logdir = Path(tmp)
        if "throughput" in parts:
            figures["throughput"] = part_throughput(args, logdir)
        if {"cross", "routers"} & set(parts):
            url, proc = start_redis(tmp)
            try:
                if "cross" in parts:
                    figures["cross"] = part_cross(args, logdir, url)
                if "routers" in parts:
                    figures["routers"] = part_routers(args, logdir, url)
            finally:
                proc.terminate()
    print_result(vars(args), figures)


if __name__ == "__main__":
    main()
