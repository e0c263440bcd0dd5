"""RED against the alternatives a user would try, on a real model: the arms at equal steps and at equal time.

Arms (all through `RedDistillationTrainer`, same data, batches, steps, learning rate and channel selection):

- `red`: RED at the library's defaults (channel-selection init, `clone_normalization="teacher_mean_square"`).
- `red_paper`: RED with the paper's loss (plain clone MSE summed over layers, `clone_normalization="none"`).
- `random`: LRC's random-init projections, otherwise the defaults.
- `prune_distil`: Minitron's recipe, `train="weights"`: the step-0 RED student (the teacher hard-pruned to the
  selected channels) merged into a plain model whose own weights are trained with the same losses.
- `red_noclone`: RED with `clone_weight=0` (CE + KL only).

Training text mixes GSM-style worked problems (reasoning-gym `gsm_symbolic`) with generic English paragraphs
(Python documentation), one of each in turn. During one run per arm the student is merged and measured every
`--eval-every` steps: perplexity on held-out problems and held-out generic paragraphs (never trained on), and at
the steps in `--match-steps` greedy exact match of the final `#### N` on `--problems` unseen problems and
per-layer eRank. Training time excludes the measurements, so the table at equal wall time compares each arm at
its last measurement within the fastest arm's training time. Arms run one after another.

    python benchmarks/real_model_arms.py --threads 2 --output-dir /tmp/arms       # SmolLM2-135M, 300 steps
    python benchmarks/real_model_arms.py --teacher PATH --arms red prune_distil   # your own model folder
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import datasets  # noqa: E402
import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from transformers_red import RedConfig, RedDistillationTrainer  # noqa: E402
from transformers_red.demo.chain_task import greedy_generate  # noqa: E402
from transformers_red.evaluation.erank import layerwise_effective_rank  # noqa: E402
from transformers_red.evaluation.perplexity import perplexity  # noqa: E402
from transformers_red.records import update_marked_section  # noqa: E402

ARMS = {
    "red": ("RED, defaults", {}),
    "red_paper": ("RED, paper loss (plain clone MSE)", {"clone_normalization": "none"}),
    "random": ("random init (LRC)", {"init": "random"}),
    "prune_distil": ("prune and distil (train='weights')", {"train": "weights"}),
    "red_noclone": ("RED, clone_weight=0", {"clone_weight": 0.0}),
}
_ANSWER = re.compile(r"####\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")


def final_answer(text: str) -> str | None:
    """The number after the first `####` in `text` (commas removed), or None."""
    match = _ANSWER.search(text)
    return match.group(1).replace(",", "") if match else None


def exact_match(model, tokenizer, problems: list[tuple[str, str]], batch_size: int, max_new_tokens: int) -> float:
    """Fraction of (prompt, answer) problems whose greedy continuation's `#### N` equals the answer."""
    hits = 0
    for start in range(0, len(problems), batch_size):
        part = problems[start:start + batch_size]
        outputs = greedy_generate(model, tokenizer, [p for p, _ in part], max_new_tokens=max_new_tokens)
        hits += sum(final_answer(out) == answer for out, (_, answer) in zip(outputs, part))
    return hits / len(problems)


def build_data(train_samples: int, problems: int, seed: int = 0):
    """Interleaved training texts; held-out texts of each kind; unseen (prompt, answer) problems."""
    from transformers_red.resources import builtin_texts, reasoning_texts

    generic = builtin_texts()
    held_out = {"reasoning": reasoning_texts(64, seed=seed + 1), "generic": generic[-64:]}
    reasoning, generic = reasoning_texts(train_samples // 2 + 1, seed=seed), generic[:-64]
    train = [t for i, r in enumerate(reasoning) for t in (r, generic[i % len(generic)])][:train_samples]
    unseen = []
    for text in reasoning_texts(problems, seed=seed + 2) if problems else []:
        question, answer = text.split("\nAnswer:", 1)
        unseen.append((question + "\nAnswer:", final_answer(answer)))
    return train, held_out, unseen


class Measurements(TrainerCallback):
    """Measure the merged student at chosen steps; keeps the training time (measurements excluded)."""

    def __init__(self, measure, every: int, match_steps: set[int]):
        self.measure, self.every, self.match_steps = measure, every, match_steps
        self.trainer = None
        self.records: list[dict] = []
        self.train_seconds, self._since = 0.0, None

    def on_step_begin(self, args, state, control, **kwargs):
        if self._since is None:
            self._since = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step % self.every and step != state.max_steps:
            return
        self.train_seconds += time.perf_counter() - self._since
        student = self.trainer.merged_student()
        record = {"step": step, "train_seconds": self.train_seconds,
                  **self.measure(student, with_match=step in self.match_steps or step == state.max_steps)}
        print(json.dumps(record), flush=True)
        self.records.append(record)
        self._since = time.perf_counter()


def run_arm(arm: str, load_teacher, train: list[str], measure, args: argparse.Namespace) -> dict:
    """Distil one arm; its measurements over steps."""
    label, overrides = ARMS[arm]
    teacher, tokenizer = load_teacher()
    callback = Measurements(measure, args.eval_every, set(args.match_steps))
    with tempfile.TemporaryDirectory() as tmp:
        config = RedConfig(keep_freed_cpu_memory=True, output_dir=tmp, width_ratio=args.width_ratio,
                           max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                           max_length=args.max_length,
                           learning_rate=args.learning_rate, warmup_steps=max(1, args.steps // 100),
                           logging_steps=max(1, args.steps // 30), seed=args.seed, report_to=[],
                           save_strategy="no", disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
                           **overrides)
        trainer = RedDistillationTrainer(model=teacher, args=config, processing_class=tokenizer,
                                         train_dataset=datasets.Dataset.from_dict({"text": train}),
                                         callbacks=[callback])
        callback.trainer = trainer
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
    losses = [{k: h[k] for k in ("step", "loss", "kd_loss", "ce_loss", "clone_loss") if k in h}
              for h in trainer.state.log_history if "kd_loss" in h]
    return {"label": label, "overrides": overrides, "records": callback.records, "losses": losses,
            "wall_seconds": wall}


def make_measure(tokenizer, held_out, unseen, args: argparse.Namespace):
    erank_texts = held_out["reasoning"][: args.erank_texts]

    def measure(model, with_match: bool) -> dict:
        model.eval()
        result = {f"ppl_{kind}": perplexity(model, texts, tokenizer, max_length=args.max_length)
                  for kind, texts in held_out.items()}
        if with_match:
            result["exact_match"] = exact_match(model, tokenizer, unseen, args.eval_batch_size, args.max_new_tokens)
            erank = layerwise_effective_rank(model, erank_texts, tokenizer, max_length=args.max_length)
            result.update(erank=erank, erank_mean=statistics.fmean(erank), erank_min=min(erank))
        model.train()
        return result

    return measure


def record_at(run: dict, step: int | None = None, seconds: float | None = None) -> dict | None:
    """The measurement at `step`, or the last one within `seconds` of training."""
    rows = [r for r in run["records"] if (step is None or r["step"] == step)
            and (seconds is None or r["train_seconds"] <= seconds * 1.001)]
    return rows[-1] if rows else None


def format_tables(report: dict) -> str:
    runs, teacher = report["arms"], report["teacher"]
    header = ("| student | step | train s | ppl held-out problems | ppl generic (held out) | exact match | "
              "mean / min eRank |\n|---|---|---|---|---|---|---|")

    def row(label, r):
        match = f"{100 * r['exact_match']:.1f} %" if "exact_match" in r else "-"
        erank = f"{r['erank_mean']:.1f} / {r['erank_min']:.1f}" if "erank_mean" in r else "-"
        return (f"| {label} | {r.get('step', '-')} | {r.get('train_seconds', 0):.0f} | {r['ppl_reasoning']:.2f} | "
                f"{r['ppl_generic']:.2f} | {match} | {erank} |")

    parts = []
    for step in sorted(set(report["settings"]["match_steps"]) | {report["settings"]["steps"]}):
        lines = [f"At equal steps ({step}):", "", header, row("teacher", teacher)]
        lines += [row(run["label"], r) for run in runs.values() if (r := record_at(run, step=step))]
        parts.append("\n".join(lines))
    last_step = report["settings"]["steps"]
    finished = [run for run in runs.values() if run["records"] and run["records"][-1]["step"] == last_step]
    if finished:
        budget = min(run["records"][-1]["train_seconds"] for run in finished)
        lines = [f"At equal training time ({budget:.0f} s, the fastest arm's {report['settings']['steps']} steps; "
                 "each arm at its last measurement within it):", "", header]
        lines += [row(run["label"], r) for run in runs.values() if (r := record_at(run, seconds=budget))]
        parts.append("\n".join(lines))
    s = report["settings"]
    parts.append(f"{s['steps']} steps x {s['batch_size']} sequences of <= {s['max_length']} tokens, learning rate "
                 f"{s['learning_rate']}, width ratio {s['width_ratio']}, seed {s['seed']}; perplexity on 64 held-out "
                 f"texts of each kind; exact match on {s['problems']} unseen gsm_symbolic problems (greedy, "
                 f"<= {s['max_new_tokens']} new tokens); eRank on {s['erank_texts']} held-out problems. "
                 f"Device {report['device']}, {report['threads']} threads.")
    return "\n\n".join(parts)


def plot(report: dict, path: str) -> None:
    from transformers_red.plots import new_figure, save_figure

    fig = new_figure(figsize=(11, 4))
    for i, key in enumerate(("ppl_reasoning", "ppl_generic")):
        ax = fig.add_subplot(1, 2, i + 1)
        for run in report["arms"].values():
            ax.plot([r["step"] for r in run["records"]], [r[key] for r in run["records"]], marker=".",
                    label=run["label"])
        ax.axhline(report["teacher"][key], color="k", ls="--", lw=0.8, label="teacher")
        ax.set(xlabel="step", ylabel="perplexity", yscale="log",
               title="held-out problems" if key == "ppl_reasoning" else "held-out generic text")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2", help="'smollm2' (offline wheel) or a local model folder")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=60)
    parser.add_argument("--match-steps", type=int, nargs="*", default=[60])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--width-ratio", type=float, default=0.5)
    parser.add_argument("--train-samples", type=int, default=2048)
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--eval-batch-size", type=int, default=25)
    parser.add_argument("--erank-texts", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output-dir", default="real-model-arms")
    parser.add_argument("--update-doc", default=None, help="markdown file whose real_model_arms section to replace")
    parser.add_argument("--from-json", default=None,
                        help="re-render tables, plot and doc section from a results.json of an earlier run")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.output_dir, exist_ok=True)

    def load_teacher():
        from transformers_red.loading import load_model

        teacher, tokenizer = load_model(args.teacher)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return teacher, tokenizer

    if args.from_json:
        with open(args.from_json, encoding="utf-8") as f:
            report = json.load(f)
        write_outputs(report, args.output_dir, args.update_doc)
        return 0
    train, held_out, unseen = build_data(args.train_samples, args.problems, args.seed)
    teacher, tokenizer = load_teacher()
    measure = make_measure(tokenizer, held_out, unseen, args)
    report = {"settings": vars(args), "device": "cuda" if torch.cuda.is_available() else "cpu",
              "threads": torch.get_num_threads(), "teacher": measure(teacher, with_match=True), "arms": {},
              "command": "python benchmarks/real_model_arms.py "
                         + " ".join(argv if argv is not None else sys.argv[1:])}
    del teacher
    for arm in args.arms:
        print(f"== {arm}: {ARMS[arm][0]}", flush=True)
        report["arms"][arm] = run_arm(arm, load_teacher, train, measure, args)
        write_outputs(report, args.output_dir, None)  # after every arm: a stopped run keeps what it measured
    write_outputs(report, args.output_dir, args.update_doc)
    return 0


def write_outputs(report: dict, output_dir: str, update_doc: str | None) -> None:
    """results.json, results.md and perplexity.png in `output_dir`; the doc section when `update_doc` is given."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    text = format_tables(report)
    with open(os.path.join(output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    plot(report, os.path.join(output_dir, "perplexity.png"))
    print(text)
    if update_doc:
        image = os.path.relpath(os.path.join(output_dir, "perplexity.png"),
                                os.path.dirname(os.path.abspath(update_doc)))
        update_marked_section(update_doc, "real_model_arms",
                              f"```bash\n{report['command']}\n```\n\n{text}\n\n![perplexity over steps]({image})")


if __name__ == "__main__":
    raise SystemExit(main())
