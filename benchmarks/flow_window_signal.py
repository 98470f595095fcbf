"""Where a random SDE window carries GRPO signal: per window start, the share of prompt groups
whose rewards are all equal (zero std: no advantage, no policy gradient), the mean within-group
reward std, and the reward, for a saved built-in flow policy.

    python benchmarks/flow_window_signal.py FOLDER [--size 2] [--noise-level 1.0] [--prompts 32] [--group 8]

Rollouts as FlowGRPO's config samples them: `--group` images per training prompt from one
initial noise (`same_latent`), a `--size`-step SDE window at the start of the row (ODE elsewhere),
10 steps, partial-credit GenEval. A late window on a shared initial noise has little left to
decide, so its groups tie; `sde_window` bounds where FlowGRPO's random windows land.
"""

from __future__ import annotations

import argparse
import random

import torch

from unirl_lightning.data import OnPolicyDataModule
from unirl_lightning.evaluation.judge import GenEvalJudge
from unirl_lightning.models.flow import TinyFlowModel


@torch.no_grad()
def window_signal(policy, specs: list[dict], start: int, size: int, noise_level: float, group: int,
                  num_steps: int = 10, chunk: int = 16) -> dict[str, float]:
    """Zero-std share, mean group std and mean reward of `specs` x `group` rollouts with the window at `start`."""
    judge, zero, std, mean = GenEvalJudge(), [], [], []
    for i in range(0, len(specs), chunk):
        part = specs[i : i + chunk]
        rows = [s for s in part for _ in range(group)]
        latents = policy.initial_noise(len(part)).repeat_interleave(group, 0)
        rollout = policy.sample([s["prompt"] for s in rows], num_steps=num_steps, noise_level=noise_level,
                                sde_window=(start, start + size), latents=latents)
        rewards = torch.tensor([float(r.partial) for r in judge(rollout.images, rows)]).view(len(part), group)
        zero.append(rewards.std(1) < 1e-6)
        std.append(rewards.std(1))
        mean.append(rewards.mean(1))
    return {"zero_std": float(torch.cat(zero).float().mean()), "group_std": float(torch.cat(std).mean()),
            "reward": float(torch.cat(mean).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="a saved TinyFlowModel (save_pretrained folder)")
    ap.add_argument("--size", type=int, default=2, help="SDE window steps")
    ap.add_argument("--noise-level", type=float, default=1.0)
    ap.add_argument("--prompts", type=int, default=32, help="training prompts (a seeded sample)")
    ap.add_argument("--group", type=int, default=8, help="images per prompt")
    args = ap.parse_args()
    torch.manual_seed(0)
    policy = TinyFlowModel.from_pretrained(args.folder).eval()
    data = OnPolicyDataModule()
    data.setup("fit")
    specs = random.Random(0).sample(data.train_specs, args.prompts)
    print("| window | zero-std groups | group reward std | reward |")
    print("|---|---:|---:|---:|")
    for start in range(10 - args.size):
        res = window_signal(policy, specs, start, args.size, args.noise_level, args.group)
        print(f"| [{start}, {start + args.size}) | {res['zero_std']:.3f} | {res['group_std']:.3f} | {res['reward']:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
