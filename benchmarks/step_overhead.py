"""What one RedDistillationTrainer step costs, against what the method needs by design and against TRL's GKD.

For each model (`--models`: a tiny Llama, SmolLM2-135M-Instruct, and a tiny-width Llama with Qwen2.5's
152064-token vocabulary; all at 50% width), in ONE process, on one packed batch of `--batch-size` x `--seq-len`
tokens (built-in English texts, labels = input_ids, no padding):

  (a) teacher forward: the plain teacher (a deep copy taken before wrapping), `torch.no_grad()`,
      `use_cache=False`, full (B, T, V) logits.
  (b) plain student step (plain SFT): the merged student (`red.merge_and_unload()`, a plain HF model of width d_S)
      in train mode: forward with `labels` (HF causal-LM loss), backward, AdamW step over all its parameters
      (the optimizer class and arguments `Trainer` would use), `zero_grad(set_to_none=True)`.
  (w) weight forming: what the method adds by design. For every RedLinear of the RedModel, the student
      weight `layer.student_weight()` (W_T @ P or P^T @ W_T, the op the forward uses; and the output-side
      bias b_T @ P where there is one); for the RedEmbedding, the gather + `(B, T, d_T) @ P` the forward
      uses. Then one `torch.autograd.backward(formed, fixed_random_grads)` into the projections, and the
      projection grads are cleared. No loss, no elementwise products: only the forming matmuls and their
      backward matmuls.
  (c) RED step from (B, T, V) logits (`RedConfig(logit_loss_from="logits", loss_chunk_size=1024)`, the default
      until 2026-12-08): `trainer.training_step(trainer.model, inputs, num_items_in_batch)` then
      `trainer.optimizer.step(); trainer.optimizer.zero_grad()` (optimizer from `trainer.create_optimizer()`),
      i.e. teacher pass (same weights, adapter disabled, clone modules captured), student pass (captured),
      fused KL + CE (`fused_logit_loss`), clone MSE, backward, AdamW over the projections and norm gains.
      Not included: gradient clipping, LR scheduler, data loading, logging (the rest of Trainer's inner loop).
  (h) the same RED step at today's default logit path, `RedConfig(logit_loss_from="hidden_states")` with the
      automatic chunk (a second trainer over the same RedModel, its own optimizer): logit losses from the final
      hidden states and head weights, chunk by chunk, no (B, T, V) tensor.
  (f) the RED step of (c) with `RedConfig(form_student_weights="per_forward")` (a third trainer): with
      `--grad-accum N` > 1, (c) forms the student weights once per optimizer step (the default) and (f) once per
      micro-batch, so (c) / (f) is what per-step forming saves. Without accumulation the two are the same step.
  (g) GKD step: TRL's `GKDTrainer` (`trl.experimental.gkd`, else `trl.GKDTrainer`) with `lmbda=0` (supervised KD on
      the dataset, no generation), `beta=0` (forward KL), `temperature=1`, training a plain model of the teacher's
      class with the merged student's shapes and weights (a second `red.merge_and_unload()`) from the plain
      teacher of (a), on the same batch, stepped as (c). Its loss is the KL alone (no CE, no clone term).

`--phases` picks which of them run (default all). Measurements are interleaved (a, b, w, c, h, g, a, b, ...); the
first `--warmup` rounds are discarded. The
tables give median wall times; the same ratios are also printed from the minimum wall times and from the median
process CPU time (`time.process_time()`, all threads), which other load on a shared machine disturbs less.

Memory, after the timed rounds, one more step of every phase (`--no-memory` skips it):
  - transient peak: the phase's peak memory above what was in use at its start. CPU: peak RSS (VmHWM, reset
    through /proc/self/clear_refs) minus RSS at the start, with glibc set for this pass to return every block
    of 1 MiB or more to the OS on free and the heap trimmed before each phase (otherwise memory kept from an
    earlier phase is reused without showing; the timed rounds keep `RedConfig.keep_freed_cpu_memory`). CUDA:
    `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus `memory_allocated()` at the
    start.
  - resident state: bytes of the tensors the method keeps between steps (weights, buffers, optimizer state;
    shared storage counted once): (a) the plain teacher; (b) the student and its AdamW state; (c) / (h) the
    RedModel (the teacher's weights plus projections and gains) and the trainer's AdamW state; (g) the GKD
    student, its AdamW state and the teacher.
"Peak RSS" in the main table is the process peak (`ru_maxrss`) read after each model's block: cumulative over
everything the process did before, including the extra copies the benchmark holds.

`--breakdown` also times the parts of (c) separately (re-doing `compute_loss`'s steps one by one with the
trainer's own helpers) and a few reference pieces; `--profile` prints a torch.profiler table of one (c) step.
`--threads N` calls torch.set_num_threads(N) (default: torch's own default, one thread per usable core).
`--device cuda` runs everything on the GPU (float32, CUDA work waited for in every timing). On CPU the trainers
are built before anything is timed, so with `RedConfig.keep_freed_cpu_memory` (on here) every phase, baseline
included, runs under the same allocator settings; `--return-freed-memory` turns them off. `--json PATH` writes
the results.

    python benchmarks/step_overhead.py --models tiny
    python benchmarks/step_overhead.py --models smollm2 --repeats 3 --threads 1                  # 8 x 256
    python benchmarks/step_overhead.py --models smollm2 --repeats 5 --threads 1 --batch-size 4 --seq-len 128
    python benchmarks/step_overhead.py --models qwen-vocab --repeats 3 --threads 1
    python benchmarks/step_overhead.py --models tiny smollm2 --repeats 3 --breakdown --phases a b w c
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
from _common import (  # noqa: E402
    GIB,
    environment_line,
    make_plain_step,
    make_trainer_step,
    peak_memory,
    peak_rss_gib,
    set_allocator_returns_memory,
    tensor_bytes,
    timed,
)

ALL_PHASES = ("a", "b", "w", "c", "h", "f", "g")
TARGET = 1.15  # the issue's bound on (c) / ((a) + (b) + (w)) for SmolLM2 on CPU
GKD_TARGET = 1.05  # what RED owes its users: (c) / (g) at any micro-batch size


# ------------------------------------------------------------------------------------------------ models
def tiny_model():
    """A tiny Llama (4 layers, d_T 256, byte vocabulary 256), random weights, and the byte tokenizer.

    Bigger than the test teacher so that the matmuls are not all noise, but small enough that framework and
    Python overhead dominate: the opposite corner from SmolLM2. The weights are random (timing does not depend
    on their values; `tiny_trained_teacher` would only add training time).
    """
    from transformers_red.resources import byte_tokenizer, tiny_teacher

    teacher = tiny_teacher("llama", hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=4, head_dim=32, intermediate_size=640,
                           max_position_embeddings=1024)
    return teacher, byte_tokenizer()


def smollm2_model():
    from transformers_red.resources import load_smollm2

    return load_smollm2()


def qwen_vocab_model():
    """A tiny-width Llama (d_T 128, 2 layers, 4/2 heads, FFN 384, tied) with Qwen2.5's vocabulary of 152064,
    random weights, SDPA attention, and the byte tokenizer (the token ids of the batch stay below 256; the cost of
    a (B, T, V) tensor does not depend on them). Here the vocabulary, not the layers, sets every cost."""
    from transformers_red.resources import byte_tokenizer, tiny_teacher

    teacher = tiny_teacher("llama", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=32, intermediate_size=384, vocab_size=152064,
                           max_position_embeddings=1024, attn_implementation="sdpa")
    return teacher, byte_tokenizer()


MODELS = {"tiny": tiny_model, "smollm2": smollm2_model, "qwen-vocab": qwen_vocab_model}


def packed_batch(tokenizer, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Built-in texts, tokenised, joined with EOS and cut into `batch_size` rows of exactly `seq_len` tokens."""
    from transformers_red.resources import builtin_texts

    need, ids = batch_size * seq_len, []
    eos = tokenizer.eos_token_id
    for text in builtin_texts():
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise RuntimeError(f"The built-in texts give only {len(ids)} tokens, need {need}.")
    input_ids = torch.tensor(ids[:need], dtype=torch.long).reshape(batch_size, seq_len)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


# ------------------------------------------------------------------------------------------------ phases
def forming_work(red):
    """The RedLayers whose student weights (w) forms, with fixed random upstream grads of the right shapes."""
    from transformers_red.adapter.layer import RedEmbedding, RedLinear

    linears, embeddings = [], []
    for _, layer in red.red_layers():
        if isinstance(layer, RedLinear):
            linears.append(layer)
        elif isinstance(layer, RedEmbedding):
            embeddings.append(layer)
    return linears, embeddings


def make_phase_w(red, batch):
    linears, embeddings = forming_work(red)
    gen = torch.Generator().manual_seed(0)
    input_ids = batch["input_ids"]

    def like(shape, ref):
        return torch.randn(shape, generator=gen).to(device=ref.device, dtype=ref.dtype)

    with torch.no_grad():
        grads = []
        for layer in linears:
            grads.append(like(layer.student_weight().shape, layer.trainable))
            bias = layer.student_bias()
            if bias is not None and bias.requires_grad:
                grads.append(like(bias.shape, bias))
        for layer in embeddings:
            shape = (*input_ids.shape, layer.trainable.shape[1])
            grads.append(like(shape, layer.trainable))
    params = red.trainable_parameters()

    def phase_w():
        formed = []
        for layer in linears:
            formed.append(layer.student_weight())
            bias = layer.student_bias()
            if bias is not None and bias.requires_grad:
                formed.append(bias)
        for layer in embeddings:
            formed.append(layer.base_layer(input_ids) @ layer.trainable)
        torch.autograd.backward(formed, grads)
        for p in params:
            p.grad = None

    return phase_w


def make_phase_a(plain_teacher, batch, accumulation: int = 1):
    fwd = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def phase_a():
        for _ in range(accumulation):
            with torch.no_grad():
                logits = plain_teacher(**fwd, use_cache=False).logits
            del logits

    return phase_a


def gkd_classes():
    """TRL's (GKDConfig, GKDTrainer): `trl.experimental.gkd` in recent TRL, `trl` itself in older releases."""
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:
        from trl import GKDConfig, GKDTrainer
    return GKDConfig, GKDTrainer


def build_gkd_trainer(student, teacher, tokenizer, dataset, args, out_dir: str):
    """TRL's GKDTrainer as a user would set it for supervised KD: lmbda 0, beta 0 (forward KL), temperature 1."""
    GKDConfig, GKDTrainer = gkd_classes()
    config = GKDConfig(output_dir=out_dir, lmbda=0.0, beta=0.0, temperature=1.0,
                       per_device_train_batch_size=args.batch_size, max_length=args.seq_len, max_steps=10**6,
                       report_to=[], use_cpu=args.device == "cpu", save_strategy="no", logging_steps=10**6,
                       disable_tqdm=True, bf16=False, seed=0, gradient_accumulation_steps=args.grad_accum)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                         processing_class=tokenizer)
    trainer.create_optimizer()
    return trainer


# ----------------------------------------------------------------------------------------- breakdown of (c)
class Clock:
    """Laps of wall and process CPU time, collected per key."""

    def __init__(self):
        self.laps: dict[str, list[tuple[float, float]]] = {}
        self.restart()

    def restart(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self, key: str):
        wall, cpu = time.perf_counter(), time.process_time()
        self.laps.setdefault(key, []).append((wall - self.wall, cpu - self.cpu))
        self.wall, self.cpu = wall, cpu

    def medians(self) -> dict[str, tuple[float, float]]:
        return {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
                for k, v in self.laps.items()}


def breakdown_c(trainer, batch, num_items, rounds: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds of each part of one distillation step, done as `compute_loss` does it."""
    from transformers_red.training.losses import IGNORE_INDEX, fused_logit_loss, shift_labels

    red, args, model = trainer.red_model, trainer.args, trainer.model
    fwd = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = batch["labels"]
    clock = Clock()
    model.train()
    for _ in range(rounds):
        gc.collect()
        clock.restart()
        with trainer._teacher_pass() as (teacher, teacher_acts):
            teacher_logits = teacher(**fwd, use_cache=False).logits
        clock.lap("c1 teacher pass (wrapped, adapter off, capture)")
        with red.capture_activations(trainer._clone_names) as student_acts:
            outputs = model(**fwd, use_cache=False)
        clock.lap("c2 student forward (forms weights, capture)")
        logit_loss, (kd, ce, _) = fused_logit_loss(
            outputs.logits, teacher_logits, labels, kd_weight=args.kd_weight, ce_weight=args.ce_weight,
            beta=args.beta, temperature=args.temperature, chunk_size=args.loss_chunk_size,
            workspace=trainer._loss_workspace)
        clock.lap("c3 logit losses forward (fused KL + CE + teacher CE and their gradient)")
        token_mask = shift_labels(labels) != IGNORE_INDEX
        clone = trainer._clone.sums(student_acts, teacher_acts, token_mask) if trainer._clone is not None else {}
        clone_total = sum(clone.values()) if clone else ce.new_zeros(())
        clock.lap("c4 clone MSE forward")
        loss = (logit_loss + args.clone_weight * clone_total) / num_items
        loss.backward()
        clock.lap("c5 backward (all)")
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        clock.lap("c6 optimizer step + zero_grad")
        del teacher_logits, outputs, logit_loss, kd, ce, clone, clone_total, loss, teacher_acts, student_acts
    return clock.medians()


def breakdown_reference(trainer, plain_teacher, student, batch, rounds: int) -> dict[str, tuple[float, float]]:
    """Reference timings for reading the breakdown (not part of any ratio)."""
    from transformers_red.training import losses

    red, args = trainer.red_model, trainer.args
    fwd = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = batch["labels"]
    targets = losses.shift_labels(labels).reshape(-1)
    clock = Clock()
    student.train()
    for _ in range(rounds):
        gc.collect()
        clock.restart()
        with torch.no_grad():
            teacher_logits = plain_teacher(**fwd, use_cache=False).logits
        clock.lap("r1 plain teacher forward (= a)")
        with torch.no_grad(), red.disable_adapter():
            red(**fwd, use_cache=False)
        clock.lap("r2 wrapped teacher forward, adapter off, no capture")
        out = student(**fwd, use_cache=False)
        clock.lap("r3 merged student forward, grad on, no loss")
        del out
        gc.collect()
        clock.restart()
        with red.capture_activations():
            out = red(**fwd, use_cache=False)
        clock.lap("r3b RED student forward, grad on, capture (= c2)")
        logits = out.logits.detach().requires_grad_(True)
        del out
        gc.collect()
        clock.restart()
        total, _ = losses.fused_logit_loss(logits, teacher_logits, labels, chunk_size=args.loss_chunk_size,
                                           workspace=trainer._loss_workspace)
        total.backward()
        clock.lap("r4 logit losses fwd+bwd as in (c) (fused)")
        logits.grad = None
        del total
        kd, ce, _ = losses.logit_loss_sums(logits, teacher_logits, labels, chunk_size=args.loss_chunk_size)
        (kd + ce).backward()
        clock.lap("r4b same losses fwd+bwd, autograd reference (checkpointed chunks)")
        logits.grad = None
        flat_s = logits.reshape(-1, logits.shape[-1])
        ce_plain = torch.nn.functional.cross_entropy(flat_s.float(), targets, ignore_index=-100)
        ce_plain.backward()
        clock.lap("r5 plain CE fwd+bwd alone (what (b) pays for its loss)")
        logits.grad = None
        del ce_plain, kd, ce, logits, teacher_logits, flat_s
        if trainer._clone is not None:
            with torch.no_grad():
                with trainer._teacher_pass() as (teacher, t_acts):
                    teacher(**fwd, use_cache=False)
                with red.capture_activations(trainer._clone_names) as s_acts:
                    red(**fwd, use_cache=False)
            s_acts = {k: v.detach().requires_grad_(True) for k, v in s_acts.items()}
            mask = losses.shift_labels(labels) != losses.IGNORE_INDEX
            gc.collect()
            clock.restart()
            clone = trainer._clone.sums(s_acts, t_acts, mask)
            sum(clone.values()).backward()
            clock.lap("r6 clone MSE fwd+bwd alone (7 terms x layers)")
            for p in red.trainable_parameters():
                p.grad = None
            del s_acts, t_acts, clone
        student.zero_grad(set_to_none=True)
    return clock.medians()


def profile_c(phase_c, row_limit: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        phase_c()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit))


# --------------------------------------------------------------------------------------------------- run
def measure_memory(phases: dict, resident: dict, device: str, restore_kept: bool) -> dict[str, dict[str, float]]:
    """One more step of each phase: transient peak above its start, and the resident state it keeps, GiB."""
    on_cpu = device == "cpu"
    if on_cpu:
        set_allocator_returns_memory(True)
    try:
        out = {}
        for key, fn in phases.items():
            _, extra = peak_memory(fn, device)
            out[key] = {"transient": None if extra is None else extra / GIB, "resident": resident[key] / GIB}
    finally:
        if on_cpu and restore_kept:
            set_allocator_returns_memory(False)
    return out


def run_model(name: str, args) -> dict:
    import datasets

    from transformers_red import RedAdapterConfig, RedConfig, RedDistillationTrainer, get_red_model
    from transformers_red.resources import builtin_texts

    print(f"\n=== {name}: loading, wrapping, building the trainers (not timed) ===", flush=True)
    device = torch.device(args.device)
    teacher, tokenizer = MODELS[name]()
    teacher.to(device).eval()
    plain_teacher = copy.deepcopy(teacher).eval()  # (a) and GKD's teacher: the untouched teacher
    for p in plain_teacher.parameters():
        p.requires_grad_(False)
    batch = {k: v.to(device) for k, v in packed_batch(tokenizer, args.batch_size, args.seq_len).items()}
    calibration = RedAdapterConfig(width_ratio=0.5, calibration_num_samples=args.calibration_samples)
    red = get_red_model(teacher, calibration, builtin_texts(args.calibration_samples), tokenizer,
                        show_progress_bar=False)
    student = red.merge_and_unload()  # (b): a plain HF model of width d_S
    out_dir = tempfile.mkdtemp(prefix="red_bench_")
    dataset = datasets.Dataset.from_dict({"text": builtin_texts(64)})

    def red_trainer(model, **overrides):
        config = RedConfig(output_dir=out_dir, per_device_train_batch_size=args.batch_size, max_length=args.seq_len,
                           max_steps=10**6, report_to=[], use_cpu=args.device == "cpu", save_strategy="no",
                           logging_steps=10**6, disable_tqdm=True, bf16=False, seed=0,
                           keep_freed_cpu_memory=not args.return_freed_memory,
                           gradient_accumulation_steps=args.grad_accum,
                           **{"form_student_weights": args.form_student_weights, **overrides})
        trainer = RedDistillationTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
        trainer.create_optimizer()
        return trainer

    trainer = red_trainer(red, logit_loss_from="logits", loss_chunk_size=1024)
    wanted = set(args.phases)
    phases = {}  # in the order of ALL_PHASES
    if "a" in wanted:
        phases["a"] = make_phase_a(plain_teacher, batch, args.grad_accum)
    step_b, optimizer_b = make_plain_step(student, trainer.args, batch, args.grad_accum)
    if "b" in wanted:
        phases["b"] = step_b
    if "w" in wanted:
        phases["w"] = make_phase_w(red, batch)
    step_c, num_items = make_trainer_step(trainer, batch, args.grad_accum)
    if "c" in wanted:
        phases["c"] = step_c
    trainer_h = gkd = None
    if "h" in wanted:
        trainer_h = red_trainer(red, logit_loss_from="hidden_states")
        phases["h"], _ = make_trainer_step(trainer_h, batch, args.grad_accum)
    trainer_f = None
    if "f" in wanted:
        trainer_f = red_trainer(red, form_student_weights="per_forward", logit_loss_from="logits",
                                loss_chunk_size=1024)
        phases["f"], _ = make_trainer_step(trainer_f, batch, args.grad_accum)
    if "g" in wanted:
        gkd_student = red.merge_and_unload().to(device)
        gkd = build_gkd_trainer(gkd_student, plain_teacher, tokenizer, dataset, args, os.path.join(out_dir, "gkd"))
        phases["g"], gkd_items = make_trainer_step(gkd, batch, args.grad_accum)
        assert int(gkd_items) == int(num_items), (gkd_items, num_items)
    resident = {"a": tensor_bytes(plain_teacher), "w": tensor_bytes(red)}

    n_linear, n_embed = (len(x) for x in forming_work(red))
    d_t, d_s = red.teacher_hidden_size, red.student_hidden_size
    trainable, total = red.get_nb_trainable_parameters()
    print(f"d_T={d_t} d_S={d_s} layers={teacher.config.num_hidden_layers} vocab={teacher.config.vocab_size} "
          f"tied={teacher.config.tie_word_embeddings} | RedLinear={n_linear} RedEmbedding={n_embed} | "
          f"trainable={trainable:,d} student params={sum(p.numel() for p in student.parameters()):,d} | "
          f"num_items_in_batch={int(num_items)} | clone modules={len(trainer._clone_names)} | "
          f"phases {list(phases)}", flush=True)

    gc.collect()
    gc.freeze()  # what exists now is never garbage during the rounds: later collections stay cheap
    times: dict[str, list[float]] = {k: [] for k in phases}
    cpu: dict[str, list[float]] = {k: [] for k in phases}
    load0 = os.getloadavg()
    rounds = args.warmup + args.repeats
    for r in range(rounds):
        line = []
        for key, fn in phases.items():
            wall, cpu_s = timed(fn, device)
            if r >= args.warmup:
                times[key].append(wall)
                cpu[key].append(cpu_s)
            line.append(f"{key}={wall:.3f}s/{cpu_s:.2f}cpu")
        print(f"  round {r + 1}/{rounds}{' (warmup)' if r < args.warmup else ''}: {' '.join(line)} "
              f"| load {os.getloadavg()[0]:.1f}", flush=True)
    load1 = os.getloadavg()

    # resident state between steps (optimizer states exist after the first step)
    resident["b"] = tensor_bytes(student, optimizer_b)
    resident["c"] = tensor_bytes(red, trainer.optimizer)
    for key, other in (("h", trainer_h), ("f", trainer_f)):
        if other is not None:
            resident[key] = tensor_bytes(red, other.optimizer)
    if gkd is not None:
        resident["g"] = tensor_bytes(gkd.model, gkd.optimizer, plain_teacher)
    memory = {}
    if not args.no_memory:
        print("  memory pass: one more step of each phase ...", flush=True)
        memory = measure_memory(phases, resident, args.device, restore_kept=not args.return_freed_memory)

    result = {"model": name, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "med": {k: statistics.median(v) for k, v in times.items()},
              "min": {k: min(v) for k, v in times.items()},
              "cpu": {k: statistics.median(v) for k, v in cpu.items()},
              "memory": memory, "times": times,
              "tokens": args.batch_size * args.seq_len * args.grad_accum, "grad_accum": args.grad_accum,
              "rss": peak_rss_gib(), "load": (load0[0], load1[0])}

    if args.breakdown:
        print(f"  breakdown of (c) and reference timings, {args.breakdown_rounds} rounds ...", flush=True)
        result["breakdown"] = breakdown_c(trainer, batch, num_items, args.breakdown_rounds)
        result["reference"] = breakdown_reference(trainer, plain_teacher, student, batch, args.breakdown_rounds)
        result["rss"] = peak_rss_gib()
    if args.profile:
        print(f"  torch.profiler, one (c) step of {name} (top {args.profile_rows} ops by self CPU time):")
        profile_c(step_c, args.profile_rows)

    del trainer, trainer_h, trainer_f, gkd, red, student, plain_teacher, teacher, phases
    gc.unfreeze()
    gc.collect()
    shutil.rmtree(out_dir, ignore_errors=True)
    return result


def _ratio(m: dict, num: str, den: str) -> float | None:
    return m[num] / m[den] if num in m and den in m else None


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


PHASE_NAMES = {"a": "(a) teacher forward", "b": "(b) plain SFT step of the merged student",
               "w": "(w) weight forming", "c": "(c) RED step (logits)", "h": "(h) RED step (hidden_states)",
               "f": "(f) RED step (logits, forming per forward)",
               "g": "(g) GKD step (TRL GKDTrainer)"}


def _header(text: str) -> None:
    print(text)
    print("-" * len(text))


def print_results(results: list[dict], args) -> None:
    full = [res for res in results if set("abwc") <= set(res["med"])]
    if full:
        print(f"\n=== Results: batch {args.batch_size} x {args.seq_len} tokens x {args.grad_accum} micro-batches per "
              f"step on {args.device}; median wall seconds "
              f"of {args.repeats} interleaved rounds after {args.warmup} warmup ===")
        _header(f"{'model':<10} {'(a) teach':>9} {'(b) stud':>9} {'(w) form':>9} {'(c) RED':>9} "
                f"{'c/(a+b+w)':>10} {'c/(a+b)':>8} {'tok/s (c)':>10} {'peak RSS':>9}")
        for res in full:
            m = res["med"]
            ratio, ratio_ab = m["c"] / (m["a"] + m["b"] + m["w"]), m["c"] / (m["a"] + m["b"])
            print(f"{res['model']:<10} {m['a']:>9.3f} {m['b']:>9.3f} {m['w']:>9.3f} {m['c']:>9.3f} "
                  f"{ratio:>10.3f} {ratio_ab:>8.3f} {res['tokens'] / m['c']:>10.0f} {res['rss']:>7.2f} G")
        print("peak RSS: process ru_maxrss after the model's block (cumulative over the process so far).")
        for label, key in (("minimum wall seconds", "min"), ("median process CPU seconds (all threads)", "cpu")):
            print(f"\nSame ratios from the {label} (less sensitive to other load on the machine):")
            for res in full:
                m = res[key]
                print(f"{res['model']:<10} a={m['a']:.3f} b={m['b']:.3f} w={m['w']:.3f} c={m['c']:.3f} "
                      f"c/(a+b+w)={m['c'] / (m['a'] + m['b'] + m['w']):.3f} "
                      f"c/(a+b)={m['c'] / (m['a'] + m['b']):.3f}")

    if any("g" in res["med"] for res in results):
        print(f"\n=== RED against TRL's GKDTrainer (lmbda 0, beta 0, T 1), batch {args.batch_size} x {args.seq_len} "
              f"x {args.grad_accum} micro-batches (forming: {args.form_student_weights}): "
              f"step seconds, median wall (min wall) [median CPU] ===")
        _header(f"{'model':<10} {'(b) SFT':>23} {'(c) RED':>23} {'(h) RED hidden':>23} {'(f) RED per fwd':>23} "
                f"{'(g) GKD':>23} {'c/g':>23} {'h/g':>23} {'f/g':>23}")
        for res in results:
            m, n, u = res["med"], res["min"], res["cpu"]

            def cell(k):
                return f"{m[k]:.3f} ({n[k]:.3f}) [{u[k]:.2f}]" if k in m else "-"

            def ratio(k):
                r = _ratio(m, k, "g")
                return "-" if r is None else f"{r:.3f} ({_ratio(n, k, 'g'):.3f}) [{_ratio(u, k, 'g'):.3f}]"

            print(f"{res['model']:<10} {cell('b'):>23} {cell('c'):>23} {cell('h'):>23} {cell('f'):>23} "
                  f"{cell('g'):>23} {ratio('c'):>23} {ratio('h'):>23} {ratio('f'):>23}")
        for res in results:
            for key in ("c", "h", "f"):
                r = _ratio(res["med"], key, "g")
                if r is not None:
                    verdict = "within the bound" if r <= GKD_TARGET else (
                        f"SLOWER than {GKD_TARGET} x GKD: {100 * (r - 1):+.1f}% against GKD")
                    print(f"{res['model']}: {PHASE_NAMES[key]} / GKD step = {r:.3f} (median wall), "
                          f"{_ratio(res['cpu'], key, 'g'):.3f} (median CPU): {verdict}")

    if any(res["memory"] for res in results):
        print("\n=== Memory per step, GiB: transient peak above the phase's start / resident state kept between "
              "steps / sum ===")
    for res in results:
        if res["memory"]:
            print(f"{res['model']}:")
        for key, mem in res["memory"].items():
            transient = mem["transient"]
            total = None if transient is None else transient + mem["resident"]
            print(f"  {PHASE_NAMES[key]:<42} {_fmt(transient, '8.3f')} {mem['resident']:8.3f} {_fmt(total, '8.3f')}")
    print()
    for res in results:
        spread = {k: f"{min(v):.3f}-{max(v):.3f}" for k, v in res["times"].items()}
        print(f"{res['model']}: wall min-max per phase {spread}; load average {res['load'][0]:.1f} at start, "
              f"{res['load'][1]:.1f} at end")
        if res["model"] == "smollm2" and res in full:
            m = res["med"]
            ratio = m["c"] / (m["a"] + m["b"] + m["w"])
            verdict = "MET" if ratio <= TARGET else "MISSED"
            print(f"target c/(a+b+w) <= {TARGET} for smollm2 (median wall): {verdict} ({ratio:.3f})")
    for res in results:
        if "breakdown" in res:
            total = sum(w for w, _ in res["breakdown"].values())
            print(f"\n{res['model']}: breakdown of (c), median wall s / CPU s "
                  f"(sum {total:.3f} vs (c) {res['med']['c']:.3f})")
            for key, (wall, cpu_s) in res["breakdown"].items():
                print(f"  {key:<62} {wall:>8.3f} {cpu_s:>8.2f}  {100 * wall / total:5.1f}%")
            print(f"{res['model']}: reference timings, median wall s / CPU s")
            for key, (wall, cpu_s) in res["reference"].items():
                print(f"  {key:<62} {wall:>8.3f} {cpu_s:>8.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["tiny", "smollm2"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--grad-accum", type=int, default=1,
                        help="micro-batches per optimizer step (every phase but (w) runs them all)")
    parser.add_argument("--form-student-weights", choices=["auto", "per_step", "per_forward"], default="auto",
                        help="RedConfig.form_student_weights of (c) and (h)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per model (after warmup)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per model")
    parser.add_argument("--phases", nargs="+", choices=ALL_PHASES, default=list(ALL_PHASES),
                        help="which phases to time (default all; the c/(a+b+w) table needs a, b, w, c)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory pass after the timed rounds")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--calibration-samples", type=int, default=15,
                        help="calibration texts of the RedModel (channel selection, clone normalisers; paper: 15)")
    parser.add_argument("--breakdown", action="store_true", help="also time the parts of (c)")
    parser.add_argument("--breakdown-rounds", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of one (c) step")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: leave torch's default, one per usable core)")
    parser.add_argument("--return-freed-memory", action="store_true",
                        help="RedConfig(keep_freed_cpu_memory=False): glibc's default allocator behaviour")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")

    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(environment_line(), f"| os.cpu_count {os.cpu_count()}")
    results = [run_model(name, args) for name in args.models]
    from transformers_red.training.cpu_memory import keep_freed_cpu_memory

    kept = args.device == "cpu" and (not args.return_freed_memory) and keep_freed_cpu_memory()
    print(f"allocator: freed CPU memory kept in the process during the timed rounds (RedConfig.keep_freed_cpu_memory, "
          f"set by the trainer before every phase ran): {kept}; MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_')}")
    print_results(results, args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "environment": environment_line(), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
