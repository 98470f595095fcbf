import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_sft_under_fsdp2_on_two_cpu_processes(tmp_path):
    script = Path(__file__).with_name("fsdp_sft_script.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=540,
                          env=env, cwd=tmp_path)
    # rank 0's own error comes first in stderr; the tail is often only rank 1's lost connection
    assert proc.returncode == 0, proc.stderr[:3000] + "\n...\n" + proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["sharded"].startswith("FSDP") for r in results), results
    # both ranks hold the same full parameters after sharded updates
    assert abs(results[0]["checksum"] - results[1]["checksum"]) < 1e-6 * results[0]["checksum"]
    assert all(r["loss"] == r["loss"] for r in results)  # finite (not NaN)
    assert abs(results[0]["saved_checksum"] - results[0]["checksum"]) < 1e-6 * results[0]["checksum"]


@pytest.mark.parametrize("recipe", ["flow_grpo", "flow_grpo_lora", "flow_grpo_skip_tied", "flow_grpo_row_windows", "unigrpo"])
def test_flow_recipes_under_fsdp2_on_two_cpu_processes(tmp_path, recipe):
    script = Path(__file__).with_name("fsdp_flow_script.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), recipe], capture_output=True, text=True,
                          timeout=540, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[:3000] + "\n...\n" + proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["sharded"].startswith("FSDP") for r in results), results  # the transformer blocks are FSDP units
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
