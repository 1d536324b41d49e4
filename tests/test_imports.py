"""`import looplm` and `looplm --help` stay fast (issue 12): heavy and optional dependencies are imported
where they are used. Each check runs in a fresh interpreter, since this one has imported everything."""

import json
import subprocess
import sys

import pytest

import looplm

HEAVY = ["transformers", "matplotlib", "looplm.train.trainer", "accelerate", "lm_eval", "safetensors"]


def modules_after(code: str) -> set[str]:
    """sys.modules of a fresh interpreter after running `code`."""
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_import_looplm_imports_nothing_heavy():
    loaded = modules_after("import looplm")
    assert not loaded & {*HEAVY, "torch", "typer"}, sorted(loaded & {*HEAVY, "torch", "typer"})


def test_looplm_and_its_public_names_do_not_import_the_training_package():
    """Issue 13: using looplm (load, generate, calibrate, the bundled model's path, ...) never imports looplm.train."""
    loaded = modules_after("import looplm\nfor name in looplm.__all__: getattr(looplm, name)")
    assert "looplm.model" in loaded and not {m for m in loaded if m.startswith("looplm.train")}


def test_help_of_every_command_imports_nothing_heavy():
    code = """
from typer.testing import CliRunner
from looplm.__main__ import app
for args in ([], ["generate"], ["calibrate"], ["analyze"], ["train"], ["demo"], ["eval"], ["eval", "compare"],
             ["retrofit"], ["retrofit", "search"]):
    res = CliRunner().invoke(app, [*args, "--help"])
    assert res.exit_code == 0 and "Usage" in res.output, (args, res.output)
"""
    loaded = modules_after(code)
    assert not loaded & {*HEAVY, "torch"}, sorted(loaded & {*HEAVY, "torch"})


def test_looplm_help_and_version_as_commands():
    res = subprocess.run([sys.executable, "-m", "looplm", "--help"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "generate" in res.stdout, res.stderr
    res = subprocess.run([sys.executable, "-m", "looplm", "--version"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == f"looplm {looplm.__version__}", res.stderr


def test_demo_problems_do_not_import_the_trainer():
    loaded = modules_after("from looplm.train import synthetic\nlooplm_dir = __import__('looplm').bundled_model_dir()")
    assert "looplm.train.trainer" not in loaded and "transformers" not in loaded


def test_every_public_name_resolves_and_is_listed():
    for name in looplm.__all__:
        assert getattr(looplm, name) is not None
    assert set(looplm.__all__) <= set(dir(looplm))
    ns = {}
    exec("from looplm import *", ns)
    assert set(looplm.__all__) <= set(ns)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        looplm.nope  # noqa: B018


def test_submodules_stay_reachable_as_attributes():
    """`looplm.engine.left_pad` worked when the package imported everything; it still does."""
    code = "import looplm\nassert callable(looplm.engine.left_pad) and looplm.cache.STRATEGIES"
    modules_after(code)


def test_calibrate_stays_the_function_after_its_module_is_imported():
    """looplm.calibrate (the function) shares its name with looplm/calibrate.py; importing the module
    first (as `looplm analyze` does) must not put the module in the function's place."""
    code = ("import looplm\nfrom looplm.calibrate import chunk_tokens\nimport looplm.calibrate\n"
            "assert callable(looplm.calibrate) and looplm.calibrate.__module__ == 'looplm.calibrate', looplm.calibrate")
    modules_after(code)


def test_transformers_knows_looplm_dirs_once_looplm_hf_is_imported():
    for first in ("import looplm.hf", "import looplm; looplm.load"):
        code = f"{first}\nfrom transformers import AutoConfig\nassert type(AutoConfig.for_model('looplm')).__name__ == 'LoopLMConfig'"
        modules_after(code)
