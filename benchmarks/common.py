"""What every benchmark result records about where it ran."""

from __future__ import annotations

import torch

from behemoth.machine import cpu_name


def device_info(device: torch.device) -> dict:
    """The device's name and, for GPUs, capability, memory and CUDA version."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "capability": list(torch.cuda.get_device_capability(device)),
                "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    return {"type": device.type, "name": cpu_name(), "threads": torch.get_num_threads()}


def transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__
