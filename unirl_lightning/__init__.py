"""unirl-lightning: self-improving post-training of unified multimodal models with Lightning."""

__version__ = "0.1.0"
