"""Wall time of one FlowGRPO step's parts with and without CFG on the built-in flow model.

    python benchmarks/flow_cfg_time.py [--warm FOLDER] [--repeats 3]

Rollout (10 steps, SDE on the first 3) and the training forward+backward of the 3 trained steps,
for P x G = 8 x 8 prompts, at cfg_scale 1 (UniGRPO: one velocity forward a step) and 4.5 (two).
"""

from __future__ import annotations

import argparse
import time

import torch

from unirl_lightning.data.prompts import generate_specs
from unirl_lightning.models.flow import TinyFlowModel
from unirl_lightning.worlds.vocab import SHAPES


def time_step(policy: TinyFlowModel, prompts: list[str], cfg: float, repeats: int) -> tuple[float, float]:
    rollout_s, train_s = [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            rollout = policy.sample(prompts, num_steps=10, noise_level=1.0, cfg_scale=cfg, sde_window=(0, 3),
                                    generator=torch.Generator().manual_seed(r))
        t1 = time.perf_counter()
        for j in rollout.trained_steps:
            policy.step_log_prob(rollout, j).log_prob.mean().backward()
        policy.zero_grad(set_to_none=True)
        rollout_s.append(t1 - t0)
        train_s.append(time.perf_counter() - t1)
    return min(rollout_s), min(train_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warm", default=None, help="a saved TinyFlowModel folder (default: random weights)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    policy = TinyFlowModel.from_pretrained(args.warm) if args.warm else TinyFlowModel()
    prompts = [s["prompt"] for s in generate_specs(8, SHAPES, seed=0) for _ in range(8)]
    print(f"torch threads: {torch.get_num_threads()}, batch {len(prompts)}")
    print("| cfg_scale | rollout (s) | train 3 steps (s) | step total (s) | vs no CFG |")
    print("|---:|---:|---:|---:|---:|")
    base = None
    for cfg in (1.0, 4.5):
        r, t = time_step(policy, prompts, cfg, args.repeats)
        base = base or r + t
        print(f"| {cfg} | {r:.3f} | {t:.3f} | {r + t:.3f} | {(r + t) / base:.2f}x |")


if __name__ == "__main__":
    main()
