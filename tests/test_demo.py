"""The demo end to end in a reduced mode: table, results.json and the three plots."""

import json

import pytest

from transformers_red.demo.run import format_demo, run_demo


def test_demo_reduced_mode(tmp_path):
    report = run_demo(output_dir=str(tmp_path), steps=2, eval_per_hop=2, train_samples=64, batch_size=8,
                      variants=("red", "lrc40"), step0=True, show_progress=False)
    table = format_demo(report)
    assert "teacher" in table and "RED (activation, tau=1)" in table and "LRC (random, tau=40)" in table
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [s["init"] for s in saved["students"]] == ["activation", "random"]
    assert set(saved["teacher"]["accuracy"]) == {str(h) for h in range(7)}
    red = saved["students"][0]
    assert red["student_hidden_size"] == saved["teacher"]["hidden_size"] // 2
    assert red["spectrum_init"]["min"] > 0.999 and red["spectrum_init"]["max"] < 1.001  # selection matrices
    assert "step0" in red and len(red["erank"]) == len(saved["teacher"]["erank"])
    assert [h["step"] for h in red["erank_history"]] == [0, 1, 2]  # every max(1, steps // 10) steps
    assert red["erank_teacher"] == pytest.approx(saved["teacher"]["erank"], rel=1e-5)
    for name in ("accuracy_per_hop.png", "erank_per_layer.png", "projection_spectra.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_update_marked_section_replaces_only_its_own_section(tmp_path):
    from transformers_red.records import update_marked_section

    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nintro\n")
    update_marked_section(doc, "a", "first A")
    update_marked_section(doc, "b", "first B")
    update_marked_section(doc, "a", "second A\nwith two lines")
    text = doc.read_text()
    assert text.startswith("# Results\n\nintro\n")
    assert "second A\nwith two lines" in text and "first A" not in text and "first B" in text
    assert text.index("<!-- a:begin -->") < text.index("<!-- b:begin -->")
    update_marked_section(tmp_path / "new.md", "a", "x")
    assert (tmp_path / "new.md").read_text() == "<!-- a:begin -->\nx\n<!-- a:end -->\n"


def test_demo_on_another_teacher_folder_and_user_text(tmp_path):
    import shutil

    from transformers_red.demo.chain_task import generate_mixed_problems, reasoning_teacher_dir

    teacher = tmp_path / "my_teacher"
    shutil.copytree(reasoning_teacher_dir(), teacher)
    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(p.text for p in generate_mixed_problems(80, seed=5)))
    report = run_demo(teacher_dir=str(teacher), data=str(data), output_dir=str(tmp_path / "out"), steps=1,
                      eval_per_hop=1, train_samples=80, batch_size=8, variants=("red",), plots=False,
                      show_progress=False)
    assert report["settings"]["data"] == str(data)
    assert report["students"][0]["student_hidden_size"] == 64
    assert len(report["students"][0]["erank"]) == len(report["teacher"]["erank"])
    assert (tmp_path / "out" / "results.json").exists() and not (tmp_path / "out" / "accuracy_per_hop.png").exists()


def test_demo_distils_generated_problems_on_their_completions_only(tmp_path, monkeypatch):
    import transformers_red.demo.run as demo
    from transformers_red.demo.chain_task import END_MARKER, generate_mixed_problems

    problems = generate_mixed_problems(3, seed=0)
    columns = demo.completion_columns(problems)
    assert columns == {"prompt": [p.prompt for p in problems], "completion": [p.target + END_MARKER for p in problems]}
    assert [a + b for a, b in zip(columns["prompt"], columns["completion"])] == [p.text for p in problems]
    seen = []
    real = demo.distil_variant
    monkeypatch.setattr(demo, "distil_variant",
                        lambda variant, **kw: seen.append(kw["train_data"]) or real(variant, **kw))
    run_demo(output_dir=str(tmp_path), steps=1, eval_per_hop=1, train_samples=16, batch_size=8, variants=("red",),
             plots=False, show_progress=False)
    assert set(seen[0]) == {"prompt", "completion"} and len(seen[0]["prompt"]) == 16
