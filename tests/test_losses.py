"""Logit losses from hidden states (training/losses.py::hidden_state_logit_loss) against the logits-based
references: values and gradients, every divergence, temperatures, ignored labels, soft caps, bf16."""

import pytest
import torch

from transformers_red.training.losses import IGNORE_INDEX, fused_logit_loss, hidden_state_logit_loss, logit_loss_sums


def inputs(dtype=torch.float64, seed=0, b=2, t=9, d_s=6, d_t=10, v=37):
    gen = torch.Generator().manual_seed(seed)
    h_s = torch.randn(b, t, d_s, generator=gen, dtype=torch.float64)
    w_s = torch.randn(v, d_s, generator=gen, dtype=torch.float64)
    h_t = torch.randn(b, t, d_t, generator=gen, dtype=torch.float64)
    w_t = torch.randn(v, d_t, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[0, :3] = IGNORE_INDEX  # a prompt
    labels[1, -2:] = IGNORE_INDEX  # padding
    return [x.to(dtype).requires_grad_(i in (0, 1)) for i, x in enumerate((h_s, w_s, h_t, w_t))], labels


def capped(x, cap):
    return x if cap is None else torch.tanh(x / cap) * cap


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("cap", [None, 3.0])
def test_hidden_state_loss_equals_the_autograd_reference(beta, tau, cap):
    (h_s, w_s, h_t, w_t), labels = inputs()
    kd_w, ce_w = 0.7, 0.4
    # float64 autograd reference over full (B, T, V) logits
    ref = logit_loss_sums(capped(h_s @ w_s.T, cap), capped(h_t @ w_t.T, cap), labels, beta=beta, temperature=tau)
    ref_total = kd_w * ref[0] + ce_w * ref[1]
    ref_total.backward()
    ref_grads = h_s.grad.clone(), w_s.grad.clone()
    h_s.grad = w_s.grad = None
    total, sums = hidden_state_logit_loss(h_s, w_s, h_t, w_t, labels, kd_weight=kd_w, ce_weight=ce_w, beta=beta,
                                          temperature=tau, chunk_size=4, softcap=cap, teacher_softcap=cap)
    total.backward()
    torch.testing.assert_close(sums.double(), ref.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_s.grad, ref_grads[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w_s.grad, ref_grads[1], rtol=1e-5, atol=1e-6)


def test_hidden_state_loss_matches_the_fused_logits_loss_and_ignores_untrained_tokens():
    (h_s, w_s, h_t, w_t), labels = inputs(torch.float32, seed=1)
    total, sums = hidden_state_logit_loss(h_s, w_s, h_t, w_t, labels, chunk_size=3)
    f_total, f_sums = fused_logit_loss(h_s @ w_s.T, (h_t @ w_t.T).detach(), labels, chunk_size=3)
    torch.testing.assert_close(sums, f_sums, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, f_total, rtol=1e-5, atol=1e-6)
    (g_hidden,) = torch.autograd.grad(total, h_s)
    assert torch.all(g_hidden[0, :2] == 0)  # positions whose next label is ignored get no gradient
    none = torch.full_like(labels, IGNORE_INDEX)
    empty_total, empty_sums = hidden_state_logit_loss(h_s, w_s, h_t, w_t, none)
    assert float(empty_total.detach()) == 0 and torch.all(empty_sums == 0)


def test_hidden_state_loss_in_bf16():
    (h_s, w_s, h_t, w_t), labels = inputs(torch.bfloat16, seed=2)
    total, sums = hidden_state_logit_loss(h_s, w_s, h_t, w_t, labels, chunk_size=5)
    total.backward()
    ref = logit_loss_sums((h_s.float() @ w_s.float().T), (h_t.float() @ w_t.float().T), labels)
    torch.testing.assert_close(sums, ref.detach(), rtol=2e-2, atol=2e-2)
    assert h_s.grad.dtype == torch.bfloat16 and w_s.grad.dtype == torch.bfloat16
    assert torch.isfinite(h_s.grad.float()).all()


@pytest.mark.parametrize("arch", [("llama", True), ("gemma2", False), ("phi3", True)])
@pytest.mark.parametrize("train", ["projections", "weights"])
def test_trainer_steps_from_hidden_states_equal_steps_from_logits(tmp_path, tokenizer, arch, train):
    """Gemma 2 soft-caps its logits: the hidden-state path applies the same cap."""
    import datasets
    from testing_utils import make_red_trainer, make_teacher

    from transformers_red.resources import builtin_texts

    data = datasets.Dataset.from_dict({"text": builtin_texts(32)})
    states, losses = [], []
    for source in ("logits", "hidden_states"):
        trainer = make_red_trainer(tmp_path / source, data, tokenizer, make_teacher(arch[0], arch[1], {}),
                                   max_steps=3, logit_loss_from=source, train=train, loss_chunk_size=37,
                                   optim="sgd", learning_rate=0.5)  # SGD: updates are the gradients
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
        model = trainer.model if train == "weights" else trainer.red_model
        states.append({k: v.detach().clone() for k, v in (
            model.state_dict() if train == "weights" else model.adapter_state_dict()).items()})
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for key, value in states[0].items():
        torch.testing.assert_close(states[1][key], value, rtol=1e-5, atol=1e-6)  # float32 sums in another order


def test_gradient_accumulation_from_hidden_states_1x8_equals_8x1(tmp_path, tokenizer, trained_teacher):
    import datasets
    from testing_utils import make_red_trainer

    from transformers_red.resources import builtin_texts

    data = datasets.Dataset.from_dict({"text": builtin_texts(64)})
    results = []
    for batch, accumulation in ((8, 1), (1, 8)):
        trainer = make_red_trainer(tmp_path / f"{batch}x{accumulation}", data, tokenizer, trained_teacher(),
                                   max_steps=1, per_device_train_batch_size=batch,
                                   gradient_accumulation_steps=accumulation, logit_loss_from="hidden_states",
                                   optim="sgd", learning_rate=0.5, shuffle_dataset=False)
        trainer.train()
        results.append(trainer.red_model.adapter_state_dict())
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tokens, width, vocab, chunk", [
    (4 * 512, 64, 152064, 128),  # tiny width, large vocabulary: the lower bound
    (8 * 2048, 2048, 128256, 512),  # Llama-3 8B at half width: 261.6 tokens -> the next power of two
    (8 * 2048, 4096, 32000, 1024),  # more than the upper bound
    (16, 8, 300, 128),
])
def test_automatic_chunk_is_tokens_times_width_over_vocab_as_a_bounded_power_of_two(tokens, width, vocab, chunk):
    from transformers_red.training.losses import auto_loss_chunk_size

    assert auto_loss_chunk_size(tokens, width, vocab) == chunk


def _biased_head_teacher():
    from transformers_red.resources import tiny_teacher

    teacher = tiny_teacher("llama", tie_word_embeddings=False)
    with torch.no_grad():
        teacher.lm_head.bias = torch.nn.Parameter(0.1 * torch.randn(teacher.config.vocab_size))
    return teacher


def test_default_logit_path_is_hidden_states_and_logits_where_it_cannot_apply(tmp_path, tokenizer):
    """logit_loss_from='auto' (the default) takes the path without (B, T, V) tensors; an LM head with a bias (the
    hidden-state path does not add it) falls back to the logits, and asking for hidden_states there is refused
    before any step."""
    import datasets
    from testing_utils import make_red_trainer

    from transformers_red.resources import builtin_texts, tiny_teacher

    data = datasets.Dataset.from_dict({"text": builtin_texts(16)})
    plain = make_red_trainer(tmp_path / "plain", data, tokenizer, tiny_teacher("llama"), max_steps=1)
    assert plain.args.logit_loss_from == "auto" and plain.args.loss_chunk_size is None
    assert plain.logit_loss_from == "hidden_states"
    biased = make_red_trainer(tmp_path / "biased", data, tokenizer, _biased_head_teacher(), max_steps=1)
    assert biased.logit_loss_from == "logits"
    biased.train()  # the fallback trains, with the bias in its logits
    assert torch.isfinite(torch.tensor(biased.state.log_history[-1]["train_loss"]))
    with pytest.raises(ValueError, match="the LM head has a bias"):
        make_red_trainer(tmp_path / "refused", data, tokenizer, _biased_head_teacher(), max_steps=1,
                         logit_loss_from="hidden_states")


def test_default_steps_equal_the_old_default_logits_path(tmp_path, tokenizer):
    """The defaults (hidden states, automatic chunk) train the same projections as the old default (logits, chunk
    1024): SGD, 3 steps, float32 sums in another order (1e-5)."""
    import datasets
    from testing_utils import make_red_trainer, make_teacher

    from transformers_red.resources import builtin_texts

    data = datasets.Dataset.from_dict({"text": builtin_texts(32)})
    runs = []
    for name, settings in (("old", {"logit_loss_from": "logits", "loss_chunk_size": 1024}), ("new", {})):
        trainer = make_red_trainer(tmp_path / name, data, tokenizer, make_teacher("llama", True, {}), max_steps=3,
                                   optim="sgd", learning_rate=0.5, **settings)
        trainer.train()
        runs.append(([h["loss"] for h in trainer.state.log_history if "loss" in h],
                     {k: v.detach().clone() for k, v in trainer.red_model.adapter_state_dict().items()}))
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-5)
    for key, value in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_hidden_state_divergence_equals_trls_chunked_divergence(beta, tau):
    """The divergence part of the hidden-state loss against TRL's own chunked divergence (the kernel of
    `trl.DistillationTrainer`, TRL >= 1.12; CPU reference path): the same per-token generalised JSD / KL from hidden
    states and heads, summed over trained tokens, and the same gradients into the student's hidden states and head.
    RED keeps its own loss because it fuses the student and teacher cross entropies into the same pass."""
    chunked = pytest.importorskip("trl.kernels.chunked_divergence", reason="TRL < 1.12 has no chunked divergence")
    (h_s, w_s, h_t, w_t), labels = inputs(dtype=torch.float32)
    total, sums = hidden_state_logit_loss(h_s, w_s, h_t, w_t, labels, kd_weight=1.0, ce_weight=0.0, beta=beta,
                                          temperature=tau, chunk_size=5)
    total.backward()
    ours = (h_s.grad.clone(), w_s.grad.clone())
    h_s.grad = w_s.grad = None
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], 1).reshape(-1)
    valid = targets != IGNORE_INDEX
    divergence, _ = chunked.ChunkedDivergenceFunction.apply(
        h_s.reshape(-1, h_s.shape[-1])[valid], w_s, None, h_t.reshape(-1, h_t.shape[-1])[valid], w_t, None, beta, tau)
    divergence.sum().backward()
    torch.testing.assert_close(sums[0], divergence.sum().detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[0], h_s.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours[1], w_s.grad, rtol=1e-4, atol=1e-6)
