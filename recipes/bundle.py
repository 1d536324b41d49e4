"""Copy a trained synthetic-task model into the package (src/looplm/bundled/NAME) with its task card.

    python recipes/bundle.py out/train/bundled-chain-r4/model recipes/bundled.yaml --exit q:0.5

Writes config.json, model.safetensors, the tokenizer files and looplm_task.json (the task format the demo
needs: task, difficulties, parts, variables, digits, distractors, the recommended exit policy). The model card
(README.md in the same dir) is written by hand from the measured figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import looplm
from looplm.checkpoint import TOKENIZER_FILES, WEIGHTS_NAME
from looplm.demo import BUNDLED, BUNDLED_NAME
from looplm.train import load_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("recipe")
    ap.add_argument("--exit", default="q:0.5", help="the exit policy the demo uses by default")
    ap.add_argument("--name", default=BUNDLED_NAME)
    args = ap.parse_args()
    src, recipe = Path(args.model_dir), load_recipe(args.recipe)
    looplm.load(src)  # it must load
    dst = BUNDLED / args.name
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", WEIGHTS_NAME, *TOKENIZER_FILES):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    d = recipe.data
    meta = {"task": d.task, "difficulties": d.difficulties, **d.format_options(), "exit": args.exit,
            "recipe": Path(args.recipe).name, "seed": recipe.seed}
    (dst / "looplm_task.json").write_text(json.dumps(meta, indent=1) + "\n")
    size = sum(p.stat().st_size for p in dst.iterdir() if p.is_file())
    print(f"{dst}: {size / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
