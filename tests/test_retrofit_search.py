"""Block search: reuse ≡ naive looped forward, a planted block ranks first, resume, CLI errors."""

import copy
import json
import random

import pytest
import torch
from typer.testing import CliRunner

import looplm
from conftest import SHARED_DATA, byte_tokenizer, tiny_model
from looplm import retrofit_search as rs
from looplm.__main__ import app
from looplm.checkpoint import with_loops
from looplm.evaluation.tasks import Item, Task

TOK = byte_tokenizer()
N = 6  # layers of the tiny model
# a block with a prelude and a coda, told apart from every rival: of the 62 pool items it separates from the
# unlooped model (by MARGIN), each rival gets ≥ 19 wrong (2:4:3 the fewest). With 2:4:2 planted, 2:4:3 got one
# wrong, by 0.055 nats, and none by MARGIN (issue 12)
PLANTED = rs.Candidate(2, 5, 3)


def plain_model(seed: int = 0) -> looplm.LoopedLM:
    """A tiny 6-layer Llama-shaped model over bytes (vocab 257), as loaded from an HF dir: no loops."""
    return tiny_model(seed, vocab_size=257, num_prelude_layers=0, num_core_layers=N, num_coda_layers=0, num_loops=1,
                      max_position_embeddings=256)


def naive_logliks(model, items, cand: rs.Candidate | None) -> list[list[float]]:
    """The reference: the model re-partitioned with core=(i, j), scored by looplm.score at r loops."""
    view = copy.copy(model)
    if cand is not None:
        view.config = with_loops(model.config, core=(cand.start, cand.end))
    ctxs = [it.context for it in items for _ in it.choices]
    conts = [c for it in items for c in it.choices]
    totals = looplm.score(view, ctxs, conts, num_loops=1 if cand is None else cand.loops).totals
    out, k = [], 0
    for it in items:
        out.append(totals[k : k + len(it.choices)])
        k += len(it.choices)
    return out


def random_items(n: int, seed: int) -> list[Item]:
    rng = random.Random(seed)
    word = lambda lo, hi, abc="abcdefghij": "".join(rng.choice(abc) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    return [Item(f"syn/{seed}/{k}", f"Q: {word(5, 14, 'abcdefghij ')}\nA:", [" " + word(1, 4) for _ in range(4)], 0)
            for k in range(n)]


def test_byte_tokenizer_ids_are_the_bytes():
    """So every process sees the same data, whatever its PYTHONHASHSEED (ByteLevel.alphabet()'s order: issue 12)."""
    text = "Q: héllo\tworld\n€ A:"
    assert TOK(text)["input_ids"] == list(text.encode()) and TOK.decode(list(text.encode())) == text


def test_specs_and_candidates_name_bad_values():
    assert rs.parse_ints("1-3,6", what="--sizes") == [1, 2, 3, 6]
    assert rs.parse_ints("0,4", what="--starts", minimum=0) == [0, 4]
    for spec in ("0", "a-b", "3-1", "2,,3"):
        with pytest.raises(ValueError, match="--sizes"):
            rs.parse_ints(spec, what="--sizes")
    cands = rs.make_candidates(N, sizes=[1, 2], loops=[2, 3])
    assert len(cands) == (6 + 5) * 2 and rs.Candidate(4, 6, 3) in cands
    assert rs.make_candidates(N, sizes=[2], loops=[2], starts=[0, 4]) == [rs.Candidate(0, 2, 2), rs.Candidate(4, 6, 2)]
    with pytest.raises(ValueError, match="block size 7"):
        rs.make_candidates(N, sizes=[7], loops=[2])
    with pytest.raises(ValueError, match="got 1"):
        rs.make_candidates(N, sizes=[1], loops=[1])
    with pytest.raises(ValueError, match="start layer 6"):
        rs.make_candidates(N, sizes=[1], loops=[2], starts=[6])


def test_packed_rows_keep_items_and_choices_apart():
    items = rs.encode_items(TOK, random_items(5, seed=1))
    p = rs.pack(items, width=max(it.length for it in items) * 2)
    assert p.ids.shape[0] < len(items)  # several items share a row
    assert sorted(it.id for it in p.items) == sorted(it.id for it in items)
    assert p.mask[:, 0].sum(-1).min() >= 1  # every row attends somewhere: no NaN from padding


def test_reuse_equals_the_naive_looped_forward():
    """score_batch (prelude and loop 1 reused, packed rows) ≡ looplm.load(core=(i, j), num_loops=r) + score."""
    model = plain_model()
    items = rs.encode_items(TOK, random_items(7, seed=2))
    cands = [rs.Candidate(0, 2, 2), rs.Candidate(2, 4, 2), rs.Candidate(2, 4, 3), rs.Candidate(5, 6, 4),
             rs.Candidate(0, 6, 2)]
    got = rs.score_batch(model, rs.pack(items, width=80), cands)
    for key, cand in [(rs.BASE, None)] + [(c.key, c) for c in cands]:
        want = naive_logliks(model, items, cand)
        torch.testing.assert_close(torch.tensor([got[key][it.id] for it in items], dtype=torch.float64),
                                   torch.tensor(want, dtype=torch.float64), atol=1e-4, rtol=1e-4)
    assert got[rs.Candidate(2, 4, 2).key] != got[rs.BASE]  # looping changes the scores


MARGIN = 0.01  # nats: 100× the reuse ≡ naive tolerance, so float noise (threads, packing) flips no decision


def lead(ll: list[float], k: int) -> float:
    """How far choice k's log-likelihood is above the best other choice (< 0: another choice wins)."""
    return ll[k] - max(v for c, v in enumerate(ll) if c != k)


def planted_task(model, cands: list[rs.Candidate], n: int) -> Task:
    """Items whose gold answer is the planted candidate's choice while the unlooped model picks another,
    both by MARGIN; scored by the naive reference, so a search that mis-scores any candidate cannot put
    it first. Every rival gets a probe item wrong by MARGIN, so none can tie the planted block."""
    pool = random_items(600, seed=3)
    enc = rs.encode_items(TOK, pool)
    planted_ll, base_ll = naive_logliks(model, enc, PLANTED), naive_logliks(model, enc, None)
    planted = [max(range(len(r)), key=r.__getitem__) for r in planted_ll]
    keep = [k for k in range(len(pool))
            if lead(planted_ll[k], planted[k]) > MARGIN and lead(base_ll[k], planted[k]) < -MARGIN]
    assert len(keep) >= n, f"only {len(keep)} items separate the planted block from the unlooped model"
    first: list[int] = []  # for every rival, an item it gets wrong goes first (into the probe)
    for c in cands:
        if c == PLANTED:
            continue
        theirs = dict(zip(keep, naive_logliks(model, [enc[k] for k in keep], c)))
        wrong = [k for k in keep if lead(theirs[k], planted[k]) < -MARGIN]
        if not set(wrong) & set(first):
            first.append(wrong[0])  # IndexError: the rival is not told apart from the planted block
    assert len(first) <= 20
    keep = (first + [k for k in keep if k not in first])[:n]
    items = [Item(pool[k].id, pool[k].prompt, pool[k].choices, planted[k]) for k in keep]
    return Task("planted", "mc", items)


def test_search_ranks_a_planted_block_first_and_it_survives_held_out(tmp_path):
    model = plain_model()
    cands = rs.make_candidates(N, sizes=[1, 2, 3], loops=[2, 3])
    task = planted_task(model, cands, 30)
    res = rs.search(model, TOK, task, cands, limit=20, holdout=10, top_k=3, out=tmp_path, batch_size=8,
                    progress=False)
    best = res.ranked[0]
    assert best.candidate == PLANTED and best.acc == 1.0 and res.base_acc == 0.0
    assert best.delta_acc["mean"] == 1.0 and best.delta_acc["significant"]
    assert res.ranked[1].acc < 1.0
    assert best.survives == "yes" and best.held_out["delta"]["mean"] == 1.0
    assert [r.held_out is not None for r in res.ranked[:4]] == [True, True, True, False]
    js, png = rs.write(res, tmp_path)
    data = json.loads(js.read_text())
    assert data["ranked"][0]["candidate"] == {"start": 2, "end": 5, "loops": 3} and png.stat().st_size > 1000


class Interrupt(Exception):
    pass


def test_resume_after_interruption_gives_the_same_results(tmp_path):
    model = plain_model(seed=4)
    cands = rs.make_candidates(N, sizes=[1, 2], loops=[2, 3])
    task = Task("syn", "mc", [Item(it.id, it.prompt, it.choices, k % 4)
                              for k, it in enumerate(random_items(30, seed=5))])
    kw = dict(limit=20, holdout=10, top_k=2, batch_size=4, progress=False)
    whole = rs.search(model, TOK, task, cands, out=tmp_path / "a", **kw)

    def stop_after_two(n):
        if n == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        rs.search(model, TOK, task, cands, out=tmp_path / "b", on_batch=stop_after_two, **kw)
    done = json.loads(next((tmp_path / "b" / ".cache").glob("*.json")).read_text())["results"]
    assert len(done[rs.BASE]) == 12  # three batches of four items were saved
    ran = []
    resumed = rs.search(model, TOK, task, cands, out=tmp_path / "b", on_batch=ran.append, **kw)
    assert len(ran) == 2  # the two probe batches left
    assert resumed.to_dict()["ranked"] == whole.to_dict()["ranked"]
    again = []
    rs.search(model, TOK, task, cands, out=tmp_path / "b", on_batch=again.append, **kw)
    assert again == []  # everything cached: nothing recomputed


def test_cache_for_another_model_is_an_error(tmp_path):
    model = plain_model()
    cands = rs.make_candidates(N, sizes=[1], loops=[2])
    task = Task("syn", "mc", [Item(it.id, it.prompt, it.choices, 0) for it in random_items(4, seed=6)])
    rs.search(model, TOK, task, cands, limit=4, out=tmp_path, progress=False)
    meta = rs.cache_meta(model, "syn", shots=0, seed=0)
    path = rs.cache_file(tmp_path, meta)
    with pytest.raises(ValueError, match="search cache for"):
        rs.ResultCache(path, {**meta, "layers": 7})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    looplm.save(plain_model(), root / "m")
    TOK.save_pretrained(root / "m")
    rows = [{"question": it.prompt.removeprefix("Q: ").removesuffix("\nA:"), "choices": [c.strip() for c in it.choices],
             "answer_index": k % 4} for k, it in enumerate(random_items(12, seed=7))]
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_cli_search_writes_a_table_json_and_heatmap(tiny_dir, tmp_path):
    res = CliRunner().invoke(app, ["retrofit", "search", "--model", str(tiny_dir / "m"), "--task",
                                   f"mc:{tiny_dir / 'mc.jsonl'}", "--limit", "8", "--holdout", "4", "--sizes", "1-2",
                                   "--loops", "2", "--top-k", "2", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "| 1 |" in res.stdout and "11 candidates × 8 probe items" in res.stdout
    data = json.loads((tmp_path / "search.json").read_text())
    assert len(data["ranked"]) == 11 and data["held_out_items"] == 4
    assert (tmp_path / "heatmap.png").stat().st_size > 1000


@pytest.mark.parametrize("args, needle", [
    (["--sizes", "0"], "--sizes '0'"), (["--sizes", "x"], "'x'"), (["--sizes", "7"], "block size 7"),
    (["--loops", "1"], "got 1"), (["--loops", "0"], "--loops '0'"), (["--starts", "6"], "start layer 6"),
    (["--limit", "20"], "limit 20"), (["--metric", "f1"], "'f1'"), (["--task", "gsm8k"], "gen task"),
])
def test_cli_search_bad_input_is_one_clear_line(tiny_dir, tmp_path, args, needle):
    base = ["retrofit", "search", "--model", str(tiny_dir / "m"), "--task", f"mc:{tiny_dir / 'mc.jsonl'}",
            "--limit", "4", "--holdout", "0", "--sizes", "1-2", "--out", str(tmp_path)]
    if "--task" in args:
        if not SHARED_DATA.is_dir():  # the refusal comes after the task's data is found
            pytest.skip(f"shared/data is not present at {SHARED_DATA}")
        base = [a for a in base if a not in ("--task", f"mc:{tiny_dir / 'mc.jsonl'}")] + ["--data-dir", str(SHARED_DATA)]
    res = CliRunner().invoke(app, [*base, *args])
    assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output, res.output


def test_cli_retrofit_without_a_block_says_what_is_missing(tiny_dir):
    res = CliRunner().invoke(app, ["retrofit", "--model", str(tiny_dir / "m")])
    assert res.exit_code == 2 and "--core and --save" in res.output


@pytest.mark.integration
def test_smollm2_reuse_equals_the_looped_model(smollm2_dir):
    """Real weights: the search's scores ≡ looplm.load(dir, core=(i, j), num_loops=r) scored naively."""
    from looplm.evaluation.tasks import load_task

    if not SHARED_DATA.is_dir():
        pytest.skip("shared/data is not present")
    model, tok = looplm.load(smollm2_dir), looplm.load_tokenizer(smollm2_dir)
    items = rs.encode_items(tok, load_task("arc-easy", data_dir=SHARED_DATA, limit=3).items)
    cands = [rs.Candidate(12, 15, 2), rs.Candidate(28, 30, 3)]
    got = rs.score_batch(model, rs.pack(items), cands)
    for c in cands:
        ref = looplm.load(smollm2_dir, core=(c.start, c.end), num_loops=c.loops)
        want = naive_logliks(ref, items, rs.Candidate(c.start, c.end, c.loops))
        torch.testing.assert_close(torch.tensor([got[c.key][it.id] for it in items]), torch.tensor(want),
                                   atol=2e-3, rtol=1e-4)
