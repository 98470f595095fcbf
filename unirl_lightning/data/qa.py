"""UniRL's self-questions: a question and ground-truth answer per GenEval spec, and a grader.

The grader works on words, not substrings ("red" never matches inside "bored"), ignores case,
punctuation and articles, accepts plurals (GenEval's and English), digits for number words and
extra words, and grades each applicable attribute (object, count, color, relation) separately:
the score is the fraction right, so the reward is graded rather than binary.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

from unirl_lightning.data.prompts import english_plural, geneval_plural, with_article
from unirl_lightning.worlds.vocab import (COLORS, NUMBERS, OPPOSITE_POSITION, POSITIONS, SHAPES, TASKS,
                                         load_geneval_constants)

__all__ = [
    "QUESTIONS",
    "Grade",
    "question_for",
    "answer_for",
    "grade_answer",
    "split_words",
    "all_answer_words",
]

#: The question UniRL asks about an image generated for each task ({A}, {B}: object names).
QUESTIONS: dict[str, str] = {
    "single_object": "What is the main item in this image?",
    "two_object": "What are two items in this image?",
    "counting": "How many items in this image?",
    "colors": "What is the color of the object?",
    "position": "Where is the {A} relative to the {B}?",
    "color_attr": "What are the colors of the {A} and the {B}?",
}

# Words of the answer templates beyond names, colours, numbers and relations.
_ANSWER_WORDS = ("there", "is", "a", "an", "the", "and")

_ARTICLES = frozenset({"a", "an", "the"})
_DETERMINERS = _ARTICLES | {"this", "that", "one", "each", "every", "some"}
_COPULAS = frozenset({"is", "are", "was", "were", "be", "looks", "look", "colored", "coloured", "in"})
_NUMBER_WORDS = {w: i for i, w in enumerate(NUMBERS)}
# Single words that name a relation (the "of" in "left of" is optional for the grader).
_RELATION_WORDS = {
    "left": "left of",
    "right": "right of",
    "above": "above",
    "over": "above",
    "atop": "above",
    "top": "above",
    "below": "below",
    "under": "below",
    "beneath": "below",
    "underneath": "below",
}
# Everyday names for GenEval's COCO classes; used only when the canonical name is in the vocabulary
# and the alias is not itself a class there ("hot dog" gets no "dog", "teddy bear" no "bear").
_ALIASES: dict[str, tuple[str, ...]] = {
    "airplane": ("plane", "aeroplane"),
    "bicycle": ("bike",),
    "motorcycle": ("motorbike",),
    "tv": ("television",),
    "couch": ("sofa",),
    "donut": ("doughnut",),
    "refrigerator": ("fridge",),
    "cell phone": ("phone", "cellphone", "mobile phone"),
    "computer mouse": ("mouse",),
    "tv remote": ("remote",),
    "computer keyboard": ("keyboard",),
    "hair drier": ("hair dryer", "hairdryer"),
    "sports ball": ("ball",),
    "dining table": ("table",),
    "potted plant": ("plant",),
    "fire hydrant": ("hydrant",),
    "wine glass": ("glass",),
    "stop sign": ("sign",),
    "parking meter": ("meter",),
    "baseball bat": ("bat",),
    "baseball glove": ("glove",),
    "tennis racket": ("racket", "racquet"),
}


def split_words(text: str) -> list[str]:
    """Lower-case words and digit runs of ``text``; punctuation and hyphens separate words."""
    return re.findall(r"[a-z]+|[0-9]+", text.lower())


def _tokens(text: str) -> list[str]:
    # Like split_words, but punctuation stays as tokens: "orange: red; broccoli" must not read
    # "red broccoli" as an adjective phrase.
    return re.findall(r"[a-z]+|[0-9]+|[.,;:!?()/]", text.lower())


# --------------------------------------------------------------------------- spec fields


@dataclass(frozen=True)
class _Fields:
    """What a spec asks for, in question order (objects[0] is the position subject)."""

    tag: str
    objects: tuple[str, ...]
    colors: tuple[str, ...] = ()
    count: int = 1
    relation: str | None = None


def _fields(spec: Mapping) -> _Fields:
    tag = spec.get("tag")
    if tag not in TASKS:
        raise ValueError(f"spec tag must be one of {list(TASKS)}, got {tag!r}")
    inc = spec["include"]
    if tag == "position":
        subject = next((c for c in inc if "position" in c), None)
        if subject is None:
            raise ValueError(f"position spec has no include clause with a 'position': {spec!r}")
        relation, index = subject["position"]
        return _Fields(tag, (subject["class"], inc[index]["class"]), relation=relation)
    if tag in ("two_object", "color_attr") and len(inc) < 2:
        raise ValueError(f"{tag} spec needs two include clauses, got {len(inc)}")
    n = 2 if tag in ("two_object", "color_attr") else 1
    objects = tuple(c["class"] for c in inc[:n])
    colors = tuple(c["color"] for c in inc[:n]) if tag in ("colors", "color_attr") else ()
    return _Fields(tag, objects, colors=colors, count=int(inc[0]["count"]))


def question_for(spec: Mapping) -> str:
    """UniRL's question about an image generated from ``spec``."""
    f = _fields(spec)
    names = dict(zip("AB", f.objects))
    return QUESTIONS[f.tag].format(**names)


def answer_for(spec: Mapping) -> str:
    """The ground-truth answer to :func:`question_for` (counts as words, English plurals)."""
    f = _fields(spec)
    if f.tag == "single_object":
        return f.objects[0]
    if f.tag == "two_object":
        return f"There is {with_article(f.objects[0])} and {with_article(f.objects[1])}"
    if f.tag == "counting":
        word = NUMBERS[f.count] if f.count < len(NUMBERS) else str(f.count)
        noun = f.objects[0] if f.count == 1 else english_plural(f.objects[0])
        return f"{word} {noun}"
    if f.tag == "colors":
        return f.colors[0]
    if f.tag == "position":
        return f"The {f.objects[0]} is {f.relation} the {f.objects[1]}"
    (a, b), (ca, cb) = f.objects, f.colors
    return f"The {a} is {ca} and the {b} is {cb}"


# --------------------------------------------------------------------------- grading


@dataclass(frozen=True)
class Grade:
    """Per-attribute result: None where the task does not ask for that attribute."""

    object: bool | None = None
    count: bool | None = None
    color: bool | None = None
    relation: bool | None = None

    @property
    def applicable(self) -> dict[str, bool]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def score(self) -> float:
        """Fraction of the applicable attributes that are right, in [0, 1]."""
        results = list(self.applicable.values())
        return sum(results) / len(results) if results else 0.0

    @property
    def correct(self) -> bool:
        results = list(self.applicable.values())
        return bool(results) and all(results)

    def as_dict(self) -> dict:
        return {**asdict(self), "score": self.score, "correct": self.correct}


@lru_cache(maxsize=1)
def _coco_names() -> tuple[str, ...]:
    return tuple(load_geneval_constants()["geneval_object_names"])


def _default_vocabulary(spec_classes: Iterable[str]) -> tuple[str, ...]:
    # Knowing the other class names is what lets a wrong object fail.
    classes = tuple(spec_classes)
    base = SHAPES if all(c in SHAPES for c in classes) else _coco_names()
    return tuple(dict.fromkeys((*base, *classes)))


@lru_cache(maxsize=64)
def _phrase_table(vocabulary: tuple[str, ...]) -> tuple[dict[tuple[str, ...], str], int]:
    """Word tuples of every form of every class (singular, plurals, aliases) -> class name."""
    table: dict[tuple[str, ...], str] = {}
    for name in vocabulary:
        for form in (name, geneval_plural(name), english_plural(name)):
            table.setdefault(tuple(split_words(form)), name)
    for name in vocabulary:  # aliases last: a real class name always wins
        for alias in _ALIASES.get(name, ()):
            for form in (alias, english_plural(alias)):
                table.setdefault(tuple(split_words(form)), name)
    table.pop((), None)
    return table, max(len(k) for k in table)


@dataclass(frozen=True)
class _Mention:
    kind: str  # "class" | "color" | "number" | "relation"
    value: object
    start: int
    end: int


def _mentions(words: Sequence[str], vocabulary: tuple[str, ...], f: _Fields) -> list[_Mention]:
    """Classes, colours, numbers and relations in ``words``, in order."""
    table, longest = _phrase_table(vocabulary)
    found: list[_Mention] = []
    i = 0
    while i < len(words):
        for n in range(min(longest, len(words) - i), 0, -1):
            name = table.get(tuple(words[i : i + n]))
            if name is not None:
                found.append(_Mention("class", name, i, i + n))
                i += n
                break
        else:
            w = words[i]
            if w in COLORS:
                found.append(_Mention("color", w, i, i + 1))
            elif w in _NUMBER_WORDS or w.isdigit():
                found.append(_Mention("number", int(w) if w.isdigit() else _NUMBER_WORDS[w], i, i + 1))
            elif w in _RELATION_WORDS and (w != "top" or words[i - 1 : i] == ["on"]):
                found.append(_Mention("relation", _RELATION_WORDS[w], i, i + 1))
            i += 1
    return [_resolve(m, found, words, f) for m in found]


def _resolve(m: _Mention, found: list[_Mention], words: Sequence[str], f: _Fields) -> _Mention:
    """Decide whether a one-word class that is also a colour ("orange") is the colour here."""
    if m.kind != "class" or m.end - m.start != 1 or words[m.start] not in COLORS:
        return m
    as_color = _Mention("color", words[m.start], m.start, m.end)
    if any(o.kind == "class" and o.start == m.end for o in found):
        return as_color  # adjective before a noun: "an orange cow"
    if f.tag not in ("colors", "color_attr"):
        return m  # no colour is asked for, so it names the object
    before = words[m.start - 1] if m.start else ""
    if before in _DETERMINERS or before in _NUMBER_WORDS or before.isdigit():
        return m  # "the orange is red"
    if before in _COPULAS:
        return as_color  # "the cow is orange"
    # Otherwise a colour question wants a colour, unless only the object reading fits the spec.
    word = words[m.start]
    return m if word in f.objects and word not in f.colors else as_color


def _object_ok(classes: list[str], f: _Fields) -> bool:
    return bool(classes) and set(classes) == set(f.objects)


def _colors_by_object(mentions: list[_Mention], f: _Fields) -> dict[str | None, list[str]]:
    """Attach each colour to a class: the noun right after it, else the last class before it."""
    classes = [m for m in mentions if m.kind == "class"]
    colors = [m for m in mentions if m.kind == "color"]
    if not classes and len(colors) == len(f.objects):
        # A bare "red and blue" answers the question's objects in order.
        return {name: [c.value] for name, c in zip(f.objects, colors)}
    out: dict[str | None, list[str]] = {}
    for c in colors:
        after = next((m for m in classes if m.start == c.end), None)
        before = [m for m in classes if m.end <= c.start]
        later = [m for m in classes if m.start >= c.end]
        owner = after or (before[-1] if before else (later[0] if later else None))
        out.setdefault(owner.value if owner else None, []).append(c.value)
    return out


def _relation_ok(mentions: list[_Mention], f: _Fields) -> bool:
    rels = [m for m in mentions if m.kind == "relation"]
    if not rels or len({m.value for m in rels}) != 1:
        return False
    rel = rels[0]
    a, b = f.objects
    subject = next((m.value for m in reversed(mentions) if m.kind == "class" and m.end <= rel.start), None)
    reference = next((m.value for m in mentions if m.kind == "class" and m.start >= rel.end), None)
    # "A is left of B" and "B is right of A" say the same thing.
    readings = [(a, b, f.relation), (b, a, OPPOSITE_POSITION[f.relation])]
    for subj, ref, r in readings:
        if rel.value == r and subject in (subj, None) and reference in (ref, None):
            if subject is not None or reference is not None or r == f.relation:
                return True
    return False


def grade_answer(spec: Mapping, answer: str, vocabulary: Sequence[str] | None = None) -> Grade:
    """Grade ``answer`` to :func:`question_for` ``(spec)`` attribute by attribute.

    ``vocabulary``: the class names an answer may mention (default: the shapes when the spec
    uses only shapes, else GenEval's COCO names); a mentioned class outside the spec fails the
    object attribute, a mentioned colour other than the spec's fails the colour attribute.
    """
    f = _fields(spec)
    if vocabulary is None:
        vocab = _default_vocabulary(f.objects)
    else:
        vocab = tuple(dict.fromkeys((*vocabulary, *f.objects)))
    words = _tokens(answer or "")
    mentions = _mentions(words, vocab, f)
    classes = [m.value for m in mentions if m.kind == "class"]
    colors = [m.value for m in mentions if m.kind == "color"]

    if f.tag in ("single_object", "two_object"):
        return Grade(object=_object_ok(classes, f))
    if f.tag == "counting":
        numbers = {m.value for m in mentions if m.kind == "number"}
        return Grade(object=_object_ok(classes, f), count=numbers == {f.count})
    if f.tag == "colors":
        return Grade(color=bool(colors) and set(colors) == {f.colors[0]})
    if f.tag == "position":
        return Grade(object=_object_ok(classes, f), relation=_relation_ok(mentions, f))
    owned = _colors_by_object(mentions, f)
    # Every object gets exactly its colour, and no colour is left over or given to another thing.
    color_ok = set(owned) == set(f.objects) and all(set(owned[o]) == {c} for o, c in zip(f.objects, f.colors))
    return Grade(object=_object_ok(classes, f), color=color_ok)


# --------------------------------------------------------------------------- word list


def all_answer_words(vocabulary: Sequence[str], max_count: int = len(NUMBERS) - 1) -> list[str]:
    """Every lower-case word that prompts, questions and answers over ``vocabulary`` can use.

    Sorted; punctuation is not included (questions end in "?"). Covers both plural styles
    (GenEval's in prompts, English in answers) and the number words "zero".."{max_count}", so a
    word-level tokenizer built from it never meets an unknown word in generated text.
    """
    words: set[str] = {"a", "an", "photo", "of", "and"}  # prompt template words
    for template in QUESTIONS.values():
        words.update(split_words(re.sub(r"\{\w+\}", " ", template)))
    words.update(_ANSWER_WORDS)
    for name in vocabulary:
        for form in (name, geneval_plural(name), english_plural(name)):
            words.update(split_words(form))
    words.update(COLORS)
    for relation in POSITIONS:
        words.update(split_words(relation))
    words.update(NUMBERS[: max_count + 1])
    return sorted(words)
