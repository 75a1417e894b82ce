"""Where a run computes and in what precision: the device, bf16 autocast, the peak for MFU."""

from __future__ import annotations

import torch

# Dense bf16 peak of GPUs whose MFU we report (FLOP/s), by a part of the name torch reports, the more specific
# first: the PCIe and NVL cards of a generation are slower than its SXM one ("NVIDIA H100 80GB HBM3" is SXM).
# Elsewhere MFU is shown as n/a.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H800 PCIe", 756e12), ("H200 NVL", 835e12),
             ("GH200", 989e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12),
             ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("GB200", 2500e12), ("B200", 2250e12))


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


def peak_flops(device: torch.device, dtype: torch.dtype | None, name: str | None = None) -> float | None:
    """The dense bf16 peak of `device` (its name: `name`, default what torch reports) for MFU; None where unknown
    or the run is not bf16."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = name if name is not None else torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16 if k in name), None)


def allow_tf32(device: torch.device) -> None:
    """On a GPU, let the fp32 matmuls and convolutions that remain under bf16 autocast (and fp32 runs) use TF32
    tensor cores, as torch's "high" float32 matmul precision; the CPU is unaffected."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
