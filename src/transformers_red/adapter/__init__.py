"""The adapter: the frozen teacher wrapped to run the narrow student (calibrate -> initialise -> merge).

Bottom of the package: it imports nothing from training, evaluation, hub or commands.
"""

from .architectures import ARCHITECTURES, SUPPORTED_MODEL_TYPES, Architecture, get_architecture, model_layout
from .calibrate import ActivationStats, collect_activation_stats, select_channels
from .config import RedAdapterConfig
from .initialise import orthogonal_projection, random_projection, selection_matrix
from .layer import RED_LAYER_CLASSES, RedEmbedding, RedLinear, RedRMSNorm
from .merge import student_config
from .model import RedModel, calibrate_channels, get_red_model

__all__ = ["ARCHITECTURES", "ActivationStats", "RED_LAYER_CLASSES", "Architecture", "RedAdapterConfig", "RedEmbedding",
           "RedLinear", "RedModel", "RedRMSNorm", "SUPPORTED_MODEL_TYPES", "calibrate_channels",
           "collect_activation_stats", "get_architecture", "get_red_model", "model_layout", "orthogonal_projection",
           "random_projection", "select_channels", "selection_matrix", "student_config"]
