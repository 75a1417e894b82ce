"""Expert parallelism over 2 processes (gloo, started with torchrun) against one device, in fp32: outputs,
input gradients and parameter gradients, with balanced and one-sided routing, top-1 and top-2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ep_common import build_layer, rank_inputs  # noqa: E402

WORKER = Path(__file__).parent / "ep_layer_worker.py"


def torchrun(script: Path, *args: str, nproc: int = 2) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(script), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("top_k, bias", [(1, "0,0,0,0"), (2, "0,0,0,0"), (1, "20,0,0,0"), (2, "20,20,0,-20")],
                         ids=["balanced-top1", "balanced-top2", "all-to-rank0-expert0", "rank0-gets-nearly-all"])
def test_one_moe_layer_under_ep2_matches_one_device(tmp_path, top_k, bias):
    torchrun(WORKER, str(tmp_path), str(top_k), bias)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    ref = build_layer(top_k, [float(b) for b in bias.split(",")])
    inputs = [rank_inputs(r) for r in range(2)]
    xs = [x.requires_grad_(True) for x, _ in inputs]
    loss = sum((ref(x) * g).sum() for x, (_, g) in zip(xs, inputs, strict=True))
    loss.backward()
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["y"], ref(xs[r]).detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(got["x_grad"], xs[r].grad, rtol=0, atol=1e-6)
        for name in ("experts.w13", "experts.w2"):  # each rank's expert slice has every rank's contribution
            want = dict(ref.named_parameters())[name].grad[2 * r:2 * r + 2]
            torch.testing.assert_close(got["grads"][name], want, rtol=0, atol=1e-5)
    for name, p in ref.named_parameters():  # replicated parameters: the ranks' partial gradients add up
        if not name.startswith("experts."):
            torch.testing.assert_close(ranks[0]["grads"][name] + ranks[1]["grads"][name], p.grad, rtol=0, atol=1e-5)
    counts = ranks[0]["tokens_per_expert"] + ranks[1]["tokens_per_expert"]
    assert counts.sum() == (7 + 12) * top_k
    if bias == "20,0,0,0":
        assert counts.tolist() == [19, 0, 0, 0]  # rank 1's experts receive nothing, and that is fine
