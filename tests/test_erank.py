"""Effective rank as docs/method.md section 3 defines it: centre columns, unit rows, normalised spectrum,
exp(entropy)."""

import math

import pytest
import torch
from testing_utils import make_teacher

from transformers_red import RedAdapterConfig, effective_rank, get_red_model, layerwise_effective_rank
from transformers_red.evaluation.erank import spectrum_effective_rank


def test_hand_computed_case():
    # Centred already; rows unit after normalising; X^T X = diag(4, 2) -> p = (2/3, 1/3).
    x = torch.tensor([[3.0, 0], [-3, 0], [1, 0], [-1, 0], [0, 2], [0, -2]])
    expected = math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))  # 3 / 2^(2/3) = 1.8899
    assert effective_rank(x) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(1.889881574, abs=1e-9)


def test_identical_and_rank_one_rows_give_one():
    v = torch.randn(16, generator=torch.Generator().manual_seed(0))
    assert effective_rank(v.repeat(10, 1)) == 1.0
    scales = torch.linspace(-2, 3, 10)[:, None]
    assert effective_rank(scales * v) == pytest.approx(1.0, abs=1e-9)


def test_orthonormal_rows_approach_min_n_d():
    q, _ = torch.linalg.qr(torch.randn(256, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    rows = q.T  # 48 orthonormal rows in 256 dims
    value = effective_rank(rows)
    assert 0.95 * 48 < value <= 48


def test_mask_and_batch_shapes():
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    garbage = x.clone()
    garbage[mask == 0] = 1e6
    assert effective_rank(garbage, mask) == pytest.approx(effective_rank(x[mask.bool()]), abs=1e-12)
    assert effective_rank(x) == pytest.approx(effective_rank(x.reshape(10, 8)), abs=1e-12)
    with pytest.raises(ValueError, match="at least one"):
        effective_rank(x, torch.zeros(2, 5))


def test_spectrum_effective_rank_limits():
    assert spectrum_effective_rank(torch.ones(7)) == pytest.approx(7)
    assert spectrum_effective_rank(torch.tensor([1.0, 0, 0])) == pytest.approx(1)
    assert spectrum_effective_rank(torch.tensor([4.0, 2.0]), squared=False) == pytest.approx(1.8898815748)


def test_layerwise_student_and_teacher(tokenizer, texts):
    teacher = make_teacher("llama", False, {})
    expected_teacher = layerwise_effective_rank(teacher, texts[:4], tokenizer, max_length=64)
    assert len(expected_teacher) == teacher.config.num_hidden_layers + 1
    red = get_red_model(teacher, RedAdapterConfig(width_ratio=0.5), texts, tokenizer, show_progress_bar=False)
    with red.disable_adapter():
        assert layerwise_effective_rank(red, texts[:4], tokenizer, max_length=64) == expected_teacher
    student = layerwise_effective_rank(red, texts[:4], tokenizer, max_length=64)
    assert len(student) == len(expected_teacher)
    assert all(1 <= s <= 32 for s in student)  # bounded by the student width
