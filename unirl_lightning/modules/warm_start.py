"""The cached warm starts of the built-in models, trained on first use: one recipe per model kind.

Post-training recipes start from a model that already draws (and answers, and writes prompts)
roughly right. The first run that needs one trains it with the recipe below, with a progress
display, and caches it under `$UNIRL_CACHE/<kind>/<hash of model config + recipe>` (default
`~/.cache/unirl_lightning`); every later run reuses it. A folder is written under a scratch name
and renamed into place, so a run killed half way never leaves a cache that later runs pick up.

- "warm_start": the built-in unified model (`WarmStartPretrain` on rendered scenes: prompt ->
  image tokens, image -> answer; the mixture, then position scenes, then colour scenes, then the
  mixture; in either image order).
- "flow_warm_start": the built-in flow model (`FlowWarmStart`: flow matching on scenes rendered
  on its latent-cell grid; the mixture without position, then position scenes, then colour scenes,
  then the mixture).
- "text_warm_start": the built-in text policy of UniGRPO (teacher forcing on riddle -> prompt
  pairs, deliberately imperfect: the facts in `held_out` never appear and a share `answer_noise`
  of the targets names a wrong answer, so RL has something to learn; greedy exact prompt 0.97 on
  seen facts, 0.01 on held-out ones; sampled at temperature 1, 0.68 and 0.06; its accuracies are
  saved in `metrics.json`).

Train one explicitly (same recipe, same cache): `python -m unirl_lightning.modules.warm_start
unified|flow|text`; `--recipe NAME` trains a named variant (`VARIANTS`), e.g. `--recipe mixture`
for the unified warm start without its curriculum. Pretrained policies (no built-in `config`) are
their own warm start.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import lightning as L
import torch

from unirl_lightning.callbacks.progress import StepProgress
from unirl_lightning.data import FlowSceneDataModule, RenderedSceneDataModule
from unirl_lightning.data.reasoning import (
    WARM_START_HELD_OUT,
    corrupt_answer,
    generate_reasoning_specs,
)
from unirl_lightning.evaluation.vocab import TASKS
from unirl_lightning.models import TinyFlowModel, TinyTextPolicy, TinyUnifiedModel
from unirl_lightning.models.text.policies import TextPolicy, text_matches
from unirl_lightning.modules.flow_pretrain import FlowWarmStart
from unirl_lightning.modules.pretrain import WarmStartPretrain
from unirl_lightning.modules.training import isolated_rng

#: One recipe per model kind; the cache key hashes it, so a change retrains that warm start.
RECIPES: dict[str, dict] = {
    "warm_start": {
        "max_steps": 2200,
        "batch_size": 64,
        "lr": 1e-3,
        "warmup_steps": 100,
        "cfg_dropout": 0.1,
        "num_train": 4000,
        "seed": 0,
        "val_every": 200,
        # A curriculum: the mixture (1000 steps: objects, counts, colours), then position scenes
        # alone (500: the relation), then colour scenes (300: the colours the position phase wore
        # down), then the mixture with position 3x. Trained on the mixture alone the model never
        # reads "left of" / "above"; a long mixture after the position phase turns the relation
        # back into each training prompt's layout (benchmarks/discrete_grpo.md, "Mixture first").
        "phases": [
            {"steps": 1000, "task_weights": dict.fromkeys(TASKS, 1.0)},
            {"steps": 500, "task_weights": {"position": 1.0}},
            {"steps": 300, "task_weights": {"colors": 1.0, "color_attr": 1.0}},
        ],
        "train_task_weights": {**dict.fromkeys(TASKS, 1.0), "position": 3.0},
    },
    "flow_warm_start": {
        "max_steps": 3800,
        "batch_size": 64,
        "lr": 1e-3,
        "warmup_steps": 100,
        "cfg_dropout": 0.1,
        "t_sampling": "logit_normal",
        "num_train": 4000,
        "seed": 0,
        # A curriculum, as the unified one's: the mixture without position (1000 steps: objects,
        # counts, colours), then position scenes alone (1200: the relation), then colour scenes
        # (800: the binding the position phase wore down), then the mixture with position 3x.
        # Trained on the mixture alone the model never reads "left of" / "above"; trained on
        # position first it draws objects and colours worse (benchmarks/flow_rl_budget.md,
        # "Mixture first").
        "phases": [
            {"steps": 1000, "task_weights": {**dict.fromkeys(TASKS, 1.0), "position": 0.0}},
            {"steps": 1200, "task_weights": {"position": 1.0}},
            {"steps": 800, "task_weights": {"colors": 1.0, "color_attr": 1.0}},
        ],
        "train_task_weights": {**dict.fromkeys(TASKS, 1.0), "position": 3.0},
    },
    "text_warm_start": {
        "max_steps": 300,
        "batch_size": 64,
        "lr": 3e-3,
        "num_train": 4000,
        "held_out": list(WARM_START_HELD_OUT),
        "answer_noise": 0.25,
        "seed": 0,
    },
}


#: Named variants of a recipe (`python -m unirl_lightning.modules.warm_start KIND --recipe NAME`): its
#: overrides, a key set to None dropped. For the unified warm start: "mixture_first", the recipe itself
#: and the default of both image orders (19f4ca2ac4d3dfa5; masked b60c48255fc0b99f);
#: "mixture", no curriculum (cache folder d86a011aff5ad5eb; masked 39aa48e797dabd6d);
#: "position_first", position scenes, then colour scenes, then the mixture (3ae7bb7a9f07c708; masked
#: 1f79dedaf3aa9b44). benchmarks/discrete_grpo.md measures GRPO from each.
VARIANTS: dict[str, dict[str, dict]] = {
    "warm_start": {
        "mixture_first": {},
        "mixture": {"max_steps": 1200, "phases": None, "train_task_weights": None},
        "position_first": {
            "phases": [
                {"steps": 600, "task_weights": {"position": 1.0}},
                {"steps": 400, "task_weights": {"colors": 1.0, "color_attr": 1.0}},
            ],
        },
    },
    # For the flow warm start: "mixture_first", the recipe itself (851e3592ff44642e); "position_first",
    # position scenes, then colour scenes, then the mixture (7860bf5e125ef882). benchmarks/flow_rl_budget.md.
    "flow_warm_start": {
        "mixture_first": {},
        "position_first": {
            "max_steps": 3000,
            "phases": [
                {"steps": 1200, "task_weights": {"position": 1.0}},
                {"steps": 800, "task_weights": {"colors": 1.0, "color_attr": 1.0}},
            ],
        },
    },
}

def resolve_recipe(kind: str, recipe: dict | None = None) -> dict:
    """`RECIPES[kind]` with `recipe`'s overrides; a key overridden with None is dropped (absent)."""
    merged = {**RECIPES[kind], **(recipe or {})}
    return {k: v for k, v in merged.items() if v is not None}


def cache_root() -> Path:
    return Path(os.environ.get("UNIRL_CACHE", Path.home() / ".cache" / "unirl_lightning"))


def cache_dir(kind: str, policy, recipe: dict) -> Path:
    """`$UNIRL_CACHE/<kind>/<hash of policy.config + recipe>`: one folder per architecture and recipe."""
    cfg = getattr(policy, "config", None)
    if cfg is None:
        raise TypeError(
            f"warm_start='auto' ({kind}) is for the built-in models; "
            f"give {type(policy).__name__} a folder written by save_pretrained, or null"
        )
    key = json.dumps({"model": asdict(cfg), "recipe": recipe, "v": 1}, sort_keys=True)
    return cache_root() / kind / hashlib.sha256(key.encode()).hexdigest()[:16]


def cached_training(kind: str, policy, recipe: dict, train: Callable[[Path], None]) -> Path:
    """The cache folder of (kind, policy config, recipe); when it is absent, `train(folder)` writes
    the model into a scratch folder that is then renamed into place, so a run killed half way
    never leaves a cache that later runs would pick up."""
    target = cache_dir(kind, policy, recipe)
    if (target / "model.safetensors").is_file():
        return target
    print(
        f"[unirl_lightning] no cached {kind.replace('_', ' ')} at {target}: "
        f"training it ({recipe['max_steps']} steps, once)"
    )
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with isolated_rng():  # a run that trains the warm start first draws the same stream as one that loads it
        train(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(target)
    return target


def warm_start_dir(kind: str, policy, recipe: dict | None = None) -> Path:
    """The cache folder of `policy`'s config + the `kind` recipe (with `recipe`'s overrides)."""
    return cache_dir(kind, policy, resolve_recipe(kind, recipe))


def ensure_warm_start(policy, recipe: dict | None = None) -> Path | None:
    """Folder of the cached warm start of a built-in unified model, training it first if absent."""
    if getattr(policy, "config", None) is None:
        return None
    r = resolve_recipe("warm_start", recipe)

    def train(folder: Path) -> None:

        module = WarmStartPretrain(
            type(policy)(policy.config),
            lr=r["lr"],
            warmup_steps=r["warmup_steps"],
            max_steps=r["max_steps"],
            cfg_dropout=r["cfg_dropout"],
            save_to=str(folder),
        )
        world = policy.world_config
        data = RenderedSceneDataModule(
            batch_size=r["batch_size"],
            canvas=world.canvas,
            sizes=world.sizes,
            grid=world.grid,
            num_train=r["num_train"],
            seed=r["seed"],
            phases=r.get("phases"),
            train_task_weights=r.get("train_task_weights"),
        )
        L.seed_everything(r["seed"], verbose=False)
        target = folder.with_name(folder.name.removesuffix(".partial"))
        logger = L.pytorch.loggers.TensorBoardLogger(save_dir=str(target.parent), name=target.name + "_logs")
        trainer = L.Trainer(
            max_steps=r["max_steps"],
            logger=logger,
            enable_checkpointing=False,
            accelerator="cpu",
            devices=1,
            val_check_interval=r["val_every"],
            check_val_every_n_epoch=None,
            limit_val_batches=2,
            log_every_n_steps=10,
            enable_model_summary=False,
            callbacks=[StepProgress("warm start")],
        )
        trainer.fit(module, datamodule=data)

    return cached_training("warm_start", policy, r, train)


def ensure_flow_warm_start(policy, recipe: dict | None = None) -> Path | None:
    """Folder of the cached warm start of the built-in flow model, training it first if absent."""
    if getattr(policy, "config", None) is None:
        return None
    r = resolve_recipe("flow_warm_start", recipe)

    def train(folder: Path) -> None:

        module = FlowWarmStart(
            type(policy)(policy.config),
            lr=r["lr"],
            warmup_steps=r["warmup_steps"],
            max_steps=r["max_steps"],
            cfg_dropout=r["cfg_dropout"],
            t_sampling=r["t_sampling"],
            save_to=str(folder),
        )
        world = policy.config.world
        data = FlowSceneDataModule(
            grid=world.grid,
            gap=world.gap,
            batch_size=r["batch_size"],
            canvas=world.canvas,
            sizes=world.sizes,
            num_train=r["num_train"],
            seed=r["seed"],
            first_steps=r.get("first_steps", 0),
            first_task_weights=r.get("first_task_weights"),
            phases=r.get("phases"),
            train_task_weights=r.get("train_task_weights"),
        )
        L.seed_everything(r["seed"], verbose=False)
        trainer = L.Trainer(
            max_steps=r["max_steps"],
            logger=False,
            enable_checkpointing=False,
            limit_val_batches=0,
            accelerator="cpu",
            devices=1,
            enable_model_summary=False,
            callbacks=[StepProgress("flow warm start")],
        )
        trainer.fit(module, datamodule=data)

    return cached_training("flow_warm_start", policy, r, train)


def ensure_text_warm_start(policy: TextPolicy, recipe: dict | None = None) -> Path | None:
    """Folder of the cached warm start of the built-in text policy, training it first if absent (~1 min)."""
    if getattr(policy, "config", None) is None:
        return None
    r = resolve_recipe("text_warm_start", recipe)

    def train(folder: Path) -> None:
        torch.manual_seed(r["seed"])
        fresh = type(policy)(policy.config)
        specs = generate_reasoning_specs(r["num_train"], r["seed"], exclude_riddles=r["held_out"])
        rng = random.Random(r["seed"])
        pairs = [
            (
                s["reasoning_prompt"],
                corrupt_answer(s, rng) if rng.random() < r["answer_noise"] else s["prompt"],
            )
            for s in specs
        ]
        train_text_supervised(
            fresh, pairs, steps=r["max_steps"], batch_size=r["batch_size"], lr=r["lr"], seed=r["seed"]
        )
        probe = generate_reasoning_specs(600, r["seed"] + 1)
        held = set(r["held_out"])
        seen, unseen = (
            [s for s in probe if s["riddle"] not in held],
            [s for s in probe if s["riddle"] in held],
        )
        metrics = {
            "seen_accuracy": greedy_accuracy(fresh, seen),
            "held_out_accuracy": greedy_accuracy(fresh, unseen),
            "seen_sampled_accuracy": greedy_accuracy(fresh, seen, temperature=1.0),
            "held_out_sampled_accuracy": greedy_accuracy(fresh, unseen, temperature=1.0),
        }
        print(f"[unirl_lightning] text warm start greedy accuracy: {metrics}")
        fresh.save_pretrained(folder)
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))

    return cached_training("text_warm_start", policy, r, train)


def train_text_supervised(
    policy: TextPolicy,
    pairs: Sequence[tuple[str, str]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    log_every: int = 100,
) -> list[float]:
    """Teacher-force `policy` on (prompt, target) pairs for `steps` AdamW steps (cosine lr); returns the
    losses.

    Loss: mean negative log-prob per target token (EOS included).
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    policy.train()
    losses = []
    for step in range(steps):
        idx = torch.randint(len(pairs), (batch_size,), generator=gen).tolist()
        prompts, targets = [pairs[i][0] for i in idx], [pairs[i][1] for i in idx]
        rollout = policy.target_rollout(targets)
        loss = -policy.logprobs(prompts, rollout).sum() / rollout.mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"[unirl_lightning] text warm start step {step + 1}/{steps}: loss {loss.item():.3f}")
    return losses


@torch.no_grad()
def greedy_accuracy(
    policy: TextPolicy,
    specs: Sequence[dict],
    max_new_tokens: int = 16,
    batch_size: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
) -> float:
    """Share of specs whose text from "reasoning_prompt" (greedy, or sampled at `temperature`) equals
    "prompt"."""
    if not specs:
        return float("nan")
    hits, gen = 0, torch.Generator().manual_seed(seed)
    for i in range(0, len(specs), batch_size):
        chunk = specs[i : i + batch_size]
        out = policy.generate(
            [s["reasoning_prompt"] for s in chunk],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            generator=gen,
        )
        hits += sum(text_matches(t, s["prompt"]) for t, s in zip(out.texts, chunk))
    return hits / len(specs)


def main(args: Sequence[str] | None = None) -> None:
    """`python -m unirl_lightning.modules.warm_start unified|flow|text [--image-order masked]
    [--recipe NAME]`: train (once) and print the folder."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("kind", choices=["unified", "flow", "text"])
    parser.add_argument("--image-order", choices=["autoregressive", "masked"], default="autoregressive",
                        help="the built-in unified model's image order (unified only)")
    ensure = {
        "unified": (ensure_warm_start, TinyUnifiedModel, "warm_start"),
        "flow": (ensure_flow_warm_start, TinyFlowModel, "flow_warm_start"),
        "text": (ensure_text_warm_start, TinyTextPolicy, "text_warm_start"),
    }
    named = "; ".join(
        f"{k}: {', '.join(VARIANTS[key])}" for k, (_, _, key) in ensure.items() if key in VARIANTS
    )
    parser.add_argument("--recipe", default=None, help=f"a named variant of the recipe ({named})")
    parsed = parser.parse_args(args)
    kind = parsed.kind
    fn, model, key = ensure[kind]
    variants = VARIANTS.get(key, {})
    if parsed.recipe is not None and parsed.recipe not in variants:
        parser.error(f"--recipe {parsed.recipe!r}: the {kind} warm start has "
                     + (f"the variants {sorted(variants)}" if variants else "no named variants"))
    recipe = variants.get(parsed.recipe)
    policy = model(image_order=parsed.image_order) if kind == "unified" else model()
    print(fn(policy, recipe))


if __name__ == "__main__":
    main()
