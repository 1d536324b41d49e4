import json
from pathlib import Path

import pytest

from looplm.evaluation.tasks import (TASK_NAMES, Item, TaskError, default_data_dir, gsm8k_answer, load_task,
                                     mc_predictions)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def data_dir() -> Path:
    if not (SHARED_DATA / "arc").is_dir():
        pytest.skip(f"shared benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- real files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,count", [
    ("arc-easy", 2376), ("arc-challenge", 1172), ("mmlu", 1542), ("gsm8k", 1319), ("bbh", 6511),
    ("mmlu:anatomy", 14), ("bbh:snarks", 178),
])
def test_item_counts(data_dir, name, count):
    task = load_task(name, data_dir=data_dir)
    assert len(task.items) == count
    assert len({it.id for it in task.items}) == count


def test_bbh_has_27_tasks_and_shots_come_from_each_file(data_dir):
    task = load_task("bbh", data_dir=data_dir)
    assert len({it.id.split("/")[1] for it in task.items}) == 27
    assert task.kind == "gen" and task.stop == ["\n\nQ:", "\nQ:"]
    shot = load_task("bbh", data_dir=data_dir, shots=3)
    assert len(shot.items) == 6511 - 27 * 3
    first = shot.items[0]  # boolean_expressions example 3, after the file's first 3 as demonstrations
    assert first.id == "bbh/boolean_expressions/3"
    assert first.prompt.startswith("Q: not ( True ) and ( True ) is\nA: False\n\nQ: ")
    assert first.prompt.count("\n\nQ: ") == 3 and first.prompt.endswith("\nA:")


def test_arc_prompt_format(data_dir):
    task = load_task("arc-easy", data_dir=data_dir, limit=3)
    it = task.items[0]
    assert task.kind == "mc" and len(task.items) == 3
    assert it.id == "ARC-Easy/test/0000"
    assert it.prompt == "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:"
    assert it.choices[0] == " Sunlight is the source of energy for nearly all ecosystems."
    assert all(c.startswith(" ") for c in it.choices) and it.answer == 0


def test_mmlu_prompt_format(data_dir):
    task = load_task("mmlu:anatomy", data_dir=data_dir, shots=2)
    it = task.items[0]
    header = "The following are multiple choice questions (with answers) about anatomy.\n\n"
    assert it.prompt.startswith(header)
    assert it.prompt.endswith("Which of the following terms describes the body's ability to maintain its normal state?\n"
                              "A. Anabolism\nB. Catabolism\nC. Tolerance\nD. Homeostasis\nAnswer:")
    blocks = it.prompt[len(header):].split("\n\n")
    assert len(blocks) == 3 and all(b.split("\n")[-1] in ("Answer: A", "Answer: B", "Answer: C", "Answer: D")
                                    for b in blocks[:2])
    assert it.choices == [" A", " B", " C", " D"] and it.answer == 3
    with pytest.raises(TaskError, match="shots=6 but only 5"):
        load_task("mmlu:anatomy", data_dir=data_dir, shots=6)
    with pytest.raises(TaskError, match="unknown MMLU subject 'anatomyy'.*anatomy"):
        load_task("mmlu:anatomyy", data_dir=data_dir)


def test_gsm8k_prompt_and_gold(data_dir):
    task = load_task("gsm8k", data_dir=data_dir, shots=2, limit=5)
    it = task.items[0]
    assert task.kind == "gen" and "Question:" in task.stop
    assert it.answer == "18" and it.prompt.endswith("per fresh duck egg. How much in dollars does she make every day "
                                                    "at the farmers' market?\nAnswer:")
    demos = it.prompt.split("\n\nQuestion: ")
    assert len(demos) == 3 and "<<" not in it.prompt and it.prompt.count("\n#### ") == 2
    assert task.is_correct(it, " She sells 9 eggs, so 9 * 2 = $18.\n#### 18\n\nQuestion: next")
    assert task.is_correct(it, " The answer is $18.00")
    assert not task.is_correct(it, " 9 * 2 = 16\n#### 16")


def test_gsm8k_answer_on_real_golds(data_dir):
    rows = [json.loads(line) for line in (data_dir / "gsm8k" / "test.jsonl").read_text().splitlines()]
    task = load_task("gsm8k", data_dir=data_dir)
    for row, it in zip(rows, task.items):
        raw = row["answer"].split("####")[1].strip()
        assert gsm8k_answer(row["answer"]) == raw.replace(",", "") == it.answer


@pytest.mark.parametrize("text,expected", [
    ("The answer is $1,234.", "1234"), ("#### 72", "72"), ("so 5.0 apples", "5"), ("no number", None),
    ("3 apples then 4 #### 7 wait 8", "7"), ("it costs -$3.50", "-3.5"), ("0.50", "0.5"), ("", None),
])
def test_gsm8k_answer(text, expected):
    assert gsm8k_answer(text) == expected


def test_fewshot_deterministic_and_limit_is_prefix(data_dir):
    a = load_task("arc-challenge", data_dir=data_dir, shots=5, seed=1)
    b = load_task("arc-challenge", data_dir=data_dir, shots=5, seed=1, limit=10)
    c = load_task("arc-challenge", data_dir=data_dir, shots=5, seed=2, limit=10)
    assert [it.prompt for it in a.items[:10]] == [it.prompt for it in b.items]
    assert [it.prompt for it in b.items] != [it.prompt for it in c.items]
    assert all(it.prompt.count("Question: ") == 6 for it in a.items)


def test_fewshot_never_includes_the_item(tmp_path):
    rows = [{"question": f"q{i}", "choices": [f"a{i}", f"b{i}"], "answer_index": i % 2} for i in range(4)]
    path = write(tmp_path / "mine.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    for seed in range(5):
        task = load_task(f"mc:{path}", shots=3, seed=seed)
        for i, it in enumerate(task.items):
            blocks = it.prompt.split("\n\n")
            assert blocks[-1] == f"Question: q{i}\nAnswer:"
            assert sorted(blocks[:-1]) == sorted(f"Question: q{j}\nAnswer: {'ab'[j % 2]}{j}" for j in range(4) if j != i)
    with pytest.raises(TaskError, match="shots=4 but only 3"):
        load_task(f"mc:{path}", shots=4)


def test_ppl_tasks(data_dir, tmp_path):
    stories = load_task("tinystories", data_dir=data_dir)
    assert stories.kind == "ppl" and len(stories.items) > 700
    assert stories.items[0].prompt.startswith("Spot. Spot saw the shiny car")
    assert all(it.prompt == it.prompt.strip() and "\n\n" not in it.prompt for it in stories.items)
    shakespeare = load_task("shakespeare", data_dir=data_dir)
    text = (data_dir / "text" / "tinyshakespeare.txt").read_text()
    assert "".join(it.prompt for it in shakespeare.items) == text
    assert all(len(it.prompt) <= 2000 and it.prompt.endswith("\n") for it in shakespeare.items[:-1])
    path = write(tmp_path / "t.txt", "line\n" * 1000)
    assert [len(it.prompt) for it in load_task(f"text:{path}").items] == [2000, 2000, 1000]


# --- lm-eval's multiple-choice conventions (issue 12) ------------------------------------------------


def test_choices_keep_their_whitespace_as_lm_eval(tmp_path):
    """lm-eval scores target_delimiter + choice with the choice as written; stripping "$1 " drops a token."""
    rows = [{"question": "If you have a 'sawbuck' how much money do you have?", "choices": ["$1 ", "$5 ", " $10", "$20"],
             "answer_index": 2}]
    path = write(tmp_path / "ws.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    it = load_task(f"mc:{path}").items[0]
    assert it.choices == [" $1 ", " $5 ", "  $10", " $20"] and it.target_delimiter == " "
    csv_path = write(tmp_path / "ws.csv", "question,choices,answer_index\nq?,a |b,1\n")
    assert load_task(f"mc:{csv_path}").items[0].choices == [" a ", " b"]
    demo = load_task(f"mc:{write(tmp_path / 'two.jsonl', (json.dumps(rows[0]) + chr(10)) * 2)}", shots=1).items[0]
    assert demo.prompt.startswith("Question: If you have a 'sawbuck' how much money do you have?\nAnswer:  $10\n\n")


def test_mc_predictions_normalise_per_character_of_the_choice():
    # lm-eval: acc_norm = argmax(ll / len(choice)), characters of the choice without the " " delimiter
    it = Item("x", "Q:", [" ab", " éé"], 0)  # 2 characters each; " éé" is 5 bytes, " ab" 3
    assert mc_predictions(it, [-2.0, -2.1]) == (0, 0)
    # per byte with the delimiter (the old rule) would pick 1 here: -2.0/3 = -0.667 < -2.4/5 = -0.48
    assert mc_predictions(it, [-2.0, -2.4]) == (0, 0)
    long = Item("y", "Q:", [" a", " abcd"], 0)
    # -1/1 < -3/4 picks " abcd"; counting the delimiter (-1/2 > -3/5) would flip it back to " a"
    assert mc_predictions(long, [-1.0, -3.0]) == (0, 1)
    assert mc_predictions(Item("z", "Q:", [" a", " b"], 0), [-1.0, -1.0]) == (0, 0)  # ties: the first, as np.argmax
    mmlu = Item("m", "Q:", [" A", " B", " C", " D"], 0)
    assert mc_predictions(mmlu, [-3.0, -1.0, -2.0, -4.0]) == (1, 1)
    with_tab = Item("t", "Q:", ["\tx", "\tyy"], 0, target_delimiter="\t")
    assert mc_predictions(with_tab, [-1.0, -1.5]) == (0, 1)


# --- user files and errors ------------------------------------------------------------------------


def test_user_csv_and_gen_files(tmp_path):
    csv_path = write(tmp_path / "q.csv", 'question,choices,answer_index\n"Capital of\nFrance?",Paris|Rome,0\n')
    it = load_task(f"mc:{csv_path}").items[0]
    assert it == Item("q/0", "Question: Capital of\nFrance?\nAnswer:", [" Paris", " Rome"], 0)
    gen_path = write(tmp_path / "g.jsonl", '{"question": "2+2?", "answer": 4}\n{"prompt": "Say hi:", "answer": "Hi"}\n')
    task = load_task(f"gen:{gen_path}")
    assert [it.prompt for it in task.items] == ["Question: 2+2?\nAnswer:", "Say hi:"]
    assert task.is_correct(task.items[0], " 4.0\n\nQuestion: 3+3?") and not task.is_correct(task.items[0], " 5")
    assert task.is_correct(task.items[1], " hi.") and not task.is_correct(task.items[1], " hello")


@pytest.mark.parametrize("text,line,problem", [
    ('{"question": "q", "choices": ["a"], "answer_index": 0}\n{not json}\n', 2, "not valid JSON"),
    ('{"question": "q", "choices": ["a"], "answer_index": 0}\n\n{"question": "q", "choices": ["a"]}\n', 3,
     "missing field 'answer_index'"),
    ('{"question": "q", "choices": ["a", "b"], "answer_index": 2}\n', 1, "answer_index 2 out of range"),
    ('{"question": "q", "choices": ["a", "b"], "answer_index": "1"}\n', 1, "should be int"),
])
def test_malformed_jsonl(tmp_path, text, line, problem):
    path = write(tmp_path / "bad.jsonl", text)
    with pytest.raises(TaskError, match=problem) as e:
        load_task(f"mc:{path}")
    assert f"bad.jsonl:{line}:" in str(e.value)


def test_malformed_csv_reports_reader_line(tmp_path):
    good = '"multi\nline, question",a,b,c,d,A\n'  # one row over two physical lines
    write(tmp_path / "mmlu" / "val" / "cols_val.csv", good + "q,a,b,c,D\n")
    write(tmp_path / "mmlu" / "val" / "letter_val.csv", good + good + "q,a,b,c,d,E\n")
    with pytest.raises(TaskError, match=r"cols_val\.csv:3: expected 6 columns .*got 5"):
        load_task("mmlu:cols", data_dir=tmp_path)
    with pytest.raises(TaskError, match=r"letter_val\.csv:5: answer must be a letter A-D, got 'E'"):
        load_task("mmlu:letter", data_dir=tmp_path)
    path = write(tmp_path / "mc.csv", "question,choices,answer_index\nq,a|b,0\nq,a|b,x\n")
    with pytest.raises(TaskError, match=r"mc\.csv:3: answer_index is not an integer"):
        load_task(f"mc:{path}")


def test_malformed_gsm8k_and_bbh(tmp_path):
    write(tmp_path / "gsm8k" / "test.jsonl", '{"question": "q", "answer": "1 + 1 = 2"}\n')
    with pytest.raises(TaskError, match=r"test\.jsonl:1: answer has no final '#### <number>'"):
        load_task("gsm8k", data_dir=tmp_path)
    write(tmp_path / "bbh" / "t.json", json.dumps({"canary": "", "examples": [{"input": "x", "target": "y"}, {"input": "x"}]}))
    with pytest.raises(TaskError, match=r"t\.json:examples\[1\]: missing field 'target'"):
        load_task("bbh:t", data_dir=tmp_path)


def test_unknown_task_and_missing_files(tmp_path):
    for bad in ("arc", "mmlu:", "arc-easy:x", "nope:thing"):
        with pytest.raises(TaskError, match="unknown task") as e:
            load_task(bad, data_dir=tmp_path)
        assert all(n in str(e.value) for n in TASK_NAMES)
    with pytest.raises(TaskError) as e:
        load_task("arc-easy", data_dir=tmp_path)
    assert str(tmp_path / "arc" / "ARC-Easy.test.jsonl") in str(e.value) and "--data-dir" in str(e.value)
    with pytest.raises(TaskError, match="data directory not found"):
        load_task("gsm8k", data_dir=tmp_path / "nowhere")
    with pytest.raises(TaskError, match="file not found"):
        load_task(f"mc:{tmp_path / 'missing.jsonl'}")
    with pytest.raises(TaskError, match="shots must be >= 0"):
        load_task("gsm8k", data_dir=tmp_path, shots=-1)


def test_default_data_dir(tmp_path, monkeypatch):
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    assert default_data_dir() is None
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert default_data_dir() == tmp_path / "shared" / "data"
