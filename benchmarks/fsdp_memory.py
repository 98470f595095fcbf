"""Per-rank memory of the trained weights under FSDP2: 1 process against 2 (CPU, gloo).

    python benchmarks/fsdp_memory.py [--policies discrete flow] [--prompts 1] [--group 2]

Trains one optimiser step of discrete GRPO (`DiscreteGRPO`, k3 KL at beta 0.04) and of FlowGRPO
(`FlowGRPO`, velocity MSE at beta 0.1) on the built-in models at a size where the weights dominate
memory (`SIZES`), each in 1 process and under Lightning's ModelParallelStrategy on 2 processes (FSDP2,
each transformer block a unit). Counts, per rank, the bytes of the local shards of the trained policy's
parameters, of their gradients (before the optimiser step) and of AdamW's state (after it), and of the
frozen reference copy; and the process's resident set size once the models are built (before sharding),
after the step (as is, and once glibc has returned the freed memory it keeps), and at its peak. Prints a
markdown table (per rank: the largest over ranks) with the 2-rank / 1-rank ratio of parameters +
gradients + AdamW state.

Each (policy, ranks) pair runs in its own process (`--worker`; Lightning launches the second rank).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from unirl_lightning.data import OnPolicyDataModule
from unirl_lightning.models.flow import TinyFlowConfig, TinyFlowModel
from unirl_lightning.models.tiny import TinyConfig, TinyUnifiedModel
from unirl_lightning.modules import DiscreteGRPO
from unirl_lightning.modules.flow_grpo import FlowGRPO

#: the built-in models at a size where the weights dominate memory (a few rows of short sequences)
SIZES = {
    "discrete": dict(d_model=512, n_layers=8, n_heads=8),
    "flow": dict(num_layers=6, num_heads=8, head_dim=48, text_dim=128),
}
MIB = 2**20


def local_bytes(tensors) -> int:
    """Bytes of the tensors this rank holds (a sharded tensor's local shard)."""
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def rss_mib() -> tuple[float, float]:
    """This process's peak and current resident set size, MiB (Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open("/proc/self/status") as f:
        now = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    return peak, now


def trimmed_rss_mib() -> float:
    """The current resident set size, MiB, once glibc has returned the free memory it keeps (`malloc_trim`;
    NaN without glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return float("nan")
    return rss_mib()[1]


class MemoryProbe(L.Callback):
    """Counts the local bytes of the policy's gradients before the optimiser step, and of its parameters,
    AdamW's state and the reference after the first training step."""

    def __init__(self):
        self.result: dict[str, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if "grads" not in self.result:
            grads = [p.grad for p in pl_module.policy.parameters() if p.grad is not None]
            self.result["grads"] = local_bytes(grads)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if "params" in self.result:
            return
        policy = pl_module.policy
        self.result["params"] = local_bytes(p for p in policy.parameters() if p.requires_grad)
        opt = trainer.optimizers[0]
        state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        self.result["adamw"] = local_bytes(state)
        reference = getattr(pl_module, "reference", None)
        self.result["reference"] = local_bytes(reference.parameters()) if reference is not None else 0
        self.result["peak_rss_mib"], self.result["rss_mib"] = rss_mib()
        self.result["trimmed_rss_mib"] = trimmed_rss_mib()


def worker(policy_kind: str, devices: int, out_dir: str, prompts: int, group: int) -> None:
    """One step of the recipe on `devices` processes; writes each rank's counts to `out_dir`."""
    torch.manual_seed(0)
    if policy_kind == "discrete":
        policy = TinyUnifiedModel(TinyConfig(**SIZES["discrete"]))
        module = DiscreteGRPO(policy, warm_start=None, beta=0.04, micro_batch_size=group, lr=1e-5)
    else:
        policy = TinyFlowModel(TinyFlowConfig(**SIZES["flow"]))
        module = FlowGRPO(policy, warm_start=None, num_steps=4, beta=0.1, micro_batch_size=group, lr=1e-5)
    n_params = sum(p.numel() for p in policy.parameters())
    probe = MemoryProbe()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
        if devices > 1
        else "auto",
        max_steps=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[probe],
    )
    data = OnPolicyDataModule(num_train=40, num_val=8, prompts_per_step=prompts, group_size=group)
    built_rss = rss_mib()[1]  # the whole policy and reference, before sharding
    trainer.fit(module, datamodule=data)
    result = {**probe.result, "rank": trainer.global_rank, "parameters": n_params, "built_rss_mib": built_rss}
    with open(os.path.join(out_dir, f"{policy_kind}_{devices}_rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)


def run(policy_kind: str, devices: int, out_dir: str, args: argparse.Namespace) -> list[dict]:
    """Every rank's counts of one (policy, ranks) pair, run in fresh processes."""
    cmd = [sys.executable, __file__, "--worker", policy_kind, "--devices", str(devices), "--out", out_dir,
           "--prompts", str(args.prompts), "--group", str(args.group)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out_dir)
    if proc.returncode:
        raise RuntimeError(f"{policy_kind} on {devices} ranks failed:\n{proc.stderr[-4000:]}")
    files = [Path(out_dir, f"{policy_kind}_{devices}_rank{r}.json") for r in range(devices)]
    return [json.loads(f.read_text()) for f in files]


def table(results: dict[tuple[str, int], list[dict]]) -> str:
    """Markdown table: per rank (the largest over ranks), MiB, and the 2-rank / 1-rank ratio."""
    lines = [
        "| policy | parameters | ranks | params MiB | grads MiB | AdamW MiB | total MiB | ratio to 1 rank "
        "| reference MiB | RSS built MiB | RSS after step MiB | trimmed MiB | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (kind, devices), ranks in results.items():
        keys = ("params", "grads", "adamw", "reference", "built_rss_mib", "rss_mib", "trimmed_rss_mib",
                "peak_rss_mib")
        worst = {k: max(r[k] for r in ranks) for k in keys}
        total = worst["params"] + worst["grads"] + worst["adamw"]
        mib = {k: v / MIB for k, v in worst.items()}
        base = results.get((kind, 1))
        one = max(r["params"] + r["grads"] + r["adamw"] for r in base) if base else float("nan")
        lines.append(
            f"| {kind} | {ranks[0]['parameters'] / 1e6:.1f}M | {devices} | {mib['params']:.1f} "
            f"| {mib['grads']:.1f} | {mib['adamw']:.1f} | {total / MIB:.1f} | {total / one:.3f}x "
            f"| {mib['reference']:.1f} | {worst['built_rss_mib']:.0f} | {worst['rss_mib']:.0f} "
            f"| {worst['trimmed_rss_mib']:.0f} | {worst['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", nargs="+", default=["discrete", "flow"], choices=["discrete", "flow"])
    ap.add_argument("--prompts", type=int, default=1, help="prompts per rank and step")
    ap.add_argument("--group", type=int, default=2, help="images per prompt")
    ap.add_argument("--worker", choices=["discrete", "flow"], help=argparse.SUPPRESS)
    ap.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.devices, args.out, args.prompts, args.group)
        return
    with tempfile.TemporaryDirectory() as out_dir:
        results = {(kind, devices): run(kind, devices, out_dir, args)
                   for kind in args.policies for devices in (1, 2)}
    print(table(results))


if __name__ == "__main__":
    main()
