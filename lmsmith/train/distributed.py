"""Data parallel training on torch.distributed, set up from the environment `torchrun` provides.

    torchrun --nproc_per_node 2 -m lmsmith finetune recipe.yaml

Every rank runs the same loop. The batch sampler draws *global* micro-batches (batch_size × world
size examples, the same order a single process with that batch size would see) and each rank keeps
its own contiguous slice, so N processes with batch_size b reproduce one process with batch_size N·b.
Without RANK/WORLD_SIZE in the environment everything here is a no-op and world size is 1.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from ..data.sampler import ResumableSampler

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto": this rank's GPU when CUDA is available, else the CPU; otherwise the named device."""
    from ..api import resolve_device

    if requested == "auto" and torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank}")
    return resolve_device(requested)


def setup(device: str = "auto", backend: str = "auto") -> DistContext:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device, local_rank)
    if world == 1:
        return DistContext(device=chosen)
    if not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if chosen.type == "cuda" else "gloo"
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        dist.init_process_group(backend=backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, chosen)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, ctx: DistContext, strategy: str = "ddp") -> nn.Module:
    """DDP (replicated weights, averaged gradients) or FSDP2 (`fully_shard` on every block, then the root)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed strategy {strategy!r} is not one of {STRATEGIES}")
    if not ctx.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in getattr(model, "layers", ()):
            fully_shard(block)
        return fully_shard(model)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # No buffer needs syncing in forward (RoPE tables are the same everywhere), and frozen PEFT bases are
    # fine without find_unused_parameters: every trainable parameter takes part in each forward.
    ddp = nn.parallel.DistributedDataParallel
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
               else {"broadcast_buffers": False})
    return ddp(model, device_ids=device_ids, **no_sync)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 shards in place, so it is its own module)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (a copy; identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` is True on any rank, so that every rank takes the same branch."""
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


class ShardedBatchSampler(Sampler[list[int]]):
    """This rank's slice of each global batch drawn by a `ResumableSampler` (whose batch size is the
    global micro-batch size). Position and epoch live in the inner sampler, so its state_dict is ours."""

    def __init__(self, sampler: ResumableSampler, rank: int = 0, world_size: int = 1):
        if sampler.batch_size % world_size:
            raise ValueError(f"global batch {sampler.batch_size} does not split over {world_size} ranks")
        self.sampler, self.rank, self.world_size = sampler, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.sampler.batch_size // self.world_size
        for batch in self.sampler:
            yield batch[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __len__(self) -> int:
        return len(self.sampler)

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.sampler.load_state_dict(state)


# --- state dicts that work for plain, DDP and FSDP2 models ---------------------------------------------

def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU copies of the trainable parameters, under the user module's names."""
    module = unwrap(model)
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    if is_sharded(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {n: t for n, t in full.items() if n in names}
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if n in names}


def load_trainable_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    module = unwrap(model)
    params = dict(module.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise ValueError(f"checkpoint has tensors the model does not: {unknown[:5]}")
    if is_sharded(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module, dict(state), options=StateDictOptions(full_state_dict=True, strict=False))
        return
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    if is_sharded(unwrap(model)):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(unwrap(model), optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if is_sharded(unwrap(model)):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(unwrap(model), optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)
