"""The memory plan of a recipe: per-rank bytes of parameters, gradients, AdamW state and activations
of the policy, its frozen copies and the reward models, against a GPU's memory, with a verdict and
the knobs that would make it fit."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from unirl_lightning.plan import activations as act
from unirl_lightning.plan.arch import PlanError, build_meta, component, count, load_arch
from unirl_lightning.plan.settings import FLUX, JANUS, SD3

GiB = 2**30
#: token counts the recipes' sequences are planned with (GenEval prompts through Janus' templates)
PROMPT_TOKENS, SYSTEM_TOKENS, QUESTION_TOKENS, ANSWER_TOKENS = 32, 48, 24, 16
#: SD3 prepends CLIP's 77 tokens to T5's
CLIP_TOKENS = 77


@dataclass
class Row:
    """One component's parameters and per-rank bytes."""

    name: str
    params: int
    trainable: int
    param_bytes: float
    grad_bytes: float = 0.0
    optim_bytes: float = 0.0
    act_bytes: float = 0.0
    on_gpu: bool = True
    note: str = ""

    @property
    def total(self) -> float:
        return (
            (self.param_bytes + self.grad_bytes + self.optim_bytes + self.act_bytes) if self.on_gpu else 0.0
        )


@dataclass
class Plan:
    settings: dict[str, Any]
    rows: list[Row]
    act_bytes: float  # activations as configured
    act_no_ckpt: float
    act_ckpt: float
    gpu_gib: float
    knobs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(r.total for r in self.rows)

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_gib * GiB

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "rows": [asdict(r) | {"total": r.total} for r in self.rows],
            "activations": {
                "configured": self.act_bytes,
                "without_checkpointing": self.act_no_ckpt,
                "with_checkpointing": self.act_ckpt,
            },
            "total_bytes": self.total,
            "gpu_gib": self.gpu_gib,
            "fits": self.fits,
            "knobs": self.knobs,
        }


# ---- models -----------------------------------------------------------------------------------------
def _dtype(name: str) -> torch.dtype:
    return getattr(torch, str(name).removeprefix("torch."))


def _param_bytes(m: nn.Module, trainable_only: bool = False, element: int | None = None) -> float:
    """Bytes of `m`'s parameters (shared ones once); `element` overrides their element size."""
    ps = {id(p): p for p in m.parameters()}.values()
    return float(
        sum(p.numel() * (element or p.element_size()) for p in ps if p.requires_grad or not trainable_only)
    )


def _largest_unit(units: list[nn.Module], element: int | None = None) -> float:
    return max((_param_bytes(u, element=element) for u in units), default=0.0)


_BUILT: dict[tuple, tuple] = {}


def _policy_modules(s: dict[str, Any]) -> tuple[nn.Module, dict[str, nn.Module], list[nn.Module], dict]:
    """(trained model, frozen whole-on-every-rank parts, FSDP units, arch config of the trained model),
    built once per architecture setting (the knobs re-plan with the same models)."""
    key = tuple(
        str(s[k])
        for k in (
            "policy",
            "model",
            "torch_dtype",
            "freeze_vq",
            "lora_rank",
            "lora_alpha",
            "lora_targets",
            "drop_t5",
        )
    )
    if key not in _BUILT:
        _BUILT.clear()  # one architecture at a time: meta models are small, but not free
        _BUILT[key] = _build_policy(s)
    return _BUILT[key]


def _build_policy(s: dict[str, Any]) -> tuple[nn.Module, dict[str, nn.Module], list[nn.Module], dict]:
    arch = load_arch(s["model"], "model.init_args.policy")
    dtype = _dtype(s["torch_dtype"]) if s["torch_dtype"] != "auto" else torch.bfloat16
    if s["policy"] == JANUS:
        model = build_meta(component(arch)).to(dtype)
        if s["freeze_vq"]:
            model.model.vqmodel.requires_grad_(False)
        units = [*model.model.language_model.layers, *model.model.vision_model.encoder.layers]
        return model, {}, units, arch["config"]
    transformer = build_meta(component(arch, "transformer")).to(dtype)
    if s["lora_rank"]:
        from unirl_lightning.models.lora import add_lora

        with torch.device("meta"):
            add_lora(transformer, s["lora_rank"], s["lora_alpha"], s["lora_targets"])
    names = ["text_encoder", "text_encoder_2"] + (
        [] if s["policy"] == FLUX or s["drop_t5"] else ["text_encoder_3"]
    )
    frozen = {n: build_meta(component(arch, n)).to(dtype) for n in [*names, "vae"] if n in arch["components"]}
    units = [
        *getattr(transformer, "transformer_blocks", []),
        *getattr(transformer, "single_transformer_blocks", []),
    ]
    return transformer, frozen, units, arch["components"]["transformer"]["config"]


def _copies(s: dict[str, Any]) -> list[tuple[str, str]]:
    """Frozen copies of the trained model the recipe holds: (row name, why)."""
    out, r, lora = [], s["recipe"], bool(s["lora_rank"])
    if r in ("DiscreteGRPO", "UniGRPO") and s["beta"] > 0:
        out.append(("reference", "beta > 0: a frozen copy for the KL"))
    if (
        r == "FlowGRPO"
        and not lora
        and ((s["regularizer"] != "none" and s["beta"] > 0) or s["track_reference"])
    ):
        out.append(("reference", "a frozen copy (with LoRA the base model is the reference, no copy)"))
    if r in ("DiffusionNFT", "AdvantageWeightedMatching") and s["beta"] > 0 and not lora:
        out.append(("reference", "beta > 0: a frozen copy for the velocity MSE"))
    if r == "DiffusionNFT":
        out.append(("old policy", "DiffusionNFT's sampling policy, a frozen copy moved by soft updates"))
    if r == "AdvantageWeightedMatching" and s["ema_beta"] > 0:
        out.append(("EMA anchor", "ema_beta > 0: the policy's EMA, a frozen copy"))
    return out


# ---- activations ------------------------------------------------------------------------------------
def _activations(s: dict[str, Any], cfg: dict[str, Any], mixed: bool) -> tuple[float, float, str]:
    """(bytes without, with checkpointing, what the micro-batch is) of one backward's saved tensors."""
    mb, cfg_rows = s["micro_batch_size"], 2 if s["cfg_scale"] != 1.0 else 1
    if s["policy"] == JANUS:
        t, v, q = cfg["text_config"], cfg["vision_config"], cfg["vq_config"]
        lm = act.llama_stack(
            t["hidden_size"],
            t["intermediate_size"],
            t["num_attention_heads"],
            t["num_hidden_layers"],
            mixed,
        )
        vit = act.vit_stack(
            v["hidden_size"],
            int(v["hidden_size"] * v.get("mlp_ratio", 4.0)),
            v["num_attention_heads"],
            v["num_hidden_layers"],
            mixed,
        )
        L = (v["image_size"] // v["patch_size"]) ** 2
        K, V, h = q["num_embeddings"], t["vocab_size"], t["hidden_size"]
        rows = s["prompts_per_step"] if s["recipe"] == "UniRLSFT" else mb
        r_img = rows * cfg_rows

        def image(ck: bool) -> float:  # teacher-forced image tokens; guided float32 log-softmax
            return (
                lm.bytes(r_img * (PROMPT_TOKENS + L - 1), ck) + r_img * L * (6 * h + 6 * K) + rows * L * K * 4
            )

        def answer(ck: bool) -> float:  # SigLIP on the decoded image, then the LM over the chat
            seq = SYSTEM_TOKENS + L + 2 + QUESTION_TOKENS + ANSWER_TOKENS
            return vit.bytes(rows * L, ck) + lm.bytes(rows * seq, ck) + rows * ANSWER_TOKENS * V * 10

        what = f"{rows} rows x {cfg_rows} (CFG) x {PROMPT_TOKENS + L - 1} tokens"
        if s["recipe"] == "UniRLSFT":  # one backward through image logits, relaxed tokens, VQ decoder, SigLIP
            grid = int(L**0.5)
            vq = (
                act.vq_decoder_bytes(
                    q["base_channels"], q["channel_multiplier"], q["num_res_blocks"], grid, rows
                )
                if s["end_to_end"]
                else 0.0
            )
            gumbel = rows * L * K * 4 * 3
            return (
                image(False) + answer(False) + vq + gumbel,
                image(True) + answer(True) + vq + gumbel,
                what + ", then VQ decoder + SigLIP + answer",
            )
        passes = [(image(False), image(True))] if s["image_weight"] > 0 else []
        if s["answer_weight"] > 0:
            passes.append((answer(False), answer(True)))
        return (
            max(p[0] for p in passes),
            max(p[1] for p in passes),
            what + " (image and answer backwards apart)",
        )
    rows = mb * (cfg_rows if s["recipe"] == "FlowGRPO" else 1)
    side = s["resolution"] // 16
    if s["policy"] == SD3:
        stack = act.mmdit_stack(
            cfg["num_attention_heads"] * cfg["attention_head_dim"],
            cfg["num_layers"],
            len(cfg.get("dual_attention_layers") or []),
        )
        seq = side * side + CLIP_TOKENS + s["max_sequence_length"]
    else:
        stack = act.flux_stack(
            cfg["num_attention_heads"] * cfg["attention_head_dim"],
            cfg["num_layers"],
            cfg["num_single_layers"],
        )
        seq = side * side + s["max_sequence_length"]
    what = f"{rows} rows ({mb} x {'CFG pair' if rows > mb else 'no CFG'}) x {seq} tokens"
    return stack.bytes(rows * seq, False), stack.bytes(rows * seq, True), what


# ---- the plan ---------------------------------------------------------------------------------------
def _detector_rows(s: dict[str, Any]) -> list[Row]:
    rows = []
    models = []
    if s["detector"]:
        models += [(p, "detector (GenEval judge)", s["detector"]["device"]) for p in s["detector"]["paths"]]
    # reward models run where their config puts them (device, dtype), one copy per rank
    models += [
        (m["path"], f"reward model ({m['name']})", m["device"], m["dtype"], m["field"])
        for m in s["reward_models"]
    ]
    for path, role, device, *rest in models:
        dtype, field = rest if rest else ("float32", "model.init_args.detector")
        m = build_meta(load_arch(path, field))
        n, _ = count(m)
        on_gpu = not device.startswith("cpu")
        element = {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 4)
        note = f"{dtype}, whole on every rank" + ("" if on_gpu else "; on the CPU (device: cpu), not counted")
        rows.append(
            Row(
                f"{role}: {path.rsplit('/', 1)[-1]}",
                n,
                0,
                _param_bytes(m, element=element),
                on_gpu=on_gpu,
                note=note,
            )
        )
    return rows


def make_plan(s: dict[str, Any], gpu_gib: float, knobs: bool = True) -> Plan:
    """The plan of settings `s` (`settings.read_settings`) against `gpu_gib` GiB a GPU."""
    model, frozen, units, cfg = _policy_modules(s)
    shard, prec = s["shard_ranks"], s["precision"]
    # "bf16-true" / "16-true": Lightning casts the whole module to 16 bits
    half = 2 if prec.endswith("-true") and prec.startswith(("bf16", "16")) else None
    n, n_train = count(model)
    p_bytes, t_bytes = _param_bytes(model, element=half), _param_bytes(model, True, element=half)
    mixed = prec.endswith("-mixed") and next(model.parameters()).dtype == torch.float32
    no_ck, ck, what = _activations(s, cfg, mixed)
    use_ck = s["gradient_checkpointing"] and s["policy"] == JANUS
    where = f"sharded over {shard} ranks" if shard > 1 else "replicated on every rank"
    rows = [
        Row(
            "policy (trained)",
            n,
            n_train,
            p_bytes / shard,
            t_bytes / shard,
            2 * t_bytes / shard,
            ck if use_ck else no_ck,
            note=f"{where}; AdamW: 2 states a trainable parameter; activations: {what}"
            f"{', checkpointed' if use_ck else ''}",
        )
    ]
    for name, why in _copies(s):
        rows.append(Row(name, n, 0, p_bytes / shard, note=f"{why}; {where}"))
    for name, m in frozen.items():
        rows.append(
            Row(
                f"frozen {name}",
                count(m)[0],
                0,
                _param_bytes(m, element=half),
                note="frozen, whole on every rank (not sharded)",
            )
        )
    if shard > 1 and units:  # FSDP2 gathers a unit at a time and prefetches the next
        rows.append(
            Row(
                "FSDP gather buffers",
                0,
                0,
                2 * _largest_unit(units, half),
                note="the largest shard unit gathered, and the next one prefetched",
            )
        )
    if mixed and t_bytes:
        rows.append(
            Row(
                "autocast weight copies",
                0,
                0,
                t_bytes / 2,
                note="16-bit copies of the fp32 trainable weights, kept by autocast for the step",
            )
        )
    rows += _detector_rows(s)
    plan = Plan(s, rows, ck if use_ck else no_ck, no_ck, ck, gpu_gib)
    if knobs:
        plan.knobs = suggest(plan)
    return plan


def _variant(s: dict[str, Any], **change: Any) -> dict[str, Any]:
    out = copy.deepcopy(s)
    out.update(change)
    return out


def suggest(plan: Plan) -> list[dict[str, Any]]:
    """Knobs to turn, each with the per-rank total it would give (largest saving first)."""
    s, options = plan.settings, []
    if s["policy"] == JANUS and not s["gradient_checkpointing"]:
        options.append(
            (
                "--model.init_args.policy.init_args.gradient_checkpointing true",
                _variant(s, gradient_checkpointing=True),
            )
        )
    if s["micro_batch_size"] > 1 and s["recipe"] != "UniRLSFT":
        options.append(
            (
                f"--model.init_args.micro_batch_size {s['micro_batch_size'] // 2}",
                _variant(s, micro_batch_size=s["micro_batch_size"] // 2),
            )
        )
    if s["recipe"] == "UniRLSFT" and s["prompts_per_step"] > 1:
        options.append(
            (
                f"--data.init_args.prompts_per_step {s['prompts_per_step'] // 2}",
                _variant(s, prompts_per_step=s["prompts_per_step"] // 2),
            )
        )
    if s["policy"] != JANUS and not s["lora_rank"]:
        options.append(("--model.init_args.lora_rank 32", _variant(s, lora_rank=32, lora_alpha=64)))
    if s["shard_ranks"] == 1 and s["world"] > 1:
        options.append(
            (
                "shard: trainer.strategy ModelParallelStrategy (data_parallel_size = GPUs)",
                _variant(s, shard_ranks=s["world"], strategy="ModelParallelStrategy"),
            )
        )
    elif s["shard_ranks"] > 1:
        options.append(
            (
                f"twice the GPUs: --trainer.num_nodes (data_parallel_size {2 * s['shard_ranks']})",
                _variant(s, shard_ranks=2 * s["shard_ranks"], world=2 * s["world"]),
            )
        )
    if any(r.name == "reference" for r in plan.rows):
        options.append(
            ("--model.init_args.beta 0 (no reference copy)", _variant(s, beta=0.0, track_reference=False))
        )
    if s["detector"] and not s["detector"]["device"].startswith("cpu"):
        det = copy.deepcopy(s["detector"])
        det["device"] = "cpu"
        options.append(("--model.init_args.detector.init_args.device cpu", _variant(s, detector=det)))
    out = []
    for flag, variant in options:
        other = make_plan(variant, plan.gpu_gib, knobs=False)
        out.append({"knob": flag, "total_gib": other.total / GiB, "fits": other.fits})
    return sorted(out, key=lambda k: k["total_gib"])


def plan_config(config: str, gpu_gib: float, overrides: list[str] | None = None) -> Plan:
    """Parse `config` with the project's CLI (no model built) and plan it against `gpu_gib` GiB."""
    from unirl_lightning.plan.recipe import parse_recipe
    from unirl_lightning.plan.settings import read_settings

    if gpu_gib <= 0:
        raise PlanError(f"--gpu-memory must be > 0 GiB, got {gpu_gib}")
    return make_plan(read_settings(parse_recipe(config, overrides)), gpu_gib)


__all__ = ["GiB", "Plan", "PlanError", "Row", "make_plan", "plan_config", "suggest"]
