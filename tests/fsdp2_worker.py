"""A RedModel under FSDP2 (`fully_shard` per decoder layer, then the root), launched by tests/test_distributed.py.

    torchrun --nproc_per_node 2 tests/fsdp2_worker.py OUT [--tied] [--share] [--bf16]
    python tests/fsdp2_worker.py OUT [--tied] [--share] [--bf16]   # the same computation on one process, unsharded

`--bf16`: a bf16 teacher, so each FSDP unit mixes bf16 frozen weights with the float32 projections and gains
(`RedAdapterConfig.trainable_dtype="float32"`).

accelerate enables FSDP only for GPU-like devices, so on the CPU the test shards the model itself, as accelerate's
`fsdp_version: 2` does (decoder layers, then the root). One SGD step of a distillation loss (student CE + KL to
the teacher pass of the same weights) on a global batch of 4 split over the ranks; rank 0 writes `OUT/result.json`
with the gradients (full tensors), the adapter state after the step, and the merged student's logits, all taken
through the library's own gathering (`adapter_state_dict`, `whole_parameters`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from testing_utils import (  # noqa: E402
    SHARDING_BATCH,
    distillation_loss,
    end_worker_process,
    make_teacher,
    sharding_adapter_config,
    trainable_gradients,
)

from transformers_red import get_red_model  # noqa: E402
from transformers_red.training.distributed import whole_parameters  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--tied", action="store_true")
    parser.add_argument("--share", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    distributed = "WORLD_SIZE" in os.environ
    rank, world = 0, 1
    teacher = make_teacher("llama", args.tied, {})
    red = get_red_model(teacher.to(torch.bfloat16) if args.bf16 else teacher, sharding_adapter_config(args.share))
    if distributed:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        mesh = init_device_mesh("cpu", (world,))
        for layer in red.layout.layers:
            fully_shard(red.base_model.get_submodule(layer), mesh=mesh)
        fully_shard(red, mesh=mesh)
    input_ids = SHARDING_BATCH
    distillation_loss(red, red, input_ids.chunk(world)[rank]).backward()  # FSDP averages the ranks' gradients
    grads = trainable_gradients(red, lambda p: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
    grad_dtypes = sorted({str(g.dtype) for g in grads.values()})
    grads = {k: g.tolist() for k, g in grads.items()}
    with torch.no_grad():
        for p in red.trainable_parameters():
            p -= 0.5 * p.grad
    state = red.adapter_state_dict()  # a collective under FSDP2
    with whole_parameters(red):  # every rank merges: the merge checks itself with a forward, a collective here
        merged = red.merge_and_unload()
        merged_logits = merged(input_ids=input_ids).logits.float()
    if distributed:
        dist.barrier()
    if rank == 0:
        with open(os.path.join(args.out, "result.json"), "w", encoding="utf-8") as f:
            json.dump({"world_size": world, "sharded": sorted({type(p).__name__ for p in red.parameters()}),
                       "grads": grads, "grad_dtypes": grad_dtypes, "merged_dtype": str(merged.dtype),
                       "state": {k: v.float().tolist() for k, v in state.items()},
                       "merged_logits": merged_logits.tolist()}, f)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    end_worker_process()
