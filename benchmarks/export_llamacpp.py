"""The merged student through llama.cpp, against its teacher: GGUF size, prompt and generation tokens/s, and
whether llama.cpp's next-token logits equal transformers' (docs/export.md).

    python benchmarks/export_llamacpp.py --llama_cpp ~/llama.cpp --teacher teacher_dir --student student_dir

Needs a llama.cpp checkout with its tools built (`cmake -B build && cmake --build build --config Release`) and the
`gguf` package its converter imports (`pip install -r ~/llama.cpp/requirements/requirements-convert_hf_to_gguf.txt`).
Both folders are converted with llama.cpp's own `convert_hf_to_gguf.py` (nothing of transformers_red is needed to
read the student: it is a plain model of the teacher's class), then `llama-bench` runs both GGUF files in one
process, interleaved by llama-bench itself, with the same threads, prompt and generation lengths. Optional:
`--logits` compares the last-position logits of llama.cpp (the `llama-cpp-python` package) and transformers on one
text; `--transformers_speed` adds transformers' greedy generation tokens/s measured here
(`transformers_red.evaluation.footprint.measure_generation_speed`). Not run in CI (it needs llama.cpp).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

LOGITS_TEXT = "The quick brown fox jumps over the lazy dog. In Python, a list comprehension"


def find_tool(llama_cpp: pathlib.Path, name: str) -> pathlib.Path:
    """A llama.cpp binary in the usual build folders of the checkout, or on PATH."""
    for folder in ("build/bin", "build/bin/Release", "build", "."):
        path = llama_cpp / folder / name
        if path.is_file() and os.access(path, os.X_OK):
            return path
    found = shutil.which(name)
    if found:
        return pathlib.Path(found)
    raise SystemExit(f"error: no {name} under {llama_cpp}/build/bin or on PATH: build llama.cpp first "
                     "(cmake -B build && cmake --build build --config Release).")


def convert(llama_cpp: pathlib.Path, folder: pathlib.Path, out: pathlib.Path, outtype: str) -> pathlib.Path:
    """`convert_hf_to_gguf.py FOLDER --outfile OUT --outtype OUTTYPE` with this Python."""
    converter = llama_cpp / "convert_hf_to_gguf.py"
    if not converter.is_file():
        raise SystemExit(f"error: {converter} does not exist: --llama_cpp must be a llama.cpp checkout.")
    subprocess.run([sys.executable, str(converter), str(folder), "--outfile", str(out), "--outtype", outtype],
                   check=True)
    return out


def bench(llama_bench: pathlib.Path, models: list[pathlib.Path], threads: int, prompt: int, gen: int,
          repetitions: int) -> list[dict]:
    """llama-bench's JSON records (one per model and test) for `models`."""
    command = [str(llama_bench), *(a for m in models for a in ("-m", str(m))), "-t", str(threads), "-p", str(prompt),
               "-n", str(gen), "-r", str(repetitions), "-o", "json"]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def speeds(records: list[dict], model: pathlib.Path) -> dict[str, float]:
    """{"prompt": tokens/s of the prompt test, "generation": tokens/s of the generation test} of one model."""
    mine = [r for r in records if pathlib.Path(r["model_filename"]).name == model.name]
    prompt = next(r for r in mine if r["n_prompt"] > 0 and r["n_gen"] == 0)
    gen = next(r for r in mine if r["n_gen"] > 0 and r["n_prompt"] == 0)
    return {"prompt": prompt["avg_ts"], "generation": gen["avg_ts"]}


def logits_spread_error(folder: pathlib.Path, gguf: pathlib.Path, text: str = LOGITS_TEXT) -> float:
    """max |llama.cpp - transformers| / (max - min of transformers' logits), at the last position of `text`
    (the same token ids in both, from the folder's tokenizer)."""
    import numpy as np
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(text).input_ids
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0, -1].double().numpy()
    llm = Llama(model_path=str(gguf), n_ctx=max(64, 2 * len(ids)), logits_all=False, verbose=False)
    llm.eval(ids)
    ours = np.asarray(llm.scores[len(ids) - 1], dtype=np.float64)
    return float(np.abs(ours - reference).max() / (reference.max() - reference.min()))


def table(rows: dict[str, dict]) -> str:
    """Markdown: GGUF size and tokens/s per model, the student's as a ratio of the teacher's too."""
    teacher = rows["teacher"]
    lines = ["| model | GGUF (MB) | prompt tokens/s | generation tokens/s |", "|---|---:|---:|---:|"]
    for name, row in rows.items():
        cells = [f"{row['gguf_bytes'] / 1e6:.0f}"]
        for key in ("prompt", "generation"):
            ratio = f" ({row[key] / teacher[key]:.2f}x)" if name != "teacher" else ""
            cells.append(f"{row[key]:.1f}{ratio}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama_cpp", required=True, type=pathlib.Path, help="llama.cpp checkout (with a build).")
    p.add_argument("--teacher", required=True, type=pathlib.Path, help="The teacher's folder (safetensors).")
    p.add_argument("--student", required=True, type=pathlib.Path, help="The merged student's folder.")
    p.add_argument("--outtype", default="f32", help="GGUF type for both (f32, f16, bf16, q8_0; default f32).")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt_tokens", type=int, default=512)
    p.add_argument("--gen_tokens", type=int, default=128)
    p.add_argument("--repetitions", type=int, default=5)
    p.add_argument("--gguf_dir", type=pathlib.Path, default=None, help="Keep the GGUF files here (default: temp).")
    p.add_argument("--logits", action="store_true", help="Compare llama.cpp's logits with transformers' "
                                                         "(pip install llama-cpp-python).")
    p.add_argument("--transformers_speed", action="store_true",
                   help="Also measure transformers' greedy generation tokens/s of both, here.")
    p.add_argument("--json", type=pathlib.Path, default=None, help="Also write the results as JSON here.")
    return p


def main(argv: list[str] | None = None) -> dict:
    from transformers_red.commands.flags import normalise_flags

    args = build_parser().parse_args(normalise_flags(argv))
    for name in ("teacher", "student"):
        if not (getattr(args, name) / "config.json").is_file():
            raise SystemExit(f"error: --{name} {getattr(args, name)} has no config.json.")
    llama_bench = find_tool(args.llama_cpp, "llama-bench")  # before the conversions: fail fast
    with tempfile.TemporaryDirectory(prefix="red-gguf-") as tmp:
        out = args.gguf_dir or pathlib.Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        ggufs = {name: convert(args.llama_cpp, getattr(args, name), out / f"{name}-{args.outtype}.gguf", args.outtype)
                 for name in ("teacher", "student")}
        records = bench(llama_bench, list(ggufs.values()), args.threads, args.prompt_tokens, args.gen_tokens,
                        args.repetitions)
        rows = {name: {"gguf_bytes": path.stat().st_size, **speeds(records, path)} for name, path in ggufs.items()}
        if args.logits:
            for name, path in ggufs.items():
                rows[name]["logits_spread_error"] = logits_spread_error(getattr(args, name), path)
    result = {"outtype": args.outtype, "threads": args.threads, "prompt_tokens": args.prompt_tokens,
              "gen_tokens": args.gen_tokens, "llama_bench": records, "rows": rows}
    print(table(rows))
    print(f"({args.outtype}, {args.threads} threads, pp{args.prompt_tokens} / tg{args.gen_tokens}, llama-bench "
          f"average of {args.repetitions})")
    if args.logits:
        print("next-token logits, max |llama.cpp - transformers| / spread: " +
              ", ".join(f"{n} {r['logits_spread_error']:.1e}" for n, r in rows.items()))
    if args.transformers_speed:
        from transformers_red.evaluation.footprint import measure_generation_speed
        from transformers_red.loading import load_model

        result["transformers"] = measure_generation_speed(load_model(args.student, tokenizer=False)[0],
                                                          load_model(args.teacher, tokenizer=False)[0])
        rate = result["transformers"]["tokens_per_second"]
        print(f"transformers generate (greedy): teacher {rate['teacher']} tokens/s, student {rate['student']} "
              f"tokens/s ({result['transformers']['speedup']:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
