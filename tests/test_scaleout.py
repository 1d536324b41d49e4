"""`looplm serve --replicas 2` (issue 16): the OpenAI app on Ray Serve, one local Ray instance for the module
(a real `looplm serve` process that starts it), replicas sharing a real Redis. The official openai client
through 2 replicas ≡ offline generate; a long prefix sent twice is cached the second time, also when the
replica that stored it has died; killing a replica mid-load leaves the other serving and Ray brings it
back; `looplm serve` without --replicas never loads Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from test_server import BUNDLED, PROBLEMS, TEMPLATE, free_port, offline, reference, start_server  # noqa: F401

pytest.importorskip("ray.serve")
pytest.importorskip("redis")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

CHUNK = 16
LONG = PROBLEMS[0][:-2] * 5 + ";p"  # 62 tokens: 3 whole chunks before the last token


def replica_pids() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return sorted(int(line.split()[0]) for line in out.splitlines() if "ray::ServeReplica:looplm:Replica" in line)


class RayServer:
    def __init__(self, log: Path, redis_url: str):
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "looplm", "serve", "--model", str(BUNDLED), "--port", str(self.port),
               "--replicas", "2", "--threads", "1", "--kv", "last,per_loop", "--chat-template", TEMPLATE,
               "--kv-store", "host:256MiB", "--kv-store", redis_url, "--kv-chunk-size", str(CHUNK),
               "--max-batch-size", "8", "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"})
        self.wait_running(2, timeout=300)

    def health(self) -> dict:
        try:
            r = httpx.get(f"{self.url}/health", timeout=5)
            return r.json() if r.status_code in (200, 503) else {}
        except (httpx.HTTPError, ValueError):
            return {}

    def wait_running(self, n: int, timeout: float) -> None:
        t = time.time()
        while self.health().get("replicas", {}).get("RUNNING", 0) != n or len(replica_pids()) != n:
            assert self.proc.poll() is None, f"server exited: {self.log.read_text(errors='replace')[-3000:]}"
            assert time.time() - t < timeout, f"{n} replicas not running in {timeout} s: {self.health()}"
            time.sleep(0.5)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=120)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server's session: its Ray processes too
            code = self.proc.wait(30)
        return code


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory, redis_server):
    from looplm.store import RedisTier

    RedisTier(redis_server.url).clear()
    s = RayServer(tmp_path_factory.mktemp("ray") / "server.log", redis_server.url)
    yield s
    assert s.stop() == 0, s.log.read_text(errors="replace")[-3000:]


def test_openai_client_through_two_replicas_equals_offline(ray_server, offline):
    client = ray_server.client()
    for i, budget in enumerate([dict(num_loops=2), dict(exit="q:0.6"), dict(kv="per_loop", num_loops=3)]):
        prompt = PROBLEMS[i]
        kv = budget.pop("kv", "last")
        want_tokens, want_loops, want = reference(offline, prompt, kv=kv, max_new_tokens=4, **budget)
        res = client.completions.create(model="chain-r4", prompt=prompt, max_tokens=4, temperature=0,
                                        extra_body=dict(budget, kv=kv, return_loops=True))
        assert res.choices[0].text == want and res.choices[0].loops == want_loops
        chat = client.chat.completions.create(model="chain-r4", messages=[{"role": "user", "content": prompt}],
                                              max_tokens=4, temperature=0, extra_body=dict(budget, kv=kv))
        assert chat.choices[0].message.content == want
        stream = client.completions.create(model="chain-r4", prompt=prompt, max_tokens=4, temperature=0, stream=True,
                                           stream_options={"include_usage": True}, extra_body=dict(budget, kv=kv))
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want
        assert chunks[-1].usage.completion_tokens == len(want_tokens)
    bad = httpx.post(f"{ray_server.url}/v1/completions", json={"prompt": "a=1;a", "num_loops": 9}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "num_loops"


def complete(server, prompt: str = LONG) -> tuple[str, int, int]:
    """(text, cached tokens, the replica's pid)."""
    r = httpx.post(f"{server.url}/v1/completions", timeout=120,
                   json={"prompt": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["choices"][0]["text"], body["usage"]["prompt_tokens_details"]["cached_tokens"], \
        int(r.headers["x-looplm-replica"])


def test_prefix_cached_the_second_time_and_after_its_replica_died(ray_server, offline):
    """Sent twice, a long prompt is cached the second time (the prefix router sends it back to the replica
    holding it); that replica killed, the other serves it cached too, from the shared Redis."""
    want = reference(offline, LONG, kv="last", ignore_eos=True, max_new_tokens=3)[2]
    text, cached, pid = complete(ray_server)
    assert text == want and cached == 0
    text2, cached2, pid2 = complete(ray_server)
    assert (text2, cached2, pid2) == (want, 48, pid)
    time.sleep(1.0)  # the replica's background writer reaches Redis
    os.kill(pid, signal.SIGKILL)
    t = time.time()
    while True:  # until a live replica answers
        try:
            text3, cached3, pid3 = complete(ray_server)
            break
        except AssertionError:
            assert time.time() - t < 60
            time.sleep(0.5)
    assert pid3 != pid and (text3, cached3) == (want, 48)
    ray_server.wait_running(2, timeout=180)


def test_killing_a_replica_mid_load_leaves_the_other_serving(ray_server):
    ray_server.wait_running(2, timeout=180)
    pids = replica_pids()
    codes: list[tuple[int, str | None]] = []

    def load():
        with httpx.Client(timeout=120) as c:
            for i in range(12):
                r = c.post(f"{ray_server.url}/v1/completions",
                           json={"prompt": PROBLEMS[i % len(PROBLEMS)], "max_tokens": 6, "temperature": 0,
                                 "ignore_eos": True})
                codes.append((r.status_code, r.json()["error"]["code"] if r.status_code != 200 else None))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for th in threads:
        th.start()
    while len(codes) < 4:
        time.sleep(0.05)
    os.kill(pids[0], signal.SIGKILL)
    for th in threads:
        th.join(300)
    counts = Counter(codes)
    assert set(counts) <= {(200, None), (503, "replica_died")}, counts  # a retryable error or an answer
    assert counts[(200, None)] >= 40 and len(codes) == 48
    ray_server.wait_running(2, timeout=180)
    assert pids[0] not in replica_pids()
    assert complete(ray_server, PROBLEMS[1])[0] is not None


def test_serve_without_replicas_never_loads_ray(tmp_path_factory):
    s = start_server(tmp_path_factory)
    try:
        maps = Path(f"/proc/{s.proc.pid}/maps").read_text()
        modules = httpx.get(f"{s.url}/health", timeout=5).status_code
        assert modules == 200 and "_raylet" not in maps and "/ray/" not in maps
    finally:
        assert s.stop() == 0
