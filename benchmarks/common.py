"""What every benchmark ends with: one JSON line (machine, commit, config, figures)."""

from __future__ import annotations

import json
import os
import platform
import subprocess


def clock(device) -> float:
    """time.perf_counter() once the device's queued work is done (CUDA runs asynchronously)."""
    import time

    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def print_result(config: dict, figures) -> None:
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads()}
    print(json.dumps({"machine": machine, "commit": commit, "config": config, "figures": figures}))
