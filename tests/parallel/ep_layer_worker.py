"""One MoE layer under expert parallelism, run by `torchrun --nproc-per-node 2` from test_expert_parallel.py.

Every rank builds the same layer, routes its own tokens (a different count per rank) and saves its
output, input gradient and parameter gradients to OUT/rank{r}.pt; the test compares them with one device.
Arguments: OUT TOP_K BIAS (BIAS: comma-separated router biases, e.g. "0,0,0,0" or "20,0,0,0").
"""

import os
import sys

import torch
import torch.distributed as dist

from behemoth.parallel.expert_parallel import apply_expert_parallel

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from ep_common import build_layer, rank_inputs  # noqa: E402


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def main() -> None:
    out, top_k, bias = sys.argv[1], int(sys.argv[2]), [float(b) for b in sys.argv[3].split(",")]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    layer = apply_expert_parallel(build_layer(top_k, bias))
    x, g = rank_inputs(rank)
    x.requires_grad_(True)
    y = layer(x)
    (y * g).sum().backward()
    torch.save({"y": y.detach(), "x_grad": x.grad, "grads": {n: local(p.grad) for n, p in layer.named_parameters()},
                "tokens_per_expert": layer.tokens_per_expert.clone()}, f"{out}/rank{rank}.pt")
    dist.barrier()  # both ranks done with every collective before the group goes
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    os._exit(0)  # results are written; skip interpreter teardown, where gloo intermittently aborts (std::terminate)
