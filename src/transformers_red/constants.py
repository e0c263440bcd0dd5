"""Names shared across the package: the paper, the Hub tags, and the files of saved adapters and students.

What `save_model` / `export_student` write and what the hub utilities read are named here once.
"""

import textwrap

__version__ = "0.1.0"  # also in pyproject.toml

PAPER_ID = "2605.29327"
PAPER_TITLE = f"RED (arXiv:{PAPER_ID})"
PAPER_CITATION = textwrap.dedent(f"""\
    @misc{{red{PAPER_ID},
        howpublished = {{arXiv:{PAPER_ID}}},
        note         = {{RED: activation-aware channel-selection initialisation for width-reducing distillation}}
    }}""")
# The RedConfig fields that define what is distilled and how: the one list the run identity (a resume must not
# change them), the saved summary and the model card read. A new loss setting is added here, and nowhere else.
LOSS_SETTINGS = ("train", "temperature", "beta", "ce_weight", "kd_weight", "clone_weight", "clone_terms",
                 "clone_output_space", "clone_normalization", "lmbda", "max_new_tokens")

# Hub tags of a published student (TRL adds "trl" to a trainer's own)
TAGS = ["transformers_red", "red", "distillation", "width-pruning"]

# An adapter (RedModel.save_pretrained, checkpoints of train="projections")
ADAPTER_CONFIG_NAME = "red_adapter_config.json"
ADAPTER_WEIGHTS_NAME = "red_adapter_model.safetensors"
# A merged student folder (trainer.save_model): transformers' own files plus
STUDENT_WEIGHTS_NAME = "model.safetensors"  # also the checkpoints of train="weights"
STUDENT_SUMMARY_NAME = "red_summary.json"  # what was distilled how: adapter, losses, tokens, steps
CONFIG_SUMMARY_KEY = "red_summary"  # the same summary inside the merged student's config.json
LEGACY_SUMMARY_NAME = "red_config.json"  # the name older exports gave the summary; still read
ERANK_NAME = "erank.json"  # teacher per-layer eRank and the student's eRank history
EXPORT_INCOMPLETE_NAME = ".red_export_incomplete"  # present while an export is being moved into place
CARD_ERANK_NAME = "red_erank.json"  # the per-layer eRank the model card points to (written at push)
