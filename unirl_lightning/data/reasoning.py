"""A reasoning task in the synthetic world: riddles that need one step of reasoning to draw right.

Each riddle is a GenEval prompt with one slot replaced by a description of its value, e.g.

    "a photo of as many circles as a triangle has corners"   -> "a photo of three circles"
    "a photo of a square the color of grass"                 -> "a photo of a green square"
    "a photo of a cross left of the shape with four corners" -> "a photo of a cross left of a square"

A spec is a plain GenEval spec (its "prompt" is the answer a reasoning text policy should write,
its clauses are what the judge scores) plus "reasoning_prompt" (the riddle) and "riddle" (the
fact used, e.g. "the color of coal"; the text warm start holds some facts out). The riddle
vocabulary is closed: :func:`reasoning_words` is every word a riddle or a plain prompt uses.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Sequence

from unirl_lightning.data.datamodule import OnPolicyDataModule
from unirl_lightning.data.prompts import make_spec, plural, with_article
from unirl_lightning.worlds.words import split_words, world_words
from unirl_lightning.worlds.vocab import COLORS, POSITIONS, SHAPES, TASKS

__all__ = [
    "SHAPE_RIDDLES",
    "COLOR_RIDDLES",
    "NUMBER_RIDDLES",
    "WARM_START_HELD_OUT",
    "reasoning_words",
    "riddle_answer",
    "corrupt_answer",
    "all_reasoning_specs",
    "generate_reasoning_specs",
    "split_reasoning_specs",
    "ReasoningDataModule",
]

#: Descriptions of each shape (a noun phrase that replaces "a {shape}").
SHAPE_RIDDLES: dict[str, tuple[str, ...]] = {
    "triangle": ("the shape with three corners", "the shape with three sides"),
    "square": ("the shape with four corners", "the shape with four equal sides"),
    "circle": ("the round shape", "the shape with no corners"),
    "cross": ("the shape like a plus sign", "the shape with four arms"),
}

#: Things of each colour ("a square the color of grass" -> "a green square").
COLOR_RIDDLES: dict[str, tuple[str, ...]] = {
    "red": ("a tomato",),
    "orange": ("a pumpkin",),
    "yellow": ("a banana",),
    "green": ("grass",),
    "blue": ("the sky",),
    "purple": ("a plum",),
    "pink": ("a flamingo",),
    "brown": ("chocolate",),
    "black": ("coal",),
    "white": ("snow",),
}

#: Number phrases of GenEval's counts 2..4; "{P}" is the plural shape name.
NUMBER_RIDDLES: dict[int, tuple[str, ...]] = {
    2: ("a pair of {P}", "one plus one {P}"),
    3: ("as many {P} as a triangle has corners", "two plus one {P}"),
    4: ("as many {P} as a square has corners", "two plus two {P}"),
}

#: Facts the default text warm start never sees, so RL has something left to learn.
WARM_START_HELD_OUT: tuple[str, ...] = (
    "the shape with no corners",
    "the shape with four arms",
    "the color of coal",
    "the color of a flamingo",
    "the color of a plum",
    "two plus two {P}",
    "a pair of {P}",
)


def reasoning_words() -> list[str]:
    """Every word of the riddles and of the plain prompts (world words first, same order)."""
    phrases = [p for v in SHAPE_RIDDLES.values() for p in v] + [p for v in NUMBER_RIDDLES.values() for p in v]
    phrases += [f"the color of {t}" for v in COLOR_RIDDLES.values() for t in v]
    words = world_words() + [w for p in phrases for w in split_words(p.replace("{P}", ""))]
    return list(dict.fromkeys(words))


# ---- riddle construction -----------------------------------------------------------------------
_SHAPE_OF = {r: shape for shape, rs in SHAPE_RIDDLES.items() for r in rs}
_COLOR_OF = {f"the color of {t}": color for color, ts in COLOR_RIDDLES.items() for t in ts}
_COUNT_OF = {r: n for n, rs in NUMBER_RIDDLES.items() for r in rs}


def riddle_answer(fact: str) -> str | int:
    """What a fact stands for: a shape, a colour or a count ("the color of coal" -> "black")."""
    for table in (_SHAPE_OF, _COLOR_OF, _COUNT_OF):
        if fact in table:
            return table[fact]
    raise KeyError(f"unknown riddle fact {fact!r}")


def corrupt_answer(spec: dict, rng: random.Random) -> str:
    """The plain prompt of a riddle spec with the riddle's answer swapped for a random wrong one.

    Warm-start noise: a text policy trained on some of these spreads probability over the
    alternatives of each riddle slot, so RL samples (and can reward) the right one.
    """
    fact, tag, inc = spec["riddle"], spec["tag"], [dict(c) for c in spec["include"]]
    answer = riddle_answer(fact)
    if fact in _COUNT_OF:
        new = rng.choice([n for n in NUMBER_RIDDLES if n != answer])
        return make_spec(tag, (inc[0]["class"],), count=new)["prompt"]
    key, values = ("color", COLORS) if fact in _COLOR_OF else ("class", SHAPES)
    new = rng.choice([v for v in values if v != answer])
    clause = next(c for c in inc if c.get(key) == answer)
    clause[key] = new
    objects = tuple(c["class"] for c in inc)
    if tag == "position":  # make_spec takes (subject, reference); include[0] is the reference
        return make_spec(tag, objects[::-1], relation=inc[1]["position"][0])["prompt"]
    colors = tuple(c["color"] for c in inc) if tag in ("colors", "color_attr") else ()
    return make_spec(tag, objects, colors=colors)["prompt"]

def _color_riddles(color: str) -> list[str]:
    """Phrases that follow a shape name, e.g. "the color of grass" (each is also its fact)."""
    return [f"the color of {t}" for t in COLOR_RIDDLES[color]]


def _riddles_of(spec: dict) -> list[tuple[str, str]]:
    """All (riddle prompt, fact) variants of a plain spec laid out by `make_spec` (one slot each)."""
    tag, inc = spec["tag"], spec["include"]
    out: list[tuple[str, str]] = []
    if tag == "single_object":
        out += [(f"a photo of {r}", r) for r in SHAPE_RIDDLES[inc[0]["class"]]]
    elif tag == "two_object":
        a, b = inc[0]["class"], inc[1]["class"]
        out += [(f"a photo of {r} and {with_article(b)}", r) for r in SHAPE_RIDDLES[a]]
        out += [(f"a photo of {with_article(a)} and {r}", r) for r in SHAPE_RIDDLES[b]]
    elif tag == "counting":
        a, n = inc[0]["class"], inc[0]["count"]
        out += [(f"a photo of {r.format(P=plural(a))}", r) for r in NUMBER_RIDDLES[n]]
    elif tag == "colors":
        a, c = inc[0]["class"], inc[0]["color"]
        out += [(f"a photo of {with_article(a)} {r}", r) for r in _color_riddles(c)]
    elif tag == "position":
        ref, subj = inc[0]["class"], inc[1]["class"]
        rel = inc[1]["position"][0]
        out += [(f"a photo of {r} {rel} {with_article(ref)}", r) for r in SHAPE_RIDDLES[subj]]
        out += [(f"a photo of {with_article(subj)} {rel} {r}", r) for r in SHAPE_RIDDLES[ref]]
    elif tag == "color_attr":
        (a, ca), (b, cb) = ((c["class"], c["color"]) for c in inc)
        both = f"{with_article(cb)} {b}"
        out += [(f"a photo of {with_article(a)} {r} and {both}", r) for r in _color_riddles(ca)]
        out += [
            (f"a photo of {with_article(ca)} {a} and {with_article(b)} {r}", r) for r in _color_riddles(cb)
        ]
    else:
        raise ValueError(f"unknown task {tag!r}; expected one of {list(TASKS)}")
    return out


def _plain_specs(task: str) -> list[dict]:
    """Every plain GenEval spec of `task` over the world's shapes (counts 2..4)."""
    pairs = list(itertools.permutations(SHAPES, 2))
    if task == "single_object":
        return [make_spec(task, (a,)) for a in SHAPES]
    if task == "two_object":
        return [make_spec(task, p) for p in pairs]
    if task == "counting":
        return [make_spec(task, (a,), count=n) for a in SHAPES for n in NUMBER_RIDDLES]
    if task == "colors":
        return [make_spec(task, (a,), colors=(c,)) for a in SHAPES for c in COLORS]
    if task == "position":
        return [make_spec(task, p, relation=r) for p in pairs for r in POSITIONS]
    if task == "color_attr":
        return [make_spec(task, p, colors=cs) for p in pairs for cs in itertools.permutations(COLORS, 2)]
    raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")


def all_reasoning_specs(task: str, exclude_riddles: Iterable[str] = ()) -> list[dict]:
    """Every distinct riddle spec of `task` (fixed order), without the facts in `exclude_riddles`."""
    skip = set(exclude_riddles)
    return [
        {**spec, "reasoning_prompt": riddle, "riddle": fact}
        for spec in _plain_specs(task)
        for riddle, fact in _riddles_of(spec)
        if fact not in skip
    ]


def _check_tasks(tasks: Sequence[str]) -> list[str]:
    tasks = list(dict.fromkeys(tasks))
    if not tasks or any(t not in TASKS for t in tasks):
        raise ValueError(f"tasks must be a non-empty subset of {list(TASKS)}, got {tasks}")
    return tasks


def _balanced_draw(pools: dict[str, list[dict]], n: int, rng: random.Random) -> list[dict]:
    """n specs, tasks as equal as integers allow, each task in whole shuffled passes over its pool."""
    tasks = [t for t, p in pools.items() if p]
    if n and not tasks:
        raise ValueError("no riddle specs to draw from: every task's pool is empty")
    quota = {t: n // len(tasks) + (i < n % len(tasks)) for i, t in enumerate(tasks)} if tasks else {}
    out: list[dict] = []
    for t in tasks:
        k = quota[t]
        while k > 0:
            take = min(k, len(pools[t]))
            out += rng.sample(pools[t], take)
            k -= take
    rng.shuffle(out)
    return [dict(s) for s in out]


def generate_reasoning_specs(
    n: int, seed: int, *, tasks: Sequence[str] = TASKS, exclude_riddles: Iterable[str] = ()
) -> list[dict]:
    """`n` riddle specs (tasks balanced, repeats only once a task's riddles run out), the same per seed.

    Each is a GenEval spec with "reasoning_prompt" (the riddle) and "riddle" (the fact used).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    exclude = tuple(exclude_riddles)
    pools = {t: all_reasoning_specs(t, exclude) for t in _check_tasks(tasks)}
    return _balanced_draw(pools, n, random.Random(f"reasoning:{seed}"))


def split_reasoning_specs(
    n_train: int, n_val: int, seed: int, *, val_fraction: float = 0.25, tasks: Sequence[str] = TASKS
) -> tuple[list[dict], list[dict]]:
    """Train and validation riddle specs with disjoint riddle prompts.

    Per task, `val_fraction` of the distinct riddles (at least one) are held out; validation takes
    up to `n_val / len(tasks)` of them (no repeats), train draws `n_train` from the rest (balanced).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    tasks = _check_tasks(tasks)
    rng = random.Random(f"reasoning-split:{seed}")
    train_pools, val = {}, []
    per_task = -(-n_val // len(tasks)) if n_val else 0
    for t in tasks:
        pool = all_reasoning_specs(t)
        rng.shuffle(pool)
        k = min(max(1, round(val_fraction * len(pool))), len(pool) - 1)
        val += pool[: min(k, per_task)]
        train_pools[t] = pool[k:]
    rng.shuffle(val)
    return _balanced_draw(train_pools, n_train, rng), [dict(s) for s in val[:n_val]]


# ---- the DataModule -----------------------------------------------------------------------------
class ReasoningDataModule(OnPolicyDataModule):
    """`OnPolicyDataModule` over riddle specs (validation riddles held out from training).

    Batches are `PromptBatch`es whose specs carry "reasoning_prompt"; `batch.prompts` stays the
    plain GenEval prompt (the answer). Args as in `OnPolicyDataModule`, plus `tasks`.
    """

    def __init__(
        self,
        num_train: int = 1200,
        num_val: int = 120,
        val_fraction: float = 0.25,
        tasks: list[str] | None = None,
        prompts_per_step: int = 8,
        group_size: int = 8,
        val_batch_size: int = 60,
        seed: int = 0,
    ):
        super().__init__(
            num_train=num_train,
            num_val=num_val,
            val_fraction=val_fraction,
            prompts_per_step=prompts_per_step,
            group_size=group_size,
            val_batch_size=val_batch_size,
            seed=seed,
        )
        self.tasks = _check_tasks(tasks or TASKS)

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        self.train_specs, self.val_specs = split_reasoning_specs(
            hp.num_train, hp.num_val, hp.seed, val_fraction=hp.val_fraction, tasks=self.tasks
        )
