"""Synthetic multi-step reasoning tasks whose difficulty is a knob, generated offline from a seed.

    modarith   "3+4*2-5;6-1*6+2="  →  "21"        k operations per expression, applied left to right, mod 7
    chain      "c=ba=3b=ay=5x=y;c" →  "3x5"       follow k hops of variable assignments (statements shuffled)
               "c=ba=37b=ay=52;c"  →  "37"        one query, two-digit values (digits=2, parts=1)

A problem holds `parts` independent sub-problems of the same difficulty. modarith asks for all answers in
a row. chain asks its queries in turns: the prompt ends with the first query, the answer is the first
value, then the next query, its value, and so on ("3x5" above: "x" is *given*, `Problem.given` lists it,
and is not predicted). The first value is read out at prefill, the later ones in decode steps that read
the prompt through the KV cache, which is where a shared cache (`kv="last"`) could cost accuracy.

Every problem is a pure function of (task, seed, index): `make_problem` seeds its own `random.Random`
with a string, so the same call gives the same problem on any machine and Python version. The split
is by a hash of the prompt text: a held-out problem never occurs in training, whatever the seeds.
"""

from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass

TASKS = ("modarith", "chain")
OPS = "+-*"
MOD = 7
VARS = string.ascii_lowercase
# one token per character; <pad> = 0, <eos> = 1 (the tokenizer file is built from this list)
SPECIALS = ("<pad>", "<eos>")
ALPHABET = string.digits + VARS + "+-*=,;?:. "
HELDOUT_BUCKETS = 10  # 1 in 10 prompt hashes is held out
# the knobs of a task's format beyond (task, difficulty): recipes, the trainer's evaluation, the bundled
# model's looplm_task.json and the demo all pass these, by name, to make_problem / problems
FORMAT_OPTIONS = ("parts", "variables", "digits", "distractors")


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    difficulty: int
    task: str
    given: tuple[int, ...] = ()  # indices of answer characters that are given (the next queries), not predicted
    # chain: per predicted answer, the variables reached after hops 1 .. k − 1 (the k-th hop reaches the value)
    paths: tuple[tuple[str, ...], ...] = ()

    def segments(self) -> list[tuple[str, bool]]:
        """The answer as maximal runs (text, predicted?): "3x5" with given=(1,) → [("3", True), ("x", False), ("5", True)]."""
        out: list[tuple[str, bool]] = []
        for i, ch in enumerate(self.answer):
            pred = i not in self.given
            if out and out[-1][1] == pred:
                out[-1] = (out[-1][0] + ch, pred)
            else:
                out.append((ch, pred))
        return out


def is_heldout(prompt: str) -> bool:
    """The split: a stable hash of the prompt text (independent of seeds, processes and Python's hash)."""
    return hashlib.sha256(prompt.encode()).digest()[0] % HELDOUT_BUCKETS == 0


def _modarith(rng: random.Random, k: int) -> tuple[str, str]:
    # mod 7 with multipliers 1..6: every operation is a bijection of Z_7, so the answer depends on all
    # k steps (mod 10, "*0" or "*5" would erase the past and make a deep problem shallow)
    value = rng.randrange(MOD)
    text = str(value)
    for _ in range(k):
        op = rng.choice(OPS)
        x = rng.randrange(1, MOD) if op == "*" else rng.randrange(MOD)
        value = (value + x if op == "+" else value - x if op == "-" else value * x) % MOD
        text += f"{op}{x}"
    return text, str(value)


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits))


def _chain(rng: random.Random, k: int, names: list[str], digits: int = 1) -> tuple[list[str], str, str, tuple[str, ...]]:
    """k hops: names[k-1] = names[k-2] = ... = names[0] = a number.
    Returns (statements, query, answer, the variables reached after hops 1 .. k − 1)."""
    value = _number(rng, digits)
    statements = [f"{names[0]}={value}"] + [f"{names[i]}={names[i - 1]}" for i in range(1, k)]
    return statements, names[k - 1], value, tuple(names[k - 2 :: -1]) if k > 1 else ()


def make_problem(task: str, difficulty: int, seed: int, index: int, *, parts: int = 2, distractors: int = 2,
                 variables: int = 26, digits: int = 1) -> Problem:
    """Problem `index` of the stream (task, seed): `parts` sub-problems of `difficulty` steps each.

    chain: variable names are drawn from the first `variables` letters (fewer names: fewer assignment
    tokens to learn); values have `digits` digits; statements are written back to back (each "v=x" is one
    token of the synthetic tokenizer, so no separator is needed). The prompt ends with the first query
    variable itself ("...;l" → "42"), so each value is predicted at its query's own position; further
    queries follow each value in the answer, given (`Problem.given`)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}")
    if difficulty < 1:
        raise ValueError(f"difficulty must be ≥ 1, got {difficulty}")
    if parts < 1:
        raise ValueError(f"parts must be ≥ 1, got {parts}")
    if distractors < 0:
        raise ValueError(f"distractors must be ≥ 0, got {distractors}")
    rng = random.Random(f"{task}:{seed}:{index}:{difficulty}")
    if task == "modarith":
        pieces = [_modarith(rng, difficulty) for _ in range(parts)]
        return Problem(";".join(p for p, _ in pieces) + "=", "".join(a for _, a in pieces), difficulty, task)
    if not 1 <= variables <= len(VARS):
        raise ValueError(f"variables must be in [1, {len(VARS)}], got {variables}")
    # distractors are whole chains of the same length: had they been bare constants, "the constant whose
    # name is referenced" would reveal the answer without following a single hop
    need = (parts + distractors) * difficulty
    if need > variables:
        raise ValueError(f"chain: ({parts} parts + {distractors} distractor chains) × {difficulty} hops need {need} "
                         f"variables; only {variables} are allowed")
    names = rng.sample(VARS[:variables], need)
    statements, queries, answers, paths = [], [], [], []
    for c in range(parts + distractors):
        st, q, a, path = _chain(rng, difficulty, names[c * difficulty:(c + 1) * difficulty], digits)
        statements += st
        if c < parts:
            queries.append(q)
            answers.append(a)
            paths.append(path)
    rng.shuffle(statements)
    answer, given = answers[0], []
    for q, a in zip(queries[1:], answers[1:]):
        given.append(len(answer))
        answer += q + a
    return Problem("".join(statements) + ";" + queries[0], answer, difficulty, task, tuple(given), tuple(paths))


def problems(task: str, *, seed: int, count: int, difficulties: list[int] | tuple[int, ...], split: str,
             start: int = 0, parts: int = 2, variables: int = 26, digits: int = 1,
             distractors: int = 2) -> list[Problem]:
    """`count` problems of the split ("train" or "heldout"), difficulties cycling through the list.

    Candidates are drawn at indices start, start+1, ... and kept when their prompt hash falls in the split.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if not difficulties:
        raise ValueError("difficulties is empty")
    out: list[Problem] = []
    index = start
    while len(out) < count:
        d = difficulties[len(out) % len(difficulties)]
        p = make_problem(task, d, seed, index, parts=parts, variables=variables, digits=digits,
                         distractors=distractors)
        index += 1
        if is_heldout(p.prompt) == (split == "heldout"):
            out.append(p)
    return out


STATEMENTS = tuple(f"{v}={x}" for v in VARS for x in string.digits + VARS)
STATEMENT_PATTERN = "[a-z]=[a-z0-9]|."


def build_tokenizer():
    """A `PreTrainedTokenizerFast` (pad=0, eos=1), saved with the model: one token per character of ALPHABET,
    and one token per assignment "v=x" (26 × 36 words), so that one hop of a chain is one lookup of one
    token (the key and the value live in the same embedding) — the loops do the hops, not the tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((*SPECIALS, *ALPHABET, *STATEMENTS))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(STATEMENT_PATTERN), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")
