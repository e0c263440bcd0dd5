"""The benchmarks behind docs/results.md run end to end at tiny sizes (CPU smoke runs; the benchmarks are not tests)."""

import importlib.util
import json
import pathlib
import statistics

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def teacher_dir(tmp_path, trained_teacher, tokenizer):
    folder = tmp_path / "teacher"
    trained_teacher().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_real_model_arms_benchmark_runs_every_arm(tmp_path, teacher_dir):
    """A 10-step CPU smoke run of every arm of benchmarks/real_model_arms.py on a tiny trained teacher."""
    bench = load_benchmark("real_model_arms")
    out = tmp_path / "arms"
    bench.main(["--teacher", str(teacher_dir), "--steps", "10", "--eval-every", "5", "--match-steps", "5",
                "--max-length", "48", "--train-samples", "48", "--problems", "4", "--max-new-tokens", "8",
                "--eval-batch-size", "4", "--erank-texts", "2", "--learning-rate", "1e-3", "--output-dir", str(out)])
    report = json.loads((out / "results.json").read_text())
    assert list(report["arms"]) == list(bench.ARMS)
    for arm, run in report["arms"].items():
        assert [r["step"] for r in run["records"]] == [5, 10], arm
        assert all("exact_match" in r and 0 < r["ppl_reasoning"] < float("inf") for r in run["records"]), arm
        assert len(run["records"][-1]["erank"]) == 3  # embedding output + 2 layers
    text = (out / "results.md").read_text()
    assert "At equal steps (10)" in text and "At equal training time" in text and "prune and distil" in text
    assert (out / "perplexity.png").read_bytes()[:4] == b"\x89PNG"
    assert bench.final_answer("so 3 + 4 = 7\n#### 1,007\n") == "1007" and bench.final_answer("no answer") is None
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n")
    bench.main(["--from-json", str(out / "results.json"), "--output-dir", str(tmp_path / "again"),
                "--update-doc", str(doc)])
    section = doc.read_text()
    assert "<!-- real_model_arms:begin -->" in section and "python benchmarks/real_model_arms.py --teacher" in section
    assert (tmp_path / "again" / "results.md").read_text() == text


def test_smollm2_dynamics_benchmark_records_erank_spectra_and_clone_terms(tmp_path, teacher_dir):
    bench = load_benchmark("smollm2_dynamics")
    out = tmp_path / "dynamics"
    bench.main(["--teacher", str(teacher_dir), "--steps", "4", "--every", "2", "--lrs", "1e-3",
                "--clones", "student", "off", "--max-length", "32", "--train-samples", "32", "--erank-texts", "2",
                "--output-dir", str(out)])
    report = json.loads((out / "results.json").read_text())
    runs = report["runs"]
    assert [(r["init"], r["clone"]) for r in runs] == [("activation", "student"), ("random", "student"),
                                                       ("activation", "off"), ("random", "off")]
    for r in runs:
        assert [h["step"] for h in r["erank_history"]] == [0, 2, 4]
        assert [h["step"] for h in r["spectra"]] == [0, 2, 4]
        assert set(r["spectra"][0]["singular_values"]) == {"embedding", "layer 1 q", "layer 1 down"}
        assert len(r["spectra"][0]["singular_values"]["embedding"]) == 32  # d_S singular values
    red = runs[0]["spectra"][0]["singular_values"]["layer 1 q"]
    assert statistics.fmean(red) == pytest.approx(1.0) and min(red) == pytest.approx(1.0)  # a selection at step 0
    assert "clone/ffn" in runs[0]["losses"][0] and "clone/ffn" not in runs[2]["losses"][0]
    assert "| activation | 0.001 | student |" in (out / "results.md").read_text()
    for name in ("erank_vs_step.png", "spectra_end.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_collapse_alarm_separation_counts_and_threshold_choice():
    bench = load_benchmark("reasoning_retention")
    # two runs kept the teacher's accuracy with a high eRank, two lost it after their eRank fell
    runs = [{"width_ratio": 0.5, "variant": v, "seed": 0, "final": f, "lost": lost,
             "mean": [(0, 1.0), (10, r), (20, r)], "min": [(0, 1.0), (10, 1.0), (20, 1.0)]}
            for v, f, lost, r in (("a", 99, False, 1.1), ("b", 98, False, 0.9), ("c", 60, True, 0.6),
                                  ("d", 40, True, 0.3))]
    at_half = bench.alarm_separation(runs, "mean", 0.5)
    assert (at_half["tp"], at_half["fp"], at_half["fn"], at_half["tn"]) == (1, 0, 1, 2)
    assert at_half["balanced_accuracy"] == pytest.approx(0.75) and at_half["first_steps"] == [None, None, None, 10]
    mean_best, min_best = bench.best_alarms(runs)
    assert mean_best["threshold"] == 0.65 and mean_best["balanced_accuracy"] == 1.0  # lowest perfect threshold
    assert min_best["balanced_accuracy"] == 0.5  # a flat signal separates nothing
    step0_only = [{**r, "mean": [(0, 0.1)] + r["mean"][1:]} for r in runs]  # step 0 never fires the alarm
    assert bench.alarm_separation(step0_only, "mean", 0.5)["fp"] == 0
    text = bench.format_alarms(runs, 0.5)
    assert "| mean eRank / teacher | 0.50 | 1 | 0 | 1 | 2 | 0.75 |" in text


def test_loss_memory_benchmark_runs(capsys):
    bench = load_benchmark("loss_memory")
    assert bench.main(["--lengths", "8", "--vocab", "300", "--width", "8", "--chunk", "4"]) == 0
    table = capsys.readouterr().out
    assert "| logits | 2 x 8 |" in table and "| hidden_states | 2 x 8 |" in table
