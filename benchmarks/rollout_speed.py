"""Image-token rollout speed: JanusPolicy's decoders vs transformers' Janus generate, and the built-in model.

One process, one random Janus config and batch, all rows run interleaved, median of `--runs` timed
runs after a warm-up (compiling included in the warm-up). Rows:
  (a) `JanusPolicy.generate_images`: tokens + per-token log-probs of the guided distribution
      (prompt formatting and tokenisation included), with `decode="dynamic"` (a growing
      transformers cache), `"static"` (a preallocated cache, fixed shapes) and `"compiled"` (the
      static step under `torch.compile`; CUDA graphs on GPU);
  (b) `JanusForConditionalGeneration.generate(generation_mode="image", do_sample=True)`: tokens
      only, on pre-tokenised inputs; eager (its image mode allocates a static cache) and with its
      language model under `torch.compile(dynamic=False)` (Janus' image loop calls the language
      model directly, so transformers' own generate-time compile does not apply to it);
  (c) `TinyUnifiedModel.generate_images` (the built-in model, default TinyConfig) at the same
      batch, token count and guidance, each decode mode.

    python benchmarks/rollout_speed.py --batch 16 --grid 8 --cfg 5 --runs 5 --threads 1
    python benchmarks/rollout_speed.py --preset janus-pro-1b --device cuda --batch 16   # a GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from unirl_lightning.models.janus import JanusPolicy  # noqa: E402
from unirl_lightning.models.tiny import TinyConfig, TinyUnifiedModel  # noqa: E402
from unirl_lightning.testing import tiny_janus_components  # noqa: E402

PROMPTS = ["a photo of a red square", "a photo of two blue circles",
           "a photo of a green cross left of a triangle", "a photo of a yellow triangle and a purple circle"]
#: Janus-Pro-1B's language model and image-token sizes (configs/arch/janus_pro_1b.json), random weights
PRESETS = {"janus-pro-1b": dict(hidden=2048, layers=24, heads=16, codebook=16384, grid=24)}
MODES = ("dynamic", "static", "compiled")


def median_seconds(fns: dict[str, Callable[[], object]], runs: int,
                   clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median time of each fn by `clock` (wall by default); runs interleaved so machine load hits
    every row alike."""
    for fn in fns.values():  # warm-up (allocator, lazy init)
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t = clock()
            fn()
            times[name].append(clock() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--grid", type=int, default=8, help="image tokens per side (grid^2 tokens)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--codebook", type=int, default=1024)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="real sizes (overrides the five above)")
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--skip", default="", help="comma-separated rows to leave out, e.g. hf_compiled,tiny")
    args = parser.parse_args()
    for k, v in PRESETS.get(args.preset, {}).items():
        setattr(args, k, v)

    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model, processor = tiny_janus_components(hidden_size=args.hidden, num_layers=args.layers,
                                             num_heads=args.heads, grid=args.grid,
                                             codebook_size=args.codebook)
    model = model.to(device, dtype).eval()
    policies = {m: JanusPolicy.from_components(model, processor, decode=m).eval() for m in MODES}
    tiny_model = TinyUnifiedModel(TinyConfig()).to(device).eval()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    texts = [policies["dynamic"].chat_prompt(p) for p in prompts]
    hf_inputs = processor(text=texts, generation_mode="image", padding=True, return_tensors="pt").to(device)
    L = policies["dynamic"].tokens_per_image
    eager_lm = model.model.language_model.forward

    def timed(fn):
        def run():
            out = fn()
            sync(device)
            return out
        return run

    def ours(mode):
        return timed(lambda: policies[mode].generate_images(
            prompts, cfg_scale=args.cfg, generator=torch.Generator().manual_seed(0)))

    def hf(compiled):
        lm = model.model.language_model
        forward = torch.compile(eager_lm, dynamic=False) if compiled else eager_lm

        def run():
            lm.forward = forward
            try:
                return model.generate(**hf_inputs, generation_mode="image", do_sample=True, top_k=0,
                                      guidance_scale=args.cfg)
            finally:
                lm.forward = eager_lm
        return timed(run)

    def builtin(mode):
        def run():
            tiny_model.decode = mode  # one model, so the rows share weights
            return tiny_model.generate_images(prompts, cfg_scale=args.cfg,
                                              generator=torch.Generator().manual_seed(0))
        return timed(run)

    rows = {
        "ours_dynamic": ("(a) JanusPolicy, decode=dynamic", "yes", ours("dynamic"), args.batch * L),
        "ours_static": ("(a) JanusPolicy, decode=static", "yes", ours("static"), args.batch * L),
        "ours_compiled": ("(a) JanusPolicy, decode=compiled", "yes", ours("compiled"), args.batch * L),
        "hf": ("(b) transformers Janus generate(image), eager", "no", hf(False), args.batch * L),
        "hf_compiled": ("(b) transformers Janus generate(image), language model compiled", "no", hf(True),
                        args.batch * L),
    }
    n_tiny = args.batch * tiny_model.tokens_per_image
    tiny_params = sum(p.numel() for p in tiny_model.parameters()) / 1e6
    for mode in MODES:
        name = f"(c) TinyUnifiedModel ({tiny_params:.2f}M params, {tiny_model.tokens_per_image} tokens)"
        rows[f"tiny_{mode}"] = (f"{name}, decode={mode}", "yes", builtin(mode), n_tiny)
    skip = {k.strip() for k in args.skip.split(",") if k.strip()}
    skip |= {k for k in rows if "tiny" in skip and k.startswith("tiny_")}
    rows = {k: v for k, v in rows.items() if k not in skip}
    # one CPU thread: the process's CPU time, which other jobs on the machine do not inflate
    cpu_clock = device.type == "cpu" and args.threads == 1
    secs = median_seconds({k: v[2] for k, v in rows.items()}, args.runs,
                          time.process_time if cpu_clock else time.perf_counter)

    n_params = sum(p.numel() for p in model.model.language_model.parameters()) / 1e6
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"Janus: Llama text model {args.layers} layers x {args.hidden} ({n_params:.2f}M params), codebook "
          f"{args.codebook}, {L} image tokens; batch {args.batch}, cfg {args.cfg} (2x rows), temperature 1; "
          f"{args.dtype}; torch {torch.__version__}; {card}; median of {args.runs} runs of "
          f"{'CPU' if cpu_clock else 'wall'} time\n")
    hf_rate = {k: rows[k][3] / secs[k] for k in ("hf", "hf_compiled") if k in secs}
    best = max(hf_rate, key=hf_rate.get) if hf_rate else None
    unit = "CPU s" if cpu_clock else "s"
    print(f"| rollout | log-probs | {unit} / batch | image tokens / s | vs generate, eager "
          "| vs transformers' best |")
    print("|---|---|---:|---:|---:|---:|")
    for key, (name, logp, _, n) in rows.items():
        rate = n / secs[key]
        eager = f"{rate / hf_rate['hf']:.2f}x" if "hf" in hf_rate else "-"
        top = f"{rate / hf_rate[best]:.2f}x" if best else "-"
        print(f"| {name} | {logp} | {secs[key]:.3f} | {rate:,.0f} | {eager} | {top} |")


if __name__ == "__main__":
    main()
