"""torchrun support for the training engine: process group, DDP / FSDP wrapping, reductions.

Under `torchrun --nproc_per_node N` (WORLD_SIZE > 1) the engine joins the process group (NCCL on
CUDA, gloo on CPU), wraps each trainable module in DistributedDataParallel, or shards a copy of it
with FSDP (`torch.distributed.fsdp.fully_shard`, one unit per repeated block plus the root) when it is
large, whose full weights every process loads back into the module when training ends, and averages
logged metrics over processes. Outside torchrun everything here is a no-op.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("ndopt")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_from_env(device: torch.device) -> DistEnv:
    """Join the torchrun process group if WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    here = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
        here = True
        log.info("joined process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), here)


def shutdown(env: DistEnv) -> None:
    if env.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.active:
        dist.barrier()


def choose_strategy(module: nn.Module, strategy: str, env: DistEnv, fsdp_min_params: int) -> str:
    """'none' outside torchrun; 'auto' picks FSDP for modules of at least fsdp_min_params params."""
    if not env.active:
        return "none"
    if strategy != "auto":
        return strategy
    n = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return "fsdp" if n >= fsdp_min_params else "ddp"


def _repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """Members of ModuleLists of one repeated class (transformer blocks, T5 or CLIP layers): FSDP's
    natural sharding units. A list of mixed parts (an attention's `to_out = [Linear, Dropout]`) is no
    stack of blocks: sharding its Linear alone only adds a unit (and FSDP warns of its view outputs)."""
    out = []
    for m in module.modules():
        if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(b) for b in m}) == 1:
            out.extend(m)
    return out


def wrap(module: nn.Module, strategy: str, env: DistEnv, device: torch.device) -> nn.Module:
    """The callable the objective uses: the module itself, DDP(module), or a sharded copy (FSDP)."""
    if strategy == "none":
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index if device.index is not None else env.local_rank] if device.type == "cuda" else None
        return DDP(module, device_ids=ids, broadcast_buffers=False)
    if strategy == "fsdp":
        import copy

        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # fully_shard turns a module's parameters into DTensors in place, for good: shard a copy, and
        # the caller's module takes the trained weights back at the end (gather_into)
        module = copy.deepcopy(module)
        mesh = init_device_mesh(device.type, (env.world,))
        for block in _repeated_blocks(module):
            if any(p.requires_grad for p in block.parameters()):
                fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh)
        return module
    raise ValueError(f"unknown distributed strategy {strategy!r}: none, ddp, fsdp or auto")


def gather_into(module: nn.Module, sharded: nn.Module) -> None:
    """Load an FSDP-sharded copy's full weights into the plain module it was made from (a collective:
    every process calls it, and every process's `module` ends with the same full weights)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    module.load_state_dict(full)


@contextlib.contextmanager
def no_grad_sync(wrapped: Mapping[str, nn.Module], strategies: Mapping[str, str], enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-steps (DDP no_sync; FSDP's sync flag)."""
    if not enabled:
        yield
        return
    with contextlib.ExitStack() as stack:
        for name, m in wrapped.items():
            if strategies[name] == "ddp":
                stack.enter_context(m.no_sync())
            elif strategies[name] == "fsdp":
                m.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            for name, m in wrapped.items():
                if strategies[name] == "fsdp":
                    m.set_requires_gradient_sync(True)


def mean_over_processes(values: Mapping[str, float], env: DistEnv) -> dict[str, float]:
    """Average scalar metrics over processes (equal local batch sizes: the global mean)."""
    if not env.active or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / env.world for k, v in zip(keys, t.tolist())}


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    if not env.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
