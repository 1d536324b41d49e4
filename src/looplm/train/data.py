"""Training data: every batch is a pure function of (seed, step), so a resumed run sees exactly the
batches the uninterrupted run would have seen, and each process of a distributed run takes its own
rows of the same global batch (rows rank, rank + world, ...).

Sources:
    SyntheticSource   problems from `looplm.train.synthetic` (loss on the answer and EOS only)
    TextSource        text files (.txt: the whole file; .jsonl: a `text` field per line) tokenized with the
                      model's Hugging Face tokenizer, joined with EOS and packed into fixed-length blocks
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..losses import IGNORE_INDEX
from . import synthetic


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, S)
    labels: torch.Tensor  # (B, S): labels[t] = the token at t + 1, or IGNORE_INDEX
    difficulty: torch.Tensor | None = None  # (B,) for synthetic problems
    hop_labels: torch.Tensor | None = None  # (H, B, S) chain problems: the target after hop h + 1
    prompt_len: torch.Tensor | None = None  # (B,) synthetic problems: where the answer begins


def _rows(global_batch: int, rank: int, world: int) -> range:
    if global_batch % world:
        raise ValueError(f"batch_size={global_batch} is not divisible by the {world} processes")
    return range(rank, global_batch, world)


def encode_problem(tokenizer, problem: synthetic.Problem) -> tuple[list[int], list[int]]:
    """(ids, labels) of prompt + answer + EOS: only the answer's predicted tokens and EOS are targets (the
    given ones, a chain's later queries, are not)."""
    ids = tokenizer.encode(problem.prompt, add_special_tokens=False)
    targets = [IGNORE_INDEX] * (len(ids) - 1)  # targets[t] is the label at t: token t + 1 or IGNORE_INDEX
    for text, predicted in problem.segments():
        toks = tokenizer.encode(text, add_special_tokens=False)
        ids += toks
        targets += toks if predicted else [IGNORE_INDEX] * len(toks)
    ids.append(tokenizer.eos_token_id)
    targets += [tokenizer.eos_token_id, IGNORE_INDEX]
    return ids, targets


def answer_starts(labels: list[int]) -> list[int]:
    """Where each answer is predicted: the first position of every run of targets in `encode_problem`'s labels
    (given tokens break the runs; EOS joins the last one). The first is the prompt's last position."""
    return [t for t, y in enumerate(labels) if y != IGNORE_INDEX and (t == 0 or labels[t - 1] == IGNORE_INDEX)]


def encode_hops(tokenizer, problem: synthetic.Problem, labels: list[int], hops: int) -> list[list[int]]:
    """Intermediate targets (hops rows, each like `labels`): row h holds, at the position of each answer's first
    token, the variable its query reaches after h + 1 hops (the answer itself once the hops are done)."""
    rows = [list(labels) for _ in range(hops)]
    for t, path in zip(answer_starts(labels), problem.paths):
        for h, var in enumerate(path[:hops]):
            rows[h][t] = tokenizer.convert_tokens_to_ids(var)
    return rows


class SyntheticSource:
    """Problems of `task` with difficulty drawn uniformly from `difficulties`, training split only."""

    def __init__(self, tokenizer, *, task: str, difficulties: list[int], seq_len: int, seed: int, parts: int = 2,
                 variables: int = 26, digits: int = 1, distractors: int = 2):
        if task not in synthetic.TASKS:
            raise ValueError(f"data.task={task!r} is not one of {list(synthetic.TASKS)}")
        if not difficulties or min(difficulties) < 1:
            raise ValueError(f"data.difficulties must be a non-empty list of integers ≥ 1, got {difficulties}")
        self.tokenizer, self.task, self.difficulties = tokenizer, task, list(difficulties)
        self.seq_len, self.seed, self.parts, self.variables, self.digits = seq_len, seed, parts, variables, digits
        self.distractors = distractors
        longest = synthetic.make_problem(task, max(difficulties), seed, 0, parts=parts, variables=variables,
                                         digits=digits, distractors=distractors)
        n = len(encode_problem(tokenizer, longest)[0])
        if n > seq_len:
            raise ValueError(f"data.seq_len={seq_len} is shorter than a difficulty-{max(difficulties)} problem ({n} tokens)")

    def batch(self, step: int, batch_size: int, *, rank: int = 0, world: int = 1) -> Batch:
        pad = self.tokenizer.pad_token_id
        ids = torch.full((batch_size // world, self.seq_len), pad, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        diff = torch.zeros(batch_size // world, dtype=torch.long)
        H = max(self.difficulties)
        prompt_len = torch.zeros(batch_size // world, dtype=torch.long)
        hop_labels = torch.full((H, *ids.shape), IGNORE_INDEX, dtype=torch.long) if self.task == "chain" else None
        for i, row in enumerate(_rows(batch_size, rank, world)):
            rng = random.Random(f"batch:{self.seed}:{step}:{row}")
            while True:  # draw until the prompt falls in the training split (9 in 10 do)
                d = rng.choice(self.difficulties)
                p = synthetic.make_problem(self.task, d, self.seed, rng.getrandbits(48), parts=self.parts,
                                           variables=self.variables, digits=self.digits,
                                           distractors=self.distractors)
                if not synthetic.is_heldout(p.prompt):
                    break
            x, y = encode_problem(self.tokenizer, p)
            ids[i, : len(x)] = torch.tensor(x)
            labels[i, : len(y)] = torch.tensor(y)
            diff[i] = d
            prompt_len[i] = answer_starts(y)[0] + 1
            if hop_labels is not None:
                hop_labels[:, i, : len(y)] = torch.tensor(encode_hops(self.tokenizer, p, y, H))
        return Batch(ids, labels, diff, hop_labels, prompt_len)


class TextSource:
    """Text files / JSONL packed into blocks of seq_len + 1 tokens; a batch samples blocks by (seed, step)."""

    def __init__(self, tokenizer, *, paths: list[str], seq_len: int, seed: int, text_field: str = "text",
                 split: str = "all", val_fraction: float = 0.0):
        """split "train" / "val": the first (1 − val_fraction) / the last val_fraction of the blocks."""
        if not paths:
            raise ValueError("data.paths is empty: give at least one .txt or .jsonl file")
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no EOS token to separate documents")
        stream: list[int] = []
        for p in map(Path, paths):
            if not p.is_file():
                raise ValueError(f"data path {str(p)!r} does not exist")
            for doc in _documents(p, text_field):
                stream += tokenizer.encode(doc, add_special_tokens=False) + [eos]
        n_blocks = (len(stream) - 1) // seq_len
        if n_blocks < 1:
            raise ValueError(f"{paths}: {len(stream)} tokens are fewer than one block of seq_len={seq_len} + 1")
        first = 0
        if split != "all":
            if not 0 < val_fraction < 1:
                raise ValueError(f"data.val_fraction must be in (0, 1) to hold out text, got {val_fraction}")
            n_val = max(1, int(n_blocks * val_fraction))
            if n_val >= n_blocks:
                raise ValueError(f"{paths}: {n_blocks} blocks are too few to hold out {val_fraction:.0%}")
            first, n_blocks = (0, n_blocks - n_val) if split == "train" else (n_blocks - n_val, n_val)
        self.blocks = torch.tensor(stream[first * seq_len : (first + n_blocks) * seq_len + 1], dtype=torch.long)
        self.seq_len, self.seed, self.num_blocks = seq_len, seed, n_blocks

    def batch(self, step: int, batch_size: int, *, rank: int = 0, world: int = 1) -> Batch:
        g = torch.Generator().manual_seed(hash((self.seed, step)) & 0x7FFF_FFFF)
        starts = torch.randint(0, self.num_blocks, (batch_size,), generator=g) * self.seq_len
        rows = starts[list(_rows(batch_size, rank, world))]
        idx = rows[:, None] + torch.arange(self.seq_len + 1)  # (B, S + 1)
        chunk = self.blocks[idx]
        return Batch(chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous())


def _documents(path: Path, text_field: str):
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)[text_field]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{path}:{n}: expected a JSON object with a {text_field!r} field") from None
                yield str(doc)
    else:
        yield path.read_text(encoding="utf-8")
