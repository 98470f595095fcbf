import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def _run_ranks(script: str, tmp_path: Path, *args: str, ranks: int = 2) -> list[dict]:
    """Run a script on `ranks` processes (Lightning launches the ranks after the first) and read each
    rank's result."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name(script)), str(tmp_path), *args],
                          capture_output=True, text=True, timeout=540, env=env, cwd=tmp_path)
    # rank 0's own error comes first in stderr; the tail is often only rank 1's lost connection
    assert proc.returncode == 0, proc.stderr[:3000] + "\n...\n" + proc.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)]


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


@pytest.mark.parametrize("recipe", ["grpo_filter", "grpo_dapo", "flow_grpo"])
def test_sharded_updates_match_one_process_on_the_same_rollouts(tmp_path, recipe):
    """The same fixed rollouts trained in 1 process on every row, and under FSDP2 on 2 processes each on its
    half (whole groups): the same objective per update, gradients and updated weights.

    The sharded objective is the mean of the ranks' objectives (FSDP averages gradients over ranks), so
    each recipe must normalise its loss by global counts: `grpo_filter` keeps 2 rows on rank 0 and 4 on
    rank 1 (and adds the answer SFT loss, a mean over answer tokens that differ in number per rank);
    `grpo_dapo` divides by the global token count. Discrete runs take 4 updates (mu = 2 passes over
    each of 2 rollouts), FlowGRPO 2 (the second rollout is off-policy by then).

    Tolerances, float32 throughout: the two runs back-propagate the same micro-batches of rows and differ
    only in the order the chunk gradients are summed (per rank, then averaged by the reduce-scatter) and in
    how the clipping norm is reduced: a few float32 roundings (measured <= 1.5e-7 x the largest gradient).
    Hence objectives (O(1) or less) within 1e-6, first-update gradients within 1e-6 x the largest gradient,
    and weights within 2e-6 absolute: some 16 roundings of a weight of size 1, 2e-3 of one step at lr 1e-3
    (measured <= 6e-7). AdamW's step g / (sqrt(v) + 1e-8) divides a gradient by its own size, so an
    entry whose gradient stays below 1e-6 x the largest gradient at every update (within a few roundings
    of the large terms summed into it: e.g. the attention key bias, which softmax ignores) takes steps of
    up to lr whose size and sign the rounding picks, in either run: such entries are held only to AdamW's
    bound of lr per update, and must be few (<= 0.5% of the weights; measured 0.2%).
    """
    one = _run_ranks("fsdp_parity_script.py", _mkdir(tmp_path / "one"), recipe, "1", ranks=1)
    two = _run_ranks("fsdp_parity_script.py", _mkdir(tmp_path / "two"), recipe, "2")
    assert not one[0]["sharded"].startswith("FSDP") and all(r["sharded"].startswith("FSDP") for r in two)
    assert two[0]["reference_gathered"] == two[1]["reference_gathered"] == []  # frozen: resharded after use
    objectives = torch.tensor(one[0]["objectives"], dtype=torch.float64)
    sharded = torch.tensor([r["objectives"] for r in two], dtype=torch.float64).mean(0)
    torch.testing.assert_close(sharded, objectives, rtol=1e-6, atol=1e-6)
    assert objectives.abs().max() > 1e-4  # off-policy passes give a loss to compare, not only zeros

    single, fsdp = (torch.load(tmp_path / d / "result.pt") for d in ("one", "two"))
    largest = max(g.abs().max() for g in single["grads"].values())
    assert single["grads"].keys() == fsdp["grads"].keys()
    for name, grad in single["grads"].items():
        torch.testing.assert_close(fsdp["grads"][name], grad, rtol=0, atol=1e-6 * largest, msg=name)
    lr, updates = 1e-3, len(one[0]["objectives"])
    noise_entries = total = 0
    for name, weight in single["weights"].items():
        peak = single["grad_peaks"].get(name, torch.zeros_like(weight))
        noise = (peak > 0) & (peak < 1e-6 * largest)  # a zero gradient moves neither run
        gap = (fsdp["weights"][name] - weight).abs()
        assert torch.all(gap[~noise] <= 2e-6), (name, gap[~noise].max())
        assert torch.all(gap[noise] <= 1.01 * lr * updates), (name, gap[noise].max())
        noise_entries, total = noise_entries + int(noise.sum()), total + weight.numel()
    assert noise_entries <= 0.005 * total, (noise_entries, total)


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


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
