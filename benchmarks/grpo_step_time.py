"""Time split of one discrete GRPO step on the built-in model: rollout / reward / update.

    python benchmarks/grpo_step_time.py [--prompts 8] [--group 8] [--steps 5] [--order autoregressive] \
        [--reveal-steps K]

Prints a markdown table (median CPU seconds of the process over `--steps` steps, after one warm-up
step; one thread, so other jobs on the machine do not inflate it). `--reveal-steps K` (masked order):
the update trains and re-scores K random reveal steps (`DiscreteGRPO(reveal_steps_per_update=K)`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from unirl_lightning.data import OnPolicyDataModule
from unirl_lightning.models import TinyConfig, TinyUnifiedModel
from unirl_lightning.modules.grpo import train_step_subset
from unirl_lightning.objectives import group_advantages, policy_loss
from unirl_lightning.rewards import GenEvalReward, RolloutContext, combine_rewards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--order", default="autoregressive", choices=["autoregressive", "masked"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reveal-steps", type=int, default=None, help="masked order: reveal steps trained")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    policy = TinyUnifiedModel(TinyConfig(image_order=args.order))
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    data = OnPolicyDataModule(prompts_per_step=args.prompts, group_size=args.group)
    data.setup("fit")
    stream = iter(data.train_dataloader())
    rewards = [GenEvalReward("binary")]
    times: dict[str, list[float]] = {"rollout": [], "reward": [], "update": []}
    for step in range(args.steps + 1):
        batch = next(stream)
        t0 = time.process_time()
        with torch.no_grad():
            rollout = policy.generate_images(batch.prompts)
            images = policy.decode_images(rollout.tokens)
        t1 = time.process_time()
        r, _ = combine_rewards(rewards, RolloutContext(specs=batch.specs, rollout=rollout, images=images))
        adv = group_advantages(r, batch.group_ids)
        t2 = time.process_time()
        if args.reveal_steps is not None and rollout.reveal_step is not None:
            rollout.action_mask = train_step_subset(rollout.action_mask, args.reveal_steps)
        logp = policy.image_logprobs(rollout)
        loss, _ = policy_loss(logp, logp.detach(), adv, rollout.action_mask, max_len=args.reveal_steps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        t3 = time.process_time()
        if step:  # the first step warms up allocators and caches
            for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[k].append(v)
    med = {k: statistics.median(v) for k, v in times.items()}
    total = sum(med.values())
    n = args.prompts * args.group
    print(
        f"GRPO step, built-in model ({args.order}"
        f"{'' if args.reveal_steps is None else f', {args.reveal_steps} reveal steps trained'}), "
        f"{args.prompts} prompts x {args.group} images, {args.threads} thread(s), CPU seconds\n"
    )
    print("| phase | seconds | share |\n|---|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {v / total:.0%} |")
    print(f"| total | {total:.3f} | {n / total:.0f} images/s |")


if __name__ == "__main__":
    main()
