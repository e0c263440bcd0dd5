"""Parameter ownership, the property FSDP and DeepSpeed ZeRO-3 need, on every registered architecture.

FSDP shards a parameter with the unit of the module that registers it and gathers it before that unit's forward;
ZeRO-3 gathers a module's parameters in that module's forward hooks (a RED wrapper's whole subtree: the wrappers
are ZeRO-3 leaf modules). So every use of a parameter during a forward must happen inside the forward of a module
that holds it, and every trainable tensor must be registered by the wrapper whose forward uses it. The uses are
recorded, not assumed: forward hooks keep the stack of running modules, a `TorchFunctionMode` sees every tensor
that reaches a torch function.
"""

from __future__ import annotations

import pytest
import torch
from testing_utils import make_teacher
from torch import nn
from torch.overrides import TorchFunctionMode

from transformers_red import RedAdapterConfig, get_red_model
from transformers_red.adapter.layer import RED_LAYER_CLASSES, RedLayer


class _ParameterUses(TorchFunctionMode):
    """Records (parameter, stack of running modules) for every parameter passed to a torch function."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.params = {id(p): p for p in model.parameters()}
        self.stack: list[nn.Module] = []
        self.uses: list[tuple[nn.Parameter, tuple[nn.Module, ...]]] = []
        self.handles = []
        for module in model.modules():
            self.handles.append(module.register_forward_pre_hook(self._enter))
            self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, module: nn.Module, _inputs) -> None:
        self.stack.append(module)

    def _leave(self, module: nn.Module, _inputs, _output) -> None:
        assert self.stack.pop() is module

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for value in [*args, *kwargs.values()]:
            for tensor in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(tensor, torch.Tensor) and id(tensor) in self.params and self.stack:
                    self.uses.append((self.params[id(tensor)], tuple(self.stack)))
        return func(*args, **kwargs)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _record_uses(red, input_ids: torch.Tensor, student: bool):
    recorder = _ParameterUses(red)
    try:
        with recorder, torch.no_grad():
            if student:
                red(input_ids=input_ids)
            else:
                with red.disable_adapter():
                    red(input_ids=input_ids)
    finally:
        recorder.remove()
    return recorder.uses


def _violations(uses) -> list[str]:
    """Uses outside the forward of a module holding the parameter (the nearest wrapper's subtree, or the
    innermost module's own parameters outside wrappers)."""
    bad = []
    for param, stack in uses:
        wrapper = next((m for m in reversed(stack) if isinstance(m, RedLayer)), None)
        if wrapper is not None:
            ok = any(p is param for p in wrapper.parameters())
            if param.requires_grad:  # a trainable tensor: owned by the very wrapper that uses it
                ok = wrapper.red_weight is param
        else:
            ok = any(p is param for p in stack[-1].parameters(recurse=False))
        if not ok:
            bad.append(f"{tuple(param.shape)} used in {type(stack[-1]).__name__} "
                       f"(nearest wrapper: {getattr(wrapper, 'name', None)})")
    return bad


@pytest.mark.parametrize("share", [False, True], ids=["own", "shared"])
def test_every_parameter_is_used_only_inside_the_forward_of_a_module_that_owns_it(arch, texts, tokenizer,
                                                                                   input_ids, share):
    red = get_red_model(make_teacher(*arch), RedAdapterConfig(width_ratio=0.5, share_projections=share), texts,
                        tokenizer, show_progress_bar=False)
    for student in (True, False):
        uses = _record_uses(red, input_ids, student)
        assert uses, "nothing was recorded: the recorder is broken"
        assert _violations(uses) == [], f"student={student}"
    # each trainable tensor is registered by exactly the wrappers whose student forward uses it
    users: dict[int, set[str]] = {}
    for param, stack in _record_uses(red, input_ids, True):
        if param.requires_grad:
            users.setdefault(id(param), set()).add(next(m.name for m in reversed(stack) if isinstance(m, RedLayer)))
    owners: dict[int, set[str]] = {}
    for _, layer in red.red_layers():
        owners.setdefault(id(layer.red_weight), set()).add(layer.name)
    assert users == owners
    trainable = [p for p in red.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == set(owners)
    if share and arch[0] != "phi3":  # Phi-3's q/k/v and gate/up are fused modules already: nothing to share
        # a shared group is one tensor registered in several wrappers of the same decoder layer
        assert any(len(names) > 1 and len({n.split(".self_attn")[0].split(".mlp")[0] for n in names}) == 1
                   for names in owners.values())


def test_the_recorder_catches_a_parameter_read_outside_its_owner(texts, tokenizer, input_ids):
    """The ownership check fails on the layout this library had before (projections in a root ParameterDict)."""
    red = get_red_model(make_teacher("llama", False, {}), RedAdapterConfig(width_ratio=0.5), texts, tokenizer,
                        show_progress_bar=False)
    layer = red.base_model.get_submodule("model.layers.0.self_attn.q_proj")
    stray = nn.Parameter(layer.red_weight.detach().clone())
    red.register_parameter("stray_projection", stray)  # owned by the root, used by the wrapper
    layer.__dict__["_stray"] = stray
    layer.forward = lambda x: torch.nn.functional.linear(x, layer.base_layer.weight @ layer._stray)
    assert any("q_proj" in v for v in _violations(_record_uses(red, input_ids, True)))


def test_zero3_leaf_units_are_the_wrappers_that_read_their_base_weight():
    """RedLinear and RedRMSNorm read `base_layer.weight` in their own forward (one ZeRO-3 unit with it); RedEmbedding
    calls its base layer, whose own hooks gather the table, and must not be a leaf: a leaf's gradients are reduced
    in its backward hook, which for integer inputs fires before the projection's gradient exists (the untied ZeRO-3
    case in tests/test_distributed.py)."""
    from transformers_red.adapter.layer import RedEmbedding
    from transformers_red.training.distributed import ZERO3_LEAF_CLASSES

    assert all(issubclass(cls, RedLayer) for cls in RED_LAYER_CLASSES)
    assert set(ZERO3_LEAF_CLASSES) == set(RED_LAYER_CLASSES) - {RedEmbedding}
