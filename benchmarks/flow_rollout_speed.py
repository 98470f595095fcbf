"""Flow rollouts against diffusers' own pipelines: our SD3 / FLUX samplers (which also keep every
latent and each step's log-prob) against `StableDiffusion3Pipeline` / `FluxPipeline`, same tiny
pipeline folder, steps, batch and guidance, in one process.

    python benchmarks/flow_rollout_speed.py [--prompts 4] [--group 4] [--steps 10] [--repeats 5] \
        [--resolution 64]

Rows: P x G images per call (P prompts, G images each). "pipeline": the diffusers pipeline's
`__call__` (text encoding, denoising, VAE decode, `output_type="np"`). "ours, ODE": our policy's
`sample` at noise 0 (text encoding, denoising with every state kept, log-probs, decode). "ours,
grouped SDE": FlowGRPO's rollout with a 2-step SDE window at steps [4, 6) and `groups=` (each
prompt's G rows share their initial noise, so the 4 steps before the window run once per prompt).
Times are medians of `--repeats` calls, the three interleaved; ratio = pipeline time / ours
(> 1: ours faster). The same command runs at a real pipeline folder on a GPU (`--pipeline-sd3`,
`--pipeline-flux`, `--device cuda`, `--dtype bfloat16`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    """Seconds of one call: wall time on a GPU; on a CPU with one thread the process's CPU time, which
    other jobs on the machine do not inflate."""
    clock = time.process_time if device == "cpu" and torch.get_num_threads() == 1 else time.perf_counter
    _sync(device)
    start = clock()
    fn()
    _sync(device)
    return clock() - start


def compare(kind: str, folder: str, args: argparse.Namespace) -> dict[str, float]:
    """Median seconds per call of the pipeline, our ODE sampler and our grouped SDE rollout."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from unirl_lightning.models.flow import DiffusersFlowPolicy, DiffusersFluxPolicy

    dtype = getattr(torch, args.dtype)
    prompts = [f"a photo of {n} red circles" for n in range(args.prompts) for _ in range(args.group)]
    groups = torch.arange(args.prompts).repeat_interleave(args.group)
    if kind == "sd3":
        pipe = StableDiffusion3Pipeline.from_pretrained(
            folder, dtype=dtype, text_encoder_3=None, tokenizer_3=None
        )
        policy = DiffusersFlowPolicy(
            folder,
            resolution=args.resolution,
            torch_dtype=args.dtype,
            drop_t5=True,
            max_sequence_length=args.max_sequence_length,
        )
        guidance = {"guidance_scale": args.cfg}
        ours_cfg = args.cfg
    else:
        pipe = FluxPipeline.from_pretrained(folder, dtype=dtype)
        policy = DiffusersFluxPolicy(
            folder,
            resolution=args.resolution,
            torch_dtype=args.dtype,
            max_sequence_length=args.max_sequence_length,
            guidance_scale=args.cfg,
        )
        guidance = {"guidance_scale": args.cfg, "max_sequence_length": args.max_sequence_length}
        ours_cfg = 1.0  # FLUX.1-dev's guidance is a transformer input: one pass, as the pipeline
    pipe.to(args.device)
    policy.to(args.device).eval()
    pipe.set_progress_bar_config(disable=True)

    def run_pipeline():
        pipe(
            prompt=prompts,
            num_inference_steps=args.steps,
            height=args.resolution,
            width=args.resolution,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
            **guidance,
        )

    def run_ode():
        policy.sample(
            prompts,
            num_steps=args.steps,
            noise_level=0.0,
            cfg_scale=ours_cfg,
            generator=torch.Generator().manual_seed(0),
        )

    def run_grouped():
        policy.sample(
            prompts,
            num_steps=args.steps,
            noise_level=0.7,
            cfg_scale=ours_cfg,
            sde_window=(4, 6),
            groups=groups,
            generator=torch.Generator().manual_seed(0),
        )

    calls = {"pipeline": run_pipeline, "ours, ODE": run_ode, "ours, grouped SDE": run_grouped}
    with torch.no_grad():
        for fn in calls.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(args.repeats):
            for name, fn in calls.items():
                times[name].append(timed(fn, args.device))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--cfg", type=float, default=4.5, help="SD3: CFG scale; FLUX: its guidance input")
    ap.add_argument("--max-sequence-length", type=int, default=12)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument(
        "--pipeline-sd3", default=None, help="a StableDiffusion3Pipeline folder (default: a tiny one)"
    )
    ap.add_argument("--pipeline-flux", default=None, help="a FluxPipeline folder (default: a tiny one)")
    args = ap.parse_args()
    from unirl_lightning.testing import tiny_flux_pipeline, tiny_sd3_pipeline

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"{args.prompts} prompts x {args.group} images, {args.steps} steps, {args.resolution} px, "
        f"{args.dtype}, {device}, torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print("| pipeline | diffusers s / call | ours ODE s | ratio | ours grouped SDE s | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for kind, given, build in (
            ("sd3", args.pipeline_sd3, tiny_sd3_pipeline),
            ("flux", args.pipeline_flux, tiny_flux_pipeline),
        ):
            folder = given
            if folder is None:
                folder = str(Path(tmp) / kind)
                build(folder)
            t = compare(kind, folder, args)
            p, ode, grouped = t["pipeline"], t["ours, ODE"], t["ours, grouped SDE"]
            name = "StableDiffusion3Pipeline" if kind == "sd3" else "FluxPipeline"
            print(
                f"| {name} | {p:.4f} | {ode:.4f} | {p / ode:.2f}x | {grouped:.4f} | {p / grouped:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
