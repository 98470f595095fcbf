"""Image-token rollout speed: JanusPolicy vs transformers' Janus generate, and the built-in model.

One process, one random Janus config and batch, runs interleaved, median of `--runs` timed runs
after a warm-up. Rows:
  (a) `JanusPolicy.generate_images`: tokens + per-token log-probs of the guided distribution
      (prompt formatting and tokenisation included);
  (b) `JanusForConditionalGeneration.generate(generation_mode="image", do_sample=True)`: tokens
      only, on pre-tokenised inputs;
  (c) `TinyUnifiedModel.generate_images` (the built-in model, default TinyConfig) at the same
      batch, token count and guidance.

    python benchmarks/rollout_speed.py --batch 16 --grid 8 --cfg 5 --runs 5 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from unirl_lightning.models.janus import JanusPolicy
from unirl_lightning.testing import tiny_janus_components  # noqa: E402
from unirl_lightning.models.tiny import TinyConfig, TinyUnifiedModel  # noqa: E402

PROMPTS = ["a photo of a red square", "a photo of two blue circles",
           "a photo of a green cross left of a triangle", "a photo of a yellow triangle and a purple circle"]


def median_seconds(fns: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Median wall time of each fn; runs interleaved so machine load hits every row alike."""
    for fn in fns.values():  # warm-up (allocator, lazy init)
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--grid", type=int, default=8, help="image tokens per side (grid^2 tokens)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--codebook", type=int, default=1024)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, processor = tiny_janus_components(hidden_size=args.hidden, num_layers=args.layers,
                                             num_heads=args.heads, grid=args.grid,
                                             codebook_size=args.codebook)
    policy = JanusPolicy.from_components(model, processor).eval()
    tiny = TinyUnifiedModel(TinyConfig()).eval()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    texts = [policy.chat_prompt(p) for p in prompts]
    hf_inputs = processor(text=texts, generation_mode="image", padding=True, return_tensors="pt")
    L = policy.tokens_per_image

    def ours():
        return policy.generate_images(prompts, cfg_scale=args.cfg, generator=torch.Generator().manual_seed(0))

    def theirs():
        return model.generate(**hf_inputs, generation_mode="image", do_sample=True, top_k=0,
                              guidance_scale=args.cfg)

    def builtin():
        return tiny.generate_images(prompts, cfg_scale=args.cfg, generator=torch.Generator().manual_seed(0))

    secs = median_seconds({"ours": ours, "hf": theirs, "tiny": builtin}, args.runs)
    n_params = sum(p.numel() for p in model.model.language_model.parameters()) / 1e6
    tiny_params = sum(p.numel() for p in tiny.parameters()) / 1e6
    print(f"Janus: Llama text model {args.layers} layers x {args.hidden} ({n_params:.2f}M params), codebook "
          f"{args.codebook}, {L} image tokens; batch {args.batch}, cfg {args.cfg} (2x rows), temperature 1; "
          f"torch {torch.__version__}, {args.threads} thread(s), median of {args.runs} runs\n")
    print("| rollout | log-probs | s / batch | image tokens / s | vs transformers |")
    print("|---|---|---:|---:|---:|")
    rows = [("(a) JanusPolicy.generate_images", "yes", secs["ours"], args.batch * L),
            ("(b) transformers Janus generate(image)", "no", secs["hf"], args.batch * L),
            (f"(c) TinyUnifiedModel ({tiny_params:.2f}M params, {tiny.tokens_per_image} tokens)", "yes",
             secs["tiny"], args.batch * tiny.tokens_per_image)]
    for name, logp, s, n in rows:
        print(f"| {name} | {logp} | {s:.3f} | {n / s:,.0f} | {secs['hf'] / s * n / (args.batch * L):.2f}x |")


if __name__ == "__main__":
    main()
