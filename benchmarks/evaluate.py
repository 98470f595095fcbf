"""Held-out synthetic GenEval of saved built-in policies, as a table (per task, overall, imbalance).

    python benchmarks/evaluate.py NAME=FOLDER [NAME=FOLDER ...] [--samples 4] [--cfg 1.0]

FOLDER is what `save_pretrained` wrote (e.g. a recipe's `model.save_to`, or the warm-start cache).
The prompts are the DataModule's default validation prompts (seed 0), never trained on.
"""

from __future__ import annotations

import argparse

import torch

from unirl_lightning.data import OnPolicyDataModule, grade_answer, question_for
from unirl_lightning.evaluation import GenEvalScore, ImbalanceScore
from unirl_lightning.evaluation.judge import GenEvalJudge
from unirl_lightning.worlds.detector import WorldDetector
from unirl_lightning.models import TinyUnifiedModel
from unirl_lightning.worlds.vocab import TASKS


@torch.no_grad()
def evaluate_policy(
    policy, specs: list[dict], samples: int, cfg_scale: float, seed: int = 0
) -> dict[str, float]:
    judge, geneval, imbalance = GenEvalJudge(WorldDetector()), GenEvalScore(), ImbalanceScore()
    specs = [s for s in specs for _ in range(samples)]
    gen = torch.Generator().manual_seed(seed)
    for i in range(0, len(specs), 120):
        chunk = specs[i : i + 120]
        rollout = policy.generate_images([s["prompt"] for s in chunk], cfg_scale=cfg_scale, generator=gen)
        ok = judge.correct(policy.decode_images(rollout.tokens), chunk)
        answers = policy.answer(rollout.tokens, [question_for(s) for s in chunk], greedy=True).texts
        und = torch.tensor([grade_answer(s, a).correct for s, a in zip(chunk, answers)])
        tasks = [s["tag"] for s in chunk]
        geneval.update(tasks, ok)
        imbalance.update(tasks, ok, und)
    out = {k.split("/")[-1]: float(v) for k, v in geneval.compute().items()}
    out["imbalance"] = float(imbalance.compute()["imbalance/overall"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="NAME=FOLDER")
    ap.add_argument("--samples", type=int, default=4, help="images per held-out prompt")
    ap.add_argument("--cfg", type=float, default=1.0)
    args = ap.parse_args()
    print_table(
        args.runs,
        list(TASKS) + ["overall", "imbalance"],
        lambda folder, specs: evaluate_policy(
            TinyUnifiedModel.from_pretrained(folder).eval(), specs, args.samples, args.cfg
        ),
    )


def print_table(runs: list[str], cols: list[str], score) -> None:
    """One markdown row per `NAME=FOLDER` in `runs`: `score(folder, held-out specs) -> {col: value}`."""
    data = OnPolicyDataModule()
    data.setup("validate")
    print(f"| policy | {' | '.join(cols)} |")
    print("|---" * (len(cols) + 1) + "|")
    for run in runs:
        name, folder = run.split("=", 1)
        res = score(folder, data.val_specs)
        print(f"| {name} | " + " | ".join(f"{res.get(c, float('nan')):.3f}" for c in cols) + " |", flush=True)


if __name__ == "__main__":
    main()
