"""Flux behind the flow-policy interface, on a tiny random FLUX.1-dev-style pipeline built locally:
packing matches the pipeline's, noise 0 reproduces `FluxPipeline`'s own sampling loop, on-policy
ratios are 1, LoRA and saving round-trip."""

import pytest
import torch

from unirl_lightning.testing import tiny_flux_pipeline
from unirl_lightning.models.flow.flux import (
    DiffusersFluxPolicy,
    dynamic_shift,
    image_ids,
    pack_latents,
    unpack_latents,
)

PROMPTS = ["a red square", "two circles"]


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux") / "pipe"
    tiny_flux_pipeline(folder)
    return folder


def _policy(folder, **kwargs) -> DiffusersFluxPolicy:
    return DiffusersFluxPolicy(
        str(folder), resolution=64, torch_dtype="float32", max_sequence_length=12, **kwargs
    )


def test_packing_and_ids_match_the_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 8, 6)
    tokens = pack_latents(x)
    torch.testing.assert_close(tokens, FluxPipeline._pack_latents(x, 2, 4, 8, 6), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(tokens, 8, 6), x, rtol=0, atol=0)
    expected = FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32)
    torch.testing.assert_close(image_ids(8, 6, torch.device("cpu"), torch.float32), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.randn(1, 4, 5, 6))


def test_dynamic_shift_is_linear_in_the_token_count():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
    for n in (16, 256, 1024, 4096):
        assert dynamic_shift(n, config) == pytest.approx(calculate_shift(n, 256, 4096, 0.5, 1.15))


def test_noise_zero_reproduces_the_flux_pipeline(flux_folder):
    """Our ODE sampler (sde_step with noise 0 on Flux's shifted schedule) == FluxPipeline's loop."""
    from diffusers import FluxPipeline

    policy = _policy(flux_folder)
    assert policy.latent_shape == (4, 8, 8)
    x0 = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    ours = policy.sample(PROMPTS, num_steps=4, noise_level=0.0, latents=x0, decode=False).latents[:, -1]
    pipe = FluxPipeline.from_pretrained(flux_folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        PROMPTS,
        height=64,
        width=64,
        num_inference_steps=4,
        guidance_scale=policy.guidance_scale,
        latents=pack_latents(x0),
        output_type="latent",
        max_sequence_length=12,
    ).images
    torch.testing.assert_close(pack_latents(ours), theirs, rtol=1e-4, atol=1e-5)


def test_grouped_flux_rollout_shares_the_ode_prefix_and_rescores_on_policy(flux_folder):
    policy = _policy(flux_folder)
    prompts, groups = [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2, torch.tensor([0, 0, 1, 1])
    x0 = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0)).repeat_interleave(
        2, 0
    )
    grouped = policy.sample(
        prompts,
        num_steps=4,
        noise_level=0.7,
        sde_window=(2, 4),
        latents=x0,
        groups=groups,
        generator=torch.Generator().manual_seed(1),
        decode=False,
    )
    full = policy.sample(prompts, num_steps=4, noise_level=0.0, latents=x0, decode=False)
    torch.testing.assert_close(grouped.latents[:, :3], full.latents[:, :3], rtol=1e-4, atol=1e-5)
    assert not torch.equal(grouped.latents[0, 3], grouped.latents[1, 3])
    torch.testing.assert_close(
        policy.step_log_prob(grouped, 2).log_prob, grouped.log_probs[:, 2], rtol=0, atol=1e-5
    )


def test_flux_sde_rollout_rescoring_lora_and_saving(flux_folder, tmp_path):
    policy = _policy(flux_folder)
    assert not policy.text_trainable
    assert policy.fsdp_units()[:2] == [
        policy.transformer.transformer_blocks[0],
        policy.transformer.single_transformer_blocks[0],
    ]
    rollout = policy.sample(PROMPTS, num_steps=4, noise_level=0.7, generator=torch.Generator().manual_seed(1))
    assert rollout.images.shape == (2, 3, 64, 64) and rollout.images.dtype == torch.uint8
    out = policy.step_log_prob(rollout, 1)  # on-policy: the stored log-prob exactly
    torch.testing.assert_close(out.log_prob, rollout.log_probs[:, 1], rtol=0, atol=1e-5)
    out.log_prob.sum().backward()
    assert policy.transformer.proj_out.weight.grad is not None

    policy.add_lora(4, 8.0)  # double- and single-stream attention projections
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n for n in names)
    assert any("single_transformer_blocks" in n for n in names)
    with torch.no_grad():
        for name, p in policy.transformer.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.1)
    x, sigma, cond = torch.randn(2, *policy.latent_shape), torch.full((2,), 0.5), policy.encode_text(PROMPTS)
    with torch.no_grad():
        v_lora = policy.velocity(x, sigma, cond)
        with policy.adapters_disabled():
            assert not torch.allclose(policy.velocity(x, sigma, cond), v_lora, atol=1e-4)
    policy.save_pretrained(tmp_path / "saved")
    loaded = DiffusersFluxPolicy.from_pretrained(tmp_path / "saved")
    assert loaded.options() == policy.options()
    with torch.no_grad():
        torch.testing.assert_close(loaded.velocity(x, sigma, cond), v_lora, rtol=1e-4, atol=1e-5)

    from unirl_lightning.models.flow import DiffusersFlowPolicy

    with pytest.raises(ValueError, match="saved by DiffusersFluxPolicy"):
        DiffusersFlowPolicy.from_pretrained(tmp_path / "saved")


@pytest.mark.parametrize(
    "name", ["sd35_flow_grpo.yaml", "flux_flow_grpo.yaml", "sd35_diffusion_nft.yaml", "sd35_awm.yaml"]
)
def test_real_model_flow_configs_instantiate_through_the_cli(name, tmp_path, flux_folder):
    """The SD3.5 and FLUX.1 configs as shipped (FSDP2 block, LoRA) parse; with a tiny local
    pipeline, prompt files and a CPU trainer they build FlowGRPO around the pipeline policy."""
    from pathlib import Path

    import yaml

    from unirl_lightning.testing import tiny_sd3_pipeline
    from unirl_lightning.cli import cli_main
    from unirl_lightning.data import generate_specs, save_specs, world_vocabulary
    from unirl_lightning.models.flow import PipelineFlowPolicy

    config = Path(__file__).resolve().parents[1] / "configs" / name
    cfg = yaml.safe_load(config.read_text())
    assert cfg["trainer"]["strategy"]["class_path"].endswith("ModelParallelStrategy")  # FSDP2
    policy_args = [
        "--model.init_args.policy.init_args.resolution",
        "64",
        "--model.init_args.policy.init_args.torch_dtype",
        "float32",
        "--model.init_args.policy.init_args.max_sequence_length",
        "12",
    ]
    if name.startswith("sd35"):
        tiny_sd3_pipeline(tmp_path / "sd3")
        policy_args += [
            "--model.init_args.policy.init_args.pretrained",
            str(tmp_path / "sd3"),
            "--model.init_args.policy.init_args.drop_t5",
            "true",
        ]
    else:
        policy_args += ["--model.init_args.policy.init_args.pretrained", str(flux_folder)]
    for split in ("train", "val"):
        save_specs(generate_specs(6, world_vocabulary(), seed=len(split)), tmp_path / f"{split}.jsonl")
    cli = cli_main(
        [
            "--config",
            str(config),
            *policy_args,
            "--data.init_args.train_prompts",
            str(tmp_path / "train.jsonl"),
            "--data.init_args.val_prompts",
            str(tmp_path / "val.jsonl"),
            "--data.init_args.vocabulary",
            "null",
            "--model.init_args.detector",
            "null",
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "1",
            "--trainer.strategy",
            "auto",
            "--trainer.precision",
            "32-true",
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
        ],
        run=False,
    )
    module = cli.model
    assert isinstance(module.policy, PipelineFlowPolicy) and module.reference is None  # LoRA: no copy
    module.setup("fit")
    assert module.policy.lora_scaling == 2.0  # alpha 64 / r 32
    assert all(".lora_" in n for n, p in module.policy.named_parameters() if p.requires_grad)


def test_sd35_config_trains_one_step_with_mask2former_geneval_and_pickscore_from_folders(tmp_path):
    """configs/sd35_flow_grpo.yaml at tiny size: its GenEval reward judged by the config's
    Mask2Former + CLIP detector and a PickScore term, each loaded from a local folder (tiny random
    models), through one optimiser step."""
    from pathlib import Path

    import transformers

    from unirl_lightning.cli import cli_main
    from unirl_lightning.data import generate_specs, save_specs, world_vocabulary
    from unirl_lightning.evaluation import Mask2FormerDetector
    from unirl_lightning.rewards import GenEvalReward, PickScoreReward
    from unirl_lightning.testing import tiny_clip, tiny_sd3_pipeline

    clip, processor = tiny_clip()
    clip.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    swin = transformers.SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1],
                                   num_heads=[1, 1, 1, 1], window_size=2,
                                   out_features=["stage1", "stage2", "stage3", "stage4"])  # fmt: skip
    names = {0: "circle", 1: "square", 2: "triangle", 3: "cross"}
    m2f = transformers.Mask2FormerConfig(backbone_config=swin, feature_size=32, mask_feature_size=32,
                                         hidden_dim=32, encoder_feedforward_dim=32, dim_feedforward=32,
                                         encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                                         num_queries=6, num_labels=4, id2label=names,
                                         label2id={v: k for k, v in names.items()})  # fmt: skip
    transformers.Mask2FormerForUniversalSegmentation(m2f).save_pretrained(tmp_path / "m2f")
    transformers.Mask2FormerImageProcessorPil(size_divisor=32).save_pretrained(tmp_path / "m2f")
    tiny_sd3_pipeline(tmp_path / "sd3")
    for split in ("train", "val"):
        save_specs(generate_specs(6, world_vocabulary(), seed=len(split)), tmp_path / f"{split}.jsonl")
    rewards = (
        "[{class_path: unirl_lightning.rewards.GenEvalReward, init_args: {mode: partial}}, "
        "{class_path: unirl_lightning.rewards.PickScoreReward, init_args: "
        f"{{model_path: {tmp_path / 'clip'}, processor_path: {tmp_path / 'clip'}, batch_size: 3}}}}]"
    )
    config = Path(__file__).resolve().parents[1] / "configs" / "sd35_flow_grpo.yaml"
    cli = cli_main(["--config", str(config),
                    "--model.init_args.policy.init_args.pretrained", str(tmp_path / "sd3"),
                    "--model.init_args.policy.init_args.resolution", "64",
                    "--model.init_args.policy.init_args.torch_dtype", "float32",
                    "--model.init_args.policy.init_args.max_sequence_length", "12",
                    "--model.init_args.policy.init_args.drop_t5", "true",
                    "--model.init_args.detector.init_args.model_path", str(tmp_path / "m2f"),
                    "--model.init_args.detector.init_args.clip_path", str(tmp_path / "clip"),
                    "--model.init_args.detector.init_args.device", "cpu",
                    "--model.init_args.detector.init_args.shortest_edge", "64",
                    "--model.init_args.rewards", rewards, "--model.init_args.num_steps", "3",
                    "--model.init_args.rollouts_per_update", "1",
                    "--data.init_args.train_prompts", str(tmp_path / "train.jsonl"),
                    "--data.init_args.val_prompts", str(tmp_path / "val.jsonl"),
                    "--data.init_args.vocabulary", "null",
                    "--data.init_args.prompts_per_step", "1", "--data.init_args.group_size", "4",
                    "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
                    "--trainer.precision", "32-true", "--trainer.max_steps", "1",
                    "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
                    "--trainer.default_root_dir", str(tmp_path)], run=False)  # fmt: skip
    module = cli.model
    assert [type(r) for r in module.rewards] == [GenEvalReward, PickScoreReward]
    assert isinstance(module.judge.detector, Mask2FormerDetector)
    cli.trainer.fit(module, datamodule=cli.datamodule)
    assert module.rewards[0].judge is module.judge  # the GenEval reward judged with Mask2Former
    logged = cli.trainer.logged_metrics
    assert cli.trainer.global_step == 1
    assert "reward/pickscore" in logged and "reward/geneval_partial" in logged
    assert logged["time/reward/pickscore"] > 0 and logged["time/reward/geneval_partial"] > 0
