"""Publishing a student: the model card, and `push_compressed` against a local fake Hub (tests/fake_hub.py).

The real `huggingface_hub` client runs unmodified (no HfApi method is mocked) against an HTTP server on
127.0.0.1; nothing leaves the machine. `ModelCard.validate()` is never called (it posts to a fixed public URL).
"""

import contextlib
import hashlib
import json
import logging
import os
import shutil

import datasets
import huggingface_hub.hf_api
import pytest
import torch
from huggingface_hub import EvalResult, HfApi, ModelCard, constants, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from transformers_red import RedAdapterConfig, RedConfig, RedDistillationTrainer, get_red_model
from transformers_red.commands import push as push_command
from transformers_red.hub import (
    CARD_ERANK_NAME,
    HubPushError,
    build_model_card,
    count_parameters,
    push_compressed,
)
from transformers_red.resources import builtin_texts, byte_tokenizer, tiny_teacher

TOKEN = "hf_fakeTOKEN0123456789secret"
REPO = "user/tiny-red"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def student_folder(tmp_path_factory):
    """A real trainer export: 2 RED steps on a tiny Llama, then `save_model` (merged student + red files)."""
    out = tmp_path_factory.mktemp("hub") / "student"
    args = RedConfig(output_dir=str(out.parent / "run"), max_steps=2, per_device_train_batch_size=4, max_length=48,
                     report_to=[], save_strategy="no", use_cpu=True, seed=0, learning_rate=1e-2,
                     calibration_num_samples=8, erank_steps=1, erank_num_samples=2, disable_tqdm=True)
    trainer = RedDistillationTrainer(model=tiny_teacher("llama"), args=args, processing_class=byte_tokenizer(),
                                     train_dataset=datasets.Dataset.from_dict({"text": builtin_texts(32)}))
    trainer.train()
    trainer.save_model(str(out))
    return out


def folder_digest(folder) -> str:
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, folder).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


@contextlib.contextmanager
def every_log_record():
    """All records at DEBUG and above of the libraries involved (transformers' and the Hub's loggers do not
    propagate to the root logger, so caplog alone would miss them)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("", "huggingface_hub", "transformers", "transformers_red",
                                                     "httpx2", "httpcore2")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)


def red_block(card: ModelCard) -> dict:
    return card.data.to_dict()["red"]


def api_for(hub) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=TOKEN)


# -------------------------------------------------------------------------------------------- model card
def test_card_from_trainer_folder(student_folder):
    summary = json.loads((student_folder / "red_summary.json").read_text())
    erank = json.loads((student_folder / "erank.json").read_text())
    results = [{"task": "gsm8k", "metric": "exact_match", "value": 0.125, "split": "test", "num_fewshot": 5,
                "name": "exact_match (strict-match, 5-shot)", "metric_config": "strict-match",  # as `eval` writes
                "metric_args": {"stderr": 0.01}, "source_name": "lm-evaluation-harness",
                "source_url": "https://github.com/EleutherAI/lm-evaluation-harness"},
               EvalResult(task_type="text-generation", dataset_type="hellaswag", dataset_name="HellaSwag",
                          metric_type="acc_norm", metric_value=0.31)]
    card = build_model_card(student_folder, teacher_name_or_path=SMOLLM2, eval_results=results,
                            datasets=["some/corpus"], erank_text="2 Python doc paragraphs")
    meta = card.data.to_dict()
    assert meta["base_model"] == SMOLLM2 and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation" and meta["datasets"] == ["some/corpus"]
    assert {"transformers_red", "red", "distillation", "width-pruning"} <= set(meta["tags"])
    red = meta["red"]
    assert (red["teacher_hidden_size"], red["student_hidden_size"], red["width_ratio"]) == (64, 32, 0.5)
    teacher = tiny_teacher("llama")
    assert red["teacher_parameters"] == teacher.num_parameters()
    student = AutoModelForCausalLM.from_pretrained(student_folder)
    assert red["student_parameters"] == student.num_parameters() < red["teacher_parameters"]
    assert red["parameter_ratio"] == round(red["student_parameters"] / red["teacher_parameters"], 4)
    assert red["init"] == "activation" and red["norm_init"] == "teacher"
    assert red["calibration"] == {"source": "first 8 texts of train_dataset", "num_texts": 8,
                                  "num_tokens": summary["adapter"]["calibration_num_tokens"]}
    assert red["distillation"]["temperature"] == summary["distillation"]["temperature"]
    assert red["distillation"]["kd_weight"] == summary["distillation"]["kd_weight"]
    # the card, the summary and the resume identity read one list of loss settings
    from transformers_red.constants import LOSS_SETTINGS

    assert set(red["distillation"]) == set(LOSS_SETTINGS) <= set(summary["distillation"])
    assert red["global_step"] == 2 and red["tokens_trained"] == summary["tokens_trained"] > 0
    last = erank["history"][-1]
    assert red["erank"]["student_mean"] == round(last["mean"], 4)
    assert red["erank"]["student_min_layer"] == last["min_layer"] and red["erank"]["step"] == 2
    assert red["erank"]["measured_on"] == "2 Python doc paragraphs"
    assert red["library_version"] and red["paper"] == "arXiv:2605.29327"
    index = meta["model-index"][0]["results"]
    assert index[0]["metrics"][0] == {"type": "exact_match", "value": 0.125, "name": "exact_match (strict-match, "
                                      "5-shot)", "config": "strict-match", "args": {"stderr": 0.01}}
    assert index[0]["dataset"]["args"] == {"num_fewshot": 5}
    assert index[0]["dataset"]["split"] == "test" and index[1]["metrics"][0]["value"] == 0.31
    text = str(card)
    assert "AutoModelForCausalLM.from_pretrained" in text and "2605.29327" in text
    assert "transformers-red eval" in text
    assert red_block(ModelCard(text)) == red  # the front matter parses back to the same values


def test_card_overrides_and_non_hub_teacher(student_folder, tmp_path):
    card = build_model_card(student_folder, teacher_name_or_path=str(tmp_path),  # a local path: no base_model
                            red_summary={"teacher_hidden_size": 128}, erank={}, library_version="9.9")
    meta = card.data.to_dict()
    assert "base_model" not in meta and meta["red"]["teacher"] == str(tmp_path)
    assert meta["red"]["teacher_hidden_size"] == 128 and meta["red"]["erank"] is None
    assert meta["red"]["library_version"] == "9.9" and "model-index" not in meta
    assert count_parameters({"model_type": "no-such-arch"}) is None
    summary = {**json.loads((student_folder / "red_summary.json").read_text()), "erank_source": "eval_dataset"}
    assert red_block(build_model_card(student_folder, red_summary=summary))["erank"]["measured_on"] == "eval_dataset"


# ---------------------------------------------------------------------------------------------- pushing
def test_push_offline_says_so(student_folder):
    assert constants.HF_HUB_OFFLINE  # conftest: the test session is offline
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE is set"):
        push_compressed(student_folder, REPO, token=TOKEN)


@pytest.mark.parametrize("hub", ["regular", "pipelined"], indirect=True)
def test_push_and_load_back(hub, student_folder):
    before = folder_digest(student_folder)
    with every_log_record() as records:
        url = push_compressed(student_folder, REPO, api=api_for(hub), erank_text="held-out docs",
                              teacher_name_or_path=SMOLLM2,
                              eval_results=[{"task": "gsm8k", "metric": "exact_match", "value": 0.0}])
    assert url.startswith(f"{hub.endpoint}/{REPO}/commit/")
    assert folder_digest(student_folder) == before
    assert hub.unknown == []
    writes = [r for r in hub.requests if r.method == "POST"]
    assert writes and all(r.authorization == f"Bearer {TOKEN}" for r in writes)
    files = hub.files(REPO)
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md",
            "red_summary.json", "erank.json", CARD_ERANK_NAME} <= set(files)

    # load back by repo id, as a user would (anonymous: the repo is public)
    with every_log_record() as more_records:
        model = AutoModelForCausalLM.from_pretrained(REPO)
    local = load_file(student_folder / "model.safetensors")
    state = model.state_dict()
    for name, tensor in local.items():
        assert torch.equal(state[name], tensor), name
    assert model.config.hidden_size == 32
    card = ModelCard.load(REPO)
    red = red_block(card)
    assert card.data.base_model == SMOLLM2 and red["student_hidden_size"] == 32
    assert red["erank"]["measured_on"] == "held-out docs" and red["erank"]["per_layer"] == CARD_ERANK_NAME
    per_layer = json.loads(open(hf_hub_download(REPO, CARD_ERANK_NAME)).read())
    erank = json.loads((student_folder / "erank.json").read_text())
    assert per_layer["teacher"] == erank["teacher"] and per_layer["student"] == erank["history"][-1]["student"]
    assert per_layer["measured_on"] == "held-out docs"

    # the token is nowhere: not in the upload, not in a log record, not on disk
    assert not any(TOKEN.encode() in content for content in files.values())
    logged = [logging.Formatter().format(record) for record in records + more_records]
    assert any("/preupload/" in line for line in logged)  # the capture works: the client logs its requests
    assert not any(TOKEN in line for line in logged)
    for root, _, names in os.walk(hub.home):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                assert TOKEN.encode() not in f.read(), name


def test_push_again_is_a_no_op_and_stale_weights_go(hub, student_folder):
    api = api_for(hub)
    api.create_repo(REPO)
    api.upload_file(path_or_fileobj=b"stale", path_in_repo="model-00001-of-00002.safetensors", repo_id=REPO)
    push_compressed(student_folder, REPO, api=api)
    assert "model-00001-of-00002.safetensors" not in hub.files(REPO)
    commits = len(hub.repos[REPO].commits)
    url = push_compressed(student_folder, REPO, api=api)  # same content: the client skips every file
    assert len(hub.repos[REPO].commits) == commits and url.endswith(hub.repos[REPO].head.sha)


def test_push_without_namespace_names_the_full_id(hub, student_folder):
    url = push_compressed(student_folder, "tiny-red", api=api_for(hub))
    assert url.startswith(f"{hub.endpoint}/{REPO}/commit/")
    assert b'from_pretrained("user/tiny-red")' in hub.files(REPO)["README.md"]


def test_push_skips_trainer_state_and_subfolders(hub, student_folder, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(student_folder, folder)
    (folder / "training_args.bin").write_bytes(b"pickled args with hub_token=" + TOKEN.encode())
    (folder / "checkpoint-1").mkdir()
    (folder / "checkpoint-1" / "red_adapter_model.safetensors").write_bytes(b"adapter")
    (folder / "README.md").write_text("an old card")
    push_compressed(folder, REPO, api=api_for(hub), token=TOKEN)
    files = hub.files(REPO)
    assert "training_args.bin" not in files and not any(p.startswith("checkpoint-") for p in files)
    assert files["README.md"].startswith(b"---\n")
    (folder / "chat_template.jinja").write_text(f"{{# {TOKEN} #}}")  # a student file the export did not write
    with pytest.raises(ValueError, match="chat_template.jinja contains the Hub token"):
        push_compressed(folder, "user/other", api=api_for(hub), token=TOKEN)
    assert "user/other" not in hub.repos


def test_push_in_memory_models(hub, tokenizer, input_ids):
    red = get_red_model(tiny_teacher("llama"), RedAdapterConfig(width_ratio=0.5), builtin_texts(8), tokenizer,
                        show_progress_bar=False)
    push_compressed(red, "user/from-red", api=api_for(hub), merge=True, tokenizer=tokenizer)
    push_compressed(red.merge_and_unload(), "user/merged", api=api_for(hub), tokenizer=tokenizer)
    for repo in ("user/from-red", "user/merged"):
        student = AutoModelForCausalLM.from_pretrained(repo).eval()
        with torch.no_grad():
            torch.testing.assert_close(student(input_ids).logits, red(input_ids).logits, rtol=0, atol=1e-5)
        assert "tokenizer.json" in hub.files(repo)
    assert red_block(ModelCard.load("user/from-red"))["teacher_hidden_size"] == 64
    assert red_block(ModelCard.load("user/merged"))["teacher_hidden_size"] == 64  # merge_and_unload records it
    assert red_block(ModelCard.load("user/merged"))["init"] == "activation"


def test_bad_input_fails_before_any_request(hub, tmp_path, tokenizer):
    red = get_red_model(tiny_teacher("llama"), RedAdapterConfig(width_ratio=0.5), builtin_texts(8), tokenizer,
                        show_progress_bar=False)
    adapter = tmp_path / "adapter"
    red.save_pretrained(adapter)  # a RED checkpoint: projections, not a model
    (tmp_path / "empty").mkdir()
    bin_only = tmp_path / "bin"
    bin_only.mkdir()
    (bin_only / "pytorch_model.bin").write_bytes(b"x")
    cases = [(adapter, "adapter checkpoint"), (tmp_path / "empty", "is empty"), (tmp_path / "nope", "not a folder"),
             (bin_only, "only PyTorch .bin"), (red, r"call merge_and_unload\(\) first")]
    for source, match in cases:
        with pytest.raises(ValueError, match=match):
            push_compressed(source, REPO, api=api_for(hub), token=TOKEN)
    with pytest.raises(TypeError, match="Expected a student folder"):
        push_compressed(object(), REPO, api=api_for(hub))
    with pytest.raises(Exception, match="Repo id"):
        push_compressed(adapter, "not/a/repo", api=api_for(hub))
    assert hub.requests == []


def test_failed_upload_raises_clearly_and_keeps_the_folder(hub, student_folder):
    before = folder_digest(student_folder)
    hub.fail_commits = 1
    with pytest.raises(HubPushError) as info:
        push_compressed(student_folder, REPO, api=api_for(hub))
    message = str(info.value)
    assert REPO in message and "HTTP 500" in message and "push again" in message and "Nothing local" in message
    assert isinstance(info.value.__cause__, HfHubHTTPError) and TOKEN not in message
    assert folder_digest(student_folder) == before
    assert set(hub.files(REPO)) == {".gitattributes"}  # the repo exists, nothing was committed
    push_compressed(student_folder, REPO, api=api_for(hub))  # and pushing again works
    assert "model.safetensors" in hub.files(REPO)


def test_private_repo_needs_the_token(hub, student_folder):
    push_compressed(student_folder, REPO, api=api_for(hub), private=True)
    assert hub.repos[REPO].private
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(REPO)
    assert AutoModelForCausalLM.from_pretrained(REPO, token=TOKEN).config.hidden_size == 32


def test_push_command(hub, student_folder, tmp_path, monkeypatch, capsys):
    results = tmp_path / "results.json"  # as `transformers-red eval --output` writes it
    card_results = [{"task": "arc_easy", "metric": "acc", "value": 0.4}]
    results.write_text(json.dumps({"table": "", "eval_results": card_results}))
    assert push_command.main([str(student_folder), REPO, "--dry-run", "--teacher", SMOLLM2,
                              "--eval-results", str(results)]) == 0  # dashed spellings still work
    printed = capsys.readouterr().out
    assert "red:" in printed and "arc_easy" in printed and hub.requests == []
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # how the CLI gets a token: never a flag
    assert push_command.main([str(student_folder), REPO]) == 0
    assert "pushed" in capsys.readouterr().out and "model.safetensors" in hub.files(REPO)
    with pytest.raises(SystemExit, match="no model.safetensors"):
        push_command.main([str(tmp_path), "user/x"])


def test_fake_hub_speaks_the_client_protocol(hub):
    """The endpoints other tests rely on, through the real client: listing, paths-info, errors, whoami."""
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    api = api_for(hub)
    assert api.whoami()["name"] == "user"
    repo = api.create_repo("tiny")  # no namespace: the token's user
    assert repo.repo_id == "user/tiny"
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="sub/dir/a.json", repo_id="user/tiny")
    info = api.model_info("user/tiny")
    assert {s.rfilename for s in info.siblings} == {".gitattributes", "sub/dir/a.json"}
    assert api.model_info("user/tiny", revision=info.sha).sha == info.sha
    assert [e.path for e in api.list_repo_tree("user/tiny")] == ["sub", ".gitattributes"]
    assert api.list_repo_files("user/tiny") == [".gitattributes", "sub/dir/a.json"]
    (entry,) = api.get_paths_info("user/tiny", ["sub/dir/a.json", "missing"])
    assert entry.size == 2 and api.file_exists("user/tiny", "sub/dir/a.json")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("user/tiny", "missing.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("user/tiny", "sub/dir/a.json", revision="f" * 40)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("user/none")
    assert hub.unknown == []


# ----------------------------------------------------------------------- what a push uploads
def leaky_folder(student_folder, tmp_path):
    folder = tmp_path / "leaky"
    shutil.copytree(student_folder, folder)
    for name in ("train_config.yaml", "notes.txt", "run.py"):  # not student files: stay local
        (folder / name).write_text(f"hub_token: {TOKEN}\n")
    return folder


def no_token_uploaded(hub, repo):
    files = hub.files(repo)
    assert files and not [n for n, content in files.items() if TOKEN.encode() in content]
    return files


@pytest.mark.parametrize("source", ["cli_env", "cli_stored_login", "api_token"])
def test_push_uploads_student_files_only_and_never_the_token(hub, student_folder, tmp_path, monkeypatch, source):
    folder = leaky_folder(student_folder, tmp_path)
    if source == "cli_env":
        monkeypatch.setenv("HF_TOKEN", TOKEN)
    elif source == "cli_stored_login":
        (hub.home / "token").parent.mkdir(parents=True, exist_ok=True)
        (hub.home / "token").write_text(TOKEN)  # what `hf auth login` stores
    if source == "api_token":
        push_compressed(folder, REPO, api=HfApi(endpoint=hub.endpoint), token=TOKEN)
    else:
        assert push_command.main([str(folder), REPO]) == 0
    files = no_token_uploaded(hub, REPO)
    assert not {"train_config.yaml", "notes.txt", "run.py"} & set(files)
    assert {"config.json", "model.safetensors", "red_summary.json", "README.md"} <= set(files)
    # a student file holding the token is refused, whichever way the token reaches the client
    (folder / "chat_template.jinja").write_text(f"{{# {TOKEN} #}}")
    with pytest.raises((ValueError, SystemExit), match="chat_template.jinja contains the Hub token"):
        if source == "api_token":
            push_compressed(folder, "user/other", api=HfApi(endpoint=hub.endpoint), token=TOKEN)
        else:
            push_command.main([str(folder), "user/other"])
    assert "user/other" not in hub.repos


def test_push_refuses_a_symlink_out_of_the_folder(hub, student_folder, tmp_path):
    outside = tmp_path / "secret.json"
    outside.write_text(json.dumps({"private": "data"}))
    folder = tmp_path / "linked"
    shutil.copytree(student_folder, folder)
    (folder / "special_tokens_map.json").symlink_to(outside)
    with pytest.raises(ValueError, match="symbolic link .* outside the folder"):
        push_compressed(folder, REPO, api=api_for(hub))
    assert REPO not in hub.repos
    (folder / "special_tokens_map.json").unlink()
    (folder / "special_tokens_map.json").symlink_to(folder / "tokenizer_config.json")  # inside: staged as the file
    push_compressed(folder, REPO, api=api_for(hub))
    assert hub.files(REPO)["special_tokens_map.json"] == (folder / "tokenizer_config.json").read_bytes()


def test_push_refuses_a_plain_model_folder_unless_allowed(hub, tmp_path):
    teacher = tmp_path / "teacher"
    tiny_teacher("llama").save_pretrained(teacher)
    # each caller is told its own spelling: the argument from Python, the flag from the command line
    with pytest.raises(ValueError, match="no red_summary.json: it is a plain model") as raised:
        push_compressed(teacher, REPO, api=api_for(hub))
    assert "allow_plain_model=True" in str(raised.value) and "--allow_plain_model" not in str(raised.value)
    with pytest.raises(SystemExit, match="no red_summary.json.*pass --allow_plain_model"):
        push_command.main([str(teacher), REPO, "--dry_run"])
    assert REPO not in hub.repos
    push_compressed(teacher, REPO, api=api_for(hub), allow_plain_model=True)
    assert red_block(ModelCard.load(REPO))["recorded"] is False


def test_push_to_a_silent_endpoint_fails_instead_of_hanging(student_folder, monkeypatch, tmp_path, capsys):
    """An endpoint that accepts connections and never answers: the CLI's timeout ends the push."""
    import socket
    import threading
    import time

    from huggingface_hub.utils._http import default_client_factory

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted = []
    threading.Thread(target=lambda: [accepted.append(server.accept()) for _ in range(8)], daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    started = time.monotonic()
    try:
        with pytest.raises(SystemExit, match="failed"):
            push_command.main([str(student_folder), REPO, "--timeout", "1"])
    finally:
        huggingface_hub.set_client_factory(default_client_factory)  # the next tests get the default client
        server.close()
    assert time.monotonic() - started < 60


# ---------------------------------------------------------------------------------- adapters on the Hub (PEFT habits)
@pytest.mark.parametrize("tie", [True, False])
def test_adapter_push_and_load_by_repo_id(hub, tokenizer, input_ids, tie):
    from transformers_red import RedModel

    red = get_red_model(tiny_teacher("llama", tie_word_embeddings=tie), RedAdapterConfig(width_ratio=0.5),
                        builtin_texts(8), tokenizer, show_progress_bar=False)
    with torch.no_grad():
        for p in red.trainable_parameters():
            p.add_(0.01)
        expected = red(input_ids).logits
    url = red.push_to_hub("user/tiny-red-adapter", api=api_for(hub), token=TOKEN)
    assert "user/tiny-red-adapter" in url
    files = set(hub.files("user/tiny-red-adapter"))
    assert files == {"red_adapter_config.json", "red_adapter_model.safetensors", "README.md", ".gitattributes"} - (
        {".gitattributes"} - files)  # never the teacher's weights
    loaded = RedModel.from_pretrained(tiny_teacher("llama", tie_word_embeddings=tie), "user/tiny-red-adapter",
                                      token=TOKEN)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, expected)
    assert RedAdapterConfig.from_pretrained("user/tiny-red-adapter", token=TOKEN).channel_indices == \
        red.channel_indices.tolist()
    with pytest.raises(ValueError, match="other weights"):
        RedModel.from_pretrained(tiny_teacher("llama", tie_word_embeddings=tie, seed=3), "user/tiny-red-adapter",
                                 token=TOKEN)
    card = (hub.files("user/tiny-red-adapter")["README.md"]).decode()
    assert "RedModel.from_pretrained(teacher" in card and "64 -> 32" in card


def test_adapter_repo_offline_and_not_cached_says_so(monkeypatch):
    from transformers_red import RedModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="not in the local Hub cache"):
        RedModel.from_pretrained(tiny_teacher("llama"), "user/never-downloaded")
    with pytest.raises(FileNotFoundError, match="nor a Hub repo id"):
        RedModel.from_pretrained(tiny_teacher("llama"), "./no/such/folder")


# ------------------------------------------------------------------------------------------ trainer habits (TRL)
def test_trainer_writes_the_red_card_and_pushes_with_trls_arguments(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    args = RedConfig(output_dir=str(tmp_path / "run"), max_steps=2, save_strategy="steps", save_steps=1,
                     per_device_train_batch_size=4, max_length=48, report_to=[], use_cpu=True, learning_rate=1e-2,
                     calibration_num_samples=8, disable_tqdm=True, hub_model_id="user/trained")
    trainer = RedDistillationTrainer(model=tiny_teacher("llama"), args=args, processing_class=byte_tokenizer(),
                                     train_dataset=datasets.Dataset.from_dict({"text": builtin_texts(32)}))
    trainer.train()
    readme = (tmp_path / "run" / "README.md").read_text()
    assert "red:" in readme and "fine-tuned version of" not in readme  # not TRL's generic card
    url = trainer.push_to_hub(dataset_name="openai/gsm8k", tags=["my-run"], model_name="ignored")
    assert "user/trained" in url
    card = ModelCard.load("user/trained")
    assert card.data.datasets == ["openai/gsm8k"] and "my-run" in card.data.tags and "red" in card.data.tags
    assert red_block(card)["global_step"] == 2
    files = hub.files("user/trained")
    assert "training_args.bin" not in files and "model.safetensors" in files
    student = AutoModelForCausalLM.from_pretrained("user/trained")
    assert student.config.hidden_size == 32


@pytest.mark.parametrize("strategy", ["every_save", "all_checkpoints"])
def test_push_to_hub_true_publishes_checkpoints_and_the_student(hub, tmp_path, monkeypatch, strategy):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    args = RedConfig(output_dir=str(tmp_path / "run"), max_steps=2, save_strategy="steps", save_steps=1,
                     per_device_train_batch_size=4, max_length=48, report_to=[], use_cpu=True, learning_rate=1e-2,
                     calibration_num_samples=8, disable_tqdm=True, push_to_hub=True, hub_model_id="user/auto",
                     hub_strategy=strategy)
    trainer = RedDistillationTrainer(model=tiny_teacher("llama"), args=args, processing_class=byte_tokenizer(),
                                     train_dataset=datasets.Dataset.from_dict({"text": builtin_texts(32)}))
    trainer.train()
    files = set(hub.files("user/auto"))
    folder = "last-checkpoint" if strategy == "every_save" else "checkpoint-2"
    assert {f"{folder}/red_adapter_model.safetensors", f"{folder}/red_adapter_config.json",
            f"{folder}/red_run.json"} <= files
    assert not any(f.endswith("training_args.bin") or f.endswith("optimizer.pt") for f in files) or \
        strategy != "every_save"
    assert not any(f.endswith("training_args.bin") for f in files)
    trainer.save_model()  # with push_to_hub=True: the merged student and the RED card at the top level
    files = set(hub.files("user/auto"))
    assert {"model.safetensors", "config.json", "README.md", "red_summary.json"} <= files
    assert AutoModelForCausalLM.from_pretrained("user/auto").config.hidden_size == 32
    assert red_block(ModelCard.load("user/auto"))["global_step"] == 2


def test_cli_distill_push_to_hub_publishes_the_student(hub, tmp_path, monkeypatch):
    from transformers_red.commands import main

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    teacher = tmp_path / "teacher"
    tiny_teacher("llama").save_pretrained(teacher)
    byte_tokenizer().save_pretrained(teacher)
    (teacher / "README.md").write_text("---\nlicense: llama3.2\nlanguage: [en, de]\n---\n")  # the teacher's card
    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(builtin_texts(24)))
    main(["distill", "--teacher_model_name_or_path", str(teacher), "--dataset_path", str(data),
          "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--per_device_train_batch_size", "4",
          "--max_length", "32", "--report_to", "none", "--use_cpu", "true", "--calibration_num_samples", "4",
          "--save_strategy", "no", "--disable_tqdm", "true", "--push_to_hub", "true", "--hub_model_id", "user/cli",
          "--license", "mit"])
    card = ModelCard.load("user/cli")
    assert card.data.license == "mit" and card.data.language == ["en", "de"]  # the flag wins; language inherited
    assert red_block(card)["calibration"]["num_texts"] == 4 and "None" not in str(card)
    files = set(hub.files("user/cli"))
    assert {"model.safetensors", "config.json", "README.md", "red_summary.json"} <= files
    assert "training_args.bin" not in files
    assert AutoModelForCausalLM.from_pretrained("user/cli").config.hidden_size == 32


def test_a_failing_final_push_keeps_the_local_student_and_raises_after_training(hub, tmp_path, monkeypatch):
    """Checkpoint uploads that fail are logged and training goes on; the final push's failure is HubPushError,
    raised by save_model after the merged student is complete on disk (not during training)."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    args = RedConfig(output_dir=str(tmp_path / "run"), max_steps=2, save_strategy="steps", save_steps=1,
                     per_device_train_batch_size=4, max_length=48, report_to=[], use_cpu=True, learning_rate=1e-2,
                     calibration_num_samples=8, disable_tqdm=True, push_to_hub=True, hub_model_id="user/failing")
    trainer = RedDistillationTrainer(model=tiny_teacher("llama"), args=args, processing_class=byte_tokenizer(),
                                     train_dataset=datasets.Dataset.from_dict({"text": builtin_texts(32)}))
    hub.fail_commits = 10**6  # every commit answers 500
    trainer.train()  # the checkpoint pushes fail; training is not interrupted
    assert trainer.state.global_step == 2 and os.path.isdir(tmp_path / "run" / "checkpoint-2")
    with pytest.raises(HubPushError, match="user/failing"):
        trainer.save_model()
    student = tmp_path / "run"
    assert (student / "red_summary.json").is_file() and not (student / ".red_export_incomplete").exists()
    assert AutoModelForCausalLM.from_pretrained(student).config.hidden_size == 32
    assert not any(f.endswith(".safetensors") for f in hub.files("user/failing"))
