"""The working memory (looplm.store): chunk keys, tiers, integrity, and warm ≡ cold through the engine."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import looplm
from conftest import tiny_model
from looplm.batching import Engine
from looplm.store import (DiskTier, HostTier, PrefixStore, chunk_keys, decode, encode, parse_bytes, parse_tier,
                          weights_fingerprint)
from test_batching import ENGINE_SHAPES, alone

CS = 8  # chunk size of the engine tests: prompts of 20-40 tokens span several chunks


def chunk(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return {"k": torch.randn(3, 2, n, 4, generator=g), "v": torch.randn(3, 2, n, 4, generator=g)}


# ---------------------------------------------------------------------- keys, values, budgets


def test_parse_bytes_and_tiers():
    assert parse_bytes("4GiB") == 4 * 2**30 and parse_bytes("500MB") == 500_000_000 and parse_bytes("1024") == 1024
    for bad in ("lots", "-1GB", "0", "4 parsecs"):
        with pytest.raises(ValueError, match="byte"):
            parse_bytes(bad)
    assert isinstance(parse_tier("host:1MiB"), HostTier)
    with pytest.raises(ValueError, match="disk:PATH:SIZE"):
        parse_tier("disk:20GiB")
    with pytest.raises(ValueError, match="expected device:SIZE, host:SIZE"):
        parse_tier("ram:4GiB")
    with pytest.raises(ValueError, match="at most once"):
        PrefixStore.from_specs(["host:1MiB", "host:2MiB"])


def test_chunk_keys_chain_the_prefix():
    a = chunk_keys("root", list(range(20)), 8)
    assert len(a) == 2  # full chunks only
    b = chunk_keys("root", list(range(16)) + [99] * 4, 8)
    assert a == b  # the same first 16 tokens, whatever follows
    c = chunk_keys("root", [5] + list(range(1, 20)), 8)
    assert c[0] != a[0] and c[1] != a[1]  # a different first chunk changes every later key
    assert chunk_keys("other root", list(range(20)), 8)[0] != a[0]


def test_encode_decode_and_every_corruption_is_a_miss():
    c = chunk()
    blob = encode(c)
    back = decode(blob)
    assert set(back) == {"k", "v"} and all(torch.equal(back[k], c[k]) for k in c)
    for i in (0, 20, len(blob) // 2, len(blob) - 1):  # magic, checksum, payload header, payload bytes
        bad = bytearray(blob)
        bad[i] ^= 0x01
        assert decode(bytes(bad)) is None, i
    assert decode(blob[:-1]) is None and decode(blob[:30]) is None and decode(b"") is None and decode(None) is None


def test_host_tier_keeps_its_budget_lru():
    one = sum(t.nbytes for t in chunk().values())
    tier = HostTier(3 * one)
    for i in range(5):
        tier.put(f"k{i}", chunk(i))
        if i == 2:
            assert tier.get("k0") is not None  # k0 becomes the most recently used
    assert tier.used <= tier.budget and tier.stats()["entries"] == 3
    assert tier.get("k0") is not None and tier.get("k1") is None and tier.get("k2") is None


def test_disk_tier_budget_under_a_stream_of_prefixes(tmp_path):
    one = len(encode(chunk()))
    tier = DiskTier(tmp_path, 4 * one + 10)
    for i in range(12):
        tier.put(f"{i:040x}", chunk(i))
        on_disk = sum(f.stat().st_size for f in tmp_path.glob("*/*.kv"))
        assert on_disk <= tier.budget and tier.used == on_disk
    assert [tier.get(f"{i:040x}") is not None for i in range(12)] == [False] * 8 + [True] * 4
    reopened = DiskTier(tmp_path, 2 * one)  # a smaller budget on restart evicts down to it
    assert reopened.stats()["entries"] == 2 and sum(1 for _ in tmp_path.glob("*/*.kv")) == 2


def test_disk_corruption_truncation_deletion_and_torn_writes_are_misses(tmp_path):
    tier = DiskTier(tmp_path, 2**30)
    keys = [f"{i:040x}" for i in range(4)]
    for i, k in enumerate(keys):
        tier.put(k, chunk(i))
    f = tier._file(keys[0])
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # a byte flipped on disk
    f.write_bytes(bytes(raw))
    assert tier.get(keys[0]) is None and not f.exists()  # dropped, so a later put rewrites it
    f = tier._file(keys[1])
    f.write_bytes(f.read_bytes()[:-7])  # truncated
    assert tier.get(keys[1]) is None
    tier._file(keys[2]).unlink()  # deleted by someone else
    assert tier.get(keys[2]) is None
    # a writer killed mid-write leaves only its temp file; the key is a miss and a restart ignores the temp
    torn = tier._file(f"{9:040x}")
    torn.parent.mkdir(exist_ok=True)
    torn.with_name(torn.name + ".123.456.tmp").write_bytes(encode(chunk(9))[:50])
    assert tier.get(f"{9:040x}") is None and DiskTier(tmp_path, 2**30).stats()["entries"] == 1
    assert torch.equal(tier.get(keys[3])["k"], chunk(3)["k"])


def test_two_processes_writing_one_key_leave_one_valid_entry(tmp_path):
    script = textwrap.dedent(f"""
        import sys, torch
        from looplm.store import DiskTier
        tier = DiskTier({str(tmp_path)!r}, 2**30)
        g = torch.Generator().manual_seed(int(sys.argv[1]))
        for _ in range(40):
            tier.put("{'ab' * 20}", {{"k": torch.randn(64, 64, generator=g)}})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(s)]) for s in (1, 2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    files = list(tmp_path.glob("*/*"))
    assert len(files) == 1 and decode(files[0].read_bytes()) is not None  # one whole entry, no temp files left


def test_store_reads_through_tiers_and_promotes(tmp_path):
    host, disk = HostTier(2**20), DiskTier(tmp_path, 2**30)
    store = PrefixStore([host, disk])
    store.put("a" * 40, chunk(1))
    store.flush()
    assert store.get("a" * 40)[1] == "host"
    host.clear()
    got, tier = store.get("a" * 40)
    assert tier == "disk" and torch.equal(got["v"], chunk(1)["v"])
    assert store.get("a" * 40)[1] == "host"  # promoted
    assert store.get("b" * 40) is None
    assert store.stats()["queries"] == 4 and store.stats()["hits"] == {"host": 2, "disk": 1}


def test_weights_fingerprint_sees_one_weight():
    a, b = tiny_model(), tiny_model()
    assert weights_fingerprint(a) == weights_fingerprint(b)
    with torch.no_grad():
        b.core[0].mlp.down_proj.weight[0, 0] += 1e-3
    assert weights_fingerprint(a) != weights_fingerprint(b)


# ---------------------------------------------------------------------- through the engine


def prompts(n_shared=24, n=3, seed=0):
    """n prompts sharing their first n_shared tokens (3 chunks), each with its own tail of 3-9 tokens."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(0, 61, (n_shared,), generator=g).tolist()
    return [shared + torch.randint(0, 61, (3 + 3 * i,), generator=g).tolist() for i in range(n)]


def serve(engine, prompt, **kw):
    rid = engine.add_request(prompt, stop_tokens=[], **kw)
    tokens, loops, cached = [], [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == rid
            tokens += out.new_tokens
            loops += out.loops
            cached = out.cached_tokens
    return tokens, loops, cached


STORE_CASES = [("gate+coda+loopnorm", kv) for kv in ("per_loop", "last", "mean", "first")] + \
    [("ouro-like", "last"), ("inject-concat+gate", "mean"), ("gemma-like", "per_loop"), ("gemma-like", "last")]


@pytest.mark.parametrize("shape, kv, tier", [(s, k, "host") for s, k in STORE_CASES] +
                         [("gate+coda+loopnorm", "mean", "disk"), ("gemma-like", "per_loop", "disk")])
def test_warm_equals_cold(shape, kv, tier, tmp_path):
    """The first prompt stores its chunks; the next ones share 3 of them: each is token for token (and loop
    for loop) `generate` alone, with 24 positions loaded instead of computed."""
    model = tiny_model(**ENGINE_SHAPES[shape])
    spec = "host:64MiB" if tier == "host" else f"disk:{tmp_path}:64MiB"
    store = PrefixStore.from_specs([spec], chunk_size=CS)
    engine = Engine(model, kv=kv, max_loops=4, max_batch_size=4, max_tokens=200, max_step_tokens=16, kv_store=store)
    for budget in (dict(num_loops=3), dict(exit="q:0.5"), dict(exit="conv:0.6", num_loops=4)):
        for i, prompt in enumerate(prompts(seed=len(str(budget)))):
            kw = dict(budget, max_new_tokens=6)
            evals = engine.prefill_core_layer_evals
            tokens, loops, cached = serve(engine, prompt, **kw)
            store.flush()
            ref_tokens, ref_loops, _ = alone(model, prompt, kv, kw)
            assert (tokens, loops) == (ref_tokens, ref_loops), (budget, i)
            assert cached == (0 if i == 0 else 24), (budget, i)
            computed = (engine.prefill_core_layer_evals - evals) // model.config.num_core_layers
            assert computed == (len(prompt) - cached) * (4 if "exit" in budget else 3)


def test_key_separation(tmp_path):
    """Another loop count (with a coda), other weights, another dtype, another chunk size: a miss. Without a
    coda, KV stored with more loops serves fewer."""
    coda = tiny_model(**ENGINE_SHAPES["gate+coda+loopnorm"])
    store = PrefixStore.from_specs(["host:64MiB"], chunk_size=CS)
    p = prompts(n=1)[0]

    def cached(model, store=store, **kw):
        e = Engine(model, kv="last", max_loops=4, max_batch_size=2, max_tokens=200, kv_store=store)
        return serve(e, p, max_new_tokens=2, **kw)[2]

    assert cached(coda, num_loops=3) == 0 and cached(coda, num_loops=3) == 24
    assert cached(coda, num_loops=2) == 0  # the coda reads each position at its exit loop
    assert cached(coda, exit="q:0.5") == 0 and cached(coda, exit="q:0.6") == 0 and cached(coda, exit="q:0.5") == 24
    other = tiny_model(seed=1, **ENGINE_SHAPES["gate+coda+loopnorm"])
    assert cached(other, num_loops=3) == 0
    # the root names the dtype, the KV dtype, the chunk size, the semantics and the device, whatever the weights
    e = Engine(coda, kv="last", max_loops=4, max_batch_size=2, max_tokens=200, kv_store=store)
    req = _probe(e, p)
    root = e._root(req, 3)
    for other_engine in (Engine(coda, kv="last:int8", max_loops=4, kv_store=store),
                         Engine(coda, kv="last", max_loops=4, kv_store=PrefixStore(store.tiers, chunk_size=4)),
                         Engine(coda, kv="last", max_loops=4, kv_store=store, prefix_kv="committed")):
        assert other_engine._root(req, 3) != root
    e.model = coda.to(torch.bfloat16)
    assert e._root(req, 3) != root and cached(coda, num_loops=3) == 0
    coda.float()
    plain = tiny_model(**ENGINE_SHAPES["ouro-like"])
    assert cached(plain, num_loops=4) == 0 and cached(plain, num_loops=2) == 24  # 4 loops stored serve 2
    ref = alone(plain, p, "last", dict(num_loops=2, max_new_tokens=6))[:2]
    e = Engine(plain, kv="last", max_loops=4, max_batch_size=2, max_tokens=200, kv_store=store)
    assert serve(e, p, num_loops=2, max_new_tokens=6)[:2] == ref


def test_logits_policy_with_a_coda_bypasses_the_store():
    model = tiny_model(**ENGINE_SHAPES["gate+coda+loopnorm"])
    store = PrefixStore.from_specs(["host:64MiB"], chunk_size=CS)
    e = Engine(model, kv="last", max_loops=4, max_batch_size=2, max_tokens=200, kv_store=store)
    p = prompts(n=1)[0]
    for _ in range(2):
        assert serve(e, p, exit="kl:0.2", max_new_tokens=4)[2] == 0
    assert store.stats()["queries"] == 0


def _probe(engine, prompt):
    """A request object for computing keys (added, then aborted)."""
    rid = engine.add_request(prompt, num_loops=3, max_new_tokens=4)
    req = engine.requests[rid]
    engine.abort(rid)
    return req


def test_corrupt_disk_entry_recomputes_the_same_tokens(tmp_path):
    model = tiny_model(**ENGINE_SHAPES["gate+coda+loopnorm"])
    store = PrefixStore.from_specs([f"disk:{tmp_path}:64MiB"], chunk_size=CS)
    e = Engine(model, kv="mean", max_loops=4, max_batch_size=2, max_tokens=200, kv_store=store)
    p = prompts(n=1)[0]
    cold = serve(e, p, num_loops=3, max_new_tokens=6)
    store.flush()
    assert len(list(tmp_path.glob("*/*.kv"))) == 3
    second = store.tiers[0]._file(chunk_keys(e._root(_probe(e, p), 3), p, CS)[1])
    raw = bytearray(second.read_bytes())  # the second chunk of the prefix
    raw[-5] ^= 0x10
    second.write_bytes(bytes(raw))
    warm = serve(e, p, num_loops=3, max_new_tokens=6)
    assert warm[:2] == cold[:2] and warm[2] == 8  # the first chunk served, the corrupt one recomputed


# ---------------------------------------------------------------------- Redis


def test_redis_tier_roundtrip_and_corruption(redis_server):
    import redis

    from looplm.store import RedisTier

    tier = RedisTier(redis_server.url)
    tier.clear()
    tier.put("c" * 40, chunk(3))
    assert torch.equal(tier.get("c" * 40)["k"], chunk(3)["k"])
    raw = redis.Redis(port=redis_server.port)
    blob = bytearray(raw.get(tier.prefix + "c" * 40))
    blob[-3] ^= 0x04  # a byte flipped in Redis
    raw.set(tier.prefix + "c" * 40, bytes(blob))
    assert tier.get("c" * 40) is None and raw.get(tier.prefix + "c" * 40) is None  # a miss, and dropped
    raw.set(tier.prefix + "d" * 40, encode(chunk(4))[:-100])  # truncated
    assert tier.get("d" * 40) is None
    info = raw.config_get("maxmemory-policy")
    assert info["maxmemory-policy"] == "allkeys-lru"
    assert tier.stats()["policy"] == "allkeys-lru" and tier.stats()["up"]


def test_redis_down_is_a_miss_logged_once_and_back_when_it_is(redis_server, caplog):
    from looplm.store import RedisTier

    tier = RedisTier(redis_server.url, timeout_s=0.5, retry_s=0.0)
    tier.put("e" * 40, chunk(5))
    redis_server.stop()
    try:
        with caplog.at_level("WARNING", logger="looplm.store"):
            for _ in range(3):
                assert tier.get("e" * 40) is None
                tier.put("f" * 40, chunk(6))  # no exception: the write is dropped
        assert not tier.up
        assert sum("unreachable" in r.getMessage() for r in caplog.records) == 1
    finally:
        redis_server.start()
    tier.put("f" * 40, chunk(6))
    assert torch.equal(tier.get("f" * 40)["v"], chunk(6)["v"]) and tier.up


AGENT = """
import json, sys
sys.path.insert(0, {tests!r})
from conftest import tiny_model
from test_batching import ENGINE_SHAPES
from test_store import prompts, serve
from looplm.batching import Engine
from looplm.store import PrefixStore

store = PrefixStore.from_specs([{url!r}], chunk_size=8)
engine = Engine(tiny_model(**ENGINE_SHAPES["gate+coda+loopnorm"]), kv=sys.argv[1], max_loops=4, max_batch_size=2,
                max_tokens=200, kv_store=store)
tokens, loops, cached = serve(engine, prompts()[int(sys.argv[2])], num_loops=3, max_new_tokens=6)
store.flush()
print(json.dumps(dict(tokens=tokens, loops=loops, cached=cached, hits=engine.prefix_hits)))
"""


def test_a_prefix_stored_by_one_process_is_a_hit_in_another(redis_server, tmp_path):
    """Two agent processes: the first pays the prefill and stores through Redis; the second (another kv
    strategy, another tail) loads the 24 shared positions and still equals `generate` alone."""
    import json

    from looplm.store import RedisTier

    RedisTier(redis_server.url).clear()
    script = tmp_path / "agent.py"
    script.write_text(AGENT.format(tests=os.path.dirname(__file__), url=redis_server.url))

    def agent(kv, i):
        out = subprocess.run([sys.executable, str(script), kv, str(i)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    first, second = agent("last", 0), agent("per_loop", 1)
    assert first["cached"] == 0 and second["cached"] == 24 and second["hits"] == {"redis": 3}
    model = tiny_model(**ENGINE_SHAPES["gate+coda+loopnorm"])
    for got, kv, p in ((first, "last", prompts()[0]), (second, "per_loop", prompts()[1])):
        assert (got["tokens"], got["loops"]) == alone(model, p, kv, dict(num_loops=3, max_new_tokens=6))[:2]


# ---------------------------------------------------------------------- int8 KV


def test_quantize_error_and_bytes():
    from looplm.pool import KV, KVPool, parse_kv, quantize

    x = torch.randn(5, 3, 7, 16) * torch.rand(5, 3, 7, 1) * 10
    x[0, 0, 0] = 0  # a zero vector stays zero
    codes, scale = quantize(x)
    back = KV(codes, scale, torch.float32).values()
    assert codes.dtype == torch.int8 and scale.shape == x.shape[:-1]
    assert bool(((back - x).abs() <= scale[..., None] / 2 + 1e-6).all()) and bool((back[0, 0, 0] == 0).all())
    assert parse_kv("last:int8") == ("last", "int8") and parse_kv("mean") == ("mean", "model")
    for bad in ("last:int4", "bogus:int8"):
        with pytest.raises(ValueError, match="bogus|int4"):
            parse_kv(bad)
    cfg = tiny_model(**ENGINE_SHAPES["gate+coda+loopnorm"]).config  # 1 + 2 + 1 layers, Hkv 2, Dh 8
    for strategy, slots in (("last", 4), ("per_loop", 1 + 2 * 4 + 1)):
        fp = KVPool(cfg, strategy=strategy, max_loops=4, max_rows=2)
        q = KVPool(cfg, strategy=strategy, max_loops=4, max_rows=2, kv_dtype="int8")
        assert fp.bytes_per_token == 2 * slots * 2 * 8 * 4  # fp32
        assert q.bytes_per_token == 2 * slots * 2 * (8 + 4)  # int8 codes + one fp32 scale per head


def test_int8_engine_every_request_equals_itself_alone():
    """Under int8 KV the invariant holds against the same request alone in an int8 engine (`generate` has no
    int8 cache), and KV bytes are what the pool's layout says."""
    from test_batching import requests, run

    model = tiny_model(**ENGINE_SHAPES["gate+coda+loopnorm"])
    reqs = requests(n=10, seed=3)
    for kv in ("last:int8", "mean:int8", "per_loop:int8"):
        engine = Engine(model, kv=kv, max_loops=4, max_batch_size=4, max_tokens=150, max_step_tokens=8)
        seen = []
        results = run(engine, reqs, join_every=2, on_step=lambda *_: seen.append(engine.stats()["kv_bytes"]))
        for (prompt, kw), got in zip(reqs, results):
            solo = Engine(model, kv=kv, max_loops=4, max_batch_size=1, max_tokens=150, max_step_tokens=64)
            assert got[:2] == run(solo, [(prompt, kw)])[0][:2], (kv, prompt, kw)
        assert max(seen) > 0 and engine.stats()["kv_bytes"] == 0
    e = Engine(model, kv="last:int8", max_loops=4, max_batch_size=1, max_tokens=150)
    rid = e.add_request(list(range(10)), max_new_tokens=3, stop_tokens=[])
    while e.has_unfinished_requests():
        out = e.step()
    assert out[0].kv_bytes == 12 * e.pool.bytes_per_token  # 10 prompt + 2 fed-back tokens held at the end
    assert rid == out[0].request_id


@pytest.mark.parametrize("kv", ["last:int8", "first:int8", "per_loop:int8"])
def test_int8_warm_equals_cold(kv):
    model = tiny_model(**ENGINE_SHAPES["gate+coda+loopnorm"])
    store = PrefixStore.from_specs(["host:64MiB"], chunk_size=CS)
    warm = Engine(model, kv=kv, max_loops=4, max_batch_size=2, max_tokens=200, kv_store=store)
    cold = Engine(model, kv=kv, max_loops=4, max_batch_size=2, max_tokens=200)
    for i, p in enumerate(prompts()):
        got = serve(warm, p, num_loops=3, max_new_tokens=6)
        assert got[:2] == serve(cold, p, num_loops=3, max_new_tokens=6)[:2] and got[2] == (0 if i == 0 else 24)
    stored = store.tiers[0]._data
    assert stored and all(c["k"].dtype == torch.int8 and c["k_scale"].dtype == torch.float32 for c in stored.values())
    fp = PrefixStore(store.tiers, chunk_size=CS)  # the same tier: int8 chunks never serve an fp engine
    assert serve(Engine(model, kv=kv.split(":")[0], max_loops=4, max_batch_size=2, max_tokens=200, kv_store=fp),
                 prompts()[1], num_loops=3, max_new_tokens=2)[2] == 0


@pytest.mark.parametrize("kv", ["last", "mean", "first", "last:int8"])
def test_committed_prefix_warm_equals_cold(kv):
    """prefix_kv="committed": chunks hold what the strategy keeps (one core slot, not R); every prompt is
    prefilled chunk by chunk, so a warm request equals a cold one under the same semantics (an empty store)."""
    model = tiny_model(**ENGINE_SHAPES["gate+coda+loopnorm"])
    store = PrefixStore.from_specs(["host:64MiB"], chunk_size=CS)
    warm = Engine(model, kv=kv, max_loops=4, max_batch_size=2, max_tokens=200, max_step_tokens=5, kv_store=store,
                  prefix_kv="committed")
    for budget in (dict(num_loops=3), dict(exit="q:0.5")):
        for i, p in enumerate(prompts(seed=len(str(budget)))):
            cold = Engine(model, kv=kv, max_loops=4, max_batch_size=2, max_tokens=200, max_step_tokens=16,
                          kv_store=PrefixStore.from_specs(["host:64MiB"], chunk_size=CS), prefix_kv="committed")
            got = serve(warm, p, max_new_tokens=6, **budget)
            assert got[:2] == serve(cold, p, max_new_tokens=6, **budget)[:2] and got[2] == (0 if i == 0 else 24)
    cfg = model.config  # 1 prelude + 1 committed core slot per core layer + 1 coda
    assert {tuple(c["k"].shape) for c in store.tiers[0]._data.values()} == \
        {(cfg.num_layers, cfg.num_key_value_heads, CS, cfg.head_dim)}


def test_device_tier_is_the_engines_memory(tmp_path):
    """device:SIZE keeps chunks on the engine's device (here the CPU) in front of the others."""
    model = tiny_model(**ENGINE_SHAPES["ouro-like"])
    e = Engine(model, kv="last", max_loops=4, max_batch_size=2, max_tokens=200,
               kv_store=PrefixStore.from_specs(["device:1MiB", f"disk:{tmp_path}:64MiB"], chunk_size=CS))
    assert [t.name for t in e.store.tiers] == ["device", "disk"] and e.store.tiers[0].device == model.device
    p = prompts(n=1)[0]
    cold = serve(e, p, num_loops=3, max_new_tokens=4)
    e.store.flush()
    assert serve(e, p, num_loops=3, max_new_tokens=4) == (cold[0], cold[1], 24) and e.prefix_hits == {"device": 3}
    e.store.tiers[0].clear()
    assert serve(e, p, num_loops=3, max_new_tokens=4)[2] == 24 and e.prefix_hits == {"device": 3, "disk": 3}


def test_redis_budget_is_its_maxmemory_under_a_stream_of_prefixes(tmp_path):
    """A Redis run as docs/memory.md says (maxmemory + allkeys-lru) never holds more than its limit."""
    import redis

    from conftest import RedisServer
    from looplm.store import RedisTier

    server = RedisServer(tmp_path, maxmemory="3mb")
    try:
        tier = RedisTier(server.url)
        big = {"k": torch.randn(64, 1024)}  # 256 KiB a value
        for i in range(40):
            tier.put(f"{i:040x}", big)
        info = redis.Redis(port=server.port).info("memory")
        assert info["used_memory"] <= info["maxmemory"] == 3 * 2**20
        kept = [tier.get(f"{i:040x}") is not None for i in range(40)]
        assert kept[-1] and not kept[0] and 0 < sum(kept) < 40  # the least recently used went
    finally:
        server.stop()


def test_a_failing_tier_is_a_miss_and_leaks_nothing():
    class Broken(HostTier):
        def get(self, key):
            raise PermissionError(13, "Permission denied")

    model = tiny_model(**ENGINE_SHAPES["ouro-like"])
    store = PrefixStore([Broken(2**20)], chunk_size=CS)
    e = Engine(model, kv="last", max_loops=4, max_batch_size=2, max_tokens=200, kv_store=store)
    p = prompts(n=1)[0]
    ref = alone(model, p, "last", dict(num_loops=3, max_new_tokens=4))[:2]
    assert serve(e, p, num_loops=3, max_new_tokens=4)[:2] == ref
    assert e.pool.free_rows == 2 and e.reserved == 0 and not e.requests


def test_redis_response_errors_are_misses_not_an_outage(redis_server, caplog):
    import redis

    from looplm.store import RedisTier

    tier = RedisTier(redis_server.url)
    raw = redis.Redis(port=redis_server.port)
    raw.rpush(tier.prefix + "g" * 40, b"not a string")  # WRONGTYPE on GET
    with caplog.at_level("WARNING", logger="looplm.store"):
        assert tier.get("g" * 40) is None
    assert tier.up and "unreachable" not in caplog.text
    raw.delete(tier.prefix + "g" * 40)


def test_disk_budget_holds_across_processes_and_the_admin_view_never_evicts(tmp_path):
    one = len(encode(chunk()))
    a, b = DiskTier(tmp_path, 3 * one + 10), DiskTier(tmp_path, 3 * one + 10)  # two processes' views
    for i in range(6):
        (a if i % 2 else b).put(f"{i:040x}", chunk(i))
        assert sum(f.stat().st_size for f in tmp_path.glob("*/*.kv")) <= 3 * one + 10
    stale = tmp_path / "ab" / "x.kv.1.2.tmp"
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"torn")
    os.utime(stale, (0, 0))  # a writer that died long ago
    admin = PrefixStore.from_specs([f"disk:{tmp_path}:1"], admin=True).tiers[0]  # the size is ignored
    assert admin.budget is None and admin.stats()["entries"] == 3 and not stale.exists()


def test_int8_kv_keeps_the_bundled_models_answers():
    """The accuracy bound docs/memory.md reports: int8 KV changes none of the bundled model's answers on 40
    held-out problems (benchmarks/prefix_store.py measured 200 queries: 100% agreement)."""
    import json

    from looplm.checkpoint import load, load_tokenizer
    from looplm.demo import heldout_problems

    d = looplm.bundled_model_dir()
    model, tok = load(d), load_tokenizer(d)
    meta = json.loads((d / "looplm_task.json").read_text())
    probs = [p for diff in meta["difficulties"] for p in heldout_problems(meta, diff, count=10, seed=12345)]
    answers = {}
    for kv in ("last", "last:int8"):
        e = Engine(model, kv=kv, max_batch_size=8, max_tokens=1024)
        ids = [e.add_request(tok.encode(p.prompt, add_special_tokens=False), max_new_tokens=1, stop_tokens=[])
               for p in probs]
        got = {}
        while e.has_unfinished_requests():
            for o in e.step():
                got[o.request_id] = tok.decode(o.new_tokens)
        answers[kv] = [got[i] for i in ids]
    right = sum(a == p.answer[0] for a, p in zip(answers["last"], probs))
    assert answers["last:int8"] == answers["last"] and right >= 36, right
