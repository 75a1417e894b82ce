"""What is applied to a built model from outside, so that `model/` stays single-device code:

* `apply`: activation checkpointing and torch.compile, per block (exported here);
* `expert_parallel`: the routed experts sharded over ranks, slots exchanged by all-to-all;
* `distributed`: the process group, device meshes, FSDP2 composed with expert parallelism
  (`parallelize`, `shard_model`) and the cross-rank reductions the training loop needs.
"""

from behemoth.parallel.apply import apply_activation_checkpointing, apply_compile

__all__ = ["apply_activation_checkpointing", "apply_compile"]
