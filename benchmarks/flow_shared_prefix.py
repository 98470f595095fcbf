"""Rollout time of grouped sampling (the ODE prefix before the SDE window run once per prompt)
against the full batch, for every start of a random 2-step window, on the built-in flow model.

    python benchmarks/flow_shared_prefix.py [--layers 4 6] [--repeats 3] [--prompts 8] [--group 8]

P x G rows, one initial noise per prompt (FlowGRPO's `same_latent`), 10 steps, SDE on steps
[k, k + 2). "full" samples every row at every step (the peers' way); "grouped" passes
`groups=` to `FlowPolicy.sample`, which takes steps 0..k-1 at batch P. The mean over k is what
a FlowGRPO run with `sde_window_size: 2` over `sde_window: [0, 9]` pays per rollout.
"""

from __future__ import annotations

import argparse
import time

import torch

from unirl_lightning.data.prompts import generate_specs
from unirl_lightning.models.flow import TinyFlowModel
from unirl_lightning.worlds.vocab import SHAPES


@torch.no_grad()
def rollout_time(policy: TinyFlowModel, prompts: list[str], groups: torch.Tensor, start: int, grouped: bool,
                 repeats: int) -> float:
    """Best-of-`repeats` wall time (s) of one rollout with the SDE window at `[start, start + 2)`."""
    noise = policy.initial_noise(int(groups.max()) + 1, torch.Generator().manual_seed(0))[groups]
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        policy.sample(prompts, num_steps=10, noise_level=1.0, sde_window=(start, start + 2), latents=noise,
                      groups=groups if grouped else None, generator=torch.Generator().manual_seed(r))
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 6], help="TinyFlowConfig.num_layers to time")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    args = ap.parse_args()
    specs = generate_specs(args.prompts, SHAPES, seed=0)
    prompts = [s["prompt"] for s in specs for _ in range(args.group)]
    groups = torch.arange(args.prompts).repeat_interleave(args.group)
    starts = list(range(8))  # windows [k, k + 2) inside [0, 9]
    print(
        f"torch threads: {torch.get_num_threads()}, "
        f"batch {len(prompts)} = {args.prompts} prompts x {args.group}"
    )
    print("| layers | window start | full (s) | grouped (s) | speed-up |")
    print("|---:|---:|---:|---:|---:|")
    for layers in args.layers:
        policy = TinyFlowModel(num_layers=layers).eval()
        rollout_time(policy, prompts, groups, 0, False, 1)  # warm-up
        full, grouped = [], []
        for k in starts:
            full.append(rollout_time(policy, prompts, groups, k, False, args.repeats))
            grouped.append(rollout_time(policy, prompts, groups, k, True, args.repeats))
            print(f"| {layers} | {k} | {full[-1]:.3f} | {grouped[-1]:.3f} | {full[-1] / grouped[-1]:.2f}x |")
        mf, mg = sum(full) / len(full), sum(grouped) / len(grouped)
        print(f"| {layers} | mean | {mf:.3f} | {mg:.3f} | **{mf / mg:.2f}x** |")


if __name__ == "__main__":
    main()
