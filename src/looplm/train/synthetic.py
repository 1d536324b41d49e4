"""Synthetic multi-step reasoning tasks whose difficulty is a knob, generated offline from a seed.

    modarith   "3+4*2-5;6-1*6+2="  →  "21"      k operations per expression, applied left to right, mod 7
    chain      "c=b,a=3,b=a,y=5,x=y;cx?" →  "35"   follow k hops of variable assignments (statements shuffled)
               "c=b,a=37,b=a,y=52;c"     →  "37"   one query, two-digit values (digits=2, parts=1)

A problem holds `parts` independent sub-problems of the same difficulty and asks for all answers in a
row, so the answer is several tokens: the first is read out at prefill, the next ones during decoding,
which is where a shared KV cache (`kv="last"`) could cost accuracy.

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


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    difficulty: int
    task: str


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


def _chain(rng: random.Random, k: int, names: list[str], digits: int = 1) -> tuple[list[str], str, str]:
    """k hops: names[k-1] = names[k-2] = ... = names[0] = a number. Returns (statements, query, answer)."""
    value = _number(rng, digits)
    statements = [f"{names[0]}={value}"] + [f"{names[i]}={names[i - 1]}" for i in range(1, k)]
    return statements, names[k - 1], value


def make_problem(task: str, difficulty: int, seed: int, index: int, *, parts: int = 2, distractors: int = 2,
                 variables: int = 26, digits: int = 1) -> Problem:
    """Problem `index` of the stream (task, seed): `parts` sub-problems of `difficulty` steps each.

    chain: variable names are drawn from the first `variables` letters (fewer names: fewer assignment
    tokens to learn); values have `digits` digits; with one part the prompt ends with the query variable
    itself ("...;l" → "42"), so the first answer token is predicted at the query's own position."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}")
    if difficulty < 1:
        raise ValueError(f"difficulty must be ≥ 1, got {difficulty}")
    if parts < 1:
        raise ValueError(f"parts must be ≥ 1, got {parts}")
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
    statements, queries, answers = [], [], []
    for c in range(parts + distractors):
        st, q, a = _chain(rng, difficulty, names[c * difficulty:(c + 1) * difficulty], digits)
        statements += st
        if c < parts:
            queries.append(q)
            answers.append(a)
    rng.shuffle(statements)
    if parts == 1:
        return Problem(",".join(statements) + ";" + queries[0], answers[0], difficulty, task)
    # queries back to back, then "?": answer i is predicted `parts` positions after query i, one fixed offset
    return Problem(",".join(statements) + ";" + "".join(queries) + "?", "".join(answers), difficulty, task)


def problems(task: str, *, seed: int, count: int, difficulties: list[int] | tuple[int, ...], split: str,
             start: int = 0, parts: int = 2, variables: int = 26, digits: int = 1) -> list[Problem]:
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
        p = make_problem(task, d, seed, index, parts=parts, variables=variables, digits=digits)
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
