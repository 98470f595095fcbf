"""StepProgress: steps of max_steps in a log file; the CLI's default progress display; no eval-mode noise."""

from __future__ import annotations

import io
import re
import warnings

import lightning as L
import torch

from unirl_lightning.callbacks import StepProgress
from unirl_lightning.cli import cli_main
from unirl_lightning.data import OnPolicyDataModule
from unirl_lightning.models.flow import TinyFlowConfig, TinyFlowModel
from unirl_lightning.modules.flow_grpo import FlowGRPO
from unirl_lightning.modules.training import expect_frozen_eval_modules


def _flow_grpo() -> FlowGRPO:
    torch.manual_seed(0)
    policy = TinyFlowModel(TinyFlowConfig(num_layers=1, num_heads=2, head_dim=8, text_dim=16))
    return FlowGRPO(policy, warm_start=None, num_steps=3, lr=1e-3, eval_repeats=1)


def _fit(module, callbacks, steps=3, **trainer_args):
    data = OnPolicyDataModule(num_train=60, num_val=6, prompts_per_step=2, group_size=2, val_batch_size=6)
    args = dict(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=1,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer = L.Trainer(**{**args, **trainer_args})
    trainer.fit(module, datamodule=data)
    return trainer


def test_a_log_file_shows_steps_of_max_steps_rate_time_left_reward_and_validation():
    log = io.StringIO()  # not a terminal: one line per log_every_s
    _fit(_flow_grpo(), [StepProgress(log_every_s=0.0, stream=log)])
    lines = log.getvalue().splitlines()
    assert lines[0] == "fit: training from step 0 of 3"
    steps = [line for line in lines if line.startswith("fit step")]
    assert [re.match(r"fit step (\d+)/3 \((\d+)%\)", line).groups() for line in steps[:3]] == [
        ("1", "33"),
        ("2", "67"),
        ("3", "100"),
    ]
    assert all(
        re.search(
            r"[\d.]+ (s/step|step/s) \| elapsed \d+:\d\d:\d\d, left \d+:\d\d:\d\d \| .*reward -?[\d.]", line
        )
        for line in steps
    ), steps
    val = [line for line in lines if "validation at step 2" in line]
    assert len(val) == 1 and re.search(r"geneval [\d.]+", val[0])
    assert "val geneval" in steps[-1]  # the latest validation score stays on the later lines
    assert "\r" not in log.getvalue() and "Epoch" not in log.getvalue()


def test_a_terminal_gets_one_line_redrawn_in_place():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    log = Terminal()
    _fit(_flow_grpo(), [StepProgress(refresh_s=0.0, stream=log)], steps=2, limit_val_batches=0)
    text = log.getvalue()
    redraws = text.split("\r\033[K")
    assert redraws[0] == "" and len(redraws) == 4  # steps 1 and 2, then the final state, then a newline
    assert redraws[1].startswith("fit step 1/2 (50%)") and redraws[3].startswith("fit step 2/2 (100%)")
    assert text.count("\n") == 1 and text.endswith("\n")


def test_the_cli_shows_step_progress_unless_the_config_turns_it_off():
    base = [
        "--config",
        "configs/flow_grpo.yaml",
        "--model.init_args.warm_start",
        "null",
        "--trainer.logger",
        "false",
    ]
    cli = cli_main(base, run=False)
    assert isinstance(cli.trainer.progress_bar_callback, StepProgress)
    cli = cli_main([*base, "--trainer.enable_progress_bar", "false"], run=False)
    assert cli.trainer.progress_bar_callback is None


def test_frozen_eval_modules_do_not_warn_but_a_trainable_one_in_eval_mode_does():
    module = _flow_grpo()  # a frozen reference in eval mode
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(module, [], steps=1, limit_val_batches=0, enable_progress_bar=False)
    assert not [w for w in caught if "in eval mode" in str(w.message)]
    module = _flow_grpo()
    module.policy.transformer.proj_out.eval()  # trainable, left in eval mode by mistake
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expect_frozen_eval_modules(module)
        _fit(module, [], steps=1, limit_val_batches=0, enable_progress_bar=False)
    assert [w for w in caught if "in eval mode" in str(w.message)]
