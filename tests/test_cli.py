"""The `transformers-red` command line: `inspect` on the embedded default, `distill` from flags and YAML."""

import json
import os

import pytest
from transformers import AutoModelForCausalLM

from transformers_red.commands import main
from transformers_red.resources import builtin_texts, byte_tokenizer, tiny_teacher


def test_inspect_default_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["inspect", "--quiet", "--eval-texts", "4", "--calibration-samples", "4", "--max-length", "64",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for needle in ("Teacher: LlamaForCausalLM", "trainable parameters", "Per-layer eRank",
                   "Selected channels: 32 of 64", "activation   29 projections, singular values 1.000 .. 1.000"):
        assert needle in printed
    report = json.loads(out.read_text())
    assert set(report["students"]) == {"activation", "random"}
    assert report["students"]["activation"]["hidden_size"] == 32
    assert len(report["teacher"]["erank"]) == 5


def test_inspect_rejects_bad_width(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["inspect", "--width-ratio", "2"])
    assert stop.value.code == 2 and "error:" in capsys.readouterr().err


def test_cli_errors_exit_2_with_one_line_and_debug_shows_the_traceback(capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        main(["inspect", "--eval_texts", "0"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and "eval_texts" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="eval_texts"):
        main(["inspect", "--eval_texts", "0", "--debug"])


@pytest.fixture
def teacher_dir(tmp_path):
    folder = tmp_path / "teacher"
    tiny_teacher("qwen3", tie_word_embeddings=False).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("train", ["projections", "weights"])
def test_distill_from_yaml_and_flags(tmp_path, teacher_dir, train, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in builtin_texts(24)))
    config = tmp_path / "red.yaml"
    config.write_text(f"teacher_model_name_or_path: {teacher_dir}\nwidth_ratio: 0.25\nmax_steps: 3\n"
                      "per_device_train_batch_size: 4\nmax_length: 48\nreport_to: []\nuse_cpu: true\n"
                      "calibration_num_samples: 4\nclone_terms: [q, k, attn]\ndisable_tqdm: true\n")
    out = tmp_path / "student"
    main(["distill", "--config", str(config), "--dataset_path", str(data), "--output_dir", str(out),
          "--temperature", "2.0", "--save_strategy", "no", "--train", train])
    assert "Saved a plain Qwen3ForCausalLM student of width 16 (teacher 64" in capsys.readouterr().out
    student = AutoModelForCausalLM.from_pretrained(out)
    assert type(student).__name__ == "Qwen3ForCausalLM" and student.config.hidden_size == 16
    summary = json.loads((out / "red_summary.json").read_text())
    assert summary["distillation"]["temperature"] == 2.0
    assert summary["distillation"]["clone_terms"] == ["q", "k", "attn"]
    assert summary["distillation"]["train"] == train
    assert summary["global_step"] == 3
    assert os.path.isfile(out / "tokenizer.json")


def test_distill_needs_a_dataset(tmp_path, teacher_dir, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["distill", "--teacher_model_name_or_path", str(teacher_dir), "--output_dir", str(tmp_path / "o")])
    assert stop.value.code == 2 and "--dataset_name is required" in capsys.readouterr().err


def test_distill_resumes_with_true_and_takes_comma_separated_clone_terms(tmp_path, teacher_dir, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in builtin_texts(24)))
    out = tmp_path / "run"
    common = ["distill", "--teacher_model_name_or_path", str(teacher_dir), "--dataset_path", str(data),
              "--output_dir", str(out), "--per_device_train_batch_size", "2", "--max_length", "32",
              "--report_to", "none", "--use_cpu", "true", "--calibration_num_samples", "4", "--save_steps", "1",
              "--clone_terms", "q,k", "--disable_tqdm", "true"]
    main([*common, "--max_steps", "2"])
    main([*common, "--max_steps", "3", "--resume_from_checkpoint", "true"])
    summary = json.loads((out / "red_summary.json").read_text())
    assert summary["global_step"] == 3 and summary["distillation"]["clone_terms"] == ["q", "k"]
    assert os.path.isdir(out / "checkpoint-3")


@pytest.mark.parametrize("content, match", [("", "is empty"), ("null\n", "does not hold JSON rows")])
def test_distill_refuses_empty_or_non_row_json_before_datasets_reads_it(tmp_path, teacher_dir, capsys, content,
                                                                        match):
    data = tmp_path / "d.json"
    data.write_text(content)
    with pytest.raises(SystemExit) as stop:
        main(["distill", "--teacher_model_name_or_path", str(teacher_dir), "--dataset_path", str(data),
              "--output_dir", str(tmp_path / "o")])
    assert stop.value.code == 2 and match in capsys.readouterr().err


def test_demo_bad_width_and_teacher_fail_before_making_a_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for flags, match in ((["--width_ratio", "1.5"], "strictly between 0 and 1"),
                         (["--teacher", str(tmp_path / "nothing")], "is not a folder")):
        with pytest.raises(SystemExit) as stop:
            main(["demo", *flags])
        assert stop.value.code == 2 and match in capsys.readouterr().err
    (tmp_path / "empty_teacher").mkdir()
    with pytest.raises(SystemExit):
        main(["demo", "--teacher", str(tmp_path / "empty_teacher"), "--output_dir", str(tmp_path / "out")])
    assert "save the teacher with save_pretrained" in capsys.readouterr().err
    assert not [p for p in os.listdir(tmp_path) if p.startswith("red-demo-")]


def test_an_unsupported_teacher_gets_the_supported_list_in_every_command(tmp_path, capsys):
    from transformers import AutoConfig

    gpt2 = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=256,
                                                          n_positions=64)).save_pretrained(gpt2)
    byte_tokenizer().save_pretrained(gpt2)
    for command in (["inspect", "--teacher", str(gpt2)], ["erank", str(gpt2), "--num_texts", "2"]):
        with pytest.raises(SystemExit) as stop:
            main(command)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and "'gpt2' is not supported" in err and "Traceback" not in err, err


def test_distill_dataset_name_may_be_a_hub_id_and_offline_says_so(tmp_path, teacher_dir, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["distill", "--teacher_model_name_or_path", str(teacher_dir), "--dataset_name", "someone/nowhere",
              "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Cannot load the dataset 'someone/nowhere'" in err and "Offline" in err
