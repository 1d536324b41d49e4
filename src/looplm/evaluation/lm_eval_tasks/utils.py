"""Helpers for the local lm-eval tasks (referenced from the YAMLs as `!function utils.NAME`).

Plain Python plus `datasets`: lm-eval loads this file by path from the directory of the YAMLs.
"""

from __future__ import annotations

import re

STORY_START = "Once upon a time"


def split_stories(text: str) -> list[str]:
    """TinyStories text written as `story.strip() + "\\n\\n"` → stories. Story boundaries are not marked and
    stories have paragraphs of their own, so a new story starts at each paragraph opening with
    "Once upon a time" (the first paragraph of the file always starts one)."""
    stories: list[list[str]] = []
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        if not stories or para.startswith(STORY_START):
            stories.append([])
        stories[-1].append(para)
    return ["\n\n".join(s) for s in stories]


def tinystories_dataset(stories_file: str, n_stories: int | None = None, **_ignored):
    """lm-eval `custom_dataset`: a DatasetDict with one "test" split of {"text": story}, the first n stories.

    lm-eval calls this with the task's metadata (and the CLI's --model_args) as well; those are ignored.
    The file is read through HF `datasets`' packaged "text" builder (works offline: HF_DATASETS_OFFLINE=1).
    """
    import datasets

    whole = datasets.load_dataset("text", data_files={"test": stories_file}, sample_by="document")["test"]
    stories = split_stories("".join(whole["text"]))
    if n_stories is not None and n_stories > 0:
        stories = stories[: int(n_stories)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": stories})})


def rolling_process_results(doc, results):
    """As lm-eval's wikitext task: perplexity per word and per byte, and bits per byte."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"].strip()))
    nbytes = len(doc["text"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, nbytes),
        "bits_per_byte": (loglikelihood, nbytes),
    }
