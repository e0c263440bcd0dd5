"""Step 3 of the pipeline (part): the distillation losses (method.md section 2), per token.

Every term is a *sum over trained tokens*; the trainer divides by `num_items_in_batch` (the number of trained
tokens in the whole accumulated batch), so gradient accumulation gives exactly the full-batch gradient.
Logit terms run over chunks of tokens under activation checkpointing, so at most one float32 chunk of
(chunk, V) log-probabilities exists at a time, on top of the models' own logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def elementwise_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                           temperature: float) -> torch.Tensor:
    """Generalised JSD terms per position and vocabulary entry (GKD's definition).

    beta = 0: forward KL(teacher || student); beta = 1: reverse KL(student || teacher); otherwise
    beta * KL(teacher || M) + (1 - beta) * KL(student || M) with M = beta * teacher + (1 - beta) * student.
    No temperature^2 factor, as GKD and LRC's code.

    Args:
        student_logits, teacher_logits: (N, V).
    Returns:
        (N, V) float32; row sums are the per-token divergences.
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0:
        return F.kl_div(s, t, reduction="none", log_target=True)
    if beta == 1:
        return F.kl_div(t, s, reduction="none", log_target=True)
    b = torch.tensor(beta, dtype=s.dtype, device=s.device)
    mixture = torch.logsumexp(torch.stack([s + torch.log1p(-b), t + torch.log(b)]), dim=0)
    return (b * F.kl_div(mixture, t, reduction="none", log_target=True)
            + (1 - b) * F.kl_div(mixture, s, reduction="none", log_target=True))


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                     temperature: float) -> torch.Tensor:
    """(N,) per-token divergence of (N, V) logits (see `elementwise_divergence`)."""
    return elementwise_divergence(student_logits, teacher_logits, beta, temperature).sum(-1)


def _chunk_sums(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, beta: float,
                temperature: float) -> torch.Tensor:
    """[kd, ce, teacher_ce] summed over the valid rows of one chunk. student/teacher (n, V), targets (n,)."""
    valid = targets != IGNORE_INDEX
    student, teacher, targets = student[valid], teacher[valid], targets[valid]
    kd = token_divergence(student, teacher, beta, temperature).sum()
    ce = F.cross_entropy(student.float(), targets, reduction="sum")
    with torch.no_grad():
        teacher_ce = F.cross_entropy(teacher.float(), targets, reduction="sum")
    return torch.stack([kd, ce, teacher_ce])


def logit_loss_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                    beta: float = 0.0, temperature: float = 1.0, chunk_size: int = 1024) -> torch.Tensor:
    """Sums over trained tokens of the divergence, the student CE and the teacher CE (next-token).

    Args:
        student_logits, teacher_logits: (B, T, V); position t predicts labels[:, t + 1].
        labels: (B, T), IGNORE_INDEX (-100) where no loss is taken (padding, prompt).
    Returns:
        (3,) float32: [kd_sum, ce_sum, teacher_ce_sum].
    """
    vocab = student_logits.shape[-1]
    if teacher_logits.shape[-1] != vocab:
        raise ValueError(f"Student and teacher vocabularies differ ({vocab} vs {teacher_logits.shape[-1]}).")
    targets = shift_labels(labels).reshape(-1)
    student, teacher = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    total = torch.zeros(3, device=student.device)
    for start in range(0, targets.numel(), chunk_size):
        part = slice(start, start + chunk_size)
        if not (targets[part] != IGNORE_INDEX).any():
            continue
        args = (student[part], teacher[part], targets[part], beta, temperature)
        if torch.is_grad_enabled() and student.requires_grad:
            total = total + checkpoint(_chunk_sums, *args, use_reentrant=False)
        else:
            total = total + _chunk_sums(*args)
    return total


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B, T) next-token targets: targets[:, t] = labels[:, t + 1], the last one ignored."""
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def masked_mse_sum(student: torch.Tensor, teacher: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Sum over masked tokens of the per-token mean squared error.

    Args:
        student, teacher: (B, T, D).
        token_mask: (B, T) bool.
    """
    per_token = (student.float() - teacher.float()).pow(2).mean(-1)
    return (per_token * token_mask).sum()


def generalized_jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         labels: torch.Tensor | None = None, beta: float = 0.5, temperature: float = 1.0,
                         reduction: str = "batchmean", num_items_in_batch: int | torch.Tensor | None = None,
                         chunk_size: int = 1024) -> torch.Tensor:
    """GKD's `generalized_jsd_loss` (same signature and semantics), computed in chunks of tokens.

    As in GKD the logits and `labels` are aligned (no shift here): position i is compared where
    `labels[..., i] != -100`.

    Args:
        student_logits, teacher_logits: (B, T, V).
        labels: (B, T) or None.
        reduction: "batchmean" (sum / valid tokens), "sum", "mean" (over tokens x vocabulary) or "none"
            (the (N, V) element-wise divergence of the valid tokens, materialised).
        num_items_in_batch: if given, the sum divided by it (gradient-accumulation-correct).
    """
    vocab = student_logits.shape[-1]
    s, t = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
    valid = torch.ones(s.shape[0], dtype=torch.bool, device=s.device) if labels is None else (
        labels.reshape(-1) != IGNORE_INDEX)
    if reduction == "none":
        return elementwise_divergence(s[valid], t[valid], beta, temperature)
    total = s.new_zeros((), dtype=torch.float32)
    for start in range(0, s.shape[0], chunk_size):
        part = slice(start, start + chunk_size)
        rows = valid[part]
        if rows.any():
            total = total + token_divergence(s[part][rows], t[part][rows], beta, temperature).sum()
    if num_items_in_batch is not None:
        return total / torch.as_tensor(num_items_in_batch, device=total.device)
    if reduction == "batchmean":
        return total / valid.sum().clamp_min(1)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / (valid.sum() * vocab).clamp_min(1)
    raise ValueError(f"reduction must be 'batchmean', 'sum', 'mean' or 'none', got {reduction!r}.")
