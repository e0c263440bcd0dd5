"""Offline evaluation: shipped task data, task YAMLs, evaluate_compressed / cli_eval on a tiny model, cli_erank."""

import hashlib
import importlib.util
import json
import pathlib
import re
import sys

import pytest
import torch

from transformers_red.commands import erank as erank_command
from transformers_red.commands import eval as eval_command
from transformers_red.evaluation import lm_eval as evaluation
from transformers_red.evaluation.lm_eval import DATA_DIR, OFFLINE_TAG, OFFLINE_TASKS, TASKS_DIR
from transformers_red.resources import byte_tokenizer, tiny_teacher

REPO = pathlib.Path(__file__).resolve().parents[1]
HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
needs_lm_eval = pytest.mark.skipif(not HAS_LM_EVAL, reason='lm-eval not installed: pip install -e ".[eval]"')
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")  # GSM8K's strict-match filter


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, notably on shared CPUs (oversubscription); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _make_eval_data():
    spec = importlib.util.spec_from_file_location("make_eval_data", REPO / "scripts" / "make_eval_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _jsonl(name):
    return [json.loads(line) for line in (DATA_DIR / name).read_text(encoding="utf-8").splitlines()]


def _yaml(name):
    import yaml

    return yaml.safe_load((TASKS_DIR / name).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------- data files
def test_data_files_exist_match_manifest_and_are_small():
    manifest = json.loads((DATA_DIR / "manifest.json").read_text(encoding="utf-8"))
    total = 0
    for name, info in manifest["files"].items():
        data = (DATA_DIR / name).read_bytes()
        total += len(data)
        assert hashlib.sha256(data).hexdigest() == info["sha256"], name
        assert len(data.decode().splitlines()) == info["rows"], name
    assert total < 1_000_000
    yaml_files = sorted(p.name for p in TASKS_DIR.glob("*.yaml"))
    assert yaml_files == sorted(f"{t}.yaml" for t in OFFLINE_TASKS)
    for yaml_file in yaml_files:  # every data file a task names is shipped
        for rel in _yaml(yaml_file)["dataset_kwargs"]["data_files"].values():
            assert (TASKS_DIR / rel).is_file() and (TASKS_DIR / rel).name in manifest["files"]


@pytest.mark.parametrize("name", ["gsm_symbolic", "chain_sum"])
def test_gsm_format(name):
    train, test = _jsonl(f"{name}_train.jsonl"), _jsonl(f"{name}_test.jsonl")
    assert (len(train), len(test)) == (20, 200)
    for record in train + test:
        last = record["answer"].splitlines()[-1]
        assert re.fullmatch(r"#### -?[0-9]+", last), record
        assert STRICT.search(record["answer"]).group(1) == last[5:]
        assert not record["question"].endswith("Do not include units.")
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    if name == "gsm_symbolic":  # few-shot examples come from templates the test split never uses
        assert not {r["template"] for r in train} & {r["template"] for r in test}


def test_chain_sum_steps():
    module = _make_eval_data()
    assert module.chain_sum_steps("962 - 706 + 5") == ("962 - 706 = 256\n256 + 5 = 261\n#### 261", 261)
    with pytest.raises(ValueError):
        module.chain_sum_steps("3 * 4")


def test_pydoc_mc_format():
    records = _jsonl("pydoc_mc_test.jsonl") + _jsonl("pydoc_mc_train.jsonl")
    assert len(records) == 220
    for r in records:
        assert len(r["choices"]) == len(set(r["choices"])) == 4
        assert r["choices"][r["gold"]] == r["section"]
    assert len({r["paragraph"] for r in records}) == len(records)
    assert {r["gold"] for r in records} == {0, 1, 2, 3}


def test_generator_is_deterministic():
    pytest.importorskip("reasoning_gym")
    module = _make_eval_data()
    for make in (module.make_gsm_symbolic, module.make_chain_sum, module.make_pydoc_mc):
        first, second = make(seed=7, n_test=6, n_train=3), make(seed=7, n_test=6, n_train=3)
        assert first == second and len(first["test"]) == 6 and len(first["train"]) == 3
        assert make(seed=8, n_test=6, n_train=3) != first


def test_shipped_data_reproduce():
    """Regenerating with the manifest's seed gives the shipped bytes (files whose source version differs are
    skipped: pydoc text changes with the Python minor version, reasoning-gym's generators with its release)."""
    pytest.importorskip("reasoning_gym")
    assert _make_eval_data().check(DATA_DIR) == []


# --------------------------------------------------------------------------------------------- task YAMLs
@needs_lm_eval
def test_shipped_yamls_index(tmp_path):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    assert set(OFFLINE_TASKS) | {OFFLINE_TAG} <= set(manager.all_tasks)


@needs_lm_eval
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # get_task_dict: deprecated in 0.4.13, the API of 0.4.10
def test_every_task_loads(tmp_path):
    from lm_eval.tasks import TaskManager, get_task_dict

    folder = evaluation.export_tasks(tmp_path / "tasks")
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    tasks = get_task_dict(list(OFFLINE_TASKS), manager)
    assert set(tasks) == set(OFFLINE_TASKS)
    for name, task in tasks.items():
        assert len(task.test_docs()) == 200 and len(task.fewshot_docs()) == 20, name
    gsm = tasks["red_gsm_symbolic"]
    assert gsm.config.num_fewshot == 5 and gsm.OUTPUT_TYPE == "generate_until"
    assert [f.name if hasattr(f, "name") else f[0] for f in gsm._filters] == ["strict-match", "flexible-extract"]
    doc = gsm.test_docs()[0]
    assert gsm.doc_to_text(doc).startswith("Question: ") and gsm.doc_to_text(doc).endswith("\nAnswer:")
    mc = tasks["red_pydoc_mc"]
    assert mc.OUTPUT_TYPE == "multiple_choice" and mc.config.num_fewshot == 0
    doc = mc.test_docs()[0]
    assert mc.doc_to_choice(doc) == doc["choices"] and mc.doc_to_target(doc) == doc["gold"]
    # the tag expands to the three tasks
    assert set(get_task_dict([OFFLINE_TAG], manager)) >= set(OFFLINE_TASKS)


def test_export_tasks_makes_data_files_absolute(tmp_path):
    pytest.importorskip("yaml")
    import yaml

    folder = evaluation.export_tasks(tmp_path)
    for name in OFFLINE_TASKS:
        config = yaml.safe_load((folder / f"{name}.yaml").read_text(encoding="utf-8"))
        original = _yaml(f"{name}.yaml")
        for split, path in config["dataset_kwargs"]["data_files"].items():
            assert pathlib.Path(path).is_absolute() and pathlib.Path(path).is_file()
        assert {k: v for k, v in config.items() if k != "dataset_kwargs"} == \
               {k: v for k, v in original.items() if k != "dataset_kwargs"}


# --------------------------------------------------------------------------------------------- evaluate
@needs_lm_eval
def test_evaluate_compressed_tiny_model(one_thread):
    from huggingface_hub import EvalResult, ModelCardData

    result = evaluation.evaluate_compressed(tiny_teacher("llama"), byte_tokenizer(), tasks=[OFFLINE_TAG], limit=2,
                                            batch_size=2, max_gen_toks=8, device="cpu")
    raw = result.results
    assert raw["n-shot"] == {"red_gsm_symbolic": 5, "red_chain_sum": 5, "red_pydoc_mc": 0}
    assert all(raw["n-samples"][t]["effective"] == 2 for t in OFFLINE_TASKS)
    assert all(isinstance(r, EvalResult) for r in result.eval_results)
    names = {(r.task_name, r.metric_name) for r in result.eval_results}
    assert names == {("red_gsm_symbolic", "exact_match (strict-match, 5-shot)"),
                     ("red_gsm_symbolic", "exact_match (flexible-extract, 5-shot)"),
                     ("red_chain_sum", "exact_match (strict-match, 5-shot)"),
                     ("red_chain_sum", "exact_match (flexible-extract, 5-shot)"),
                     ("red_pydoc_mc", "acc (0-shot)"), ("red_pydoc_mc", "acc_norm (0-shot)")}
    for r in result.eval_results:
        assert 0.0 <= r.metric_value <= 1.0 and r.task_type == "text-generation" and r.dataset_split == "test"
        assert r.dataset_args == {"num_fewshot": raw["n-shot"][r.task_name]}
        assert r.metric_args["version"] == raw["versions"][r.task_name] and r.metric_args["limit"] == 2
        assert r.metric_config == (None if r.task_name == "red_pydoc_mc" else r.metric_args["filter"])
        assert r.metric_args["samples"] == 2
        assert r.source_name == "lm-evaluation-harness"
    gsm = next(r for r in result.eval_results if r.task_name == "red_gsm_symbolic")
    assert gsm.dataset_type == "reasoning-gym/gsm_symbolic" and gsm.metric_type == "exact_match"
    assert "strict-match" in result.table and "red_pydoc_mc" in result.table and str(result) == result.table
    assert result.scores["red_pydoc_mc"].keys() == {"acc (0-shot)", "acc_norm (0-shot)"}
    # ready for a model card: ModelCardData turns them into a model-index
    card = ModelCardData(model_name="tiny-red", eval_results=result.eval_results).to_dict()
    assert len(card["model-index"][0]["results"]) == 3
    assert json.loads(result.to_json())["eval_results"][0]["task"]


@needs_lm_eval
def test_group_reports_its_aggregate(tmp_path, one_thread):
    """A group (like lm-eval's mmlu) gives one aggregate row; its subtasks only on request."""
    (tmp_path / "group.yaml").write_text("group: red_test_group\ntask:\n  - red_pydoc_mc\naggregate_metric_list:\n"
                                         "  - metric: acc\n    weight_by_size: true\nmetadata:\n  version: 2.0\n")
    result = evaluation.evaluate_compressed(tiny_teacher("llama"), byte_tokenizer(), tasks=["red_test_group"],
                                            include_path=str(tmp_path), limit=2, batch_size=2, device="cpu")
    assert [(r.task_name, r.metric_name) for r in result.eval_results] == [("red_test_group", "acc (0-shot)")]
    assert result.eval_results[0].metric_args["samples"] == 2
    rows = evaluation.eval_results_from_lm_eval(result.results, include_subtasks=True)
    assert {(r.task_name, r.metric_type) for r in rows} == {("red_test_group", "acc"), ("red_pydoc_mc", "acc"),
                                                            ("red_pydoc_mc", "acc_norm")}


@needs_lm_eval
def test_cli_eval_on_a_folder(tmp_path, one_thread, capsys):
    folder = tmp_path / "student"
    tiny_teacher("llama").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    out, card = tmp_path / "results.json", tmp_path / "card.json"
    assert eval_command.main([str(folder), "--tasks", "red_pydoc_mc", "--limit", "3", "--batch-size", "3",
                                "--device", "cpu", "--output", str(out), "--eval-results", str(card)]) == 0
    printed = capsys.readouterr().out
    assert "acc_norm" in printed and "limit 3" in printed
    saved = json.loads(out.read_text())
    assert saved["lm_eval"]["n-samples"]["red_pydoc_mc"]["effective"] == 3
    rows = json.loads(card.read_text())
    assert {r["metric"] for r in rows} == {"acc", "acc_norm"} and all(r["num_fewshot"] == 0 for r in rows)
    assert all(r["task"] == "red_pydoc_mc" and 0 <= r["value"] <= 1 for r in rows)


@needs_lm_eval
def test_evaluate_compressed_rejects_unmerged_adapter():
    class Wrapper(torch.nn.Module):
        def merge_and_unload(self):
            return None

    with pytest.raises(TypeError, match="merge_and_unload"):
        evaluation.evaluate_compressed(Wrapper(), byte_tokenizer(), tasks=["red_pydoc_mc"], limit=1)


def test_missing_lm_eval_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r"transformers_red\[eval\]"):
        evaluation.evaluate_compressed(tiny_teacher("llama"), byte_tokenizer(), limit=1)
    with pytest.raises(SystemExit, match=r"transformers_red\[eval\]"):
        eval_command.main(["somewhere", "--limit", "1"])


# --------------------------------------------------------------------------------------------- eRank
@pytest.fixture
def two_students(tmp_path):
    folders = []
    for seed, layers in ((0, 2), (1, 3)):
        folder = tmp_path / f"student{seed}"
        tiny_teacher("llama", seed=seed, num_hidden_layers=layers).save_pretrained(folder)
        byte_tokenizer().save_pretrained(folder)
        folders.append(str(folder))
    return folders


def test_cli_erank_table_plot_and_json(two_students, tmp_path, capsys, one_thread):
    pytest.importorskip("matplotlib")
    text = tmp_path / "text.txt"
    text.write_text("First paragraph about lists and tuples.\nStill the first.\n\n\nSecond paragraph: "
                    "dictionaries map keys to values.\n\nThird one, on sets.\n", encoding="utf-8")
    plot, out = tmp_path / "plots" / "erank.png", tmp_path / "erank.json"
    assert erank_command.main([*two_students, "--text", str(text), "--labels", "two", "three",
                                 "--max-length", "32", "--output", str(plot), "--json", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(printed) if line.split()[:3] == ["layer", "two", "three"])
    rows = [line.split() for line in printed[header + 2:header + 7]]
    assert [r[0] for r in rows] == ["emb", "1", "2", "3", "mean"]
    assert len(rows[0]) == 3 and len(rows[3]) == 2  # the 2-layer model has no layer 3
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(out.read_text())
    assert [len(saved["erank"][k]) for k in ("two", "three")] == [3, 4]
    assert saved["num_texts"] == 3
    assert all(1.0 <= v <= 64.0 for values in saved["erank"].values() for v in values)


def test_cli_erank_builtin_without_matplotlib(two_students, tmp_path, capsys, monkeypatch, one_thread):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    plot = tmp_path / "erank.png"
    assert erank_command.main([two_students[0], "--text", "builtin", "--num-texts", "4", "--max-length", "32",
                                 "--output", str(plot)]) == 0
    captured = capsys.readouterr()
    assert "matplotlib" in captured.err and not plot.exists()
    assert [line.split()[0] for line in captured.out.splitlines()[2:]] == ["emb", "1", "2", "mean"]


def test_cli_erank_errors(two_students, tmp_path):
    with pytest.raises(SystemExit, match="labels"):
        erank_command.main([two_students[0], "--labels", "a", "b"])
    with pytest.raises(SystemExit, match="neither a file"):
        erank_command.main([two_students[0], "--text", str(tmp_path / "missing.txt")])
    with pytest.raises(SystemExit, match="Cannot load"):
        erank_command.main([str(tmp_path / "no_model")])
