"""The adapter on a real pretrained teacher: SmolLM2-135M-Instruct (Llama, GQA 9/3 heads, tied embeddings)."""

import pytest
from transformers import AutoModelForCausalLM

from transformers_red import RedAdapterConfig, get_red_model
from transformers_red.evaluation.perplexity import perplexity
from transformers_red.resources import builtin_texts

pytestmark = pytest.mark.slow

FIXED_TEXT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
              "How many clips did Natalia sell altogether in April and May? Natalia sold 48/2 = 24 clips in May. "
              "Natalia sold 48+24 = 72 clips altogether in April and May. The answer is 72.")


def test_red_student_merges_reloads_and_sits_between_teacher_and_random(load_smollm2_teacher, tmp_path):
    teacher, tokenizer = load_smollm2_teacher()
    assert teacher.config.hidden_size == 576
    ppl = {"teacher": perplexity(teacher, [FIXED_TEXT], tokenizer)}
    config = RedAdapterConfig(width_ratio=0.5, calibration_max_length=256)
    red = get_red_model(teacher, config, builtin_texts(15), tokenizer, show_progress_bar=False)
    assert red.student_hidden_size == 288 and len(red.channel_indices) == 288
    ppl["red"] = perplexity(red, [FIXED_TEXT], tokenizer)
    merged = red.merge_and_unload(progressbar=True).eval()
    merged.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM" and reloaded.config.hidden_size == 288
    assert reloaded.config.head_dim == 64 and reloaded.config.num_key_value_heads == 3
    ppl["red_reloaded"] = perplexity(reloaded, [FIXED_TEXT], tokenizer)
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    out = reloaded.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 5

    random_teacher, _ = load_smollm2_teacher()
    rand = get_red_model(random_teacher, RedAdapterConfig(width_ratio=0.5, init="random"))
    ppl["random"] = perplexity(rand, [FIXED_TEXT], tokenizer)
    print("step-0 perplexity on the fixed text:", {k: round(v, 2) for k, v in ppl.items()})
    assert ppl["red_reloaded"] == pytest.approx(ppl["red"], rel=1e-4)
    assert ppl["teacher"] < ppl["red"] < ppl["random"]


def test_distillation_end_to_end(load_smollm2_teacher, tmp_path):
    import datasets

    from transformers_red import RedConfig, RedDistillationTrainer
    from transformers_red.resources import reasoning_texts

    teacher, tokenizer = load_smollm2_teacher()
    texts = reasoning_texts(24, seed=0)
    args = RedConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2, max_length=128,
                     report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
                     calibration_num_samples=15)
    trainer = RedDistillationTrainer(model=teacher, args=args, processing_class=tokenizer,
                                     train_dataset=datasets.Dataset.from_dict({"text": texts}))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "kd_loss" in h]
    print("SmolLM2 distillation steps:", [(round(h["loss"], 3), round(h["kd_loss"], 3)) for h in logged])
    assert len(logged) == 2 and all(h["loss"] == h["loss"] for h in logged)
    trainer.save_model(str(tmp_path / "student"))
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    assert student.config.hidden_size == 288
    prompt = tokenizer("Question: 3 + 4 = ?\nAnswer:", return_tensors="pt")
    out = student.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 4
