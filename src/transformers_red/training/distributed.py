"""Who does what in a multi-process run (DDP, FSDP, DeepSpeed): what every rank must agree on, and when it waits.

Every rank must train the same student, so the channel selection and the clone normalisers are computed once, on
global rank 0, and sent to the others (a calibration repeated per rank costs N forwards and could differ in the
last bit between devices). Files are written by rank 0 after a barrier, so no rank moves a folder another is
still writing into. Single-process runs (no initialised process group) call straight through.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch.distributed as dist
from torch import nn

from ..adapter.layer import RedLinear, RedRMSNorm

# DeepSpeed reduces a leaf module's gradients in its full backward hook, which fires when the gradients of the
# module's inputs are ready: for the embedding (integer input ids) that is before its projection's gradient exists,
# so `RedEmbedding` is left to ZeRO-3's per-module hooks (its forward gathers the projection it owns and the base
# embedding's forward its table). The linear and norm wrappers read their base layer's weight inside their own
# forward and must be gathered as one unit with it.
ZERO3_LEAF_CLASSES = (RedLinear, RedRMSNorm)

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    return not is_distributed() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    if is_distributed():
        dist.barrier()


def from_main_process(compute: Callable[[], T]) -> T:
    """Run `compute()` on global rank 0 only and give its (picklable) result to every rank.

    An exception on rank 0 is raised on every rank (the others would otherwise wait in the broadcast forever).
    """
    if not is_distributed():
        return compute()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", compute())
        except Exception as err:  # sent to the other ranks, then raised here too
            box[0] = ("error", err)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        if dist.get_rank() == 0:
            raise value
        raise RuntimeError(f"Rank 0 failed while computing what every rank needs: {type(value).__name__}: {value}")
    return value


@contextlib.contextmanager
def whole_parameters(model: nn.Module) -> Iterator[None]:
    """Within this context a sharded model has its weights whole on every rank: a teacher loaded partitioned
    (DeepSpeed ZeRO-3 `zero.Init`) or trained under ZeRO-3, or FSDP2 units (`fully_shard`). Calibration, the
    projections' initial values and merging read real tensors then. A collective under sharding: every rank
    enters it. A no-op for ordinary models.
    """
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    fsdp_units = [m for m in model.modules() if _is_fsdp2_unit(m)]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
            yield
        return
    for unit in fsdp_units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in fsdp_units:
            unit.reshard()


def reshard(model: nn.Module) -> None:
    """Free the gathered weights of every FSDP2 unit of `model` (a no-op for others). A forward without a backward
    (eRank, evaluation) leaves the units FSDP does not reshard after forward (the root, the head group) gathered,
    and gathered units register plain tensors instead of the sharded parameters the optimizer holds."""
    for unit in model.modules():
        if _is_fsdp2_unit(unit):
            unit.reshard()


def _is_fsdp2_unit(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 keeps it private
        return False
    return isinstance(module, FSDPModule)


def register_zero3_leaf_modules(model: nn.Module) -> None:
    """Have DeepSpeed ZeRO-3 treat each RED wrapper as one unit: its forward gathers the frozen base layer's weight
    with the projection it owns (the student pass forms W_T @ P from both inside the wrapper's forward)."""
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, list(ZERO3_LEAF_CLASSES))
