"""Step 3 of the pipeline (part): the distillation losses (docs/method.md section 2), per token.

Every term is a *sum over trained tokens*; the trainer divides by `num_items_in_batch` (the number of trained
tokens in the whole accumulated batch), so gradient accumulation gives exactly the full-batch gradient.
The trainer's path is `fused_logit_loss`: one pass over each chunk of tokens computes the divergence, the
student and teacher cross entropies *and* the gradient of the weighted loss, so the backward is a rescale and
float32 work exists only for one (chunk, V) block at a time. `logit_loss_sums` is the plain autograd version
(same values, activation checkpointing per chunk), kept as the independent reference the tests compare to.
"""

from __future__ import annotations

import math

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


MIN_AUTO_CHUNK = 128  # below this the head matmuls of a chunk stop amortising the reads of the (V, d) heads
MAX_AUTO_CHUNK = 1024


def auto_loss_chunk_size(num_tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Tokens per chunk of the logit losses when `RedConfig.loss_chunk_size` is None (the default).

    About num_tokens x hidden_size / vocab_size tokens, so a (chunk, V) float32 temporary is the size of the
    (tokens, hidden) hidden states it comes from (the rule of Liger's fused linear cross-entropy): the logit
    temporaries then cost no more than the activations whatever the vocabulary. Rounded up to a power of two and
    kept within [MIN_AUTO_CHUNK, MAX_AUTO_CHUNK], the lower bound for speed, the upper one today's fixed size.
    """
    target = max(1, math.ceil(num_tokens * hidden_size / max(1, vocab_size)))
    return max(MIN_AUTO_CHUNK, min(MAX_AUTO_CHUNK, 1 << (target - 1).bit_length()))


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B, T) next-token targets: targets[:, t] = labels[:, t + 1], the last one ignored."""
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


class _MaskedSquaredErrorSum(torch.autograd.Function):
    """sum_n weight_n * ||student_n - teacher_n||^2 with one (N, D) temporary (the scaled difference), which is
    also the gradient: the autograd version of the same expression keeps three to five."""

    @staticmethod
    def forward(ctx, student, teacher, weights):
        diff = torch.sub(student.float(), teacher.float())  # float32 arithmetic, as the logit losses
        value = torch.einsum("nd,nd->n", diff, diff) @ weights
        ctx.save_for_backward(diff.mul_(2 * weights[:, None]))
        ctx.dtypes = student.dtype, teacher.dtype
        return value

    @staticmethod
    def backward(ctx, grad):
        (scaled_diff,) = ctx.saved_tensors
        grad_student = scaled_diff * grad
        grad_teacher = -grad_student.to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return grad_student.to(ctx.dtypes[0]), grad_teacher, None


def masked_mse_sum(student: torch.Tensor, teacher: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Sum over masked tokens of the per-token mean squared error; differentiable w.r.t. both inputs.

    Args:
        student, teacher: (B, T, D).
        token_mask: (B, T) bool.
    Returns:
        () float32.
    """
    dim = student.shape[-1]
    weights = token_mask.reshape(-1).to(torch.float32) / dim
    return _MaskedSquaredErrorSum.apply(student.reshape(-1, dim), teacher.reshape(-1, dim), weights)


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


# ------------------------------------------------------------------------------------ fused (training path)
class LogitLossWorkspace:
    """Reusable float32 (chunk, V) scratch buffers for `fused_logit_loss`.

    Kept by the trainer across steps: allocating (and, on CPU, page-faulting) several hundred MB of fresh
    scratch per step otherwise costs as much as the loss arithmetic itself.
    """

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []

    def get(self, rows: int, vocab: int, device: torch.device) -> list[torch.Tensor]:
        """Three (rows, vocab) float32 buffers on `device` (contents undefined)."""
        b = self._buffers
        if not b or b[0].shape[0] < rows or b[0].shape[1] != vocab or b[0].device != torch.device(device):
            self._buffers = b = [torch.empty(rows, vocab, device=device) for _ in range(3)]
        return [x[:rows] for x in b]


def _divergence_and_grad(s_l: torch.Tensor, t_l: torch.Tensor, beta: float, kd_scale: float, p_coef: float,
                         spare: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row divergence and kd_scale * d(divergence)/dz + p_coef * softmax(z), z the scaled student logits.

    Args:
        s_l, t_l: (n, V) float32 student / teacher log-probabilities at the temperature; overwritten.
        spare: (n, V) float32 scratch.
    Returns:
        rows (n,) divergences, and the (n, V) gradient term (one of the input buffers).
    """
    if beta == 0:  # KL(q || p); d/dz = p - q
        q = torch.exp(t_l, out=spare)
        rows = torch.einsum("nv,nv->n", q, t_l.sub_(s_l))
        return rows, s_l.exp_().mul_(kd_scale + p_coef).sub_(q, alpha=kd_scale)
    if beta == 1:  # KL(p || q); d/dz = p * (log p - log q - KL)
        p = torch.exp(s_l, out=spare)
        log_ratio = s_l.sub_(t_l)
        rows = torch.einsum("nv,nv->n", p, log_ratio)
        return rows, log_ratio.sub_(rows[:, None]).mul_(kd_scale).add_(p_coef).mul_(p)
    # generalised JSD with M = beta q + (1 - beta) p; d/dp = (1 - beta) log(p / M), then through the softmax
    m_l = torch.logaddexp(s_l + math.log1p(-beta), t_l + math.log(beta), out=spare)
    q_term = torch.einsum("nv,nv->n", t_l.exp(), t_l - m_l)
    log_ratio = s_l - m_l
    p = s_l.exp_()
    p_term = torch.einsum("nv,nv->n", p, log_ratio)
    rows = beta * q_term + (1 - beta) * p_term
    g = log_ratio.sub_(p_term[:, None]).mul_((1 - beta) * kd_scale).add_(p_coef).mul_(p)
    return rows, g


def _log_softmax_into(logits: torch.Tensor, temperature: float, out: torch.Tensor, scratch: torch.Tensor):
    if temperature == 1:
        return torch.log_softmax(logits, -1, dtype=torch.float32, out=out)
    return torch.log_softmax(torch.div(logits, temperature, out=scratch), -1, out=out)


def _fused_chunks(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, beta: float,
                  temperature: float, kd_weight: float, ce_weight: float, chunk_size: int,
                  workspace: LogitLossWorkspace, grad: torch.Tensor | None) -> torch.Tensor:
    """[kd, ce, teacher_ce] sums; fills `grad` (N, V) with d(kd_weight kd + ce_weight ce)/d student if given."""
    valid = targets != IGNORE_INDEX
    rows_with_loss = valid.nonzero()
    sums = torch.zeros(3, device=student.device)
    if rows_with_loss.numel() == 0:
        if grad is not None:
            grad.zero_()
        return sums
    first, last = int(rows_with_loss[0]), int(rows_with_loss[-1]) + 1
    if grad is not None:  # the chunks write rows first..last-1 (ignored ones as zeros); zero only the rest
        grad[:first].zero_()
        grad[last:].zero_()
    weights = valid.float()
    safe_targets = targets.clamp_min(0)[:, None]
    for start in range(first, last, chunk_size):
        part = slice(start, min(start + chunk_size, last))
        s, t, w, tgt = student[part], teacher[part], weights[part], safe_targets[part]
        a, b, c = workspace.get(s.shape[0], s.shape[1], s.device)
        s_l, t_l = _log_softmax_into(s, temperature, a, c), _log_softmax_into(t, temperature, b, c)
        if temperature == 1:
            ce_rows, tce_rows = -s_l.gather(1, tgt)[:, 0], -t_l.gather(1, tgt)[:, 0]
        else:
            ce_rows = torch.logsumexp(s.float(), -1) - s.gather(1, tgt)[:, 0].float()
            tce_rows = torch.logsumexp(t.float(), -1) - t.gather(1, tgt)[:, 0].float()
        # at T = 1 the CE gradient's softmax is the divergence's p: fold it in instead of recomputing it
        p_coef = ce_weight if temperature == 1 else 0.0
        rows, g = _divergence_and_grad(s_l, t_l, beta, kd_weight / temperature, p_coef, c)
        sums += torch.stack([rows @ w, ce_rows @ w, tce_rows @ w])
        if grad is None:
            continue
        if ce_weight and temperature != 1:
            g.add_(torch.softmax(s, -1, dtype=torch.float32, out=c), alpha=ce_weight)
        g.scatter_add_(1, tgt, torch.full_like(w[:, None], -ce_weight))
        grad[part].copy_(g.mul_(w[:, None]))
    return sums


class _FusedLogitLoss(torch.autograd.Function):
    """Computes the loss and its gradient in one pass over the logits; backward only rescales the gradient."""

    @staticmethod
    def forward(ctx, student, teacher, targets, options):
        grad = torch.empty_like(student)
        sums = _fused_chunks(student.detach(), teacher.detach(), targets, grad=grad, **options)
        ctx.save_for_backward(grad)
        ctx.used = False
        total = options["kd_weight"] * sums[0] + options["ce_weight"] * sums[1]
        ctx.mark_non_differentiable(sums)
        return total, sums

    @staticmethod
    def backward(ctx, grad_total, _grad_sums):
        if ctx.used:
            raise RuntimeError("fused_logit_loss supports a single backward pass (its gradient buffer is scaled "
                               "in place); recompute the loss instead of using retain_graph=True.")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_total.to(grad.dtype)), None, None, None


def fused_logit_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                     kd_weight: float = 1.0, ce_weight: float = 1.0, beta: float = 0.0, temperature: float = 1.0,
                     chunk_size: int = 1024, workspace: LogitLossWorkspace | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """`kd_weight * kd + ce_weight * ce` summed over trained tokens, with its gradient computed in the forward.

    Same values as `logit_loss_sums` (next-token, no temperature^2 factor) at a fraction of the cost: one pass
    over each chunk of logits, no recomputation in the backward, and a single extra (B, T, V) buffer (the
    gradient, in the student logits' dtype) plus three float32 (chunk, V) scratch buffers.

    Args:
        student_logits, teacher_logits: (B, T, V); position t predicts labels[:, t + 1].
        labels: (B, T), IGNORE_INDEX (-100) where no loss is taken.
        workspace: scratch buffers to reuse across calls (a new one per call if None).
    Returns:
        total: () float32, differentiable w.r.t. student_logits (one backward pass).
        sums: (3,) float32 [kd_sum, ce_sum, teacher_ce_sum], detached.
    """
    vocab = student_logits.shape[-1]
    if teacher_logits.shape[-1] != vocab:
        raise ValueError(f"Student and teacher vocabularies differ ({vocab} vs {teacher_logits.shape[-1]}).")
    options = dict(beta=beta, temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight,
                   chunk_size=chunk_size, workspace=workspace or LogitLossWorkspace())
    student, teacher = student_logits.reshape(-1, vocab), teacher_logits.detach().reshape(-1, vocab)
    targets = shift_labels(labels).reshape(-1)
    if torch.is_grad_enabled() and student.requires_grad:
        return _FusedLogitLoss.apply(student, teacher, targets, options)
    sums = _fused_chunks(student, teacher, targets, grad=None, **options)
    return kd_weight * sums[0] + ce_weight * sums[1], sums


def _capped(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if cap is None else torch.tanh(logits / cap) * cap


class _HiddenStateLogitLoss(torch.autograd.Function):
    """The logit losses from final hidden states and head weights, chunk by chunk over trained tokens: the loss
    and its gradients w.r.t. the student's hidden states and head are computed in the forward; only (chunk, V)
    logits ever exist."""

    @staticmethod
    def forward(ctx, s_hidden, s_head, t_hidden, t_head, targets, options):
        caps = options.pop("softcap"), options.pop("teacher_softcap")
        rows = (targets != IGNORE_INDEX).nonzero()[:, 0]
        chunk = options["chunk_size"]
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.zeros(s_hidden.shape, dtype=torch.float32, device=s_hidden.device) if want_grad else None
        grad_head = torch.zeros(s_head.shape, dtype=torch.float32, device=s_head.device) if want_grad else None
        sums = torch.zeros(3, device=s_hidden.device)
        for start in range(0, rows.numel(), chunk):
            idx = rows[start:start + chunk]
            h = s_hidden[idx]
            s = _capped(h @ s_head.T, caps[0])  # (n, V)
            t = _capped(t_hidden[idx] @ t_head.T, caps[1])
            g = torch.empty(s.shape, dtype=torch.float32, device=s.device) if want_grad else None
            sums += _fused_chunks(s, t, targets[idx], grad=g, **options)
            if want_grad:
                if caps[0] is not None:  # d cap*tanh(z/cap) / dz = 1 - tanh^2
                    g.mul_(1 - (s.float() / caps[0]) ** 2)
                grad_hidden[idx] = g @ s_head.float()
                grad_head.addmm_(g.T, h.float())
        ctx.save_for_backward(grad_hidden, grad_head)
        ctx.dtypes = s_hidden.dtype, s_head.dtype
        ctx.mark_non_differentiable(sums)
        return options["kd_weight"] * sums[0] + options["ce_weight"] * sums[1], sums

    @staticmethod
    def backward(ctx, grad_total, _grad_sums):
        grad_hidden, grad_head = ctx.saved_tensors
        scale = grad_total.float()
        hidden_dtype, head_dtype = ctx.dtypes
        return ((grad_hidden * scale).to(hidden_dtype) if grad_hidden is not None else None,
                (grad_head * scale).to(head_dtype) if grad_head is not None else None, None, None, None, None)


def hidden_state_logit_loss(student_hidden: torch.Tensor, student_head: torch.Tensor, teacher_hidden: torch.Tensor,
                            teacher_head: torch.Tensor, labels: torch.Tensor, *, kd_weight: float = 1.0,
                            ce_weight: float = 1.0, beta: float = 0.0, temperature: float = 1.0,
                            chunk_size: int = 1024, softcap: float | None = None,
                            teacher_softcap: float | None = None, workspace: LogitLossWorkspace | None = None,
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """`fused_logit_loss` computed from final hidden states and LM-head weights, without any (B, T, V) tensor.

    Only trained tokens (labels not -100 at t + 1) are turned into logits, `chunk_size` at a time; peak extra
    memory is a few (chunk, V) float32 temporaries plus the gradients of the hidden states and the head.

    Args:
        student_hidden: (B, T, d_S) final hidden states (after the final norm) of the student.
        student_head: (V, d_S) the student's LM-head weight (for a RED student W_T @ P, so P gets its gradient).
        teacher_hidden: (B, T, d_T); teacher_head: (V, d_T). No gradient flows to them.
        labels: (B, T); position t predicts labels[:, t + 1].
        softcap / teacher_softcap: the models' tanh logit soft cap (Gemma 2's `final_logit_softcapping`).
    Returns:
        total: () float32, differentiable w.r.t. student_hidden and student_head (one backward pass).
        sums: (3,) float32 [kd_sum, ce_sum, teacher_ce_sum], detached.
    """
    if student_head.shape[0] != teacher_head.shape[0]:
        raise ValueError("Student and teacher vocabularies differ "
                         f"({student_head.shape[0]} vs {teacher_head.shape[0]}).")
    options = dict(beta=beta, temperature=temperature, kd_weight=kd_weight, ce_weight=ce_weight,
                   chunk_size=chunk_size, workspace=workspace or LogitLossWorkspace(), softcap=softcap,
                   teacher_softcap=teacher_softcap)
    s_hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    t_hidden = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    targets = shift_labels(labels).reshape(-1)
    return _HiddenStateLogitLoss.apply(s_hidden, student_head, t_hidden, teacher_head.detach(), targets, options)
