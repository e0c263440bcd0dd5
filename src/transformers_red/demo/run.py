"""`transformers-red demo`: RED vs random-init (LRC) students of the embedded chain-reasoning teacher.

Loads the packaged teacher, builds 50 %-width students with `init="activation"` (RED, tau = 1) and
`init="random"` (LRC, tau = 40 and tau = 1) (optionally `"orthogonal"`), distils each with
`RedDistillationTrainer` for the same steps on the same data, merges, and evaluates teacher and students on
held-out problems per hop count and on per-layer eRank. Prints a table; writes `results.json` and PNG plots.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import datasets
import torch

from ..evaluation.erank import layerwise_effective_rank, projection_spectra
from ..loading import load_text_dataset
from ..training.config import RedConfig
from ..training.trainer import RedDistillationTrainer
from .chain_task import (
    HOPS,
    completion_columns,
    evaluate_model,
    generate_mixed_problems,
    generate_problems,
    load_reasoning_teacher,
)


@dataclass(frozen=True)
class Variant:
    """One student recipe."""

    name: str
    init: str
    temperature: float


VARIANTS = {
    "red": Variant("RED (activation, tau=1)", "activation", 1.0),
    "lrc40": Variant("LRC (random, tau=40)", "random", 40.0),
    "lrc1": Variant("LRC (random, tau=1)", "random", 1.0),
    "orth": Variant("orthogonal, tau=1", "orthogonal", 1.0),
}


def _spectrum_summary(red: Any) -> dict[str, Any]:
    spectra = projection_spectra(red)
    values = sorted(v for s in spectra.values() for v in s["singular_values"])
    return {"min": values[0], "max": values[-1], "median": values[len(values) // 2],
            "mean_erank": statistics.fmean(s["erank"] for s in spectra.values()),
            "example": next(iter(spectra.values()))["singular_values"]}


def _measure(model: Any, tokenizer: Any, problems: list, erank_texts: list[str],
             show_progress: bool = False) -> dict[str, Any]:
    accuracy = evaluate_model(model, tokenizer, problems, show_progress=show_progress)
    erank = layerwise_effective_rank(model, erank_texts, tokenizer, max_length=128)
    return {"accuracy": {str(h): a for h, a in accuracy.items()}, "erank": erank,
            "mean_erank": statistics.fmean(erank)}


def distil_variant(variant: Variant, *, teacher_dir: str | None, train_data: dict[str, list[str]], problems: list,
                   erank_texts: list[str], width_ratio: float, steps: int, seed: int, batch_size: int,
                   learning_rate: float, show_progress: bool, step0: bool = False) -> dict[str, Any]:
    """Build, distil, merge and measure one student; returns its numbers.

    `train_data`: dataset columns, {"text": [...]} (every token trained) or {"prompt": [...], "completion": [...]}
    (TRL's prompt-completion format: CE, KL and clone terms count completion tokens only).
    """
    teacher, tokenizer = load_reasoning_teacher(teacher_dir)
    with tempfile.TemporaryDirectory() as tmp:
        args = RedConfig(keep_freed_cpu_memory=True, output_dir=tmp, max_steps=steps,
                         per_device_train_batch_size=batch_size, learning_rate=learning_rate,
                         lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20),
                         temperature=variant.temperature, init=variant.init, width_ratio=width_ratio, seed=seed,
                         max_length=128, report_to=[], save_strategy="no", logging_steps=max(1, steps // 10),
                         erank_steps=max(1, steps // 10), erank_num_samples=len(erank_texts),
                         disable_tqdm=not show_progress, use_cpu=not torch.cuda.is_available())
        trainer = RedDistillationTrainer(model=teacher, args=args, processing_class=tokenizer,
                                         train_dataset=datasets.Dataset.from_dict(train_data),
                                         erank_dataset=erank_texts)
        result: dict[str, Any] = {"name": variant.name, "init": variant.init, "temperature": variant.temperature,
                                  "seed": seed, "spectrum_init": _spectrum_summary(trainer.red_model)}
        if step0:
            result["step0"] = _measure(trainer.red_model.merge_and_unload(), tokenizer, problems, erank_texts,
                                       show_progress)
        started = time.perf_counter()
        trainer.train()
        result["train_seconds"] = time.perf_counter() - started
        result["losses"] = [{k: v for k, v in h.items() if k in ("step", "loss", "kd_loss", "ce_loss", "clone_loss")}
                            for h in trainer.state.log_history if "kd_loss" in h]
        result["spectrum_end"] = _spectrum_summary(trainer.red_model)
        # the collapse alarm's inputs: per-layer eRank every tenth of the run (ERankCallback)
        result["erank_history"] = trainer._erank_callback.history
        result["erank_teacher"] = trainer._erank_callback.teacher
        student = trainer.red_model.merge_and_unload()
    result.update(_measure(student, tokenizer, problems, erank_texts, show_progress))
    result["student_hidden_size"] = student.config.hidden_size
    return result


def run_demo(*, teacher_dir: str | None = None, data: str | None = None, output_dir: str | None = None,
             width_ratio: float = 0.5, steps: int = 150, seeds: tuple[int, ...] = (0,),
             variants: tuple[str, ...] = ("red", "lrc40", "lrc1"),
             eval_per_hop: int = 50, train_samples: int = 4000, batch_size: int = 32, learning_rate: float = 2e-3,
             step0: bool = False, plots: bool = True, show_progress: bool = True) -> dict[str, Any]:
    """Run the comparison and return every number; writes `results.json` (and plots) into `output_dir`."""
    started = time.perf_counter()
    from ..adapter.config import RedAdapterConfig

    RedAdapterConfig(width_ratio=width_ratio)  # a bad width fails before any folder is made
    if teacher_dir is not None and not os.path.isdir(teacher_dir):
        raise FileNotFoundError(f"run_demo(teacher_dir={teacher_dir!r}): not a folder.")
    output_dir = output_dir or time.strftime("red-demo-%Y%m%d-%H%M%S")
    os.makedirs(output_dir, exist_ok=True)
    teacher, tokenizer = load_reasoning_teacher(teacher_dir)
    problems = [p for hops in HOPS for p in generate_problems(eval_per_hop, hops, seed=10_000)]
    erank_texts = [p.text for p in problems[:: max(1, len(problems) // 64)]][:64]
    report: dict[str, Any] = {"settings": {"width_ratio": width_ratio, "steps": steps, "seeds": list(seeds),
                                           "eval_per_hop": eval_per_hop, "batch_size": batch_size,
                                           "learning_rate": learning_rate, "train_samples": train_samples},
                              "teacher": {**_measure(teacher, tokenizer, problems, erank_texts, show_progress),
                                          "hidden_size": teacher.config.hidden_size}, "students": []}
    user_texts = None
    if data is not None:  # the user's own texts: train on them, measure eRank on the last 64
        user_texts = load_text_dataset(data, num_samples=train_samples)["text"]
        erank_texts = user_texts[-64:]
        report["settings"]["data"] = data
    for seed in seeds:
        # the teacher was trained on answers only: distil where it knows (completion tokens), not on the prompts
        train_data = {"text": user_texts} if user_texts else completion_columns(
            generate_mixed_problems(train_samples, seed=seed))
        for key in variants:
            report["students"].append(distil_variant(
                VARIANTS[key], teacher_dir=teacher_dir, train_data=train_data, problems=problems,
                erank_texts=erank_texts, width_ratio=width_ratio, steps=steps, seed=seed, batch_size=batch_size,
                learning_rate=learning_rate, show_progress=show_progress, step0=step0))
    report["wall_seconds"] = time.perf_counter() - started
    report["output_dir"] = os.path.abspath(output_dir)
    with open(os.path.join(output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    if plots:
        from .plots import plot_demo

        report["plots"] = plot_demo(report, output_dir)
    return report


def format_demo(report: dict[str, Any]) -> str:
    """The accuracy-per-hop and eRank table."""
    hops = list(report["teacher"]["accuracy"])
    rows = [("teacher", report["teacher"])] + [(f"{s['name']} s{s['seed']}", s) for s in report["students"]]
    width = max(len(name) for name, _ in rows) + 2
    header = "model".ljust(width) + "".join(f"hop {h:>2} " for h in hops) + " mean eRank"
    lines = [header, "-" * len(header)]
    for name, r in rows:
        lines.append(name.ljust(width) + "".join(f"{100 * r['accuracy'][h]:6.1f} " for h in hops)
                     + f"{r['mean_erank']:11.2f}")
    s = report["settings"]
    lines.append(f"\nexact-match accuracy (%) on {s['eval_per_hop']} held-out problems per hop; students at "
                 f"{s['width_ratio']:.0%} width after {s['steps']} steps; wall time {report['wall_seconds']:.0f} s")
    if "output_dir" in report:
        lines.append(f"results.json and plots in {report['output_dir']}")
    return "\n".join(lines)
