"""The SmolLM2 example notebook and script run end to end (tiny settings) and produce their outputs."""

import json
import os
import pathlib

import pytest

pytestmark = pytest.mark.slow
EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
TINY = {"STEPS": 1, "BATCH_SIZE": 2, "MAX_LENGTH": 48, "TRAIN_SAMPLES": 8, "TASKS": ["red_pydoc_mc"], "LIMIT": 2,
        "MAX_GEN_TOKS": 8, "ERANK_TEXTS": 2}


def test_smollm2_notebook_runs_with_tiny_parameters(load_smollm2_teacher, tmp_path, monkeypatch):
    load_smollm2_teacher()  # fills the converted-model cache the notebook loads from
    monkeypatch.setenv("TRANSFORMERS_RED_CACHE", load_smollm2_teacher.cache_dir)
    cells = json.loads((EXAMPLES / "smollm2_red.ipynb").read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    assert code[0].lstrip().startswith("# Parameters")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code[0], "cell 0 (parameters)", "exec"), namespace)
    assert set(TINY) < set(namespace)
    namespace.update(TINY)
    for i, source in enumerate(code[1:], 1):
        exec(compile(source, f"cell {i}", "exec"), namespace)
    assert set(namespace["rows"]) == {"teacher", "RED (activation)", "random init"}
    assert namespace["students"]["activation"].config.hidden_size == 288
    assert any(k.startswith("red_pydoc_mc acc") for k in namespace["rows"]["teacher"])
    assert (tmp_path / "smollm2_erank.png").read_bytes()[:4] == b"\x89PNG"


def test_smollm2_script_writes_results_and_doc_section(load_smollm2_teacher, tmp_path, monkeypatch):
    import importlib.util

    load_smollm2_teacher()
    monkeypatch.setenv("TRANSFORMERS_RED_CACHE", load_smollm2_teacher.cache_dir)
    spec = importlib.util.spec_from_file_location("smollm2_red", EXAMPLES / "smollm2_red.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n")
    out = tmp_path / "out"
    script.main(["--steps", "1", "--batch-size", "2", "--max-length", "48", "--train-samples", "8",
                 "--calibration-samples", "4", "--tasks", "--erank-texts", "2", "--output-dir", str(out),
                 "--update-doc", str(doc), "--inits", "activation"])
    report = json.loads((out / "results.json").read_text())
    assert list(report["models"]) == ["teacher (SmolLM2-135M-Instruct)", "RED (activation init)"]
    assert report["models"]["RED (activation init)"]["hidden_size"] == 288
    text = doc.read_text()
    assert text.startswith("# Results\n") and "<!-- smollm2:begin -->" in text and "| RED (activation init) |" in text
    assert "python examples/smollm2_red.py --steps 1" in text
    for name in ("erank.png", "losses.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
        assert os.path.relpath(out / name, tmp_path) in text
