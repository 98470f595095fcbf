"""Does a built-in flow policy read the words that bind attributes? A table per task.

    python benchmarks/flow_binding_probe.py NAME=FOLDER [NAME=FOLDER ...] [--n 256]

For rendered training scenes of the two binding tasks, the flow-matching loss
`mean((v(x_s, s, prompt) - (noise - x0))^2)` at fixed noise levels `s`, once with the scene's own
prompt and once with the binding swapped (position: the relation mirrored, "left of" <-> "right of",
"above" <-> "below"; colour attribution: the two colours exchanged). Same scenes, same noise: a model
that reads the binding has a lower loss with the true prompt; equal losses mean the words are
ignored (the model can only guess which shape goes where, or which colour goes with which shape).
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch

from unirl_lightning.data import OnPolicyDataModule
from unirl_lightning.models.flow import TinyFlowModel
from unirl_lightning.worlds.render import render_batch
from unirl_lightning.worlds.vocab import OPPOSITE_POSITION

LEVELS = (0.85, 0.7, 0.5, 0.3)


def swapped_prompt(spec: dict) -> str:
    """The spec's prompt with its binding swapped (relation mirrored, or the two colours exchanged)."""
    a, b = spec["include"][0], spec["include"][1]
    if spec["tag"] == "position":
        rel = b["position"][0]
        return spec["prompt"].replace(f" {rel} ", f" {OPPOSITE_POSITION[rel]} ")
    return spec["prompt"].replace(a["color"], "\0").replace(b["color"], a["color"]).replace("\0", b["color"])


@torch.no_grad()
def binding_losses(
    policy: TinyFlowModel, specs: list[dict], n: int, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """`{f"{task} s={s}": (loss with the true prompt, loss with the swapped one)}`."""
    out = {}
    for task in ("position", "color_attr"):
        pool = [s for s in specs if s["tag"] == task]
        chosen = [pool[i % len(pool)] for i in range(n)]
        x0 = policy.encode_images(render_batch(chosen, list(range(n)), policy.world)[0])
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
        conds = [
            policy.encode_text([s["prompt"] for s in chosen]),
            policy.encode_text([swapped_prompt(s) for s in chosen]),
        ]
        for level in LEVELS:
            x_s = level * noise + (1 - level) * x0
            sigma = torch.full((n,), level)
            out[f"{task} s={level}"] = tuple(
                float((policy.velocity(x_s, sigma, c) - (noise - x0)).square().mean()) for c in conds
            )
    return out


def print_probe_table(runs: list[str], probe: Callable[[str], dict[str, str]]) -> None:
    """One markdown row per `NAME=FOLDER` in `runs`: `probe(folder) -> {column: "true / swapped"}`."""
    header = None
    for run in runs:
        name, folder = run.split("=", 1)
        res = probe(folder)
        if header is None:
            header = list(res)
            print("| policy | " + " | ".join(f"{k} (true / swapped)" for k in header) + " |")
            print("|---" * (len(header) + 1) + "|")
        print(f"| {name} | " + " | ".join(res.values()) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="NAME=FOLDER")
    ap.add_argument("--n", type=int, default=256, help="scenes per task")
    args = ap.parse_args()
    data = OnPolicyDataModule()
    data.setup("fit")

    def probe(folder: str) -> dict[str, str]:
        res = binding_losses(TinyFlowModel.from_pretrained(folder).eval(), data.train_specs, args.n)
        return {k: f"{t:.4f} / {s:.4f}" for k, (t, s) in res.items()}

    print_probe_table(args.runs, probe)


if __name__ == "__main__":
    main()
