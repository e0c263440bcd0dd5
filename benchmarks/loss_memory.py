"""Peak memory of one logit-loss forward+backward: from (B, T, V) logits (`fused_logit_loss`) against from hidden
states (`hidden_state_logit_loss`), at Qwen2.5's 152k vocabulary and a tiny width, for two sequence lengths.

Each measurement runs in a fresh process (peak resident set size, `ru_maxrss`, minus the process's size after
building the inputs), so the numbers do not leak into each other. The logits path grows with B x T x V; the
hidden-state path holds (chunk, V) temporaries only, whatever T.

    python benchmarks/loss_memory.py                    # B 2, T 256 and 1024, V 152064, d 64, chunk 256
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def measure(mode: str, batch: int, length: int, vocab: int, width: int, chunk: int) -> dict:
    import torch

    from transformers_red.training.losses import fused_logit_loss, hidden_state_logit_loss

    torch.manual_seed(0)
    h_s = torch.randn(batch, length, width, requires_grad=True)
    w_s = torch.randn(vocab, width, requires_grad=True)
    h_t, w_t = torch.randn(batch, length, width), torch.randn(vocab, width)
    labels = torch.randint(0, vocab, (batch, length))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "logits":
        total, _ = fused_logit_loss(h_s @ w_s.T, h_t @ w_t.T, labels, chunk_size=chunk)
    else:
        total, _ = hidden_state_logit_loss(h_s, w_s, h_t, w_t, labels, chunk_size=chunk)
    total.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "length": length, "extra_peak_mb": (peak - base) / 1024,
            "logits_mb": batch * length * vocab * 4 / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--one", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], args.batch, int(args.one[1]), args.vocab, args.width, args.chunk)))
        return 0
    print("| loss from | B x T | one (B, T, V) float32 tensor (MB) | extra peak RSS (MB) |\n|---|---|---|---|")
    for length in args.lengths:
        for mode in ("logits", "hidden_states"):
            out = subprocess.run([sys.executable, __file__, "--one", mode, str(length), "--batch", str(args.batch),
                                  "--vocab", str(args.vocab), "--width", str(args.width), "--chunk", str(args.chunk)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {mode} | {args.batch} x {length} | {r['logits_mb']:.0f} | {r['extra_peak_mb']:.0f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
