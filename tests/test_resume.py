"""Runs that survive: step checkpoints, exact resume of every recipe in a new process, settings at
resume, and a process killed in the middle of a save.

Exact resume: 2N optimiser steps in one go against N steps, a stop, and N more in a new process from
`--ckpt_path last`. Later steps' logged losses and rewards and the final weights must be equal
bitwise: training on CPU is deterministic for a fixed thread count (both processes use 2 threads).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from resume_script import run as run_recipe
from unirl_lightning.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("resume_script.py")
N = 2  # steps before the stop; the runs train 2N

TINY = {
    "sft": ["--model.init_args.warm_start", "null", "--data.init_args.prompts_per_step", "4"],
    # validation at the stop and a PolicyEMA: neither may shift the resumed run
    "grpo": [
        "--model.init_args.warm_start", "null", "--data.init_args.prompts_per_step", "2",
        "--data.init_args.group_size", "4", "--trainer.limit_val_batches", "1",
        "--trainer.val_check_interval", str(N), "--data.init_args.num_val", "12",
        "--data.init_args.val_batch_size", "6", "--trainer.callbacks+=unirl_lightning.callbacks.PolicyEMA",
    ],
    # two rollouts per update (a checkpoint only at update boundaries), LoRA adapters (the reference
    # is the base model) and a CPU budget's state
    "flow_grpo": [
        "--model.init_args.warm_start", "null", "--data.init_args.prompts_per_step", "2",
        "--data.init_args.group_size", "4", "--model.init_args.rollouts_per_update", "2",
        "--model.init_args.num_steps", "4", "--model.init_args.sde_window", "[0,3]",
        "--model.init_args.lora_rank", "4",
        "--trainer.callbacks+=unirl_lightning.callbacks.CPUTimeBudget", "--trainer.callbacks.minutes", "100",
    ],
    # the old policy (a frozen copy that samples and anchors, soft-updated each step) resumes too
    "diffusion_nft": [
        "--model.init_args.warm_start", "null", "--data.init_args.prompts_per_step", "2",
        "--data.init_args.group_size", "4", "--model.init_args.num_steps", "4",
        "--model.init_args.timesteps_per_sample", "2", "--model.init_args.rollouts_per_update", "1",
        "--model.init_args.eta_rate", "0.2",
    ],
    # the EMA policy (the rollout's anchor, decayed each step) and the frozen reference resume too
    "awm": [
        "--model.init_args.warm_start", "null", "--data.init_args.prompts_per_step", "2",
        "--data.init_args.group_size", "4", "--model.init_args.num_steps", "4",
        "--model.init_args.sde_window", "[1,3]", "--model.init_args.timesteps_per_sample", "2",
        "--model.init_args.timestep_range", "[1,3]", "--model.init_args.rollouts_per_update", "1",
        "--model.init_args.ema_rate", "0.2",
    ],
    "unigrpo": [
        "--model.init_args.warm_start", "null", "--model.init_args.text_warm_start", "null",
        "--data.init_args.prompts_per_step", "2", "--data.init_args.group_size", "4",
        "--model.init_args.num_steps", "4", "--model.init_args.max_new_tokens", "6",
    ],
}


def recipe_args(name: str, root: Path, *extra: str, max_steps: int = 2 * N, every: int = 100) -> list[str]:
    """`fit` of configs/NAME.yaml at tiny size, its checkpoints, logs and config copy under `root`."""
    config = str(ROOT / "configs" / f"{name}.yaml")
    args = ["fit", "--config", config, "--trainer.callbacks.every_n_train_steps", str(every), *TINY[name]]
    if "--trainer.limit_val_batches" not in TINY[name]:
        args += ["--trainer.limit_val_batches", "0"]
    return args + ["--trainer.max_steps", str(max_steps), "--trainer.default_root_dir", str(root),
                   "--trainer.logger.init_args.save_dir", str(root / "tb"), *extra]


def run_in_new_process(metrics: Path, args: list[str], *script_opts: str, wait: bool = True):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(SCRIPT.parent)])}
    cmd = [sys.executable, str(SCRIPT), str(metrics), *script_opts, *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def weights(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in sorted(folder.rglob("*.safetensors")):
        found.update({f"{file.relative_to(folder)}:{k}": v for k, v in load_file(file).items()})
    assert found, f"nothing saved in {folder}"
    return found


@pytest.mark.parametrize("recipe", list(TINY))
def test_resumed_run_equals_the_uninterrupted_run(recipe, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    run_recipe(str(tmp_path / "full.json"), recipe_args(recipe, full, "--model.init_args.save_to",
                                                       str(tmp_path / "full_w")))
    run_recipe(str(tmp_path / "a.json"), recipe_args(recipe, part), stop_at=N)
    saved = sorted(p.name for p in (part / "checkpoints").iterdir())
    assert saved == ["last.ckpt", f"step-{N:06d}.ckpt"]
    save = ("--model.init_args.save_to", str(tmp_path / "part_w"))
    resume = recipe_args(recipe, part, "--ckpt_path", "last", *save)
    run_in_new_process(tmp_path / "b.json", resume)

    uninterrupted = json.loads((tmp_path / "full.json").read_text())
    resumed = json.loads((tmp_path / "b.json").read_text())
    assert sorted(resumed, key=int) == [str(s) for s in range(N + 1, 2 * N + 1)]
    for step, logged in resumed.items():
        assert logged, f"step {step}: nothing logged"
        # callback_metrics keep metrics logged at earlier steps: compare what the resumed run logged
        assert logged == {k: uninterrupted[step].get(k) for k in logged}, f"step {step}"
    a, b = weights(tmp_path / "full_w"), weights(tmp_path / "part_w")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_two_runs_with_one_seed_train_the_same_weights(tmp_path):
    for name in ("a", "b"):
        save = ["--model.init_args.save_to", str(tmp_path / f"{name}_w")]
        args = recipe_args("grpo", tmp_path / name, *save, "--trainer.limit_val_batches", "0", max_steps=3)
        run_recipe(str(tmp_path / f"{name}.json"), args)
    a, b = weights(tmp_path / "a_w"), weights(tmp_path / "b_w")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def stopped_grpo_run(tmp_path_factory):
    """A GRPO run stopped after N steps: its folder (checkpoints under checkpoints/)."""
    root = tmp_path_factory.mktemp("stopped")
    run_recipe(str(root / "m.json"), recipe_args("grpo", root, "--trainer.limit_val_batches", "0"), stop_at=N)
    return root


@pytest.fixture
def grpo_checkpoint(stopped_grpo_run, tmp_path):
    """A copy of the stopped run's folder for one test to resume."""
    return Path(shutil.copytree(stopped_grpo_run, tmp_path / "run", symlinks=True))


@pytest.mark.parametrize(
    "change,field",
    [
        (["--data.init_args.group_size", "2"], "data.group_size"),
        (["--model.init_args.beta", "0.1"], "model.beta"),
        (["--model.init_args.policy.init_args.config.n_layers", "1"], "policy.config.n_layers"),
    ],
)
def test_resume_with_changed_settings_is_refused_naming_them(grpo_checkpoint, change, field):
    args = recipe_args("grpo", grpo_checkpoint, "--trainer.limit_val_batches", "0", "--ckpt_path", "last",
                       *change)
    with pytest.raises(ValueError, match=rf"(?s)other settings.*{field}: checkpoint .*this run .*--override"):
        cli_main(args)


def test_resume_keeps_this_runs_save_to_lr_and_max_steps(grpo_checkpoint, tmp_path):
    out = tmp_path / "saved"
    ckpt = str(grpo_checkpoint / "checkpoints" / f"step-{N:06d}.ckpt")
    cli = cli_main(recipe_args("grpo", grpo_checkpoint, "--trainer.limit_val_batches", "0",
                               "--ckpt_path", ckpt, "--model.init_args.save_to", str(out),
                               "--model.init_args.lr", "1e-4", max_steps=N + 1))
    assert cli.trainer.global_step == N + 1
    assert (out / "model.safetensors").is_file()  # save_to given at resume time is honoured
    lr = cli.trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(1e-4)  # the checkpoint's 5e-5 replaced (constant schedule)


def test_override_resumes_with_changed_settings(grpo_checkpoint):
    args = recipe_args("grpo", grpo_checkpoint, "--trainer.limit_val_batches", "0", "--ckpt_path", "last",
                       "--model.init_args.beta", "0.1", "--override_checkpoint_settings", "true",
                       max_steps=N + 1)
    with pytest.warns(UserWarning, match="model.beta: checkpoint 0.04, this run 0.1"):
        cli = cli_main(args)
    assert cli.trainer.global_step == N + 1


def test_new_run_refuses_another_runs_checkpoints_before_any_compute(grpo_checkpoint):
    args = recipe_args("grpo", grpo_checkpoint, "--trainer.limit_val_batches", "0")
    with pytest.raises(FileExistsError, match=r"holds the checkpoints of another run .*--ckpt_path last"):
        cli_main(args)


def test_ckpt_path_last_without_a_checkpoint_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="--ckpt_path last: no checkpoint in"):
        cli_main(recipe_args("grpo", tmp_path, "--ckpt_path", "last"))


def test_checkpointing_on_without_a_checkpoint_callback_saves_by_steps(tmp_path):
    """A config without checkpoint callbacks still saves by steps when checkpointing is on."""
    from unirl_lightning.callbacks import StepCheckpoint

    cli = cli_main(["--config", str(ROOT / "configs" / "grpo.yaml"), "--trainer.callbacks", "[]",
                    "--trainer.enable_checkpointing", "true", "--model.init_args.warm_start", "null"],
                   run=False)
    assert any(isinstance(c, StepCheckpoint) for c in cli.trainer.callbacks)


def test_kill_during_a_save_leaves_the_previous_checkpoint_to_resume_from(tmp_path):
    marker = tmp_path / "saving"
    args = recipe_args("grpo", tmp_path, "--trainer.limit_val_batches", "0", every=1)
    hang = ("--hang-in-save", str(N + 1), str(marker))
    proc = run_in_new_process(tmp_path / "m.json", args, *hang, wait=False)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the save never started"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)  # half of step N+1's checkpoint is on disk
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    folder = tmp_path / "checkpoints"
    assert (folder / f"step-{N + 1:06d}.ckpt.partial").is_file()
    assert not (folder / f"step-{N + 1:06d}.ckpt").exists()
    assert os.path.realpath(folder / "last.ckpt") == str(folder / f"step-{N:06d}.ckpt")
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == N

    cli = cli_main(recipe_args("grpo", tmp_path, "--trainer.limit_val_batches", "0", "--ckpt_path", "last",
                               max_steps=N + 2))
    assert cli.trainer.global_step == N + 2
    assert not list(folder.glob("*.partial"))
    assert os.path.realpath(folder / "last.ckpt") == str(folder / f"step-{N + 2:06d}.ckpt")


def test_checkpointing_off_drops_the_configs_checkpoint_callback():
    from lightning.pytorch.callbacks import ModelCheckpoint

    cli = cli_main(["--config", str(ROOT / "configs" / "grpo.yaml"), "--trainer.enable_checkpointing",
                    "false", "--model.init_args.warm_start", "null"], run=False)
    assert not any(isinstance(c, ModelCheckpoint) for c in cli.trainer.callbacks)


def test_a_python_api_resume_skips_the_warm_start_the_checkpoint_replaces(tmp_path):
    """`module.resuming_from` (the CLI sets it) tells `setup` that the checkpoint holds the weights:
    the warm start is then neither loaded nor, when not cached, trained."""
    from unirl_lightning.models import TinyUnifiedModel
    from unirl_lightning.modules import DiscreteGRPO

    def module() -> DiscreteGRPO:
        policy = TinyUnifiedModel(d_model=32, n_layers=1, n_heads=2)
        return DiscreteGRPO(policy=policy, warm_start=str(tmp_path / "absent"))

    with pytest.raises(FileNotFoundError, match="model.warm_start"):
        module().setup("fit")  # a new run loads its warm start
    resumed = module()
    resumed.resuming_from = str(tmp_path / "last.ckpt")
    before = {k: v.clone() for k, v in resumed.policy.state_dict().items()}
    resumed.setup("fit")
    assert all(torch.equal(before[k], v) for k, v in resumed.policy.state_dict().items())
