"""The demo material, apart from the library core: the chain-reasoning task, the packaged teacher trained on it
(`reasoning_teacher/`), the RED-vs-random comparison it runs and its plots."""

from .run import VARIANTS, format_demo, run_demo

__all__ = ["VARIANTS", "format_demo", "run_demo"]
