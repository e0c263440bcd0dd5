"""A RedModel under DeepSpeed ZeRO-3 (CPU accelerator, gloo), launched by tests/test_distributed.py.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/zero3_worker.py OUT [--tied] [--share]
    python tests/zero3_worker.py OUT --reference [--tied] [--share]     # the same step, plain PyTorch

`deepspeed.initialize` partitions every parameter (persistence threshold 0, so even the norm gains are
partitioned), with the RED wrappers registered as ZeRO-3 leaf modules (`register_zero3_leaf_modules`): each
wrapper's forward must gather the frozen teacher weight and the projection it owns together. One SGD step of a
distillation loss (student CE + KL to the teacher pass of the same weights) on a global batch of 4 split over the
ranks; rank 0 writes `OUT/result.json` with the gradients (gathered), the adapter state after the step
(`adapter_state_dict`, which gathers the partitions) and the merged student's logits (merged on every rank inside
`whole_parameters`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

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
from transformers_red.training.distributed import register_zero3_leaf_modules, whole_parameters  # noqa: E402

LR = 0.5


def reference(args) -> dict:
    red = get_red_model(make_teacher("llama", args.tied, {}), sharding_adapter_config(args.share))
    distillation_loss(red, red, SHARDING_BATCH).backward()
    grads = {k: g.tolist() for k, g in trainable_gradients(red).items()}
    with torch.no_grad():
        for p in red.trainable_parameters():
            p -= LR * p.grad
    return {"world_size": 1, "grads": grads, "state": {k: v.tolist() for k, v in red.adapter_state_dict().items()},
            "merged_logits": red.merge_and_unload()(input_ids=SHARDING_BATCH).logits.tolist()}


def zero3(args) -> dict:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = {"train_micro_batch_size_per_gpu": 4 // world, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                    "stage3_max_live_parameters": 0, "stage3_prefetch_bucket_size": 0},
              "optimizer": {"type": "SGD", "params": {"lr": LR}}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 0.0, "wall_clock_breakdown": False}
    red = get_red_model(make_teacher("llama", args.tied, {}), sharding_adapter_config(args.share))
    register_zero3_leaf_modules(red)
    engine, *_ = deepspeed.initialize(model=red, model_parameters=red.trainable_parameters(), config=config)
    partitioned = all(hasattr(p, "ds_id") for p in red.parameters())
    empty_between_forwards = all(p.data.numel() == 0 for p in red.trainable_parameters())
    engine.backward(distillation_loss(engine, red, SHARDING_BATCH.chunk(world)[rank]))
    from deepspeed.utils import safe_get_full_grad

    grads = {k: g.tolist() for k, g in trainable_gradients(red, safe_get_full_grad).items()}
    engine.step()
    state = red.adapter_state_dict()  # gathers the partitions: a collective
    with whole_parameters(red):  # every rank merges: the merge checks itself with a forward, a collective here
        merged_logits = red.merge_and_unload()(input_ids=SHARDING_BATCH).logits
    dist.barrier()
    return {"world_size": world, "rank": rank, "partitioned": partitioned,
            "empty_between_forwards": empty_between_forwards, "grads": grads,
            "state": {k: v.tolist() for k, v in state.items()}, "merged_logits": merged_logits.tolist()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--tied", action="store_true")
    parser.add_argument("--share", action="store_true")
    parser.add_argument("--reference", action="store_true")
    args = parser.parse_args()
    result = reference(args) if args.reference else zero3(args)
    if result.get("rank", 0) == 0:
        with open(os.path.join(args.out, "result.json"), "w", encoding="utf-8") as f:
            json.dump(result, f)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    end_worker_process()
