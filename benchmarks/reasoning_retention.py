"""Reasoning retention of RED vs random-init (LRC) students of the embedded chain-reasoning teacher.

The `transformers-red demo` comparison over several seeds and widths, with more steps: for every width and
seed, RED (activation init, tau=1), LRC (random init, tau=40) and random init at tau=1 are distilled from the
packaged teacher on the same generated problems for the same steps, merged, and scored on the same held-out
problems per hop count (exact match of the greedy final answer). Also measured before training (step 0).

Prints a markdown table (mean and standard deviation over seeds of the accuracy per hop, the student/teacher
ratio of the mean per-layer eRank, and the step-0 accuracy) and writes `retention.json`, `retention.md` and
`retention_accuracy.png` into `--output-dir`.

    python benchmarks/reasoning_retention.py                         # 3 seeds x widths 0.5, 0.25
    python benchmarks/reasoning_retention.py --steps 100 --seeds 0   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

from transformers_red.demo.run import VARIANTS, run_demo  # noqa: E402
from transformers_red.records import update_marked_section  # noqa: E402


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: dict[float, dict]) -> list[dict]:
    """One row per (width, variant): mean/std over seeds of accuracy per hop (final and step 0), eRank ratio."""
    rows = []
    for width, report in runs.items():
        teacher_erank = report["teacher"]["mean_erank"]
        for key, variant in VARIANTS.items():
            students = [s for s in report["students"] if s["name"] == variant.name]
            if not students:
                continue
            hops = list(students[0]["accuracy"])
            rows.append({
                "width_ratio": width, "variant": variant.name, "seeds": [s["seed"] for s in students],
                "accuracy": {h: _mean_std([100 * s["accuracy"][h] for s in students]) for h in hops},
                "step0_accuracy": {h: _mean_std([100 * s["step0"]["accuracy"][h] for s in students]) for h in hops},
                "erank_ratio": _mean_std([s["mean_erank"] / teacher_erank for s in students]),
                "step0_erank_ratio": _mean_std([s["step0"]["mean_erank"] / teacher_erank for s in students]),
                "final_kd_loss": _mean_std([s["losses"][-1]["kd_loss"] for s in students if s["losses"]]),
            })
    return rows


def format_markdown(runs: dict[float, dict], rows: list[dict]) -> str:
    first = next(iter(runs.values()))
    hops = list(first["teacher"]["accuracy"])
    head = "| width | model | " + " | ".join(f"hop {h}" for h in hops) + " | eRank / teacher |"
    sep = "|---|---|" + "---|" * (len(hops) + 1)
    teacher = first["teacher"]
    lines = [head, sep, "| 100 % | teacher | " + " | ".join(f"{100 * teacher['accuracy'][h]:.1f}" for h in hops)
             + " | 1.00 |"]
    for row in rows:
        cells = " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in row["accuracy"].values())
        lines.append(f"| {row['width_ratio']:.0%} | {row['variant']} | {cells} | "
                     f"{row['erank_ratio'][0]:.2f} ± {row['erank_ratio'][1]:.2f} |")
    lines += ["", "Step 0 (after initialisation, before any training):", "", head, sep]
    for row in rows:
        cells = " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in row["step0_accuracy"].values())
        lines.append(f"| {row['width_ratio']:.0%} | {row['variant']} | {cells} | "
                     f"{row['step0_erank_ratio'][0]:.2f} ± {row['step0_erank_ratio'][1]:.2f} |")
    return "\n".join(lines)


def alarm_runs(runs: dict[float, dict], margin: float = 5.0) -> list[dict]:
    """Per student run: the eRank signals over steps and whether it ended below the teacher on multi-hop problems.

    "Lost" = mean exact match over hops >= 1 more than `margin` points below the teacher's. Signals, per
    measurement: `mean` = student mean eRank / teacher mean, `min` = student min over layers / teacher min.
    """
    result = []
    for width, report in runs.items():
        multi_hop = [h for h in report["teacher"]["accuracy"] if int(h) >= 1]
        teacher_accuracy = statistics.fmean(100 * report["teacher"]["accuracy"][h] for h in multi_hop)
        for s in report["students"]:
            if "erank_history" not in s:
                continue
            final = statistics.fmean(100 * s["accuracy"][h] for h in multi_hop)
            teacher = s["erank_teacher"]
            result.append({"width_ratio": width, "variant": s["name"], "seed": s["seed"], "final": final,
                           "lost": final < teacher_accuracy - margin,
                           "mean": [(h["step"], h["mean"] / statistics.fmean(teacher)) for h in s["erank_history"]],
                           "min": [(h["step"], h["min"] / min(teacher)) for h in s["erank_history"]]})
    return result


def alarm_separation(runs: list[dict], signal: str, threshold: float) -> dict:
    """How well "the signal fell below `threshold` at some measurement after step 0" predicts a lost run."""
    counts = dict.fromkeys(("tp", "fp", "fn", "tn"), 0)
    steps = []
    for run in runs:
        below = [step for step, value in run[signal][1:] if value < threshold]
        fired = bool(below)
        steps.append(below[0] if below else None)
        counts[("t" if fired == run["lost"] else "f") + ("p" if fired else "n")] += 1
    lost, kept = counts["tp"] + counts["fn"], counts["tn"] + counts["fp"]
    balanced = statistics.fmean([counts["tp"] / lost if lost else 1.0, counts["tn"] / kept if kept else 1.0])
    return {"signal": signal, "threshold": threshold, **counts, "balanced_accuracy": balanced, "first_steps": steps}


def best_alarms(runs: list[dict]) -> list[dict]:
    """Per signal, the threshold (0.05 steps in 0.05-1.5) with the best balanced accuracy (ties: the lowest)."""
    thresholds = [round(0.05 * i, 2) for i in range(1, 31)]
    return [max((alarm_separation(runs, signal, t) for t in thresholds), key=lambda r: (r["balanced_accuracy"],
                                                                                         -r["threshold"]))
            for signal in ("mean", "min")]


def format_alarms(runs: list[dict], current: float) -> str:
    rows = [alarm_separation(runs, "mean", current), *best_alarms(runs)]
    lines = ["| signal | alarm below | lost & fired | kept & fired | lost & silent | kept & silent "
             "| balanced accuracy |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['signal']} eRank / teacher | {r['threshold']:.2f} | {r['tp']} | {r['fp']} | {r['fn']} | "
                     f"{r['tn']} | {r['balanced_accuracy']:.2f} |")
    lines += ["", "| width | model | seed | final multi-hop accuracy | lost | mean ratio at end | min ratio at end | "
              "first step below the best mean threshold |", "|---|---|---|---|---|---|---|---|"]
    for run, step in zip(runs, rows[1]["first_steps"]):
        lines.append(f"| {run['width_ratio']:.0%} | {run['variant']} | {run['seed']} | {run['final']:.1f} | "
                     f"{'yes' if run['lost'] else 'no'} | {run['mean'][-1][1]:.2f} | {run['min'][-1][1]:.2f} | "
                     f"{step if step is not None else '-'} |")
    return "\n".join(lines)


def plot_retention(rows: list[dict], teacher: dict, path: str) -> str:
    from transformers_red.plots import new_figure, save_figure

    fig = new_figure()
    widths = sorted({r["width_ratio"] for r in rows}, reverse=True)
    for i, width in enumerate(widths):
        ax = fig.add_subplot(1, len(widths), i + 1)
        hops = [int(h) for h in teacher["accuracy"]]
        ax.plot(hops, [100 * a for a in teacher["accuracy"].values()], "k--", label="teacher")
        for row in (r for r in rows if r["width_ratio"] == width):
            means, stds = zip(*row["accuracy"].values())
            ax.errorbar(hops, means, yerr=stds, marker="o", capsize=3, label=row["variant"])
        ax.set(xlabel="hops", ylabel="exact match (%)" if i == 0 else None, ylim=(-2, 102),
               title=f"{width:.0%} width")
        ax.legend(fontsize=6)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--variants", nargs="+", default=["red", "lrc40", "lrc1"], choices=list(VARIANTS))
    parser.add_argument("--eval-per-hop", type=int, default=100)
    parser.add_argument("--train-samples", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--output-dir", default="red-retention")
    parser.add_argument("--update-doc", default=None, help="markdown file whose retention section to replace")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.output_dir, exist_ok=True)
    started = time.perf_counter()
    runs = {}
    for width in args.widths:
        print(f"== width {width:.0%}: seeds {args.seeds}, {args.steps} steps", file=sys.stderr, flush=True)
        runs[width] = run_demo(output_dir=os.path.join(args.output_dir, f"width_{width:g}"), width_ratio=width,
                               steps=args.steps, seeds=tuple(args.seeds), variants=tuple(args.variants),
                               eval_per_hop=args.eval_per_hop, train_samples=args.train_samples, step0=True,
                               show_progress=False)
    rows = summarise(runs)
    table = format_markdown(runs, rows)
    wall = time.perf_counter() - started
    footer = (f"\nmean ± standard deviation over seeds {args.seeds}; {args.eval_per_hop} held-out problems per hop; "
              f"{args.steps} steps; {torch.get_num_threads()} threads; wall time {wall:.0f} s")
    alarms = alarm_runs(runs)
    if alarms:  # the collapse alarm: does a low eRank during training predict lost multi-hop accuracy?
        table += "\n\nCollapse alarm (ERankCallback every tenth of the run):\n\n" + format_alarms(alarms, 0.5)
    print(table + footer)
    teacher = next(iter(runs.values()))["teacher"]
    with open(os.path.join(args.output_dir, "retention.json"), "w", encoding="utf-8") as f:
        json.dump({"settings": vars(args), "teacher": teacher, "rows": rows, "alarm_runs": alarms,
                   "alarms": best_alarms(alarms) if alarms else [], "wall_seconds": wall}, f, indent=1)
    with open(os.path.join(args.output_dir, "retention.md"), "w", encoding="utf-8") as f:
        f.write(table + footer + "\n")
    png = plot_retention(rows, teacher, os.path.join(args.output_dir, "retention_accuracy.png"))
    if args.update_doc:
        command = "python benchmarks/reasoning_retention.py " + " ".join(argv if argv is not None else sys.argv[1:])
        image = os.path.relpath(png, os.path.dirname(os.path.abspath(args.update_doc)))
        update_marked_section(args.update_doc, "retention",
                              f"```bash\n{command}\n```\n\n{table}\n{footer}\n\n![accuracy per hop]({image})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
