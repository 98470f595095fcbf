"""Held-out synthetic GenEval of saved built-in flow policies, with the image-quality proxy.

    python benchmarks/evaluate_flow.py NAME=FOLDER [NAME=FOLDER ...] [--samples 4] [--steps 20] \
        [--cfg-scale 1] [--reference WARM_START_FOLDER]

FOLDER is what `save_pretrained` wrote (a FlowGRPO run's `model.save_to`, or the flow warm-start
cache). Images: the deterministic ODE sampler (noise 0; no CFG unless `--cfg-scale`) from seeded
noise, `--samples` per held-out prompt (the DataModule's default validation prompts, never trained
on). Columns: GenEval per task and overall, partial credit, and `off_manifold` (mean distance of
the final latent cells to the nearest code, 0 = every cell a clean rendered patch; 0.5 = half way
to a wrong one); `no_position`, the mean of the five other tasks; with `--reference`, `velocity_mse`:
the drift from that policy, `mean((v - v_ref)^2)` over the policy's own ODE states (every step).
"""

from __future__ import annotations

import argparse

import torch

from evaluate import print_table  # the sibling script: run this file as `python benchmarks/evaluate_flow.py`
from unirl_lightning.evaluation import GenEvalScore
from unirl_lightning.evaluation.judge import GenEvalJudge
from unirl_lightning.worlds.detector import WorldDetector
from unirl_lightning.models.flow import TinyFlowModel
from unirl_lightning.worlds.vocab import TASKS


@torch.no_grad()
def evaluate_flow(
    policy,
    specs: list[dict],
    samples: int,
    steps: int,
    seed: int = 0,
    cfg_scale: float = 1.0,
    reference=None,
) -> dict[str, float]:
    judge, geneval = GenEvalJudge(WorldDetector()), GenEvalScore()
    specs = [s for s in specs for _ in range(samples)]
    gen = torch.Generator().manual_seed(seed)
    partial, off, drift = [], [], []
    for i in range(0, len(specs), 120):
        chunk = specs[i : i + 120]
        rollout = policy.sample(
            [s["prompt"] for s in chunk], num_steps=steps, noise_level=0.0, generator=gen, cfg_scale=cfg_scale
        )
        results = judge(rollout.images, chunk)
        geneval.update([s["tag"] for s in chunk], torch.tensor([r.correct for r in results]))
        partial += [float(r.partial) for r in results]
        off.append(policy.off_manifold(rollout.latents[:, -1]))
        if reference is not None:
            drift.append(velocity_drift(policy, reference, rollout))
    out = {k.split("/")[-1]: float(v) for k, v in geneval.compute().items()}
    if all(t in out for t in TASKS):  # a subset of tasks (e.g. position alone) has no such mean
        out["no_position"] = sum(out[t] for t in TASKS if t != "position") / (len(TASKS) - 1)
    if drift:
        out["velocity_mse"] = sum(drift) / len(drift)
    out["partial"] = sum(partial) / len(partial)
    out["off_manifold"] = float(torch.cat(off).mean())
    return out


def velocity_drift(policy, reference, rollout) -> float:
    """`mean((v - v_ref)^2)` over every state of the rollout's trajectories (no CFG)."""
    cond, ref_cond = policy.encode_text(rollout.prompts), reference.encode_text(rollout.prompts)
    total = 0.0
    for t in range(rollout.num_steps):
        x, sigma = rollout.latents[:, t], rollout.sigmas[t].expand(len(rollout))
        v, v_ref = policy.velocity(x, sigma, cond), reference.velocity(x, sigma, ref_cond)
        total += float((v - v_ref).square().mean())
    return total / rollout.num_steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="NAME=FOLDER")
    ap.add_argument("--samples", type=int, default=4, help="images per held-out prompt")
    ap.add_argument("--steps", type=int, default=20, help="ODE steps")
    ap.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance (1 = none)")
    ap.add_argument("--reference", default=None, help="a policy folder to measure velocity drift from")
    args = ap.parse_args()
    reference = TinyFlowModel.from_pretrained(args.reference).eval() if args.reference else None
    print_table(
        args.runs,
        list(TASKS)
        + ["overall", "no_position", "partial", "off_manifold"]
        + (["velocity_mse"] if reference is not None else []),
        lambda folder, specs: evaluate_flow(
            TinyFlowModel.from_pretrained(folder).eval(),
            specs,
            args.samples,
            args.steps,
            cfg_scale=args.cfg_scale,
            reference=reference,
        ),
    )


if __name__ == "__main__":
    main()
