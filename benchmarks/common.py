"""What every benchmark ends with: one JSON line (machine, commit, config, figures)."""

from __future__ import annotations

import json
import os
import platform
import subprocess


def print_result(config: dict, figures) -> None:
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads()}
    print(json.dumps({"machine": machine, "commit": commit, "config": config, "figures": figures}))
