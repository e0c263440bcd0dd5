"""Calibration: RED's channel score, padding invariance, input kinds, deterministic selection."""

import datasets
import torch
from testing_utils import make_teacher

from transformers_red import collect_activation_stats, select_channels


def stats(model, data, tokenizer=None, **kwargs):
    kwargs.setdefault("num_samples", None)
    return collect_activation_stats(model, data, tokenizer, show_progress_bar=False, **kwargs)


def test_score_matches_hand_computation_from_output_hidden_states(tokenizer, texts):
    model = make_teacher("qwen3", False, {})
    enc = tokenizer(texts[:3], return_tensors="pt", padding=True, truncation=True, max_length=64)
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states
    mask = enc["attention_mask"].to(torch.float64)
    per_layer = []
    for h in hidden:  # per layer: mean |h| over valid tokens per sequence, then L2 over sequences
        seq_means = [(h[n].abs().double() * mask[n, :, None]).sum(0) / mask[n].sum() for n in range(3)]
        per_layer.append(torch.stack(seq_means).pow(2).sum(0).sqrt())
    expected = torch.stack(per_layer).mean(0)
    got = stats(model, texts[:3], tokenizer, max_length=64)
    assert got.per_layer.shape == (3, 64)  # (L + 1, d_T): memory independent of token count
    assert got.num_sequences == 3 and got.num_tokens == int(mask.sum())
    torch.testing.assert_close(got.scores, expected, rtol=1e-6, atol=1e-9)


def test_scores_do_not_depend_on_padding(tokenizer, texts):
    model = make_teacher("llama", True, {})
    together = stats(model, texts[:4], tokenizer, batch_size=4, max_length=96).scores
    one_by_one = stats(model, texts[:4], tokenizer, batch_size=1, max_length=96).scores
    # Left padding and extra padding columns, as tokenised batches.
    enc = [tokenizer(t, truncation=True, max_length=96)["input_ids"] for t in texts[:4]]
    width = max(map(len, enc)) + 7
    ids = torch.full((4, width), 0)
    mask = torch.zeros(4, width, dtype=torch.long)
    for i, seq in enumerate(enc):
        ids[i, width - len(seq):] = torch.tensor(seq)
        mask[i, width - len(seq):] = 1
    left_padded = stats(model, [{"input_ids": ids, "attention_mask": mask}]).scores
    torch.testing.assert_close(one_by_one, together, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(left_padded, together, rtol=1e-5, atol=1e-7)


def test_input_kinds_agree(tokenizer, texts):
    model = make_teacher("mistral", False, {})
    from_list = stats(model, texts[:3], tokenizer, max_length=64).scores
    from_dataset = stats(model, datasets.Dataset.from_dict({"text": texts[:3]}), tokenizer, max_length=64).scores
    enc = tokenizer(texts[:3], return_tensors="pt", padding=True, truncation=True, max_length=64)
    from_batches = stats(model, [dict(enc)]).scores
    assert torch.equal(from_list, from_dataset)
    torch.testing.assert_close(from_batches, from_list, rtol=1e-6, atol=1e-9)


def test_num_samples_and_seed_select_texts(tokenizer, texts):
    model = make_teacher("llama", True, {})
    first_two = stats(model, texts, tokenizer, num_samples=2, max_length=64)
    assert first_two.num_sequences == 2
    assert torch.equal(first_two.scores, stats(model, texts[:2], tokenizer, max_length=64).scores)
    drawn_a = stats(model, texts, tokenizer, num_samples=2, seed=3, max_length=64).scores
    drawn_b = stats(model, texts, tokenizer, num_samples=2, seed=3, max_length=64).scores
    assert torch.equal(drawn_a, drawn_b)


def test_select_channels_top_k_sorted_with_deterministic_ties():
    scores = torch.tensor([0.5, 3.0, 1.0, 3.0, 0.1, 1.0])
    assert select_channels(scores, 2).tolist() == [1, 3]
    assert select_channels(scores, 3).tolist() == [1, 2, 3]  # tie 2 vs 5 goes to the lower index
    assert select_channels(torch.ones(8), 3).tolist() == [0, 1, 2]
    out = select_channels(torch.randn(100, generator=torch.Generator().manual_seed(0)), 40)
    assert out.dtype == torch.long and torch.equal(out, out.sort().values) and out.unique().numel() == 40
