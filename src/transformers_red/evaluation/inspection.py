"""`transformers-red inspect`: what a compression would do to a teacher, before any training.

For one teacher it builds the step-0 students of each init in turn (wrapping and unwrapping the same
teacher object, so only one copy is in memory), and reports shapes, parameter counts, the selected channels,
per-layer eRank, perplexity and projection spectra.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

import torch

from ..adapter.calibrate import collect_activation_stats, select_channels
from ..adapter.config import RedAdapterConfig
from ..adapter.model import get_red_model
from .erank import layerwise_effective_rank, projection_spectra
from .footprint import kv_cache_bytes_per_token
from .perplexity import perplexity


def _shape(config: Any) -> dict[str, Any]:
    return {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size,
            "tie_word_embeddings": config.tie_word_embeddings}


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _footprint(model: torch.nn.Module) -> dict[str, int]:
    """Parameters, weight bytes (tied weights once) and KV cache bytes per token of a loaded model."""
    return {"parameters": _num_params(model),
            "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "kv_cache_bytes_per_token": kv_cache_bytes_per_token(model.config, model.dtype)}


def _spectrum_summary(red: Any) -> dict[str, float]:
    spectra = projection_spectra(red).values()
    return {"min_singular_value": min(s["min"] for s in spectra), "max_singular_value": max(s["max"] for s in spectra),
            "mean_erank": statistics.fmean(s["erank"] for s in spectra), "count": len(spectra)}


def build_report(teacher: torch.nn.Module, tokenizer: Any, config: RedAdapterConfig, calibration_texts: list[str],
                 eval_texts: list[str], inits: tuple[str, ...] = ("activation", "random"), *,
                 max_length: int = 256, show_progress_bar: bool = True) -> dict[str, Any]:
    """Measure the teacher and the step-0 student of each init in `inits`; returns a JSON-able dict."""
    d_s = config.resolved_for(teacher).student_hidden_size
    measure = {"max_length": max_length}
    report: dict[str, Any] = {
        "teacher": {"class": type(teacher).__name__, **_shape(teacher.config), **_footprint(teacher),
                    "perplexity": perplexity(teacher, eval_texts, tokenizer, **measure),
                    "erank": layerwise_effective_rank(teacher, eval_texts, tokenizer, **measure)},
        "students": {},
    }
    stats = collect_activation_stats(teacher, calibration_texts, tokenizer, num_samples=config.calibration_num_samples,
                                     max_length=config.calibration_max_length,
                                     batch_size=config.calibration_batch_size, show_progress_bar=show_progress_bar)
    channels = select_channels(stats.scores, d_s)
    kept = float(stats.scores[channels].sum() / stats.scores.sum())
    report["channels"] = {"count": d_s, "first": channels[:12].tolist(), "score_mass_kept": kept,
                          "calibration_texts": stats.num_sequences, "calibration_tokens": stats.num_tokens}
    for init in inits:
        cfg = dataclasses.replace(config, init=init, norm_init=None,
                                  channel_indices=channels.tolist() if init == "activation" else None)
        red = get_red_model(teacher, cfg, show_progress_bar=False)
        try:
            merged = red.merge_and_unload()
            report["students"][init] = {
                **_shape(merged.config), **_footprint(merged),
                "trainable_parameters": red.get_nb_trainable_parameters()[0],
                "perplexity": perplexity(red, eval_texts, tokenizer, **measure),
                "erank": layerwise_effective_rank(red, eval_texts, tokenizer, **measure),
                "projections": _spectrum_summary(red)}
            del merged
        finally:
            red.unload()
    return report


def format_report(report: dict[str, Any]) -> str:
    """Human-readable tables of `build_report`'s result."""
    teacher, students = report["teacher"], report["students"]
    names = ["teacher", *students]
    columns = [teacher, *students.values()]
    lines = ["", f"Teacher: {teacher['class']}", ""]
    width = max(14, *(len(n) for n in names))
    row = lambda label, values: f"{label:<22}" + "".join(f"{v:>{width}}" for v in values)  # noqa: E731
    lines.append(row("", names))
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "vocab_size", "tie_word_embeddings"):
        lines.append(row(key, [str(c[key]) for c in columns]))
    lines.append(row("parameters", [f"{c['parameters']:,}" for c in columns]))
    lines.append(row("weights (MB)", [f"{c['weight_bytes'] / 1e6:.2f}" for c in columns]))
    lines.append(row("KV cache/token (B)", [f"{c['kv_cache_bytes_per_token']:,}" for c in columns]))
    lines.append(row("trainable parameters", ["-"] + [f"{s['trainable_parameters']:,}" for s in students.values()]))
    lines.append(row("perplexity (step 0)", [f"{c['perplexity']:.2f}" for c in columns]))
    erank = [c["erank"] for c in columns]
    lines.append(row("mean eRank", [f"{statistics.fmean(e):.2f}" for e in erank]))
    lines.append(row("min eRank", [f"{min(e):.2f}" for e in erank]))
    ch = report["channels"]
    lines += ["", "KV cache per token = 2 x layers x KV heads x head_dim x bytes: RED narrows only the residual "
              "stream, so it is the teacher's.",
              f"Selected channels: {ch['count']} of {teacher['hidden_size']} (first {ch['first']}), "
              f"{100 * ch['score_mass_kept']:.1f}% of the RED score mass, from {ch['calibration_texts']} texts / "
              f"{ch['calibration_tokens']} tokens.", "", "Per-layer eRank (0 = embedding output):",
              row("layer", names)]
    for layer in range(len(erank[0])):
        lines.append(row(str(layer), [f"{e[layer]:.2f}" for e in erank]))
    lines += ["", "Projection spectra at init (singular values over all projections):"]
    for init, s in students.items():
        p = s["projections"]
        lines.append(f"  {init:<12} {p['count']} projections, singular values {p['min_singular_value']:.3f} .. "
                     f"{p['max_singular_value']:.3f}, mean eRank {p['mean_erank']:.1f} (max {s['hidden_size']})")
    return "\n".join(lines) + "\n"
