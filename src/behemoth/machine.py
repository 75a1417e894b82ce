"""Where a figure was measured: the CPU's name, and the machine and versions a results file records."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from behemoth.version import __version__


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def machine_info() -> dict:
    """Platform, CPU and its count, torch's threads, the Python, torch and behemoth versions."""
    return {"platform": platform.platform(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "behemoth": __version__}
