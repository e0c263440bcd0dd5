"""On-policy RED (`RedConfig(lmbda > 0)`): the student samples completions through its formed weights, the teacher
scores them; sampling equals the merged student's, gradient accumulation and resume stay exact."""

import json

import datasets
import pytest
import torch
from transformers import TrainerCallback

from transformers_red import RedAdapterConfig, RedConfig, RedDistillationTrainer, get_red_model
from transformers_red.resources import builtin_texts, byte_tokenizer, tiny_teacher
from transformers_red.training.on_policy import derived_seed, is_on_policy, sample_completions, split_prompts


@pytest.fixture(scope="module")
def pairs():
    texts = builtin_texts(64)
    return datasets.Dataset.from_dict({"prompt": [t[:24] for t in texts], "completion": [t[24:40] for t in texts]})


def make_trainer(tmp_path, dataset, teacher, **kwargs):
    defaults = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, max_length=64,
                    logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, learning_rate=1e-2,
                    calibration_num_samples=8, disable_tqdm=True, lmbda=1.0, max_new_tokens=6)
    return RedDistillationTrainer(model=teacher, args=RedConfig(**{**defaults, **kwargs}), train_dataset=dataset,
                                  processing_class=byte_tokenizer())


def trained_state(trainer):
    if trainer.args.train == "weights":
        return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return {k: v.clone() for k, v in trainer.red_model.adapter_state_dict().items()}


def test_sampling_with_formed_weights_equals_sampling_from_the_merged_student():
    tokenizer = byte_tokenizer()
    red = get_red_model(tiny_teacher("llama"), RedAdapterConfig(width_ratio=0.5), builtin_texts(8), tokenizer)
    with torch.no_grad():  # a trained-looking student, not the hard-pruned teacher
        for p in red.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = tokenizer(["The quick brown", "Python is a"], return_tensors="pt", padding=True, padding_side="left")
    prompts, mask = batch["input_ids"], batch["attention_mask"]
    kwargs = dict(max_new_tokens=12, temperature=1.0, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    seeds = [11, 12]
    through_red = sample_completions(red, prompts, mask, seeds, **kwargs)  # forms W_T @ P in every forward
    merged = sample_completions(red.merge_and_unload(), prompts, mask, seeds, **kwargs)
    assert torch.equal(through_red["input_ids"], merged["input_ids"])
    assert (merged["labels"] != -100).sum() > 0
    # a row samples the same tokens alone as in a batch (its own generator, its own logits)
    alone = sample_completions(red.merge_and_unload(), prompts[1:], mask[1:], seeds[1:], **kwargs)
    width = alone["attention_mask"].sum()
    assert torch.equal(alone["input_ids"][0, :width], merged["input_ids"][1, :width])
    other = sample_completions(red.merge_and_unload(), prompts, mask, [21, 22], **kwargs)
    assert not torch.equal(other["input_ids"], merged["input_ids"])  # the seed is what decides


def test_split_prompts_left_pads_the_prompt_of_each_row():
    ids = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 9, 0, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 6, 9, -100, -100]])
    prompts, mask = split_prompts({"input_ids": ids, "labels": labels, "attention_mask": (ids != 0).long()}, 0)
    assert prompts.tolist() == [[5, 6], [0, 5]] and mask.tolist() == [[1, 1], [0, 1]]
    with pytest.raises(ValueError, match="prompt/completion data"):
        split_prompts({"input_ids": ids, "labels": ids}, 0)


def test_on_policy_choice_and_seeds_are_functions_of_step_and_index():
    draws = [is_on_policy(0.5, 0, step, 0) for step in range(200)]
    assert 60 < sum(draws) < 140 and draws == [is_on_policy(0.5, 0, step, 0) for step in range(200)]
    assert not is_on_policy(0.0, 0, 3, 1) and is_on_policy(1.0, 0, 3, 1)
    assert derived_seed(0, 1, 2) == derived_seed(0, 1, 2) != derived_seed(0, 2, 1)


@pytest.mark.parametrize("train", ["projections", "weights"])
def test_on_policy_gradient_accumulation_1x8_equals_8x1(tmp_path, pairs, train):
    runs = {}
    for batch, accumulation in ((8, 1), (1, 8)):
        trainer = make_trainer(tmp_path / f"{batch}x{accumulation}", pairs, tiny_teacher("llama"), max_steps=1,
                               per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                               optim="sgd", learning_rate=0.5, shuffle_dataset=False, train=train)
        initial = trained_state(trainer)
        trainer.train()
        loss = [h["loss"] for h in trainer.state.log_history if "loss" in h][0]
        runs[batch] = (loss, trained_state(trainer), trainer._total_train_tokens)
        assert [h.get("on_policy") for h in trainer.state.log_history if "loss" in h] == [1.0]
    (loss_a, state_a, tokens_a), (loss_b, state_b, tokens_b) = runs[8], runs[1]
    assert tokens_a == tokens_b  # the same samples were trained
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(state_a[k], initial[k]) for k in state_a)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_mixed_on_policy_resume_equals_the_uninterrupted_run(tmp_path, pairs):
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, lmbda=0.5)
    straight = make_trainer(tmp_path / "straight", pairs, tiny_teacher("llama"), **common)
    straight.train()
    shares = [h["on_policy"] for h in straight.state.log_history if "on_policy" in h]
    assert 0 < sum(shares) < len(shares)  # both kinds of batches in the run
    first = make_trainer(tmp_path / "resumed", pairs, tiny_teacher("llama"), **common)
    first.add_callback(StopAt(3))
    first.train()
    second = make_trainer(tmp_path / "resumed", pairs, tiny_teacher("llama"), **common)
    second.train(resume_from_checkpoint=True)
    for key, value in trained_state(straight).items():
        torch.testing.assert_close(trained_state(second)[key], value, rtol=0, atol=1e-6)
    assert second._total_train_tokens == straight._total_train_tokens
    summary = json.loads((tmp_path / "straight" / "out" / "checkpoint-6" / "red_run.json").read_text())
    assert summary["identity"]["loss"]["lmbda"] == 0.5


def test_on_policy_refusals(tmp_path):
    text = datasets.Dataset.from_dict({"text": builtin_texts(8)})
    with pytest.raises(ValueError, match="prompt/completion data"):
        make_trainer(tmp_path, text, tiny_teacher("llama"))
    with pytest.raises(ValueError, match="lmbda .* must be in"):
        RedConfig(output_dir=str(tmp_path), lmbda=1.5)
    with pytest.raises(ValueError, match="packing=False with lmbda > 0"):
        RedConfig(output_dir=str(tmp_path), lmbda=0.5, packing=True)


def test_on_policy_from_a_yaml_through_the_cli(tmp_path):
    from transformers_red.commands.distill import run_distill

    teacher = tmp_path / "teacher"
    tiny_teacher("llama").save_pretrained(teacher)
    byte_tokenizer().save_pretrained(teacher)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"question": t[:24], "answer": t[24:40]}) + "\n" for t in builtin_texts(16)))
    config = tmp_path / "on_policy.yaml"
    config.write_text(f"model_name_or_path: {teacher}\ndataset_name: {data}\ndataset_prompt_field: question\n"
                      "dataset_completion_field: answer\nlmbda: 1.0\nmax_new_tokens: 4\nmax_steps: 2\n"
                      "per_device_train_batch_size: 4\nmax_length: 64\nreport_to: none\nuse_cpu: true\n"
                      "save_strategy: 'no'\ndisable_tqdm: true\ncalibration_num_samples: 4\n")
    trainer = run_distill(["--config", str(config), "--output_dir", str(tmp_path / "out")])
    shares = [h["on_policy"] for h in trainer.state.log_history if "on_policy" in h]
    assert shares and set(shares) == {1.0}
    summary = json.loads((tmp_path / "out" / "red_summary.json").read_text())
    assert summary["distillation"]["lmbda"] == 1.0 and summary["distillation"]["max_new_tokens"] == 4
