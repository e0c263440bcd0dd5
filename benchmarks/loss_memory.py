"""Peak memory and time of one logit-loss forward + backward, for the logit paths of `RedDistillationTrainer`:

- `logits, chunk 1024`: `fused_logit_loss` on (B, T, V) logits, the default until 2026-12-08;
- `hidden_states, chunk 1024`: `hidden_state_logit_loss` at the old fixed chunk;
- `hidden_states, auto chunk`: the default now (`RedConfig(logit_loss_from="auto", loss_chunk_size=None)`): the
  chunk from `auto_loss_chunk_size(B x T, d_S, V)`.

At Qwen2.5's 152k vocabulary and a tiny width (d_S 64, as the tiny-width Qwen-vocabulary model of
`step_overhead.py`), every token trained. Each configuration runs in a fresh process: its peak resident set size
(`ru_maxrss`) minus the process's size after building the inputs is the loss's extra peak, reported against one
(B, T, V) float32 tensor; the fastest of the next `--repeats` forward + backward passes in that process is its time
(the first pass pays the page faults).
Configurations whose estimated peak exceeds `--max_gb` are not run (the logits path at 8 x 2048 needs ~45 GB).

    python benchmarks/loss_memory.py                          # B x T = 4 x 512 and 8 x 2048, V 152064, d_S 64
    python benchmarks/loss_memory.py --shapes 2x8 --vocab 300 --width 8 --max_gb 1   # the CI smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CONFIGS = {"logits-1024": ("logits", 1024), "hidden-1024": ("hidden_states", 1024), "hidden-auto": ("hidden_states",
                                                                                                       None)}
LABELS = {"logits-1024": "logits, chunk 1024 (old default)", "hidden-1024": "hidden_states, chunk 1024",
          "hidden-auto": "hidden_states, auto chunk (default)"}


def estimated_gb(config: str, tokens: int, vocab: int, chunk: int) -> float:
    """What the configuration should peak at: three (B, T, V) tensors plus scratch, or six (chunk, V)."""
    path, _ = CONFIGS[config]
    return (3 * tokens + 3 * chunk if path == "logits" else 6 * chunk) * vocab * 4 / 1e9


def measure(config: str, batch: int, length: int, vocab: int, width: int, repeats: int = 2) -> dict:
    import torch

    from transformers_red.training.losses import auto_loss_chunk_size, fused_logit_loss, hidden_state_logit_loss

    path, chunk = CONFIGS[config]
    chunk = chunk or auto_loss_chunk_size(batch * length, width, vocab)
    torch.manual_seed(0)
    h_s = torch.randn(batch, length, width, requires_grad=True)
    w_s = torch.randn(vocab, width, requires_grad=True)
    h_t, w_t = torch.randn(batch, length, width), torch.randn(vocab, width)
    labels = torch.randint(0, vocab, (batch, length))

    def step() -> None:
        if path == "logits":  # the models' logits are part of what this path holds
            total, _ = fused_logit_loss(h_s @ w_s.T, h_t @ w_t.T, labels, chunk_size=chunk)
        else:
            total, _ = hidden_state_logit_loss(h_s, w_s, h_t, w_t, labels, chunk_size=chunk)
        total.backward()
        h_s.grad = w_s.grad = None

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    seconds = min(seconds)
    return {"config": config, "tokens": batch * length, "chunk": chunk, "extra_peak_mb": (peak - base) / 1024,
            "logits_mb": batch * length * vocab * 4 / 2**20, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["4x512", "8x2048"], help="B x T, e.g. 4x512")
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--width", type=int, default=64, help="d_S (the teacher's hidden states are as wide here)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--max_gb", type=float, default=16.0, help="skip configurations estimated above this")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes after the measured one (fastest kept)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--one", nargs=3, metavar=("CONFIG", "B", "T"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), int(args.one[2]), args.vocab, args.width,
                                 args.repeats)))
        return 0
    from transformers_red.training.losses import auto_loss_chunk_size

    print(f"V {args.vocab}, d_S {args.width}; extra peak RSS of one loss forward + backward, in (B, T, V) float32 "
          "tensors, and the time of a forward + backward (fastest of the repeats)\n")
    print("| loss path | B x T | chunk | one (B, T, V) float32 (MB) | extra peak (MB) | x (B, T, V) | seconds |"
          " time vs old default |\n|---|---|---|---|---|---|---|---|")
    rows = []
    for shape in args.shapes:
        batch, length = (int(x) for x in shape.lower().split("x"))
        baseline = None
        for config in args.configs:
            chunk = CONFIGS[config][1] or auto_loss_chunk_size(batch * length, args.width, args.vocab)
            logits_mb = batch * length * args.vocab * 4 / 2**20
            if estimated_gb(config, batch * length, args.vocab, min(chunk, batch * length)) > args.max_gb:
                print(f"| {LABELS[config]} | {batch} x {length} | {chunk} | {logits_mb:.0f} | not run (estimated "
                      f"{estimated_gb(config, batch * length, args.vocab, chunk):.0f} GB > --max_gb) | | | |")
                continue
            out = subprocess.run([sys.executable, __file__, "--one", config, str(batch), str(length), "--vocab",
                                  str(args.vocab), "--width", str(args.width), "--repeats", str(args.repeats)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            baseline = r["seconds"] if config == "logits-1024" else baseline
            ratio = f"{r['seconds'] / baseline:.2f}" if baseline else "-"
            print(f"| {LABELS[config]} | {batch} x {length} | {r['chunk']} | {r['logits_mb']:.0f} | "
                  f"{r['extra_peak_mb']:.0f} | {r['extra_peak_mb'] / r['logits_mb']:.3f} | {r['seconds']:.2f} | "
                  f"{ratio} |", flush=True)
            rows.append({**r, "batch": batch, "length": length})
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"vocab": args.vocab, "width": args.width, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
