"""`python -m unirl_lightning.plan --config <recipe.yaml> --gpu-memory 80 [--json] [overrides...]`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from unirl_lightning.plan.arch import PlanError
from unirl_lightning.plan.plan import GiB, Plan, plan_config


def _g(x: float) -> str:
    return f"{x / GiB:.2f}" if x else "-"


def _n(x: int) -> str:
    return f"{x / 1e9:.3f}B" if x >= 1e8 else (f"{x / 1e6:.1f}M" if x else "-")


def format_plan(plan: Plan, config: str) -> str:
    """A markdown table of the plan, the total, the verdict and the knobs."""
    s = plan.settings
    lines = [
        f"{config}: {s['recipe']} on {s['model']} ({s['policy']}), {s['world']} GPUs, {s['strategy']} "
        f"({'sharded over ' + str(s['shard_ranks']) if s['shard_ranks'] > 1 else 'replicated'}), "
        f"precision {s['precision']}, weights {s['torch_dtype']}, "
        f"{'LoRA r ' + str(s['lora_rank']) if s['lora_rank'] else 'all weights trained'}",
        "",
        "| component | params | trainable | params GiB/rank | grads GiB/rank | AdamW GiB/rank "
        "| activations GiB/rank | total GiB/rank | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in plan.rows:
        lines.append(
            f"| {r.name} | {_n(r.params)} | {_n(r.trainable)} | {_g(r.param_bytes)} | {_g(r.grad_bytes)} "
            f"| {_g(r.optim_bytes)} | {_g(r.act_bytes)} | {_g(r.total) if r.on_gpu else '(cpu)'} "
            f"| {r.note} |"
        )
    lines += [
        "",
        f"activations for one micro-batch: {plan.act_no_ckpt / GiB:.2f} GiB without activation "
        f"checkpointing, {plan.act_ckpt / GiB:.2f} GiB with it "
        f"({'on' if s['gradient_checkpointing'] and s['policy'] == 'JanusPolicy' else 'off'} here)",
        f"total per rank: {plan.total / GiB:.1f} GiB of {plan.gpu_gib:g} GiB: "
        f"{'fits' if plan.fits else 'does not fit'}",
    ]
    useful = [k for k in plan.knobs if k["fits"]] if not plan.fits else plan.knobs[:3]
    if plan.knobs:
        lines.append("knobs that fit:" if not plan.fits else "knobs (memory each would give):")
        lines += [f"  {k['knob']}: {k['total_gib']:.1f} GiB" for k in (useful or plan.knobs[:3])]
        if not plan.fits and not useful:
            lines.append("  none fits alone: combine them (e.g. LoRA and more GPUs)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unirl_lightning.plan", description=__doc__)
    parser.add_argument("--config", required=True, help="a recipe config (configs/*.yaml)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB of one GPU (default 80)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args, overrides = parser.parse_known_args(argv)
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    try:
        plan = plan_config(args.config, args.gpu_memory, overrides)
    except PlanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=1) if args.json else format_plan(plan, args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
