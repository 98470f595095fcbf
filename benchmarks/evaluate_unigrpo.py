"""Held-out reasoning-task scores of saved UniGRPO policies, with many samples per riddle and their
standard errors.

    python benchmarks/evaluate_unigrpo.py NAME=FOLDER [NAME=FOLDER ...] [--samples 8] \
        [--text-samples 8] [--num-val 120] [--steps 20] [--seed 0] [--paired]

FOLDER is a UniGRPO run's `model.save_to`: the flow policy, and the text policy in `text_policy/`
when it trained (otherwise the built-in text warm start, which an image-only run keeps frozen).
Riddles: the reasoning DataModule's held-out ones (`--num-val 120`, a run's validation set: 70
riddles, as each task holds out a quarter of its distinct riddles and at most 20; they never appear
in training, their facts do with other shapes). Columns, each a mean over riddles with its standard
error (`se`, the std of the per-riddle means / sqrt(riddles)):
- `text_greedy`: the greedy text is the exact GenEval prompt (what validation logs as text_exact);
- `text_sampled`: the same for `--text-samples` texts sampled at temperature 1 (the rollouts' text);
- `geneval`: GenEval of `--samples` ODE images (noise 0, 20 steps, no CFG) from the greedy text;
- `geneval_sampled`: one image from each sampled text (the joint policy as it is trained);
- `geneval_oracle`: `--samples` images from the exact prompt (the flow policy alone);
- `text_greedy_held_out`, `text_sampled_held_out`: the text columns on the riddles whose fact the
  text warm start never saw (`WARM_START_HELD_OUT`): its greedy text is right on every other fact,
  so these are what the shared advantage has left to teach.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from unirl_lightning.data.reasoning import WARM_START_HELD_OUT, ReasoningDataModule
from unirl_lightning.evaluation.judge import GenEvalJudge
from unirl_lightning.models.flow import TinyFlowModel
from unirl_lightning.models.text.policies import TinyTextPolicy, text_matches
from unirl_lightning.modules.warm_start import ensure_text_warm_start
from unirl_lightning.worlds.detector import WorldDetector

COLUMNS = (
    "text_greedy", "text_sampled", "geneval", "geneval_sampled", "geneval_oracle",
    "text_greedy_held_out", "text_sampled_held_out",
)


def mean_se(per_riddle: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error over riddles of `[R, k]` per-sample scores."""
    if len(per_riddle) == 0:
        return float("nan"), float("nan")
    means = per_riddle.float().mean(1)
    se = float(means.std() / math.sqrt(len(means))) if len(means) > 1 else float("nan")
    return float(means.mean()), se


@torch.no_grad()
def judge_images(flow, judge, prompts: list[str], specs: list[dict], steps: int, gen) -> torch.Tensor:
    """bool `[len(prompts)]`: GenEval verdicts of one ODE image per prompt, judged against `specs`."""
    verdicts = []
    for i in range(0, len(prompts), 120):
        rollout = flow.sample(prompts[i : i + 120], num_steps=steps, noise_level=0.0, generator=gen)
        verdicts += [r.correct for r in judge(rollout.images, specs[i : i + 120])]
    return torch.tensor(verdicts)


@torch.no_grad()
def evaluate_unigrpo(flow, text, specs: list[dict], samples: int, text_samples: int, steps: int,
                     seed: int = 0, per_riddle: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Each column's mean and standard error (`<column>_se`); `per_riddle`, when given, receives each
    column's per-riddle means (float `[riddles]`) for paired comparisons."""
    judge, gen = GenEvalJudge(WorldDetector()), torch.Generator().manual_seed(seed)
    riddles, answers, R = [s["reasoning_prompt"] for s in specs], [s["prompt"] for s in specs], len(specs)
    greedy = text.generate(riddles, temperature=0.0).texts
    sampled = text.generate([r for r in riddles for _ in range(text_samples)], temperature=1.0,
                            generator=gen).texts
    repeat = [s for s in specs for _ in range(samples)]
    per_text = [s for s in specs for _ in range(text_samples)]

    def images(prompts: list[str], judged: list[dict], k: int) -> torch.Tensor:
        return judge_images(flow, judge, prompts, judged, steps, gen).view(R, k)

    scores = {
        "text_greedy": torch.tensor([text_matches(t, a) for t, a in zip(greedy, answers)])[:, None],
        "text_sampled": torch.tensor(
            [text_matches(t, s["prompt"]) for t, s in zip(sampled, per_text)]
        ).view(R, text_samples),
        "geneval": images([t for t in greedy for _ in range(samples)], repeat, samples),
        "geneval_sampled": images(sampled, per_text, text_samples),
        "geneval_oracle": images([a for a in answers for _ in range(samples)], repeat, samples),
    }
    held_out = torch.tensor([s["riddle"] in WARM_START_HELD_OUT for s in specs])
    for name in ("text_greedy", "text_sampled"):
        scores[f"{name}_held_out"] = scores[name][held_out]
    out = {}
    for name, table in scores.items():
        out[name], out[f"{name}_se"] = mean_se(table)
        if per_riddle is not None:
            per_riddle[name] = table.float().mean(1)
    return out


def paired_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of `a - b` over riddles (per-riddle means of two policies)."""
    return mean_se((a - b)[:, None])


def load_policies(folder: str | Path) -> tuple[TinyFlowModel, TinyTextPolicy]:
    flow = TinyFlowModel.from_pretrained(folder).eval()
    trained_text = Path(folder) / "text_policy"
    if trained_text.is_dir():
        return flow, TinyTextPolicy.from_pretrained(trained_text).eval()
    warm = ensure_text_warm_start(TinyTextPolicy())  # the frozen text policy of an image-only run
    return flow, TinyTextPolicy.from_pretrained(warm).eval()


def print_header() -> None:
    """The Markdown header of a table with one row per policy and one column per score."""
    print(f"| policy | {' | '.join(COLUMNS)} |")
    print("|---" * (len(COLUMNS) + 1) + "|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="NAME=FOLDER")
    ap.add_argument("--samples", type=int, default=8, help="ODE images per riddle (greedy text, oracle)")
    ap.add_argument("--text-samples", type=int, default=8, help="texts sampled per riddle at temperature 1")
    ap.add_argument("--num-val", type=int, default=120, help="the DataModule's num_val (max riddles)")
    ap.add_argument("--steps", type=int, default=20, help="ODE steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--paired", action="store_true",
                    help="also print each policy's difference to the first one, paired over riddles")
    args = ap.parse_args()
    data = ReasoningDataModule(num_val=args.num_val)
    data.setup("validate")
    print_header()
    tables: dict[str, dict[str, torch.Tensor]] = {}
    for run in args.runs:
        name, folder = run.split("=", 1)
        flow, text = load_policies(folder)
        tables[name] = {}
        res = evaluate_unigrpo(flow, text, data.val_specs, args.samples, args.text_samples, args.steps,
                               args.seed, per_riddle=tables[name])
        cells = [f"{res[c]:.3f} +- {res[c + '_se']:.3f}" for c in COLUMNS]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    if args.paired and len(tables) > 1:
        first, *rest = tables
        print(f"\nDifferences to {first}, paired over riddles (mean +- standard error):\n")
        print_header()
        for name in rest:
            diffs = [paired_difference(tables[name][c], tables[first][c]) for c in COLUMNS]
            print(f"| {name} | " + " | ".join(f"{m:+.3f} +- {se:.3f}" for m, se in diffs) + " |")


if __name__ == "__main__":
    main()
