"""For users' tests and ours: tester mixins that prove a new policy meets its interface
(`PolicyTesterMixin` for unified models, `FlowPolicyTesterMixin` for flow models) and tiny random
configs of the real architectures, built locally with no downloads (`tiny_janus_components`,
`tiny_sd3_pipeline`, `tiny_flux_pipeline`, `tiny_clip`, `tiny_ocr`)."""

from unirl_lightning.testing.flow import FlowPolicyTesterMixin
from unirl_lightning.testing.unified import PolicyTesterMixin

__all__ = ["PolicyTesterMixin", "FlowPolicyTesterMixin", "tiny_janus_components", "tiny_sd3_pipeline",
           "tiny_flux_pipeline", "tiny_clip", "tiny_ocr"]


def __getattr__(name: str):
    """The fixtures import transformers' and diffusers' model classes on first use."""
    if name == "tiny_janus_components":
        from unirl_lightning.testing.janus import tiny_janus_components

        return tiny_janus_components
    if name in ("tiny_sd3_pipeline", "tiny_flux_pipeline"):
        from unirl_lightning.testing import pipelines

        return getattr(pipelines, name)
    if name in ("tiny_clip", "tiny_ocr"):
        from unirl_lightning.testing import rewards

        return getattr(rewards, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
