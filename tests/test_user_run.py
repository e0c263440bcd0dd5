"""A user's own run, the way `trl sft` users work: TRL's YAML and data flags, every row, prompt/completion data
with an eval split, calibration on the training device, and what RED refuses up front."""

import json
import subprocess
import sys

import datasets
import pytest
import torch

from transformers_red import RedConfig, RedDistillationTrainer
from transformers_red.commands import main
from transformers_red.resources import builtin_texts, byte_tokenizer, tiny_teacher

TINY = {"per_device_train_batch_size": 4, "max_length": 48, "report_to": "none", "use_cpu": True,
        "calibration_num_samples": 4, "disable_tqdm": True, "save_strategy": "no"}


@pytest.fixture
def teacher_dir(tmp_path):
    folder = tmp_path / "teacher"
    tiny_teacher("llama").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _gsm_rows(n, seed=0):
    rows = []
    for i in range(n):
        a, b = (seed * 7 + i) % 9 + 1, (i * 3) % 7 + 2
        rows.append({"question": f"Tom has {a} apples and buys {b} more. How many apples now?",
                     "answer": f"{a} + {b} = {a + b}\n#### {a + b}"})
    return rows


def test_trl_sft_yaml_with_red_fields_trains_on_every_row_of_a_5000_row_file(tmp_path, teacher_dir, capsys):
    texts = builtin_texts()
    data = _jsonl(tmp_path / "train.jsonl", [{"text": texts[i % len(texts)][:80]} for i in range(5000)])
    # what `trl sft --config` reads (ScriptArguments + SFTConfig + ModelConfig keys), plus RED's fields
    config = tmp_path / "sft.yaml"
    config.write_text(f"model_name_or_path: {teacher_dir}\ndataset_name: {data}\ndataset_train_split: train\n"
                      "dtype: float32\nattn_implementation: eager\nlearning_rate: 1.0e-4\nmax_steps: 2\n"
                      "per_device_train_batch_size: 4\nmax_length: 32\nreport_to: none\nuse_cpu: true\n"
                      "save_strategy: 'no'\ndisable_tqdm: true\nwidth_ratio: 0.5\ncalibration_num_samples: 4\n")
    trainer = __import__("transformers_red.commands.distill", fromlist=["run_distill"]).run_distill(
        ["--config", str(config), "--output_dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "Training data: 5000 rows from the 'train' split" in out
    assert "Training on 5000 rows" in out and "tokens after tokenisation and truncation to max_length=32" in out
    assert len(trainer.train_dataset) == 5000  # no silent cut
    assert trainer.red_model.base_model.config._attn_implementation == "eager"
    assert trainer.state.global_step == 2


def test_gsm8k_shaped_data_trains_as_prompt_completion_with_an_eval_split(tmp_path, teacher_dir, capsys):
    folder = tmp_path / "gsm"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", _gsm_rows(24))
    _jsonl(folder / "test.jsonl", _gsm_rows(8, seed=1))
    run = __import__("transformers_red.commands.distill", fromlist=["run_distill"]).run_distill
    trainer = run(["--model_name_or_path", str(teacher_dir), "--dataset_name", str(folder),
                   "--dataset_prompt_field", "question", "--dataset_completion_field", "answer",
                   "--eval_strategy", "steps", "--eval_steps", "2", "--max_steps", "2", "--erank_steps", "2",
                   "--erank_num_samples", "4", "--output_dir", str(tmp_path / "out"),
                   *[f"--{k}={v}" for k, v in {**TINY, "max_length": 128}.items()]])
    assert "evaluation: 8 rows from 'test'" in capsys.readouterr().out
    assert "input_ids" in trainer.eval_dataset.column_names
    assert any("eval_loss" in entry for entry in trainer.state.log_history)
    assert trainer._erank_source == "given dataset"  # the eRank check reads the user's eval split
    # the loss is on the completion only: the labels are -100 over the prompt's tokens, then the answer's
    row = trainer.train_dataset[0]
    prompt_len = len(byte_tokenizer()(_gsm_rows(1)[0]["question"], add_special_tokens=False)["input_ids"])
    assert set(row["labels"][:prompt_len]) == {-100} and -100 not in row["labels"][prompt_len:]


def test_rows_that_truncation_empties_are_reported_and_none_left_is_an_error(tmp_path):
    rows = _gsm_rows(8)
    ds = datasets.Dataset.from_dict({"prompt": [r["question"] for r in rows],
                                     "completion": [r["answer"] for r in rows]})
    with pytest.raises(ValueError, match="No training row is left after tokenisation.*Raise max_length"):
        RedDistillationTrainer(model=tiny_teacher("llama"), args=RedConfig(output_dir=str(tmp_path), **TINY),
                               train_dataset=ds, processing_class=byte_tokenizer())
    long = {"prompt": ["Q" * 60] + ["Q"] * 7, "completion": ["A"] * 8}
    trainer = RedDistillationTrainer(model=tiny_teacher("llama"), train_dataset=datasets.Dataset.from_dict(long),
                                     args=RedConfig(output_dir=str(tmp_path), **TINY),
                                     processing_class=byte_tokenizer())
    assert "8 rows, of which 1 were dropped by TRL" in trainer.training_data_summary_line()


def test_missing_columns_and_missing_eval_split_fail_before_the_teacher_loads(tmp_path, teacher_dir, capsys,
                                                                              monkeypatch):
    import transformers_red.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the teacher was loaded"))
    data = _jsonl(tmp_path / "gsm.jsonl", _gsm_rows(4))
    common = ["distill", "--model_name_or_path", str(teacher_dir), "--dataset_name", str(data), "--output_dir",
              str(tmp_path / "o")]
    with pytest.raises(SystemExit):
        main(common)
    err = capsys.readouterr().err
    assert "--dataset_prompt_field question --dataset_completion_field answer" in err and "--dataset_text_field" in err
    with pytest.raises(SystemExit):
        main([*common, "--dataset_prompt_field", "question", "--dataset_completion_field", "solution"])
    assert "no column 'solution'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one file is one split: no 'test' to evaluate on
        main([*common, "--dataset_prompt_field", "question", "--dataset_completion_field", "answer",
              "--eval_strategy", "steps"])
    assert "Cannot read split 'test'" in capsys.readouterr().err


def test_a_single_file_divides_into_train_and_test_by_slices(tmp_path):
    from transformers_red.loading import load_text_dataset

    data = _jsonl(tmp_path / "d.jsonl", [{"text": str(i)} for i in range(10)])
    train = load_text_dataset(name=str(data), split="train[:80%]")
    test = load_text_dataset(name=str(data), split="train[80%:]")
    assert train["text"] == [str(i) for i in range(8)] and test["text"] == ["8", "9"]
    assert len(load_text_dataset(name=str(data))) == 10  # every row unless asked
    assert len(load_text_dataset(name=str(data), num_samples=3)) == 3


@pytest.mark.parametrize("init", ["activation", "random"])  # channel statistics / clone normalisers first
def test_calibration_passes_run_on_the_training_device(tmp_path, monkeypatch, init):
    """The teacher passes made while the trainer is built run on `args.device`: observed with the device patched to
    'meta' (the first teacher forward records the device of its input ids and stops the build)."""
    seen = []

    class Stop(Exception):
        pass

    def record(module, args):
        seen.append(args[0].device)
        raise Stop

    import transformers_red.adapter.config as adapter_config

    monkeypatch.setattr(RedConfig, "device", property(lambda self: torch.device("meta")))
    monkeypatch.setattr(adapter_config, "teacher_weights_digest", lambda model: "0" * 16)  # meta has no values
    teacher = tiny_teacher("llama")
    teacher.get_input_embeddings().register_forward_pre_hook(record)
    args = RedConfig(output_dir=str(tmp_path), init=init, **TINY)
    ds = datasets.Dataset.from_dict({"text": builtin_texts(8)})
    with pytest.raises(Stop):
        RedDistillationTrainer(model=teacher, args=args, train_dataset=ds, processing_class=byte_tokenizer())
    assert seen == [torch.device("meta")]


def test_calibration_passes_run_in_the_training_precision(tmp_path):
    dtypes = []
    teacher = tiny_teacher("llama")
    layer = teacher.model.layers[0].self_attn.q_proj
    layer.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    ds = datasets.Dataset.from_dict({"text": builtin_texts(8)})
    RedDistillationTrainer(model=teacher, args=RedConfig(output_dir=str(tmp_path), bf16=True, **TINY),
                           train_dataset=ds, processing_class=byte_tokenizer())
    assert dtypes and set(dtypes) == {torch.bfloat16}  # channel statistics and clone normalisers, under autocast


@pytest.mark.parametrize("field, value, match", [
    ("loss_type", "dft", "loss_type='dft' is an SFT loss"),
    ("label_smoothing_factor", 0.1, "label_smoothing_factor=0.1"),
    ("neftune_noise_alpha", 5.0, "neftune_noise_alpha"),
    ("use_liger_kernel", True, "use_liger_kernel"),
])
def test_sft_settings_red_does_not_apply_are_refused(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        RedConfig(output_dir=str(tmp_path), **{field: value})


def test_peft_config_and_eval_without_data_are_refused_before_calibration(tmp_path, monkeypatch):
    import transformers_red.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "get_red_model", lambda *a, **k: pytest.fail("calibrated"))
    ds = datasets.Dataset.from_dict({"text": builtin_texts(8)})
    with pytest.raises(ValueError, match="LoRA to the merged student"):
        RedDistillationTrainer(model=tiny_teacher("llama"), args=RedConfig(output_dir=str(tmp_path), **TINY),
                               train_dataset=ds, processing_class=byte_tokenizer(), peft_config=object())
    with pytest.raises(ValueError, match="eval_strategy='steps' needs an eval_dataset"):
        RedDistillationTrainer(model=tiny_teacher("llama"), train_dataset=ds, processing_class=byte_tokenizer(),
                               args=RedConfig(output_dir=str(tmp_path), eval_strategy="steps", **TINY))


def test_cli_refuses_use_peft_and_quantised_teachers(tmp_path, teacher_dir, capsys):
    for flag in ("--use_peft", "--load_in_4bit"):
        with pytest.raises(SystemExit):
            main(["distill", "--model_name_or_path", str(teacher_dir), flag, "true", "--dataset_name", "builtin",
                  "--output_dir", str(tmp_path / "o")])
        assert "error:" in capsys.readouterr().err


def test_packed_batches_count_their_tokens(tmp_path):
    ds = datasets.Dataset.from_dict({"text": [t[:60] for t in builtin_texts(16)]})
    trainer = RedDistillationTrainer(model=tiny_teacher("llama"), train_dataset=ds, processing_class=byte_tokenizer(),
                                     args=RedConfig(output_dir=str(tmp_path), packing=True, max_steps=2, **TINY))
    seen = []
    original = trainer.compute_loss

    def counting(model, inputs, *a, **k):
        assert "attention_mask" not in inputs  # padding-free: position_ids tell the sequences apart
        seen.append(inputs["input_ids"].numel())
        return original(model, inputs, *a, **k)

    trainer.compute_loss = counting
    trainer.train()
    assert trainer._total_train_tokens == sum(seen) > 0


def test_help_imports_no_heavy_library():
    code = ("import sys; from transformers_red.commands import usage; usage(); "
            "print(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_plan_speaks_trainer_flag_names(capsys):
    assert main(["plan", "--teacher", "smollm2", "--per_device_train_batch_size", "2", "--max_length", "128",
                 "--dtype", "bfloat16", "--json"]) == 0
    new = json.loads(capsys.readouterr().out)
    assert main(["plan", "--teacher", "smollm2", "--micro_batch_size", "2", "--seq_len", "128", "--dtype", "bf16",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == new
