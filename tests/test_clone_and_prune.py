"""The normalised clone term and `RedConfig(train="weights")` (prune and distil)."""

import json

import datasets
import pytest
import torch

from transformers_red import RedConfig, RedDistillationTrainer
from transformers_red.adapter.layer import RedLayer
from transformers_red.resources import builtin_texts
from transformers_red.training.clone import CloneLoss


@pytest.fixture(scope="module")
def train_texts():
    return datasets.Dataset.from_dict({"text": builtin_texts(64)})


def make_trainer(tmp_path, dataset, tokenizer, teacher, **kwargs):
    defaults = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, max_length=48,
                    logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, learning_rate=1e-2,
                    calibration_num_samples=8, disable_tqdm=True)
    return RedDistillationTrainer(model=teacher, args=RedConfig(**{**defaults, **kwargs}), train_dataset=dataset,
                                  processing_class=tokenizer)


# ------------------------------------------------------------------------------------------ clone term
def test_normalised_clone_loss_does_not_depend_on_the_activation_scale():
    gen = torch.Generator().manual_seed(0)
    proj = torch.randn(6, 3, generator=gen)
    names = {"q": [("l0.q", None), ("l1.q", None)], "attn": [("l0.o", None)]}
    student = {"l0.q": torch.randn(2, 4, 5, generator=gen), "l1.q": torch.randn(2, 4, 5, generator=gen),
               "l0.o": torch.randn(2, 4, 3, generator=gen)}
    teacher = {"l0.q": torch.randn(2, 4, 5, generator=gen), "l1.q": torch.randn(2, 4, 5, generator=gen),
               "l0.o": torch.randn(2, 4, 6, generator=gen)}
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])

    def sums(scale, normalization):
        clone = CloneLoss(names, {"l0.o": proj}.__getitem__, "student", normalization)
        scaled_t = {k: v * scale for k, v in teacher.items()}
        clone.calibrate([(scaled_t, mask)])
        return clone, clone.sums({k: v * scale for k, v in student.items()}, scaled_t, mask)

    clone, base = sums(1.0, "teacher_mean_square")
    # hand computation: scale = mean over valid tokens of mean over dims of the target squared
    target = teacher["l0.o"] @ proj
    assert clone.scales["attn", "l0.o"] == pytest.approx(float(target[mask].pow(2).mean()), rel=1e-6)
    per_layer = [float((student[n] - teacher[n])[mask].pow(2).mean(-1).sum() / teacher[n][mask].pow(2).mean())
                 for n, _ in names["q"]]
    assert float(base["q"]) == pytest.approx(sum(per_layer) / 2, rel=1e-5)  # mean over layers
    _, scaled = sums(1e3, "teacher_mean_square")
    for term in names:
        assert float(scaled[term]) == pytest.approx(float(base[term]), rel=1e-4)
    _, plain, = sums(1.0, "none")
    _, plain_scaled = sums(1e3, "none")
    assert float(plain_scaled["q"]) == pytest.approx(1e6 * float(plain["q"]), rel=1e-4)  # the paper's MSE scales
    with pytest.raises(RuntimeError, match="calibrate must run"):
        CloneLoss(names, {"l0.o": proj}.__getitem__).sums(student, teacher, mask)


@pytest.mark.parametrize("output_space", ["student", "teacher"])
def test_clone_normalisers_are_the_teacher_targets_mean_squares(tmp_path, train_texts, tokenizer, trained_teacher,
                                                                output_space):
    """The targets: teacher output @ P (the selected channels at init) in the student space, the teacher output
    itself in the teacher space (LRC's code; that form crashed at the trainer's start before this test)."""
    trainer = make_trainer(tmp_path, train_texts, tokenizer, trained_teacher(), clone_output_space=output_space)
    reference = trained_teacher().eval()
    channels = trainer.red_model.channel_indices
    outputs = {}
    hooks = [reference.get_submodule(n).register_forward_hook(
        lambda _m, _i, out, n=n: outputs.setdefault(n, []).append(out[0]))
        for n in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")]
    with torch.no_grad():
        for text in builtin_texts(64)[:8]:  # calibration: the first 8 texts, one at a time (no padding)
            reference(input_ids=tokenizer(text, return_tensors="pt").input_ids)
    for h in hooks:
        h.remove()
    q = torch.cat(outputs["model.layers.0.self_attn.q_proj"])
    down = torch.cat(outputs["model.layers.1.mlp.down_proj"])
    if output_space == "student":
        down = down[:, channels]  # P is the selection at init
    scales = trainer._clone.scales
    assert scales["q", "model.layers.0.self_attn.q_proj"] == pytest.approx(float(q.pow(2).mean()), rel=1e-4)
    assert scales["ffn", "model.layers.1.mlp.down_proj"] == pytest.approx(float(down.pow(2).mean()), rel=1e-4)


# ------------------------------------------------------------------------------------ prune and distil
def test_weights_mode_starts_at_the_hard_pruned_teacher_and_keeps_the_teacher(tmp_path, train_texts, tokenizer,
                                                                              trained_teacher, input_ids):
    red = make_trainer(tmp_path / "red", train_texts, tokenizer, trained_teacher())
    pruned = make_trainer(tmp_path / "pruned", train_texts, tokenizer, trained_teacher(), train="weights")
    student, teacher = pruned.model, pruned.teacher_model
    assert not any(isinstance(m, RedLayer) for m in [*student.modules(), *teacher.modules()])
    assert type(student).__name__ == "LlamaForCausalLM" and student.config.hidden_size == 32
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    reference = trained_teacher().eval()
    with torch.no_grad():
        # step 0: the plain student is RED's step-0 student (the teacher pruned to the selected channels)
        torch.testing.assert_close(student(input_ids).logits, red.red_model(input_ids).logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(teacher(input_ids).logits, reference(input_ids).logits, rtol=0, atol=0)
    assert red._clone.scales == pytest.approx(pruned._clone.scales, rel=1e-6)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    pruned.train()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items()), "the teacher moved"
    assert pruned.state.log_history[0]["clone_loss"] > 0
    with pytest.raises(TypeError, match="train='weights'"):
        pruned.red_model


def test_hybrid_projections_then_weights_continues_from_the_trained_projections(tmp_path, train_texts, tokenizer,
                                                                                trained_teacher, input_ids):
    first = make_trainer(tmp_path / "projections", train_texts, tokenizer, trained_teacher(), max_steps=3)
    first.train()
    red = first.red_model
    with torch.no_grad():
        after_projections = red(input_ids).logits
    second = make_trainer(tmp_path / "weights", train_texts, tokenizer, red, train="weights")
    with torch.no_grad():  # phase 2 starts where phase 1 ended: the merged trained projections
        torch.testing.assert_close(second.model(input_ids).logits, after_projections, rtol=0, atol=1e-5)
    second.train()
    second.save_model()
    summary = json.loads((tmp_path / "weights" / "out" / "red_summary.json").read_text())
    assert summary["distillation"]["train"] == "weights"


def test_clone_in_the_teacher_space_trains(tmp_path, train_texts, tokenizer, trained_teacher):
    """clone_output_space="teacher": the student's attention / FFN outputs lifted by P^T (made inside the wrappers'
    forwards) against the teacher's; every term finite and non-zero, the clone loss falling."""
    trainer = make_trainer(tmp_path, train_texts, tokenizer, trained_teacher(), clone_output_space="teacher",
                           max_steps=12)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "clone/attn" in h]
    assert len(logged) == 12
    for term in ("attn", "ffn", "q"):
        assert all(0 < h[f"clone/{term}"] < float("inf") for h in logged)
    first, last = (sum(h["clone_loss"] for h in part) / 3 for part in (logged[:3], logged[-3:]))
    assert last < first


def test_activation_checkpointing_gives_the_clone_term_its_exact_gradient(tmp_path, train_texts, tokenizer,
                                                                         trained_teacher):
    """A clone-only SGD step with the student's activation checkpointing (non-reentrant, the default) equals the step
    without it; reentrant checkpointing, which loses the clone gradients (a 0.037 difference measured), is refused by
    RedConfig, and accepted when there is no clone term."""
    states = {}
    for checkpointing in (False, True):
        trainer = make_trainer(tmp_path / str(checkpointing), train_texts, tokenizer, trained_teacher(), max_steps=1,
                               optim="sgd", learning_rate=0.5, shuffle_dataset=False, ce_weight=0.0, kd_weight=0.0,
                               clone_weight=1.0, activation_checkpointing=checkpointing)
        initial = {k: v.clone() for k, v in trainer.red_model.adapter_state_dict().items()}
        trainer.train()
        states[checkpointing] = trainer.red_model.adapter_state_dict()
        assert any(not torch.equal(states[checkpointing][k], v) for k, v in initial.items())  # the step moved them
    for key, value in states[False].items():
        torch.testing.assert_close(states[True][key], value, rtol=1e-6, atol=1e-7)
    RedConfig(output_dir=str(tmp_path), activation_checkpointing=True, clone_weight=0.0,
              activation_checkpointing_kwargs={"use_reentrant": True})

