"""GenEval correct rate of the synthetic world's renderer, tokenizer and detector, per task.

Columns: (a) rendered ground truth, (b) decode(encode(render)) through the patch tokenizer,
(c) uniform noise images; plus two corruptions of the renders, (d) a 3x3 average-pool blur and
(e) Gaussian pixel noise (std 30), which show how the detector's scores degrade.

    python benchmarks/world_roundtrip.py --n 200 --threads 1
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F

from unirl_lightning.evaluation.geneval import evaluate
from unirl_lightning.worlds import PatchTokenizer, WorldConfig, WorldDetector, render_batch
from unirl_lightning.worlds.vocab import COLORS, POSITIONS, SHAPES, TASKS


def make_spec(task: str, rng: random.Random) -> dict:
    """A GenEval-style metadata dict for `task` over the world's vocabulary."""
    a, b = rng.sample(SHAPES, 2)
    c1, c2 = rng.sample(COLORS, 2)
    one = {"class": a, "count": 1}
    if task == "single_object":
        return {"tag": task, "include": [one]}
    if task == "two_object":
        return {"tag": task, "include": [one, {"class": b, "count": 1}]}
    if task == "counting":
        n = rng.randint(2, 4)
        return {"tag": task, "include": [{"class": a, "count": n}], "exclude": [{"class": a, "count": n + 1}]}
    if task == "colors":
        return {"tag": task, "include": [one | {"color": c1}]}
    if task == "position":
        rel = rng.choice(POSITIONS)
        return {"tag": task, "include": [{"class": b, "count": 1}, one | {"position": [rel, 0]}]}
    if task == "color_attr":
        return {"tag": task, "include": [one | {"color": c1}, {"class": b, "count": 1, "color": c2}]}
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def rate(detector: WorldDetector, images: torch.Tensor, specs: list[dict]) -> tuple[float, float]:
    """GenEval correct rate and mean detection score over the images."""
    dets = detector(images)
    scores = [d.score for img in dets for d in img]
    ok = sum(evaluate(s, d).correct for s, d in zip(specs, dets)) / len(specs)
    return ok, (sum(scores) / len(scores) if scores else float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="specs per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (small ops: 1 is fastest)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = WorldConfig()
    tokenizer, detector = PatchTokenizer(config), WorldDetector(config)
    print(f"canvas {config.canvas}, sizes {config.sizes}, grid {config.grid}: "
          f"codebook {tokenizer.codebook_size} codes, {tokenizer.tokens_per_image} tokens/image; "
          f"{args.n} specs per task\n")
    cols = ["(a) render", "(b) tokenizer", "(c) uniform noise", "(d) blur 3x3", "(e) noise std 30"]
    print("| task | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    totals = torch.zeros(len(cols))
    timing = {"render": 0.0, "tokenizer": 0.0, "detect+score": 0.0}
    gen = torch.Generator().manual_seed(args.seed)
    for task in TASKS:
        rng = random.Random(f"{task}-{args.seed}")
        specs = [make_spec(task, rng) for _ in range(args.n)]
        t0 = time.perf_counter()
        images, _ = render_batch(specs, args.seed)
        t1 = time.perf_counter()
        roundtrip = tokenizer.decode(tokenizer.encode(images))
        t2 = time.perf_counter()
        noise = torch.randint(0, 256, images.shape, dtype=torch.uint8, generator=gen)
        blur = F.avg_pool2d(images.float(), 3, 1, 1, count_include_pad=False).round().to(torch.uint8)
        noisy = (images.float() + 30 * torch.randn(images.shape, generator=gen)).clamp(0, 255).to(torch.uint8)
        t3 = time.perf_counter()
        results = [rate(detector, x, specs) for x in (images, roundtrip, noise, blur, noisy)]
        t4 = time.perf_counter()
        timing["render"] += t1 - t0
        timing["tokenizer"] += t2 - t1
        timing["detect+score"] += t4 - t3
        totals += torch.tensor([r[0] for r in results])
        print(f"| {task} | " + " | ".join(f"{ok:.3f} (score {s:.2f})" for ok, s in results) + " |")
    print("| **overall** | " + " | ".join(f"**{v:.3f}**" for v in (totals / len(TASKS)).tolist()) + " |")
    n_img = args.n * len(TASKS)
    print("\nrate = GenEval correct rate; score = mean detector score over all detections (nan: none).")
    print(f"time for {n_img} images: render {timing['render']:.2f}s, "
          f"encode+decode {timing['tokenizer']:.2f}s, "
          f"detect+score x5 conditions {timing['detect+score']:.2f}s")


if __name__ == "__main__":
    main()
