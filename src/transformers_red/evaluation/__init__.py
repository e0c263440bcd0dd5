"""Measuring models (step 5 of the pipeline): eRank, perplexity, the step-0 inspection report, and lm-eval with
its offline tasks (`lm_eval.py`, imported on demand: lm-evaluation-harness is optional)."""

from .erank import effective_rank, layerwise_effective_rank, projection_spectra, spectrum_effective_rank
from .perplexity import perplexity

__all__ = ["effective_rank", "layerwise_effective_rank", "perplexity", "projection_spectra",
           "spectrum_effective_rank"]
