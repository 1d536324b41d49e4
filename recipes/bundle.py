"""Copy a trained synthetic-task model into the package (src/looplm/bundled/NAME) with its task card.

    python recipes/bundle.py out/train/bundled-chain-r4/model recipes/bundled.yaml --exit q:0.5

Writes config.json, model.safetensors, the tokenizer files and looplm_task.json (the task format the demo
needs: task, difficulties, parts, variables, digits, distractors, the recommended exit policy), atomically.
The model card (README.md in the same dir) is written by hand from the measured figures; a re-bundle
keeps it. The destination must be absent, empty or a bundled looplm model (a looplm checkpoint and its
card); anything else is refused unless --overwrite (`looplm.outputs`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import looplm
from looplm.checkpoint import TOKENIZER_FILES, WEIGHTS_NAME, _write_dir_atomically
from looplm.demo import BUNDLED, BUNDLED_NAME
from looplm.outputs import check_output, is_looplm_checkpoint
from looplm.train import load_recipe

CARD = "README.md"


def is_bundled_model(path: Path) -> bool:
    return is_looplm_checkpoint(path, also=(CARD,))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("recipe")
    ap.add_argument("--exit", default="q:0.5", help="the exit policy the demo uses by default")
    ap.add_argument("--name", default=BUNDLED_NAME)
    ap.add_argument("--dst", help="where to write (default: src/looplm/bundled/NAME)")
    ap.add_argument("--overwrite", action="store_true", help="replace --dst whatever it holds")
    args = ap.parse_args()
    src, dst = Path(args.model_dir), Path(args.dst) if args.dst else BUNDLED / args.name
    try:
        check_output(dst, ours=is_bundled_model, what="a bundled looplm model", overwrite=args.overwrite)
        recipe = load_recipe(args.recipe)
        if recipe.task_card() is None:
            raise ValueError(f"{args.recipe}: data.kind={recipe.data.kind!r}; the demo needs a synthetic task")
        looplm.load(src)  # it must load
    except ValueError as e:
        sys.exit(f"error: {e}")
    meta = {**recipe.task_card(), "exit": args.exit, "recipe": Path(args.recipe).name}
    card = (dst / CARD).read_bytes() if is_bundled_model(dst) and (dst / CARD).is_file() else None

    def write(tmp: Path) -> None:
        for name in ("config.json", WEIGHTS_NAME, *TOKENIZER_FILES):
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        (tmp / "looplm_task.json").write_text(json.dumps(meta, indent=1) + "\n")
        if card is not None:
            (tmp / CARD).write_bytes(card)

    _write_dir_atomically(dst, write, may_replace=None if args.overwrite else is_bundled_model,
                          what="a bundled looplm model")
    size = sum(p.stat().st_size for p in dst.iterdir() if p.is_file())
    print(f"{dst}: {size / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
