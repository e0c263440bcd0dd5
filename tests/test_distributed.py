"""Several processes (gloo, CPU) give the run one process gives: DDP and FSDP2 through the trainer, FSDP2 and
DeepSpeed ZeRO-3 on the RedModel, the trainer under DeepSpeed on one process.

The workers (tests/distributed_worker.py, tests/fsdp2_worker.py) run under `torch.distributed.run` and write what
rank 0 saw; each comparison is against the same computation on one process (with gradient accumulation for DDP,
so both see the same global batch of 4 per optimizer step).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

HERE = os.path.dirname(__file__)
BF16_GRADIENT_BOUND = 1e-3  # bf16 forwards of half the batch per rank round unlike the whole batch at once


def _run(script: str, out, *args: str, processes: int = 1, torchrun: bool = False) -> dict:
    os.makedirs(out, exist_ok=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*(launcher if processes > 1 or torchrun else [sys.executable]), os.path.join(HERE, script), str(out),
               *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    with open(os.path.join(out, "result.json"), encoding="utf-8") as f:
        return json.load(f)


def _max_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((torch.tensor(a[k]) - torch.tensor(b[k])).abs().max()) for k in a)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """1 process x accumulation 2, and 2 processes x accumulation 1 (checkpoint at step 2), 3 steps each."""
    root = tmp_path_factory.mktemp("ddp")
    # the single process forms its weights per forward, as the two processes (no accumulation) do: same arithmetic
    one = _run("distributed_worker.py", root / "one", "--grad_accum", "2", "--form_student_weights", "per_forward")
    two = _run("distributed_worker.py", root / "two", "--save_steps", "2", processes=2)
    return root, one, two


def test_ddp_two_processes_equal_one_process_with_accumulation(ddp_runs):
    root, one, two = ddp_runs
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["model_class"] == "DistributedDataParallel"
    # channels calibrated once on rank 0, given to rank 1; eRank measured on rank 0 only, same schedule; the
    # exported students: one merge, written once, equal to the single-process export
    _assert_same_run(one, two)
    assert not any(name.startswith(".staging") for name in os.listdir(root / "two"))


def test_ddp_resume_under_two_processes_continues_the_run(ddp_runs, tmp_path):
    """From checkpoint-2 (checkpoint-3, the finished run's last, removed: resuming from it trains nothing) in a copy
    of the run's folder, so the other tests' results stay as written."""
    root, _, two = ddp_runs
    shutil.copytree(root / "two", tmp_path / "two")
    shutil.rmtree(tmp_path / "two" / "checkpoint-3")
    resumed = _run("distributed_worker.py", tmp_path / "two", "--save_steps", "2", "--resume", processes=2)
    assert resumed["losses"] == two["losses"]
    assert _max_difference(resumed["state"], two["state"]) <= 1e-6
    _assert_run_state_restored(two, resumed)


def _assert_run_state_restored(full: dict, resumed: dict) -> None:
    """RED's own run state came back with the checkpoint: the tokens trained and the eRank history."""
    assert resumed["tokens_trained"] == full["tokens_trained"] > 0
    assert resumed["erank_steps"] == full["erank_steps"] == [0, 2, 3]


def test_ddp_hidden_state_loss_with_activation_checkpointing_equals_one_process(ddp_runs, tmp_path):
    """The (B, T, V)-free logit loss goes through the DDP wrapper (gradients synchronised), with the student's
    activation checkpointing on: the same steps as one process with accumulation, and as the logits path (up to
    rounding that AdamW's normalisation magnifies in near-zero gradient entries over 3 steps at lr 1e-2)."""
    _, logits_path, _ = ddp_runs
    flags = ("--logit_loss_from", "hidden_states", "--activation_checkpointing")
    one = _run("distributed_worker.py", tmp_path / "one", *flags, "--grad_accum", "2",
               "--form_student_weights", "per_forward")
    two = _run("distributed_worker.py", tmp_path / "two", *flags, processes=2)
    assert two["model_class"] == "DistributedDataParallel"
    assert one["losses"] == pytest.approx(two["losses"], rel=1e-6, abs=0)
    assert _max_difference(one["state"], two["state"]) <= 1e-5
    assert logits_path["losses"] == pytest.approx(two["losses"], rel=1e-6, abs=0)
    assert _max_difference(logits_path["state"], two["state"]) <= 1e-4


def test_ddp_on_policy_each_rank_samples_its_own_share(tmp_path):
    """On-policy RED (lmbda=1) on 2 DDP processes: each rank samples completions of its own prompts with its own
    seeds (functions of seed, step, rank and row), the projections stay equal on both ranks after the steps, and a
    second run samples and trains exactly the same (the sampling RNG is not the global one)."""
    two = _run("distributed_worker.py", tmp_path / "two", "--lmbda", "1.0", processes=2)
    samples = [json.loads((tmp_path / "two" / f"samples_rank{r}.json").read_text()) for r in (0, 1)]
    assert len(samples[0]) == len(samples[1]) == 3  # one rollout per step on each rank
    assert all(a != b for a, b in zip(*samples))  # each rank's own share
    assert two["rank_checksums"][0] == two["rank_checksums"][1]  # DDP kept the projections in sync
    assert two["rollout_seconds"] > 0 and all(torch.isfinite(torch.tensor(two["losses"])))
    again = _run("distributed_worker.py", tmp_path / "again", "--lmbda", "1.0", processes=2)
    assert [json.loads((tmp_path / "again" / f"samples_rank{r}.json").read_text()) for r in (0, 1)] == samples
    assert again["losses"] == two["losses"] and _max_difference(again["state"], two["state"]) == 0


@pytest.mark.parametrize("flags", [(), ("--logit_loss_from", "hidden_states", "--activation_checkpointing")],
                         ids=["logits", "hidden-states-checkpointed"])
def test_ddp_with_accumulation_forms_weights_once_per_step(tmp_path, flags):
    """2 processes x accumulation 2 forming the student weights once per optimizer step (the default under
    accumulation), the gradients waiting on the held weights until the last micro-batch's backward, where DDP
    reduces them: the run of 1 process x accumulation 4 forming them per forward (observed 7.9e-7 / 7.4e-7 after 3
    AdamW steps at lr 1e-2; a micro-batch's gradient lost would move entries by about the learning rate)."""
    one = _run("distributed_worker.py", tmp_path / "one", *flags, "--grad_accum", "4",
               "--form_student_weights", "per_forward")
    two = _run("distributed_worker.py", tmp_path / "two", *flags, "--grad_accum", "2", processes=2)
    assert two["model_class"] == "DistributedDataParallel"
    assert (one["forms_per_step"], two["forms_per_step"]) == (False, True)
    print(f"max |projection difference| {_max_difference(one['state'], two['state']):.2e}, losses {one['losses']} "
          f"vs {two['losses']}")
    assert one["losses"] == pytest.approx(two["losses"], rel=1e-5, abs=0)
    assert _max_difference(one["state"], two["state"]) <= 1e-5


def _run_fsdp2(out, *flags: str) -> dict:
    """The trainer under accelerate's FSDP2 on 2 CPU processes (the worker lets accelerate's FSDP branch take gloo
    CPU processes, which it otherwise silently runs as DDP)."""
    return _run("distributed_worker.py", out, "--engine", "fsdp2", *flags, processes=2)


def _assert_same_run(one: dict, two: dict, bound: float = 1e-5) -> None:
    assert one["channels"] == two["channels"] and one["clone_scales"] == two["clone_scales"]
    # every rank records what rank 0 calibrated on (its card's provenance)
    assert all(c == one["calibration_counts"][0] for c in two["calibration_counts"])
    assert one["channels"] is None or one["calibration_counts"][0][0] > 0
    assert one["losses"] == pytest.approx(two["losses"], rel=1e-6, abs=0)
    assert two["erank_steps"] == one["erank_steps"] == [0, 2, 3]
    assert _max_difference(one["state"], two["state"]) <= bound
    a, b = (load_file(os.path.join(run["out"], "student", "model.safetensors")) for run in (one, two))
    assert set(a) == set(b) and max(float((a[k] - b[k]).abs().max()) for k in a) <= bound


@pytest.mark.parametrize("state_dict_type", ["FULL_STATE_DICT", "SHARDED_STATE_DICT"])
def test_trainer_under_fsdp2_equals_one_process_and_resumes(ddp_runs, tmp_path, state_dict_type):
    """RedDistillationTrainer under FSDP2 (one unit per decoder layer with its projections, accelerate's embedding /
    head group, the root), 2 processes x batch 2 = 1 process x accumulation 2: the same channels, losses, eRank
    schedule (measured through the root unit, every rank), projections and exported student (observed 0.0). The
    checkpoint holds the adapter and the optimizer in the engine's form, not the wrapped model with its frozen
    teacher (Trainer's FSDP save wrote it, pickled, and gathered it at every checkpoint); resuming from it continues
    the run exactly, for either state-dict type (with SHARDED_STATE_DICT Trainer never called `_save`: no adapter)."""
    _, one, _ = ddp_runs
    two = _run_fsdp2(tmp_path, "--save_steps", "2", "--state_dict_type", state_dict_type)
    assert two["world_size"] == 2 and two["model_class"] == "FSDPRedModel"
    assert "red_weight" in two["sharded"]  # the projections and gains are DTensors, sharded with their units
    _assert_same_run(one, two)
    files = set(os.listdir(tmp_path / "checkpoint-2"))
    assert {"red_adapter_model.safetensors", "red_run.json", "scheduler.pt", "rng_state_1.pth"} <= files
    assert ("optimizer.bin" if state_dict_type == "FULL_STATE_DICT" else "optimizer_0") in files
    assert not any(name.startswith("pytorch_model_fsdp") for name in files)
    shutil.rmtree(tmp_path / "checkpoint-3")
    resumed = _run_fsdp2(tmp_path, "--save_steps", "2", "--resume", "--state_dict_type", state_dict_type)
    assert resumed["losses"] == two["losses"]
    assert _max_difference(resumed["state"], two["state"]) <= 1e-6  # observed 0; AdamW restarted moves ~lr
    _assert_run_state_restored(two, resumed)


def test_trainer_under_fsdp2_hidden_state_loss_with_activation_checkpointing(tmp_path):
    """The (B, T, V)-free loss (head weight emitted inside the head's forward, where its unit is gathered) with the
    student's activation checkpointing, under FSDP2: the single-process run (observed 0.0)."""
    flags = ("--logit_loss_from", "hidden_states", "--activation_checkpointing")
    one = _run("distributed_worker.py", tmp_path / "one", *flags, "--grad_accum", "2",
               "--form_student_weights", "per_forward")
    two = _run_fsdp2(tmp_path / "two", *flags)
    assert two["model_class"] == "FSDPRedModel"
    _assert_same_run(one, two)


def test_trainer_under_fsdp2_with_bf16_mixed_precision_follows_one_process(tmp_path):
    """mixed_precision bf16 (FSDP2's MixedPrecisionPolicy: bf16 compute copies of the float32 teacher and
    projections) against one process under bf16 autocast: the arithmetic differs, so the runs agree to bf16
    rounding, as closely as either bf16 run agrees with float32 (losses 1e-4 relative; mean |projection
    difference| 2.1e-4 after 3 AdamW steps at lr 1e-2, where a lost or doubled gradient moves entries by ~lr)."""
    one = _run("distributed_worker.py", tmp_path / "one", "--bf16", "--grad_accum", "2",
               "--form_student_weights", "per_forward")
    two = _run_fsdp2(tmp_path / "two", "--bf16")
    assert two["model_class"] == "FSDPRedModel"
    assert one["losses"] == pytest.approx(two["losses"], rel=1e-3, abs=0)
    differences = torch.cat([(torch.tensor(one["state"][k]) - torch.tensor(two["state"][k])).abs().flatten()
                             for k in one["state"]])
    assert float(differences.mean()) <= 1e-3
    assert os.path.isfile(tmp_path / "two" / "student" / "model.safetensors")


def test_fsdp2_with_a_bf16_teacher_and_float32_projections_equals_one_process(tmp_path):
    """Each FSDP2 unit holds bf16 frozen teacher weights and float32 projections / gains (mixed dtypes are
    all-gathered as bytes; the reduce-scatter sees float32 gradients only): the same step as one process."""
    one = _run("fsdp2_worker.py", tmp_path / "one", "--tied", "--bf16")
    two = _run("fsdp2_worker.py", tmp_path / "two", "--tied", "--bf16", processes=2)
    assert two["sharded"] == ["DTensor"] and two["grad_dtypes"] == one["grad_dtypes"] == ["torch.float32"]
    assert two["merged_dtype"] == "torch.bfloat16"
    print(f"bf16 teacher: max |gradient difference| {_max_difference(one['grads'], two['grads']):.2e}, "
          f"state {_max_difference(one['state'], two['state']):.2e}")
    assert _max_difference(one["grads"], two["grads"]) <= BF16_GRADIENT_BOUND
    assert _max_difference(one["state"], two["state"]) <= BF16_GRADIENT_BOUND
    torch.testing.assert_close(torch.tensor(two["merged_logits"]), torch.tensor(one["merged_logits"]),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("variant", [["--tied"], ["--share"]], ids=["tied", "untied-shared"])
def test_fsdp2_sharded_red_model_equals_one_process(tmp_path, variant):
    """Decoder layers sharded with the projections their wrappers own; gradients, the gathered adapter state and
    the merged student equal the unsharded computation."""
    one = _run("fsdp2_worker.py", tmp_path / "one", *variant)
    two = _run("fsdp2_worker.py", tmp_path / "two", *variant, processes=2)
    assert two["world_size"] == 2 and two["sharded"] == ["DTensor"]
    assert _max_difference(one["grads"], two["grads"]) <= 1e-6
    assert _max_difference(one["state"], two["state"]) <= 1e-6
    torch.testing.assert_close(torch.tensor(two["merged_logits"]), torch.tensor(one["merged_logits"]),
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ DeepSpeed
# DeepSpeed's CPU accelerator (gloo): accelerate turns DeepSpeed on for the trainer under torchrun on one process here
# (with two CPU processes accelerate's state counts one process, so the trainer is checked on one; the partitioning
# itself on two, below, through deepspeed.initialize).
@pytest.fixture(scope="module")
def plain_one_process(tmp_path_factory):
    """flags -> the plain single-process run with them (cached)."""
    runs = {}

    def run(*flags: str) -> dict:
        if flags not in runs:
            runs[flags] = _run("distributed_worker.py", tmp_path_factory.mktemp("plain"), *flags)
        return runs[flags]

    return run


@pytest.mark.parametrize("engine, flags", [("zero2", ()), ("zero3", ()),
                                           ("zero3", ("--logit_loss_from", "hidden_states")),
                                           ("zero3", ("--clone_output_space", "teacher"))],
                         ids=["zero2", "zero3", "zero3-hidden-states", "zero3-clone-in-teacher-space"])
def test_trainer_under_deepspeed_equals_the_plain_run(plain_one_process, tmp_path, engine, flags):
    """RedDistillationTrainer with a DeepSpeed config (ZeRO-3: every parameter partitioned, persistence threshold 0,
    so each wrapper's forward gathers its teacher weight and projection as a leaf module; the clone targets' products
    with P (or the lift by P^T), the head weight of the hidden-state loss and the export merge run inside gathers):
    the plain single-process run's losses, eRank schedule, projections and exported student."""
    plain = plain_one_process(*flags)
    run = _run("distributed_worker.py", tmp_path, "--engine", engine, *flags, torchrun=True)
    assert run["model_class"] == "DeepSpeedEngine"
    _assert_same_run(plain, run)  # projections observed 0 (zero2), 5.4e-7 (zero3)


@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_trainer_under_deepspeed_on_two_processes_equals_one_process(ddp_runs, tmp_path, engine):
    """RedDistillationTrainer under DeepSpeed on 2 CPU processes (the worker gives accelerate the gloo backend it
    finds for DDP; without it accelerate counts 1 process although DeepSpeed joined 2), against 1 process x
    accumulation 2: the same channels, losses and eRank schedule; projections within 1e-4 (observed 0.0 under
    ZeRO-2, 3.7e-5 under ZeRO-3, whose reduce-scatter sums in another order; AdamW's normalisation magnifies that in
    near-zero gradient entries over 3 steps at lr 1e-2; the partitioned gradients themselves match to 7.5e-9 in
    test_zero3_partitioned_red_model_on_two_processes_equals_one_process)."""
    _, one, _ = ddp_runs
    two = _run("distributed_worker.py", tmp_path, "--engine", engine, processes=2)
    assert two["world_size"] == 2 and two["model_class"] == "DeepSpeedEngine"
    _assert_same_run(one, two, bound=1e-4)


@pytest.fixture(scope="module")
def weights_one_process(tmp_path_factory):
    """train="weights" (the pruned baseline: a plain student trained on its own weights), 1 process x accumulation
    2."""
    return _run("distributed_worker.py", tmp_path_factory.mktemp("weights"), "--train", "weights", "--grad_accum", "2")


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_pruned_baseline_under_fsdp2_and_zero3_equals_one_process_and_resumes(weights_one_process, tmp_path, engine):
    """train="weights" on 2 processes: the checkpoint holds the student's safetensors gathered whole (Trainer's own
    save wrote FSDP shards of its own format, nothing RED resumes from with SHARDED_STATE_DICT, and under ZeRO-3
    needs 16-bit consolidation), the export is a plain copy built from the gathered state (writing the sharded
    model on rank 0 hung: a collective on one rank). Equal to 1 process (observed 1.2e-7 / 1.1e-6), and resuming
    from step 2 gives the uninterrupted run."""
    one = weights_one_process
    flags = ("--train", "weights", "--engine", engine, "--save_steps", "2",
             *(("--state_dict_type", "SHARDED_STATE_DICT") if engine == "fsdp2" else ()))
    two = _run("distributed_worker.py", tmp_path, *flags, processes=2)
    assert two["world_size"] == 2
    assert {"model.safetensors", "red_adapter_config.json"} <= set(os.listdir(tmp_path / "checkpoint-2"))
    _assert_same_run(one, two)
    shutil.rmtree(tmp_path / "checkpoint-3")
    resumed = _run("distributed_worker.py", tmp_path, *flags, "--resume", processes=2)
    assert resumed["losses"] == two["losses"]
    assert _max_difference(resumed["state"], two["state"]) <= 1e-6  # observed 0
    _assert_run_state_restored(two, resumed)


@pytest.mark.parametrize("variant", [["--tied"], [], ["--share"]], ids=["tied", "untied", "untied-shared"])
def test_zero3_partitioned_red_model_on_two_processes_equals_one_process(tmp_path, variant):
    """deepspeed.initialize(ZeRO-3) over a RedModel on 2 processes: every parameter partitioned and empty outside
    forwards; one distillation step's gradients, the gathered adapter state and the merged student equal plain
    PyTorch on one process. Untied: the embedding's projection is reduced by ZeRO-3's per-parameter hooks (a leaf
    module's backward hook would fire before it has a gradient: `ZERO3_LEAF_CLASSES`)."""
    one = _run("zero3_worker.py", tmp_path / "one", "--reference", *variant)
    two = _run("zero3_worker.py", tmp_path / "two", *variant, processes=2)
    assert two["world_size"] == 2 and two["partitioned"] and two["empty_between_forwards"]
    assert _max_difference(one["grads"], two["grads"]) <= 1e-6  # observed 6.5e-9 to 7.5e-9
    assert _max_difference(one["state"], two["state"]) <= 1e-6
    torch.testing.assert_close(torch.tensor(two["merged_logits"]), torch.tensor(one["merged_logits"]),
                               rtol=1e-5, atol=1e-5)


def test_trainer_under_zero3_resumes_exactly_and_takes_a_teacher_loaded_partitioned(plain_one_process, tmp_path):
    """ZeRO-3 (one process): resuming from checkpoint-2 (DeepSpeed's global_step2/ layout) gives the uninterrupted
    run; a teacher loaded partitioned (from_pretrained under the DeepSpeed config, as accelerate's zero3_init_flag)
    is calibrated and wrapped on its gathered weights and trains as the plain run."""
    run = tmp_path / "run"
    full = _run("distributed_worker.py", run, "--engine", "zero3", "--save_steps", "2", torchrun=True)
    assert (run / "checkpoint-2" / "global_step2").is_dir()
    shutil.rmtree(run / "checkpoint-3")
    resumed = _run("distributed_worker.py", run, "--engine", "zero3", "--save_steps", "2", "--resume", torchrun=True)
    assert resumed["losses"] == full["losses"]
    assert _max_difference(full["state"], resumed["state"]) <= 1e-6  # observed 0
    _assert_run_state_restored(full, resumed)  # Trainer never calls _load_from_checkpoint under DeepSpeed
    loaded = _run("distributed_worker.py", tmp_path / "init", "--engine", "zero3", "--zero_init", torchrun=True)
    plain = plain_one_process()
    assert loaded["partitioned_teacher"] and not plain["partitioned_teacher"]
    assert loaded["channels"] == plain["channels"]
    assert loaded["losses"] == pytest.approx(plain["losses"], rel=1e-6, abs=0)
    assert _max_difference(plain["state"], loaded["state"]) <= 1e-5  # observed 3.8e-6 (3 AdamW steps at lr 1e-2)


def test_accelerate_launch_with_the_zero3_example_config_distils(tmp_path):
    """The documented command (docs/multi_gpu.md) `accelerate launch --config_file examples/accelerate/zero3.yaml -m
    transformers_red.commands distill ...` on one CPU process (DeepSpeed's CPU accelerator, mixed precision off):
    with the config's zero3_init_flag the teacher is loaded partitioned; the export is a plain student whose card
    counts the parameters (built outside zero.Init)."""
    from transformers import AutoModelForCausalLM

    from transformers_red.resources import builtin_texts, byte_tokenizer, tiny_trained_teacher

    teacher = tmp_path / "teacher"
    tiny_trained_teacher("llama").save_pretrained(teacher)
    byte_tokenizer().save_pretrained(teacher)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in builtin_texts(32)))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               os.path.join(HERE, "..", "examples", "accelerate", "zero3.yaml"), "--num_processes", "1",
               "--mixed_precision", "no", "-m", "transformers_red.commands", "distill",
               "--teacher_model_name_or_path", str(teacher), "--dataset_path", str(data), "--output_dir", str(out),
               "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "32",
               "--calibration_num_samples", "4", "--report_to", "none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "Could not count the parameters" not in done.stdout + done.stderr
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.hidden_size == 32
    card = (out / "README.md").read_text()
    assert "student_parameters: 39072" in card and "teacher_parameters: 78144" in card
