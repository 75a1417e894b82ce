"""Where a run computes and in what precision: the device, bf16 autocast, the peak for MFU."""

from __future__ import annotations

import torch

# Dense bf16 peak of GPUs whose MFU we report (FLOP/s); elsewhere MFU is shown as n/a.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}


def resolve_device(name: str, option: str = "train.device") -> torch.device:
    """"auto" (a GPU when there is one), "cpu", "cuda" or "cuda:N"; CUDA asked for where there is none is a
    `ValueError` naming `option`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{option}={name!r}: CUDA is not available here")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The one bf16-autocast decision: "bf16", or "auto" on a GPU, runs with fp32 master weights under bf16
    autocast; "fp32", or "auto" elsewhere, without autocast (None)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision={precision!r}: expected auto, fp32 or bf16")
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if use_bf16 else None


def peak_flops(device: torch.device, dtype: torch.dtype | None) -> float | None:
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)
