"""Process groups under torchrun: one process per device, gloo on CPU and nccl on CUDA.

A single process is the world-size-1 case of the same code, so one command runs anywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size, its device and the backend (None alone)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        """Rank 0 logs and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; expected one of ['auto', 'cpu', 'cuda']")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but CUDA is not available; use 'cpu' or 'auto'")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes in the environment, or run alone without one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = _resolve_device(device, local_rank)
    if world_size == 1:
        return DistContext(0, 1, 0, resolved, None)
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistContext(rank, world_size, local_rank, resolved, backend)


def cleanup(context: DistContext) -> None:
    """Leave the process group if this module joined one."""
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistContext) -> None:
    """Wait for every rank (no-op alone)."""
    if context.distributed:
        dist.barrier()


def all_reduce_sum(context: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place and return it (no-op alone)."""
    if context.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(context: DistContext, model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank, so all ranks evaluate the saved model."""
    if context.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def all_gather_objects(context: DistContext, value: object) -> list[object]:
    """Every rank's `value`, in rank order (a one-element list alone)."""
    if not context.distributed:
        return [value]
    gathered: list[object] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(context: DistContext, value: object) -> object:
    """Rank 0's `value` on every rank."""
    if not context.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are taken over the whole global batch, on any device.

    `torch.nn.SyncBatchNorm` refuses CPU tensors; this one uses differentiable all-reduces (two
    passes: mean, then centred variance), so it works with gloo and gives a single process's
    BatchNorm over the concatenated batch. Its state dict keys are BatchNorm's.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected a (B, C, ...) input, got shape {tuple(input.shape)}")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        from torch.distributed.nn.functional import all_reduce

        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.float()
        count = all_reduce(torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64, device=x.device))
        n = count.to(x.dtype)
        mean = all_reduce(x.sum(dims)) / n                          # (C,)
        var = all_reduce((x - mean.view(shape)).pow(2).sum(dims)) / n  # biased, as used for normalising
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * (n / (n - 1).clamp(min=1))
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm layers to `torch.nn.SyncBatchNorm` on CUDA, to `GlooSyncBatchNorm` elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert_gloo(model)


def _convert_gloo(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlooSyncBatchNorm):
        converted = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                      module.track_running_stats)
        converted.load_state_dict(module.state_dict())
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, _convert_gloo(child))
    return module
