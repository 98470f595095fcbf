"""Every flow policy family meets the `FlowPolicy` interface: the built-in model, SD3 and FLUX through
diffusers (tiny random pipelines built locally), each run through `FlowPolicyTesterMixin`."""

from __future__ import annotations

import pytest
from unirl_lightning.models import (
    DiffusersFlowPolicy,
    FlowPolicy,
    DiffusersFluxPolicy,
    TinyFlowConfig,
    TinyFlowModel,
)
from unirl_lightning.testing import FlowPolicyTesterMixin, tiny_flux_pipeline, tiny_sd3_pipeline


class TestTinyFlowModel(FlowPolicyTesterMixin):
    def make_policy(self):
        return TinyFlowModel(TinyFlowConfig(num_layers=1, num_heads=2, head_dim=8, text_dim=16))


class TestDiffusersSD3(FlowPolicyTesterMixin):
    @pytest.fixture(autouse=True)
    def _pipeline(self, tmp_path_factory):
        self.folder = tmp_path_factory.mktemp("sd3")
        tiny_sd3_pipeline(self.folder)

    def make_policy(self):
        return DiffusersFlowPolicy(
            str(self.folder), resolution=64, torch_dtype="float32", max_sequence_length=8, drop_t5=True
        )


class TestDiffusersFlux(FlowPolicyTesterMixin):
    cfg_scales = (1.0,)  # FLUX.1-dev is guidance-distilled: guidance is an input, not a second pass

    @pytest.fixture(autouse=True)
    def _pipeline(self, tmp_path_factory):
        self.folder = tmp_path_factory.mktemp("flux")
        tiny_flux_pipeline(self.folder)

    def make_policy(self):
        return DiffusersFluxPolicy(
            str(self.folder), resolution=64, torch_dtype="float32", max_sequence_length=12
        )


def test_saving_and_loading_are_part_of_the_flow_policy_contract():
    assert {
        "save_pretrained",
        "from_pretrained",
        "encode_text",
        "forward_velocity",
        "decode",
        "latent_shape",
    } == set(FlowPolicy.__abstractmethods__)
