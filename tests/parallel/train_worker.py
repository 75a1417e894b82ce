"""N training steps of the debug model on 2 processes (FSDP, or EP composed with FSDP), run by torchrun from
test_distributed_training.py: the real training step (`PretrainStep`), global gradient clipping, AdamW and
the aux-loss-free bias update on globally reduced counts. Rank 0 writes the losses to OUT/losses.json.
Arguments: OUT EP STEPS [START LOAD_DIR|- SAVE_DIR|- SAVE_AT [MODEL_DIR]] (resume from / save a distributed
checkpoint; save the final model with `save_sharded_model`)."""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from train_common import train  # noqa: E402

from behemoth.parallel.distributed import parallelize, setup_distributed  # noqa: E402


def main() -> None:
    out, ep, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    start, load, save, save_at, model_dir = (sys.argv[4:9] + ["0", "-", "-", "0", "-"][len(sys.argv[4:9]):])
    info = setup_distributed("cpu")
    losses = train(steps, info.rank, info.world, lambda m: parallelize(m, info.world, ep), start=int(start),
                   load=None if load == "-" else load, save=None if save == "-" else save, save_at=int(save_at),
                   save_model=None if model_dir == "-" else model_dir)
    if info.is_main:
        with open(f"{out}/losses.json", "w") as f:
            json.dump(losses, f)
    dist.barrier()  # both ranks done with every collective before the group goes
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
    os._exit(0)  # results are written; skip interpreter teardown, where gloo intermittently aborts (std::terminate)
