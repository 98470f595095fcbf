"""Seeded GenEval-format prompt generation for any object vocabulary (COCO's 80 or the shapes).

Templates, articles and plurals follow GenEval's own generation script, so :func:`prompt_for`
reproduces every official prompt string (GenEval pluralises naively: "benchs", "persons").
``grammar="english"`` switches counting prompts to real English plurals ("benches", "people").
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from unirl_lightning.worlds.vocab import COLORS, NUMBERS, POSITIONS, SHAPES, TASKS, load_geneval_constants

__all__ = [
    "GENEVAL_TASK_COUNTS",
    "with_article",
    "geneval_plural",
    "english_plural",
    "plural",
    "make_spec",
    "prompt_for",
    "task_capacity",
    "generate_specs",
    "split_specs",
    "world_vocabulary",
    "geneval_vocabulary",
]

#: Prompts per task in the official GenEval file (553 in all): the default task mix.
GENEVAL_TASK_COUNTS: dict[str, int] = {
    "single_object": 80,
    "two_object": 99,
    "counting": 80,
    "colors": 94,
    "position": 100,
    "color_attr": 100,
}

# GenEval never asks for a coloured person ("[COLOR] person" prompts are skipped).
_NO_COLOR = frozenset({"person"})

# English plurals that the simple suffix rules get wrong (applied to the last word of a name).
_IRREGULAR_PLURALS = {
    "person": "people",
    "mouse": "mice",
    "knife": "knives",
    "sheep": "sheep",
    "skis": "skis",
    "scissors": "scissors",
    "man": "men",
    "woman": "women",
    "child": "children",
    "fish": "fish",
    "deer": "deer",
}

# Above this many candidates a task is sampled by rejection instead of enumerated.
_ENUMERATE_LIMIT = 200_000


def with_article(phrase: str) -> str:
    """GenEval's article rule: "an" before a vowel letter, else "a"."""
    return f"an {phrase}" if phrase[:1] in "aeiou" else f"a {phrase}"


def geneval_plural(name: str) -> str:
    """GenEval's plural: "+es" after a final "s", else "+s" ("buses", but "benchs", "persons")."""
    return f"{name}es" if name.endswith("s") else f"{name}s"


def english_plural(name: str) -> str:
    """English plural of a (possibly multi-word) name: "people", "computer mice", "benches"."""
    head, _, last = name.rpartition(" ")
    if last in _IRREGULAR_PLURALS:
        word = _IRREGULAR_PLURALS[last]
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        word = last + "es"
    elif last.endswith("y") and last[-2:-1] not in ("a", "e", "i", "o", "u", ""):
        word = last[:-1] + "ies"
    elif last.endswith("fe"):
        word = last[:-2] + "ves"
    else:
        word = last + "s"
    return f"{head} {word}" if head else word


def plural(name: str, grammar: str = "geneval") -> str:
    """Plural by ``grammar``: "geneval" (reproduces official prompts) or "english"."""
    if grammar == "geneval":
        return geneval_plural(name)
    if grammar == "english":
        return english_plural(name)
    raise ValueError(f"grammar must be 'geneval' or 'english', got {grammar!r}")


def make_spec(
    tag: str,
    objects: Sequence[str],
    *,
    count: int = 1,
    colors: Sequence[str] = (),
    relation: str | None = None,
    grammar: str = "geneval",
) -> dict:
    """Build one spec exactly as GenEval's generator lays it out.

    ``objects`` are in prompt order; for "position" the prompt reads
    "a photo of a {objects[0]} {relation} a {objects[1]}" and include[0] is the reference object.
    """
    if tag == "single_object":
        (a,) = objects
        return {"tag": tag, "include": [{"class": a, "count": 1}], "prompt": f"a photo of {with_article(a)}"}
    if tag == "two_object":
        a, b = objects
        return {
            "tag": tag,
            "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
            "prompt": f"a photo of {with_article(a)} and {with_article(b)}",
        }
    if tag == "counting":
        (a,) = objects
        if not 1 <= count < len(NUMBERS):
            raise ValueError(f"count must be in 1..{len(NUMBERS) - 1} (GenEval's number words), got {count}")
        return {
            "tag": tag,
            "include": [{"class": a, "count": count}],
            "exclude": [{"class": a, "count": count + 1}],
            "prompt": f"a photo of {NUMBERS[count]} {plural(a, grammar)}",
        }
    if tag == "colors":
        (a,), (c,) = objects, colors
        return {
            "tag": tag,
            "include": [{"class": a, "count": 1, "color": c}],
            "prompt": f"a photo of {with_article(c)} {a}",
        }
    if tag == "position":
        a, b = objects
        if relation not in POSITIONS:
            raise ValueError(f"relation must be one of {list(POSITIONS)}, got {relation!r}")
        return {
            "tag": tag,
            "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}],
            "prompt": f"a photo of {with_article(a)} {relation} {with_article(b)}",
        }
    if tag == "color_attr":
        (a, b), (ca, cb) = objects, colors
        return {
            "tag": tag,
            "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
            "prompt": f"a photo of {with_article(ca)} {a} and {with_article(cb)} {b}",
        }
    raise ValueError(f"unknown task {tag!r}; expected one of {list(TASKS)}")


def _spec_args(spec: Mapping) -> tuple[str, tuple, dict]:
    """Inverse of :func:`make_spec`: (tag, objects, keyword args) of a GenEval-layout spec."""
    tag, inc = spec["tag"], spec["include"]
    if tag == "position":
        subject = next(c for c in inc if "position" in c)
        reference = inc[subject["position"][1]]
        return tag, (subject["class"], reference["class"]), {"relation": subject["position"][0]}
    objects = tuple(c["class"] for c in inc)
    kwargs: dict = {}
    if tag == "counting":
        kwargs["count"] = inc[0]["count"]
    if tag in ("colors", "color_attr"):
        kwargs["colors"] = tuple(c["color"] for c in inc)
    return tag, objects, kwargs


def prompt_for(spec: Mapping, grammar: str = "geneval") -> str:
    """The GenEval prompt text for ``spec`` (recomputed from its clauses, not read from it)."""
    tag, objects, kwargs = _spec_args(spec)
    return make_spec(tag, objects, grammar=grammar, **kwargs)["prompt"]


def world_vocabulary() -> list[str]:
    """The synthetic world's object classes (the shapes)."""
    return list(SHAPES)


def geneval_vocabulary() -> list[str]:
    """GenEval's object names (COCO's 80 classes)."""
    return list(load_geneval_constants()["geneval_object_names"])


# --------------------------------------------------------------------------- generation


def _candidates(task: str, vocab: Sequence[str], max_count: int) -> Iterable[tuple]:
    """All parameter tuples of a task, in a fixed order: (objects, count, colors, relation)."""
    colorable = [v for v in vocab if v not in _NO_COLOR]
    if task == "single_object":
        return (((a,), 1, (), None) for a in vocab)
    if task == "two_object":
        return (((a, b), 1, (), None) for a, b in itertools.permutations(vocab, 2))
    if task == "counting":
        return (((a,), n, (), None) for a in vocab for n in range(2, max_count + 1))
    if task == "colors":
        return (((a,), 1, (c,), None) for a in colorable for c in COLORS)
    if task == "position":
        return (((a, b), 1, (), r) for a, b in itertools.permutations(vocab, 2) for r in POSITIONS)
    if task == "color_attr":
        return (
            ((a, b), 1, cs, None)
            for a, b in itertools.permutations(colorable, 2)
            for cs in itertools.permutations(COLORS, 2)
        )
    raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")


def task_capacity(task: str, vocabulary: Sequence[str], max_count: int = 4) -> int:
    """How many distinct prompts ``task`` has over ``vocabulary``."""
    v = len(vocabulary)
    c = len([x for x in vocabulary if x not in _NO_COLOR])
    k = len(COLORS)
    sizes = {
        "single_object": v,
        "two_object": v * (v - 1),
        "counting": v * max(max_count - 1, 0),
        "colors": c * k,
        "position": v * (v - 1) * len(POSITIONS),
        "color_attr": c * (c - 1) * k * (k - 1),
    }
    if task not in sizes:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    return sizes[task]


def _draw(task: str, vocab: Sequence[str], max_count: int, rng: random.Random) -> tuple:
    """One uniformly random parameter tuple (for tasks too large to enumerate)."""
    colorable = [v for v in vocab if v not in _NO_COLOR]
    if task in ("two_object", "position"):
        objs = tuple(rng.sample(list(vocab), 2))
        return objs, 1, (), (rng.choice(POSITIONS) if task == "position" else None)
    if task == "color_attr":
        return tuple(rng.sample(colorable, 2)), 1, tuple(rng.sample(COLORS, 2)), None
    if task == "colors":
        return (rng.choice(colorable),), 1, (rng.choice(COLORS),), None
    if task == "counting":
        return (rng.choice(list(vocab)),), rng.randint(2, max_count), (), None
    return (rng.choice(list(vocab)),), 1, (), None


def _allocate(n: int, weights: Mapping[str, float], capacity: Mapping[str, int]) -> dict[str, int]:
    """Split n over tasks in proportion to weights (largest remainder), moving overflow elsewhere."""
    quota = {t: 0 for t in weights}
    open_tasks = [t for t, w in weights.items() if w > 0 and capacity[t] > 0]
    left = n
    while left > 0:
        if not open_tasks:
            total = sum(min(capacity[t], quota[t]) for t in quota)
            raise ValueError(
                f"cannot make {n} distinct prompts: the vocabulary and tasks allow only {total}; "
                "ask for fewer, add tasks, or use a larger vocabulary"
            )
        total_w = sum(weights[t] for t in open_tasks)
        exact = {t: left * weights[t] / total_w for t in open_tasks}
        share = {t: int(exact[t]) for t in open_tasks}
        # Largest remainder; ties broken by task order so the split is deterministic.
        order = sorted(open_tasks, key=lambda t: (-(exact[t] - share[t]), open_tasks.index(t)))
        for t in order[: left - sum(share.values())]:
            share[t] += 1
        for t in open_tasks:
            quota[t] += share[t]
        # Tasks past their capacity give the surplus back for the next round.
        left = 0
        for t in open_tasks:
            if quota[t] > capacity[t]:
                left += quota[t] - capacity[t]
                quota[t] = capacity[t]
        open_tasks = [t for t in open_tasks if quota[t] < capacity[t]]
    return quota


def _resolve_weights(tasks: Sequence[str], task_weights) -> dict[str, float]:
    tasks = list(dict.fromkeys(tasks))
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        raise ValueError(f"tasks must be a non-empty subset of {list(TASKS)}, got {list(tasks)}")
    if task_weights is None:
        weights = {t: float(GENEVAL_TASK_COUNTS[t]) for t in tasks}
    elif isinstance(task_weights, Mapping):
        extra = [t for t in task_weights if t not in tasks]
        if extra:
            raise ValueError(f"task_weights names tasks {extra} that are not in tasks={tasks}")
        weights = {t: float(task_weights.get(t, 0.0)) for t in tasks}
    else:
        task_weights = list(task_weights)
        if len(task_weights) != len(tasks):
            raise ValueError(f"task_weights has {len(task_weights)} entries for {len(tasks)} tasks")
        weights = {t: float(w) for t, w in zip(tasks, task_weights)}
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"task_weights must be non-negative with a positive sum, got {weights}")
    return weights


def generate_specs(
    n: int,
    vocabulary: Sequence[str],
    *,
    seed: int,
    tasks: Sequence[str] = TASKS,
    task_weights: Mapping[str, float] | Sequence[float] | None = None,
    max_count: int = 4,
    exclude_prompts: Iterable[str] = (),
    grammar: str = "geneval",
    allow_repeats: bool = False,
) -> list[dict]:
    """``n`` distinct GenEval-format specs over ``vocabulary``, the same for the same seed.

    The task mix follows ``task_weights`` (default: GenEval's own per-task counts) as exactly as
    integers allow; a task that runs out of distinct prompts (e.g. single_object over 4 shapes)
    hands its share to the others, unless ``allow_repeats`` (then its prompts repeat, keeping
    the mix: useful for small vocabularies). Prompts in ``exclude_prompts`` are never produced.
    Counting asks for 2..``max_count`` objects, as GenEval does. The result is shuffled.
    """
    setup = _Setup.make(n, vocabulary, tasks, task_weights, max_count, grammar, allow_repeats)
    excluded = set(exclude_prompts)
    pools, capacity = _pools(setup, excluded)
    return _generate(setup, n, pools, capacity, excluded, random.Random(seed))


def split_specs(
    vocabulary: Sequence[str],
    n_train: int,
    n_test: int,
    seed: int,
    *,
    test_fraction: float | None = None,
    exclude_prompts: Iterable[str] = (),
    tasks: Sequence[str] = TASKS,
    task_weights: Mapping[str, float] | Sequence[float] | None = None,
    max_count: int = 4,
    grammar: str = "geneval",
    allow_repeats: bool = False,
) -> tuple[list[dict], list[dict]]:
    """Train and test specs with disjoint prompt strings (options as in :func:`generate_specs`).

    Test may use at most ``test_fraction`` (default n_test / (n_train + n_test)) of each
    enumerable task's distinct prompts, at least one where the task has two or more, so that a
    small vocabulary (4 shapes: 4 single_object prompts) still leaves every task to train on.
    """
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if test_fraction is None:
        test_fraction = n_test / max(n_train + n_test, 1)
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    setup = _Setup.make(0, vocabulary, tasks, task_weights, max_count, grammar, allow_repeats)
    excluded = set(exclude_prompts)

    pools, capacity = _pools(setup, excluded)
    rng = random.Random(_substream(seed, "test"))
    for task, pool in pools.items():
        if pool is None:
            continue  # too many prompts to run out of
        cap = len(pool)
        # At least one test prompt, and at least one left for train (unless there is no train).
        limit = min(max(round(test_fraction * cap), 1 if cap >= 2 else 0), max(cap - 1, 0))
        if n_train == 0:
            limit = cap
        pools[task] = rng.sample(pool, limit)
        capacity[task] = limit
    test = _generate(setup, n_test, pools, capacity, excluded, rng)

    excluded |= {s["prompt"] for s in test}
    pools, capacity = _pools(setup, excluded)
    train = _generate(setup, n_train, pools, capacity, excluded, random.Random(_substream(seed, "train")))
    return train, test


def _substream(seed: int, name: str) -> int:
    # A derived integer seed: stable across processes (unlike hash()) and distinct per name.
    return random.Random(f"{seed}:{name}").getrandbits(63)


@dataclass(frozen=True)
class _Setup:
    """Validated generation options."""

    vocab: tuple[str, ...]
    weights: dict[str, float]
    max_count: int
    grammar: str
    allow_repeats: bool

    @classmethod
    def make(cls, n, vocabulary, tasks, task_weights, max_count, grammar, allow_repeats) -> _Setup:
        vocab = tuple(dict.fromkeys(vocabulary))
        if not vocab or not all(isinstance(v, str) and v.strip() for v in vocab):
            raise ValueError(f"vocabulary must be a non-empty list of class names, got {list(vocabulary)!r}")
        if not 2 <= max_count < len(NUMBERS) - 1:
            raise ValueError(
                f"max_count must be in 2..{len(NUMBERS) - 2} (count+1 needs a number word), got {max_count}"
            )
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        plural(vocab[0], grammar)  # validates grammar early
        return cls(vocab, _resolve_weights(tasks, task_weights), max_count, grammar, allow_repeats)

    def build(self, task: str, params: tuple) -> dict:
        objects, count, colors, relation = params
        return make_spec(task, objects, count=count, colors=colors, relation=relation, grammar=self.grammar)


def _pools(setup: _Setup, excluded: set[str]) -> tuple[dict[str, list[tuple] | None], dict[str, int]]:
    """Every allowed parameter tuple of each small task (None: sampled lazily), and capacities."""
    pools: dict[str, list[tuple] | None] = {}
    capacity: dict[str, int] = {}
    for task in setup.weights:
        size = task_capacity(task, setup.vocab, setup.max_count)
        if size <= _ENUMERATE_LIMIT:
            # Keyed by prompt: drops exclusions and any two specs that would read the same. Only
            # parameter tuples are kept (specs are built once drawn): far less for the GC to walk.
            candidates = _candidates(task, setup.vocab, setup.max_count)
            prompts = {setup.build(task, p)["prompt"]: p for p in candidates}
            pool = [p for prompt, p in prompts.items() if prompt not in excluded]
            pools[task], capacity[task] = pool, len(pool)
        else:
            pools[task], capacity[task] = None, max(size - len(excluded), 0)
    return pools, capacity


def _generate(setup: _Setup, n: int, pools, capacity, excluded: set[str], rng: random.Random) -> list[dict]:
    """Allocate n over tasks, then draw from the pools (or lazily, avoiding ``excluded``)."""
    if setup.allow_repeats:
        # Enumerated tasks can then fill any quota; an empty task still cannot.
        capacity = {t: (max(n, c) if pools[t] else c) for t, c in capacity.items()}
    quota = _allocate(n, setup.weights, capacity)
    specs: list[dict] = []
    for task in setup.weights:
        k, pool = quota[task], pools[task]
        if pool is not None:
            # Whole shuffled passes over the pool, so repeats are as even as possible.
            while k > 0:
                take = min(k, len(pool))
                specs.extend(setup.build(task, p) for p in rng.sample(pool, take))
                k -= take
            continue
        seen = set(excluded)
        while k > 0:
            spec = setup.build(task, _draw(task, setup.vocab, setup.max_count, rng))
            if spec["prompt"] not in seen:
                seen.add(spec["prompt"])
                specs.append(spec)
                k -= 1
    rng.shuffle(specs)
    return specs
