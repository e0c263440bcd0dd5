"""transformers_red: width-reducing distillation that keeps multi-step reasoning (RED, arXiv 2605.29327).

Pipeline: calibrate -> initialise -> distil -> merge -> evaluate -> publish.
"""

from .adapter.architectures import ARCHITECTURES, SUPPORTED_MODEL_TYPES, TARGET_MODULES_MAPPING, Architecture
from .adapter.calibrate import ActivationStats, collect_activation_stats, select_channels
from .adapter.config import RedAdapterConfig
from .adapter.initialise import orthogonal_projection, random_projection, selection_matrix
from .adapter.layer import RedEmbedding, RedLinear, RedRMSNorm
from .adapter.merge import student_config
from .adapter.model import RedModel, get_red_model
from .constants import __version__ as __version__
from .evaluation.erank import effective_rank, layerwise_effective_rank, projection_spectra, spectrum_effective_rank
from .hub import HubPushError, build_model_card, push_compressed
from .training.callbacks import ERankCallback
from .training.clone import CloneLoss
from .training.config import RedConfig
from .training.losses import generalized_jsd_loss
from .training.memory_plan import estimate_memory
from .training.trainer import RedDistillationTrainer


def __getattr__(name: str):
    # lm-evaluation-harness is optional: import the evaluation entry point only when it is asked for
    if name == "evaluate_compressed":
        from .evaluation.lm_eval import evaluate_compressed

        return evaluate_compressed
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
