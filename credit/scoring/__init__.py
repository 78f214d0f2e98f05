"""Teacher scoring by concern: the TeacherScorer (scorer.py) and what it is built from.

    attention.py   the "credit_tree" attention hook transformers calls in every layer during a tree forward
    inspection.py  whether the tree path reproduces a model exactly (families, heads, sliding windows)
    validation.py  host-side checks of token ids, pairs and top-k ids; the work items of a call
    projection.py  hidden rows / logits -> fp32 log-probs at target ids, or at top-k ids plus the tail
    chunks.py      which sequences share a packed forward (tree) or a padded batch (naive)
    scorer.py      TeacherScorer: both backends
"""

from credit.scoring.attention import ATTN_IMPLEMENTATION
from credit.scoring.inspection import SUPPORTED_MODEL_TYPES
from credit.scoring.scorer import TeacherScorer, TeacherScores, TeacherTopk

__all__ = ["ATTN_IMPLEMENTATION", "SUPPORTED_MODEL_TYPES", "TeacherScorer", "TeacherScores", "TeacherTopk"]
