"""Tensor parallelism on torch.distributed (PLAN_SPEC.md §8a): `shard_model` splits a
model for `plan.parallel` (tp.py); `maybe_launch` / `init_distributed` start or join the
processes (launch.py). docs/parallel.md describes both."""
from .launch import init_distributed, maybe_launch, rank_device, run_torchrun, under_torchrun
from .tp import ShardInfo, infer_styles, resolve_styles, shard_model

__all__ = ["ShardInfo", "infer_styles", "init_distributed", "maybe_launch", "rank_device", "resolve_styles",
           "run_torchrun", "shard_model", "under_torchrun"]
