"""Checkpoints: HF Llama-family parity (every RoPE type), looplm round trip, AutoModel registration, bad input."""

import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

import looplm
from conftest import tiny_model

IDS = torch.tensor([[3, 17, 42, 8, 99, 5, 23, 71, 2, 64], [11, 0, 7, 7, 120, 33, 9, 1, 45, 88]])


def hf_tiny(kind: str, tmp_path, **extra):
    """A random tiny HF model of `kind`, saved with save_pretrained (the on-disk layout of this transformers)."""
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)
    common.update(extra)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[kind]
    torch.manual_seed(0)
    model = cls[1](cls[0](**common)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif "bias" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / kind)
    return model, tmp_path / kind


ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 500000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0},
}


@pytest.mark.parametrize("rope", list(ROPES))
def test_llama_logits_match_transformers_for_every_rope_type(rope, tmp_path):
    ref, path = hf_tiny("llama", tmp_path, rope_parameters=dict(ROPES[rope]))
    model = looplm.load(path)
    assert model.config.rope_type == rope
    positions = torch.arange(200)[None].expand(2, -1)
    ids = torch.randint(0, 128, (2, 200), generator=torch.Generator().manual_seed(0))  # long: scaling matters
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids, position_ids=positions).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_qwen2_and_mistral_match_transformers(kind, tmp_path):
    ref, path = hf_tiny(kind, tmp_path, tie_word_embeddings=kind == "qwen2")
    model = looplm.load(path)
    assert model.config.attention_bias == (kind == "qwen2")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, atol=1e-4, rtol=1e-4)
        ours = looplm.generate(model, IDS, max_new_tokens=8, stop_tokens=[]).sequences
        theirs = ref.generate(IDS, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=127)  # 0 is a real token here
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("overrides", [dict(), dict(tie_word_embeddings=True, exit_gate=True, injection="concat",
                                                   norm_style="sandwich", loop_norm=True)])
def test_save_load_round_trip(overrides, tmp_path):
    model = tiny_model(**overrides)
    looplm.save(model, tmp_path / "m")
    again = looplm.load(tmp_path / "m")
    assert again.config == model.config
    with torch.no_grad():
        a, b = model(IDS % 61, return_loops=True), again(IDS % 61, return_loops=True)
    torch.testing.assert_close(a.loop_logits, b.loop_logits, atol=0, rtol=0)
    if model.config.tie_word_embeddings:
        assert again.lm_head.weight is again.embed_tokens.weight
    # overwriting an existing dir is atomic too (no half-written leftovers beside it)
    looplm.save(again, tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_automodel_loads_a_looplm_dir_and_generates_at_static_depth(tmp_path):
    model = tiny_model(exit_gate=True, tie_word_embeddings=True)
    looplm.save(model, tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert isinstance(hf, looplm.LoopLMForCausalLM)
    ids = IDS % 61
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=1e-6, rtol=1e-6)
        for R in (1, 3):
            theirs = hf.generate(ids, max_new_tokens=5, do_sample=False, num_loops=R)
            ours = looplm.generate(model, ids, max_new_tokens=5, num_loops=R, stop_tokens=[]).sequences
            assert theirs.tolist() == ours.tolist()


# --------------------------------------------------------------------------- bad input


def test_missing_checkpoint(tmp_path):
    with pytest.raises(looplm.CheckpointError, match="does-not-exist"):
        looplm.load(tmp_path / "does-not-exist")
    with pytest.raises(looplm.CheckpointError, match="no config.json"):
        looplm.load(tmp_path)


def test_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(looplm.CheckpointError, match="unreadable config"):
        looplm.load(tmp_path)


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(looplm.CheckpointError, match="'gpt2'"):
        looplm.load(tmp_path)


def test_unknown_looplm_config_key(tmp_path):
    looplm.save(tiny_model(), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["num_loopz"] = 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(looplm.CheckpointError, match="num_loopz"):
        looplm.load(tmp_path / "m")


def test_tensors_that_do_not_fit_the_config_are_listed(tmp_path):
    looplm.save(tiny_model(), tmp_path / "m")
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "m" / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    tensors["model.extra.weight"] = torch.zeros(1)
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    with pytest.raises(looplm.CheckpointError) as err:
        looplm.load(tmp_path / "m")
    msg = str(err.value)
    assert "layers.2.mlp.up_proj.weight" in msg and "layers.0.self_attn.q_proj.weight: (3, 3)" in msg
    assert "extra.weight" in msg


def test_pickles_are_refused_and_corrupt_files_named(tmp_path):
    looplm.save(tiny_model(), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(looplm.CheckpointError, match="pickled weights are not loaded"):
        looplm.load(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(looplm.CheckpointError, match="unreadable safetensors"):
        looplm.load(tmp_path / "m")


def test_unsupported_architecture_details(tmp_path):
    _, path = hf_tiny("llama", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    with pytest.raises(looplm.CheckpointError, match="hidden_act='gelu'"):
        looplm.load(path)


def test_automodel_forward_takes_an_exit_policy(tmp_path):
    model = tiny_model(exit_gate=True)
    looplm.save(model, tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS % 61, exit="q:0.5").logits, model(IDS % 61, exit="q:0.5").logits)
        out = hf.generate(IDS % 61, max_new_tokens=3, do_sample=False, exit="q:0.5")
    assert out.shape == (2, 13)


def test_cli_retrofit_saves_a_looplm_dir_recording_the_block(tmp_path):
    from typer.testing import CliRunner

    from looplm.__main__ import app

    ref, path = hf_tiny("llama", tmp_path)
    res = CliRunner().invoke(app, ["retrofit", "--model", str(path), "--core", "1:3", "--loops", "3",
                                   "--save", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    model = looplm.load(tmp_path / "r")
    cfg = model.config
    assert (cfg.num_prelude_layers, cfg.num_core_layers, cfg.num_coda_layers, cfg.num_loops) == (1, 2, 0, 3)
    assert cfg.source["core"] == [1, 3] and cfg.source["path"] == str(path)
    with torch.no_grad():  # one loop is the original model
        torch.testing.assert_close(model(IDS, num_loops=1).logits, ref(IDS).logits, atol=1e-4, rtol=1e-4)
    bad = CliRunner().invoke(app, ["retrofit", "--model", str(path), "--core", "2:9", "--save", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "core=(2, 9)" in bad.output
