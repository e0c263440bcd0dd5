"""The benchmarks behind docs/results.md run end to end at tiny sizes (CPU smoke runs; the benchmarks are not
tests)."""

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
    assert bench.main(["--shapes", "2x8", "--vocab", "300", "--width", "8", "--max_gb", "1"]) == 0
    table = capsys.readouterr().out
    for label in bench.LABELS.values():
        assert f"| {label} | 2 x 8 |" in table
    assert "| logits, chunk 1024 (old default) | 2 x 8 | 1024 | 0 |" in table  # 2 x 8 x 300 x 4 B


def test_gpu_suite_tiny_cpu_run_writes_results(tmp_path):
    """benchmarks/gpu_suite.py --tiny: the whole suite at tiny shapes, float32, on the CPU."""
    bench = load_benchmark("gpu_suite")
    assert bench.main(["--tiny", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["tiny"] is True and report["peak_tflops"] > 0 and "6 N_S" in report["flop_count"]
    assert list(report["shapes"]) == ["llama-3b", "smollm2-135m"]
    for name, r in report["shapes"].items():
        assert r["oom_attempts"] == [] and r["batch_size"] == 2 and r["seq_len"] == 64, name
        assert r["teacher_parameters"] > r["student_parameters"] > 0 and r["red_trainable_parameters"] > 0
        assert r["num_items_in_batch"] == 2 * 63
        for method in ("red", "plain"):
            m = r[method]
            assert m["step_s_median"] > 0 and m["step_s_min"] > 0 and len(m["steps_s"]) == 2, (name, method)
            assert m["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / m["step_s_median"])
            assert 0 < m["mfu"] < float("inf") and m["peak_bytes"] > 0 and m["peak_above_start_bytes"] >= 0
            assert m["resident_state_bytes"] > 0
        assert r["red"]["model_flops_per_token"] > r["plain"]["model_flops_per_token"] > 0
        assert r["ratio_red_over_plain_tokens_per_s"] > 0 and 0 < r["ideal_ratio"] < 1
        assert r["target_met"] == (r["ratio_red_over_plain_tokens_per_s"] >= 0.58)
        estimate = r["memory_estimate"]
        if estimate["available"]:
            assert estimate["total_bytes"] > 0 and estimate["trainable_parameters_match"], name
    text = (tmp_path / "results.md").read_text()
    assert "| llama-3b | 2 x 64 |" in text and "| smollm2-135m | 2 x 64 |" in text


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message shown without CUDA")
def test_gpu_suite_without_cuda_and_without_tiny_exits_with_a_message(tmp_path, capsys):
    bench = load_benchmark("gpu_suite")
    assert bench.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_step_overhead_runs_every_phase_with_gkd(tmp_path, grad_accum):
    """benchmarks/step_overhead.py at a tiny batch: a, b, w, c, h (hidden_states), f (forming per forward) and g
    (TRL's GKDTrainer), with and without gradient accumulation (RED then forms its weights once per step)."""
    bench = load_benchmark("step_overhead")
    out = tmp_path / "steps.json"
    assert bench.main(["--models", "tiny", "--batch-size", "2", "--seq-len", "16", "--repeats", "1",
                       "--warmup", "0", "--threads", "1", "--calibration-samples", "2", "--json", str(out),
                       "--grad-accum", str(grad_accum)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert result["grad_accum"] == grad_accum and result["tokens"] == 2 * 16 * grad_accum
    assert set(result["med"]) == {"a", "b", "w", "c", "h", "f", "g"}
    assert all(t > 0 for t in result["med"].values())
    assert set(result["memory"]) == set(result["med"])
    assert all(m["resident"] > 0 for m in result["memory"].values())
    assert result["memory"]["g"]["resident"] > result["memory"]["b"]["resident"]  # GKD also keeps the teacher


def test_reasoner_arms_benchmark_smoke_every_arm_resumes_and_rerenders(tmp_path):
    """benchmarks/reasoner_arms.py at 2 steps on a tiny teacher: every arm measured at steps 0 and 2, a second run
    skips measured arms, other settings are refused, and --from_json re-renders the doc section."""
    bench = load_benchmark("reasoner_arms")
    out = tmp_path / "arms"
    common = ["--teacher", "tiny", "--steps", "2", "--measure_steps", "0", "2", "--problems_per_k", "1",
              "--max_k", "2", "--train_samples", "16", "--generic_texts", "2", "--erank_texts", "2",
              "--max_length", "400", "--output_dir", str(out)]
    bench.main([*common, "--arms", *bench.ARMS])
    report = json.loads((out / "width_0.5" / "results.json").read_text())
    assert list(report["arms"]) == list(bench.ARMS)
    for arm, run in report["arms"].items():
        # the hybrid is also measured where it switches from projections to weights
        assert [r["step"] for r in run["records"]] == ([0, 1, 2] if arm == "hybrid" else [0, 2]), arm
        assert set(run["records"][-1]["exact_match"]) == {"1", "2"} and run["records"][-1]["ppl_generic"] > 0
    before = (out / "width_0.5" / "results.json").read_text()
    bench.main([*common, "--arms", "red"])  # already measured: nothing is rerun
    assert (out / "width_0.5" / "results.json").read_text() == before
    with pytest.raises(SystemExit, match="other settings"):
        bench.main([*common[:3], "3", *common[4:], "--arms", "red"])
    doc = tmp_path / "results.md"
    doc.write_text("# results\n")
    bench.main(["--from_json", str(out), "--update_doc", str(doc)])
    assert "<!-- reasoner_arms:begin -->" in doc.read_text() and "prune and distil" in doc.read_text()


def test_on_policy_benchmark_smoke_every_arm_and_rerender(tmp_path):
    """benchmarks/on_policy.py at 2 steps on the packaged chain teacher: every arm measured, with teacher tokens and
    rollout time, and the tables re-rendered from the JSON into a doc section."""
    bench = load_benchmark("on_policy")
    out = tmp_path / "on_policy"
    bench.main(["--steps", "2", "--measure_every", "2", "--problems_per_k", "1", "--train_samples", "32",
                "--batch_size", "4", "--max_new_tokens", "8", "--output_dir", str(out)])
    report = json.loads((out / "results.json").read_text())
    assert list(report["arms"]) == list(bench.ARMS)
    for arm, run in report["arms"].items():
        (record,) = run["records"]
        assert record["step"] == 2 and record["teacher_tokens"] > 0 and len(record["accuracy"]) == 7, arm
        assert (record["rollout_seconds"] > 0) == (run["overrides"]["lmbda"] == 1.0) or arm == "mixed_red", arm
    doc = tmp_path / "results.md"
    bench.main(["--from_json", str(out / "results.json"), "--update_doc", str(doc)])
    assert "<!-- on_policy:begin -->" in doc.read_text() and "At equal teacher-forward tokens" in doc.read_text()
