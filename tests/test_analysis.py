"""Diagnostics equal the same quantities computed from a plain forward's per-loop outputs."""

import torch

from conftest import tiny_model
from looplm import analysis


def test_loop_diagnostics_match_the_forward():
    model = tiny_model(injection="add", exit_gate=True, loop_norm=True, norm_style="sandwich")
    seqs = [torch.randint(0, 61, (9,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(3)]
    d = analysis.diagnose(model, seqs, num_loops=3)
    assert d.core == (1, 3) and d.tokens == 27 and len(d.layer_rel_change) == 3 and len(d.layer_rel_change[0]) == 2
    rel, cos, ent = torch.zeros(3), torch.zeros(3), torch.zeros(3)
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s])
            out = model(ids, num_loops=3, return_loops=True)
            ctx = model.context(ids, None, None, 3)
            h0 = model.embed(ids, ctx)
            hs = [h0, *out.loop_hidden]
            for r in range(3):
                a, b = hs[r + 1][0], hs[r][0]
                rel[r] += ((a - b).norm(dim=-1) / a.norm(dim=-1)).sum()
                cos[r] += torch.nn.functional.cosine_similarity(a, b, dim=-1).sum()
                logp = torch.log_softmax(out.loop_logits[r, 0], -1)
                ent[r] += -(logp.exp() * logp).sum(-1).sum()
    torch.testing.assert_close(torch.tensor(d.rel_change), rel / 27, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(d.cosine), cos / 27, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(d.entropy), ent / 27, rtol=1e-5, atol=1e-5)


def test_write_json_and_png(tmp_path):
    d = analysis.diagnose(tiny_model(), [[1, 2, 3, 4]], num_loops=2)
    js, png = analysis.write([d, d], tmp_path)
    assert js.is_file() and png.stat().st_size > 1000
