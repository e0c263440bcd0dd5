"""`RedModel`: the frozen teacher with every residual-touching module wrapped, running the student.

`get_red_model(teacher, config, calibration_data)` is the entry point (like PEFT's `get_peft_model`). The
teacher is wrapped in place; `disable_adapter()` gives back its exact forward, `merge_and_unload()` returns
a plain, smaller model of the teacher's class.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..constants import ADAPTER_WEIGHTS_NAME
from ..data import check_not_empty
from .architectures import find_in_layer, get_architecture, model_layout
from .calibrate import collect_activation_stats, select_channels
from .config import RedAdapterConfig
from .initialise import initial_norm_gain, initial_projection
from .layer import FormedWeights, RedEmbedding, RedLayer, RedLinear, RedRMSNorm, RedState
from .merge import build_merged_model
from .remote import adapter_folder, push_adapter


def _store_key(name: str) -> str:
    return name.replace(".", "_")


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


class RedModel(nn.Module):
    """A teacher wrapped so that its forward is the width-d_S student.

    Trainable: one projection (d_T, d_S) per layer and targeted module (or per shared group), one for the
    embedding and one for the LM head (the same one when embeddings are tied), and the student RMSNorm gains.
    Everything of the teacher is frozen.
    """

    # `calibrate.teacher_context` tells a RedModel from a plain model by this flag (no import of this module)
    is_red_model = True

    def __init__(self, model: nn.Module, config: RedAdapterConfig, channels: torch.Tensor | None):
        """`config` is resolved for `model` (`RedAdapterConfig.resolved_for`); `get_red_model` builds both."""
        super().__init__()
        self.base_model = model
        self.red_config = config
        self.architecture = get_architecture(config.model_type)
        self.layout = model_layout(model, self.architecture)
        self._red_state = RedState()
        self._held_weights: FormedWeights | None = None  # between micro-batches of one optimizer step
        self._channels = None if channels is None else torch.as_tensor(channels, dtype=torch.long)
        self.teacher_hidden_size = config.teacher_hidden_size
        self.student_hidden_size = config.student_hidden_size
        for p in model.parameters():
            p.requires_grad_(False)
        generator = torch.Generator().manual_seed(config.seed)
        targets, layout = config.target_modules, self.layout
        created: dict[str, nn.Parameter] = {}  # key -> parameter while wrapping: shared keys get one tensor
        embedding_key = _store_key(layout.embedding)
        self._wrap(layout.embedding, RedEmbedding, created, embedding_key, generator)
        self._wrap(layout.head, RedLinear, created, embedding_key if layout.tied else None, generator, side="input")
        for layer in layout.layers:
            for side in ("input", "output"):
                for short in targets[side]:
                    name = find_in_layer(model, layer, short)
                    group = self.architecture.shared_groups.get(short) if config.share_projections else None
                    key = _store_key(f"{name.rpartition('.')[0]}.{group}" if group else name)
                    self._wrap(name, RedLinear, created, key, generator, side=side)
            for short in targets["norms"]:
                self._wrap(find_in_layer(model, layer, short), RedRMSNorm, created, None, generator)
        self._wrap(layout.final_norm, RedRMSNorm, created, None, generator)
        _guard_wrapped_teacher(model)

    # ----------------------------------------------------------------------------------------- building
    def _wrap(self, name: str, cls: type[RedLayer], created: dict[str, nn.Parameter], key: str | None,
              generator: torch.Generator, **kwargs: Any) -> None:
        base = self.base_model.get_submodule(name)
        key = key or _store_key(name)
        if key not in created:
            created[key] = nn.Parameter(self._initial_value(cls, base, generator))
        _set_submodule(self.base_model, name, cls(base, name, key, created[key], self._red_state, **kwargs))

    def _initial_value(self, cls: type[RedLayer], base: nn.Module, generator: torch.Generator) -> torch.Tensor:
        weight = base.weight
        dtype = self.red_config.trainable_dtype_for(weight.dtype)
        if cls is RedRMSNorm:
            value = initial_norm_gain(weight, self.red_config.norm_init, self._channels, self.student_hidden_size,
                                      norm_offset=self.architecture.norm_offset)
        else:
            value = initial_projection(self.red_config.init, self.teacher_hidden_size, self.student_hidden_size,
                                       channels=self._channels, std=self.red_config.init_std,
                                       generator=generator, dtype=dtype)
        return value.to(device=weight.device, dtype=dtype)

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, *args: Any, red_hidden_and_head: bool = False, **kwargs: Any) -> Any:
        """The student forward (the teacher's under `disable_adapter()`); same signature as the teacher.

        `red_hidden_and_head=True` returns `(last hidden states (B, T, d), LM-head weight (V, d))` of this pass
        instead of logits, for losses that never form (B, T, V) (`logit_loss_from="hidden_states"`). It is a
        forward argument, not a separate method, so it runs through DDP/FSDP/DeepSpeed wrappers and their hooks.
        """
        if not red_hidden_and_head:
            return self.base_model(*args, **kwargs)
        hidden = self.base_model.get_decoder()(*args, **kwargs).last_hidden_state
        head = self.base_model.get_output_embeddings()
        state = self._red_state
        state.emit_weight = True
        try:
            weight = head(hidden)
        finally:
            state.emit_weight = False
        return hidden, weight

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            if name in _WRONG_ON_A_WRAPPED_TEACHER:
                raise AttributeError(
                    f"RedModel.{name} is not available: {_WRONG_ON_A_WRAPPED_TEACHER[name]}") from None
            # everything else is the teacher's (config, generate, device, dtype, gradient checkpointing, ...):
            # its forward is the student's, so these act on the student
            return getattr(self.base_model, name)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the teacher's, in which the student runs and merges (the projections and gains may be
        float32 masters over a bf16 teacher, which transformers' `dtype`, the first parameter's, would report)."""
        return self.base_model.get_input_embeddings().base_layer.weight.dtype

    def get_base_model(self) -> nn.Module:
        """The wrapped teacher (its modules are the RED wrappers; `unload()` gives back the plain teacher)."""
        return self.base_model

    def extra_repr(self) -> str:
        config = self.red_config
        return (f"model_type={config.model_type}, d_T={self.teacher_hidden_size} -> d_S={self.student_hidden_size}, "
                f"init={config.init}, norm_init={config.norm_init}, share_projections={config.share_projections}, "
                f"tied_embeddings={self.layout.tied}")

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within this context the model computes the exact teacher forward (same weights, no copy)."""
        previous = self._red_state.student
        self._red_state.student = False
        try:
            yield
        finally:
            self._red_state.student = previous

    @contextlib.contextmanager
    def capture_activations(self, names: Iterable[str] | None = None,
                            project_targets: dict[str, torch.Tensor] | None = None,
                            lift: Iterable[str] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Record the wrapped modules' outputs during forwards in this context.

        Args:
            names: module names (as in `targeted_module_names`) to record; None records every wrapped module.
                Recording only what a loss uses lets the other outputs be freed as the forward goes.
            project_targets: output-side module name -> a teacher output (B, T, d_T); in the student pass that
                module records `target @ P` (B, T, d_S) under `name + "@P"`, computed inside its own forward, where
                DeepSpeed ZeRO-3 and FSDP have its projection P whole (the clone loss's residual targets).
            lift: output-side module names whose student output is also recorded as `output @ P^T` (B, T, d_T)
                under `name + "@P^T"` (the clone loss in the teacher's space).

        Yields a dict, filled by the forward: module name -> output tensor. Inner-width outputs (q, k, v, gate,
        up pre-activations: (B, T, out)) compare directly between passes; attention and FFN outputs (o_proj,
        down_proj) are (B, T, d_S) in the student pass and (B, T, d_T) in the teacher pass.
        """
        state = self._red_state
        previous = state.capture, state.capture_names, state.clone_targets, state.clone_lift
        lift = frozenset(lift) if lift is not None else None
        for what, given in (("names", names), ("project_targets", project_targets), ("lift", lift)):
            if not given:  # the wrappers are only listed when there is something to check (twice per step)
                continue
            kind = "wrapped" if what == "names" else "output-side wrapped"
            allowed = {name for name, layer in self.red_layers()
                       if what == "names" or (isinstance(layer, RedLinear) and layer.side == "output")}
            unknown = set(given) - allowed
            if unknown:
                raise ValueError(f"capture_activations: {what} {sorted(unknown)[:3]} are not {kind} modules; pass "
                                 "names from `targeted_module_names`.")
        state.capture, state.capture_names = {}, None if names is None else frozenset(names)
        state.clone_targets, state.clone_lift = project_targets, lift
        try:
            yield state.capture
        finally:
            state.capture, state.capture_names, state.clone_targets, state.clone_lift = previous

    @contextlib.contextmanager
    def hold_formed_weights(self, last_micro_batch: bool) -> Iterator[None]:
        """Run one micro-batch (forward and backward) of an optimizer step with the student weights formed once per
        step (gradient accumulation; `FormedWeights`).

        Args:
            last_micro_batch: False for every micro-batch but the optimizer step's last: their forwards reuse the
                weights W_T @ P formed in the step's first micro-batch, and their gradients wait on those weights
                instead of reaching the projections. True for the last: its backward sends its own and the waiting
                gradients through the forming into the projections (so run clipping and the optimizer after it),
                and the weights are forgotten on leaving. An error inside also forgets them.

        Forwards outside this context, and forwards without gradients inside it, form their weights afresh.
        `RedDistillationTrainer` does this for you (`RedConfig.form_student_weights`). Not with DeepSpeed ZeRO-3 or
        FSDP, which free the gathered teacher weights after each forward.
        """
        state = self._red_state
        held = self._held_weights if self._held_weights is not None else FormedWeights()
        held.last_micro_batch = last_micro_batch
        state.formed = held
        try:
            if torch.is_grad_enabled():
                held.form(layer for _, layer in self.red_layers() if isinstance(layer, RedLinear))
            yield
        except BaseException:
            self._held_weights = None
            raise
        finally:
            state.formed = None
        self._held_weights = None if last_micro_batch else held

    @property
    def holds_formed_weights(self) -> bool:
        """Whether student weights (and their pending gradients) are held for the next micro-batch."""
        return self._held_weights is not None

    # ---------------------------------------------------------------------------------- introspection
    def red_layers(self) -> Iterator[tuple[str, RedLayer]]:
        for name, module in self.base_model.named_modules():
            if isinstance(module, RedLayer):
                yield name, module

    def _owned(self, norms: bool) -> dict[str, nn.Parameter]:
        """Adapter key -> trainable parameter, read from the wrappers that own them (a shared key once).

        Derived on each call, never cached: FSDP2 and ZeRO-3 replace the parameter objects on the wrappers."""
        owned: dict[str, nn.Parameter] = {}
        for _, layer in self.red_layers():
            if isinstance(layer, RedRMSNorm) == norms:
                owned.setdefault(layer.key, layer.red_weight)
        return owned

    def _adapter_parameters(self) -> dict[str, nn.Parameter]:
        """Adapter file key (`projections.<key>` / `norms.<key>`) -> the parameter, a shared one once."""
        return {**{f"projections.{key}": p for key, p in self.red_projections.items()},
                **{f"norms.{key}": p for key, p in self.red_norms.items()}}

    @property
    def red_projections(self) -> dict[str, nn.Parameter]:
        """Adapter key -> projection (d_T, d_S), one entry per distinct (possibly shared) projection."""
        return self._owned(norms=False)

    @property
    def red_norms(self) -> dict[str, nn.Parameter]:
        """Adapter key -> student norm gain (d_S,)."""
        return self._owned(norms=True)

    @property
    def targeted_module_names(self) -> list[str]:
        """Names (in the teacher) of every wrapped module."""
        return [name for name, _ in self.red_layers()]

    @property
    def channel_indices(self) -> torch.Tensor | None:
        """(d_S,) selected residual channels, or None when no calibration was run."""
        return self._channels

    def projection(self, module_name: str) -> nn.Parameter:
        """The trainable projection (d_T, d_S) of a wrapped linear or embedding, by its teacher name."""
        return self.base_model.get_submodule(module_name).trainable

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # ---------------------------------------------------------------------------------------- merging
    def merge_and_unload(self, progressbar: bool = False) -> nn.Module:
        """Fold the projections into a plain model of the teacher's class with hidden_size = d_S.

        The RedModel is left as it was (the teacher is not modified).
        """
        return build_merged_model(self, progressbar=progressbar)

    def unload(self) -> nn.Module:
        """Remove the wrappers and return the original teacher (this RedModel is unusable afterwards)."""
        for name, module in list(self.red_layers()):
            _set_submodule(self.base_model, name, module.base_layer)
        for method in _SAVING_METHODS:
            self.base_model.__dict__.pop(method, None)
        return self.base_model

    # ---------------------------------------------------------------------------------- persistence
    def adapter_state_dict(self, model_state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The trainable state: projections and norm gains (one tensor per shared parameter), full tensors.

        Args:
            model_state_dict: a full state dict of this RedModel that an engine already gathered (Trainer under
                FSDP); the adapter tensors are taken from it. Default: read the parameters, which under FSDP2 are
                sharded DTensors and under DeepSpeed ZeRO-3 partitioned: then every rank must call this (it
                all-gathers them).
        """
        params = self._adapter_parameters()
        if model_state_dict is not None:
            names = {id(p): n for n, p in self.named_parameters()}
            return {key: model_state_dict[names[id(p)]] for key, p in params.items()}
        partitioned = [p for p in params.values() if hasattr(p, "ds_id")]
        if partitioned:  # DeepSpeed ZeRO-3 keeps an empty tensor outside forwards: gather (every rank calls this)
            import deepspeed

            with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
                return {key: p.detach().clone() for key, p in params.items()}
        return {key: _full(p.detach()) for key, p in params.items()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy full adapter tensors (`adapter_state_dict()`'s keys) into the parameters (sharded ones too)."""
        expected = self._adapter_parameters()
        if set(state) != set(expected):
            missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise ValueError(f"Adapter weights do not fit this RedModel: missing {missing[:5]}, unexpected "
                             f"{unexpected[:5]} (was it saved with other share_projections/target_modules?).")
        for name, value in state.items():  # all shapes first: a bad file changes nothing
            if value.shape != expected[name].shape:
                raise ValueError(f"Adapter weight {name} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(expected[name].shape)}.")
        with torch.no_grad():
            for name, value in state.items():
                target = expected[name]
                if hasattr(target, "device_mesh"):  # FSDP2: keep this rank's shard of the full tensor
                    from torch.distributed.tensor import distribute_tensor

                    value = distribute_tensor(value.to(target.device, target.dtype), target.device_mesh,
                                              target.placements)
                target.copy_(value)

    def save_pretrained(self, save_directory: str | os.PathLike,
                        adapter_state: dict[str, torch.Tensor] | None = None) -> None:
        """Write `red_adapter_config.json` and `red_adapter_model.safetensors` (each atomically).

        `adapter_state`: the full adapter tensors when the caller gathered them already (a sharded run gathers on
        every rank, then one rank writes); default `adapter_state_dict()`."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, ADAPTER_WEIGHTS_NAME)
        adapter_state = self.adapter_state_dict() if adapter_state is None else adapter_state
        state = {k: v.contiguous().cpu() for k, v in adapter_state.items()}
        save_file(state, path + ".tmp", metadata={"format": "pt", "library": "transformers_red"})
        os.replace(path + ".tmp", path)
        self.red_config.save_pretrained(save_directory)

    def push_to_hub(self, repo_id: str, *, private: bool = False, token: str | None = None,
                    revision: str | None = None, commit_message: str = "Upload RED adapter", api: Any = None,
                    license: str | None = None) -> str:
        """Upload the adapter (config with the selected channels and teacher fingerprint, safetensors projections
        and norm gains, a short card saying which teacher it needs, `base_model_relation: adapter`, and the
        teacher's licence unless `license` is given): never the teacher's weights. Returns the commit URL. To
        publish the merged student instead: `transformers_red.push_compressed(red, repo, merge=True)`.
        """
        return push_adapter(self, repo_id, private=private, token=token, revision=revision,
                            commit_message=commit_message, api=api, license=license)

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | os.PathLike, is_trainable: bool = False, *,
                        revision: str | None = None, token: str | bool | None = None) -> "RedModel":
        """Rebuild a RedModel from its teacher and an adapter: a folder written by `save_pretrained`, or a Hub repo
        id written by `push_to_hub` (downloaded through huggingface_hub; offline mode and the cache respected).

        As PEFT's `PeftModel.from_pretrained`: frozen and in eval mode unless `is_trainable=True` (then the
        projections and norm gains train and the model is in training mode)."""
        path = adapter_folder(path, revision=revision, token=token)
        config = RedAdapterConfig.from_pretrained(path)
        weights = os.path.join(path, ADAPTER_WEIGHTS_NAME)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"No {ADAPTER_WEIGHTS_NAME} in {path!s}.")
        red = get_red_model(model, config)  # resolved_for checks the teacher's fingerprint and weights digest
        red.load_adapter_state_dict(load_file(weights, device=str(next(model.parameters()).device)))
        for p in red.trainable_parameters():
            p.requires_grad_(is_trainable)
        return red.train(is_trainable)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*self.red_projections.values(), *self.red_norms.values()]


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded DTensor (a collective), or the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


# Teacher methods that would do the wrong thing on a wrapped model -> what to call instead
_WRONG_ON_A_WRAPPED_TEACHER = {
    "resize_token_embeddings": "the projections are sized to the teacher's vocabulary and width; resize the "
                               "teacher before get_red_model.",
    "load_adapter": "RED wraps the teacher itself; a transformers/PEFT adapter cannot be added on top. Load a "
                    "RED adapter with RedModel.from_pretrained(teacher, path_or_repo).",
    "add_adapter": "RED wraps the teacher itself; merge first (merge_and_unload()) and add adapters to the student.",
    "set_adapter": "a RedModel has one adapter; use disable_adapter() for the teacher pass.",
    "enable_adapters": "a RedModel's adapter is always on; use disable_adapter() (a context) for the teacher pass.",
    "disable_adapters": "use disable_adapter() (a context manager) for the exact teacher forward.",
    "merge_adapter": "use merge_and_unload(), which returns the plain student.",
    "unmerge_adapter": "the adapter is never merged in place; merge_and_unload() returns a new model.",
}


# The wrapped teacher's own saving methods would write `*.base_layer.weight` / `*.red_weight` keys that load back
# as a freshly initialised teacher; they are shadowed on the instance until `unload()`.
_SAVING_METHODS = ("save_pretrained", "push_to_hub")


def _guard_wrapped_teacher(model: nn.Module) -> None:
    def refuse(method: str):
        def refused(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError(
                f"{type(model).__name__}.{method} on a teacher wrapped by a RedModel would write wrapper keys "
                "(*.base_layer.weight, *.red_weight) that load as a freshly initialised model. Call "
                f"red.{method}(...) for the RED adapter, red.merge_and_unload().{method}(...) for the student, or "
                f"red.unload().{method}(...) for the plain teacher.")
        return refused

    for method in _SAVING_METHODS:
        model.__dict__[method] = refuse(method)


def get_red_model(model: nn.Module, config: RedAdapterConfig, calibration_data: Any = None, tokenizer: Any = None,
                  show_progress_bar: bool = True) -> RedModel:
    """Wrap `model` (the teacher, modified in place) into a `RedModel` following `config`.

    Args:
        model: a causal LM of a registered architecture (`SUPPORTED_MODEL_TYPES`: Llama, Mistral, Qwen2, Qwen3,
            Gemma 2, Gemma 3, Phi-3).
        config: the adapter configuration; a copy is recorded on the RedModel with the teacher's identity and
            the selected channels.
        calibration_data: list of strings, `datasets.Dataset`, or tokenised batches. Needed by
            init="activation" and norm_init="teacher" unless `config.channel_indices` is already set.
        tokenizer: the teacher's tokenizer, for text calibration data.
    """
    if getattr(model, "is_red_model", False):
        raise ValueError("This model is already a RedModel; pass the plain teacher (or call .unload()).")
    if any(isinstance(m, RedLayer) for m in model.modules()):
        raise ValueError("This teacher is already wrapped by a RedModel: get_red_model wraps the teacher in place "
                         "(as PEFT's get_peft_model does), so a second call would calibrate the student. Use the "
                         "RedModel the first call returned, call its .unload() first, or load a fresh teacher.")
    config = config.resolved_for(model)  # raises for unsupported types and widths, before any forward
    channels = config.channel_indices
    if config.needs_calibration:
        channels = calibrate_channels(model, config, calibration_data, tokenizer, show_progress_bar)
        if config.calibration_source is None:
            config.calibration_source = type(calibration_data).__name__
    config.channel_indices = channels
    return RedModel(model, config, None if channels is None else torch.tensor(channels))


def calibrate_channels(model: nn.Module, config: RedAdapterConfig, calibration_data: Any, tokenizer: Any = None,
                       show_progress_bar: bool = True) -> list[int]:
    """The d_S residual channels RED keeps, selected from the teacher's activations on `calibration_data`.

    `config` must be resolved for `model` (`RedAdapterConfig.resolved_for`). Returns the sorted channel indices
    (length d_S), which `RedAdapterConfig(channel_indices=...)` accepts: a multi-process trainer computes them once
    and gives them to every rank. Records on `config` the texts and tokens really used (`calibration_num_texts`,
    `calibration_num_tokens`).
    """
    if calibration_data is None:
        raise ValueError(f"init={config.init!r} with norm_init={config.norm_init!r} selects channels from "
                         "teacher activations: pass calibration_data (e.g. 15 texts), or use "
                         "init='random' with norm_init='ones'.")
    check_not_empty(calibration_data)
    stats = collect_activation_stats(model, calibration_data, tokenizer, num_samples=config.calibration_num_samples,
                                     max_length=config.calibration_max_length,
                                     batch_size=config.calibration_batch_size, seed=config.calibration_seed,
                                     show_progress_bar=show_progress_bar)
    # what was really used (fewer texts than calibration_num_samples when the data is short): the card says it
    config.calibration_num_texts, config.calibration_num_tokens = stats.num_sequences, stats.num_tokens
    return select_channels(stats.scores, config.student_hidden_size).tolist()
