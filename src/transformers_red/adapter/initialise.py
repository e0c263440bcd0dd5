"""Step 2 of the pipeline: initialise the projections and student norm gains.

RED (docs/method.md section 4): every projection starts as the 0/1 channel-selection matrix H (d_T, d_S) with
H[G_k, k] = 1, whose singular values are all exactly 1. LRC's random Gaussian and a random orthonormal
matrix are the controls.
"""

from __future__ import annotations

import torch


def selection_matrix(channels: torch.Tensor, teacher_hidden_size: int, *, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """The unscaled selection matrix H.

    Args:
        channels: (d_S,) distinct channel indices in [0, d_T).
    Returns:
        (d_T, d_S) with H[channels[k], k] = 1 and zeros elsewhere (H^T H = I).
    """
    channels = torch.as_tensor(channels, dtype=torch.long)
    if channels.unique().numel() != channels.numel() or channels.min() < 0 or channels.max() >= teacher_hidden_size:
        raise ValueError(f"channels must be distinct indices in [0, {teacher_hidden_size}).")
    matrix = torch.zeros(teacher_hidden_size, channels.numel(), dtype=dtype, device=device)
    matrix[channels.to(matrix.device), torch.arange(channels.numel(), device=matrix.device)] = 1
    return matrix


def random_projection(teacher_hidden_size: int, hidden_size: int, *, std: float, generator: torch.Generator,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """LRC's init: (d_T, d_S) with i.i.d. N(0, std^2) entries."""
    return (torch.randn(teacher_hidden_size, hidden_size, generator=generator, dtype=torch.float64) * std).to(dtype)


def orthogonal_projection(teacher_hidden_size: int, hidden_size: int, *, generator: torch.Generator,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(d_T, d_S) random matrix with orthonormal columns (Haar-distributed: QR with sign correction)."""
    gaussian = torch.randn(teacher_hidden_size, hidden_size, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


def initial_projection(init: str, teacher_hidden_size: int, hidden_size: int, *, channels: torch.Tensor | None,
                       std: float, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """One projection (d_T, d_S) for `init` in {"activation", "random", "orthogonal"}."""
    if init == "activation":
        if channels is None:
            raise ValueError("init='activation' needs selected channels: pass calibration data.")
        return selection_matrix(channels, teacher_hidden_size, dtype=dtype)
    if init == "random":
        return random_projection(teacher_hidden_size, hidden_size, std=std, generator=generator, dtype=dtype)
    if init == "orthogonal":
        return orthogonal_projection(teacher_hidden_size, hidden_size, generator=generator, dtype=dtype)
    raise ValueError(f"Unknown init {init!r}.")


def initial_norm_gain(teacher_gain: torch.Tensor, norm_init: str, channels: torch.Tensor | None,
                      hidden_size: int, norm_offset: float = 0.0) -> torch.Tensor:
    """Student RMSNorm gain (d_S,): the teacher's stored gain (d_T,) on the selected channels, or the gain whose
    multiplier is 1 (LRC's ones; a norm applied as `(norm_offset + weight)` stores 1 - norm_offset)."""
    if norm_init == "ones":
        return torch.full((hidden_size,), 1.0 - norm_offset, dtype=teacher_gain.dtype)
    if channels is None:
        raise ValueError("norm_init='teacher' needs selected channels: pass calibration data, or use "
                         "norm_init='ones'.")
    return teacher_gain.detach().cpu()[torch.as_tensor(channels, dtype=torch.long)].clone()
