"""The LightningCLI: configs parse, print and re-load to the same run; bad configs fail early."""

from pathlib import Path

import pytest
import yaml

from unirl_lightning.cli import cli_main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BUILTIN = ["sft.yaml", "grpo.yaml", "grpo_corl.yaml", "flow_grpo.yaml", "unigrpo.yaml", "diffusion_nft.yaml",
           "awm.yaml"]


def _print_config(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("name", BUILTIN)
def test_print_config_reloads_to_the_same_config(name, tmp_path, capsys):
    first = _print_config(["fit", "--config", str(CONFIGS / name), "--print_config"], capsys)
    printed = tmp_path / "printed.yaml"
    printed.write_text(first)
    second = _print_config(["fit", "--config", str(printed), "--print_config"], capsys)
    assert yaml.safe_load(first) == yaml.safe_load(second)
    cfg = yaml.safe_load(first)
    assert cfg["model"]["class_path"].startswith("unirl_lightning.modules.")
    assert cfg["trainer"]["log_every_n_steps"] <= 10


def test_flow_grpo_config_instantiates_as_measured():
    """The FlowGRPO config builds (per-group random 2-step windows that fit its 10-step schedule)."""
    from unirl_lightning.modules.flow_grpo import FlowGRPO

    cli = cli_main(
        ["--config", str(CONFIGS / "flow_grpo.yaml"), "--model.init_args.warm_start", "null"], run=False
    )
    assert isinstance(cli.model, FlowGRPO)
    hp = cli.model.hparams
    assert (hp.sde_window_size, hp.num_steps, hp.step_weighting, hp.regularizer) == (
        2,
        10,
        "noise_std",
        "velocity_mse",
    )
    assert hp.sde_window_per_group and hp.same_latent
    start, end = cli.model.sde_window()
    assert end - start == 2 and 0 <= start and end <= 9  # the last step stays ODE


def test_overrides_survive_print(capsys):
    out = _print_config(
        [
            "fit",
            "--config",
            str(CONFIGS / "grpo.yaml"),
            "--model.init_args.beta",
            "0.04",
            "--data.init_args.group_size",
            "4",
            "--print_config",
        ],
        capsys,
    )
    cfg = yaml.safe_load(out)
    assert cfg["model"]["init_args"]["beta"] == 0.04
    assert cfg["data"]["init_args"]["group_size"] == 4
    assert cfg["model"]["init_args"]["rewards"][0]["init_args"]["mode"] == "binary"


def test_cli_instantiates_without_running():
    cli = cli_main(
        ["--config", str(CONFIGS / "grpo.yaml"), "--model.init_args.warm_start", "null"], run=False
    )
    from unirl_lightning.modules import DiscreteGRPO

    assert isinstance(cli.model, DiscreteGRPO)


def test_tensorboard_logs_go_to_the_run_folder_unless_save_dir_is_given(tmp_path, monkeypatch):
    """Runs side by side with their own default_root_dir never share a lightning_logs/version_N."""
    monkeypatch.chdir(tmp_path)
    base = ["--config", str(CONFIGS / "grpo.yaml"), "--model.init_args.warm_start", "null"]
    dirs = []
    for extra in (["--trainer.default_root_dir", "a"], ["--trainer.default_root_dir", "b"], []):
        dirs.append(Path(cli_main([*base, *extra], run=False).trainer.logger.log_dir))
    a, b, default = dirs
    # grpo.yaml names runs/grpo as its root folder; the command line's wins
    assert a == Path("a/lightning_logs/version_0") and b == Path("b/lightning_logs/version_0")
    assert default == Path("runs/grpo/lightning_logs/version_0")
    given = cli_main([*base, "--trainer.default_root_dir", "a", "--trainer.logger.init_args.save_dir", "tb"],
                     run=False)
    assert Path(given.trainer.logger.log_dir) == Path("tb/lightning_logs/version_0")


def test_bad_config_field_fails_before_compute(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--config", str(CONFIGS / "grpo.yaml"), "--model.init_args.loss_tpye", "grpo"], run=False)
    assert "loss_tpye" in capsys.readouterr().err


def test_bad_value_fails_before_compute(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--config", str(CONFIGS / "grpo.yaml"), "--model.init_args.loss_type", "ppo"], run=False)
    assert "loss_type" in capsys.readouterr().err


def test_cpu20_overlay_layers_a_budget_onto_the_flow_grpo_config():
    """configs/flow_grpo_cpu20.yaml changes only what the 20-CPU-minute recipe changes."""
    from unirl_lightning.callbacks import CPUTimeBudget

    base = cli_main(
        ["--config", str(CONFIGS / "flow_grpo.yaml"), "--model.init_args.warm_start", "null"], run=False
    )
    cli = cli_main(
        [
            "--config",
            str(CONFIGS / "flow_grpo.yaml"),
            "--config",
            str(CONFIGS / "flow_grpo_cpu20.yaml"),
            "--model.init_args.warm_start",
            "null",
        ],
        run=False,
    )
    budgets = [c for c in cli.trainer.callbacks if isinstance(c, CPUTimeBudget)]
    assert len(budgets) == 1 and budgets[0].minutes == 20.0 and budgets[0].since == "process"
    assert cli.model.hparams.train_tied_groups is False and base.model.hparams.train_tied_groups is True
    assert cli.datamodule.hparams.train_task_weights["color_attr"] == 3.0
    changed = {k for k in base.model.hparams if base.model.hparams[k] != cli.model.hparams[k]}
    assert changed <= {
        "train_tied_groups",
        "policy",
        "rewards",
    }  # policy / rewards: fresh objects, same config


def test_cpu30_overlay_layers_a_budget_and_snapshots_onto_the_grpo_config():
    """configs/grpo_cpu30.yaml keeps the recipe and adds the budget, snapshots and step checkpoints."""
    from unirl_lightning.callbacks import CPUTimeBudget, PolicySnapshots, StepCheckpoint

    args = ["--config", str(CONFIGS / "grpo.yaml"), "--model.init_args.warm_start", "null"]
    base = cli_main(args, run=False)
    cli = cli_main(args[:2] + ["--config", str(CONFIGS / "grpo_cpu30.yaml")] + args[2:], run=False)
    kinds = {type(c): c for c in cli.trainer.callbacks}
    assert kinds[CPUTimeBudget].minutes == 30.0 and kinds[PolicySnapshots].every == 7.5
    assert StepCheckpoint in kinds and cli.trainer.max_steps == 5000
    assert cli.datamodule.hparams == base.datamodule.hparams
    changed = {k for k in base.model.hparams if base.model.hparams[k] != cli.model.hparams[k]}
    assert changed <= {"policy", "rewards"}  # fresh objects, same config


def test_masked_overlay_switches_the_image_order_and_trains_a_step_subset():
    cli = cli_main(
        ["--config", str(CONFIGS / "grpo.yaml"), "--config", str(CONFIGS / "grpo_masked.yaml"),
         "--model.init_args.warm_start", "null"],
        run=False,
    )
    assert cli.model.policy.image_order == "masked" and cli.model.hparams.reveal_steps_per_update == 2
    assert cli.model.hparams.beta == 0.04  # the rest is the main config's


def test_cli_objects_are_freed_once_dropped():
    """Nothing outside the returned CLI keeps its model and Trainer alive (jsonargparse leaves the
    last parser, which holds the CLI, in a context variable; cli_main parses in a copy of the
    context), so a process that runs several recipes holds one at a time."""
    import gc
    import weakref

    cli = cli_main(
        ["--config", str(CONFIGS / "grpo.yaml"), "--model.init_args.warm_start", "null"], run=False
    )
    refs = [weakref.ref(x) for x in (cli, cli.model, cli.trainer, cli.datamodule)]
    del cli
    gc.collect()
    assert [r() for r in refs] == [None] * 4
