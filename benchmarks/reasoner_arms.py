"""The paper's comparison on a real LLM that reasons: students of the SmolLM2 reasoning teacher, per arm.

The teacher is SmolLM2-135M-Instruct fine-tuned on K-step arithmetic word problems
(`scripts/train_smollm2_reasoner.py`, loaded with `load_smollm2_reasoner()`). Every arm distils it through
`RedDistillationTrainer` on the same prompt/completion problems (K = 1..6, a seed stream the teacher never trained
on), the same batches, steps and learning rate; only the arm's settings differ:

- `red`: RED at the library's defaults (channel-selection init, temperature 1).
- `red_t40`: channel-selection init at temperature 40 (the paper's 2x2).
- `random_t1`: random init (LRC's projections) at temperature 1.
- `lrc`: random init at temperature 40 (LRC's recipe).
- `prune_distil`: `train="weights"`: the step-0 RED student (the teacher hard-pruned to the selected channels) merged
  into a plain model whose own weights are distilled (Minitron's recipe).
- `hybrid`: RED projections for the first half of the steps, then the merged student's weights for the second half.

Measured on the merged student at the steps of `--measure_steps` (and at the end): greedy exact match of the final
`#### N` per K on held-out problems (the teacher's own held-out set), perplexity on held-out generic English (what
the student forgets), and per-layer eRank on held-out problems. Training time excludes measurements, so the tables
compare arms at equal steps and at equal training time. Results are written after every arm to
`<output_dir>/width_<r>/results.json`; a rerun skips arms already there (`--rerun` to redo), so the CPU budget can be
spread over sessions. Tables, plots and the docs section come from the JSON alone:

    python benchmarks/reasoner_arms.py --width_ratio 0.5 --arms red lrc random_t1 prune_distil --steps 100
    python benchmarks/reasoner_arms.py --from_json docs/assets/reasoner_arms docs/assets/reasoner_arms_200 \
        --update_doc docs/results.md
    python benchmarks/reasoner_arms.py --teacher tiny --steps 2 --problems_per_k 2 ...   # the CI smoke run
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
from transformers_red.demo.word_problems import (  # noqa: E402
    evaluate_word_problems,
    generate_mixed_word_problems,
    generate_word_problems,
)
from transformers_red.evaluation.erank import layerwise_effective_rank  # noqa: E402
from transformers_red.evaluation.perplexity import perplexity  # noqa: E402
from transformers_red.records import update_marked_section  # noqa: E402

ARMS = {
    "red": ("RED (selection init, tau=1)", {}),
    "red_t40": ("selection init, tau=40", {"temperature": 40.0}),
    "random_t1": ("random init, tau=1", {"init": "random"}),
    "lrc": ("LRC (random init, tau=40)", {"init": "random", "temperature": 40.0}),
    "prune_distil": ("prune and distil (train='weights')", {"train": "weights"}),
    "hybrid": ("hybrid (projections, then weights)", {}),
}
DISTILL_SEED = 10_000_000  # problem stream of the distillation data: the teacher trained on seeds 0..steps
EVAL_SEED = 1234  # the teacher's held-out problems (scripts/train_smollm2_reasoner.py --eval_seed)


def load_teacher(name: str):
    """(teacher, tokenizer): 'smollm2-reasoner' (the cached fine-tune) or 'tiny' (an untrained tiny Llama, CI)."""
    if name == "tiny":
        from transformers_red.resources import byte_tokenizer, tiny_teacher

        return tiny_teacher("llama", num_hidden_layers=2), byte_tokenizer()
    if name == "smollm2-reasoner":
        from transformers_red.resources import load_smollm2_reasoner

        teacher, tokenizer = load_smollm2_reasoner()
    else:
        from transformers_red.loading import load_model

        teacher, tokenizer = load_model(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return teacher, tokenizer


def build_data(args, tokenizer):
    """Training rows (prompt/completion), held-out problems per K, generic held-out texts, eRank texts."""
    from transformers_red.resources import builtin_texts

    train = generate_mixed_word_problems(args.train_samples, seed=DISTILL_SEED + args.seed)
    rows = {"prompt": [p.prompt for p in train], "completion": [p.target + tokenizer.eos_token for p in train]}
    held_out = [p for k in range(1, args.max_k + 1)
                for p in generate_word_problems(args.problems_per_k, k, seed=EVAL_SEED)]
    generic = builtin_texts()[-args.generic_texts:]
    erank = [p.prompt + p.target for p in generate_word_problems(args.erank_texts, 3, seed=EVAL_SEED + 7)]
    return datasets.Dataset.from_dict(rows), held_out, generic, erank


def make_measure(tokenizer, held_out, generic, erank_texts, args):
    def measure(model) -> dict:
        model.eval()
        accuracy = evaluate_word_problems(model, tokenizer, held_out, batch_size=args.eval_batch_size)
        erank = layerwise_effective_rank(model, erank_texts, tokenizer, max_length=args.max_length)
        result = {"exact_match": {str(k): a for k, a in accuracy.items()},
                  "exact_match_mean": statistics.fmean(accuracy.values()),
                  "ppl_generic": perplexity(model, generic, tokenizer, max_length=args.max_length),
                  "erank": erank, "erank_mean": statistics.fmean(erank)}
        model.train()
        return result

    return measure


class Measurements(TrainerCallback):
    """Measure the merged student at chosen steps, keeping the training time (measurements excluded)."""

    def __init__(self, measure, steps: set[int], offset: int = 0, seconds: float = 0.0):
        self.measure, self.steps, self.offset = measure, steps, offset
        self.trainer, self.records, self.train_seconds, self._since = None, [], seconds, None

    def on_step_begin(self, args, state, control, **kwargs):
        if self._since is None:
            self._since = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step + self.offset
        self.train_seconds += time.perf_counter() - self._since
        if step in self.steps or state.global_step == state.max_steps:
            record = {"step": step, "train_seconds": round(self.train_seconds, 1),
                      **self.measure(self.trainer.merged_student())}
            print(json.dumps({k: v for k, v in record.items() if k != "erank"}), flush=True)
            self.records.append(record)
        self._since = time.perf_counter()


def _config(args, tmp: str, steps: int, **overrides) -> RedConfig:
    return RedConfig(output_dir=tmp, width_ratio=args.width_ratio, max_steps=steps, seed=args.seed,
                     per_device_train_batch_size=args.batch_size, max_length=args.max_length,
                     learning_rate=args.learning_rate, warmup_steps=max(1, steps // 20), lr_scheduler_type="cosine",
                     logging_steps=max(1, steps // 20), report_to=[], save_strategy="no", disable_tqdm=True,
                     use_cpu=not torch.cuda.is_available(), keep_freed_cpu_memory=True, **overrides)


def run_arm(arm: str, train, measure, args) -> dict:
    """Distil one arm from a fresh teacher; its measurements (step 0 included)."""
    teacher, tokenizer = load_teacher(args.teacher)
    steps = set(args.measure_steps)
    with tempfile.TemporaryDirectory() as tmp:
        if arm != "hybrid":
            callback = Measurements(measure, steps)
            trainer = RedDistillationTrainer(model=teacher, args=_config(args, tmp, args.steps, **ARMS[arm][1]),
                                             train_dataset=train, processing_class=tokenizer, callbacks=[callback])
            callback.trainer = trainer
            records = [{"step": 0, "train_seconds": 0.0, **measure(trainer.merged_student())}] if 0 in steps else []
            trainer.train()
            records += callback.records
        else:  # projections for the first half, then the merged student's own weights for the rest
            half = args.steps // 2
            first = Measurements(measure, steps)
            projections = RedDistillationTrainer(model=teacher, args=_config(args, tmp, half), train_dataset=train,
                                                 processing_class=tokenizer, callbacks=[first])
            first.trainer = projections
            records = []
            if 0 in steps:
                records = [{"step": 0, "train_seconds": 0.0, **measure(projections.merged_student())}]
            projections.train()
            second = Measurements(measure, steps, offset=half, seconds=first.train_seconds)
            weights = RedDistillationTrainer(model=projections.red_model, train_dataset=train,
                                             processing_class=tokenizer, callbacks=[second],
                                             args=_config(args, tmp, args.steps - half, train="weights"))
            second.trainer = weights
            weights.train()
            records += first.records + second.records
    return {"label": ARMS[arm][0], "overrides": ARMS[arm][1], "records": records}


def record_at(run: dict, step: int | None = None, seconds: float | None = None) -> dict | None:
    """The measurement at `step`, or the last one within `seconds` of training."""
    rows = [r for r in run["records"] if (step is None or r["step"] == step)
            and (seconds is None or r["train_seconds"] <= seconds * 1.001)]
    return rows[-1] if rows else None


def format_tables(report: dict) -> str:
    ks = sorted(report["teacher"]["exact_match"], key=int)
    header = ("| student | step | train s | " + " | ".join(f"K={k}" for k in ks)
              + " | mean | ppl generic | mean eRank |\n|" + "---|" * (len(ks) + 6))

    def row(label: str, r: dict) -> str:
        cells = " | ".join(f"{100 * r['exact_match'][k]:.0f}" for k in ks)
        return (f"| {label} | {r.get('step', '-')} | {r.get('train_seconds', 0):.0f} | {cells} | "
                f"{100 * r['exact_match_mean']:.1f} | {r['ppl_generic']:.1f} | {r['erank_mean']:.1f} |")

    runs, s = report["arms"], report["settings"]
    parts = []
    for step in sorted({*s["measure_steps"], s["steps"]}):
        lines = [f"Width {s['width_ratio']}, at equal steps ({step}); exact match in %:", "", header,
                 row("teacher", report["teacher"])]
        lines += [row(run["label"], r) for run in runs.values() if (r := record_at(run, step=step))]
        if len(lines) > 4:
            parts.append("\n".join(lines))
    finished = [run for run in runs.values() if run["records"] and run["records"][-1]["step"] == s["steps"]]
    if len(finished) > 1:
        budget = min(run["records"][-1]["train_seconds"] for run in finished)
        lines = [f"Width {s['width_ratio']}, at equal training time ({budget:.0f} s, the fastest arm's {s['steps']} "
                 "steps; each arm at its last measurement within it):", "", header]
        lines += [row(run["label"], r) for run in runs.values() if (r := record_at(run, seconds=budget))]
        parts.append("\n".join(lines))
    parts.append(f"{s['steps']} steps x {s['batch_size']} problems (K = 1..6, prompt/completion), learning rate "
                 f"{s['learning_rate']} (cosine), seed {s['seed']}; exact match on {s['problems_per_k']} held-out "
                 f"problems per K (greedy); perplexity on {s['generic_texts']} held-out generic paragraphs; eRank on "
                 f"{s['erank_texts']} held-out problems. {report['environment']}.")
    return "\n\n".join(parts)


def plot(report: dict, path: str) -> None:
    from transformers_red.plots import new_figure, save_figure

    fig = new_figure(figsize=(11, 4))
    ks = sorted(report["teacher"]["exact_match"], key=int)
    ax = fig.add_subplot(1, 2, 1)
    ax.plot([int(k) for k in ks], [report["teacher"]["exact_match"][k] for k in ks], "k--", label="teacher")
    for run in report["arms"].values():
        last = run["records"][-1]
        ax.plot([int(k) for k in ks], [last["exact_match"][k] for k in ks], marker="o",
                label=f"{run['label']} (step {last['step']})")
    ax.set(xlabel="reasoning steps K", ylabel="exact match", ylim=(-0.02, 1.02),
           title=f"held-out problems, width {report['settings']['width_ratio']}")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(1, 2, 2)
    ax.plot(report["teacher"]["erank"], "k--", label="teacher")
    for run in report["arms"].values():
        ax.plot(run["records"][-1]["erank"], marker=".", label=run["label"])
    ax.set(xlabel="layer (0 = embedding)", ylabel="eRank", title="per-layer eRank, held-out problems")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def write_outputs(report: dict, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "results.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, folder / "results.json")
    text = format_tables(report)
    (folder / "results.md").write_text(text + "\n")
    if report["arms"]:
        plot(report, str(folder / "retention.png"))
    return text


def update_doc(doc: str, folders: list[Path]) -> None:
    sections = []
    for folder in folders:
        report = json.loads((folder / "results.json").read_text())
        image = os.path.relpath(folder / "retention.png", os.path.dirname(os.path.abspath(doc)))
        sections.append(f"```bash\n{report['command']}\n```\n\n{format_tables(report)}\n\n![per-K accuracy and eRank]"
                        f"({image})")
    update_marked_section(doc, "reasoner_arms", "\n\n".join(sections))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="smollm2-reasoner", help="'smollm2-reasoner', 'tiny' (CI) or a model folder")
    p.add_argument("--arms", nargs="+", default=["red", "lrc", "random_t1", "prune_distil"], choices=list(ARMS))
    p.add_argument("--width_ratio", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--measure_steps", type=int, nargs="*", default=[0, 100, 300])
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_length", type=int, default=192)
    p.add_argument("--learning_rate", type=float, default=2e-4)
    p.add_argument("--train_samples", type=int, default=4000)
    p.add_argument("--max_k", type=int, default=6)
    p.add_argument("--problems_per_k", type=int, default=40)
    p.add_argument("--generic_texts", type=int, default=32)
    p.add_argument("--erank_texts", type=int, default=16)
    p.add_argument("--eval_batch_size", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output_dir", default="reasoner-arms")
    p.add_argument("--rerun", action="store_true", help="redo arms already in results.json")
    p.add_argument("--from_json", nargs="+", default=None,
                   help="folders of width_*/results.json (runs of other settings side by side): re-render only")
    p.add_argument("--update_doc", default=None, help="markdown file whose reasoner_arms section to replace")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        folders = [folder for root in args.from_json for folder in sorted(Path(root).glob("width_*"))]
        for folder in folders:
            print(write_outputs(json.loads((folder / "results.json").read_text()), folder))
        if args.update_doc:
            update_doc(args.update_doc, folders)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.output_dir) / f"width_{args.width_ratio:g}"
    report = json.loads((folder / "results.json").read_text()) if (folder / "results.json").is_file() else None
    settings = {k: v for k, v in vars(args).items() if k not in ("arms", "rerun", "output_dir", "update_doc",
                                                                 "from_json", "threads")}
    if report is not None and report["settings"] != settings:
        raise SystemExit(f"{folder}/results.json was measured with other settings ({report['settings']}); give "
                         "another --output_dir or the same settings")
    teacher, tokenizer = load_teacher(args.teacher)
    train, held_out, generic, erank_texts = build_data(args, tokenizer)
    measure = make_measure(tokenizer, held_out, generic, erank_texts, args)
    report = report or {"settings": settings, "teacher": measure(teacher), "arms": {},
                        "environment": _environment(),
                        "command": "python benchmarks/reasoner_arms.py " + " ".join(sys.argv[1:] if argv is None
                                                                                     else argv)}
    del teacher
    for arm in args.arms:
        if arm in report["arms"] and not args.rerun:
            print(f"== {arm}: already measured, skipped", flush=True)
            continue
        print(f"== {arm}: {ARMS[arm][0]}", flush=True)
        report["arms"][arm] = run_arm(arm, train, measure, args)
        print(write_outputs(report, folder), flush=True)  # after every arm: a stopped run keeps what it measured
    print(write_outputs(report, folder))
    if args.update_doc:
        update_doc(args.update_doc, sorted(Path(args.output_dir).glob("width_*")))
    return 0


def _environment() -> str:
    import platform

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})"
    return f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}"


if __name__ == "__main__":
    raise SystemExit(main())
