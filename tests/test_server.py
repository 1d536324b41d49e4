"""`looplm serve` (issue 14): a real server process on a free localhost port, driven by the official openai
client. Greedy output ≡ offline `looplm.generate` with the same budget, token for token; 64 concurrent
clients; disconnects free KV; every bad input gets an OpenAI error body; a full queue gets 503; SIGTERM
finishes what runs. The bundled model (chain-r4: 984 tokens, context 128, 4 loops, an exit gate) keeps it fast."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import looplm

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

BUNDLED = looplm.bundled_model_dir()
TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # chain-r4 has no chat template of its own
# chain-r4's problems: the answer is a digit, then <eos>; with ignore_eos it goes on with more statements
PROBLEMS = ["h=fk=nd=3i=jo=kf=5a=dp=hb=aj=9n=7m=i;p", "a=3b=ac=b;c", "x=4y=xz=y;z", "q=1r=q;r", "m=2;m",
            "c=8d=ce=df=e;f", "g=5h=g;h", "s=9t=su=tv=uw=v;w"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`looplm serve` in a subprocess; `stop()` sends SIGTERM and returns the exit code."""

    def __init__(self, log: Path, *args: str):
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "looplm", "serve", "--model", str(BUNDLED), "--port", str(self.port),
               "--threads", "1", "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        t = time.time()
        while True:
            assert self.proc.poll() is None, f"server exited: {log.read_text()}"
            assert time.time() - t < 120, f"server not ready in 120 s: {log.read_text()}"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def start_server(tmp_path_factory, *args: str) -> Server:
    return Server(tmp_path_factory.mktemp("serve") / "server.log", *args)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory, "--kv", "last,per_loop", "--max-batch-size", "16", "--chat-template", TEMPLATE)
    yield s
    code = s.stop()
    assert code == 0, s.log.read_text()


@pytest.fixture(scope="module")
def offline():
    """The same model in this process, for the references (one thread: the tiny model's generate takes 30 ms
    so, and 20× that with two threads on a CPU the server shares)."""
    import torch

    from looplm.checkpoint import load, load_tokenizer
    from looplm.engine import stop_tokens_for

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = load(BUNDLED), load_tokenizer(BUNDLED)
    yield model, tok, stop_tokens_for(model.config, tok)
    torch.set_num_threads(threads)


def reference(offline, prompt: str, *, kv: str, ignore_eos: bool = False, **budget):
    """(token ids, loops, text) of offline generate on one prompt."""
    model, tok, stop = offline
    ids = tok(prompt)["input_ids"]
    res = looplm.generate(model, [ids], kv=kv, stop_tokens=[] if ignore_eos else stop, **budget)
    tokens = res.new_tokens[0]
    return tokens, res.loops_per_token[0, : len(tokens)].tolist(), tok.decode([t for t in tokens if t not in stop])


def metric(text: str, name: str, **labels) -> float:
    """The sum of a metric's samples whose labels include these."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


# --------------------------------------------------------------------------- the CLI stays light


def test_serve_help_imports_no_server_or_torch():
    code = ("from typer.testing import CliRunner\nfrom looplm.__main__ import app\n"
            "res = CliRunner().invoke(app, ['serve', '--help'])\nassert res.exit_code == 0 and '--max-queue' in res.output\n"
            "import sys, json\nprint(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    loaded = set(json.loads(out.stdout.splitlines()[-1]))
    assert not loaded & {"torch", "fastapi", "uvicorn", "prometheus_client", "transformers"}


def test_serve_refuses_bad_options_before_loading():
    from typer.testing import CliRunner

    from looplm.__main__ import app

    for args, needle in ((["--kv", "bogus"], "bogus"), (["--kv", "last,last"], "once"),
                         (["--max-queue", "0"], "--max-queue"), (["--model", "/nonexistent/dir"], "/nonexistent/dir")):
        res = CliRunner().invoke(app, ["serve", *args])
        assert res.exit_code == 2 and needle in res.output, (args, res.output)


# --------------------------------------------------------------------------- output ≡ offline generate


BUDGETS = [
    dict(kv="last", exit="q:0.6"),
    dict(kv="per_loop", num_loops=2),
    dict(kv="last", num_loops=4, ignore_eos=True, max_tokens=24),
    dict(kv="per_loop", exit="q:0.5|conv:0.05,min=2", ignore_eos=True, max_tokens=12),
]


@pytest.mark.parametrize("budget", BUDGETS, ids=lambda b: ",".join(f"{k}={v}" for k, v in b.items()))
def test_completion_greedy_equals_offline_generate(server, offline, budget):
    budget = dict(budget)
    max_tokens = budget.pop("max_tokens", 8)
    client = server.client()
    for prompt in PROBLEMS[:3]:
        res = client.completions.create(model="chain-r4", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                        extra_body=dict(budget, return_loops=True, return_token_ids=True))
        tokens, loops, text = reference(offline, prompt, max_new_tokens=max_tokens, **budget)
        choice = res.choices[0]
        assert choice.token_ids == tokens and choice.loops == loops, prompt
        assert choice.text == text
        assert choice.finish_reason == ("stop" if tokens[-1] in offline[2] and not budget.get("ignore_eos") else "length")
        assert res.usage.completion_tokens == len(tokens)
        assert res.usage.mean_loops == pytest.approx(sum(loops) / len(loops), abs=1e-4)


def test_streamed_completion_equals_whole(server, offline):
    client = server.client()
    kw = dict(model="chain-r4", prompt=PROBLEMS[0], max_tokens=20, temperature=0)
    extra = dict(exit="q:0.6", ignore_eos=True, return_loops=True, return_token_ids=True)
    whole = client.completions.create(**kw, extra_body=extra)
    chunks = list(client.completions.create(**kw, extra_body=extra, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    body = [c.choices[0] for c in chunks[:-1]]
    assert "".join(c.text for c in body) == whole.choices[0].text
    assert sum((c.loops for c in body), []) == whole.choices[0].loops
    assert sum((c.token_ids for c in body), []) == whole.choices[0].token_ids
    assert [c.finish_reason for c in body] == [None] * (len(body) - 1) + ["length"]
    assert chunks[-1].usage.mean_loops == whole.usage.mean_loops
    tokens, loops, _ = reference(offline, PROBLEMS[0], kv="last", exit="q:0.6", ignore_eos=True, max_new_tokens=20)
    assert whole.choices[0].token_ids == tokens and whole.choices[0].loops == loops


def test_chat_equals_offline_generate_streamed_and_not(server, offline):
    client = server.client()
    messages = [{"role": "user", "content": PROBLEMS[1]}]
    extra = dict(kv="per_loop", num_loops=3, return_loops=True, return_token_ids=True, ignore_eos=True)
    whole = client.chat.completions.create(model="chain-r4", messages=messages, max_tokens=10, temperature=0,
                                           extra_body=extra)
    tokens, loops, text = reference(offline, PROBLEMS[1], kv="per_loop", num_loops=3, ignore_eos=True, max_new_tokens=10)
    assert whole.choices[0].token_ids == tokens and whole.choices[0].loops == loops
    assert whole.choices[0].message.content == text and whole.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="chain-r4", messages=messages, max_completion_tokens=10,
                                                 temperature=0, extra_body=extra, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta for c in chunks[1:]]
    assert "".join(d.content for d in deltas) == text
    assert sum((d.loops for d in deltas), []) == loops
    assert chunks[-1].choices[0].finish_reason == "length"


def test_prompt_forms_and_n(server, offline):
    model, tok, _ = offline
    client = server.client()
    ids = [tok(p)["input_ids"] for p in PROBLEMS[:2]]
    for prompt in (PROBLEMS[:2], ids):
        res = client.completions.create(model="chain-r4", prompt=prompt, max_tokens=4, temperature=0, n=2,
                                        extra_body=dict(return_token_ids=True))
        assert [c.index for c in res.choices] == [0, 1, 2, 3]
        for c in res.choices:
            assert c.token_ids == reference(offline, PROBLEMS[c.index // 2], kv="last", max_new_tokens=4)[0]
        assert res.usage.prompt_tokens == len(ids[0]) + len(ids[1])
    one = client.completions.create(model="chain-r4", prompt=ids[0], max_tokens=4, temperature=0,
                                    extra_body=dict(return_token_ids=True))
    assert one.choices[0].token_ids == reference(offline, PROBLEMS[0], kv="last", max_new_tokens=4)[0]


def test_stop_string_trims_like_openai(server, offline):
    _, _, text = reference(offline, PROBLEMS[0], kv="last", num_loops=4, ignore_eos=True, max_new_tokens=30)
    stop = text[5:7]
    cut = text.find(stop)
    client = server.client()
    kw = dict(model="chain-r4", prompt=PROBLEMS[0], max_tokens=30, temperature=0, stop=[stop, "never-there"],
              extra_body=dict(num_loops=4, ignore_eos=True, return_token_ids=True))
    res = client.completions.create(**kw)
    assert res.choices[0].text == text[:cut] and res.choices[0].finish_reason == "stop"
    assert len(res.choices[0].token_ids) < 30  # generation stopped there
    streamed = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == text[:cut]


def test_logprobs_and_seeded_sampling(server, offline):
    model, tok, stop = offline
    client = server.client()
    res = client.completions.create(model="chain-r4", prompt=PROBLEMS[2], max_tokens=6, temperature=0, logprobs=1,
                                    extra_body=dict(ignore_eos=True, num_loops=4))
    ref = looplm.generate(model, [tok(PROBLEMS[2])["input_ids"]], kv="last", num_loops=4, max_new_tokens=6,
                          stop_tokens=[])
    assert res.choices[0].logprobs.token_logprobs == pytest.approx(ref.logprobs[0].tolist(), abs=1e-4)
    chat = client.chat.completions.create(model="chain-r4", messages=[{"role": "user", "content": PROBLEMS[2]}],
                                          max_tokens=3, temperature=0, logprobs=True)
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    # top alternatives: the k likeliest under the model, ≡ a full forward over prompt + generated tokens (which
    # is what a per_loop cache computes)
    import torch

    res = client.completions.create(model="chain-r4", prompt=PROBLEMS[2], max_tokens=4, temperature=0, logprobs=3,
                                    extra_body=dict(ignore_eos=True, num_loops=4, return_token_ids=True, kv="per_loop"))
    ids = tok(PROBLEMS[2])["input_ids"]
    with torch.no_grad():
        logp = model(torch.tensor([ids + res.choices[0].token_ids]), num_loops=4).logits[0].log_softmax(-1)
    for i, top in enumerate(res.choices[0].logprobs.top_logprobs):
        vals, want = logp[len(ids) - 1 + i].topk(3)
        assert list(top) == [tok.decode([t]) for t in want.tolist()]
        assert list(top.values()) == pytest.approx(vals.tolist(), abs=1e-4)
    chat = client.chat.completions.create(model="chain-r4", messages=[{"role": "user", "content": PROBLEMS[2]}],
                                          max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    for item in chat.choices[0].logprobs.content:
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].token == item.token
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-6)
    kw = dict(model="chain-r4", prompt=PROBLEMS[2], max_tokens=8, temperature=1.0, seed=7,
              extra_body=dict(ignore_eos=True, top_k=50, return_token_ids=True))
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].token_ids == b.choices[0].token_ids
    ref = looplm.generate(model, [tok(PROBLEMS[2])["input_ids"]], kv="last", max_new_tokens=8, temperature=1.0,
                          top_k=50, seed=7, stop_tokens=[])
    assert a.choices[0].token_ids == ref.new_tokens[0]


def test_64_concurrent_clients_each_equal_offline(server, offline):
    """64 clients at once (16 rows: most wait their turn), mixed budgets and pools; each ≡ its offline result."""
    budgets = [dict(kv="last", exit="q:0.6"), dict(kv="per_loop", num_loops=3), dict(kv="last", num_loops=1),
               dict(kv="per_loop", exit="q:0.7")]
    jobs = [(PROBLEMS[i % len(PROBLEMS)], budgets[i % len(budgets)], 2 + i % 5) for i in range(64)]

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(
                c.completions.create(model="chain-r4", prompt=p, max_tokens=m, temperature=0,
                                     extra_body=dict(b, ignore_eos=True, return_loops=True, return_token_ids=True))
                for p, b, m in jobs))

    t = time.time()
    results = asyncio.run(asyncio.wait_for(main(), timeout=120))
    seconds = time.time() - t
    print(f"64 clients: {seconds:.1f} s")
    for (p, b, m), res in zip(jobs, results):
        tokens, loops, _ = reference(offline, p, ignore_eos=True, max_new_tokens=m, **b)
        assert (res.choices[0].token_ids, res.choices[0].loops) == (tokens, loops), (p, b, m)
    assert seconds < 120
    text = httpx.get(f"{server.url}/metrics").text
    assert metric(text, "looplm:num_requests_running") == 0


def test_disconnect_mid_stream_aborts_and_frees_kv(server):
    body = dict(model="chain-r4", prompt=PROBLEMS[0], max_tokens=100, temperature=0, stream=True, num_loops=4,
                ignore_eos=True)
    with httpx.Client(timeout=30) as c, c.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(g.startswith("data: {") for g in got)
        text = httpx.get(f"{server.url}/metrics").text
        assert metric(text, "looplm:num_requests_running", kv="last") == 1
        assert metric(text, "looplm:kv_cache_bytes", kv="last") > 0
    t = time.time()
    while True:  # the request is aborted: no row, no KV
        text = httpx.get(f"{server.url}/metrics").text
        if metric(text, "looplm:num_requests_running") == 0 and metric(text, "looplm:kv_cache_bytes") == 0:
            break
        assert time.time() - t < 10, text
        time.sleep(0.1)
    assert metric(text, "looplm:generation_tokens_total") > 0
    assert metric(text, "looplm:request_success_total", finished_reason="length") < 100  # it never ran to the end


# --------------------------------------------------------------------------- bad input


BAD = [  # (path, body, status, param, what the message names)
    ("/v1/completions", dict(prompt="a=1;a", num_loops=9), 400, "num_loops", "9"),
    ("/v1/completions", dict(prompt="a=1;a", exit="bogus:1"), 400, "exit", "bogus:1"),
    ("/v1/completions", dict(prompt="a=1;a", kv="first"), 400, "kv", "first"),
    ("/v1/completions", dict(prompt="a=1;a", temperature=-1), 400, "temperature", "-1"),
    ("/v1/completions", dict(prompt="a=1;a", top_p=0), 400, "top_p", "0"),
    ("/v1/completions", dict(prompt="a=1;a", top_k=-5), 400, "top_k", "-5"),
    ("/v1/completions", dict(prompt="a=1;a", n=0), 400, "n", "0"),
    ("/v1/completions", dict(prompt="a=1;a", max_tokens=0), 400, "max_tokens", "0"),
    ("/v1/completions", dict(prompt="a=1;a", max_tokens="many"), 400, "max_tokens", "many"),
    ("/v1/completions", dict(prompt="a=1;a", max_tokens=126), 400, "max_tokens", "126"),  # 3 tokens + 126 > 128
    ("/v1/completions", dict(prompt=list(range(2, 130))), 400, "prompt", "128"),
    ("/v1/completions", dict(prompt=[5, 99999]), 400, "prompt", "99999"),
    ("/v1/completions", dict(prompt="HELLO"), 400, "prompt", "HELLO"),
    ("/v1/completions", dict(prompt=""), 400, "prompt", "''"),
    ("/v1/completions", dict(prompt="a=1;a", stop=[""]), 400, "stop", "''"),
    ("/v1/completions", dict(prompt="a=1;a", model="gpt-4"), 404, "model", "gpt-4"),
    ("/v1/completions", dict(), 400, "prompt", "prompt"),
    ("/v1/chat/completions", dict(messages=[]), 400, "messages", "messages"),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "a=1;a"}], top_logprobs=3), 400,
     "top_logprobs", "needs logprobs=true"),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "a=1;a"}], logprobs=True, top_logprobs=21),
     400, "top_logprobs", "21"),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "a=1;a"}], max_completion_tokens=200), 400,
     "max_completion_tokens", "200"),
]


@pytest.mark.parametrize("path, body, status, param, needle", BAD, ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_gets_an_openai_error_naming_field_and_value(server, path, body, status, param, needle):
    r = httpx.post(f"{server.url}{path}", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and needle in err["message"], err


def test_server_survives_bad_input_and_openai_client_raises(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="num_loops"):
        client.completions.create(model="chain-r4", prompt="a=1;a", extra_body=dict(num_loops=0))
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "a=1;a"}])
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


# --------------------------------------------------------------------------- other endpoints


def test_models_tokenize_detokenize_metrics(server, offline):
    _, tok, _ = offline
    data = server.client().models.list().data
    assert [m.id for m in data] == ["chain-r4"]
    info = httpx.get(f"{server.url}/v1/models").json()["data"][0]
    assert info["max_model_len"] == 128 and info["looplm"]["kv"] == ["last", "per_loop"]
    assert info["looplm"]["max_loops"] == 4 and info["looplm"]["exit_gate"] is True
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": PROBLEMS[0]}).json()
    assert r["tokens"] == tok(PROBLEMS[0])["input_ids"] and r["count"] == len(r["tokens"])
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": PROBLEMS[0]}]}).json()
    assert chat["tokens"] == r["tokens"]  # the test template renders the content alone
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": PROBLEMS[0]}
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": [10**6]}).status_code == 400
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("looplm:num_requests_running", "looplm:num_requests_waiting", "looplm:kv_cache_bytes",
                 "looplm:time_to_first_token_seconds_bucket", "looplm:inter_token_latency_seconds_bucket",
                 "looplm:e2e_request_latency_seconds_bucket", "looplm:prompt_tokens_total",
                 "looplm:generation_tokens_total", "looplm:loops_per_token_bucket"):
        assert f"{name}{{" in text, name
    tokens = metric(text, "looplm:generation_tokens_total")
    assert tokens > 0 and metric(text, "looplm:loops_per_token_count") == tokens
    assert metric(text, "looplm:loops_per_token_bucket", kv="last", le="1.0") > 0  # num_loops=1 requests ran


def test_health_is_503_while_loading():
    """In process: a loader held back by an event; /health and the API answer 503 until it returns."""
    from fastapi.testclient import TestClient

    from looplm.checkpoint import load, load_tokenizer
    from looplm.server.app import ServerOptions, create_app

    go = threading.Event()

    def loader():
        go.wait(60)
        return load(BUNDLED), load_tokenizer(BUNDLED), "chain-r4"

    with TestClient(create_app(loader, ServerOptions(max_batch_size=2))) as client:
        assert client.get("/health").status_code == 503
        r = client.post("/v1/completions", json={"prompt": "a=1;a"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        assert client.get("/").status_code == 200  # the page loads and waits
        go.set()
        t = time.time()
        while client.get("/health").status_code != 200:
            assert time.time() - t < 60
            time.sleep(0.05)
        r = client.post("/v1/completions", json={"prompt": "a=1;a", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


# --------------------------------------------------------------------------- a small server: key, queue, SIGTERM


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    s = start_server(tmp_path_factory, "--max-batch-size", "1", "--max-queue", "1", "--api-key", "sekret")
    yield s
    s.stop()


def test_api_key(small):
    with pytest.raises(openai.AuthenticationError):
        small.client(api_key="wrong").models.list()
    r = httpx.post(f"{small.url}/v1/completions", json={"prompt": "a=1;a"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{small.url}/health").status_code == 200  # health and metrics stay open
    assert httpx.get(f"{small.url}/metrics").status_code == 200
    assert small.client(api_key="sekret").models.list().data[0].id == "chain-r4"


def test_chat_without_a_template_is_a_400(small):
    with pytest.raises(openai.BadRequestError, match="chat template"):
        small.client(api_key="sekret").chat.completions.create(
            model="chain-r4", messages=[{"role": "user", "content": "a=1;a"}])


def test_full_queue_is_a_503_and_sigterm_finishes_what_runs(small):
    """One row, a queue of one: A runs, B waits, C is refused. Then SIGTERM: A and B still finish, the server exits 0."""
    auth = {"Authorization": "Bearer sekret"}
    long = dict(prompt=PROBLEMS[0], max_tokens=100, temperature=0, num_loops=4, ignore_eos=True)
    results = {}

    def run(name):
        results[name] = httpx.post(f"{small.url}/v1/completions", json=long, headers=auth, timeout=120)

    with httpx.Client(timeout=60) as c, c.stream("POST", f"{small.url}/v1/completions", headers=auth,
                                                 json=dict(long, stream=True)) as a:
        lines = a.iter_lines()
        assert next(lines).startswith("data: {")  # A runs
        b = threading.Thread(target=run, args=("B",))
        b.start()
        t = time.time()
        while metric(httpx.get(f"{small.url}/metrics").text, "looplm:num_requests_waiting") < 1:
            assert time.time() - t < 10
            time.sleep(0.02)
        r = httpx.post(f"{small.url}/v1/completions", json=dict(long, max_tokens=2), headers=auth)
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full", r.text
        small.proc.send_signal(signal.SIGTERM)
        rest = [x for x in lines if x]
        assert rest[-1] == "data: [DONE]"
        done = [json.loads(x[6:]) for x in rest if x.startswith("data: {")]
        assert done[-1]["choices"][0]["finish_reason"] == "length"
    b.join(60)
    assert results["B"].status_code == 200 and results["B"].json()["usage"]["completion_tokens"] == 100
    assert small.proc.wait(60) == 0


def test_a_failing_engine_step_fails_its_requests_and_the_driver_goes_on():
    """An engine step that raises (a bug, out of memory) answers that engine's requests with a 500; the next
    request runs as usual."""
    from conftest import tiny_model
    from looplm.batching import Engine, RequestOutput
    from looplm.server.driver import Driver
    from looplm.server.protocol import APIError

    engine = Engine(tiny_model(), kv="last", max_batch_size=2)
    real_step, calls = engine.step, []

    def step():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real_step()

    engine.step = step
    driver = Driver({"last": engine}, max_queue=4)
    driver.start()

    async def one(rid):
        out = asyncio.Queue()
        driver.add("last", rid, [1, 2, 3], dict(max_new_tokens=3, temperature=0.0), out)
        items = []
        while True:
            item = await asyncio.wait_for(out.get(), 30)
            items.append(item)
            if isinstance(item, APIError) or (isinstance(item, RequestOutput) and item.finished):
                return items

    first = asyncio.run(one("a"))
    assert isinstance(first[-1], APIError) and first[-1].status == 500 and "boom" in first[-1].message
    second = asyncio.run(one("b"))
    assert [len(o.new_tokens) for o in second] == [1, 1, 1] and second[-1].finish_reason == "length"
    assert not engine.has_unfinished_requests()
    driver.stop(timeout=10)


# --------------------------------------------------------------------------- the engine process


def engine_pid(server_pid: int) -> int | None:
    """The server's engine process: its child started by multiprocessing's spawn (None if it has none)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (d / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
        if ppid == server_pid and b"spawn_main" in cmdline:
            return int(d.name)
    return None


def test_engine_process_ignores_group_signals_and_its_death_is_reported(tmp_path_factory):
    """The engines run in a child process. SIGINT/SIGTERM to it (a terminal's Ctrl-C, a supervisor signalling the
    process group) do not stop the request it runs; if it dies (SIGKILL here), the stream in flight ends
    with an error event, new requests and /health get 503 naming why, and the server process stays up."""
    s = start_server(tmp_path_factory, "--max-batch-size", "2")
    try:
        pid = engine_pid(s.proc.pid)
        assert pid is not None
        body = dict(prompt=PROBLEMS[0], max_tokens=60, temperature=0, num_loops=4, ignore_eos=True, stream=True)
        with httpx.Client(timeout=60) as c, c.stream("POST", f"{s.url}/v1/completions", json=body) as r:
            lines = (x for x in r.iter_lines() if x)
            assert next(lines).startswith("data: {")
            os.kill(pid, signal.SIGINT)
            os.kill(pid, signal.SIGTERM)
            rest = list(lines)
        assert rest[-1] == "data: [DONE]"
        done = [json.loads(x[6:]) for x in rest if x.startswith("data: {")]
        assert done[-1]["choices"][0]["finish_reason"] == "length"
        assert engine_pid(s.proc.pid) == pid  # alive

        with httpx.Client(timeout=60) as c, c.stream("POST", f"{s.url}/v1/completions",
                                                     json=dict(body, max_tokens=100)) as r:
            lines = (x for x in r.iter_lines() if x)
            assert next(lines).startswith("data: {")
            os.kill(pid, signal.SIGKILL)
            rest = list(lines)
        errors = [json.loads(x[6:]) for x in rest if x.startswith("data: {") and '"error"' in x]
        assert errors and "engine process exited" in errors[-1]["error"]["message"], rest[-3:]
        h = httpx.get(f"{s.url}/health")
        assert h.status_code == 503 and "exit code -9" in h.json()["error"], h.text
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "a=1;a", "max_tokens": 2})
        assert r.status_code == 503 and "engine" in r.json()["error"]["message"]
        assert s.proc.poll() is None
    finally:
        assert s.stop() == 0


def test_no_engine_process_serves_from_a_thread(tmp_path_factory, offline):
    """--no-engine-process: no child process, the same tokens."""
    s = start_server(tmp_path_factory, "--max-batch-size", "2", "--no-engine-process")
    try:
        assert engine_pid(s.proc.pid) is None
        r = s.client().completions.create(model="chain-r4", prompt=PROBLEMS[1], max_tokens=8, temperature=0,
                                          extra_body={"num_loops": 2, "return_token_ids": True})
        tokens, loops, text = reference(offline, PROBLEMS[1], kv="last", num_loops=2, max_new_tokens=8)
        assert r.choices[0].text == text and len(tokens) >= 1
    finally:
        assert s.stop() == 0
