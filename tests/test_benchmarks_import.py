"""Every benchmark script imports: a module it uses that moved or was renamed fails here, not on the GPU
machine (the scripts' code paths run in `tests/test_gpu_check.py`'s dry run and in the benchmarks)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", sorted(BENCHMARKS.glob("*.py")), ids=lambda p: p.name)
def test_benchmark_script_imports(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)  # top-level code only: each script runs under `if __name__ == "__main__"`
    assert callable(getattr(module, "main", None)) or script.name in ("common.py", "grid.py")  # (their helpers)
