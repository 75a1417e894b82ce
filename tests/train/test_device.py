"""The run's device settings: bf16 autocast where asked, and the MFU peak of the card by its exact name."""

from __future__ import annotations

import pytest
import torch

from behemoth.train.device import autocast_dtype, peak_flops

CUDA = torch.device("cuda")


@pytest.mark.parametrize(("name", "tflops"), [
    ("NVIDIA H100 80GB HBM3", 989),  # SXM
    ("NVIDIA H100 PCIe", 756),
    ("NVIDIA H100 NVL", 835),
    ("NVIDIA H200", 989),
    ("NVIDIA H200 NVL", 835),
    ("NVIDIA GH200 480GB", 989),
    ("NVIDIA A100-SXM4-80GB", 312),
    ("NVIDIA B200", 2250),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_mfu_peak_is_the_cards_own(name, tflops):
    peak = peak_flops(CUDA, torch.bfloat16, name)
    assert (peak / 1e12 if peak else None) == tflops


def test_no_peak_outside_bf16_on_a_gpu():
    assert peak_flops(torch.device("cpu"), torch.bfloat16, "NVIDIA H100 80GB HBM3") is None
    assert peak_flops(CUDA, None, "NVIDIA H100 80GB HBM3") is None


def test_autocast_follows_the_precision_setting():
    assert autocast_dtype("auto", CUDA) == torch.bfloat16
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        autocast_dtype("fp16", CUDA)
