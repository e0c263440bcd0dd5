"""On-policy RED against off-policy RED (and on-policy from random init / prune-and-distil), on a reasoning teacher.

Arms (all through `RedDistillationTrainer` on the same prompt/completion problems, batches, steps, learning rate):

- `off_red`: RED, off-policy (`lmbda=0`, the default).
- `mixed_red`: RED, half the micro-batches sampled by the student (`lmbda=0.5`).
- `on_red`: RED, every micro-batch sampled by the student (`lmbda=1`).
- `on_random`: random-init projections (LRC's), `lmbda=1`.
- `on_prune`: prune and distil (`train="weights"`), `lmbda=1`.

Teacher: the packaged chain-reasoning teacher (`--teacher chain`, default; 0.79M parameters, CPU minutes) or the
SmolLM2 reasoning teacher (`--teacher smollm2-reasoner`). Measured every `--measure_every` steps on the merged
student: greedy exact match per reasoning-step count on held-out problems. Each record also has the tokens the
teacher scored so far (the teacher-forward tokens: sampled completions count as trained tokens) and the training
seconds, rollouts included and measurements excluded, with the rollouts' own share, so the tables compare arms at
equal steps, at equal teacher-forward tokens and at equal wall time.

    python benchmarks/on_policy.py --output_dir docs/assets/on_policy --update_doc docs/results.md
    python benchmarks/on_policy.py --from_json docs/assets/on_policy/results.json --update_doc docs/results.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import datasets  # noqa: E402
import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from transformers_red import RedConfig, RedDistillationTrainer  # noqa: E402
from transformers_red.records import update_marked_section  # noqa: E402

ARMS = {
    "off_red": ("RED, off-policy", {"lmbda": 0.0}),
    "mixed_red": ("RED, lmbda=0.5", {"lmbda": 0.5}),
    "on_red": ("RED, on-policy", {"lmbda": 1.0}),
    "on_random": ("random init, on-policy", {"lmbda": 1.0, "init": "random"}),
    "on_prune": ("prune and distil, on-policy", {"lmbda": 1.0, "train": "weights"}),
}


def task(teacher: str, args):
    """(load teacher, training columns, held-out problems, evaluate(model, tokenizer, problems) -> {k: acc})."""
    if teacher == "chain":
        from transformers_red.demo.chain_task import (
            completion_columns,
            evaluate_model,
            generate_mixed_problems,
            generate_problems,
            load_reasoning_teacher,
        )

        problems = [p for h in range(7) for p in generate_problems(args.problems_per_k, h, seed=10_000)]
        columns = completion_columns(generate_mixed_problems(args.train_samples, seed=args.seed))
        return load_reasoning_teacher, columns, problems, evaluate_model
    from transformers import AutoTokenizer

    from transformers_red.demo.word_problems import (
        evaluate_word_problems,
        generate_mixed_word_problems,
        generate_word_problems,
    )
    from transformers_red.resources import load_smollm2_reasoner, smollm2_reasoner_dir

    eos = AutoTokenizer.from_pretrained(smollm2_reasoner_dir()).eos_token
    train = generate_mixed_word_problems(args.train_samples, seed=10_000_000 + args.seed)
    columns = {"prompt": [p.prompt for p in train], "completion": [p.target + eos for p in train]}
    load = load_smollm2_reasoner
    problems = [p for k in range(1, 7) for p in generate_word_problems(args.problems_per_k, k, seed=1234)]
    return load, columns, problems, evaluate_word_problems


class Measurements(TrainerCallback):
    """Exact match per step count every `every` steps, with teacher tokens and training seconds."""

    def __init__(self, measure, every: int):
        self.measure, self.every = measure, every
        self.trainer, self.records, self.seconds, self._since = None, [], 0.0, None

    def on_step_begin(self, args, state, control, **kwargs):
        if self._since is None:
            self._since = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds += time.perf_counter() - self._since
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            accuracy = self.measure(self.trainer.merged_student())
            record = {"step": state.global_step, "train_seconds": round(self.seconds, 2),
                      "rollout_seconds": round(self.trainer.rollout_seconds, 2),
                      "teacher_tokens": self.trainer._total_train_tokens,
                      "accuracy": accuracy, "mean": statistics.fmean(accuracy.values())}
            print(json.dumps(record), flush=True)
            self.records.append(record)
        self._since = time.perf_counter()


def run_arm(arm: str, load, columns, measure, args) -> dict:
    teacher, tokenizer = load()
    callback = Measurements(lambda m: measure(m, tokenizer), args.measure_every)
    with tempfile.TemporaryDirectory() as tmp:
        config = RedConfig(output_dir=tmp, width_ratio=args.width_ratio, max_steps=args.steps, seed=args.seed,
                           per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate,
                           lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 20),
                           max_length=args.max_length,
                           max_new_tokens=args.max_new_tokens, report_to=[], save_strategy="no", disable_tqdm=True,
                           logging_steps=max(1, args.steps // 10), use_cpu=not torch.cuda.is_available(),
                           keep_freed_cpu_memory=True, **ARMS[arm][1])
        trainer = RedDistillationTrainer(model=teacher, args=config, processing_class=tokenizer,
                                         train_dataset=datasets.Dataset.from_dict(columns), callbacks=[callback])
        callback.trainer = trainer
        trainer.train()
    return {"label": ARMS[arm][0], "overrides": ARMS[arm][1], "records": callback.records}


def _at(run: dict, key: str, budget: float) -> dict | None:
    rows = [r for r in run["records"] if r[key] <= budget * 1.001]
    return rows[-1] if rows else None


def format_tables(report: dict) -> str:
    ks = list(report["teacher"])
    header = ("| student | step | teacher tokens | train s (rollouts) | " + " | ".join(f"K={k}" for k in ks)
              + " | mean |\n|" + "---|" * (len(ks) + 5))

    def row(run: dict, r: dict) -> str:
        cells = " | ".join(f"{100 * r['accuracy'][k]:.0f}" for k in ks)
        return (f"| {run['label']} | {r['step']} | {r['teacher_tokens']:,} | {r['train_seconds']:.0f} "
                f"({r['rollout_seconds']:.0f}) | {cells} | {100 * r['mean']:.1f} |")

    runs = [run for run in report["arms"].values() if run["records"]]
    teacher = " | ".join(f"{100 * report['teacher'][k]:.0f}" for k in ks)
    parts = [f"At the end ({report['settings']['steps']} steps); exact match in %, teacher: {teacher}:", "", header]
    parts += [row(run, run["records"][-1]) for run in runs]
    for key, what in (("teacher_tokens", "teacher-forward tokens"), ("train_seconds", "training time")):
        budget = min(run["records"][-1][key] for run in runs)
        lines = ["", f"At equal {what} ({budget:,.0f}; each arm at its last measurement within it):", "", header]
        lines += [row(run, r) for run in runs if (r := _at(run, key, budget))]
        parts += lines
    s = report["settings"]
    parts += ["", f"Teacher `{s['teacher']}`, width {s['width_ratio']}, {s['steps']} steps x {s['batch_size']} "
              f"problems, learning rate {s['learning_rate']} (cosine), sampling at temperature 1 up to "
              f"{s['max_new_tokens']} new tokens, seed {s['seed']}; {s['problems_per_k']} held-out problems per "
              f"step count, greedy. {report['environment']}."]
    return "\n".join(parts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="chain", choices=["chain", "smollm2-reasoner"])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--width_ratio", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--measure_every", type=int, default=50)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--train_samples", type=int, default=4000)
    p.add_argument("--problems_per_k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output_dir", default="on-policy")
    p.add_argument("--from_json", default=None)
    p.add_argument("--update_doc", default=None, help="markdown file whose on_policy section to replace")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        load, columns, problems, evaluate = task(args.teacher, args)

        def measure(model, tokenizer):
            return {str(k): a for k, a in evaluate(model, tokenizer, problems).items()}

        teacher, tokenizer = load()
        import platform

        report = {"settings": {k: v for k, v in vars(args).items() if k not in ("from_json", "update_doc")},
                  "teacher": measure(teacher, tokenizer), "arms": {},
                  "environment": f"CPU ({platform.machine()}), {torch.get_num_threads()} threads, torch "
                                 f"{torch.__version__}",
                  "command": "python benchmarks/on_policy.py " + " ".join(sys.argv[1:] if argv is None else argv)}
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        for arm in args.arms:
            print(f"== {arm}: {ARMS[arm][0]}", flush=True)
            report["arms"][arm] = run_arm(arm, load, columns, measure, args)
            (out / "results.json").write_text(json.dumps(report, indent=1))
    text = format_tables(report)
    print(text)
    if args.update_doc:
        update_marked_section(args.update_doc, "on_policy", f"```bash\n{report['command']}\n```\n\n{text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
