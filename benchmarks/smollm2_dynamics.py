"""How the student's eRank and projection spectra move during distillation, over a sweep of learning rate and
clone settings, for RED and random init (the real-LLM issue: why RED students' eRank fell on SmolLM2).

Every run distils SmolLM2-135M-Instruct (or `--teacher PATH`) at `--width-ratio` on the same interleaved
reasoning + generic texts for the same steps, and records every `--every` steps: the student's per-layer eRank
(`ERankCallback` history, on held-out problems), the singular values of three projections (the embedding, a
middle layer's q_proj and down_proj), and the clone loss per term; at the end the held-out perplexity on both
kinds of text. Clone settings: `student` / `teacher` = the paper's plain MSE compared in student / teacher
space (`clone_normalization="none"`), `normalised` = the library default (`teacher_mean_square`, student
space), `off` = `clone_weight=0`.

    python benchmarks/smollm2_dynamics.py --threads 2 --output-dir /tmp/dynamics     # 3 lrs x 4 clones x 2 inits
    python benchmarks/smollm2_dynamics.py --lrs 1e-4 --clones normalised --inits activation --steps 2000  # GPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
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
from transformers_red.evaluation.perplexity import perplexity  # noqa: E402

CLONES = {
    "student": {"clone_weight": 0.2, "clone_output_space": "student", "clone_normalization": "none"},
    "teacher": {"clone_weight": 0.2, "clone_output_space": "teacher", "clone_normalization": "none"},
    "normalised": {"clone_weight": 0.2, "clone_output_space": "student", "clone_normalization": "teacher_mean_square"},
    "off": {"clone_weight": 0.0},
}
CLONE_KEYS = ("clone_loss", "clone/q", "clone/k", "clone/v", "clone/gate", "clone/up", "clone/attn", "clone/ffn")


def watched_modules(num_layers: int) -> dict[str, str]:
    """label -> module name of the projections whose spectra are recorded."""
    mid = num_layers // 2
    return {"embedding": "model.embed_tokens", f"layer {mid} q": f"model.layers.{mid}.self_attn.q_proj",
            f"layer {mid} down": f"model.layers.{mid}.mlp.down_proj"}


class SpectraCallback(TrainerCallback):
    """Singular values of the watched projections at step 0 and every `every` steps."""

    def __init__(self, modules: dict[str, str], every: int):
        self.modules, self.every, self.trainer = modules, every, None
        self.history: list[dict] = []

    def _record(self, step: int) -> None:
        red = self.trainer.red_model
        with torch.no_grad():
            values = {label: torch.linalg.svdvals(red.projection(name).float()).tolist()
                      for label, name in self.modules.items()}
        self.history.append({"step": step, "singular_values": values})

    def on_train_begin(self, args, state, control, **kwargs):
        self._record(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._record(state.global_step)


def run(init: str, lr: float, clone: str, load_teacher, train, held_out, args) -> dict:
    teacher, tokenizer = load_teacher()
    spectra = SpectraCallback(watched_modules(teacher.config.num_hidden_layers), args.every)
    with tempfile.TemporaryDirectory() as tmp:
        config = RedConfig(keep_freed_cpu_memory=True, output_dir=tmp, init=init, width_ratio=args.width_ratio,
                           max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                           max_length=args.max_length,
                           learning_rate=lr, warmup_steps=max(1, args.steps // 100), logging_steps=args.every,
                           erank_steps=args.every, erank_num_samples=args.erank_texts, seed=args.seed,
                           report_to=[], save_strategy="no", disable_tqdm=True,
                           use_cpu=not torch.cuda.is_available(), **CLONES[clone])
        trainer = RedDistillationTrainer(model=teacher, args=config, processing_class=tokenizer,
                                         train_dataset=datasets.Dataset.from_dict({"text": train}),
                                         erank_dataset=held_out["reasoning"], callbacks=[spectra])
        spectra.trainer = trainer
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        student = trainer.merged_student().eval()
    ppl = {kind: perplexity(student, texts, tokenizer, max_length=args.max_length) for kind, texts in held_out.items()}
    erank = trainer._erank_callback
    losses = [{k: h[k] for k in ("step", "loss", "kd_loss", "ce_loss", *CLONE_KEYS) if k in h}
              for h in trainer.state.log_history if "kd_loss" in h]
    return {"init": init, "learning_rate": lr, "clone": clone, "perplexity": ppl, "train_seconds": seconds,
            "erank_teacher": erank.teacher, "erank_history": erank.history, "spectra": spectra.history,
            "losses": losses}


def format_table(runs: list[dict]) -> str:
    lines = ["| init | lr | clone | ppl problems | ppl generic | eRank mean step 0 -> end | eRank min end | "
             "clone loss first -> last |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        h, losses = r["erank_history"], [x for x in r["losses"] if "clone_loss" in x]
        clone = f"{losses[0]['clone_loss']:.3g} -> {losses[-1]['clone_loss']:.3g}" if losses else "-"
        lines.append(f"| {r['init']} | {r['learning_rate']:g} | {r['clone']} | {r['perplexity']['reasoning']:.1f} | "
                     f"{r['perplexity']['generic']:.1f} | {h[0]['mean']:.1f} -> {h[-1]['mean']:.1f} | "
                     f"{h[-1]['min']:.1f} | {clone} |")
    teacher = runs[0]["erank_teacher"]
    lines.append(f"\nTeacher mean eRank {statistics.fmean(teacher):.1f} (min {min(teacher):.1f}) on the same texts.")
    return "\n".join(lines)


def plot(runs: list[dict], output_dir: str) -> None:
    from transformers_red.plots import new_figure, save_figure

    fig = new_figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    for r in runs:
        h = r["erank_history"]
        ax.plot([x["step"] for x in h], [x["mean"] for x in h], ls="-" if r["init"] == "activation" else "--",
                marker=".", label=f"{r['init']} lr {r['learning_rate']:g} {r['clone']}")
    ax.axhline(statistics.fmean(runs[0]["erank_teacher"]), color="k", lw=0.8, label="teacher")
    ax.set(xlabel="step", ylabel="mean eRank over layers", title="Student eRank during distillation")
    ax.legend(fontsize=6, ncol=2)
    save_figure(fig, os.path.join(output_dir, "erank_vs_step.png"))
    labels = list(runs[0]["spectra"][-1]["singular_values"])
    fig = new_figure(figsize=(12, 4))
    for i, label in enumerate(labels):
        ax = fig.add_subplot(1, len(labels), i + 1)
        for r in runs:
            ax.plot(r["spectra"][-1]["singular_values"][label], ls="-" if r["init"] == "activation" else "--",
                    label=f"{r['init']} {r['learning_rate']:g} {r['clone']}")
        ax.set(xlabel="index", ylabel="singular value", yscale="log", title=f"{label}, end of training")
    ax.legend(fontsize=5)
    save_figure(fig, os.path.join(output_dir, "spectra_end.png"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="smollm2")
    parser.add_argument("--inits", nargs="+", default=["activation", "random"], choices=["activation", "random"])
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--clones", nargs="+", default=list(CLONES), choices=list(CLONES))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--width-ratio", type=float, default=0.5)
    parser.add_argument("--train-samples", type=int, default=1024)
    parser.add_argument("--erank-texts", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output-dir", default="smollm2-dynamics")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.output_dir, exist_ok=True)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from real_model_arms import build_data

    def load_teacher():
        from transformers_red.loading import load_model

        return load_model(args.teacher)

    train, held_out, _ = build_data(args.train_samples, 0, args.seed)
    runs = []
    # lr outermost, inits innermost: an interrupted sweep still holds matched RED / random pairs
    for lr, clone, init in itertools.product(args.lrs, args.clones, args.inits):
        print(f"== {init} lr {lr:g} clone {clone}", flush=True)
        runs.append(run(init, lr, clone, load_teacher, train, held_out, args))
        report = {"settings": vars(args), "runs": runs,
                  "command": "python benchmarks/smollm2_dynamics.py "
                             + " ".join(argv if argv is not None else sys.argv[1:])}
        with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as f:
            json.dump(report, f)
        with open(os.path.join(args.output_dir, "results.md"), "w", encoding="utf-8") as f:
            f.write(format_table(runs) + "\n")
        plot(runs, args.output_dir)
    print(format_table(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
