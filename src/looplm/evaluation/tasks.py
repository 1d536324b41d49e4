"""Benchmark tasks read from local files and turned into prompts. Knows nothing about models.

    arc-easy, arc-challenge   mc   "Question: {q}\\nAnswer:", choices " {choice}"  (arc/ARC-*.test.jsonl)
    mmlu, mmlu:<subject>      mc   standard MMLU prompt, choices " A".." D"; val split, shots from dev
    gsm8k                     gen  "Question: {q}\\nAnswer:"; test split, shots from train; numeric compare
    bbh, bbh:<task>           gen  "Q: {input}\\nA:"; the first `shots` examples of a file are the
                                   demonstrations, the rest are evaluated; normalised exact match
    tinystories, shakespeare  ppl  TinyStories split on blank lines; Shakespeare in ~2000-char chunks
    text:<path>               ppl  any UTF-8 file, ~2000-char chunks on line boundaries
    mc:<path>                 mc   JSONL {"question","choices","answer_index"} or CSV with header
                                   question,choices(separated by '|'),answer_index; choices as written
    gen:<path>                gen  JSONL {"prompt" or "question", "answer"}; normalised exact match,
                                   numeric compare when both sides are numbers

Built-in tasks read `data_dir` (the shared/data folder, layout in its README); user files are read
from the path given. Few-shot demonstrations are joined with "\\n\\n", sampled per item with
`random.Random(seed)` and never include the evaluated item; `limit` keeps the first N items in file
order. `shots` is ignored for ppl tasks. Every problem in the input raises `TaskError` naming the file
(and line) instead of skipping rows.

Multiple choice follows lm-evaluation-harness (lm_eval/api/task.py, `multiple_choice`) so the two report the
same numbers for the same items: each choice is scored as the continuation `target_delimiter + choice` with
the choice exactly as written (no stripping: "$1 " keeps its space), `accuracy` takes the highest summed
log-likelihood and `accuracy_norm` the highest log-likelihood per character of the choice itself
(`len(choice)`, without the delimiter); see `mc_predictions` and issue 12.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASK_NAMES = [
    "arc-easy", "arc-challenge", "mmlu", "mmlu:<subject>", "gsm8k", "bbh", "bbh:<task>",
    "tinystories", "shakespeare", "text:<path>", "mc:<path>", "gen:<path>",
]
SEP = "\n\n"
QA_STOP = ["\n\nQuestion:", "Question:"]
CHUNK_CHARS = 2000


class TaskError(ValueError):
    """A task name, data file or option that cannot be used; the message names the problem."""


@dataclass
class Item:
    id: str
    prompt: str  # full prompt text incl. few-shot examples (no chat template applied)
    choices: list[str] | None = None  # mc: continuations to score: target_delimiter + the choice as written
    answer: int | str | None = None  # mc: index of the correct choice; gen: gold string; ppl: None
    target_delimiter: str = " "  # mc: what each continuation starts with (lm-eval's target_delimiter)


@dataclass
class Task:
    name: str
    kind: str  # "mc" | "gen" | "ppl"
    items: list[Item]
    stop: list[str] = field(default_factory=list)
    max_new_tokens: int = 256
    source: str = ""
    answer_type: str = "text"  # gen: "number" (GSM8K-style extraction) or "text" (first line)

    def extract(self, completion: str) -> str:
        """The answer in a model completion: cut at the first stop string, then the number
        (answer_type "number") or the first non-empty line."""
        for s in self.stop:
            completion = completion.split(s, 1)[0]
        if self.answer_type == "number":
            return gsm8k_answer(completion) or ""
        return next((line.strip() for line in completion.splitlines() if line.strip()), "")

    def is_correct(self, item: Item, completion: str) -> bool:
        if self.kind != "gen":
            raise TaskError(f"is_correct() is for generation tasks; {self.name!r} is a {self.kind} task")
        return answers_match(self.extract(completion), str(item.answer))


# --- answers --------------------------------------------------------------------------------------

_NUM = re.compile(r"-?\$?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")
_PLAIN_NUM = re.compile(r"-?\d+(?:\.\d+)?")


def _normalise_number(s: str) -> str:
    s = s.replace("$", "").replace(",", "")
    neg, s = s.startswith("-"), s.lstrip("-")
    whole, _, frac = s.partition(".")
    out = (whole.lstrip("0") or "0") + ("." + frac.rstrip("0") if frac.rstrip("0") else "")
    return "-" + out if neg and out != "0" else out


def gsm8k_answer(text: str) -> str | None:
    """The number after '####' if there is one, else the last number in `text`, normalised
    ('$1,234.' -> '1234', '5.0' -> '5'); None if `text` has no number."""
    if "####" in text:
        m = _NUM.search(text.split("####", 1)[1])
        if m:
            return _normalise_number(m.group())
    found = _NUM.findall(text)
    return _normalise_number(found[-1]) if found else None


def _as_number(s: str) -> str | None:
    t = s.strip().rstrip(".").replace(",", "").replace("$", "")
    return _normalise_number(t) if _PLAIN_NUM.fullmatch(t) else None


def _normalise_text(s: str) -> str:
    return " ".join(s.split()).rstrip(".").strip().lower()


def answers_match(pred: str, gold: str) -> bool:
    """Exact match after normalisation (case, whitespace, a trailing '.'); numbers compare by value."""
    if _normalise_text(pred) == _normalise_text(gold):
        return True
    a, b = _as_number(pred), _as_number(gold)
    return a is not None and a == b


def mc_predictions(item: Item, lls: list[float]) -> tuple[int, int]:
    """(pred, pred_norm) for one mc item from its choices' summed log-likelihoods, as lm-eval's
    `multiple_choice` process_results: argmax of `lls`, and argmax of `lls / len(choice)` where choice is
    the continuation without the delimiter, counted in characters (not bytes). Ties go to the first
    choice (np.argmax)."""
    assert item.choices is not None and len(lls) == len(item.choices)
    lengths = [len(c.removeprefix(item.target_delimiter)) for c in item.choices]
    norm = [ll / max(1, n) for ll, n in zip(lls, lengths)]  # lm-eval divides by 0 for an empty choice
    return max(range(len(lls)), key=lls.__getitem__), max(range(len(lls)), key=norm.__getitem__)


# --- reading files --------------------------------------------------------------------------------


def default_data_dir() -> Path | None:
    """`../shared/data` or `./shared/data` relative to the working directory, whichever exists."""
    for cand in (Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data"):
        if cand.is_dir():
            return cand
    return None


def _err(path: Path, line: int | str, msg: str) -> TaskError:
    return TaskError(f"{path}:{line}: {msg}")


def _need(path: Path, task: str) -> Path:
    if not path.exists():
        raise TaskError(f"task {task!r}: data file not found: expected {path} "
                        "(pass --data-dir / data_dir= pointing at the shared/data folder)")
    return path


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not valid UTF-8 (byte {e.start})") from None


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for n, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _err(path, n, f"not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise _err(path, n, f"expected a JSON object, got {type(obj).__name__}")
        rows.append((n, obj))
    if not rows:
        raise TaskError(f"{path}: no rows")
    return rows


def _get(row: dict[str, Any], key: str, kind: type, path: Path, n: int | str) -> Any:
    if key not in row:
        raise _err(path, n, f"missing field {key!r}")
    v = row[key]
    if (type(v) is not int) if kind is int else not isinstance(v, kind):
        raise _err(path, n, f"field {key!r} should be {kind.__name__}, got {type(v).__name__}: {v!r}")
    return v


def _check_mc(choices: Any, answer: int, path: Path, n: int | str) -> list[str]:
    if not choices or not all(isinstance(c, str) and c.strip() for c in choices):
        raise _err(path, n, f"'choices' must be a non-empty list of non-empty strings, got {choices!r}")
    if not 0 <= answer < len(choices):
        raise _err(path, n, f"answer_index {answer} out of range for {len(choices)} choices")
    return list(choices)  # as written: lm-eval scores " " + choice without stripping it (issue 12)


McRecord = tuple[str, str, list[str], int]  # id, question, choices, answer index


def _read_mc(path: Path, prefix: str) -> list[McRecord]:
    if path.suffix.lower() != ".csv":
        out = []
        for n, row in _read_jsonl(path):
            q = _get(row, "question", str, path, n)
            choices = _check_mc(_get(row, "choices", list, path, n), _get(row, "answer_index", int, path, n), path, n)
            out.append((str(row.get("id", f"{prefix}/{len(out)}")), q, choices, row["answer_index"]))
        return out
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    missing = {"question", "choices", "answer_index"} - set(reader.fieldnames or [])
    if missing:
        raise _err(path, 1, f"CSV header must name question,choices,answer_index (missing {sorted(missing)})")
    out = []
    for row in reader:
        n = reader.line_num
        if None in row or None in row.values():
            raise _err(path, n, "wrong number of columns")
        try:
            answer = int(row["answer_index"])
        except ValueError:
            raise _err(path, n, f"answer_index is not an integer: {row['answer_index']!r}") from None
        choices = _check_mc(row["choices"].split("|"), answer, path, n)
        out.append((f"{prefix}/{len(out)}", row["question"], choices, answer))
    if not out:
        raise TaskError(f"{path}: no rows")
    return out


def _read_mmlu(path: Path) -> list[tuple[str, list[str], int]]:
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    out = []
    for row in reader:
        if not row:
            continue
        if len(row) != 6:
            raise _err(path, reader.line_num, f"expected 6 columns (question,A,B,C,D,answer), got {len(row)}")
        if row[5].strip() not in ("A", "B", "C", "D"):
            raise _err(path, reader.line_num, f"answer must be a letter A-D, got {row[5]!r}")
        out.append((row[0], row[1:5], "ABCD".index(row[5].strip())))
    return out


# --- building prompts -----------------------------------------------------------------------------


def _with_shots(queries: list[str], demos: list[str], shots: int, seed: int, same_pool: bool,
                what: str, header: str = "") -> list[str]:
    """Prefix query i with `shots` demonstrations sampled from `demos`; when the demonstrations are
    the evaluated items themselves (`same_pool`), demos[i] is never used for query i."""
    available = len(demos) - (1 if same_pool else 0)
    if shots > available:
        raise TaskError(f"{what}: shots={shots} but only {available} demonstrations are available")
    rng, out = random.Random(seed), []
    for i, q in enumerate(queries):
        if shots and same_pool:
            picks = [j + (j >= i) for j in rng.sample(range(len(demos) - 1), shots)]
        else:
            picks = rng.sample(range(len(demos)), shots) if shots else []
        out.append(header + SEP.join([demos[j] for j in picks] + [q]))
    return out


def _mc_task(name: str, recs: list[McRecord], source: Path, shots: int, seed: int) -> Task:
    queries = [f"Question: {q}\nAnswer:" for _, q, _, _ in recs]
    demos = [f"{p} {c[a]}" for p, (_, _, c, a) in zip(queries, recs)]
    prompts = _with_shots(queries, demos, shots, seed, True, f"{name} ({source})")
    items = [Item(i, p, [" " + c for c in ch], a) for p, (i, _, ch, a) in zip(prompts, recs)]
    return Task(name, "mc", items, source=str(source))


def _mmlu_query(question: str, choices: list[str]) -> str:
    return f"{question}\n" + "".join(f"{L}. {x}\n" for L, x in zip("ABCD", choices)) + "Answer:"


def _mmlu_task(name: str, root: Path, subject: str | None, shots: int, seed: int) -> Task:
    val_dir = _need(root / "mmlu" / "val", name)
    subjects = sorted(p.name[: -len("_val.csv")] for p in val_dir.glob("*_val.csv"))
    if subject is not None and subject not in subjects:
        raise TaskError(f"unknown MMLU subject {subject!r} (in {val_dir}); known: {', '.join(subjects)}")
    items = []
    for subj in [subject] if subject else subjects:
        header = f"The following are multiple choice questions (with answers) about {subj.replace('_', ' ')}.\n\n"
        rows = _read_mmlu(val_dir / f"{subj}_val.csv")
        dev = _read_mmlu(_need(root / "mmlu" / "dev" / f"{subj}_dev.csv", name)) if shots else []
        demos = [f"{_mmlu_query(q, c)} {'ABCD'[a]}" for q, c, a in dev]
        queries = [_mmlu_query(q, c) for q, c, _ in rows]
        prompts = _with_shots(queries, demos, shots, seed, False, f"mmlu:{subj} (dev)", header)
        items += [Item(f"mmlu/{subj}/{i}", p, [" A", " B", " C", " D"], a)
                  for i, (p, (_, _, a)) in enumerate(zip(prompts, rows))]
    return Task(name, "mc", items, source=str(val_dir / (f"{subject}_val.csv" if subject else "*_val.csv")))


def _gsm8k_rows(path: Path) -> list[tuple[str, str]]:
    out = []
    for n, row in _read_jsonl(path):
        q, a = _get(row, "question", str, path, n), _get(row, "answer", str, path, n)
        if "####" not in a or gsm8k_answer(a.split("####", 1)[1]) is None:
            raise _err(path, n, "answer has no final '#### <number>' line")
        out.append((q, a))
    return out


def _gsm8k_task(name: str, root: Path, shots: int, seed: int) -> Task:
    test = _need(root / "gsm8k" / "test.jsonl", name)
    rows = _gsm8k_rows(test)
    train = _gsm8k_rows(_need(root / "gsm8k" / "train.jsonl", name)) if shots else []
    demos = [f"Question: {q}\nAnswer: {re.sub(r'<<[^>]*>>', '', a)}" for q, a in train]
    prompts = _with_shots([f"Question: {q}\nAnswer:" for q, _ in rows], demos, shots, seed, False, "gsm8k (train)")
    items = [Item(f"gsm8k/test/{i}", p, None, gsm8k_answer(a.split("####", 1)[1]))
             for i, (p, (_, a)) in enumerate(zip(prompts, rows))]
    return Task(name, "gen", items, stop=list(QA_STOP), source=str(test), answer_type="number")


def _bbh_task(name: str, root: Path, task: str | None, shots: int) -> Task:
    bbh_dir = _need(root / "bbh", name)
    tasks = sorted(p.stem for p in bbh_dir.glob("*.json"))
    if task is not None and task not in tasks:
        raise TaskError(f"unknown BBH task {task!r} (in {bbh_dir}); known: {', '.join(tasks)}")
    items = []
    for t in [task] if task else tasks:
        path = bbh_dir / f"{t}.json"
        try:
            data = json.loads(_read_text(path))
        except json.JSONDecodeError as e:
            raise _err(path, e.lineno, f"not valid JSON ({e.msg})") from None
        examples = data.get("examples") if isinstance(data, dict) else None
        if not isinstance(examples, list):
            raise TaskError(f"{path}: expected a JSON object with an 'examples' list")
        ex = []
        for i, e in enumerate(examples):
            where = f"examples[{i}]"
            if not isinstance(e, dict):
                raise _err(path, where, f"expected an object with 'input' and 'target', got {e!r}")
            ex.append((_get(e, "input", str, path, where), _get(e, "target", str, path, where)))
        if shots > len(ex) - 1:
            raise TaskError(f"{path}: shots={shots} but the file has only {len(ex)} examples")
        demos = [f"Q: {x}\nA: {y}" for x, y in ex[:shots]]
        items += [Item(f"bbh/{t}/{i}", SEP.join(demos + [f"Q: {x}\nA:"]), None, y)
                  for i, (x, y) in enumerate(ex) if i >= shots]
    return Task(name, "gen", items, stop=["\n\nQ:", "\nQ:"], max_new_tokens=128,
                source=str(bbh_dir / (f"{task}.json" if task else "*.json")))


def _gen_task(name: str, path: Path, shots: int, seed: int) -> Task:
    queries, demos, golds = [], [], []
    for n, row in _read_jsonl(path):
        if "prompt" in row:
            q = _get(row, "prompt", str, path, n)
        else:
            q = f"Question: {_get(row, 'question', str, path, n)}\nAnswer:"
        ans = row.get("answer")
        if isinstance(ans, bool) or not isinstance(ans, (str, int, float)):
            raise _err(path, n, f"field 'answer' missing or not a string/number: {ans!r}")
        queries.append(q)
        demos.append(f"{q} {ans}")
        golds.append(str(ans))
    prompts = _with_shots(queries, demos, shots, seed, True, f"{name} ({path})")
    items = [Item(f"gen/{i}", p, None, g) for i, (p, g) in enumerate(zip(prompts, golds))]
    return Task(name, "gen", items, stop=["\n\n", "Question:"], max_new_tokens=128, source=str(path))


def _chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Consecutive runs of whole lines of at most `size` characters (a longer line is its own chunk)."""
    out, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        if cur and n + len(line) > size:
            out.append("".join(cur))
            cur, n = [], 0
        cur.append(line)
        n += len(line)
    out.append("".join(cur))
    return [c for c in out if c.strip()]


def _ppl_task(name: str, path: Path, prefix: str, by_blank_lines: bool) -> Task:
    text = _read_text(path)
    docs = [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()] if by_blank_lines else _chunks(text)
    if not docs:
        raise TaskError(f"{path}: no text")
    return Task(name, "ppl", [Item(f"{prefix}/{i}", d) for i, d in enumerate(docs)], source=str(path))


# --- entry point ----------------------------------------------------------------------------------


def load_task(name: str, *, data_dir: str | Path | None = None, shots: int = 0, limit: int | None = None,
              seed: int = 0) -> Task:
    """Read task `name` (see TASK_NAMES) and build its prompts; raises TaskError on any bad input."""
    if shots < 0:
        raise TaskError(f"shots must be >= 0, got {shots}")
    if limit is not None and limit < 0:
        raise TaskError(f"limit must be >= 0, got {limit}")
    key, colon, arg = name.strip().partition(":")
    key = key.lower()
    if key in ("mc", "gen", "text") and colon:
        path = Path(arg).expanduser()
        if not arg or not path.is_file():
            raise TaskError(f"task {name!r}: file not found: {path if arg else '(no path given)'}")
        task = (_mc_task(name, _read_mc(path, path.stem), path, shots, seed) if key == "mc"
                else _gen_task(name, path, shots, seed) if key == "gen"
                else _ppl_task(name, path, "text", False))
    else:
        known = {"arc-easy", "arc-challenge", "mmlu", "gsm8k", "bbh", "tinystories", "shakespeare"}
        if key not in known or (colon and (key not in ("mmlu", "bbh") or not arg)):
            raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}")
        root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        if root is None or not root.is_dir():
            where = root or "neither ../shared/data nor ./shared/data exists"
            raise TaskError(f"task {name!r}: data directory not found ({where}); "
                            "pass --data-dir / data_dir= pointing at the shared/data folder")
        if key.startswith("arc-"):
            stem = "ARC-Easy" if key == "arc-easy" else "ARC-Challenge"
            path = _need(root / "arc" / f"{stem}.test.jsonl", name)
            task = _mc_task(name, _read_mc(path, f"{stem}/test"), path, shots, seed)
        elif key == "mmlu":
            task = _mmlu_task(name, root, arg or None, shots, seed)
        elif key == "gsm8k":
            task = _gsm8k_task(name, root, shots, seed)
        elif key == "bbh":
            task = _bbh_task(name, root, arg or None, shots)
        elif key == "tinystories":
            task = _ppl_task(name, _need(root / "text" / "tinystories_val.txt", name), key, True)
        else:
            task = _ppl_task(name, _need(root / "text" / "tinyshakespeare.txt", name), key, False)
    if limit is not None:
        task.items = task.items[:limit]
    return task
