"""Step 3 of the pipeline (part): the activation-clone term of the loss (docs/method.md section 2).

The clone term compares module outputs of the student and the teacher: the q, k, v, gate, up pre-activations
(same inner width in both) and the attention / FFN outputs (residual space, brought into one space through the
module's projection P). Two forms:

- `"none"`: LRC's and the paper's plain MSE, summed over layers. Its scale is the scale of the teacher's
  activations, so on a model with massive activations (SmolLM2: a few residual channels of size ~1e3 that RED's
  selection keeps) it is ~99 % of the loss and drowns the logit terms.
- `"teacher_mean_square"` (default): each module's MSE divided by the mean square of its target on the
  calibration texts (measured once, at initialisation), then averaged over layers: a relative error, the same
  scale for every model, layer and init. The divisors are constants, so gradient accumulation stays exact.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ..adapter.architectures import RESIDUAL_TERMS, Architecture, ModelLayout, find_in_layer
from ..adapter.layer import LIFTED_SUFFIX, PROJECTED_SUFFIX
from .losses import masked_mse_sum

CLONE_NORMALIZATIONS = ("teacher_mean_square", "none")
# one compared output: (module name, rows of its output or None for all of them)
CloneSite = tuple[str, slice | None]


def clone_sites(model: nn.Module, architecture: Architecture, layout: ModelLayout, terms: Iterable[str]
                ) -> dict[str, list[CloneSite]]:
    """Clone term -> the compared output in every decoder layer of `model`, from the architecture registry
    (fused modules such as Phi-3's qkv_proj give each of q / k / v its own rows)."""
    sites = {}
    for term in terms:
        target = architecture.clone_targets.get(term)
        if target is None:
            raise ValueError(f"clone term {term!r} has no module in a {model.config.model_type!r} model; "
                             f"its terms are {sorted(architecture.clone_targets)}.")
        rows = architecture.clone_rows(term, model.config)
        sites[term] = [(find_in_layer(model, layer, target.module), rows) for layer in layout.layers]
    return sites


@contextlib.contextmanager
def capture_outputs(model: nn.Module, names: Iterable[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of `model`'s submodules `names` during forwards in this context (forward hooks).

    For plain models (a separate teacher, a merged student); a `RedModel` has its own `capture_activations`.
    """
    outputs: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda _m, _i, out, n=n: outputs.__setitem__(n, out))
             for n in names]
    try:
        yield outputs
    finally:
        for h in hooks:
            h.remove()


class CloneLoss:
    """Per clone term, the sum over trained tokens of the (normalised) per-token MSE, over layers.

    Args:
        module_names: clone term -> the compared outputs (module name, rows), one per layer (`clone_sites`).
        projection: module name -> its (d_T, d_S) projection P (used for the attention / FFN outputs).
        output_space: "student" (teacher output @ P against the student output; the paper) or "teacher"
            (student output @ P^T against the teacher output; LRC's code).
        normalization: "teacher_mean_square" or "none" (see the module docstring).
    """

    def __init__(self, module_names: dict[str, list[CloneSite]], projection: Callable[[str], torch.Tensor],
                 output_space: str = "student", normalization: str = "teacher_mean_square"):
        self.module_names, self.projection = module_names, projection
        self.output_space, self.normalization = output_space, normalization
        # (term, module name) -> target mean square, set by `calibrate`
        self.scales: dict[tuple[str, str], float] | None = None

    @property
    def names(self) -> frozenset[str]:
        """The modules whose outputs must be captured."""
        return frozenset(name for sites in self.module_names.values() for name, _ in sites)

    def student_requests(self, teacher: dict[str, torch.Tensor]) -> dict[str, Any]:
        """`RedModel.capture_activations` arguments for the student pass: the products with P that the residual
        terms compare, made inside the wrappers' forwards (where sharding engines have P whole).

        Args:
            teacher: the teacher pass's captured outputs, module name -> (B, T, d_T) for the residual modules.
        """
        residual = [name for term in RESIDUAL_TERMS for name, _ in self.module_names.get(term, [])]
        if self.output_space == "student":
            return {"project_targets": {name: teacher[name] for name in residual}}
        return {"lift": residual}

    def pair(self, term: str, name: str, rows: slice | None, student: torch.Tensor, teacher: torch.Tensor,
             products: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(student, target) of one module output in the space where they are compared, each (B, T, D).

        Args:
            student, teacher: the module's outputs, (B, T, out) for the inner-width terms, (B, T, d_S) and
                (B, T, d_T) for the residual ones.
            products: the student pass's captures, holding `name@P` / `name@P^T` when the wrappers made them
                (`student_requests`); otherwise P is read through `projection` (a plain student's fixed
                projections, the calibration before training).
        """
        if term not in RESIDUAL_TERMS:
            return (student, teacher) if rows is None else (student[..., rows], teacher[..., rows])
        products = products or {}
        if self.output_space == "student":
            target = products.get(name + PROJECTED_SUFFIX)
            return student, self.target(term, name, rows, teacher, student.dtype) if target is None else target
        lifted = products.get(name + LIFTED_SUFFIX)
        return (student @ self.projection(name).to(student.dtype).T if lifted is None else lifted), teacher

    def target(self, term: str, name: str, rows: slice | None, teacher: torch.Tensor,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        """What the student output of one module is compared with, computed from the teacher's output alone.

        Args:
            teacher: the module's teacher output, (B, T, out) or (B, T, d_T) for the residual terms.
            dtype: the compute dtype of a product with P (default the teacher output's).
        """
        if term not in RESIDUAL_TERMS:
            return teacher if rows is None else teacher[..., rows]
        if self.output_space == "teacher":
            return teacher
        dtype = dtype or teacher.dtype
        return teacher.to(dtype) @ self.projection(name).to(dtype)

    @torch.no_grad()
    def calibrate(self, teacher_outputs: Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]]) -> None:
        """Measure each module's target mean square from teacher passes (outputs per name, (B, T) token mask)."""
        if self.normalization == "none":
            return
        sums = {(term, name): 0.0 for term, sites in self.module_names.items() for name, _ in sites}
        tokens = 0
        for outputs, mask in teacher_outputs:
            tokens += int(mask.sum())
            for term, sites in self.module_names.items():
                for name, rows in sites:
                    target = self.target(term, name, rows, outputs[name])
                    sums[term, name] += float(masked_mse_sum(target, torch.zeros_like(target), mask))
        if tokens == 0:
            raise ValueError("The clone normalisation needs calibration texts with at least one token.")
        # an output whose target is exactly zero would divide by 0: leave it unnormalised
        self.scales = {key: (total / tokens) or 1.0 for key, total in sums.items()}

    def sums(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
             token_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per term, () float32 summed over the tokens where `token_mask` (B, T) is True."""
        if self.normalization != "none" and self.scales is None:
            raise RuntimeError("CloneLoss.calibrate must run before the normalised clone loss is used.")
        result = {}
        for term, sites in self.module_names.items():
            total = token_mask.new_zeros((), dtype=torch.float32)
            for name, rows in sites:
                s, t = self.pair(term, name, rows, student[name], teacher[name], student)
                value = masked_mse_sum(s, t, token_mask)
                total = total + (value if self.scales is None else value / self.scales[term, name])
            result[term] = total if self.normalization == "none" else total / max(1, len(sites))
        return result
