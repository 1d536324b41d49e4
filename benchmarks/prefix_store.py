"""The KV prefix store (looplm.store) against cold prefills, in the same run.

1. ttft — time to first token of a prompt = a long prefix (real text, 512 / 2k / 8k tokens) + a 16-token
   question, cold (no store) and warm from each tier alone (host RAM, local disk, Redis), the prefix stored
   by an earlier request with another question. Also each tier's store and load throughput (MB/s of chunks;
   host RAM: a dict insert of tensors already on the host, so it measures little; disk: loads right after
   the writes come from the page cache).
2. bytes — KV bytes per token: the engine's pool per strategy and KV dtype, and a stored chunk per token
   under prefix_kv="loops" (every loop) and "committed" (what the strategy keeps).
3. agents — N agent processes share one long document (2k tokens) through Redis, each asking its own
   question: the first pays the prefill, the others reuse it. Total prefill time (the sum of the agents'
   TTFTs) against the same agents without a store.
4. quality — what each choice costs against a single-pass prefill: ARC-Easy (5-shot, answer letter, greedy)
   on SmolLM2 looped, single-pass fp32 vs prefix_kv="committed" (the shots as a stored prefix) vs int8 KV;
   and the bundled model's held-out problems (the second query of each problem comes after the first turn,
   a committed prefix at chunk 8), fp32 vs int8 vs committed.

Model: SmolLM2-135M-Instruct with layers 10..13 looped R=4 (docs/adaptive-compute.md's retrofit), kv=last.
Redis: --redis URL, or a redis-server started on a free localhost port (Debian's `redis-server` on PATH).

    python benchmarks/prefix_store.py                                  # all parts
    python benchmarks/prefix_store.py --parts ttft --lengths 512,2048

Prints a table per part, then one JSON line (machine, commit, config, figures).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import looplm
from looplm.batching import Engine
from looplm.checkpoint import load, load_tokenizer
from looplm.store import DiskTier, HostTier, PrefixStore, RedisTier, chunk_nbytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_result  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def start_redis(tmp: str) -> tuple[str, subprocess.Popen | None]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("no redis-server on PATH: apt-get install -y redis-server, or pass --redis URL")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--maxmemory", "4gb", "--maxmemory-policy", "allkeys-lru", "--dir", tmp],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis
    client, t = redis.Redis(port=port), time.time()
    while True:
        try:
            client.ping()
            return f"redis://127.0.0.1:{port}", proc
        except redis.ConnectionError:
            if time.time() - t > 20:
                sys.exit("redis-server did not start")
            time.sleep(0.05)


def ttft(engine: Engine, prompt: list[int], **kw) -> tuple[float, int, list[int]]:
    """(seconds to the first token, prompt tokens reused, the tokens) of one request alone in the engine."""
    t0 = time.perf_counter()
    rid = engine.add_request(prompt, stop_tokens=[], **kw)
    first, tokens, cached = None, [], 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid:
                first = first or time.perf_counter() - t0
                tokens += out.new_tokens
                cached = out.cached_tokens
    return first, cached, tokens


def text_tokens(tok, n: int) -> list[int]:
    path = DATA / "text" / "tinystories_val.txt"
    if not path.is_file():
        sys.exit(f"{path} is missing (the benchmark reads real text from ../shared/data)")
    ids = tok.encode(path.read_text()[: n * 8], add_special_tokens=False)
    if len(ids) < n:
        sys.exit(f"not enough text for {n} tokens")
    return ids[:n]


def part_ttft(model, tok, args, redis_url) -> list[dict]:
    rows = []
    question = tok.encode(" Question: who is the story about, and where are they?", add_special_tokens=False)[:16]
    other = tok.encode(" Question: what happens at the end of the story? Answer:", add_special_tokens=False)[:16]
    kw = dict(num_loops=args.loops, max_new_tokens=1)
    for n in args.lengths:
        n = min(n, model.config.max_position_embeddings - 32)  # 8k: the prefix and the question fit the context
        prefix = text_tokens(tok, n)
        engine = Engine(model, kv=args.kv, max_loops=args.loops, max_batch_size=1, max_tokens=n + 64,
                        max_step_tokens=args.step_tokens)
        cold, _, cold_tokens = ttft(engine, prefix + question, **kw)
        with tempfile.TemporaryDirectory() as tmp:
            tiers = {"host": HostTier(2**40), "disk": DiskTier(tmp, 2**40), "redis": RedisTier(redis_url)}
            tiers["redis"].clear()
            fill = Engine(model, kv=args.kv, max_loops=args.loops, max_batch_size=1, max_tokens=n + 64,
                          max_step_tokens=args.step_tokens, kv_store=PrefixStore(tiers.values()))
            ttft(fill, prefix + other, **kw)  # stores the prefix's chunks in every tier
            fill.store.flush()
            chunks = {k: tiers["host"].get(k) for k in list(tiers["host"]._data)}
            nbytes = sum(chunk_nbytes(c) for c in chunks.values())
            for name, tier in tiers.items():
                tier.clear()  # time real writes (a put of a key already held returns at once)
                t0 = time.perf_counter()
                for key, c in chunks.items():
                    tier.put(key, c)
                put_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                assert all(tier.get(key) is not None for key in chunks)
                get_s = time.perf_counter() - t0
                warm_engine = Engine(model, kv=args.kv, max_loops=args.loops, max_batch_size=1, max_tokens=n + 64,
                                     max_step_tokens=args.step_tokens, kv_store=PrefixStore([tier]))
                warm, cached, warm_tokens = ttft(warm_engine, prefix + question, **kw)
                assert warm_tokens == cold_tokens, (n, name)  # warm ≡ cold
                rows.append(dict(prefix=n, tier=name, cold_s=cold, warm_s=warm, speedup=cold / warm, cached=cached,
                                 store_MBps=nbytes / put_s / 1e6, load_MBps=nbytes / get_s / 1e6,
                                 chunk_MB=nbytes / len(chunks) / 1e6))
                r = rows[-1]
                print(f"{n:>6} {name:<6} cold {cold:7.2f} s  warm {warm:6.3f} s  {r['speedup']:6.1f}×  reused {cached:>5}"
                      f"  store {r['store_MBps']:7.0f} MB/s  load {r['load_MBps']:7.0f} MB/s", flush=True)
    return rows


def part_bytes(model, args) -> list[dict]:
    from looplm.pool import KVPool

    rows, chunk, cfg = [], 256, model.config
    P, C, K = cfg.num_prelude_layers, cfg.num_core_layers, cfg.num_coda_layers
    for kv in ("per_loop", "last", "mean", "first"):
        for kv_dtype in ("fp32", "bf16", "int8"):
            pool = KVPool(cfg, strategy=kv, kv_dtype="int8" if kv_dtype == "int8" else "model", max_loops=args.loops,
                          max_rows=1, dtype=torch.bfloat16 if kv_dtype == "bf16" else torch.float32)
            per_slot = pool.bytes_per_token // pool.num_slots  # K and V of one layer slot
            loops_chunk = (P + C * args.loops + K) * per_slot
            committed = (P + C + K) * per_slot if kv != "per_loop" else loops_chunk
            rows.append(dict(kv=kv, dtype=kv_dtype, pool_bytes_per_token=pool.bytes_per_token,
                             stored_loops_bytes_per_token=loops_chunk, stored_committed_bytes_per_token=committed,
                             chunk_MB_loops=loops_chunk * chunk / 1e6))
    print(f"{'kv':<9} {'dtype':<5} {'pool B/token':>13} {'stored (loops)':>15} {'stored (committed)':>19}")
    for r in rows:
        print(f"{r['kv']:<9} {r['dtype']:<5} {r['pool_bytes_per_token']:>13} {r['stored_loops_bytes_per_token']:>15} "
              f"{r['stored_committed_bytes_per_token']:>19}")
    return rows


AGENT = """
import json, sys, time
sys.path.insert(0, {bench!r})
from prefix_store import ttft
from looplm.batching import Engine
from looplm.checkpoint import load
from looplm.store import PrefixStore
import torch
torch.set_num_threads({threads})
model = load({path!r}, core=({core0}, {core1}), num_loops={loops})
prompt = json.loads(sys.argv[1])
store = PrefixStore.from_specs([{url!r}]) if {url!r} else None
engine = Engine(model, kv={kv!r}, max_loops={loops}, max_batch_size=1, max_tokens=len(prompt) + 64,
                max_step_tokens={step}, kv_store=store)
s, cached, tokens = ttft(engine, prompt, num_loops={loops}, max_new_tokens=1)
if store: store.flush()
print(json.dumps(dict(ttft=s, cached=cached, tokens=tokens)))
"""


def part_agents(tok, path, args, redis_url) -> dict:
    doc = text_tokens(tok, args.agent_doc)
    questions = [f" Question {i}: what does the story say about {w}?" for i, w in
                 enumerate(["the dog", "the sun", "the little girl", "the garden", "the end", "the park"])]
    prompts = [doc + tok.encode(q, add_special_tokens=False)[:16] for q in questions[: args.agents]]
    out = {}
    for label, url in (("no store", ""), ("redis", redis_url)):
        if url:
            RedisTier(url).clear()
        script = AGENT.format(bench=str(Path(__file__).parent), threads=torch.get_num_threads(), path=path,
                              core0=args.core[0], core1=args.core[1], loops=args.loops, url=url, kv=args.kv,
                              step=args.step_tokens)
        runs = []
        for p in prompts:  # one after another: the first stores, the later ones reuse (2 cores: no overlap)
            res = subprocess.run([sys.executable, "-c", script, json.dumps(p)], capture_output=True, text=True,
                                 timeout=3600)
            if res.returncode:
                sys.exit(res.stderr)
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        out[label] = runs
        total = sum(r["ttft"] for r in runs)
        print(f"{label:<9} agents {len(runs)}  prefill total {total:7.2f} s  per agent "
              + " ".join(f"{r['ttft']:.2f}s({r['cached']})" for r in runs), flush=True)
    assert [r["tokens"] for r in out["no store"]] == [r["tokens"] for r in out["redis"]]
    base = sum(r["ttft"] for r in out["no store"])
    shared = sum(r["ttft"] for r in out["redis"])
    print(f"{'':<9} total prefill: {base / shared:.2f}× less time with the shared store")
    return dict(doc_tokens=args.agent_doc, agents=args.agents, no_store_s=base, redis_s=shared, ratio=base / shared,
                runs=out)


def arc_items(tok, n: int, shots: int):
    path = DATA / "arc" / "ARC-Easy.test.jsonl"
    if not path.is_file():
        sys.exit(f"{path} is missing")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    letters = "ABCDE"

    def fmt(r, answer: bool):
        s = f"Question: {r['question']}\n" + "".join(f"{letters[i]}. {c}\n" for i, c in enumerate(r["choices"]))
        return s + "Answer:" + (f" {letters[r['answer_index']]}\n\n" if answer else "")

    header = "".join(fmt(r, True) for r in rows[:shots])
    items = []
    for r in rows[shots : shots + n]:
        items.append((tok.encode(header + fmt(r, False), add_special_tokens=False), letters[r["answer_index"]]))
    return items, len(tok.encode(header, add_special_tokens=False))


def accuracy(engine_of, items, decode) -> tuple[float, list[str]]:
    engine = engine_of()
    preds = []
    for ids, _ in items:
        _, _, tokens = ttft(engine, ids, max_new_tokens=1)
        preds.append(decode(tokens).strip()[:1])
    return sum(p == gold for p, (_, gold) in zip(preds, items)) / len(items), preds


def part_quality(model, tok, args) -> dict:
    out = {}
    items, header = arc_items(tok, args.quality_items, 5)
    decode = tok.decode
    modes = {
        "single-pass fp32": lambda: Engine(model, kv=args.kv, max_loops=args.loops, max_batch_size=1, max_tokens=2048),
        "committed fp32": lambda: Engine(model, kv=args.kv, max_loops=args.loops, max_batch_size=1, max_tokens=2048,
                                         kv_store=["host:8GiB"], prefix_kv="committed"),
        "int8 (loops)": lambda: Engine(model, kv=f"{args.kv}:int8", max_loops=args.loops, max_batch_size=1,
                                       max_tokens=2048, kv_store=["host:8GiB"]),
    }
    ref = None
    print(f"ARC-Easy, {len(items)} items, 5-shot header of {header} tokens (SmolLM2 core {args.core[0]}:{args.core[1]}, "
          f"R={args.loops}, kv={args.kv})")
    for name, make in modes.items():
        t0 = time.perf_counter()
        acc, preds = accuracy(make, items, decode)
        ref = ref or preds
        agree = sum(a == b for a, b in zip(preds, ref)) / len(preds)
        out[f"smollm2 {name}"] = dict(accuracy=acc, agreement=agree, seconds=time.perf_counter() - t0)
        print(f"  {name:<18} accuracy {acc:6.1%}  same answer as single-pass {agree:6.1%}  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    # the bundled model: each problem's second query after its first turn
    bdir = looplm.bundled_model_dir()
    bmodel, btok = load(bdir), load_tokenizer(bdir)
    meta = json.loads((bdir / "looplm_task.json").read_text())
    from looplm.demo import heldout_problems
    probs = [p for d in meta["difficulties"] for p in heldout_problems(meta, d, count=args.bundled_problems, seed=12345)]
    bitems = []
    for p in probs:
        ids = btok.encode(p.prompt, add_special_tokens=False)
        bitems.append((ids, p.answer[0]))
        if len(p.answer) >= 3:
            bitems.append((ids + btok.encode(p.answer[:2], add_special_tokens=False), p.answer[2]))
    bmodes = {
        "single-pass fp32": lambda: Engine(bmodel, kv="last", max_batch_size=1, max_tokens=128),
        "committed fp32": lambda: Engine(bmodel, kv="last", max_batch_size=1, max_tokens=128,
                                         kv_store=PrefixStore.from_specs(["host:1GiB"], chunk_size=8),
                                         prefix_kv="committed"),
        "int8": lambda: Engine(bmodel, kv="last:int8", max_batch_size=1, max_tokens=128),
    }
    ref = None
    print(f"bundled chain-r4, {len(bitems)} queries ({len(probs)} held-out problems, difficulties {meta['difficulties']})")
    for name, make in bmodes.items():
        acc, preds = accuracy(make, bitems, lambda t: btok.decode(t, skip_special_tokens=True))
        ref = ref or preds
        agree = sum(a == b for a, b in zip(preds, ref)) / len(preds)
        out[f"bundled {name}"] = dict(accuracy=acc, agreement=agree)
        print(f"  {name:<18} accuracy {acc:6.1%}  same answer as single-pass {agree:6.1%}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="ttft,bytes,agents,quality")
    ap.add_argument("--lengths", default="512,2048,8192")
    ap.add_argument("--core", default="10:14")
    ap.add_argument("--loops", type=int, default=4)
    ap.add_argument("--kv", default="last")
    ap.add_argument("--step-tokens", type=int, default=512)
    ap.add_argument("--agents", type=int, default=3)
    ap.add_argument("--agent-doc", type=int, default=2048)
    ap.add_argument("--quality-items", type=int, default=100)
    ap.add_argument("--bundled-problems", type=int, default=50, help="per difficulty")
    ap.add_argument("--redis", default=None, help="a Redis URL (default: start redis-server on a free port)")
    args = ap.parse_args()
    parts = args.parts.split(",")
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.core = tuple(int(x) for x in args.core.split(":"))
    path = str(looplm.default_model_dir())
    model = load(path, core=args.core, num_loops=args.loops)
    tok = load_tokenizer(path)
    figures, proc = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        url = args.redis
        if url is None and ({"ttft", "agents"} & set(parts)):
            url, proc = start_redis(tmp)
        try:
            if "ttft" in parts:
                figures["ttft"] = part_ttft(model, tok, args, url)
            if "bytes" in parts:
                figures["bytes"] = part_bytes(model, args)
            if "agents" in parts:
                figures["agents"] = part_agents(tok, path, args, url)
            if "quality" in parts:
                figures["quality"] = part_quality(model, tok, args)
        finally:
            if proc is not None:
                proc.terminate()
    print_result({**vars(args), "model": path}, figures)


if __name__ == "__main__":
    main()
