"""Real weights: SmolLM2-135M-Instruct (30 Llama layers, GQA 9/3, tied head) against transformers."""

import json

import pytest
import torch
import transformers
from typer.testing import CliRunner

import looplm
from looplm.__main__ import app

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def models(smollm2_dir):
    ours = looplm.load(smollm2_dir)
    ref = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tok = looplm.load_tokenizer(smollm2_dir)
    return ours, ref, tok


def chat(tok, text):
    out = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_logits_match_transformers(models):
    ours, ref, tok = models
    assert ours.config.num_core_layers == 30 and ours.config.num_key_value_heads == 3
    assert ours.config.tie_word_embeddings and ours.lm_head.weight is ours.embed_tokens.weight
    ids = torch.tensor([tok.encode("The looped transformer reuses its layers to think longer about a question.")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_greedy_text_is_identical(models):
    ours, ref, tok = models
    prompts = [chat(tok, "What is the capital of France?"), chat(tok, "Name three primary colors, briefly.")]
    res = looplm.generate(ours, prompts, max_new_tokens=24, stop_tokens=[tok.eos_token_id])
    for p, mine in zip(prompts, res.new_tokens):
        with torch.no_grad():
            theirs = ref.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id)
        assert mine == theirs[0, len(p):].tolist()
        assert tok.decode(mine).strip()
    assert "Paris" in tok.decode(res.new_tokens[0])


def test_cli_generate_json(smollm2_dir):
    result = CliRunner().invoke(app, ["generate", "--model", str(smollm2_dir), "--prompt", "What is 2+3?",
                                      "--prompt", "Say hi.", "--loops", "2", "--kv", "last",
                                      "--max-new-tokens", "6", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["num_loops"] == 2 and report["kv"]["strategy"] == "last"
    assert report["kv"]["bytes_per_token"] == 2 * 30 * 3 * 64 * 4  # K+V, 30 layers, 3 KV heads, Dh 64, fp32
    for c in report["completions"]:
        assert 1 <= len(c["tokens"]) <= 6 and c["loops_per_token"] == [2] * len(c["tokens"])
    assert report["timings"]["prefill_s"] > 0


def test_cli_bad_input_is_one_clear_line(smollm2_dir):
    runner = CliRunner()
    for args, needle in [(["--kv", "bogus"], "bogus"), (["--loops", "0"], "num_loops"),
                         (["--model", "/no/such/dir"], "/no/such/dir")]:
        result = runner.invoke(app, ["generate", "--model", str(smollm2_dir), "--prompt", "Hi.", *args])
        assert result.exit_code == 2 and needle in result.output and "Traceback" not in result.output


def test_retrofit_with_one_loop_is_the_original_and_with_two_the_duplicated_block(smollm2_dir, models):
    """core=(i, j) loops layers i..j-1 with shared weights ≡ an HF model with those layers copied."""
    _, ref, tok = models
    i, j = 12, 15
    ids = torch.tensor([tok.encode("Looping a block of layers without copying weights.")])
    one = looplm.load(smollm2_dir, core=(i, j), num_loops=1)
    assert (one.config.num_prelude_layers, one.config.num_core_layers, one.config.num_coda_layers) == (12, 3, 15)
    two = looplm.load(smollm2_dir, core=(i, j), num_loops=2)
    assert two.weight_bytes() == one.weight_bytes()  # looping allocates no weights
    cfg = ref.config.to_dict()
    cfg["num_hidden_layers"] = 30 + (j - i)
    dup = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: v for k, v in cfg.items()
                                                                    if k not in ("architectures", "layer_types")}))
    order = list(range(j)) + list(range(i, 30))  # layers 0..14, then 12..29
    sd = {}
    for k, v in ref.state_dict().items():
        if k.startswith("model.layers."):
            continue
        sd[k] = v
    for new, old in enumerate(order):
        for name, v in ref.model.layers[old].state_dict().items():
            sd[f"model.layers.{new}.{name}"] = v
    dup.load_state_dict(sd, strict=False)
    dup.tie_weights()
    dup.eval()
    with torch.no_grad():
        torch.testing.assert_close(one(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(two(ids).logits, dup(ids).logits, atol=1e-4, rtol=1e-4)
        ours = looplm.generate(two, ids, max_new_tokens=12, kv="per_loop", stop_tokens=[]).new_tokens[0]
        theirs = dup.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=None)
    assert ours == theirs[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("core,match", [((0, 31), "0 ≤ i < j ≤ 30"), ((5, 5), r"core=\(5, 5\)"), ((-1, 3), r"core=\(-1, 3\)")])
def test_retrofit_bad_blocks(smollm2_dir, core, match):
    with pytest.raises(ValueError, match=match):
        looplm.load(smollm2_dir, core=core)
