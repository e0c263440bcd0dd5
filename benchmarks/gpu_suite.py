"""Every GPU check of RED in one call: step throughput against plain training, MFU, and peak memory against
`transformers_red.training.memory_plan.estimate_memory`, at two model sizes.

For each shape (`--shapes`; random weights, `AutoModelForCausalLM.from_config(LlamaConfig(...))` built on the device
in bf16 with SDPA attention; nothing is downloaded):

  llama-3b:      Llama-3.2-3B-like teacher, d_T 3072 -> d_S 1536, 28 layers, FFN 8192, 24 heads / 8 KV heads
                 (head_dim 128), vocabulary 128256, tied embeddings; micro-batch 8 x 2048.
  smollm2-135m:  SmolLM2-135M-like teacher, d_T 576 -> d_S 288, 30 layers, FFN 1536, 9 / 3 heads (head_dim 64),
                 vocabulary 49152, tied; micro-batch 8 x 2048.

it measures, in this order, on one batch of random token ids (labels = input_ids, no padding):

  RED step:   `RedDistillationTrainer.training_step` + `optimizer.step()` + `zero_grad()` (the optimizer from
              `trainer.create_optimizer()`), `RedConfig(logit_loss_from="hidden_states", bf16=True)` and the other
              defaults (clone_weight 0.2 over all clone terms, KL + CE). The trainer calibrates on the built-in texts
              through the byte tokenizer. The teacher's weights are bf16; the projections, gains and their AdamW
              state are float32 masters (`RedAdapterConfig.trainable_dtype`, cast to bf16 in each forward); no
              autocast.
  plain step: the merged student (`red.merge_and_unload()`, a plain LlamaForCausalLM of width d_S, bf16) trained
              as a user would: forward with `labels` (HF's cross entropy on the full logits), backward, the AdamW
              `Trainer` would build (same class and arguments as the RED step's), `zero_grad(set_to_none=True)`.
              The RED trainer and teacher are freed first, so each peak is that method's alone.

`--warmup` untimed steps, then `--steps` timed ones (CUDA synchronised around each); medians are reported.
Results per shape:

  - tokens/s of each (B x T / median step time) and their ratio RED / plain (target >= 0.58). "ideal ratio" is
    6 N_S / (6 N_S + 2 N_T): the ratio if both ran at the same MFU (RED also runs the teacher forward).
  - MFU = model FLOPs per token x tokens/s / peak. Model FLOPs per token: plain 6 N_S (forward + backward of the
    student), RED 6 N_S + 2 N_T (the same student work plus the teacher's forward). N_S / N_T: parameters of the
    merged student / the teacher, counted once (a tied embedding counts once, standing for the LM head's matmul;
    the embedding lookup itself costs nothing). Not counted: attention's T^2 terms, RED's weight forming
    (W_T @ P per module per step), the clone loss, recomputation. Peak: `--peak-tflops`, default 989 (H100 /
    H200 SXM dense bf16); on the CPU (`--tiny`) the fp32 matmul throughput measured on the spot.
  - peak memory of one more step: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()` (the
    absolute peak, resident weights and optimizer state included, and the part above the start; on the CPU the
    resident set, only a smoke value: the allocator keeps freed memory), next to
    `estimate_memory(...)` for the same run where that module exists ("not available" otherwise).
  - on CUDA out-of-memory the whole shape is redone at half the micro-batch (8 -> 4 -> 2 -> 1); the attempts are
    recorded.

Writes `results.json` and `results.md` into `--out` (default: `$OUT`, else `./gpu-suite-<time>`). About 3-8 minutes
on one H100 / H200. `--tiny` runs tiny shapes in float32 on the CPU (a few steps, well under a minute on 2 cores),
to check the script; without CUDA and without `--tiny` it exits with a message.

    python benchmarks/gpu_suite.py                        # on a GPU machine; results in $OUT
    python benchmarks/gpu_suite.py --tiny --out /tmp/gpu-suite-smoke
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import GIB, environment_line, make_plain_step, make_trainer_step, peak_memory, tensor_bytes, timed  # noqa: E402

TARGET_RATIO = 0.58  # RED tokens/s >= 0.58 x plain training of the same-size student
H100_BF16_DENSE_TFLOPS = 989.0


def _llama(hidden, ffn, layers, heads, kv_heads, head_dim, vocab, rope_theta, positions) -> dict:
    """LlamaConfig fields of a tied-embedding Llama."""
    return dict(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=vocab, tie_word_embeddings=True,
                rope_theta=rope_theta, rms_norm_eps=1e-5, max_position_embeddings=positions)


# name -> (LlamaConfig fields, student width d_S, micro-batch, sequence length)
SHAPES = {
    "llama-3b": (_llama(3072, 8192, 28, 24, 8, 128, 128256, 500000.0, 8192), 1536, 8, 2048),
    "smollm2-135m": (_llama(576, 1536, 30, 9, 3, 64, 49152, 100000.0, 8192), 288, 8, 2048),
}
# --tiny: the same names, shapes small enough for a CPU smoke run
TINY_SHAPES = {
    "llama-3b": (_llama(64, 160, 2, 4, 2, 16, 1024, 500000.0, 256), 32, 2, 64),
    "smollm2-135m": (_llama(48, 128, 2, 3, 1, 16, 512, 100000.0, 256), 24, 2, 64),
}
OOM_ERRORS = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})


# --------------------------------------------------------------------------------------------- building
def build_teacher(fields: dict, device: torch.device, dtype: torch.dtype):
    """A random-weight Llama of `fields`, built directly on `device` in `dtype`, SDPA attention, eval mode."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(**fields)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def random_batch(batch_size: int, seq_len: int, vocab_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def unique_parameters(model) -> int:
    """Parameters counted once (tied weights once)."""
    return sum(p.numel() for p in model.parameters())


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def cpu_matmul_tflops(size: int = 512, repeats: int = 20) -> float:
    """fp32 matmul throughput of this CPU, TFLOP/s: the --tiny run's stand-in for a datasheet peak."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


# -------------------------------------------------------------------------------------------- measuring
def time_steps(step, device: torch.device, warmup: int, steps: int) -> dict:
    for _ in range(warmup):
        timed(step, device, collect=False)
    gc.collect()
    gc.freeze()  # a full collection costs ~1 s with transformers loaded; frozen objects are not scanned again
    try:
        walls = [timed(step, device)[0] for _ in range(steps)]
        start, above = peak_memory(step, device)
    finally:
        gc.unfreeze()
    return {"step_s_median": statistics.median(walls), "step_s_min": min(walls), "steps_s": walls,
            "memory_at_start_bytes": start, "peak_above_start_bytes": above,
            "peak_bytes": None if start is None else start + above}


def memory_estimate(config, d_s: int, batch_size: int, seq_len: int, dtype: str, red_args) -> dict:
    """`estimate_memory` for this run, or {"available": False, ...} where the module does not exist yet."""
    try:
        from transformers_red.training.memory_plan import estimate_memory
    except ImportError as err:
        return {"available": False, "reason": f"not available ({err})"}
    plan = estimate_memory(config, target_hidden_size=d_s, micro_batch_size=batch_size, seq_len=seq_len, dtype=dtype,
                           loss_chunk_size=red_args.loss_chunk_size, logit_loss_from=red_args.logit_loss_from,
                           clone_terms=tuple(red_args.clone_terms) if red_args.clone_weight else ())
    return {"available": True, "total_bytes": plan.total, "components_bytes": dict(plan.components),
            "trainable_parameters": plan.trainable_parameters}


def run_shape(name: str, fields: dict, d_s: int, batch_size: int, seq_len: int, args, device: torch.device,
              dtype: torch.dtype) -> dict:
    """One shape at one micro-batch: the RED step, then the plain step of the merged student."""
    out_dir = tempfile.mkdtemp(prefix="red_gpu_suite_")
    try:
        return _run_shape(name, fields, d_s, batch_size, seq_len, args, device, dtype, out_dir)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _run_shape(name, fields, d_s, batch_size, seq_len, args, device, dtype, out_dir) -> dict:
    import datasets

    from transformers_red import RedConfig, RedDistillationTrainer
    from transformers_red.resources import builtin_texts, byte_tokenizer

    teacher = build_teacher(fields, device, dtype)
    batch = random_batch(batch_size, seq_len, fields["vocab_size"], device)
    teacher_config = copy.deepcopy(teacher.config)
    n_teacher = unique_parameters(teacher)
    red_args = RedConfig(output_dir=out_dir, target_hidden_size=d_s, logit_loss_from="hidden_states",
                         bf16=dtype == torch.bfloat16, use_cpu=device.type == "cpu",
                         per_device_train_batch_size=batch_size, max_length=seq_len, max_steps=10**6, report_to=[],
                         save_strategy="no", logging_steps=10**6, disable_tqdm=True, seed=0,
                         keep_freed_cpu_memory=False)
    trainer = RedDistillationTrainer(model=teacher, args=red_args, train_dataset=datasets.Dataset.from_dict(
        {"text": builtin_texts(32)}), processing_class=byte_tokenizer())
    red_step, num_items = make_trainer_step(trainer, batch)
    red = trainer.red_model
    n_trainable = sum(p.numel() for p in red.trainable_parameters())
    red_result = time_steps(red_step, device, args.warmup, args.steps)
    red_result["resident_state_bytes"] = tensor_bytes(red, trainer.optimizer)

    student = red.merge_and_unload()
    del red_step, red, trainer, teacher
    free(device)
    n_student = unique_parameters(student)
    plain_step, optimizer = make_plain_step(student, red_args, batch)
    plain_result = time_steps(plain_step, device, args.warmup, args.steps)
    plain_result["resident_state_bytes"] = tensor_bytes(student, optimizer)
    del plain_step, optimizer, student, batch
    free(device)

    tokens = batch_size * seq_len
    flops = {"plain": 6 * n_student, "red": 6 * n_student + 2 * n_teacher}
    for key, res in (("red", red_result), ("plain", plain_result)):
        res["tokens_per_s"] = tokens / res["step_s_median"]
        res["model_flops_per_token"] = flops[key]
        res["mfu"] = flops[key] * res["tokens_per_s"] / (args.peak_tflops * 1e12)
    estimate = memory_estimate(teacher_config, d_s, batch_size, seq_len, "bf16" if dtype == torch.bfloat16 else
                               "fp32", red_args)
    if estimate["available"]:
        estimate["trainable_parameters_match"] = estimate["trainable_parameters"] == n_trainable
        if device.type == "cuda":
            estimate["measured_peak_over_estimate"] = red_result["peak_bytes"] / estimate["total_bytes"]
    ratio = red_result["tokens_per_s"] / plain_result["tokens_per_s"]
    return {"shape": name, "teacher_config": fields, "teacher_hidden_size": fields["hidden_size"],
            "student_hidden_size": d_s, "batch_size": batch_size, "seq_len": seq_len, "tokens_per_step": tokens,
            "num_items_in_batch": int(num_items), "teacher_parameters": n_teacher, "student_parameters": n_student,
            "red_trainable_parameters": n_trainable, "red": red_result, "plain": plain_result,
            "ratio_red_over_plain_tokens_per_s": ratio, "ideal_ratio": flops["plain"] / flops["red"],
            "target_ratio": TARGET_RATIO, "target_met": ratio >= TARGET_RATIO, "memory_estimate": estimate}


def measure_shape(name: str, args, device: torch.device, dtype: torch.dtype) -> dict:
    """run_shape, halving the micro-batch on CUDA out-of-memory until it fits (or 1 does not)."""
    fields, d_s, batch_size, seq_len = (TINY_SHAPES if args.tiny else SHAPES)[name]
    batch_size = args.batch_size or batch_size
    seq_len = args.seq_len or seq_len
    attempts = []
    while True:
        print(f"[{name}] micro-batch {batch_size} x {seq_len} ...", flush=True)
        error = None
        try:
            result = run_shape(name, fields, d_s, batch_size, seq_len, args, device, dtype)
        except OOM_ERRORS as err:
            error = f"{type(err).__name__}: {str(err).splitlines()[0]}"
        if error is None:
            result["oom_attempts"] = attempts
            return result
        free(device)  # the frames of the failed attempt are gone with the exception
        attempts.append({"batch_size": batch_size, "error": error})
        print(f"[{name}] out of memory at micro-batch {batch_size}: {error}", flush=True)
        if batch_size == 1:
            return {"shape": name, "error": "out of memory at micro-batch 1", "oom_attempts": attempts}
        batch_size //= 2


# --------------------------------------------------------------------------------------------- reporting
def _gib(value) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def markdown(report: dict) -> str:
    lines = [f"# GPU suite ({'--tiny, CPU smoke run' if report['tiny'] else report['device']})", "",
             f"{report['date']}; {report['environment']}; peak {report['peak_tflops']:.3g} TFLOP/s "
             f"({report['peak_source']}); {report['warmup']} warm-up + {report['steps']} timed steps, medians.", "",
             "| shape | B x T | RED tok/s | plain tok/s | RED / plain (target >= 0.58) | ideal | MFU RED | MFU plain "
             "| peak GiB RED | peak GiB plain | estimate GiB | measured / estimate |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["shapes"].values():
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['error']} |" + " |" * 10)
            continue
        est = r["memory_estimate"]
        est_total = _gib(est["total_bytes"]) if est["available"] else "not available"
        over = est.get("measured_peak_over_estimate")
        lines.append(
            f"| {r['shape']} | {r['batch_size']} x {r['seq_len']} | {r['red']['tokens_per_s']:.0f} | "
            f"{r['plain']['tokens_per_s']:.0f} | {r['ratio_red_over_plain_tokens_per_s']:.3f} "
            f"({'met' if r['target_met'] else 'missed'}) | {r['ideal_ratio']:.3f} | {r['red']['mfu']:.3f} | "
            f"{r['plain']['mfu']:.3f} | {_gib(r['red']['peak_bytes'])} | {_gib(r['plain']['peak_bytes'])} | "
            f"{est_total} | {'-' if over is None else f'{over:.2f}'} |")
    lines += ["", "Model FLOPs per token: plain 6 N_S, RED 6 N_S + 2 N_T (N: parameters counted once; attention's "
              "T^2 terms, weight forming and the clone loss not counted). Peak memory: "
              "torch.cuda.max_memory_allocated over one step, resident weights and optimizer state included (CPU: "
              "resident set at the start plus the peak above it). Out-of-memory attempts: " +
              ("; ".join(f"{r['shape']} at B={a['batch_size']}" for r in report["shapes"].values()
                         for a in r["oom_attempts"]) or "none") + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, float32, on the CPU: a smoke run")
    parser.add_argument("--out", default=None, help="folder for results.json / results.md (default: $OUT)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--batch-size", type=int, default=None, help="micro-batch to start from (default per shape)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (default per shape)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3; --tiny 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; --tiny 2)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help=f"peak for MFU (default {H100_BF16_DENSE_TFLOPS:g}, H100/H200 dense bf16; --tiny: "
                             "measured CPU fp32 matmul)")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_suite.py: no CUDA device. This suite measures GPU throughput and memory; run it on a GPU "
              "machine, or with --tiny for the CPU smoke run of the script.", file=sys.stderr)
        return 2
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 10)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    out = args.out or os.environ.get("OUT") or f"gpu-suite-{time.strftime('%Y%m%d-%H%M%S')}"
    os.makedirs(out, exist_ok=True)

    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore")
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.peak_tflops is None:
        if args.tiny:
            args.peak_tflops, peak_source = None, "measured CPU fp32 matmul, one thread"
        else:
            args.peak_tflops = H100_BF16_DENSE_TFLOPS
            name = torch.cuda.get_device_name()
            peak_source = "H100/H200 SXM dense bf16" + ("" if any(g in name for g in ("H100", "H200")) else
                                                         f" (assumed; the device is {name}: pass --peak-tflops)")
    else:
        peak_source = "--peak-tflops"
    if not args.tiny:
        torch.backends.cuda.matmul.allow_tf32 = True
    threads = torch.get_num_threads()
    if args.tiny:
        torch.set_num_threads(1)  # tiny matmuls: one thread, so other load on the CPU cannot stall a thread team
        if args.peak_tflops is None:
            args.peak_tflops = cpu_matmul_tflops()
    try:
        return _main(args, out, device, dtype, peak_source)
    finally:
        torch.set_num_threads(threads)


def _main(args, out: str, device: torch.device, dtype: torch.dtype, peak_source: str) -> int:
    report = {"tiny": args.tiny, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "environment": environment_line(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "dtype": str(dtype).replace("torch.", ""), "attention": "sdpa", "peak_tflops": args.peak_tflops,
              "peak_source": peak_source, "warmup": args.warmup, "steps": args.steps,
              "flop_count": "plain: 6 N_S per token; RED: 6 N_S + 2 N_T per token; N = parameters counted once",
              "device_memory_bytes": torch.cuda.get_device_properties(0).total_memory if device.type == "cuda"
              else None, "shapes": {}}
    print(report["environment"], flush=True)
    started = time.perf_counter()
    for name in args.shapes:
        report["shapes"][name] = measure_shape(name, args, device, dtype)
        with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:  # partial results survive
            json.dump(report, f, indent=2)
    report["wall_s"] = time.perf_counter() - started
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    text = markdown(report)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text, flush=True)
    print(f"wrote {os.path.join(out, 'results.json')} and results.md ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
