"""Ouro checkpoints: `looplm.load` of an Ouro-format dir matches the Ouro forward written from its equations.

Pins down, against a naive reference that shares no code with looplm:
- the sandwich layer (a second RMSNorm on each sublayer's output) and `model.norm` after every loop,
  whose output is the next loop's input, the exit gate's input and the head's input (no second norm);
- RoPE (rotate-half, the same positions in every loop), GQA head mapping, causal attention;
- the exit pdf p(r) = λ_r S_{r-1} (r < R), p(R) = S_{R-1}, for R = total_ut_steps and a smaller R;
- the per_loop KV cache: prefill + one-token decode steps reproduce the full forward;
- bad Ouro dirs (missing tensor, wrong shape, wrong model_type) raise CheckpointError naming the problem.
"""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import looplm

CFG = {
    "model_type": "ouro", "architectures": ["OuroForCausalLM"], "total_ut_steps": 3,
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 97,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 128,
    "tie_word_embeddings": False, "hidden_act": "silu",
}
TOL = dict(atol=1e-5, rtol=1e-5)


def ouro_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    D, I, V = CFG["hidden_size"], CFG["intermediate_size"], CFG["vocab_size"]
    Dh = D // CFG["num_attention_heads"]
    KV = CFG["num_key_value_heads"] * Dh

    def lin(*shape):
        return 0.2 * torch.randn(*shape, generator=g)

    def norm():
        return 1 + 0.1 * torch.randn(D, generator=g)

    t = {"model.embed_tokens.weight": torch.randn(V, D, generator=g)}
    for n in range(CFG["num_hidden_layers"]):
        p = f"model.layers.{n}."
        t[p + "self_attn.q_proj.weight"] = lin(D, D)
        t[p + "self_attn.k_proj.weight"] = lin(KV, D)
        t[p + "self_attn.v_proj.weight"] = lin(KV, D)
        t[p + "self_attn.o_proj.weight"] = lin(D, D)
        t[p + "mlp.gate_proj.weight"] = lin(I, D)
        t[p + "mlp.up_proj.weight"] = lin(I, D)
        t[p + "mlp.down_proj.weight"] = lin(D, I)
        for name in ("input_layernorm", "input_layernorm_2", "post_attention_layernorm", "post_attention_layernorm_2"):
            t[p + name + ".weight"] = norm()
    t["model.norm.weight"] = norm()
    t["model.early_exit_gate.weight"] = lin(1, D)
    t["model.early_exit_gate.bias"] = 0.2 * torch.randn(1, generator=g)
    t["lm_head.weight"] = lin(V, D)
    return t


def write_dir(path, tensors, config=CFG):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"))
    return path


# --------------------------------------------------------------------------- naive reference


def ref_forward(t: dict[str, torch.Tensor], ids: torch.Tensor, R: int):
    """Per-loop logits (R, B, S, V) and exit pdf (B, S, R), straight from Ouro's equations."""
    eps, H, Hkv = CFG["rms_norm_eps"], CFG["num_attention_heads"], CFG["num_key_value_heads"]
    D = CFG["hidden_size"]
    Dh = D // H
    B, S = ids.shape

    def rms(x, w):
        x = x.float()
        return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))

    inv_freq = 1.0 / CFG["rope_theta"] ** (torch.arange(0, Dh, 2).float() / Dh)
    freqs = torch.arange(S).float()[:, None] * inv_freq[None, :]  # (S, Dh/2)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()

    def rope(x):  # (B, S, Dh)
        x1, x2 = x[..., : Dh // 2], x[..., Dh // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    causal = torch.ones(S, S).tril().bool()

    def attn(x, p):
        q = x @ t[p + "q_proj.weight"].T
        k = x @ t[p + "k_proj.weight"].T
        v = x @ t[p + "v_proj.weight"].T
        heads = []
        for h in range(H):
            kh = h // (H // Hkv)
            qh = rope(q[..., h * Dh : (h + 1) * Dh])
            kk = rope(k[..., kh * Dh : (kh + 1) * Dh])
            vv = v[..., kh * Dh : (kh + 1) * Dh]
            scores = (qh @ kk.transpose(-1, -2)) / math.sqrt(Dh)
            scores = scores.masked_fill(~causal, float("-inf"))
            heads.append(torch.softmax(scores, -1) @ vv)
        return torch.cat(heads, -1) @ t[p + "o_proj.weight"].T

    def mlp(x, p):
        return (F.silu(x @ t[p + "gate_proj.weight"].T) * (x @ t[p + "up_proj.weight"].T)) @ t[p + "down_proj.weight"].T

    x = t["model.embed_tokens.weight"][ids]
    logits, lams = [], []
    for _ in range(R):
        for n in range(CFG["num_hidden_layers"]):
            p = f"model.layers.{n}."
            h = x + rms(attn(rms(x, t[p + "input_layernorm.weight"]), p + "self_attn."), t[p + "input_layernorm_2.weight"])
            m = mlp(rms(h, t[p + "post_attention_layernorm.weight"]), p + "mlp.")
            x = h + rms(m, t[p + "post_attention_layernorm_2.weight"])
        x = rms(x, t["model.norm.weight"])
        logits.append(x @ t["lm_head.weight"].T)
        lams.append(torch.sigmoid(x @ t["model.early_exit_gate.weight"][0] + t["model.early_exit_gate.bias"][0]))
    pdf, survive = [], torch.ones(B, S)
    for r, lam in enumerate(lams):
        pdf.append(survive if r == R - 1 else lam * survive)
        survive = survive * (1 - lam)
    return torch.stack(logits), torch.stack(pdf, -1)


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def ouro(tmp_path_factory):
    tensors = ouro_tensors()
    model = looplm.load(write_dir(tmp_path_factory.mktemp("ouro") / "ckpt", tensors))
    ids = torch.randint(0, CFG["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(1))
    return model, tensors, ids


def test_config_maps_to_ouro_pipeline(ouro):
    cfg = ouro[0].config
    assert (cfg.norm_style, cfg.loop_norm, cfg.exit_gate, cfg.num_loops) == ("sandwich", True, True, 3)
    assert cfg.num_core_layers == 2 and cfg.num_prelude_layers == cfg.num_coda_layers == 0


@pytest.mark.parametrize("R", [3, 2, 1])
def test_forward_matches_reference(ouro, R):
    model, tensors, ids = ouro
    ref_logits, ref_pdf = ref_forward(tensors, ids, R)
    with torch.no_grad():
        out = model(ids, num_loops=R, return_loops=True)
    assert out.loop_logits.shape == (R, 2, 7, CFG["vocab_size"])
    torch.testing.assert_close(out.loop_logits, ref_logits, **TOL)
    torch.testing.assert_close(out.logits, ref_logits[-1], **TOL)
    torch.testing.assert_close(out.exit_pdf, ref_pdf, **TOL)
    torch.testing.assert_close(out.exit_pdf.sum(-1), torch.ones(2, 7), **TOL)


def test_default_num_loops_is_total_ut_steps(ouro):
    model, tensors, ids = ouro
    with torch.no_grad():
        out = model(ids)
    torch.testing.assert_close(out.logits, ref_forward(tensors, ids, 3)[0][-1], **TOL)


@pytest.mark.parametrize("R", [3, 2])
def test_kv_cached_decode_matches_reference(ouro, R):
    model, tensors, ids = ouro
    cache = looplm.KVCache(model.config, batch_size=2, max_len=7, num_loops=R, strategy="per_loop")
    with torch.no_grad():
        chunks = [model(ids[:, :4], num_loops=R, cache=cache).logits]
        for i in range(4, 7):
            chunks.append(model(ids[:, i : i + 1], num_loops=R, cache=cache).logits)
    assert cache.length == 7
    torch.testing.assert_close(torch.cat(chunks, 1), ref_forward(tensors, ids, R)[0][-1], **TOL)


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    tensors = ouro_tensors()
    del tensors["model.layers.1.input_layernorm_2.weight"]
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 32)  # (16, 32) expected
    with pytest.raises(looplm.CheckpointError, match=r"missing.*layers\.1\.input_layernorm_2\.weight") as err:
        looplm.load(write_dir(tmp_path / "ckpt", tensors))
    assert re.search(r"wrong shapes.*layers\.0\.self_attn\.k_proj\.weight: \(32, 32\) vs config \(16, 32\)",
                     str(err.value))


def test_missing_exit_gate_is_named(tmp_path):
    tensors = ouro_tensors()
    del tensors["model.early_exit_gate.bias"]
    with pytest.raises(looplm.CheckpointError, match=r"early_exit_gate\.bias"):
        looplm.load(write_dir(tmp_path / "ckpt", tensors))


def test_unsupported_model_type_is_named(tmp_path):
    with pytest.raises(looplm.CheckpointError, match="gpt_neox"):
        looplm.load(write_dir(tmp_path / "ckpt", ouro_tensors(), {**CFG, "model_type": "gpt_neox"}))
