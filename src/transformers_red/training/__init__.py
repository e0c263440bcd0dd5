"""Distillation (step 3 of the pipeline): `RedConfig`, `RedDistillationTrainer`, the losses and the callbacks.

Above the adapter and the evaluation; below the commands.
"""

from .callbacks import ERankCallback
from .clone import CloneLoss
from .config import RedConfig
from .losses import generalized_jsd_loss
from .trainer import RedDistillationTrainer

__all__ = ["CloneLoss", "ERankCallback", "RedConfig", "RedDistillationTrainer", "generalized_jsd_loss"]
