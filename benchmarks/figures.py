"""The README's pictures: held-out prompts drawn before and after RL, and learning curves.

    python benchmarks/figures.py grid --kind flow --out benchmarks/figures/flow_before_after.png \
        "warm start=WARM_START_FOLDER" "FlowGRPO=runs/bench/f20_s0"
    python benchmarks/figures.py grid --kind unified --out benchmarks/figures/grpo_before_after.png \
        "warm start=WARM_START_FOLDER" "GRPO=runs/bench/grpo_s0"
    python benchmarks/figures.py curves --tag reward --window 20 --out benchmarks/figures/flow_reward.png \
        "seed 0=runs/lightning_logs/f20_s0" "seed 1=runs/lightning_logs/f20_s1"

`grid`: one row per saved policy (`save_pretrained` folders), one column per held-out prompt (the
DataModule's validation prompts, one per GenEval task by default), each image from the same seed,
captioned with its prompt and the GenEval judge's verdict (green: right, red: wrong). Flow policies
sample with the deterministic ODE (noise 0, no CFG), unified ones at temperature 1.
`curves`: a TensorBoard scalar of each run against its step, averaged over windows of `--window`
steps (the on-policy reward is noisy step to step).
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from tb_scalars import read_scalars, window_means  # noqa: E402  (the sibling script)
from unirl_lightning.data import OnPolicyDataModule  # noqa: E402
from unirl_lightning.evaluation.judge import GenEvalJudge  # noqa: E402
from unirl_lightning.models import TinyFlowModel, TinyUnifiedModel  # noqa: E402
from unirl_lightning.worlds.detector import WorldDetector  # noqa: E402
from unirl_lightning.worlds.vocab import TASKS  # noqa: E402


def _named(pairs: list[str]) -> list[tuple[str, str]]:
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"give NAME=PATH, got {pair!r}")
        name, path = pair.split("=", 1)
        out.append((name, path))
    return out


def held_out_specs(per_task: int) -> list[dict]:
    """The first `per_task` validation prompts of each GenEval task (never trained on)."""
    data = OnPolicyDataModule()
    data.setup("fit")
    return [s for task in TASKS for s in [v for v in data.val_specs if v["tag"] == task][:per_task]]


@torch.no_grad()
def draw(kind: str, folder: str, specs: list[dict], seed: int) -> torch.Tensor:
    """uint8 `[N, 3, H, W]`: one image per spec from the saved policy, from a fixed seed."""
    prompts = [s["prompt"] for s in specs]
    gen = torch.Generator().manual_seed(seed)
    if kind == "flow":
        policy = TinyFlowModel.from_pretrained(folder).eval()
        return policy.sample(prompts, num_steps=20, noise_level=0.0, generator=gen).images
    policy = TinyUnifiedModel.from_pretrained(folder).eval()
    return policy.decode_images(policy.generate_images(prompts, generator=gen).tokens)


def before_after_grid(
    kind: str, policies: list[tuple[str, str]], out: Path, per_task: int, seed: int
) -> None:
    specs = held_out_specs(per_task)
    judge = GenEvalJudge(WorldDetector())
    fig, axes = plt.subplots(
        len(policies), len(specs), figsize=(1.6 * len(specs), 2.0 * len(policies) + 0.4), squeeze=False
    )
    for row, (name, folder) in enumerate(policies):
        images = draw(kind, folder, specs, seed)
        verdicts = judge.correct(images, specs)
        for col, (image, spec, ok) in enumerate(zip(images, specs, verdicts.tolist())):
            ax = axes[row][col]
            ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_edgecolor("tab:green" if ok else "tab:red")
                side.set_linewidth(3)
            caption = textwrap.fill(spec["prompt"].removeprefix("a photo of "), 18)
            ax.set_title(caption, fontsize=6.5, color="tab:green" if ok else "tab:red")
            if col == 0:
                ax.set_ylabel(f"{name}\n{int(verdicts.sum())}/{len(specs)} right", fontsize=8)
    fig.suptitle("held-out prompts (green: the GenEval judge passes the image, red: it fails it)", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    print(f"wrote {out}")


def curves(runs: list[tuple[str, str]], tag: str, window: int, out: Path, title: str | None,
           xlabel: str = "step") -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, logdir in runs:
        rows = read_scalars(logdir).get(tag)
        if not rows:
            raise SystemExit(f"{logdir} has no scalar {tag!r}")
        points = window_means(rows, window) if window > 1 else [(s, v) for s, v, _ in rows]
        ax.plot([s for s, _ in points], [v for _, v in points], label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(tag)
    ax.set_title(title or tag, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    grid = sub.add_parser("grid")
    grid.add_argument("--kind", choices=["flow", "unified"], required=True)
    grid.add_argument("--per-task", type=int, default=2)
    grid.add_argument("--seed", type=int, default=0)
    grid.add_argument("--out", type=Path, required=True)
    grid.add_argument("policies", nargs="+", help="NAME=FOLDER, one row each")
    curve = sub.add_parser("curves")
    curve.add_argument("--tag", default="reward")
    curve.add_argument("--window", type=int, default=1)
    curve.add_argument("--title")
    curve.add_argument("--xlabel", default="step")
    curve.add_argument("--out", type=Path, required=True)
    curve.add_argument("runs", nargs="+", help="NAME=TENSORBOARD_LOGDIR")
    args = parser.parse_args()
    if args.command == "grid":
        before_after_grid(args.kind, _named(args.policies), args.out, args.per_task, args.seed)
    else:
        curves(_named(args.runs), args.tag, args.window, args.out, args.title, args.xlabel)


if __name__ == "__main__":
    main()
