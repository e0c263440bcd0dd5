"""The multi-step word-problem task of the real-LLM reasoning teacher, its fine-tune script and its loader."""

import json
import random
from pathlib import Path

import pytest

from transformers_red.demo.word_problems import (
    MAX_COUNT,
    generate_mixed_word_problems,
    generate_word_problem,
    generate_word_problems,
    parse_final_answer,
)
from transformers_red.loading import LoadError, load_config, load_model

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("steps", [1, 3, 6, 9])
def test_worked_answers_are_checkable_chains(steps):
    for problem in generate_word_problems(50, steps, seed=3):
        lines = problem.target.split("\n")
        assert len(lines) == steps + 1 and lines[-1] == f"#### {problem.answer}"
        value = problem.values[0]
        for line, expected in zip(lines, problem.values[1:]):
            left, result = line.split(" = ")
            assert int(left.split(" ")[0]) == value  # each step starts from the previous result
            assert eval(left) == int(result) == expected and 0 <= expected <= MAX_COUNT  # noqa: S307
            value = expected
        assert problem.prompt.count("Then ") == steps and problem.prompt.endswith("Answer:\n")
        assert parse_final_answer(problem.target) == problem.answer


def test_problems_are_deterministic_and_streams_differ():
    assert generate_word_problems(5, 3, seed=1) == generate_word_problems(5, 3, seed=1)
    assert generate_word_problems(5, 3, seed=1) != generate_word_problems(5, 3, seed=2)
    mixed = generate_mixed_word_problems(200, seed=0)
    assert {p.steps for p in mixed} == set(range(1, 7))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        generate_word_problem(random.Random(0), 0)


def test_missing_reasoner_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFORMERS_RED_CACHE", str(tmp_path))
    with pytest.raises(LoadError, match="python scripts/train_smollm2_reasoner.py"):
        load_model("smollm2-reasoner")
    with pytest.raises(LoadError, match="python scripts/train_smollm2_reasoner.py"):
        load_config("smollm2-reasoner")


@pytest.mark.slow
def test_fine_tune_script_smoke_resumes_and_caches_with_its_recipe(tmp_path, monkeypatch, capsys):
    """Three steps of the real fine-tune on SmolLM2, stopped after two and resumed (in this process: the script's
    main); the cached teacher folder appears only when complete, and another recipe is refused."""
    import importlib.util

    import torch

    from transformers_red.resources import SMOLLM2_CACHE_NAME, default_cache_dir, load_smollm2

    load_smollm2()  # the session's converted SmolLM2, shared with the new cache (no second conversion)
    (tmp_path / SMOLLM2_CACHE_NAME).symlink_to(default_cache_dir() / SMOLLM2_CACHE_NAME)
    monkeypatch.setenv("TRANSFORMERS_RED_CACHE", str(tmp_path))
    spec = importlib.util.spec_from_file_location("train_smollm2_reasoner",
                                                  REPO / "scripts" / "train_smollm2_reasoner.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--steps", "3", "--batch_size", "2", "--save_every", "10", "--eval_every", "0", "--eval_per_k", "1",
            "--eval_max_k", "2", "--threads", str(torch.get_num_threads()),
            "--output_dir", str(tmp_path / "smollm2-reasoner")]
    script.main([*argv, "--stop_after", "2"])
    assert "stopped after step 2" in capsys.readouterr().out and not (tmp_path / "smollm2-reasoner").exists()
    with pytest.raises(SystemExit, match="holds a run of another recipe"):
        script.main([*argv[:1], "4", *argv[2:]])
    script.main(argv)
    assert "resumed from" in capsys.readouterr().out
    report = json.loads((tmp_path / "smollm2-reasoner" / "training_report.json").read_text())
    assert report["recipe"]["steps"] == 3 and len(report["recipe_digest"]) == 64
    assert set(report["held_out_accuracy"]) == {"1", "2"}
    assert not (tmp_path / "smollm2-reasoner.work").exists()
    model, tokenizer = load_model("smollm2-reasoner")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
