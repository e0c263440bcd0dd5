"""One RED distillation run, launched by tests/test_distributed.py under torchrun (gloo, CPU) or directly.

    python tests/distributed_worker.py OUT --grad_accum 2 [--engine ddp|fsdp2|zero2|zero3] [--resume] [--save_steps N]
        [--state_dict_type SHARDED_STATE_DICT] [--bf16] [--logit_loss_from hidden_states] [--activation_checkpointing]
        [--form_student_weights per_forward]

Trains the tiny Llama teacher for `--steps` steps at global batch 4 (per-device batch 2 x `--grad_accum` x
processes), then rank 0 writes `OUT/result.json` (projections, logged losses, channels) and the trainer exports
the merged student into `OUT/student`.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from testing_utils import end_worker_process, make_teacher  # noqa: E402

from transformers_red import RedConfig, RedDistillationTrainer  # noqa: E402
from transformers_red.resources import builtin_texts, byte_tokenizer  # noqa: E402


def shard_on_cpu_processes_with_fsdp() -> None:
    """accelerate turns FSDP on only for GPU-like devices: on gloo CPU processes it runs DDP instead (silently). This
    test harness lets accelerate's FSDP branch take CPU processes too; everything after it (accelerate's
    `fsdp2_prepare_model` and state-dict handling, Trainer's FSDP paths, the library's) is the real code."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = __init__


def run_deepspeed_on_cpu_processes() -> None:
    """accelerate finds no distributed backend for DeepSpeed on CPU processes (its device probe sees no accelerator)
    and counts 1 process although DeepSpeed joined all of them. This test harness gives accelerate gloo there, as
    it does for DDP on CPU; DeepSpeed's own setup and everything after it is the real code."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = PartialState._prepare_backend

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not cpu:
            return "gloo", DistributedType.MULTI_CPU
        return original(self, cpu, sagemaker_dp, backend)

    PartialState._prepare_backend = _prepare_backend


def record_samples() -> list:
    """Every sampled batch of this process (input ids), recorded by wrapping the trainer's sampling function."""
    from transformers_red.training import on_policy

    samples, original = [], on_policy.sample_completions

    def recorded(*args, **kwargs):
        batch = original(*args, **kwargs)
        samples.append(batch["input_ids"].tolist())
        return batch

    on_policy.sample_completions = recorded
    return samples


def main() -> None:
    faulthandler.dump_traceback_later(300, exit=True)  # a hung collective prints every rank's stack, then exits
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--grad_accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--engine", choices=["ddp", "fsdp2", "zero2", "zero3"], default="ddp")
    parser.add_argument("--save_steps", type=int, default=0)
    parser.add_argument("--state_dict_type", default="FULL_STATE_DICT", help="FSDP2's checkpoint form")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--logit_loss_from", default="logits")
    parser.add_argument("--activation_checkpointing", action="store_true")
    parser.add_argument("--form_student_weights", default="auto")
    parser.add_argument("--train", default="projections", help="RedConfig.train ('weights': the pruned baseline)")
    parser.add_argument("--bf16", action="store_true", help="mixed precision (FSDP2: its bf16 MixedPrecisionPolicy)")
    parser.add_argument("--clone_output_space", default="student")
    parser.add_argument("--lmbda", type=float, default=0.0,
                        help="on-policy share (prompt/completion data; every rank writes OUT/samples_rank<r>.json)")
    parser.add_argument("--zero_init", action="store_true",
                        help="ZeRO-3: load the teacher partitioned (from_pretrained under the DeepSpeed config)")
    args = parser.parse_args()
    extra = {}
    if args.engine == "fsdp2":
        shard_on_cpu_processes_with_fsdp()
        extra = dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                             "reshard_after_forward": True, "state_dict_type": args.state_dict_type})
    # built before the RedConfig: a DeepSpeed ZeRO-3 config makes transformers create every later model under zero.Init
    teacher = make_teacher("llama", True, {})
    use_cpu = True
    if args.engine in ("zero2", "zero3"):
        # DeepSpeed's CPU accelerator (gloo); accelerate turns DeepSpeed on only without use_cpu
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        run_deepspeed_on_cpu_processes()
        use_cpu = False
        stage = int(args.engine[-1])
        world = int(os.environ.get("WORLD_SIZE", "1"))
        zero3_extra = ({"stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": True}
                       if stage == 3 else {})
        extra = dict(deepspeed={"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": args.grad_accum,
                                "train_batch_size": 2 * args.grad_accum * world, "gradient_clipping": "auto",
                                "zero_optimization": {"stage": stage, **zero3_extra}})
    config = RedConfig(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=2,
                       gradient_accumulation_steps=args.grad_accum, max_length=32, logging_steps=1, report_to=[],
                       save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
                       use_cpu=use_cpu, seed=0, learning_rate=1e-2, calibration_num_samples=8, disable_tqdm=True,
                       erank_steps=2, erank_num_samples=4, lr_scheduler_type="constant",
                       logit_loss_from=args.logit_loss_from, activation_checkpointing=args.activation_checkpointing,
                       form_student_weights=args.form_student_weights, clone_output_space=args.clone_output_space,
                       bf16=args.bf16, train=args.train, lmbda=args.lmbda, max_new_tokens=6,
                       **extra)
    if args.zero_init:  # as accelerate's zero3_init_flag: the RedConfig's DeepSpeed config makes from_pretrained
        # partition the teacher while loading it
        from transformers import AutoModelForCausalLM

        source = os.path.join(args.out, "teacher")
        if int(os.environ.get("RANK", "0")) == 0:
            teacher.save_pretrained(source)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        teacher = AutoModelForCausalLM.from_pretrained(source).eval()
    partitioned_teacher = all(hasattr(p, "ds_id") for p in teacher.parameters())
    texts = builtin_texts(32)
    data = ({"prompt": [t[:20] for t in texts], "completion": [t[20:32] for t in texts]} if args.lmbda
            else {"text": texts})
    samples = record_samples() if args.lmbda else []
    trainer = RedDistillationTrainer(model=teacher, args=config, train_dataset=datasets.Dataset.from_dict(data),
                                     processing_class=byte_tokenizer())
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    trainer.save_model(os.path.join(args.out, "student"))
    weights = args.train == "weights"
    # every rank: collectives under FSDP2 and ZeRO-3
    state = trainer._full_student_state() if weights else trainer.red_model.adapter_state_dict()
    config = trainer._adapter_config
    counts = [[config.calibration_num_texts, config.calibration_num_tokens]]
    if torch.distributed.is_initialized():  # what each rank would write on its card
        counts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(counts, [config.calibration_num_texts, config.calibration_num_tokens])
    checksums = None
    if args.lmbda:  # what each rank holds after the run (DDP keeps the projections equal)
        mine = sorted((k, float(v.double().abs().sum())) for k, v in state.items())
        checksums = [mine]
        if torch.distributed.is_initialized():
            checksums = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(checksums, mine)
    if args.lmbda:
        with open(os.path.join(args.out, f"samples_rank{trainer.args.process_index}.json"), "w",
                  encoding="utf-8") as f:
            json.dump(samples, f)
    if trainer.is_world_process_zero():
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        result = {"world_size": trainer.accelerator.num_processes, "losses": losses, "out": args.out,
                  "forms_per_step": trainer._forms_per_step, "tokens_trained": trainer._total_train_tokens,
                  "partitioned_teacher": partitioned_teacher,
                  "sharded": sorted({n.rsplit(".", 1)[-1] for n, p in trainer.model.named_parameters()
                                     if type(p.data).__name__ == "DTensor"}),
                  "model_class": type(trainer.model_wrapped).__name__,
                  "channels": None if weights else trainer.red_model.channel_indices.tolist(),
                  "calibration_counts": counts,
                  "clone_scales": {"|".join(k): v for k, v in (trainer._clone.scales or {}).items()},
                  "erank_steps": [r["step"] for r in trainer._erank_callback.history],
                  "rank_checksums": checksums, "rollout_seconds": trainer.rollout_seconds,
                  "state": {k: v.float().tolist() for k, v in state.items()}}
        with open(os.path.join(args.out, "result.json"), "w", encoding="utf-8") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
    end_worker_process()
