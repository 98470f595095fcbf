"""Text policies for UniGRPO's reasoning side: the interface, any causal LM through transformers,
and the built-in tiny policy."""

from unirl_lightning.models.text.policies import (
    HFTextPolicy,
    TextPolicy,
    TextRollout,
    TinyTextConfig,
    TinyTextPolicy,
    text_matches,
)

__all__ = ["HFTextPolicy", "TextPolicy", "TextRollout", "TinyTextConfig", "TinyTextPolicy", "text_matches"]
