import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _run_ranks(script: str, tmp_path: Path, *args: str) -> list[dict]:
    """Run a two-rank script (Lightning launches the second rank) and read each rank's result."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name(script)), str(tmp_path), *args],
                          capture_output=True, text=True, timeout=540, env=env, cwd=tmp_path)
    # rank 0's own error comes first in stderr; the tail is often only rank 1's lost connection
    assert proc.returncode == 0, proc.stderr[:3000] + "\n...\n" + proc.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_sft_under_fsdp2_on_two_cpu_processes(tmp_path):
    results = _run_ranks("fsdp_sft_script.py", tmp_path)
    assert all(r["sharded"].startswith("FSDP") for r in results), results
    # both ranks hold the same full parameters after sharded updates
    assert abs(results[0]["checksum"] - results[1]["checksum"]) < 1e-6 * results[0]["checksum"]
    assert all(r["loss"] == r["loss"] for r in results)  # finite (not NaN)
    assert abs(results[0]["saved_checksum"] - results[0]["checksum"]) < 1e-6 * results[0]["checksum"]


@pytest.mark.parametrize(
    "recipe", ["flow_grpo", "flow_grpo_lora", "flow_grpo_skip_tied", "flow_grpo_row_windows", "unigrpo"]
)
def test_flow_recipes_under_fsdp2_on_two_cpu_processes(tmp_path, recipe):
    results = _run_ranks("fsdp_flow_script.py", tmp_path, recipe)
    assert all(r["sharded"].startswith("FSDP") for r in results), (
        results
    )  # the transformer blocks are FSDP units
    first, second = results
    assert first["checksum"] == pytest.approx(second["checksum"], rel=1e-9)
    # the frozen weights (reference copy, or LoRA's base model) did not move; the trained ones did
    assert first["frozen_checksum"] == pytest.approx(first["initial"], rel=1e-9)
    if recipe.endswith("lora"):
        assert first["lora_b"] > 0  # B starts at zero
    else:
        assert abs(first["checksum"] - first["initial"]) > 1e-4 and first["lora_b"] == 0
    # the saved folder holds the gathered weights (LoRA merged in)
    assert first["saved_checksum"] == pytest.approx(first["merged_checksum"], rel=1e-6)
    if recipe == "flow_grpo_skip_tied":  # rank 0 (all tied) padded to rank 1's untied rows
        assert first["trained_rows_frac"] == second["trained_rows_frac"] == 1.0
    if recipe == "unigrpo":  # the trained text policy is saved next to the flow policy
        assert first["saved_text_checksum"] == pytest.approx(first["text_checksum"], rel=1e-6)


@pytest.mark.parametrize("recipe", ["grpo_filter_rank_tied", "grpo_filter_all_tied"])
def test_grpo_filter_zero_std_keeps_ranks_in_step(tmp_path, recipe):
    """`filter_zero_std` under FSDP2: a rank whose groups all tie runs padding chunks (weight 0) so its
    collectives pair with the other rank's; when every rank's groups tie, no rank trains and both go on."""
    first, second = _run_ranks("fsdp_sft_script.py", tmp_path, recipe)
    assert first["global_step"] == second["global_step"] == 2
    assert first["checksum"] == pytest.approx(second["checksum"], rel=1e-9)
    if recipe == "grpo_filter_all_tied":
        assert first["checksum"] == pytest.approx(first["initial"], rel=1e-12)
        assert first["empty_batches"] == second["empty_batches"] == 2.0
    else:  # rank 1's rows trained the shared weights; no batch was empty on every rank
        assert abs(first["checksum"] - first["initial"]) > 1e-4
        assert first["empty_batches"] == second["empty_batches"] == 0.0
    assert first["saved_checksum"] == pytest.approx(first["checksum"], rel=1e-6)


def test_flow_grpo_with_every_group_tied_on_every_rank_trains_nothing_and_goes_on(tmp_path):
    first, second = _run_ranks("fsdp_flow_script.py", tmp_path, "flow_grpo_all_tied")
    assert first["checksum"] == pytest.approx(first["initial"], rel=1e-12) == second["checksum"]
    assert first["trained_rows_frac"] == second["trained_rows_frac"] == 0.0
    assert first["empty_batches"] == second["empty_batches"] == 2.0


@pytest.mark.parametrize("recipe", ["flow_grpo_rank_nan", "unigrpo_rank_nan", "grpo_rank_nan"])
def test_nan_rewards_on_one_rank_keep_ranks_in_step(tmp_path, recipe):
    """Every reward of rank 0 NaN (for the flow recipes its rollout log-probs too, so any use of those
    rows in a loss would skip the step): rank 0 runs padding micro-batches that train nothing, rank 1's
    rows train the shared weights, both ranks count the same bad rewards and stay equal."""
    script = "fsdp_sft_script.py" if recipe.startswith("grpo") else "fsdp_flow_script.py"
    first, second = _run_ranks(script, tmp_path, recipe)
    assert first["checksum"] == pytest.approx(second["checksum"], rel=1e-9)
    assert abs(first["checksum"] - first["initial"]) > 1e-4
    assert first["skipped_steps"] == second["skipped_steps"] == 0.0
    assert first["bad_rewards"] == second["bad_rewards"] == 8.0  # 4 rows on rank 0, 2 steps
    assert first["empty_batches"] == second["empty_batches"] == 0.0


def test_flow_grpo_with_every_reward_nan_on_every_rank_trains_nothing_and_goes_on(tmp_path):
    first, second = _run_ranks("fsdp_flow_script.py", tmp_path, "flow_grpo_all_nan")
    assert first["checksum"] == pytest.approx(first["initial"], rel=1e-12) == second["checksum"]
    assert first["global_step"] == second["global_step"] == 2
    assert first["empty_batches"] == second["empty_batches"] == 2.0
    assert first["bad_rewards"] == second["bad_rewards"] == 16.0
