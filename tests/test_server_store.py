"""`looplm serve --kv-store` (issue 15): the prefix store behind the OpenAI API — cached_tokens in usage, the
prefix-cache metrics, a prefix stored by one server process served by another through Redis, and Redis
stopped and restarted while a server runs. Real server processes on free localhost ports, a real redis-server."""

from __future__ import annotations

import time

import pytest

from test_server import PROBLEMS, metric, offline, reference, start_server  # noqa: F401 (offline: a fixture)

pytest.importorskip("redis")
httpx = pytest.importorskip("httpx")

CHUNK = 16
LONG = PROBLEMS[0][:-2] * 5 + ";p"  # 62 tokens: 3 whole chunks of 16 before the last token


def complete(server, prompt: str = LONG, **extra):
    res = server.client().completions.create(model=None, prompt=prompt, max_tokens=5, temperature=0.0,
                                             extra_body=dict(extra, ignore_eos=True))
    return res.choices[0].text, res.usage.prompt_tokens_details.cached_tokens, res.usage.prompt_tokens


@pytest.fixture(scope="module")
def redis_url(redis_server):
    from looplm.store import RedisTier

    RedisTier(redis_server.url).clear()
    return redis_server.url


def test_cached_tokens_and_metrics(tmp_path_factory, redis_url, offline):
    s = start_server(tmp_path_factory, "--kv", "last,per_loop,last:int8", "--kv-store", "host:64MiB", "--kv-store", redis_url,
                     "--kv-chunk-size", str(CHUNK))
    try:
        text, cached, n = complete(s)
        assert cached == 0 and n == 62
        want = reference(offline, LONG, kv="last", ignore_eos=True, max_new_tokens=5)[2]
        assert text == want
        assert complete(s) == (want, 48, 62)  # host RAM
        # the store holds every loop's KV, so the per_loop pool reuses what the last pool stored
        assert complete(s, kv="per_loop") == (reference(offline, LONG, kv="per_loop", ignore_eos=True,
                                                        max_new_tokens=5)[2], 48, 62)
        # int8 KV is stored under keys of its own: a miss first, then a hit, the same answer both times
        text8, cached8, _ = complete(s, kv="last:int8")
        assert cached8 == 0 and complete(s, kv="last:int8") == (text8, 48, 62)
        m = httpx.get(f"{s.url}/metrics").text
        assert metric(m, "looplm:prefix_cache_queries_total") == 1 + 3 + 3 + 1 + 3  # a lookup stops at its first miss
        assert metric(m, "looplm:prefix_cache_hits_total", tier="host") == 9
        assert metric(m, "looplm:prefix_cache_hits_total", tier="redis") == 0
    finally:
        assert s.stop() == 0, s.log.read_text()


def test_another_server_process_reuses_the_prefix_through_redis(tmp_path_factory, redis_url, redis_server, offline):
    """Server B (Redis tier only) serves the prefix server A stored; then Redis stops: B keeps answering,
    uncached; Redis comes back: B stores and reuses again."""
    other = PROBLEMS[5][:-2] * 6 + ";f"
    a = start_server(tmp_path_factory, "--kv-store", "host:64MiB", "--kv-store", redis_url, "--kv-chunk-size", str(CHUNK))
    try:
        text_a, cached_a, _ = complete(a, other)
    finally:
        assert a.stop() == 0, a.log.read_text()  # SIGTERM after its writes: the store's thread has flushed them
    b = start_server(tmp_path_factory, "--kv-store", redis_url, "--kv-chunk-size", str(CHUNK))
    try:
        text_b, cached_b, n = complete(b, other)
        assert cached_a == 0 and cached_b == 16 * ((n - 1) // 16) and text_b == text_a
        assert text_a == reference(offline, other, kv="last", ignore_eos=True, max_new_tokens=5)[2]
        m = httpx.get(f"{b.url}/metrics").text
        assert metric(m, "looplm:prefix_cache_hits_total", tier="redis") == (n - 1) // 16
        redis_server.stop()
        try:
            assert complete(b, other) == (text_a, 0, n)  # misses, the same answer
            assert complete(b, LONG)[1] == 0
        finally:
            redis_server.start()  # empty: this Redis keeps nothing on disk
        deadline = time.time() + 30
        while complete(b, LONG)[1] == 0:  # the tier retries its connection; the next prompt is stored and hit
            assert time.time() < deadline, b.log.read_text()
            time.sleep(0.5)
        assert "unreachable" in b.log.read_text() and "is back" in b.log.read_text()
    finally:
        assert b.stop() == 0, b.log.read_text()
