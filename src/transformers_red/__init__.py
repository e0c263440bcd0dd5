"""transformers_red: width-reducing distillation that keeps multi-step reasoning (RED, arXiv 2605.29327).

Pipeline: calibrate -> initialise -> distil -> merge -> evaluate -> publish.
"""

from importlib import import_module
from typing import TYPE_CHECKING

from .constants import __version__ as __version__

# public name -> the module that defines it; imported on first use, so `import transformers_red` (and the command
# line's --help) does not import torch, transformers or TRL until something needs them
_EXPORTS = {
    "ActivationStats": ".adapter.calibrate",
    "collect_activation_stats": ".adapter.calibrate",
    "select_channels": ".adapter.calibrate",
    "ARCHITECTURES": ".adapter.architectures",
    "Architecture": ".adapter.architectures",
    "SUPPORTED_MODEL_TYPES": ".adapter.architectures",
    "TARGET_MODULES_MAPPING": ".adapter.architectures",
    "RedAdapterConfig": ".adapter.config",
    "orthogonal_projection": ".adapter.initialise",
    "random_projection": ".adapter.initialise",
    "selection_matrix": ".adapter.initialise",
    "RedEmbedding": ".adapter.layer",
    "RedLinear": ".adapter.layer",
    "RedRMSNorm": ".adapter.layer",
    "student_config": ".adapter.merge",
    "RedModel": ".adapter.model",
    "get_red_model": ".adapter.model",
    "effective_rank": ".evaluation.erank",
    "layerwise_effective_rank": ".evaluation.erank",
    "projection_spectra": ".evaluation.erank",
    "spectrum_effective_rank": ".evaluation.erank",
    "evaluate_compressed": ".evaluation.lm_eval",  # needs the optional lm-evaluation-harness
    "HubPushError": ".hub",
    "build_model_card": ".hub",
    "push_compressed": ".hub",
    "ERankCallback": ".training.callbacks",
    "CloneLoss": ".training.clone",
    "RedConfig": ".training.config",
    "generalized_jsd_loss": ".training.losses",
    "estimate_memory": ".training.memory_plan",
    "RedDistillationTrainer": ".training.trainer",
}

if TYPE_CHECKING:  # static analysers and IDEs see the real imports
    from .adapter.architectures import ARCHITECTURES, SUPPORTED_MODEL_TYPES, TARGET_MODULES_MAPPING, Architecture
    from .adapter.calibrate import ActivationStats, collect_activation_stats, select_channels
    from .adapter.config import RedAdapterConfig
    from .adapter.initialise import orthogonal_projection, random_projection, selection_matrix
    from .adapter.layer import RedEmbedding, RedLinear, RedRMSNorm
    from .adapter.merge import student_config
    from .adapter.model import RedModel, get_red_model
    from .evaluation.erank import effective_rank, layerwise_effective_rank, projection_spectra, spectrum_effective_rank
    from .evaluation.lm_eval import evaluate_compressed
    from .hub import HubPushError, build_model_card, push_compressed
    from .training.callbacks import ERankCallback
    from .training.clone import CloneLoss
    from .training.config import RedConfig
    from .training.losses import generalized_jsd_loss
    from .training.memory_plan import estimate_memory
    from .training.trainer import RedDistillationTrainer


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "ActivationStats",
    "ERankCallback",
    "HubPushError",
    "build_model_card",
    "CloneLoss",
    "push_compressed",
    "RedConfig",
    "RedDistillationTrainer",
    "generalized_jsd_loss",
    "RedAdapterConfig",
    "RedEmbedding",
    "RedLinear",
    "RedModel",
    "RedRMSNorm",
    "SUPPORTED_MODEL_TYPES",
    "TARGET_MODULES_MAPPING",
    "collect_activation_stats",
    "effective_rank",
    "estimate_memory",
    "evaluate_compressed",
    "get_red_model",
    "layerwise_effective_rank",
    "orthogonal_projection",
    "projection_spectra",
    "random_projection",
    "select_channels",
    "selection_matrix",
    "spectrum_effective_rank",
    "student_config",
]
