"""Text policies for UniGRPO's reasoning side (policies.py) and the word-level tokenizer of the
built-in models (words.py)."""

from unirl_lightning.models.text.policies import (
    HFTextPolicy,
    TextPolicy,
    TextRollout,
    TinyTextConfig,
    TinyTextPolicy,
    text_matches,
)
from unirl_lightning.models.text.words import WordTokenizer, world_words

__all__ = ["HFTextPolicy", "TextPolicy", "TextRollout", "TinyTextConfig", "TinyTextPolicy", "text_matches",
           "WordTokenizer", "world_words"]
