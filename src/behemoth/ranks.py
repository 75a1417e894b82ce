"""Where this process stands in a distributed run: the few questions every layer may ask.

Checkpoint writers (every rank writes its shards, rank 0 publishes), the trainer and the CLI (rank 0
speaks) ask these; the process group itself is made and used in `parallel/`.
"""

from __future__ import annotations

import os


def joined() -> bool:
    """Whether this process is part of a torch.distributed process group."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def launcher_rank() -> int:
    """This process's rank as the launcher numbered it: the process group's, else torchrun's RANK (0 for a
    plain process). For who reports what before a group forms (bad settings are found on every rank)."""
    if joined():
        import torch.distributed as dist

        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_rank0() -> bool:
    """Whether this process speaks for the run: rank 0 of its process group, or any process outside one (a
    process alone writes its checkpoints itself, whatever its environment says)."""
    if not joined():
        return True
    import torch.distributed as dist

    return dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if joined():
        import torch.distributed as dist

        dist.barrier()
