"""Pictures of what a model does, for learners: attention weights recorded from the plain model
(`attention`), what it predicts at each position (`inspection`), the figures (`figures`) and
self-contained HTML pages (`page`). The run report is simplegpt.report; the command is `simplegpt inspect`.
"""

from .attention import attention_weights
from .inspection import Inspection, inspect_text, position_similarity, token_labels

__all__ = ["attention_weights", "Inspection", "inspect_text", "position_similarity", "token_labels"]
