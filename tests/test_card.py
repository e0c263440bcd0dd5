"""The model card the Hub expects (license, base_model_relation, language, datasets, true provenance, no "None"),
the README's own path (`merge_and_unload().save_pretrained`) published as it is, and what the width buys
(parameters, bytes, KV cache per token, measured speed) on the card and in `transformers-red inspect`.

Publishing runs against the fake Hub (tests/fake_hub.py, the `hub` fixture of conftest.py), with the real
huggingface_hub client.
"""

import json

import datasets
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from test_hub import TOKEN, api_for, red_block
from transformers import AutoModelForCausalLM

from transformers_red import RedAdapterConfig, RedConfig, RedDistillationTrainer, build_model_card, get_red_model
from transformers_red.card import trainer_card_kwargs
from transformers_red.commands import main
from transformers_red.commands import push as push_command
from transformers_red.evaluation.footprint import kv_cache_bytes_per_token, measure_generation_speed
from transformers_red.hub import check_student_folder, push_compressed
from transformers_red.resources import builtin_texts, byte_tokenizer, tiny_teacher

TEACHER = "user/tiny-teacher"  # published on the fake Hub with a card that names its licence and language
TEACHER_CARD = "---\nlicense: llama3.2\nlanguage:\n- en\n- de\nlibrary_name: transformers\n---\n# tiny teacher\n"


@pytest.fixture
def hub_teacher(hub, tmp_path):
    """A tiny Llama teacher published as `TEACHER` (weights, tokenizer, a card with `license: llama3.2`)."""
    folder = tmp_path / "teacher"
    tiny_teacher("llama").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    (folder / "README.md").write_text(TEACHER_CARD)
    api = api_for(hub)
    api.create_repo(TEACHER)
    api.upload_folder(repo_id=TEACHER, folder_path=folder)
    return AutoModelForCausalLM.from_pretrained(TEACHER)  # name_or_path is the repo id; its README is not cached


def readme_student(teacher, tmp_path, texts=4):
    """The README's path: get_red_model, merge_and_unload, save_pretrained (no trainer, no red_summary.json)."""
    red = get_red_model(teacher, RedAdapterConfig(width_ratio=0.5), builtin_texts(texts), byte_tokenizer(),
                        show_progress_bar=False)
    student = red.merge_and_unload()
    folder = tmp_path / "student"
    student.save_pretrained(folder)
    return red, student, folder


def card_text_has_no_none(card) -> str:
    text = str(card)
    assert "None" not in text, [line for line in text.splitlines() if "None" in line]
    return text


def assert_hub_card(card: ModelCard, license: str, language: list[str] | None = None) -> dict:
    meta = card.data.to_dict()
    assert meta["license"] == license and meta["base_model"] == TEACHER and meta["base_model_relation"] == "finetune"
    if language is not None:
        assert meta["language"] == language
    card_text_has_no_none(card)
    return meta["red"]


# --------------------------------------------------------------------------------- the README's path (finding 2)
def test_merged_student_save_pretrained_keeps_its_summary_and_push_dry_run_accepts_it(tmp_path, capsys):
    red, student, folder = readme_student(tiny_teacher("llama"), tmp_path)
    summary = json.loads((folder / "config.json").read_text())["red_summary"]
    assert summary["teacher_hidden_size"] == 64 and summary["student_hidden_size"] == 32
    assert summary["adapter"]["init"] == "activation" and "channel_indices" not in summary["adapter"]
    reloaded = AutoModelForCausalLM.from_pretrained(folder)  # a plain model, no custom code
    assert reloaded.config.red_summary == summary and type(reloaded).__name__ == "LlamaForCausalLM"
    assert check_student_folder(folder) == folder
    assert push_command.main([str(folder), "me/student", "--dry_run", "--license", "apache-2.0"]) == 0
    printed = capsys.readouterr().out
    card = ModelCard(printed[printed.index("---\n"):])  # after the progress bars
    block = red_block(card)
    assert card.data.license == "apache-2.0"
    assert (block["teacher_hidden_size"], block["student_hidden_size"], block["init"]) == (64, 32, "activation")
    assert block["calibration"]["num_texts"] == 4 and block["global_step"] is None
    assert "not recorded" in printed and "None" not in printed
    # saved again after a reload (or by a Trainer, or push_to_hub): the summary travels in config.json
    reloaded.save_pretrained(tmp_path / "again")
    assert check_student_folder(tmp_path / "again") and red_block(build_model_card(tmp_path / "again"))["init"]


def test_readme_path_publishes_with_license_relation_and_true_values(hub, hub_teacher, tmp_path):
    red, student, folder = readme_student(hub_teacher, tmp_path)
    url = push_compressed(folder, "user/readme-student", api=api_for(hub), token=TOKEN)
    assert "user/readme-student" in url
    card = ModelCard.load("user/readme-student")
    block = assert_hub_card(card, "llama3.2", ["en", "de"])  # inherited from the teacher's card on the Hub
    assert block["teacher"] == TEACHER and block["init"] == "activation"
    assert block["calibration"]["num_texts"] == 4
    assert block["teacher_parameters"] == tiny_teacher("llama").num_parameters()
    loaded = AutoModelForCausalLM.from_pretrained("user/readme-student")
    assert loaded.config.hidden_size == 32 and loaded.config.red_summary["student_hidden_size"] == 32


def test_student_of_a_red_student_does_not_inherit_its_summary(tmp_path):
    _, student, _ = readme_student(tiny_teacher("llama"), tmp_path)
    red = get_red_model(student, RedAdapterConfig(width_ratio=0.5, init="random"), show_progress_bar=False)
    grandchild = red.merge_and_unload()
    assert grandchild.config.red_summary["teacher_hidden_size"] == 32
    assert grandchild.config.red_summary["adapter"]["init"] == "random"


# ----------------------------------------------------------------------- the card the Hub expects (finding 1)
def test_push_compressed_in_memory_carries_license_relation_and_language(hub, hub_teacher):
    red = get_red_model(hub_teacher, RedAdapterConfig(width_ratio=0.5), builtin_texts(4), byte_tokenizer(),
                        show_progress_bar=False)
    push_compressed(red, "user/merged", api=api_for(hub), merge=True, tokenizer=byte_tokenizer(), license="mit",
                    language="fr", datasets=["some/corpus"])
    card = ModelCard.load("user/merged")
    block = assert_hub_card(card, "mit", ["fr"])  # explicit arguments win over the teacher's card
    assert card.data.datasets == ["some/corpus"] and block["teacher_hidden_size"] == 64


def test_adapter_repo_card_says_adapter_and_inherits_the_license(hub, hub_teacher):
    red = get_red_model(hub_teacher, RedAdapterConfig(width_ratio=0.5), builtin_texts(4), byte_tokenizer(),
                        show_progress_bar=False)
    red.push_to_hub("user/adapter", api=api_for(hub), token=TOKEN)
    meta = ModelCard.load("user/adapter").data.to_dict()
    assert meta["base_model"] == TEACHER and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "transformers_red" and meta["license"] == "llama3.2"
    red.push_to_hub("user/adapter", api=api_for(hub), token=TOKEN, license="apache-2.0")
    assert ModelCard.load("user/adapter").data.license == "apache-2.0"


def trainer_for(teacher, tmp_path, texts, **overrides):
    args = RedConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, max_length=48,
                     report_to=[], save_strategy="no", use_cpu=True, learning_rate=1e-2, disable_tqdm=True,
                     erank_steps=0, **overrides)
    return RedDistillationTrainer(model=teacher, args=args, processing_class=byte_tokenizer(),
                                  train_dataset=datasets.Dataset.from_dict({"text": builtin_texts(texts)}))


def test_trainer_cards_carry_license_relation_and_true_calibration(hub, hub_teacher, tmp_path, monkeypatch):
    """4 training texts, calibration_num_samples=15 (the default): the card says 4 texts, and how many tokens."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    trainer = trainer_for(TEACHER, tmp_path, 4, hub_model_id="user/trained")
    trainer.train()
    tokens = sum(min(len(byte_tokenizer()(t).input_ids), 2048) for t in builtin_texts(4))
    config = trainer.red_model.red_config
    assert (config.calibration_num_samples, config.calibration_num_texts, config.calibration_num_tokens) == \
        (15, 4, tokens)
    trainer.create_model_card(license="mit")
    local = ModelCard.load(tmp_path / "run" / "README.md")
    assert local.data.license == "mit" and red_block(local)["calibration"]["num_texts"] == 4
    card_text_has_no_none(local)
    trainer.push_to_hub(license="apache-2.0", language="en", finetuned_from=TEACHER, tags="my-run",
                        dataset_name="openai/gsm8k")
    card = ModelCard.load("user/trained")
    block = assert_hub_card(card, "apache-2.0", ["en"])
    assert card.data.datasets == ["openai/gsm8k"] and "my-run" in card.data.tags
    assert block["calibration"] == {"source": "first 4 texts of train_dataset", "num_texts": 4, "num_tokens": tokens}
    assert block["global_step"] == 2 and block["tokens_trained"] > 0
    assert "2 training steps" in str(card)
    # without a licence argument: the teacher's card on the Hub gives it
    trainer.save_model(str(tmp_path / "export"))
    push_compressed(tmp_path / "export", "user/exported", api=api_for(hub))
    assert_hub_card(ModelCard.load("user/exported"), "llama3.2", ["en", "de"])
    assert build_model_card(tmp_path / "export").data.license == "llama3.2"  # now in the local Hub cache


def test_trls_card_arguments_map_to_the_red_card():
    assert trainer_card_kwargs({"finetuned_from": "a/b", "license": "mit", "language": "en", "tags": "x",
                                "dataset_tags": "d/one", "dataset_name": "d/two", "model_name": "n", "tasks": "t",
                                "dataset_args": "c", "eval_results": []}) == {
        "teacher_name_or_path": "a/b", "license": "mit", "language": ["en"], "tags": ["x"], "datasets": ["d/one"],
        "eval_results": []}
    assert trainer_card_kwargs({"dataset_name": ["a", "b"], "datasets": ["c"]}) == {"datasets": ["c"]}


@pytest.mark.parametrize("source", ["plain_model", "config_only", "random_init"])
def test_no_card_body_prints_none(tmp_path, source):
    if source == "plain_model":  # allow_plain_model: nothing recorded
        tiny_teacher("llama").save_pretrained(tmp_path / "plain")
        card = build_model_card(tmp_path / "plain")
        assert red_block(card)["recorded"] is False and "Nothing recorded" in str(card)
    elif source == "config_only":  # the trainer's card before any export: a config, no summary
        card = build_model_card(tiny_teacher("llama").config.to_dict())
    else:  # no calibration at all
        red = get_red_model(tiny_teacher("llama"), RedAdapterConfig(width_ratio=0.5, init="random"),
                            show_progress_bar=False)
        card = build_model_card(red.merge_and_unload())
        assert red_block(card)["calibration"] is None
    card_text_has_no_none(card)


# ------------------------------------------------------------------------------ what the width buys (finding 3)
def cache_bytes_per_token(model, tokens: int = 10) -> int:
    """The KV cache a real forward fills, per token."""
    with torch.no_grad():
        cache = model(torch.arange(tokens)[None], use_cache=True).past_key_values
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers) // tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_width_payoff_on_the_card_matches_the_models(tmp_path, dtype):
    red, student, folder = readme_student(tiny_teacher("llama", tie_word_embeddings=False).to(dtype), tmp_path)
    teacher = red.unload()
    red = red_block(build_model_card(folder))
    weights = load_file(folder / "model.safetensors")
    file_bytes = (folder / "model.safetensors").stat().st_size
    name = str(dtype).removeprefix("torch.")
    assert red["weights_dtype"] == name
    assert red["student_parameters"] == student.num_parameters() == sum(t.numel() for t in weights.values())
    assert red["student_weight_bytes"] == sum(t.nbytes for t in weights.values()) <= file_bytes
    assert file_bytes - red["student_weight_bytes"] < 16_384  # the safetensors header
    assert red["teacher_parameters"] == teacher.num_parameters()
    assert red["teacher_weight_bytes"] == sum(p.nbytes for p in teacher.parameters())
    kv = red["kv_cache_bytes_per_token"]
    assert kv["student"] == cache_bytes_per_token(student) == kv["teacher"] == cache_bytes_per_token(teacher)
    assert kv["teacher"] == 2 * 2 * 2 * 16 * torch.empty((), dtype=dtype).element_size()  # layers, K/V, heads, dim
    assert kv_cache_bytes_per_token(teacher.config, dtype) == kv["teacher"]
    text = str(build_model_card(folder))
    assert "KV cache per token is the teacher's" in text and "2 layers x 2 KV heads x head_dim 16" in text


def test_measured_speed_reaches_the_card(tmp_path, capsys):
    teacher_folder = tmp_path / "teacher"
    teacher = tiny_teacher("llama", num_hidden_layers=4)
    teacher.save_pretrained(teacher_folder)
    _, student, folder = readme_student(AutoModelForCausalLM.from_pretrained(teacher_folder), tmp_path)
    speed = measure_generation_speed(student, teacher, prompt_tokens=4, new_tokens=4, repeats=1)
    rate = speed["tokens_per_second"]
    assert rate["teacher"] > 0 and rate["student"] > 0
    assert speed["speedup"] == round(rate["student"] / rate["teacher"], 3) and speed["new_tokens"] == 4
    with pytest.raises(ValueError, match="new_tokens must be a positive integer"):
        measure_generation_speed(student, teacher, new_tokens=0)
    # the CLI: the recorded teacher (the folder it was loaded from) is measured against the student
    assert push_command.main([str(folder), "me/student", "--dry_run", "--measure_speed"]) == 0
    printed = capsys.readouterr().out
    measured = red_block(ModelCard(printed[printed.index("---\n"):]))["generation_speed"]
    assert measured["tokens_per_second"]["student"] > 0 and "generation, tokens/s (measured)" in printed
    assert "None" not in printed
    with pytest.raises(SystemExit, match="has hidden_size 32, but the student was distilled from a teacher of "
                                         "width 64"):
        push_command.main([str(folder), "me/student", "--dry_run", "--measure_speed", "--teacher", str(folder)])


def test_inspect_reports_params_bytes_and_kv_cache(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["inspect", "--quiet", "--eval_texts", "2", "--calibration_samples", "2", "--max_length", "32",
                 "--inits", "activation", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    teacher, student = report["teacher"], report["students"]["activation"]
    assert teacher["weight_bytes"] == teacher["parameters"] * 4
    assert student["weight_bytes"] == student["parameters"] * 4
    assert teacher["kv_cache_bytes_per_token"] == student["kv_cache_bytes_per_token"] == 2 * 4 * 2 * 16 * 4
    assert "KV cache/token (B)" in printed and "weights (MB)" in printed and "so it is the teacher's" in printed


def test_llamacpp_benchmark_reads_llama_bench_and_prints_the_ratios(tmp_path):
    """benchmarks/export_llamacpp.py needs llama.cpp to run; its parsing and table are checked on llama-bench's
    JSON records (the numbers measured on SmolLM2-135M at half width, f32, 2 threads)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "export_llamacpp.py"
    spec = importlib.util.spec_from_file_location("export_llamacpp", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    records = [{"model_filename": f"/x/{name}-f32.gguf", "n_prompt": p, "n_gen": g, "avg_ts": ts}
               for name, p, g, ts in [("teacher", 512, 0, 300.0), ("teacher", 0, 128, 40.0),
                                      ("student", 512, 0, 516.0), ("student", 0, 128, 70.8)]]
    rows = {name: {"gguf_bytes": size, **bench.speeds(records, pathlib.Path(f"{name}-f32.gguf"))}
            for name, size in (("teacher", 540_000_000), ("student", 271_000_000))}
    assert rows["student"] == {"gguf_bytes": 271_000_000, "prompt": 516.0, "generation": 70.8}
    text = bench.table(rows)
    assert "| student | 271 | 516.0 (1.72x) | 70.8 (1.77x) |" in text and "| teacher | 540 | 300.0 | 40.0 |" in text
    with pytest.raises(SystemExit, match="has no config.json"):
        bench.main(["--llama_cpp", str(tmp_path), "--teacher", str(tmp_path), "--student", str(tmp_path)])
