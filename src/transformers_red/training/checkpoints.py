"""Checkpoints of a RED run: which ones are complete, and whether a resume continues the same run.

Every checkpoint holds, besides Trainer's files, `red_run.json`: the run's identity (teacher, adapter, loss
settings) and the counters that Trainer does not keep (tokens trained). A resume compares the identity with the
resuming trainer's and refuses on any difference, naming it; the counters are restored from it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

from safetensors import safe_open

from ..constants import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, LOSS_SETTINGS, STUDENT_WEIGHTS_NAME

logger = logging.getLogger(__name__)

RUN_STATE_NAME = "red_run.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
ADAPTER_FIELDS = ("init", "init_std", "norm_init", "share_projections", "seed", "teacher_hidden_size",
                  "student_hidden_size", "channel_indices", "model_type", "teacher_config_fingerprint")


def run_identity(args: Any, adapter_config: Any, teacher_digest: str) -> dict[str, Any]:
    """What a resume must not change: the loss settings, the adapter (init, widths, channels) and the teacher."""
    adapter = adapter_config.to_dict()
    return {"loss": {k: getattr(args, k) for k in LOSS_SETTINGS},
            "adapter": {k: adapter.get(k) for k in ADAPTER_FIELDS}, "teacher_weights_digest": teacher_digest}


def write_run_state(folder: str, identity: dict[str, Any], tokens_trained: int) -> None:
    path = os.path.join(folder, RUN_STATE_NAME)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"identity": identity, "tokens_trained": tokens_trained}, f, indent=1, default=list)
    os.replace(path + ".tmp", path)


def _differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        return [d for k in sorted(set(saved) | set(current))
                for d in _differences(saved.get(k), current.get(k), f"{prefix}{k}.")]
    if saved != current and not (isinstance(saved, list) and isinstance(current, tuple) and saved == list(current)):
        shown = (lambda v: f"{len(v)} indices" if isinstance(v, list) and len(v) > 8 else repr(v))
        return [f"{prefix[:-1]}: checkpoint {shown(saved)}, now {shown(current)}"]
    return []


def read_run_state(checkpoint: str, identity: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's run state, after checking that `identity` (the resuming trainer's) is the same run."""
    path = os.path.join(checkpoint, RUN_STATE_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError as err:
        raise ValueError(f"{checkpoint} has no {RUN_STATE_NAME}: it was written before checkpoints recorded "
                         "the run's settings (or the file was removed); start a new run (its adapter can still be "
                         "loaded with RedModel.from_pretrained).") from err
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is damaged ({err}); resume from an earlier checkpoint.") from err
    differences = _differences(json.loads(json.dumps(state.get("identity"), default=list)),
                               json.loads(json.dumps(identity, default=list)))
    if differences:
        raise ValueError(f"{checkpoint} belongs to another run; resuming would train a different student. "
                         "What differs: " + "; ".join(differences) + ". Resume with the same teacher, adapter and "
                         "loss settings, or start a new output_dir.")
    return state


# Where FSDP (full: optimizer.bin; sharded: optimizer_0/) and DeepSpeed (global_stepN/) keep the optimizer state
_ENGINE_OPTIMIZER_STATE = ("optimizer.bin", "optimizer_0", "global_step")


def required_files(trains_weights: bool) -> list[str]:
    """Files a resume needs in a checkpoint folder (RNG state is per process: one at least)."""
    weights = STUDENT_WEIGHTS_NAME if trains_weights else ADAPTER_WEIGHTS_NAME
    return [weights, ADAPTER_CONFIG_NAME, RUN_STATE_NAME, "trainer_state.json", "optimizer.pt", "scheduler.pt"]


def checkpoint_problem(folder: str, trains_weights: bool) -> str | None:
    """Why `folder` cannot be resumed from (a missing, empty, truncated or unparsable file), or None."""
    names = set(os.listdir(folder))
    for name in required_files(trains_weights):
        path = os.path.join(folder, name)
        if name == "optimizer.pt" and any(n.startswith(_ENGINE_OPTIMIZER_STATE) for n in names):
            continue  # FSDP / DeepSpeed write their optimizer state in their own layout (their loader checks it)
        if name not in names or os.path.getsize(path) == 0:
            return f"{name} is missing or empty"
        try:
            if name.endswith(".json"):
                with open(path, encoding="utf-8") as f:
                    json.load(f)
            elif name.endswith(".safetensors"):
                with safe_open(path, framework="pt") as f:
                    f.keys()
        except Exception as err:  # safetensors raises its own error type for a bad header
            return f"{name} is damaged ({type(err).__name__}: {err})"
    if not any(n.startswith("rng_state") for n in names):
        return "rng_state*.pth is missing"
    return None


def last_complete_checkpoint(output_dir: str, trains_weights: bool | None = None) -> str | None:
    """The newest `checkpoint-N` in `output_dir` that holds every file a resume needs, or None.

    A newer checkpoint that is damaged is skipped with a warning naming it and what is wrong. `trains_weights`
    None accepts either kind (adapter or plain-model weights).
    """
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(((int(m.group(1)), name) for name in os.listdir(output_dir)
                    if (m := _CHECKPOINT_RE.match(name)) and os.path.isdir(os.path.join(output_dir, name))),
                   reverse=True)
    for _, name in steps:
        folder = os.path.join(output_dir, name)
        kinds = [trains_weights] if trains_weights is not None else [False, True]
        problems = [checkpoint_problem(folder, kind) for kind in kinds]
        if None in problems:
            return folder
        logger.warning("Skipping damaged checkpoint %s: %s.", folder, problems[0])
    return None
