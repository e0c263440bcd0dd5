"""Checkpoints (training/checkpoints.py): counters restored on resume, another run's checkpoint refused with what
differs, damaged checkpoints skipped or named."""

import json
import logging
import os

import datasets
import pytest
import torch
from testing_utils import make_red_trainer

from transformers_red.adapter.config import teacher_weights_digest
from transformers_red.resources import builtin_texts, tiny_teacher
from transformers_red.training.checkpoints import RUN_STATE_NAME, last_complete_checkpoint

SAVE = dict(save_strategy="steps", save_steps=2, max_steps=4)


@pytest.fixture(scope="module")
def texts():
    return datasets.Dataset.from_dict({"text": builtin_texts(64)})


def summary(folder):
    with open(os.path.join(folder, "red_summary.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("train", ["projections", "weights"])
def test_tokens_trained_and_steps_survive_a_resume(tmp_path, texts, tokenizer, trained_teacher, train):
    straight = make_red_trainer(tmp_path / "straight", texts, tokenizer, trained_teacher(), train=train, **SAVE)
    straight.train()
    straight.save_model()
    half = make_red_trainer(tmp_path / "resumed", texts, tokenizer, trained_teacher(), train=train,
                            **{**SAVE, "max_steps": 2})
    half.train()
    resumed = make_red_trainer(tmp_path / "resumed", texts, tokenizer, trained_teacher(), train=train, **SAVE)
    resumed.train(resume_from_checkpoint=True)
    resumed.save_model()
    want, got = summary(tmp_path / "straight"), summary(tmp_path / "resumed")
    assert got["tokens_trained"] == want["tokens_trained"] > 0
    assert got["global_step"] == want["global_step"] == 4
    with open(tmp_path / "resumed" / "checkpoint-2" / RUN_STATE_NAME) as f:
        assert json.load(f)["tokens_trained"] * 2 == want["tokens_trained"]  # equal-length batches


@pytest.mark.parametrize("change, match", [
    (dict(temperature=2.0), r"loss.temperature: checkpoint 1.0, now 2.0"),
    (dict(clone_weight=0.0), r"loss.clone_weight"),
    (dict(init="random", norm_init="ones"), r"adapter.init: checkpoint 'activation', now 'random'"),
    (dict(width_ratio=0.25), r"adapter.student_hidden_size: checkpoint 32, now 16"),
])
def test_resume_with_other_settings_is_refused(tmp_path, texts, tokenizer, trained_teacher, change, match):
    make_red_trainer(tmp_path, texts, tokenizer, trained_teacher(), **{**SAVE, "max_steps": 2}).train()
    other = make_red_trainer(tmp_path, texts, tokenizer, trained_teacher(), **{**SAVE, **change})
    with pytest.raises(ValueError, match=f"belongs to another run.*{match}"):
        other.train(resume_from_checkpoint=True)


def test_resume_with_another_teacher_of_the_same_config_is_refused(tmp_path, texts, tokenizer):
    # random init: no channel selection that would tell the teachers apart; only the weights differ
    settings = {**SAVE, "max_steps": 2, "init": "random", "norm_init": "ones"}
    make_red_trainer(tmp_path, texts, tokenizer, tiny_teacher("llama", seed=1), **settings).train()
    other = make_red_trainer(tmp_path, texts, tokenizer, tiny_teacher("llama", seed=2), **settings)
    with pytest.raises(ValueError, match="teacher_weights_digest"):
        other.train(resume_from_checkpoint=True)
    first, second = tiny_teacher("llama", seed=1), tiny_teacher("llama", seed=1)
    assert teacher_weights_digest(first) == teacher_weights_digest(second)


@pytest.mark.parametrize("damage", ["truncate_weights", "garbage_config", "no_optimizer", "no_trainer_state",
                                    "no_rng", "no_run_state"])
def test_a_damaged_newest_checkpoint_is_skipped_and_named(tmp_path, texts, tokenizer, trained_teacher, damage,
                                                          caplog):
    make_red_trainer(tmp_path, texts, tokenizer, trained_teacher(), **SAVE).train()
    newest = tmp_path / "checkpoint-4"
    if damage == "truncate_weights":
        path = newest / "red_adapter_model.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "garbage_config":
        (newest / "red_adapter_config.json").write_text("{not json")
    elif damage == "no_rng":
        for name in os.listdir(newest):
            if name.startswith("rng_state"):
                os.remove(newest / name)
    else:
        os.remove(newest / {"no_optimizer": "optimizer.pt", "no_trainer_state": "trainer_state.json",
                            "no_run_state": RUN_STATE_NAME}[damage])
    with caplog.at_level(logging.WARNING):
        assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    assert "checkpoint-4" in caplog.text
    resumed = make_red_trainer(tmp_path, texts, tokenizer, trained_teacher(), **SAVE)
    with pytest.raises(ValueError, match="Cannot resume from .*checkpoint-4"):
        resumed.train(resume_from_checkpoint=str(newest))
    resumed.train(resume_from_checkpoint=True)  # falls back to checkpoint-2 and finishes
    assert resumed.state.global_step == 4


@pytest.mark.parametrize("layout", ["optimizer.bin", "optimizer_0", "global_step4", None])
def test_engine_optimizer_layouts_count_as_complete(tmp_path, texts, tokenizer, trained_teacher, layout):
    """FSDP (optimizer.bin, optimizer_0/) and DeepSpeed (global_stepN/) checkpoints have no optimizer.pt."""
    make_red_trainer(tmp_path, texts, tokenizer, trained_teacher(), **SAVE).train()
    newest = tmp_path / "checkpoint-4"
    os.remove(newest / "optimizer.pt")
    if layout == "optimizer.bin":
        (newest / layout).write_bytes(b"state")
    elif layout is not None:
        (newest / layout).mkdir()
    expected = newest if layout is not None else tmp_path / "checkpoint-2"
    assert last_complete_checkpoint(str(tmp_path)) == str(expected)


def test_resuming_a_finished_run_trains_nothing_and_re_exports_the_same_weights(tmp_path, texts, tokenizer,
                                                                              trained_teacher):
    from safetensors.torch import load_file

    settings = {**SAVE, "lr_scheduler_type": "constant", "erank_steps": 3, "erank_num_samples": 2}
    # (a step past the end would change the weights)
    first = make_red_trainer(tmp_path, texts, tokenizer, trained_teacher(), **settings)
    first.train()
    first.save_model()
    before = load_file(tmp_path / "model.safetensors")
    again = make_red_trainer(tmp_path, texts, tokenizer, trained_teacher(), **settings)
    again.train(resume_from_checkpoint=True)
    again.save_model()
    assert again.state.global_step == 4 and not (tmp_path / "checkpoint-5").exists()
    after = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert summary(tmp_path)["global_step"] == 4 and summary(tmp_path)["tokens_trained"] > 0
    # the end-of-training eRank, which checkpoint-4 (written before it) lacks, is measured again
    assert [r["step"] for r in again._erank_callback.history] == [r["step"] for r in first._erank_callback.history]
    assert again._erank_callback.history[-1]["step"] == 4


def test_an_interrupted_re_export_is_never_taken_for_a_good_one(tmp_path, texts, tokenizer, trained_teacher,
                                                                monkeypatch):
    from transformers_red.hub import check_student_folder
    from transformers_red.loading import LoadError, load_model

    trainer = make_red_trainer(tmp_path / "run", texts, tokenizer, trained_teacher(), max_steps=2)
    trainer.train()
    out = tmp_path / "export"
    trainer.save_model(str(out))
    check_student_folder(out)
    real_replace, moved = os.replace, []

    def crash_after_weights(src, dst):  # the process dies after the new weights are in place
        real_replace(src, dst)
        moved.append(os.path.basename(dst))
        if os.path.basename(dst) == "model.safetensors":
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash_after_weights)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_model(str(out))
    monkeypatch.setattr(os, "replace", real_replace)
    with pytest.raises(ValueError, match="interrupted"):
        check_student_folder(out)
    with pytest.raises(LoadError, match="interrupted"):
        load_model(str(out))
    trainer.save_model(str(out))  # re-running the export repairs the folder
    check_student_folder(out)
    assert not (out / ".red_export_incomplete").exists()
    with open(out / "tokenizer.json", "a") as f:  # a file of another export: the size manifest catches it
        f.write(" ")
    with pytest.raises(ValueError, match="mixes two exports"):
        check_student_folder(out)


@pytest.mark.parametrize("form", ["input_ids", "iterable"])
def test_pre_tokenised_and_iterable_datasets_calibrate(tmp_path, tokenizer, trained_teacher, form):
    rows = builtin_texts(16)
    if form == "input_ids":
        dataset = datasets.Dataset.from_dict({"input_ids": [tokenizer(t).input_ids[:48] for t in rows]})
    else:
        dataset = datasets.Dataset.from_dict({"text": rows}).to_iterable_dataset()
    trainer = make_red_trainer(tmp_path, dataset, tokenizer, trained_teacher(), max_steps=2)
    trainer.train()
    assert trainer.red_model.channel_indices is not None and trainer.state.global_step == 2


def test_a_full_disk_is_reported_with_the_path_and_free_space(tmp_path, texts, tokenizer, trained_teacher,
                                                              monkeypatch):
    import shutil
    from collections import namedtuple

    from transformers import Trainer

    trainer = make_red_trainer(tmp_path, texts, tokenizer, trained_teacher(), **{**SAVE, "max_steps": 2})
    monkeypatch.setattr(Trainer, "_save_checkpoint", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("basic_ios::clear: iostream error")))  # what torch.save says on ENOSPC
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 2**20, 10 * 2**20, 2**20))
    with pytest.raises(OSError, match=r"Saving checkpoint-2 into .* failed .* 1 MB are free there \(the disk is "
                                      r"probably full\)") as caught:
        trainer.train()
    assert caught.value.errno == 28  # ENOSPC
    assert last_complete_checkpoint(str(tmp_path)) is None  # nothing half-written is taken for a checkpoint
