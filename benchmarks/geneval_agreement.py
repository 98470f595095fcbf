"""Agreement of our GenEval pipeline with the official evaluator, per task, on the same images.

    python benchmarks/geneval_agreement.py OFFICIAL_RESULTS.jsonl \
        [--model-path facebook/mask2former-swin-small-coco-instance] \
        [--clip-path openai/clip-vit-large-patch14] [--device cuda] [--limit N]

OFFICIAL_RESULTS.jsonl is what GenEval's `evaluation/evaluate_images.py` writes (`--outfile`): one
record per image with `filename`, `tag`, `correct` and `metadata` (the prompt's spec, a JSON
string). Each image is scored again by `Mask2FormerDetector` (transformers' Mask2Former + CLIP
colours) and our rules (`evaluation.geneval.evaluate`, the official thresholds), and the table
gives per task: images, the official and our accuracy, the share of images where the two verdicts
agree, and Cohen's kappa. Needs the weights on this machine (a local folder or Hub id each).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from unirl_lightning.evaluation import evaluate
from unirl_lightning.evaluation.detection import Detector


def read_results(path: str | Path, limit: int | None = None) -> list[dict]:
    """The official records, with `metadata` parsed and `filename` resolved against the file's folder."""
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = [k for k in ("filename", "tag", "correct", "metadata") if k not in row]
        if missing:
            raise ValueError(
                f"{path}:{i + 1}: record lacks {missing}; is this evaluate_images.py's --outfile?"
            )
        meta = row["metadata"]
        row["metadata"] = json.loads(meta) if isinstance(meta, str) else meta
        name = Path(row["filename"])
        row["filename"] = str(name if name.is_absolute() or name.exists() else Path(path).parent / name)
        rows.append(row)
        if limit is not None and len(rows) == limit:
            break
    return rows


def load_image(path: str) -> torch.Tensor:
    """uint8 `[3, H, W]` RGB, EXIF orientation applied (as the official evaluator opens images)."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(ImageOps.exif_transpose(im).convert("RGB")).copy()).permute(
            2, 0, 1
        )


def our_verdicts(rows: list[dict], detector: Detector) -> list[bool]:
    """Our GenEval verdict of each record's image against its spec (official thresholds)."""
    out = []
    for row in rows:
        detections = detector(load_image(row["filename"])[None])[0]
        out.append(bool(evaluate(row["metadata"], detections).correct))
    return out


def cohen_kappa(a: Iterable[bool], b: Iterable[bool]) -> float:
    """Agreement beyond chance of two binary raters (1 = identical, 0 = chance; NaN when undefined)."""
    a, b = np.asarray(list(a), dtype=float), np.asarray(list(b), dtype=float)
    observed = float((a == b).mean())
    chance = float(a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean()))
    return float("nan") if chance == 1 else (observed - chance) / (1 - chance)


def agreement_table(rows: list[dict], ours: list[bool]) -> list[dict]:
    """Per task (and "overall"): n, official accuracy, our accuracy, agreement, kappa."""
    table = []
    for tag in sorted({r["tag"] for r in rows}) + ["overall"]:
        idx = [i for i, r in enumerate(rows) if tag in ("overall", r["tag"])]
        official, mine = [bool(rows[i]["correct"]) for i in idx], [ours[i] for i in idx]
        table.append(
            {
                "task": tag,
                "images": len(idx),
                "official": float(np.mean(official)),
                "ours": float(np.mean(mine)),
                "agreement": float(np.mean([x == y for x, y in zip(official, mine)])),
                "kappa": cohen_kappa(official, mine),
            }
        )
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="the official evaluator's results jsonl")
    ap.add_argument("--model-path", default="facebook/mask2former-swin-small-coco-instance")
    ap.add_argument("--clip-path", default="openai/clip-vit-large-patch14")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N records")
    args = ap.parse_args()
    from unirl_lightning.evaluation import Mask2FormerDetector

    rows = read_results(args.results, args.limit)
    detector = Mask2FormerDetector.from_pretrained(args.model_path, args.clip_path, device=args.device)
    table = agreement_table(rows, our_verdicts(rows, detector))
    print("| task | images | official | ours | agreement | kappa |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in table:
        print(
            f"| {r['task']} | {r['images']} | {r['official']:.3f} | {r['ours']:.3f} | "
            f"{r['agreement']:.3f} | {r['kappa']:.3f} |"
        )


if __name__ == "__main__":
    main()
