"""Where a random SDE window carries GRPO signal: per window start, the share of prompt groups
whose rewards are all equal (zero std: no advantage, no policy gradient), the mean within-group
reward std, and the reward, for a saved built-in flow policy.

    python benchmarks/flow_window_signal.py FOLDER [--size 2] [--noise-level 1.0] [--prompts 32] [--group 8]
    python benchmarks/flow_window_signal.py FOLDER --by-task START [--prompts 64]   # one window, per task

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
from unirl_lightning.worlds.detector import WorldDetector
from unirl_lightning.models.flow import TinyFlowModel


@torch.no_grad()
def window_signal(policy, specs: list[dict], start: int, size: int, noise_level: float, group: int,
                  num_steps: int = 10, chunk: int = 16) -> dict[str, float]:
    """Zero-std share, mean group std and mean reward of `specs` x `group` rollouts with the window at
    `start`."""
    judge, zero, std, mean, solved, tags = GenEvalJudge(WorldDetector()), [], [], [], [], []
    for i in range(0, len(specs), chunk):
        part = specs[i : i + chunk]
        rows = [s for s in part for _ in range(group)]
        latents = policy.initial_noise(len(part)).repeat_interleave(group, 0)
        rollout = policy.sample(
            [s["prompt"] for s in rows],
            num_steps=num_steps,
            noise_level=noise_level,
            sde_window=(start, start + size),
            latents=latents,
        )
        results = judge(rollout.images, rows)
        rewards = torch.tensor([float(r.partial) for r in results]).view(len(part), group)
        solved.append(torch.tensor([bool(r.correct) for r in results]).view(len(part), group).all(1))
        tags += [s["tag"] for s in part]
        zero.append(rewards.std(1) < 1e-6)
        std.append(rewards.std(1))
        mean.append(rewards.mean(1))
    zero_t, solved_t = torch.cat(zero), torch.cat(solved)
    out = {
        "zero_std": float(zero_t.float().mean()),
        "group_std": float(torch.cat(std).mean()),
        "reward": float(torch.cat(mean).mean()),
        "tied_solved": float(solved_t[zero_t].float().mean()) if zero_t.any() else float("nan"),
    }
    for tag in dict.fromkeys(tags):  # per task: tie share, and the share of ties that are all-correct
        rows = torch.tensor([t == tag for t in tags])
        out[f"{tag}/zero_std"] = float(zero_t[rows].float().mean())
        out[f"{tag}/tied_solved"] = (
            float(solved_t[rows & zero_t].float().mean()) if (rows & zero_t).any() else float("nan")
        )
        out[f"{tag}/groups"] = int(rows.sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="a saved TinyFlowModel (save_pretrained folder)")
    ap.add_argument("--size", type=int, default=2, help="SDE window steps")
    ap.add_argument("--noise-level", type=float, default=1.0)
    ap.add_argument("--prompts", type=int, default=32, help="training prompts (a seeded sample)")
    ap.add_argument("--group", type=int, default=8, help="images per prompt")
    ap.add_argument("--by-task", type=int, metavar="START", help="only the window at START, one row per task")
    args = ap.parse_args()
    torch.manual_seed(0)
    policy = TinyFlowModel.from_pretrained(args.folder).eval()
    data = OnPolicyDataModule()
    data.setup("fit")
    specs = random.Random(0).sample(data.train_specs, args.prompts)
    if args.by_task is not None:
        res = window_signal(policy, specs, args.by_task, args.size, args.noise_level, args.group)
        print("| task | groups | zero-std groups | of them all-correct |")
        print("|---|---:|---:|---:|")
        for tag in sorted({k.split("/")[0] for k in res if "/" in k}):
            print(
                f"| {tag} | {res[tag + '/groups']} | {res[tag + '/zero_std']:.2f} "
                f"| {res[tag + '/tied_solved']:.2f} |"
            )
        return
    print("| window | zero-std groups | of them all-correct | group reward std | reward |")
    print("|---|---:|---:|---:|---:|")
    for start in range(10 - args.size):
        res = window_signal(policy, specs, start, args.size, args.noise_level, args.group)
        print(
            f"| [{start}, {start + args.size}) | {res['zero_std']:.3f} | {res['tied_solved']:.2f} "
            f"| {res['group_std']:.3f} "
            f"| {res['reward']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
