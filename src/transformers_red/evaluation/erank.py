"""Step 5 of the pipeline (part): effective rank, RED's diagnostic of reasoning collapse.

eRank of a token x width matrix X (docs/method.md section 3): centre each column, scale each row to unit L2 norm,
take the eigenvalues of the covariance (the squared singular values), normalise them to sum to 1, and return
exp(Shannon entropy). All in float64.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..adapter.calibrate import materialise_batches, plain_model, record_hidden_states
from ..data import position_ids_from_mask
from ..loading import load_model, read_paragraphs


def spectrum_effective_rank(values: torch.Tensor, squared: bool = True) -> float:
    """exp(entropy) of a spectrum normalised to sum 1.

    Args:
        values: (k,) non-negative singular values (`squared=True`: they are squared first, i.e. covariance
            eigenvalues, as for activations) or eigenvalues (`squared=False`).
    """
    energy = values.to(torch.float64).clamp_min(0)
    energy = energy ** 2 if squared else energy
    total = energy.sum()
    if total <= 0:
        return 1.0  # every token identical (after centring): one indistinguishable point
    p = energy / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def effective_rank(hidden_states: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """eRank of activations.

    Args:
        hidden_states: (N, d) or (B, T, d) activations.
        mask: optional (N,) or (B, T) 0/1; rows with 0 (padding) are dropped first.
    """
    x = hidden_states.detach().to(torch.float64)
    x = x.reshape(-1, x.shape[-1])
    if mask is not None:
        x = x[mask.reshape(-1).to(torch.bool).to(x.device)]
    if x.shape[0] == 0:
        raise ValueError("effective_rank needs at least one (non-padding) row.")
    x = x - x.mean(0, keepdim=True)
    norms = x.norm(dim=1, keepdim=True)
    x = torch.where(norms > 1e-12 * norms.max().clamp_min(1e-300), x / norms.clamp_min(1e-300), 0.0)
    return spectrum_effective_rank(torch.linalg.svdvals(x))


@torch.no_grad()
def layerwise_effective_rank(model: torch.nn.Module, data: Any, tokenizer: Any = None, *, max_tokens: int = 4096,
                             max_length: int = 512, batch_size: int = 4, num_samples: int | None = None,
                             show_progress_bar: bool = False) -> list[float]:
    """Per-layer eRank of `model`'s hidden states (embedding output and every layer, L + 1 values).

    Valid tokens of all sequences are pooled per layer (padding dropped, at most `max_tokens`). A `RedModel`
    is measured as the student; wrap the call in `red_model.disable_adapter()` to measure the teacher.
    """
    hf_model = plain_model(model)
    device = next(hf_model.parameters()).device
    batches = materialise_batches(data, tokenizer, batch_size=batch_size, max_length=max_length,
                                  num_samples=num_samples, seed=None, device=device, what="eRank text")
    pooled: list[list[torch.Tensor]] | None = None
    seen = 0
    sink: list[torch.Tensor | None] = []
    with record_hidden_states(hf_model, sink):
        for batch in tqdm(batches, desc="eRank", disable=not show_progress_bar):
            mask = batch["attention_mask"].to(torch.bool)
            # through `model` itself, not its decoder: an FSDP2 root gathers its parameters in its own forward;
            # one position of logits keeps the head's cost negligible
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  position_ids=position_ids_from_mask(batch["attention_mask"]), use_cache=False, logits_to_keep=1)
            pooled = pooled or [[] for _ in sink]
            for rows, h in zip(pooled, sink):
                rows.append(h[mask].to(torch.float32).cpu())
            seen += int(mask.sum())
            if seen >= max_tokens:
                break
    return [effective_rank(torch.cat(rows)[:max_tokens]) for rows in pooled]


@torch.no_grad()
def projection_spectra(red_model: Any) -> dict[str, dict[str, Any]]:
    """Singular values and eRank of every distinct projection of a `RedModel`.

    Returns:
        store key -> {"singular_values": list (d_S,), "max": float, "min": float, "condition": float,
        "erank": float}. eRank uses the squared singular values, as for activations; a selection matrix
        has eRank exactly d_S.
    """
    spectra = {}
    for key, proj in red_model.red_projections.items():
        s = torch.linalg.svdvals(proj.detach().to(torch.float64).cpu())
        spectra[key] = {"singular_values": s.tolist(), "max": float(s.max()), "min": float(s.min()),
                        "condition": float(s.max() / s.min()) if s.min() > 0 else float("inf"),
                        "erank": spectrum_effective_rank(s)}
    return spectra


# --------------------------------------------------------------------------------------------- comparing models
def load_texts(source: str, n: int | None = None) -> list[str]:
    """Texts for eRank: 'builtin' (pydoc paragraphs), 'reasoning' (reasoning-gym GSM-style worked problems),
    or a UTF-8 text file whose paragraphs are separated by blank lines."""
    from ..resources.texts import builtin_texts, reasoning_texts

    if source == "builtin":
        texts = builtin_texts()
    elif source == "reasoning":
        texts = reasoning_texts(n or 64)
    else:
        if not pathlib.Path(source).is_file():
            raise FileNotFoundError(f"Text source {source!r} is neither a file nor 'builtin' / 'reasoning'.")
        texts = read_paragraphs(source)
    return texts[:n] if n is not None else texts


def compare_erank(models: Sequence[Any], texts: Sequence[str], labels: Sequence[str] | None = None, *,
                  max_length: int = 512, max_tokens: int = 4096, batch_size: int = 4,
                  dtype: Any = None, device: str | None = None) -> dict[str, list[float]]:
    """label -> per-layer eRank (embedding output, then every layer) of each model on the same texts.

    `models` items are names / folders (loaded one at a time with :func:`transformers_red.loading.load_model`, then
    released) or (model, tokenizer) pairs.
    """
    labels = list(labels) if labels else [_label(m, i) for i, m in enumerate(models)]
    if len(labels) != len(models):
        raise ValueError(f"{len(labels)} labels for {len(models)} models.")
    if len(set(labels)) != len(labels):
        raise ValueError(f"Labels must be distinct, got {labels}.")
    out = {}
    for label, item in zip(labels, models):
        model, tokenizer = item if isinstance(item, tuple) else load_model(item, dtype=dtype)
        if device is not None:
            model = model.to(device)
        out[label] = layerwise_effective_rank(model, list(texts), tokenizer, max_length=max_length,
                                              max_tokens=max_tokens, batch_size=batch_size)
        del model
    return out


def _label(item: Any, index: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        name = os.fspath(item).rstrip("/\\")
        return os.path.basename(name) or name
    return f"model{index}"


def format_erank_table(eranks: dict[str, list[float]]) -> str:
    """Layer x model table of eRank values ('emb' = embedding output, then layers 1..L), with the means."""
    labels = list(eranks)
    depth = max(len(v) for v in eranks.values())
    header = ["layer", *labels]
    rows = [["emb" if i == 0 else str(i), *(f"{eranks[m][i]:.2f}" if i < len(eranks[m]) else "" for m in labels)]
            for i in range(depth)]
    rows.append(["mean", *(f"{sum(v) / len(v):.2f}" for v in eranks.values())])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def plot_erank(eranks: dict[str, list[float]], path: str | os.PathLike, title: str | None = None) -> pathlib.Path:
    """Line plot of per-layer eRank, one line per model, saved as an image (PNG by suffix). Needs matplotlib."""
    from ..plots import new_figure, save_figure

    fig = new_figure(figsize=(7, 4), dpi=120)
    from matplotlib.ticker import MaxNLocator

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ax = fig.add_subplot()
    for label, values in eranks.items():
        ax.plot(range(len(values)), values, marker="o", markersize=3, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (0 = embedding output)")
    ax.set_ylabel("effective rank")
    ax.set_title(title or "Per-layer effective rank of hidden states")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return save_figure(fig, path)
