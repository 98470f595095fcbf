"""GPU check: rollout throughput, RL step times, peak memory against the memory plan, and MFU, on one
device with random weights, written as one markdown table.

    python benchmarks/gpu/check.py                      # real sizes on the GPU (tiny on a CPU-only host)
    python benchmarks/gpu/check.py --size tiny --device cpu --out /tmp/check.md
    python benchmarks/gpu/check.py --sections janus,grpo,memory

Sections (each guarded: one that fails writes its error in the table and the others still run):
  janus      `JanusPolicy.generate_images` (decode dynamic / static / compiled; compiled on GPU only)
             against transformers' `JanusForConditionalGeneration.generate(generation_mode="image")`:
             image tokens / s. Janus-Pro-1B's language-model sizes (`rollout_speed.PRESETS`).
  flow       our SD3 sampler (`DiffusersFlowPolicy.sample`) at noise 0 and as FlowGRPO's SDE-window
             rollout against diffusers' `StableDiffusion3Pipeline`: images / s. SD3.5-Medium's
             transformer (from its arch file) with small stand-in text encoders and VAE.
  grpo       one GRPO step on the Janus policy: rollout, reward, update (fp32 weights, bf16 autocast).
  flow_grpo  one FlowGRPO step on the SD3 policy (LoRA, velocity-MSE penalty to the base model).
  memory     `torch.cuda.max_memory_allocated()` of the step phases against `unirl_lightning.plan`.
Batch sizes, CFG, LoRA and sampler settings are those of `configs/janus_pro_1b_grpo.yaml` and
`configs/sd35_flow_grpo.yaml` (one GPU's share). The reward is synthetic (mean pixel value): no
reward model is loaded.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: the sibling benchmarks import as `benchmarks.*`
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.rollout_speed import PRESETS, PROMPTS, median_seconds, sync  # noqa: E402
from unirl_lightning.models.janus import JanusPolicy  # noqa: E402

SECTIONS = ("janus", "flow", "grpo", "flow_grpo", "memory")
JANUS_CONFIG = ROOT / "configs" / "janus_pro_1b_grpo.yaml"
SD3_CONFIG = ROOT / "configs" / "sd35_flow_grpo.yaml"
GiB = 2**30
#: dense bf16 peak FLOP/s by device name (most specific name first)
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
             ("A100", 312e12))
#: Janus language-model sizes: Janus-Pro-1B's, or tiny_janus_components' defaults
JANUS_SIZES = {"real": PRESETS["janus-pro-1b"],
               "tiny": dict(hidden=32, layers=2, heads=4, codebook=64, grid=8)}
#: what --size tiny shrinks SD3.5-Medium's transformer to (its other fields stay the arch file's)
TINY_SD3 = dict(num_layers=1, num_attention_heads=2, attention_head_dim=8, caption_projection_dim=16,
                joint_attention_dim=32, pooled_projection_dim=32, pos_embed_max_size=8, sample_size=8)
TINY_RESOLUTION = 64
#: plan the recipes as one GPU runs them: no sharding, no detector (the reward here is synthetic)
ONE_GPU = ["--trainer.devices", "1", "--trainer.strategy", "auto", "--model.init_args.detector", "null"]
#: the Janus step trains the image tokens only (no self-answers): plan it so
JANUS_IMAGE_ONLY = ["--model.init_args.answer_weight", "0"]


@dataclass
class Line:
    """One row of the results table."""

    section: str
    measurement: str
    ours: str = "-"
    reference: str = "-"
    ratio: str = "-"
    note: str = ""

    def markdown(self) -> str:
        cells = (self.section, self.measurement, self.ours, self.reference, self.ratio, self.note)
        return "| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |"


@dataclass
class MemoryPhase:
    """A step phase's measured peak and the plan's prediction for it (bytes; None: not known)."""

    name: str
    peak: float | None
    plan: float | None
    note: str


@dataclass
class Check:
    """What every section shares: sizes, device, repeats, the deadline and the memory phases."""

    size: str
    device: torch.device
    runs: int
    deadline: float
    workdir: Path
    memory: list[MemoryPhase] = field(default_factory=list)
    _recipes: dict[str, tuple[Any, dict]] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype(self) -> torch.dtype:
        """Inference / 16-bit weight dtype: bf16 on GPU; fp32 on CPU, where bf16 matmuls are slow."""
        return torch.bfloat16 if self.cuda else torch.float32

    def autocast(self):
        """bf16 autocast on GPU, as `trainer.precision: bf16-mixed` runs the step; none on CPU."""
        return torch.autocast("cuda", torch.bfloat16) if self.cuda else nullcontext()

    def recipe(self, config: Path, extra: list[str] | None = None) -> tuple[Any, dict]:
        """The parsed recipe config (one GPU, no detector) and its memory settings, parsed once."""
        from unirl_lightning.plan.recipe import parse_recipe
        from unirl_lightning.plan.settings import read_settings

        key = " ".join([str(config), *(extra or [])])
        if key not in self._recipes:
            cfg = parse_recipe(config, ONE_GPU + (extra or []))
            self._recipes[key] = (cfg, read_settings(cfg))
        return self._recipes[key]


# ---- shared helpers -----------------------------------------------------------------------------
class Phases:
    """Synchronised wall time and peak CUDA memory of named phases, over repeated steps."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.peak: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield
        sync(self.device)
        self.seconds[name].append(time.perf_counter() - start)
        if self.device.type == "cuda":
            peak = float(torch.cuda.max_memory_allocated(self.device))
            self.peak[name] = max(self.peak.get(name, 0.0), peak)

    def median(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.seconds.items()}


def run_steps(ctx: Check, step: Callable[[Phases], None]) -> Phases:
    """One warm-up step (allocator, AdamW state, lazy init), then `ctx.runs` measured steps."""
    step(Phases(ctx.device))
    phases = Phases(ctx.device)
    for _ in range(ctx.runs):
        step(phases)
    return phases


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """`fn` followed by a device synchronisation, so wall time covers the queued GPU work."""

    def run() -> object:
        out = fn()
        sync(device)
        return out

    return run


def probe(fns: dict[str, Callable[[], object]], lines: list[Line], section: str) -> dict[str, Callable]:
    """Calls each fn once (compiling where it compiles); one that fails becomes an error line
    instead of taking the whole section down."""
    ok = {}
    for name, fn in fns.items():
        try:
            fn()
            ok[name] = fn
        except Exception as err:  # noqa: BLE001 - reported in the table
            lines.append(Line(section, name, "error", note=f"{type(err).__name__}: {err}"[:300]))
    return ok


def grouped_prompts(cfg: Any) -> tuple[list[str], torch.Tensor]:
    """One GPU's rollout batch of the recipe: `prompts_per_step` prompts x `group_size` images each."""
    from unirl_lightning.plan.recipe import get

    n_prompts = int(get(cfg, "data.init_args.prompts_per_step", 2))
    group = int(get(cfg, "data.init_args.group_size", 8))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n_prompts) for _ in range(group)]
    return prompts, torch.arange(n_prompts).repeat_interleave(group)


def count(n: float) -> str:
    """A parameter count in B / M / k."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def pixel_reward(images: torch.Tensor) -> torch.Tensor:
    """A synthetic reward: each uint8 image's mean pixel value in [0, 1] (no reward model to load)."""
    return images.float().mean(dim=(1, 2, 3)) / 255


def peak_flops(ctx: Check) -> float | None:
    """The card's dense bf16 peak FLOP/s, None for a CPU or an unknown card."""
    if not ctx.cuda:
        return None
    name = torch.cuda.get_device_name(ctx.device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def mfu_line(ctx: Check, section: str, flops: float, update_s: float, step_s: float, how: str) -> Line:
    """Achieved update FLOP/s, and model FLOPs utilisation of the update and of the whole step."""
    peak = peak_flops(ctx)
    note, achieved = f"model FLOPs {how} = {flops:.3g}", f"{flops / update_s / 1e12:.3g} TFLOP/s"
    if peak is None:
        return Line(section, "update MFU", achieved, note=note + "; no known bf16 peak for this device")
    note += f"; over the whole step (rollout included): {flops / step_s / peak:.2%}"
    return Line(section, "update MFU", achieved, f"{peak / 1e12:.0f} TFLOP/s bf16 peak",
                f"{flops / update_s / peak:.2%}", note)


def step_lines(section: str, phases: Phases, n: int, what: str) -> list[Line]:
    """Median seconds of each phase of a step and their total."""
    med = phases.median()
    total = sum(med.values())
    lines = [Line(section, f"{what}: {k}", f"{v:.3f} s", ratio=f"{v / total:.0%}", note="share of the step")
             for k, v in med.items()]
    lines.append(Line(section, f"{what}: total", f"{total:.3f} s", note=f"{n / total:.1f} rollouts / s"))
    return lines


def plan_bytes(settings: dict, model_folder: Path, ctx: Check, **change: Any) -> tuple[float, float, str]:
    """The plan of `settings` for the model whose configs are in `model_folder`: (resident bytes:
    weights + AdamW; total per rank: + grads + activations; what its micro-batch holds)."""
    from unirl_lightning.plan import make_plan

    gpu_gib = torch.cuda.get_device_properties(ctx.device).total_memory / GiB if ctx.cuda else 80.0
    plan = make_plan({**settings, "model": str(model_folder), **change}, gpu_gib, knobs=False)
    resident = sum(r.param_bytes + r.optim_bytes for r in plan.rows if r.on_gpu)
    return resident, plan.total, plan.rows[0].note.split("activations: ")[-1]


def record_memory(ctx: Check, what: str, phases: Phases, planner: Callable[[], tuple[float, float, str]],
                  run_batch: str) -> None:
    """The rollout and update peaks of a step against the plan (resident state for the rollout,
    the per-rank total for the update)."""
    try:
        resident, total, plan_batch = planner()
        why = f"plan: micro-batch {plan_batch}; run: {run_batch}"
    except Exception as err:  # noqa: BLE001 - the measurements still go in the table
        resident = total = None
        why = f"plan failed: {type(err).__name__}: {err}"[:300]
    ctx.memory.append(MemoryPhase(f"{what}: rollout peak", phases.peak.get("rollout"), resident,
                                  "plan: weights + AdamW state (KV cache / latents not modelled)"))
    ctx.memory.append(MemoryPhase(f"{what}: update peak", phases.peak.get("update"), total, why))


def release(ctx: Check) -> None:
    """Frees a section's models and compiled graphs before the next one measures memory."""
    gc.collect()
    if ctx.cuda:
        torch._dynamo.reset()  # CUDA graphs hold their memory pools until their code is dropped
        torch.cuda.empty_cache()


# ---- models ---------------------------------------------------------------------------------------
def janus_components(ctx: Check, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    """A random `JanusForConditionalGeneration` at this size (built on the device: fast init)."""
    from unirl_lightning.testing import tiny_janus_components

    p = JANUS_SIZES[ctx.size]
    with torch.device(ctx.device):
        model, processor = tiny_janus_components(hidden_size=p["hidden"], num_layers=p["layers"],
                                                 num_heads=p["heads"], grid=p["grid"],
                                                 codebook_size=p["codebook"])
    return model.to(ctx.device, dtype).eval(), processor


def sd3_config(ctx: Check, model_id: str) -> dict:
    """The SD3 transformer's config from the recipe model's arch file, shrunk for --size tiny."""
    from unirl_lightning.plan import load_arch
    from unirl_lightning.plan.arch import component

    cfg = dict(component(load_arch(model_id), "transformer")["config"])
    if ctx.size == "tiny":
        cfg.update(TINY_SD3)
    dual = cfg.get("dual_attention_layers") or []
    cfg["dual_attention_layers"] = [i for i in dual if i < cfg["num_layers"]]
    return cfg


def standin_sd3_folder(folder: Path, cfg: dict) -> None:
    """A pipeline folder around transformer config `cfg`: the testing helpers' small CLIP encoders
    (wide enough for its pooled projection) and tiny VAE (with its latent channels), no T5. Its
    transformer is a one-block stand-in: the timed one is built on the device and swapped in."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers import StableDiffusion3Pipeline

    from unirl_lightning.testing.pipelines import clip_tokenizer, tiny_clip, tiny_vae

    torch.manual_seed(0)
    tok = clip_tokenizer()
    hidden = cfg["pooled_projection_dim"] // 2  # the two CLIPs' pooled outputs concatenate
    keep = ("in_channels", "out_channels", "patch_size", "joint_attention_dim", "pooled_projection_dim")
    standin = {**cfg, **TINY_SD3, **{k: cfg[k] for k in keep}, "dual_attention_layers": []}
    StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel.from_config(standin),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3.5's shift
        vae=AutoencoderKL.from_config({**tiny_vae().config, "latent_channels": cfg["in_channels"]}),
        text_encoder=tiny_clip(tok, hidden=hidden),
        tokenizer=tok,
        text_encoder_2=tiny_clip(tok, hidden=hidden),
        tokenizer_2=tok,
        text_encoder_3=None,
        tokenizer_3=None,
    ).save_pretrained(folder)


def sd3_parts(ctx: Check, settings: dict) -> tuple[Path, torch.nn.Module, Path]:
    """(stand-in pipeline folder, the timed transformer on the device, a configs-only folder of the
    pipeline as timed, for the plan)."""
    from diffusers import SD3Transformer2DModel

    cfg = sd3_config(ctx, settings["model"])
    folder, plan_folder = ctx.workdir / f"sd3-{ctx.size}", ctx.workdir / f"sd3-{ctx.size}-plan"
    if not folder.is_dir():
        standin_sd3_folder(folder, cfg)
        shutil.copytree(folder, plan_folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    torch.manual_seed(0)
    with torch.device(ctx.device):
        transformer = SD3Transformer2DModel.from_config(cfg).to(ctx.dtype)
    transformer.save_config(plan_folder / "transformer")  # the plan reads the timed architecture
    return folder, transformer, plan_folder


def sd3_policy(ctx: Check, settings: dict, folder: Path, transformer: torch.nn.Module):
    """`DiffusersFlowPolicy` over the stand-in folder with the timed transformer swapped in (as its
    `from_pretrained` swaps in a trained one)."""
    from unirl_lightning.models.flow import DiffusersFlowPolicy

    policy = DiffusersFlowPolicy(str(folder), resolution=resolution(ctx, settings),
                                 torch_dtype=str(ctx.dtype).removeprefix("torch."), drop_t5=True,
                                 max_sequence_length=settings["max_sequence_length"])
    policy.transformer = transformer
    return policy.to(ctx.device)


def resolution(ctx: Check, settings: dict) -> int:
    return settings["resolution"] if ctx.size == "real" else TINY_RESOLUTION


# ---- sections -------------------------------------------------------------------------------------
def section_janus(ctx: Check) -> list[Line]:
    """Image tokens / s of JanusPolicy's decoders against transformers' image generate."""
    cfg, settings = ctx.recipe(JANUS_CONFIG, JANUS_IMAGE_ONLY)
    prompts, _ = grouped_prompts(cfg)
    scale = settings["cfg_scale"]
    model, processor = janus_components(ctx, ctx.dtype)
    modes = ("dynamic", "static", "compiled") if ctx.cuda else ("dynamic", "static")  # CPU: no compile wait
    policies = {m: JanusPolicy.from_components(model, processor, decode=m).eval() for m in modes}
    texts = [policies["dynamic"].chat_prompt(p) for p in prompts]
    hf_inputs = processor(text=texts, generation_mode="image", padding=True, return_tensors="pt")
    hf_inputs = hf_inputs.to(ctx.device)

    def ours(mode: str) -> Callable[[], object]:
        return synced(lambda: policies[mode].generate_images(
            prompts, cfg_scale=scale, generator=torch.Generator(ctx.device).manual_seed(0)), ctx.device)

    def hf() -> object:
        return model.generate(**hf_inputs, generation_mode="image", do_sample=True, top_k=0,
                              guidance_scale=scale)

    lines: list[Line] = []
    fns = probe({**{f"JanusPolicy.generate_images, decode={m}": ours(m) for m in modes},
                 "transformers generate(image)": synced(hf, ctx.device)}, lines, "janus")
    secs = median_seconds(fns, ctx.runs)
    tokens = len(prompts) * policies["dynamic"].tokens_per_image
    ref_name = "transformers generate(image)"
    ref = tokens / secs[ref_name] if ref_name in secs else None
    shape = (f"{len(prompts)} images x {policies['dynamic'].tokens_per_image} tokens, CFG {scale:g} "
             f"({2 * len(prompts)} rows), {str(ctx.dtype).removeprefix('torch.')}")
    for name, s in secs.items():
        rate = tokens / s
        lines.append(Line("janus", f"{name}, image tokens / s", f"{rate:,.0f}",
                          f"{ref:,.0f}" if ref else "-", f"{rate / ref:.2f}x" if ref else "-",
                          f"{s:.3f} s / batch; {shape}; reference: transformers generate, eager"))
    if not ctx.cuda:
        lines.append(Line("janus", "decode=compiled", note="GPU only here (inductor's CPU compile is slow)"))
    return lines


def section_flow(ctx: Check) -> list[Line]:
    """Images / s of our SD3 sampler (ODE and SDE-window rollout) against StableDiffusion3Pipeline."""
    from diffusers import StableDiffusion3Pipeline

    from unirl_lightning.plan.recipe import get

    cfg, settings = ctx.recipe(SD3_CONFIG)
    prompts, _ = grouped_prompts(cfg)
    steps, scale = int(get(cfg, "model.init_args.num_steps")), settings["cfg_scale"]
    window = int(get(cfg, "model.init_args.sde_window_size", 2))
    folder, transformer, _ = sd3_parts(ctx, settings)
    policy = sd3_policy(ctx, settings, folder, transformer).eval()
    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), transformer=transformer, text_encoder_3=None,
                                                    tokenizer_3=None, dtype=ctx.dtype).to(ctx.device)
    pipe.set_progress_bar_config(disable=True)
    res = resolution(ctx, settings)

    def run_pipeline() -> None:
        pipe(prompt=prompts, num_inference_steps=steps, height=res, width=res, guidance_scale=scale,
             max_sequence_length=settings["max_sequence_length"], output_type="pt",
             generator=torch.Generator(ctx.device).manual_seed(0))

    def ours(noise: float, sde_window: tuple[int, int] | None) -> Callable[[], object]:
        return lambda: policy.sample(prompts, num_steps=steps, noise_level=noise, cfg_scale=scale,
                                     sde_window=sde_window,
                                     generator=torch.Generator(ctx.device).manual_seed(0))

    mid = (steps - window) // 2
    rows = {"StableDiffusion3Pipeline": run_pipeline,
            "DiffusersFlowPolicy.sample, ODE (noise 0)": ours(0.0, None),
            f"DiffusersFlowPolicy.sample, SDE window of {window} steps": ours(
                float(get(cfg, "model.init_args.noise_level")), (mid, mid + window))}
    lines: list[Line] = []
    with torch.no_grad():
        secs = median_seconds(probe({k: synced(v, ctx.device) for k, v in rows.items()}, lines, "flow"),
                              ctx.runs)
    n = len(prompts)
    ref = n / secs["StableDiffusion3Pipeline"] if "StableDiffusion3Pipeline" in secs else None
    params = count(sum(p.numel() for p in transformer.parameters()))
    shape = (f"{n} images, {steps} steps, {res} px, CFG {scale:g}; transformer {params} params, "
             f"{str(ctx.dtype).removeprefix('torch.')}")
    for name, s in secs.items():
        if name == "StableDiffusion3Pipeline":
            continue
        lines.append(Line("flow", f"{name}, images / s", f"{n / s:.2f}", f"{ref:.2f}" if ref else "-",
                          f"{n / s / ref:.2f}x" if ref else "-",
                          f"{s:.3f} s / batch; {shape}; reference: diffusers pipeline"))
    return lines


def section_grpo(ctx: Check) -> list[Line]:
    """One GRPO step on the Janus policy: rollout, reward, update (micro-batches, one AdamW step)."""
    from unirl_lightning.objectives import group_advantages, policy_loss
    from unirl_lightning.plan.recipe import get

    cfg, settings = ctx.recipe(JANUS_CONFIG, JANUS_IMAGE_ONLY)
    hp = get(cfg, "model.init_args")
    prompts, groups = grouped_prompts(cfg)
    groups, n, mb = groups.to(ctx.device), len(prompts), settings["micro_batch_size"]
    model, processor = janus_components(ctx, torch.float32)  # fp32 master weights, the config's dtype
    policy = JanusPolicy.from_components(model, processor, decode="static")
    trained = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=float(get(hp, "lr")))
    chunks = torch.arange(n, device=ctx.device).split(mb)

    def step(phase: Phases) -> None:
        with phase("rollout"), torch.no_grad(), ctx.autocast():
            rollout = policy.generate_images(prompts, cfg_scale=settings["cfg_scale"],
                                             temperature=float(get(hp, "temperature", 1.0)))
            images = policy.decode_images(rollout.tokens)
        with phase("reward"):
            adv = group_advantages(pixel_reward(images), groups, scale=str(get(hp, "scale", "group")))
        with phase("update"):
            for rows in chunks:
                with ctx.autocast():
                    logp = policy.image_logprobs(rollout.select(rows))
                    loss, _ = policy_loss(logp, logp.detach(), adv[rows], rollout.action_mask[rows],
                                          loss_type=str(get(hp, "loss_type", "grpo")),
                                          epsilon_low=float(get(hp, "epsilon_low", 0.2)))
                (loss * len(rows) / n).backward()
            opt.step()
            opt.zero_grad()

    phases = run_steps(ctx, step)
    # model FLOPs of the update: 6 x the trained language-model + generation-head weights (the
    # input embedding is a lookup) x the teacher-forced tokens, CFG rows included
    lm, head = model.model.language_model, model.model.generation_head
    embed = {id(p) for p in model.get_input_embeddings().parameters()}
    dense = sum(p.numel() for m in (lm, head) for p in m.parameters()
                if p.requires_grad and id(p) not in embed)
    L = policy.tokens_per_image
    seqs = [policy.generation_inputs([prompts[i] for i in rows.tolist()], settings["cfg_scale"])[0]
            for rows in chunks]
    tokens = sum(ids.shape[0] * (ids.shape[1] + L - 1) for ids in seqs)
    med = phases.median()
    lines = step_lines("grpo", phases, n, "Janus GRPO step")
    lines.append(mfu_line(ctx, "grpo", 6 * dense * tokens, med["update"], sum(med.values()),
                          f"6 x {count(dense)} trained params x {tokens:,} tokens"))
    folder = ctx.workdir / f"janus-{ctx.size}-plan"
    model.config.save_pretrained(folder)  # the plan reads this architecture, not Janus-Pro-1B's
    run_batch = f"{mb} rows x 2 (CFG) x {seqs[0].shape[1] + L - 1} tokens"
    record_memory(ctx, "Janus GRPO", phases, lambda: plan_bytes(settings, folder, ctx), run_batch)
    return lines


def section_flow_grpo(ctx: Check) -> list[Line]:
    """One FlowGRPO step on the SD3 policy: SDE-window rollout, reward, update of the window's steps
    (policy loss + velocity-MSE to the base model, LoRA adapters trained, one AdamW step)."""
    from unirl_lightning.objectives import group_advantages, policy_loss, velocity_mse
    from unirl_lightning.plan.recipe import get

    cfg, settings = ctx.recipe(SD3_CONFIG)
    hp = get(cfg, "model.init_args")
    prompts, groups = grouped_prompts(cfg)
    groups, n, mb = groups.to(ctx.device), len(prompts), settings["micro_batch_size"]
    steps, window = int(get(hp, "num_steps")), int(get(hp, "sde_window_size", 2))
    folder, transformer, plan_folder = sd3_parts(ctx, settings)
    policy = sd3_policy(ctx, settings, folder, transformer)
    if settings["lora_rank"]:
        policy.add_lora(settings["lora_rank"], settings["lora_alpha"], settings["lora_targets"])
    lora = bool(settings["lora_rank"])
    ref_policy = policy if lora else policy.make_reference()  # LoRA: the base model is the reference
    trained = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=float(get(hp, "lr")))
    beta, clip = float(get(hp, "beta", 0.0)), float(get(hp, "gradient_clip_val", 1.0) or 0.0)
    mid = (steps - window) // 2  # FlowGRPO draws the window's place at random; its cost is the same
    chunks = torch.arange(n, device=ctx.device).split(mb)
    conds = [policy.encode_text([prompts[i] for i in rows.tolist()]) for rows in chunks]  # frozen encoders

    def step(phase: Phases) -> None:
        with phase("rollout"), torch.no_grad(), ctx.autocast():
            rollout = policy.sample(prompts, num_steps=steps, noise_level=float(get(hp, "noise_level")),
                                    cfg_scale=settings["cfg_scale"], kind=str(get(hp, "kind", "sde")),
                                    sde_window=(mid, mid + window))
        with phase("reward"):
            adv = group_advantages(pixel_reward(rollout.images), groups, scale=str(get(hp, "scale")),
                                   clip=get(hp, "adv_clip"))
        with phase("update"):
            for j in rollout.trained_steps:
                for rows, cond in zip(chunks, conds):
                    at = torch.full_like(rows, j)
                    with ctx.autocast():
                        out = policy.pairs_log_prob(rollout, rows, at, cond)
                        loss, _ = policy_loss(out.log_prob[:, None], rollout.log_probs[rows, j][:, None],
                                              adv[rows], torch.ones_like(rows, dtype=torch.bool)[:, None],
                                              epsilon_low=float(get(hp, "clip_range")))
                        if beta > 0:
                            with torch.no_grad(), (policy.adapters_disabled() if lora else nullcontext()):
                                ref = ref_policy.pairs_log_prob(rollout, rows, at, cond)
                            loss = loss + beta * velocity_mse(out.velocity, ref.velocity).mean()
                    (loss * len(rows) / n / rollout.steps_per_row).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(trained, clip)
            opt.step()
            opt.zero_grad()

    phases = run_steps(ctx, step)
    med = phases.median()
    lines = step_lines("flow_grpo", phases, n, "SD3 FlowGRPO step")
    # model FLOPs: forward + input gradients through every transformer weight (4N), weight gradients
    # of the trained ones (2N_trained), and the reference forward (2N) when penalised, per token
    total = sum(p.numel() for p in transformer.parameters())
    n_trained = sum(p.numel() for p in trained)
    cfg_rows = 2 if settings["cfg_scale"] != 1.0 else 1
    patches = (policy.latent_shape[1] // transformer.config.patch_size) ** 2
    seq = patches + conds[0].hidden.shape[1]
    tokens = n * window * cfg_rows * seq
    per_token = 4 * total + 2 * n_trained + (2 * total if beta > 0 else 0)
    how = (f"({'6' if beta > 0 else '4'} x {count(total)} + 2 x {count(n_trained)} trained) params "
           f"x {tokens:,} tokens")
    lines.append(mfu_line(ctx, "flow_grpo", per_token * tokens, med["update"], sum(med.values()), how))
    run_batch = f"{mb} rows x {cfg_rows} (CFG) x {seq} tokens"
    change = {"max_sequence_length": conds[0].hidden.shape[1] - 77, "resolution": resolution(ctx, settings)}
    record_memory(ctx, "SD3 FlowGRPO", phases, lambda: plan_bytes(settings, plan_folder, ctx, **change),
                  run_batch)
    return lines


def section_memory(ctx: Check) -> list[Line]:
    """Peak allocated memory of each measured phase against the plan's prediction."""
    if not ctx.memory:
        return [Line("memory", "no phase measured", note="run the grpo / flow_grpo sections too")]

    def gib(x: float | None) -> str:
        if x is None:
            return "-"
        return f"{x / GiB:.2f} GiB" if x >= GiB / 10 else f"{x / 2**20:.1f} MiB"

    lines = []
    for m in ctx.memory:
        ratio = f"{m.peak / m.plan:.2f}x" if m.peak and m.plan else "-"
        measured = gib(m.peak) if ctx.cuda else "-"
        lines.append(Line("memory", m.name, measured, gib(m.plan), ratio, m.note))
    return lines


RUNNERS: dict[str, Callable[[Check], list[Line]]] = {
    "janus": section_janus,
    "flow": section_flow,
    "grpo": section_grpo,
    "flow_grpo": section_flow_grpo,
    "memory": section_memory,
}


def run_section(ctx: Check, name: str, started: float) -> list[Line]:
    """One section, its error as a table row if it fails; skipped once the time budget is spent."""
    if time.perf_counter() > ctx.deadline:
        return [Line(name, "skipped", note="the time budget (--budget-s) ran out before this section")]
    t = time.perf_counter()
    try:
        lines = RUNNERS[name](ctx)
    except Exception as err:  # noqa: BLE001 - one failing section must not stop the others
        traceback.print_exc()
        lines = [Line(name, "error", note=f"{type(err).__name__}: {err}"[:300])]
    finally:
        release(ctx)
    print(f"[{name}] {time.perf_counter() - t:.1f} s (at {time.perf_counter() - started:.0f} s)", flush=True)
    return lines


def render(ctx: Check, lines: list[Line], seconds: float) -> str:
    import diffusers
    import transformers

    device = (torch.cuda.get_device_name(ctx.device) if ctx.cuda
              else f"CPU ({torch.get_num_threads()} threads)")
    head = [
        f"# GPU check: {device}",
        "",
        f"size {ctx.size}, random weights; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, diffusers {diffusers.__version__}; median of {ctx.runs} run(s) "
        f"after a warm-up; {seconds:.0f} s in all",
        "",
        f"| section | measurement ({device}) | ours | reference | ratio | note |",
        "|---|---|---:|---:|---:|---|",
    ]
    return "\n".join(head + [line.markdown() for line in lines]) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    has_cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["real", "tiny"], default=None,
                    help="real: Janus-Pro-1B / SD3.5-Medium sizes (default with CUDA); tiny: test sizes")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if has_cuda else "cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "gpu" / "results.md"))
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated, of {','.join(SECTIONS)}")
    ap.add_argument("--runs", type=int, default=None, help="measured runs per row (default: 1 real, 2 tiny)")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="sections that would start after this many seconds are skipped")
    args = ap.parse_args(argv)
    args.size = args.size or ("real" if has_cuda and args.device == "cuda" else "tiny")
    args.runs = args.runs or (1 if args.size == "real" else 2)
    unknown = [s for s in args.sections.split(",") if s.strip() and s.strip() not in SECTIONS]
    if unknown:
        ap.error(f"--sections: unknown {unknown}; choose from {','.join(SECTIONS)}")
    if args.device == "cuda" and not has_cuda:
        ap.error("--device cuda: no CUDA device here; use --device cpu")
    return args


def quiet() -> None:
    """No progress bars while the stand-in folders load (the table is the output)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> Path:
    """Runs the chosen sections and writes the table to `--out`; returns its path."""
    args = parse_args(argv)
    quiet()
    started = time.perf_counter()
    chosen = [s for s in SECTIONS if s in {x.strip() for x in args.sections.split(",")}]  # memory last
    with tempfile.TemporaryDirectory(prefix="unirl-gpu-check-") as tmp:
        ctx = Check(args.size, torch.device(args.device), args.runs, started + args.budget_s, Path(tmp))
        lines = [line for name in chosen for line in run_section(ctx, name, started)]
    text = render(ctx, lines, time.perf_counter() - started)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return out


if __name__ == "__main__":
    main()
