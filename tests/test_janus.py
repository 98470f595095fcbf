"""JanusPolicy on a tiny random Janus (no downloads): the policy contract, parity with
transformers' own image generation and processor, and a GRPO run under a real Trainer.

Parity: transformers samples image tokens with `torch.multinomial`, whose RNG use differs from
our Gumbel-max, so sampled parity is shown by routing its `torch.multinomial` through the same
Gumbel-max with the same generator: the tokens are then equal and our log-probs equal the log
of the exact probabilities transformers samples from (after its CFG). Greedy decoding
(`temperature=0` vs `do_sample=False`) is compared without any patching. (Its
`generate(output_logits=True, return_dict_in_generate=True)` cannot serve here: in transformers
5.23 the image branch appends only the last step's hidden state, after the loop.)
"""

import inspect
import warnings

import lightning as L
import pytest
import torch

from unirl_lightning.models.janus import JanusPolicy
from unirl_lightning.objectives import gumbel_noise
from unirl_lightning.testing import tiny_janus_components
from unirl_lightning.testing import PolicyTesterMixin

GRID = 4  # 16 image tokens, 16x16 pixels: fast on 2 CPU cores
PROMPTS = ["a photo of a red square", "a photo of two circles",
           "a photo of a blue cross and a green triangle"]

# Janus' conversation format ("<|User|>: ...\n\n<|Assistant|>:") as a chat template of our own
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|User|>: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image_placeholder>{{ '\\n' }}"
    "{% else %}{{ c['text'] | trim }}{% endif %}{% endfor %}{{ '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Matrices this small run fastest on one thread (and do not fight other jobs for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _policy(seed: int = 0, **kw) -> JanusPolicy:
    model, processor = tiny_janus_components(grid=GRID, seed=seed, **kw)
    return JanusPolicy.from_components(model, processor).eval()


class TestJanusPolicy(PolicyTesterMixin):
    def make_policy(self):
        return _policy()

    def generation_parameters(self, policy):
        # read only by the image-token logits: gradient there proves the relaxed route end to end
        return list(policy.model.model.generation_head.parameters())


# ---- prompt formatting ---------------------------------------------------------------------
def test_chat_template_and_fallback_format_agree():
    policy = _policy()
    fallback = policy.generation_inputs(PROMPTS, cfg_scale=3.0)
    policy.processor.chat_template = CHAT_TEMPLATE
    templated = policy.generation_inputs(PROMPTS, cfg_scale=3.0)
    assert torch.equal(fallback[0], templated[0]) and torch.equal(fallback[1], templated[1])
    assert policy.chat_prompt("a red square") == "<|User|>: a red square\n\n<|Assistant|>:"
    with_image = "<|User|>: <image_placeholder>\nwhat?\n\n<|Assistant|>:"
    assert policy.chat_prompt("what?", with_image=True) == with_image


def test_unconditional_rows_keep_only_bos_and_begin_of_image():
    policy = _policy()
    ids, mask = policy.generation_inputs(PROMPTS, cfg_scale=5.0)
    cond, uncond = ids.chunk(2)
    assert (cond[:, -1] == policy.boi_id).all() and (uncond[:, -1] == policy.boi_id).all()
    kept = (uncond == policy.bos_id) | (uncond == policy.boi_id)
    assert (uncond[~kept] == policy.pad_id).all()
    assert torch.equal(mask[: len(PROMPTS)], mask[len(PROMPTS):])


def test_understanding_inputs_and_pixels_match_the_processor():
    policy = _policy()
    proc = policy.processor
    proc.use_default_system_prompt = True
    tokens = policy.generate_images(PROMPTS[:2], generator=torch.Generator().manual_seed(0)).tokens
    images = policy.decode_images(tokens)
    questions = ["What is the main item in this image?", "How many items in this image?"]
    texts = [policy.chat_prompt(q, with_image=True) for q in questions]
    ref = proc(text=texts, images=list(images), generation_mode="text", padding=True, return_tensors="pt")
    ids, mask = policy.understanding_inputs(questions)
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    assert int((ids == policy.image_token_id).sum(1)[0]) == proc.num_image_tokens
    # same pixels as the processor's uint8 route, up to its 1/255 quantisation
    pixels = policy._vision_pixels(tokens)
    torch.testing.assert_close(pixels, ref["pixel_values"].float(), atol=2 / 255 / 0.5, rtol=0)


# ---- parity with transformers ---------------------------------------------------------------
def _hf_inputs(policy):
    texts = [policy.chat_prompt(p) for p in PROMPTS]
    return policy.processor(text=texts, generation_mode="image", padding=True, return_tensors="pt")


def test_greedy_tokens_equal_transformers_generate():
    policy = _policy()
    ours = policy.generate_images(PROMPTS, cfg_scale=5.0, temperature=0.0)
    theirs = policy.model.generate(**_hf_inputs(policy), generation_mode="image", do_sample=False,
                                   guidance_scale=5.0)
    assert torch.equal(ours.tokens, theirs)
    torch.testing.assert_close(policy.image_logprobs(ours), ours.logprobs, atol=1e-4, rtol=0)


def test_sampled_tokens_and_logprobs_equal_transformers_generate(monkeypatch):
    policy = _policy()
    ours = policy.generate_images(PROMPTS, cfg_scale=3.0, temperature=1.0,
                                  generator=torch.Generator().manual_seed(7))

    gen, seen = torch.Generator().manual_seed(7), []

    def gumbel_multinomial(probs, num_samples=1, **_):
        seen.append(probs)
        return (probs.log() + gumbel_noise(probs.shape, gen, probs.device)).argmax(-1, keepdim=True)

    monkeypatch.setattr(torch, "multinomial", gumbel_multinomial)
    theirs = policy.model.generate(**_hf_inputs(policy), generation_mode="image", do_sample=True, top_k=0,
                                   temperature=1.0, guidance_scale=3.0)
    assert torch.equal(ours.tokens, theirs)
    probs = torch.stack(seen, 1)  # [B, L, K]: the guided distribution transformers sampled from
    hf_logp = probs.log().gather(-1, theirs[..., None]).squeeze(-1)
    torch.testing.assert_close(ours.logprobs, hf_logp, atol=1e-5, rtol=0)


def test_decode_matches_transformers_decode_and_postprocess():
    policy = _policy()
    shape = (2, policy.tokens_per_image)
    tokens = torch.randint(policy.image_vocab_size, shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        decoded = policy.model.decode_image_tokens(tokens)  # [B, H, W, 3]
    ref = policy.processor.postprocess(list(decoded.permute(0, 3, 1, 2).float()), return_tensors="pt")
    ref = ref["pixel_values"]
    assert torch.equal(policy.decode_images(tokens), ref)


def test_hard_relaxed_tokens_give_the_token_forward():
    policy = _policy()
    tokens = policy.generate_images(PROMPTS, generator=torch.Generator().manual_seed(0)).tokens
    questions, answers = ["What is the main item in this image?"] * 3, ["square", "2 circles", "cross"]
    hard = torch.nn.functional.one_hot(tokens, policy.image_vocab_size).float()
    a, _ = policy.answer_logprobs(tokens, questions, answers)
    b, _ = policy.answer_logprobs(hard, questions, answers)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_encode_images_round_trips_token_grid():
    policy = _policy()
    images = policy.decode_images(torch.zeros(1, policy.tokens_per_image, dtype=torch.long))
    assert policy.encode_images(images).shape == (1, policy.tokens_per_image)


# ---- construction from simple types (LightningCLI / jsonargparse) ---------------------------
def test_init_takes_simple_types_and_loads_saved_folder(tmp_path):
    from jsonargparse import ArgumentParser

    sig = inspect.signature(JanusPolicy.__init__)
    simple = ("str", "bool", "str | None")
    assert all(p.annotation in simple for n, p in sig.parameters.items() if n != "self")
    policy = _policy()
    policy.save_pretrained(tmp_path / "janus")
    parser = ArgumentParser()
    parser.add_argument("--policy", type=JanusPolicy)
    cfg = parser.parse_object({"policy": {"model_path": str(tmp_path / "janus"), "torch_dtype": "float32"}})
    loaded = parser.instantiate_classes(cfg).policy.eval()
    rollout = policy.generate_images(PROMPTS, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.image_logprobs(rollout), policy.image_logprobs(rollout))


JANUS_CONFIGS = ["janus_pro_1b_sft.yaml", "janus_pro_1b_grpo.yaml", "janus_pro_7b_grpo.yaml"]


@pytest.mark.parametrize("name", JANUS_CONFIGS)
def test_janus_configs_instantiate_through_the_cli(name, tmp_path):
    """The YAML as shipped (FSDP block included) parses; with a local tiny checkpoint, prompt files
    and a CPU trainer it instantiates the recipe around a JanusPolicy."""
    from pathlib import Path

    import yaml

    from unirl_lightning.cli import cli_main

    config = Path(__file__).resolve().parents[1] / "configs" / name
    cfg = yaml.safe_load(config.read_text())
    assert cfg["trainer"]["strategy"]["class_path"].endswith("ModelParallelStrategy")  # FSDP2
    assert cfg["trainer"]["precision"] == "bf16-mixed"
    cli = cli_main(_tiny_janus_config_args(config, tmp_path), run=False)
    assert isinstance(cli.model.policy, JanusPolicy)


def _tiny_janus_config_args(config, tmp_path, *extra: str) -> list[str]:
    """CLI arguments that run a Janus config on a local tiny checkpoint, prompt files (written here)
    and a CPU trainer, without the detector; `extra` after them."""
    from unirl_lightning.data import generate_specs, save_specs, world_vocabulary

    _policy().save_pretrained(tmp_path / "janus")
    for split in ("train", "val"):
        save_specs(generate_specs(6, world_vocabulary(), seed=len(split)), tmp_path / f"{split}.jsonl")
    return ["--config", str(config),
            "--model.init_args.policy.init_args.model_path", str(tmp_path / "janus"),
            "--model.init_args.policy.init_args.gradient_checkpointing", "false",
            "--data.init_args.train_prompts", str(tmp_path / "train.jsonl"),
            "--data.init_args.val_prompts", str(tmp_path / "val.jsonl"),
            "--data.init_args.vocabulary", "null", "--model.init_args.detector", "null",
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
            "--trainer.precision", "32-true",
            "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path), *extra]  # fmt: skip


# ---- GRPO smoke run ----------------------------------------------------------------------
def test_grpo_trains_janus_under_trainer(tmp_path):
    from unirl_lightning.data import OnPolicyDataModule
    from unirl_lightning.modules import DiscreteGRPO
    from unirl_lightning.rewards.base import RewardFunction

    class RandomReward(RewardFunction):
        """Random rewards: nonzero advantages whatever an untrained model draws."""

        def __init__(self):
            super().__init__(1.0, "random")
            self.gen = torch.Generator().manual_seed(0)

        def __call__(self, ctx):
            return torch.rand(len(ctx.specs), generator=self.gen)

    policy = _policy()
    before = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    module = DiscreteGRPO(policy, warm_start=None, rewards=[RandomReward()], answer_weight=0.5, cfg_scale=3.0,
                          micro_batch_size=4, lr=1e-3)
    data = OnPolicyDataModule(num_train=60, num_val=12, prompts_per_step=2, group_size=2, val_batch_size=6)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    changed = {k for k, v in policy.state_dict().items() if not torch.equal(before[k], v)}
    assert any(k.startswith("model.model.generation_head.") for k in changed)
    assert not any(k.startswith("model.model.vqmodel.") for k in changed)  # frozen, as in Janus
    assert "model.lm_head.weight" in changed or "model.model.language_model.embed_tokens.weight" in changed
    assert "image/ratio_mean" in trainer.logged_metrics and "answer/ratio_mean" in trainer.logged_metrics


# ---- FSDP2 (Lightning's ModelParallelStrategy) on 2 CPU processes ----------------------------
FSDP_SCRIPT = '''
import json, os, sys
import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from unirl_lightning.data import OnPolicyDataModule
from unirl_lightning.models.janus import JanusPolicy
from unirl_lightning.testing import tiny_janus_components
from unirl_lightning.modules import DiscreteGRPO
from unirl_lightning.rewards import SelfUnderstandingReward
from unirl_lightning.rewards.base import RewardFunction


class RandomReward(RewardFunction):
    def __call__(self, ctx):
        return torch.rand(len(ctx.specs))


torch.manual_seed(0)
policy = JanusPolicy.from_components(*tiny_janus_components(grid=4))
module = DiscreteGRPO(policy, warm_start=None, rewards=[RandomReward(), SelfUnderstandingReward()],
                      answer_weight=0.5, cfg_scale=3.0, beta=0.04, micro_batch_size=2, lr=1e-3)
data = OnPolicyDataModule(num_train=60, num_val=4, prompts_per_step=1, group_size=2, val_batch_size=2)
strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    limit_val_batches=1, val_check_interval=1, check_val_every_n_epoch=None)
trainer.fit(module, datamodule=data)
full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in policy.state_dict().items()}
out = {"unit": type(policy.model.model.language_model.layers[0]).__name__,
       "checksum": float(sum(v.double().abs().sum() for v in full.values())),
       "ratio": float(trainer.logged_metrics["image/ratio_mean"])}
with open(os.path.join(sys.argv[1], f"rank{trainer.global_rank}.json"), "w") as f:
    json.dump(out, f)
'''


def test_grpo_under_fsdp2_on_two_cpu_processes(tmp_path):
    """Sharded blocks, rollouts and decoding through the registered entry points, a sharded
    reference, validation (answers, encode_images): both ranks end with the same weights."""
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "janus_fsdp.py"
    script.write_text(FSDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                          timeout=540, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["unit"].startswith("FSDP") for r in ranks), ranks
    assert abs(ranks[0]["checksum"] - ranks[1]["checksum"]) < 1e-6 * ranks[0]["checksum"]
    assert all(r["ratio"] == 1.0 for r in ranks)  # on-policy, one update per rollout


def test_a_warm_start_of_another_janus_size_fails_naming_the_nested_config_fields(tmp_path):
    from unirl_lightning.modules.base import load_warm_start

    _policy(0, hidden_size=16, num_heads=2).save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="holds another architecture than this run's JanusPolicy") as info:
        load_warm_start(_policy(1), tmp_path / "small", "model.warm_start")
    assert "text_config.hidden_size (folder: 16, this run: 32)" in str(info.value)
    same = _policy(0)
    same.save_pretrained(tmp_path / "same")
    with warnings.catch_warnings():  # the same architecture: loads without a word
        warnings.simplefilter("error", UserWarning)
        load_warm_start(_policy(1), tmp_path / "same", "model.warm_start")


def test_janus_grpo_config_trains_one_step_with_its_corl_rewards(tmp_path):
    """configs/janus_pro_1b_grpo.yaml at tiny size: GenEval (here the world's detector in place of
    Mask2Former) + 0.8 x self-understanding, one optimiser step through the CLI."""
    from pathlib import Path

    from unirl_lightning.cli import cli_main
    from unirl_lightning.rewards import GenEvalReward, SelfUnderstandingReward

    config = Path(__file__).resolve().parents[1] / "configs" / "janus_pro_1b_grpo.yaml"
    extra = ("--data.init_args.prompts_per_step", "1", "--data.init_args.group_size", "4",
             "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0")  # fmt: skip
    cli = cli_main(_tiny_janus_config_args(config, tmp_path, *extra), run=False)
    rewards = cli.model.rewards
    assert [type(r) for r in rewards] == [GenEvalReward, SelfUnderstandingReward]
    assert [r.weight for r in rewards] == [1.0, 0.8]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 1
    logged = cli.trainer.logged_metrics
    assert "reward/geneval_binary" in logged and "reward/self_understanding" in logged
