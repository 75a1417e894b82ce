"""How long work shows its progress: durations and rates in one format for every long job."""

from __future__ import annotations

import math


def format_duration(seconds: float) -> str:
    """"1h05m" from an hour up, "3m07s" below; "?" when unknown (not finite)."""
    if not math.isfinite(seconds):
        return "?"
    s = int(max(0.0, seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
