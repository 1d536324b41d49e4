"""Synthetic tasks: answers checked by an independent solver, determinism, the split, the tokenizer."""

import re

import pytest

from looplm.train import synthetic


def parse_chain(prompt: str) -> tuple[dict[str, str], str]:
    body, _, query = prompt.partition(";")
    pairs = re.findall(r"([a-z])=([a-z]|[0-9]+)", body)
    assert "".join(f"{k}={v}" for k, v in pairs) == body  # statements back to back, nothing else
    return dict(pairs), query


def solve_chain(problem) -> str:
    """The answer from the prompt and the given queries only: each value follows its query."""
    env, query = parse_chain(problem.prompt)
    out = ""
    for text, predicted in problem.segments():
        if predicted:
            v = query
            while not v.isdigit():
                v = env[v]
            out += v
        else:
            query = text
            out += text
    return out


def solve_modarith(prompt: str) -> str:
    out = []
    for expr in prompt.rstrip("=").split(";"):
        value = int(expr[0])
        for op, x in zip(expr[1::2], expr[2::2]):
            value = {"+": value + int(x), "-": value - int(x), "*": value * int(x)}[op] % synthetic.MOD
        out.append(str(value))
    return "".join(out)


@pytest.mark.parametrize("parts,digits,distractors", [(1, 2, 2), (2, 1, 2), (3, 1, 0)])
def test_chain_answers_and_hops(parts, digits, distractors):
    for k in range(1, 5):
        for i in range(20):
            p = synthetic.make_problem("chain", k, 0, i, parts=parts, digits=digits, variables=26,
                                       distractors=distractors)
            assert solve_chain(p) == p.answer
            env, first = parse_chain(p.prompt)
            assert len(env) == (parts + distractors) * k
            queries = [first] + [p.answer[j] for j in p.given]
            assert len(set(queries)) == parts and len(p.answer) == parts * digits + parts - 1
            for q in queries:  # every query is exactly k hops from its value
                hops, v = 0, q
                while not v.isdigit():
                    v, hops = env[v], hops + 1
                assert hops == k


def test_chain_segments():
    p = synthetic.Problem("a=3b=a;b", "3c5", 1, "chain", given=(1,))
    assert p.segments() == [("3", True), ("c", False), ("5", True)]
    assert synthetic.Problem("x", "12", 1, "modarith").segments() == [("12", True)]


def test_modarith_answers():
    for k in range(1, 8):
        for i in range(20):
            p = synthetic.make_problem("modarith", k, 3, i)
            assert solve_modarith(p.prompt) == p.answer
            assert all(e.count("+") + e.count("-") + e.count("*") == k for e in p.prompt.rstrip("=").split(";"))


def test_problems_are_deterministic_and_the_split_is_disjoint():
    a = synthetic.problems("chain", seed=1, count=200, difficulties=[1, 2], split="train", parts=1, digits=2,
                           variables=12)
    b = synthetic.problems("chain", seed=1, count=200, difficulties=[1, 2], split="train", parts=1, digits=2,
                           variables=12)
    assert a == b
    held = synthetic.problems("chain", seed=1, count=200, difficulties=[1, 2], split="heldout", parts=1, digits=2,
                              variables=12)
    assert not {p.prompt for p in a} & {p.prompt for p in held}
    assert all(synthetic.is_heldout(p.prompt) for p in held)
    assert [p.difficulty for p in held[:4]] == [1, 2, 1, 2]


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="unknown task 'sudoku'"):
        synthetic.make_problem("sudoku", 1, 0, 0)
    with pytest.raises(ValueError, match="difficulty must be ≥ 1, got 0"):
        synthetic.make_problem("chain", 0, 0, 0)
    with pytest.raises(ValueError, match="only 5 are allowed"):
        synthetic.make_problem("chain", 4, 0, 0, parts=2, variables=5)
    with pytest.raises(ValueError, match="distractors must be ≥ 0, got -1"):
        synthetic.make_problem("chain", 1, 0, 0, distractors=-1)
    with pytest.raises(ValueError, match="split must be"):
        synthetic.problems("chain", seed=0, count=1, difficulties=[1], split="test")


def test_tokenizer_round_trips_and_keeps_assignments_whole():
    tok = synthetic.build_tokenizer()
    p = synthetic.make_problem("chain", 3, 0, 0, parts=1, digits=2, variables=12)
    ids = tok.encode(p.prompt, add_special_tokens=False)
    assert tok.decode(ids) == p.prompt
    pieces = [tok.decode([i]) for i in ids]
    assert all(len(x) == 3 for x in pieces if "=" in x)  # "v=x" is one token
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1
    m = synthetic.make_problem("modarith", 3, 0, 0)
    assert tok.decode(tok.encode(m.prompt, add_special_tokens=False)) == m.prompt
