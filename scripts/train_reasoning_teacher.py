#!/usr/bin/env python
"""Train the small chain-reasoning teacher shipped in ``src/transformers_red/demo/reasoning_teacher``.

A LlamaForCausalLM (hidden 128, 4 layers, 4 query / 2 KV heads of dim 32, FFN 384, tied embeddings) is
trained from scratch on the variable-binding chain task of :mod:`transformers_red.demo.chain_task` (mixed hop counts),
with the loss on the target (rationale + answer + end marker) only. Fresh problems are generated for every
step from a seeded stream, so there is no repeated data. At the end the model is scored by greedy exact
match on a fixed held-out set (a different seed) and saved, with its tokenizer, generation config and a
``training_report.json``.

    python scripts/train_reasoning_teacher.py                 # the shipped checkpoint (CPU, ~10 min)
    python scripts/train_reasoning_teacher.py --steps 300 --output-dir /tmp/t   # a quick check

See docs/reasoning_teacher.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

import transformers  # noqa: E402
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from transformers_red.demo.chain_task import (  # noqa: E402
    DISTRACTORS,
    MAX_VALUE,
    RATIONALE,
    RATIONALES,
    build_task_tokenizer,
    evaluate_model,
    format_example,
    generate_mixed_problems,
    generate_problems,
    weights_digest,
)

DEFAULT_OUTPUT = REPO / "src" / "transformers_red" / "demo" / "reasoning_teacher"
SAVED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "training_report.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    p.add_argument("--seed", type=int, default=0, help="model init and training-data seed")
    p.add_argument("--eval-seed", type=int, default=1234, help="seed of the held-out set (differs from --seed)")
    p.add_argument("--min-hops", type=int, default=0)
    p.add_argument("--max-hops", type=int, default=6)
    p.add_argument("--max-value", type=int, default=MAX_VALUE, help="values lie in 0..max_value")
    p.add_argument("--rationale", choices=list(RATIONALES), default=RATIONALE)
    p.add_argument("--distractors", type=int, nargs=2, default=list(DISTRACTORS), metavar=("MIN", "MAX"))
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.05, help="cosine decay floor, relative to --lr")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--intermediate-size", type=int, default=384)
    p.add_argument("--loss-on", choices=["target", "all"], default="target",
                   help="positions that carry loss: the target only (default) or the whole text")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (fixed, for reproducibility; 1 is robust on a shared machine)")
    p.add_argument("--eval-every", type=int, default=250, help="quick eval every N steps; 0: never")
    p.add_argument("--quick-eval-per-hop", type=int, default=32, help="problems per hop of the quick eval")
    p.add_argument("--eval-per-hop", type=int, default=500, help="held-out problems per hop at the end")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="saved weights dtype")
    return p.parse_args(argv)


def make_model(args, tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def make_batch(problems, tokenizer, loss_on: str, device):
    texts = [format_example(p) for p in problems]
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
    input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    if loss_on == "target":
        # Character-level: the prompt is 1 (bos) + len(prompt) tokens.
        prompt_len = torch.tensor([1 + len(p.prompt) for p in problems])
        positions = torch.arange(input_ids.shape[1])[None, :]
        labels = labels.masked_fill(positions < prompt_len[:, None], -100)
    return input_ids.to(device), attention_mask.to(device), labels.to(device)


def lr_at(step: int, args) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    floor = args.min_lr_ratio
    return args.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.eval_seed == args.seed:
        raise SystemExit("--eval-seed must differ from --seed (the held-out set must not be training data)")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    device = torch.device(args.device)
    hops = list(range(args.min_hops, args.max_hops + 1))
    task = {"max_value": args.max_value, "rationale": args.rationale, "distractors": tuple(args.distractors)}

    tokenizer = build_task_tokenizer()
    model = make_model(args, tokenizer).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"LlamaForCausalLM: {n_params:,} parameters, vocab {len(tokenizer)}, hops {hops}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98), eps=1e-8,
    )
    quick_eval = [p for h in hops
                  for p in generate_problems(args.quick_eval_per_hop, h, seed=args.eval_seed + 1, **task)]
    history = []
    model.train()
    start = time.perf_counter()
    running = None
    for step in range(args.steps):
        problems = generate_mixed_problems(args.batch_size, hops, seed=args.seed * 1_000_000 + step, **task)
        input_ids, attention_mask, labels = make_batch(problems, tokenizer, args.loss_on, device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        done = step + 1
        if done % 50 == 0 or done == args.steps:
            print(f"step {done:5d}  loss {running:.4f}  lr {lr_at(step, args):.2e}  "
                  f"{time.perf_counter() - start:6.1f}s", flush=True)
        if args.eval_every and (done % args.eval_every == 0) and done < args.steps:
            acc = evaluate_model(model, tokenizer, quick_eval)
            history.append({"step": done, "loss": round(running, 5),
                            "seconds": round(time.perf_counter() - start, 1),
                            "quick_accuracy": {str(h): a for h, a in acc.items()}})
            print("   quick eval  " + "  ".join(f"h{h}:{a:.2f}" for h, a in acc.items()), flush=True)
    train_seconds = time.perf_counter() - start

    model.eval()
    held_out = [p for h in hops for p in generate_problems(args.eval_per_hop, h, seed=args.eval_seed, **task)]
    t0 = time.perf_counter()
    accuracy = evaluate_model(model, tokenizer, held_out)
    eval_seconds = time.perf_counter() - t0
    print("held-out accuracy  " + "  ".join(f"h{h}:{a:.3f}" for h, a in accuracy.items()), flush=True)
    print(f"train {train_seconds:.0f}s, eval {eval_seconds:.1f}s ({len(held_out) / eval_seconds:.0f} problems/s)")

    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=128, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    save_model = model.to("cpu")
    if args.dtype == "bfloat16":
        save_model = save_model.to(torch.bfloat16)
    save_model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    report = {
        "task_family": "variable-binding chains (transformers_red.demo.chain_task)",
        "command": " ".join(["python scripts/train_reasoning_teacher.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "output_dir"},
        "seed": args.seed,
        "eval_seed": args.eval_seed,
        "hops": hops,
        "task": task,
        "parameters": n_params,
        "train_wall_seconds": round(train_seconds, 1),
        "eval_wall_seconds": round(eval_seconds, 1),
        "eval_problems_per_second": round(len(held_out) / eval_seconds, 1),
        "held_out_per_hop": args.eval_per_hop,
        "held_out_accuracy": {str(h): a for h, a in accuracy.items()},
        "history": history,
        "final_loss": round(running, 5),
        "weights_sha256": weights_digest(save_model),
        "environment": {
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": str(device), "threads": args.threads,
            "machine": platform.machine(),
        },
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    for name in SAVED_FILES:  # safetensors writes 0600; package data must be world-readable
        if (out / name).is_file():
            (out / name).chmod(0o644)
    size = sum((out / name).stat().st_size for name in SAVED_FILES if (out / name).is_file())
    print(f"saved to {out} ({size / 1e6:.2f} MB)")
    return report


if __name__ == "__main__":
    main()
