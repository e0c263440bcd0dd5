"""What one RedDistillationTrainer step costs, against what the method needs by design.

For each model (a tiny Llama and SmolLM2-135M-Instruct, both at 50% width), in ONE process, on one packed
batch of `--batch-size` x `--seq-len` tokens (built-in English texts, labels = input_ids, no padding):

  (a) teacher forward: the plain teacher (a deep copy taken before wrapping), `torch.no_grad()`,
      `use_cache=False`, full (B, T, V) logits.
  (b) plain student step: the merged student (`red.merge_and_unload()`, a plain HF model of width d_S) in
      train mode: forward with `labels` (HF causal-LM loss), backward, AdamW step over all its parameters
      (the optimizer class and arguments `Trainer` would use), `zero_grad(set_to_none=True)`.
  (w) weight forming: what the method adds by design. For every RedLinear of the RedModel, the student
      weight `layer.student_weight()` (W_T @ P or P^T @ W_T, the op the forward uses; and the output-side
      bias b_T @ P where there is one); for the RedEmbedding, the gather + `(B, T, d_T) @ P` the forward
      uses. Then one `torch.autograd.backward(formed, fixed_random_grads)` into the projections, and the
      projection grads are cleared. No loss, no elementwise products: only the forming matmuls and their
      backward matmuls.
  (c) distillation step: `trainer.training_step(trainer.model, inputs, num_items_in_batch)` then
      `trainer.optimizer.step(); trainer.optimizer.zero_grad()` (optimizer from `trainer.create_optimizer()`),
      i.e. teacher pass (same weights, adapter disabled, activations captured), student pass (captured),
      chunked KL + CE, clone MSE, backward, AdamW over the projections and norm gains. Not included: gradient
      clipping, LR scheduler, data loading, logging (the rest of Trainer's inner loop).

Measurements are interleaved (a, b, w, c, a, b, w, c, ...); the first `--warmup` rounds are discarded; medians
are reported. Peak memory is the process peak RSS (`ru_maxrss`) read after each model's block, so it is
cumulative over everything the process did before (models run tiny first, then SmolLM2).

`--breakdown` also times the parts of (c) separately (re-doing `compute_loss`'s steps one by one with the
trainer's own helpers); `--profile` prints a torch.profiler table of one (c) step.

    python benchmarks/step_overhead.py --models tiny
    python benchmarks/step_overhead.py --models tiny smollm2 --repeats 3 --breakdown
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

TARGET = 1.15  # the bound on (c) / ((a) + (b) + (w)) for SmolLM2 on CPU


# ------------------------------------------------------------------------------------------------ models
def tiny_model():
    """A tiny Llama teacher trained on English bytes, 4x bigger than the test one, and the byte tokenizer."""
    from transformers_red.resources import byte_tokenizer, tiny_trained_teacher

    teacher = tiny_trained_teacher("llama", hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                                   num_key_value_heads=4, head_dim=32, intermediate_size=640,
                                   max_position_embeddings=1024)
    return teacher, byte_tokenizer()


def smollm2_model():
    from transformers_red.resources import load_smollm2

    return load_smollm2()


MODELS = {"tiny": tiny_model, "smollm2": smollm2_model}


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
    from transformers_red.layer import RedEmbedding, RedLinear

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

    def like(shape, dtype):
        return torch.randn(shape, generator=gen).to(dtype)

    with torch.no_grad():
        grads = []
        for layer in linears:
            grads.append(like(layer.student_weight().shape, layer.trainable.dtype))
            bias = layer.student_bias()
            if bias is not None and bias.requires_grad:
                grads.append(like(bias.shape, bias.dtype))
        for layer in embeddings:
            shape = (*input_ids.shape, layer.trainable.shape[1])
            grads.append(like(shape, layer.trainable.dtype))
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


def make_phase_a(plain_teacher, batch):
    fwd = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def phase_a():
        with torch.no_grad():
            logits = plain_teacher(**fwd, use_cache=False).logits
        del logits

    return phase_a


def make_phase_b(student, trainer, batch):
    from transformers import Trainer

    student.train()
    optim_cls, optim_kwargs = Trainer.get_optimizer_cls_and_kwargs(trainer.args, student)
    optimizer = optim_cls(student.parameters(), **optim_kwargs)

    def phase_b():
        out = student(**batch, use_cache=False)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del out

    return phase_b, optimizer


def make_phase_c(trainer, batch):
    inputs = {k: v.clone() for k, v in batch.items()}
    num_items = trainer._get_num_items_in_batch([inputs], trainer.args.device)

    def phase_c():
        loss = trainer.training_step(trainer.model, dict(inputs), num_items)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        del loss

    return phase_c, num_items


# ----------------------------------------------------------------------------------------- breakdown of (c)
def breakdown_c(trainer, batch, num_items, rounds: int) -> dict[str, float]:
    """Median seconds of each part of one distillation step, done as `compute_loss` does it."""
    from transformers_red.losses import IGNORE_INDEX, logit_loss_sums, shift_labels

    red, args, model = trainer.red_model, trainer.args, trainer.model
    fwd = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = batch["labels"]
    times: dict[str, list[float]] = {}

    def tick(key, start):
        now = time.perf_counter()
        times.setdefault(key, []).append(now - start)
        return now

    model.train()
    for _ in range(rounds + 1):
        t = time.perf_counter()
        with trainer._teacher_pass() as (teacher, teacher_acts):
            teacher_logits = teacher(**fwd, use_cache=False).logits
        t = tick("c1 teacher pass (wrapped, adapter off, capture)", t)
        capture = red.capture_activations() if trainer._clone_modules else contextlib.nullcontext({})
        with capture as student_acts:
            outputs = model(**fwd, use_cache=False)
        t = tick("c2 student forward (capture)", t)
        kd, ce, _ = logit_loss_sums(outputs.logits, teacher_logits, labels, beta=args.beta,
                                    temperature=args.temperature, chunk_size=args.loss_chunk_size)
        t = tick("c3 logit losses forward (chunked KL + CE)", t)
        token_mask = shift_labels(labels) != IGNORE_INDEX
        clone = trainer._clone_sums(student_acts, teacher_acts, token_mask)
        clone_total = sum(clone.values()) if clone else ce.new_zeros(())
        t = tick("c4 clone MSE forward", t)
        loss = (args.ce_weight * ce + args.kd_weight * kd + args.clone_weight * clone_total) / num_items
        loss.backward()
        t = tick("c5 backward (incl. checkpoint recompute)", t)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        tick("c6 optimizer step + zero_grad", t)
        del teacher_logits, outputs, kd, ce, clone, clone_total, loss, teacher_acts, student_acts
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def breakdown_extra(red, plain_teacher, student, batch, rounds: int) -> dict[str, float]:
    """Reference timings for reading the breakdown (not part of any ratio)."""
    from transformers_red.losses import logit_loss_sums

    fwd = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    times: dict[str, list[float]] = {}
    for _ in range(rounds + 1):
        t = time.perf_counter()
        with torch.no_grad():
            teacher_logits = plain_teacher(**fwd, use_cache=False).logits
        times.setdefault("r1 plain teacher forward", []).append(time.perf_counter() - t)
        t = time.perf_counter()
        with torch.no_grad(), red.disable_adapter():
            red(**fwd, use_cache=False).logits
        times.setdefault("r2 wrapped teacher forward, no capture", []).append(time.perf_counter() - t)
        t = time.perf_counter()
        out = student(**fwd, use_cache=False)
        times.setdefault("r3 merged student forward (grad on, no loss)", []).append(time.perf_counter() - t)
        logits = out.logits.detach().requires_grad_(True)
        t = time.perf_counter()
        kd, ce, _ = logit_loss_sums(logits, teacher_logits, batch["labels"], chunk_size=1024)
        (kd + ce).backward()
        times.setdefault("r4 logit losses fwd+bwd alone (KL+CE, on student logits)", []).append(
            time.perf_counter() - t)
        t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1])[:-1],
                                                 batch["labels"].reshape(-1)[1:])
        loss.backward()
        times.setdefault("r5 plain CE fwd+bwd alone (for comparison)", []).append(time.perf_counter() - t)
        del teacher_logits, out, logits, kd, ce, loss
        student.zero_grad(set_to_none=True)
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def profile_c(phase_c, row_limit: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        phase_c()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit))


# --------------------------------------------------------------------------------------------------- run
def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def run_model(name: str, args) -> dict:
    import datasets

    from transformers_red import RedAdapterConfig, RedConfig, RedDistillationTrainer, get_red_model
    from transformers_red.resources import builtin_texts

    print(f"\n=== {name}: loading, wrapping, building the trainer (not timed) ===", flush=True)
    teacher, tokenizer = MODELS[name]()
    teacher.eval()
    plain_teacher = copy.deepcopy(teacher).eval()  # (a): the untouched teacher
    for p in plain_teacher.parameters():
        p.requires_grad_(False)
    batch = packed_batch(tokenizer, args.batch_size, args.seq_len)
    red = get_red_model(teacher, RedAdapterConfig(width_ratio=0.5), builtin_texts(15), tokenizer,
                        show_progress_bar=False)
    student = red.merge_and_unload()  # (b): a plain HF model of width d_S
    out_dir = tempfile.mkdtemp(prefix="red_bench_")
    config = RedConfig(output_dir=out_dir, per_device_train_batch_size=args.batch_size, max_length=args.seq_len,
                       max_steps=10**6, report_to=[], use_cpu=True, save_strategy="no", logging_steps=10**6,
                       disable_tqdm=True, bf16=False, seed=0)
    dataset = datasets.Dataset.from_dict({"text": builtin_texts(64)})
    trainer = RedDistillationTrainer(model=red, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.create_optimizer()

    phases = {"a": make_phase_a(plain_teacher, batch)}
    phases["b"], _ = make_phase_b(student, trainer, batch)
    phases["w"] = make_phase_w(red, batch)
    phases["c"], num_items = make_phase_c(trainer, batch)

    n_linear, n_embed = (len(x) for x in forming_work(red))
    d_t, d_s = red.teacher_hidden_size, red.student_hidden_size
    trainable, total = red.get_nb_trainable_parameters()
    print(f"d_T={d_t} d_S={d_s} layers={teacher.config.num_hidden_layers} vocab={teacher.config.vocab_size} "
          f"tied={teacher.config.tie_word_embeddings} | RedLinear={n_linear} RedEmbedding={n_embed} | "
          f"trainable={trainable:,d} student params={sum(p.numel() for p in student.parameters()):,d} | "
          f"num_items_in_batch={int(num_items)} | clone terms={list(trainer._clone_modules)}", flush=True)

    times: dict[str, list[float]] = {k: [] for k in phases}
    rounds = args.warmup + args.repeats
    for r in range(rounds):
        line = []
        for key, fn in phases.items():
            gc.collect()
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if r >= args.warmup:
                times[key].append(elapsed)
            line.append(f"{key}={elapsed:.3f}s")
        print(f"  round {r + 1}/{rounds}{' (warmup)' if r < args.warmup else ''}: {' '.join(line)}", flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"model": name, "med": med, "times": times, "tokens": args.batch_size * args.seq_len,
              "rss": peak_rss_gib()}

    if args.breakdown:
        print(f"  breakdown of (c), {args.breakdown_rounds} rounds after 1 warmup ...", flush=True)
        result["breakdown"] = breakdown_c(trainer, batch, num_items, args.breakdown_rounds)
        result["reference"] = breakdown_extra(red, plain_teacher, student, batch, args.breakdown_rounds)
        result["rss"] = peak_rss_gib()
    if args.profile:
        print(f"  torch.profiler, one (c) step of {name} (top {args.profile_rows} ops by self CPU time):")
        profile_c(phases["c"], args.profile_rows)

    del trainer, red, student, plain_teacher, teacher, phases
    gc.collect()
    return result


def print_results(results: list[dict], args) -> None:
    print(f"\n=== Results: batch {args.batch_size} x {args.seq_len} tokens, median of {args.repeats} rounds "
          f"after {args.warmup} warmup, seconds ===")
    header = (f"{'model':<8} {'(a) teach':>9} {'(b) stud':>9} {'(w) form':>9} {'(c) RED':>9} "
              f"{'c/(a+b+w)':>10} {'c/(a+b)':>8} {'tok/s (c)':>10} {'peak RSS':>9}")
    print(header)
    print("-" * len(header))
    for res in results:
        m = res["med"]
        ratio, ratio_ab = m["c"] / (m["a"] + m["b"] + m["w"]), m["c"] / (m["a"] + m["b"])
        print(f"{res['model']:<8} {m['a']:>9.3f} {m['b']:>9.3f} {m['w']:>9.3f} {m['c']:>9.3f} "
              f"{ratio:>10.3f} {ratio_ab:>8.3f} {res['tokens'] / m['c']:>10.0f} {res['rss']:>7.2f} G")
    print("peak RSS: process ru_maxrss after the model's block (cumulative over the process so far).")
    for res in results:
        spread = {k: f"{min(v):.3f}-{max(v):.3f}" for k, v in res["times"].items()}
        print(f"{res['model']}: min-max per phase {spread}")
        if res["model"] == "smollm2":
            m = res["med"]
            ratio = m["c"] / (m["a"] + m["b"] + m["w"])
            verdict = "MET" if ratio <= TARGET else "MISSED"
            print(f"target c/(a+b+w) <= {TARGET} for smollm2: {verdict} ({ratio:.3f})")
    for res in results:
        if "breakdown" in res:
            total = sum(res["breakdown"].values())
            print(f"\n{res['model']}: breakdown of (c) (median s; sum {total:.3f} vs (c) {res['med']['c']:.3f})")
            for key, value in res["breakdown"].items():
                print(f"  {key:<58} {value:>8.3f}  {100 * value / total:5.1f}%")
            print(f"{res['model']}: reference timings (median s)")
            for key, value in res["reference"].items():
                print(f"  {key:<58} {value:>8.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["tiny", "smollm2"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per model (after warmup)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per model")
    parser.add_argument("--breakdown", action="store_true", help="also time the parts of (c)")
    parser.add_argument("--breakdown-rounds", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of one (c) step")
    parser.add_argument("--profile-rows", type=int, default=25)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")

    import transformers
    import trl

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"python {sys.version.split()[0]} | torch {torch.__version__} | transformers {transformers.__version__} "
          f"| trl {trl.__version__} | torch threads {torch.get_num_threads()} | cpus usable {affinity} "
          f"(os.cpu_count {os.cpu_count()})")
    results = [run_model(name, args) for name in args.models]
    print_results(results, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
