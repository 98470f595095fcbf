"""Does a built-in unified policy read the words that bind attributes? A table per task and split.

    python benchmarks/unified_binding_probe.py NAME=FOLDER [NAME=FOLDER ...] [--n 256]

For rendered scenes of the two binding tasks (position, colour attribution), from training prompts
and from held-out ones, the image-token cross-entropy (`generation_loss`: next-token in
autoregressive order, MaskGIT with the same masks in masked order) once with the scene's own prompt
and once with the binding swapped (the relation mirrored, or the two colours exchanged). A model
that reads the binding has the lower loss with the true prompt; equal losses mean the words are
ignored. Then the policy's own samples, judged against the true prompt: `pass` from the true prompt,
`pass (swapped)` from the swapped one. A model that draws the binding it reads passes often from
the true prompt and rarely from the swapped one; one that ignores the words passes equally often.
"""

from __future__ import annotations

import argparse

import torch
from flow_binding_probe import print_probe_table, swapped_prompt

from unirl_lightning.data import OnPolicyDataModule
from unirl_lightning.evaluation.judge import GenEvalJudge
from unirl_lightning.models import TinyUnifiedModel
from unirl_lightning.worlds.detector import WorldDetector
from unirl_lightning.worlds.render import render_batch

TASKS = ("position", "color_attr")


@torch.no_grad()
def probe(policy: TinyUnifiedModel, splits: dict[str, list[dict]], n: int, seed: int = 0) -> dict[str, str]:
    """`{f"{task} {split} loss": "true / swapped", f"{task} {split} pass": "true / swapped"}`."""
    judge, out = GenEvalJudge(WorldDetector()), {}
    for task in TASKS:
        for split, specs in splits.items():
            pool = [s for s in specs if s["tag"] == task]
            chosen = [pool[i % len(pool)] for i in range(n)]
            prompts = {"true": [s["prompt"] for s in chosen], "swapped": [swapped_prompt(s) for s in chosen]}
            tokens = policy.encode_images(render_batch(chosen, list(range(n)), policy.world_config)[0])
            losses, passes = [], []
            for texts in prompts.values():
                masks = torch.Generator(device=policy.device).manual_seed(seed)
                losses.append(float(policy.generation_loss(texts, tokens, generator=masks)))
                rollout = policy.generate_images(texts, generator=torch.Generator().manual_seed(seed))
                ok = judge.correct(policy.decode_images(rollout.tokens), chosen)
                passes.append(float(ok.float().mean()))
            out[f"{task} {split} loss"] = "{:.4f} / {:.4f}".format(*losses)
            out[f"{task} {split} pass"] = "{:.3f} / {:.3f}".format(*passes)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="NAME=FOLDER")
    ap.add_argument("--n", type=int, default=256, help="scenes (and samples) per task and split")
    args = ap.parse_args()
    data = OnPolicyDataModule()
    data.setup("fit")
    splits = {"train": data.train_specs, "held-out": data.val_specs}
    print_probe_table(
        args.runs, lambda folder: probe(TinyUnifiedModel.from_pretrained(folder).eval(), splits, args.n)
    )


if __name__ == "__main__":
    main()
