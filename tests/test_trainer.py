"""RedDistillationTrainer: loss arithmetic, gradient accumulation, learning, resume, memory, saving."""

import gc
import inspect
import json
import math
import os

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from transformers_red import RedAdapterConfig, RedConfig, RedDistillationTrainer, get_red_model
from transformers_red.resources import builtin_texts, tiny_teacher
from transformers_red.training.losses import LogitLossWorkspace, fused_logit_loss, logit_loss_sums, masked_mse_sum
from transformers_red.training.rows import first_texts


@pytest.fixture(scope="module")
def train_texts():
    return datasets.Dataset.from_dict({"text": builtin_texts(96)})


def make_args(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, max_length=48,
                    logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, learning_rate=1e-2,
                    calibration_num_samples=8, disable_tqdm=True)
    return RedConfig(**{**defaults, **kwargs})


@pytest.fixture
def teacher(trained_teacher):
    return trained_teacher()


def make_trainer(tmp_path, dataset, tokenizer, teacher, **kwargs):
    return RedDistillationTrainer(model=teacher,
                                  args=make_args(tmp_path, **kwargs), train_dataset=dataset,
                                  processing_class=tokenizer)


def trained_state(trainer):
    """What the trainer trains: the adapter state (projections, norm gains), or the plain student's weights."""
    if trainer.args.train == "weights":
        return {k: v.detach() for k, v in trainer.model.state_dict().items()}
    return trainer.red_model.adapter_state_dict()


def losses(trainer, key="loss"):
    return [h[key] for h in trainer.state.log_history if key in h and "train_runtime" not in h]


# ------------------------------------------------------------------------------------------ loss arithmetic
def test_logit_losses_against_hand_computation():
    # batch 1, 3 positions (2 predicting tokens), vocabulary 3; the second label is ignored.
    s = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [9.0, 9.0, 9.0]]])
    t = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[5, 2, -100]])  # position 0 predicts 2, position 1 predicts -100 (ignored)

    def probs(x, tau):
        e = [math.exp(v / tau) for v in x]
        return [v / sum(e) for v in e]

    def kl(p, q):
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))

    for tau in (1.0, 2.0):
        ps, pt = probs(s[0, 0].tolist(), tau), probs(t[0, 0].tolist(), tau)
        m = [0.5 * a + 0.5 * b for a, b in zip(ps, pt)]
        expected = {0.0: kl(pt, ps), 1.0: kl(ps, pt), 0.5: 0.5 * kl(pt, m) + 0.5 * kl(ps, m)}
        for beta, value in expected.items():
            kd, ce, tce = logit_loss_sums(s, t, labels, beta=beta, temperature=tau, chunk_size=1)
            assert kd.item() == pytest.approx(value, rel=1e-5, abs=1e-7), (beta, tau)
    assert ce.item() == pytest.approx(-math.log(probs(s[0, 0].tolist(), 1.0)[2]), rel=1e-6)
    assert tce.item() == pytest.approx(-math.log(probs(t[0, 0].tolist(), 1.0)[2]), rel=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_generalized_jsd_loss_matches_gkd(beta, reduction):
    gkd = pytest.importorskip("trl.experimental.gkd").GKDTrainer
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=gen), torch.randn(2, 5, 11, generator=gen)
    labels = torch.tensor([[1, 2, -100, 3, 4], [-100, 5, 6, 7, -100]])
    ours = RedDistillationTrainer.generalized_jsd_loss(s, t, labels, beta=beta, temperature=2.0,
                                                       reduction=reduction, chunk_size=3)
    theirs = gkd.generalized_jsd_loss(s, t, labels, beta=beta, temperature=2.0, reduction=reduction)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    if "num_items_in_batch" not in inspect.signature(gkd.generalized_jsd_loss).parameters:
        return  # GKD gained it in trl 1.7; the floors job runs trl 1.0
    ours = RedDistillationTrainer.generalized_jsd_loss(s, t, labels, beta=beta, num_items_in_batch=4)
    theirs = gkd.generalized_jsd_loss(s, t, labels, beta=beta, num_items_in_batch=4)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_chunking_does_not_change_losses_or_gradients():
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(2, 7, 13, generator=gen, requires_grad=True)
    t = torch.randn(2, 7, 13, generator=gen)
    labels = torch.randint(0, 13, (2, 7), generator=gen)
    labels[0, 3] = -100
    grads = []
    for chunk in (1, 4, 1000):
        total = logit_loss_sums(s, t, labels, beta=0.5, chunk_size=chunk)
        (g,) = torch.autograd.grad(total[:2].sum(), s)
        grads.append((total.detach(), g))
    for total, g in grads[1:]:
        torch.testing.assert_close(total, grads[0][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g, grads[0][1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_fused_logit_loss_matches_autograd_reference(beta, tau):
    # The trainer's fused loss computes its gradient in the forward; the reference is plain autograd.
    gen = torch.Generator().manual_seed(2)
    workspace = LogitLossWorkspace()
    for kd_w, ce_w, chunk in ((1.0, 1.0, 3), (0.3, 0.0, 1000), (0.0, 0.7, 5), (2.0, 0.5, 1)):
        s = (3 * torch.randn(2, 7, 13, generator=gen, dtype=torch.float64)).requires_grad_()
        t = 3 * torch.randn(2, 7, 13, generator=gen, dtype=torch.float64)
        labels = torch.randint(0, 13, (2, 7), generator=gen)
        labels[0, 3], labels[1, :2] = -100, -100
        ref = logit_loss_sums(s, t, labels, beta=beta, temperature=tau, chunk_size=1000)
        (ref_grad,) = torch.autograd.grad(kd_w * ref[0] + ce_w * ref[1], s)
        total, sums = fused_logit_loss(s, t, labels, kd_weight=kd_w, ce_weight=ce_w, beta=beta, temperature=tau,
                                       chunk_size=chunk, workspace=workspace)
        (grad,) = torch.autograd.grad(0.37 * total, s)
        # float32 arithmetic inside (as on an accelerator): 1e-5 relative
        torch.testing.assert_close(sums.double(), ref.detach().double(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(total.double(), (kd_w * ref[0] + ce_w * ref[1]).detach().double(), rtol=1e-5,
                                   atol=1e-5)
        torch.testing.assert_close(grad, 0.37 * ref_grad, rtol=1e-5, atol=1e-6)
        assert grad[0, 2].abs().max() == 0 and grad[1, 6].abs().max() == 0  # rows whose next label is ignored


def test_fused_logit_loss_dtypes_no_grad_and_single_backward():
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(2, 5, 11, generator=gen).to(torch.bfloat16).requires_grad_()
    t = torch.randn(2, 5, 11, generator=gen).to(torch.bfloat16)
    labels = torch.randint(0, 11, (2, 5), generator=gen)
    total, sums = fused_logit_loss(s, t, labels)
    ref = logit_loss_sums(s.detach().float(), t.float(), labels)
    torch.testing.assert_close(sums, ref, rtol=1e-5, atol=1e-5)
    total.backward(retain_graph=True)
    assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad.float()).all()
    with pytest.raises(RuntimeError, match="single backward"):
        total.backward()
    with torch.no_grad():
        total_ng, sums_ng = fused_logit_loss(s, t, labels)
    assert total_ng.grad_fn is None
    torch.testing.assert_close(sums_ng, sums)
    all_ignored = torch.full_like(labels, -100)
    assert fused_logit_loss(s, t, all_ignored)[1].abs().sum() == 0
    with pytest.raises(ValueError, match="vocabularies differ"):
        fused_logit_loss(s, t[..., :5], labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_mse_sum_matches_autograd_formula_on_both_sides(dtype):
    gen = torch.Generator().manual_seed(4)
    s = torch.randn(2, 5, 7, generator=gen).to(dtype).requires_grad_()
    proj = torch.randn(7, 7, generator=gen).to(dtype).requires_grad_()  # teacher side through a projection
    t = torch.randn(2, 5, 7, generator=gen).to(dtype) @ proj
    mask = torch.rand(2, 5, generator=gen) > 0.3
    value = masked_mse_sum(s, t, mask)
    grads = torch.autograd.grad(0.7 * value, (s, proj), retain_graph=True)
    ref = (((s.float() - t.float()) ** 2).mean(-1) * mask).sum()
    ref_grads = torch.autograd.grad(0.7 * ref, (s, proj))
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), r.float(), rtol=1e-5, atol=1e-6)
    assert grads[0][~mask].abs().max() == 0


def test_capture_activations_records_only_named_modules(input_ids):
    red = get_red_model(tiny_teacher(), RedAdapterConfig(width_ratio=0.5, init="random"))
    names = red.targeted_module_names
    wanted = [n for n in names if n.endswith("q_proj")]
    with red.capture_activations(wanted) as acts:
        red(input_ids=input_ids)
    assert sorted(acts) == sorted(wanted)
    with red.capture_activations() as acts:
        red(input_ids=input_ids)
    assert set(wanted) < set(acts) <= set(names)  # every recording layer (norms and embeddings do not record)
    with pytest.raises(ValueError, match="not wrapped modules"):
        with red.capture_activations(["model.nope"]):
            pass


# -------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("train, normalization", [("projections", "teacher_mean_square"), ("projections", "none"),
                                                   ("weights", "teacher_mean_square")])
def test_gradient_accumulation_1x8_equals_8x1(tmp_path, train_texts, tokenizer, trained_teacher, train, normalization):
    runs = {}
    for batch, accumulation in ((8, 1), (1, 8)):
        trainer = make_trainer(tmp_path / f"{batch}x{accumulation}", train_texts, tokenizer, trained_teacher(),
                               max_steps=1, per_device_train_batch_size=batch,
                               gradient_accumulation_steps=accumulation,
                               optim="sgd", learning_rate=0.5, shuffle_dataset=False, train=train,
                               clone_normalization=normalization)
        initial = {k: v.clone() for k, v in trained_state(trainer).items()}
        trainer.train()
        runs[batch] = (losses(trainer)[0], {k: v.clone() for k, v in trained_state(trainer).items()})
    (loss_a, state_a), (loss_b, state_b) = runs[8], runs[1]
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for key in state_a:  # tolerance: float32 sums in another order (padding differs between the two)
        torch.testing.assert_close(state_a[key], state_b[key], rtol=1e-5, atol=1e-6)
    unchanged = [k for k in state_a if torch.equal(state_a[k], initial[k])]
    assert not unchanged, f"the step changed nothing in {unchanged[:3]}"


def test_training_lowers_losses_and_activation_beats_random_at_step_one(tmp_path, train_texts, tokenizer,
                                                                          trained_teacher):
    red = make_trainer(tmp_path / "red", train_texts, tokenizer, trained_teacher(), max_steps=30)
    red.train()
    for key in ("loss", "kd_loss", "clone_loss"):
        values = losses(red, key)
        assert len(values) == 30
        first, last = sum(values[:5]) / 5, sum(values[-5:]) / 5
        assert last < first, f"{key} did not decrease: {first:.4f} -> {last:.4f}"
    rand = make_trainer(tmp_path / "lrc", train_texts, tokenizer, trained_teacher(), max_steps=1, init="random")
    rand.train()
    red_kd, random_kd = losses(red, "kd_loss")[0], losses(rand, "kd_loss")[0]
    print(f"first-step KD: activation {red_kd:.4f}, random {random_kd:.4f}")
    assert red_kd < random_kd


class StopAt(TrainerCallback):
    """Simulates a crash right after the checkpoint of `step`."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("train", ["projections", "weights"])
def test_resume_continues_exactly(tmp_path, train_texts, tokenizer, trained_teacher, train):
    common = dict(max_steps=10, save_strategy="steps", save_steps=5, erank_steps=5, erank_num_samples=2, train=train)
    straight = make_trainer(tmp_path / "straight", train_texts, tokenizer, trained_teacher(), **common)
    straight.train()
    first = make_trainer(tmp_path / "resumed", train_texts, tokenizer, trained_teacher(), **common)
    first.add_callback(StopAt(5))
    first.train()
    assert os.path.isdir(tmp_path / "resumed" / "out" / "checkpoint-5")
    assert not any(n.startswith(".staging") for n in os.listdir(tmp_path / "resumed" / "out"))
    second = make_trainer(tmp_path / "resumed", train_texts, tokenizer, trained_teacher(), **common)
    second.train(resume_from_checkpoint=True)
    for key, value in trained_state(straight).items():
        torch.testing.assert_close(trained_state(second)[key], value, rtol=0, atol=1e-6)
    assert losses(first) == pytest.approx(losses(straight)[:5], rel=1e-6)
    assert len(losses(second)) == 10  # the first five come back with the checkpoint's trainer state
    assert losses(second)[5:] == pytest.approx(losses(straight)[5:], rel=1e-6)
    with open(tmp_path / "resumed" / "out" / "checkpoint-10" / "erank.json") as f:
        assert [h["step"] for h in json.load(f)["history"]] == [0, 5, 10]


def test_one_copy_of_teacher_weights(tmp_path, train_texts, tokenizer):
    # A teacher of its own (the session fixture keeps a copy of the trained one's weights).
    trainer = make_trainer(tmp_path, train_texts, tokenizer, tiny_teacher("llama", seed=7), max_steps=1)
    trainer.train()
    assert trainer.teacher_model is None
    teacher_params = {n: p for n, p in trainer.red_model.base_model.named_parameters()}
    gc.collect()
    tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and not o.is_meta]
    for name, param in teacher_params.items():
        same = {t.untyped_storage().data_ptr() for t in tensors
                if t.shape == param.shape and t.dtype == param.dtype and torch.equal(t, param)}
        assert same == {param.untyped_storage().data_ptr()}, f"{name} is held {len(same)} times"


@pytest.mark.parametrize("train", ["projections", "weights"])
def test_save_model_writes_plain_student(tmp_path, train_texts, tokenizer, teacher, input_ids, train):
    trainer = make_trainer(tmp_path, train_texts, tokenizer, teacher, max_steps=2, erank_steps=1, erank_num_samples=2,
                           train=train)
    trainer.train()
    out = tmp_path / "student"
    trainer.save_model(str(out))
    files = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "red_summary.json",
            "erank.json"} <= files
    assert not any(n.startswith(".staging") for n in files)
    student = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids).logits, trainer.model(input_ids).logits, rtol=0, atol=1e-4)
    summary = json.load(open(out / "red_summary.json"))
    assert summary["student_hidden_size"] == 32 and summary["distillation"]["temperature"] == 1.0
    assert summary["distillation"]["train"] == train
    assert summary["distillation"]["clone_normalization"] == "teacher_mean_square"
    assert summary["adapter"]["calibration_source"] == "first 8 texts of train_dataset"
    assert summary["global_step"] == 2 and summary["tokens_trained"] > 0


def test_bf16_mixed_precision_over_a_float32_teacher_trains_and_exports(tmp_path, train_texts, tokenizer,
                                                                        trained_teacher, input_ids):
    """bf16=True (accelerate wraps the model's forward in autocast): the one-node forming's backward and the export's
    merge check both raised before (a bf16/float32 matmul; a merge check comparing the autocast forward with the
    float32 student). The losses follow the float32 run to bf16 rounding; the exported float32 student is the
    wrapped model's own float32 forward."""
    runs = {}
    for bf16 in (False, True):
        trainer = make_trainer(tmp_path / str(bf16), train_texts, tokenizer, trained_teacher(), max_steps=2,
                               bf16=bf16)
        trainer.train()
        runs[bf16] = trainer
    assert "forward" in runs[True].model.__dict__  # accelerate's autocast wrapper: the setting under test is on
    assert losses(runs[True]) == pytest.approx(losses(runs[False]), rel=1e-2)  # observed 1e-4 to 2e-4
    out = tmp_path / "student"
    runs[True].save_model(str(out))
    assert "forward" in runs[True].model.__dict__  # the merge check put the wrapper back
    student = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert student.dtype == torch.float32
    with torch.no_grad():
        wrapped = type(runs[True].model).forward(runs[True].model, input_ids=input_ids).logits
        torch.testing.assert_close(student(input_ids).logits, wrapped, rtol=0, atol=1e-4)


def test_erank_callback_logs_and_raises_the_collapse_alarm(tmp_path, train_texts, tokenizer, teacher, caplog):
    trainer = make_trainer(tmp_path, train_texts, tokenizer, teacher, max_steps=2, erank_steps=1,
                           erank_num_samples=3, erank_collapse_ratio=2.0)  # a student never has 2x the teacher's
    with caplog.at_level("WARNING", logger="transformers_red.training.callbacks"):
        trainer.train()
    assert "eRank collapse at step 0" in caplog.text
    logged = [h for h in trainer.state.log_history if "erank/mean" in h]
    assert logged and all(0 < h["erank/ratio"] < 2.0 for h in logged)
    history = json.loads((tmp_path / "out" / "erank.json").read_text())
    assert len(history["teacher"]) == 3 and [h["step"] for h in history["history"]] == [0, 1, 2]
    assert all(len(h["student"]) == 3 for h in history["history"])


def test_separate_teacher_model_gives_the_same_step(tmp_path, train_texts, tokenizer, trained_teacher):
    shared = make_trainer(tmp_path / "shared", train_texts, tokenizer, trained_teacher(), max_steps=2)
    shared.train()
    separate = RedDistillationTrainer(model=trained_teacher(), teacher_model=trained_teacher(),
                                      args=make_args(tmp_path / "separate", max_steps=2),
                                      train_dataset=train_texts, processing_class=tokenizer)
    separate.train()
    assert separate.teacher_model is not None
    for key in ("loss", "kd_loss", "clone_loss", "clone/attn", "clone/ffn", "teacher_ce_loss"):
        assert losses(separate, key) == pytest.approx(losses(shared, key), rel=1e-5), key


def test_cpu_allocator_setting_is_opt_in(tmp_path, train_texts, tokenizer, monkeypatch):
    import platform

    from transformers_red.training import trainer as red_trainer
    from transformers_red.training.cpu_memory import keep_freed_cpu_memory

    calls = []
    monkeypatch.setattr(red_trainer, "keep_freed_cpu_memory", lambda: calls.append(1) or True)
    make_trainer(tmp_path / "default", train_texts, tokenizer, tiny_teacher())  # a library leaves it alone
    make_trainer(tmp_path / "on", train_texts, tokenizer, tiny_teacher(), keep_freed_cpu_memory=True)
    assert calls == [1]
    if platform.libc_ver()[0] == "glibc":
        assert keep_freed_cpu_memory() is True  # mallopt accepted both settings


def test_prompt_completion_data_calibrates_on_whole_rows_and_trains_on_completions(tmp_path, tokenizer,
                                                                                    trained_teacher):
    prompts = [f"Question {i}: what is {i} plus {i}? " for i in range(16)]
    completions = [f"Answer: {2 * i}." for i in range(16)]
    dataset = datasets.Dataset.from_dict({"prompt": prompts, "completion": completions})
    trainer = make_trainer(tmp_path, dataset, tokenizer, trained_teacher(), max_steps=1, shuffle_dataset=False)
    assert trainer.red_model.red_config.calibration_source == "first 8 texts of train_dataset"
    assert first_texts(dataset, trainer.args, 2, tokenizer) == [prompts[0] + completions[0],
                                                                  prompts[1] + completions[1]]
    batch = next(iter(trainer.get_train_dataloader()))
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        trained = (labels != -100).nonzero()[:, 0]
        # the losses count completion tokens only: everything before the first trained position is a prompt
        assert tokenizer.decode(ids[:int(trained[0])], skip_special_tokens=True) in prompts
        assert tokenizer.decode(ids[trained], skip_special_tokens=True) in completions
    trainer.train()
    assert losses(trainer, "clone_loss")[0] > 0
