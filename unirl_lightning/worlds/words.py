"""The synthetic world's words and a word-level tokenizer for the built-in models' closed vocabulary
(prompts, questions, answers)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Sequence

from unirl_lightning.worlds.vocab import COLORS, NUMBERS, SHAPES

_WORD = re.compile(r"[a-z0-9]+|[?.,!]")

#: Words of GenEval's templates and UniRL's questions/answers, beyond the object and colour names.
TEMPLATE_WORDS = (
    "a an the photo of and left right above below is are there two items item in this image "
    "what main how many color colors colored object objects where relative to its one "
    "- ? . ,"
).split()


def split_words(text: str) -> list[str]:
    """Lowercased words and punctuation; hyphens split words ("red-colored" -> red, colored)."""
    return _WORD.findall(text.lower())


def plural(word: str) -> str:
    """English plural for the world's shape names (regular rules; enough for the closed vocabulary)."""
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    return word + "s"


def world_words(classes: Iterable[str] = SHAPES) -> list[str]:
    """Every word the synthetic world's prompts, questions and answers use."""
    words: list[str] = list(TEMPLATE_WORDS)
    for name in classes:
        for w in split_words(name) + split_words(plural(name)):
            words.append(w)
    words += list(COLORS) + list(NUMBERS) + [str(i) for i in range(11)]
    return list(dict.fromkeys(words))  # de-duplicate, keep order


class WordTokenizer:
    """Maps text to word ids `0..len(words)-1`, unknown words to `unk_id` (given by the caller's layout)."""

    def __init__(self, words: Sequence[str]):
        self.words = list(dict.fromkeys(words))
        self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str, unk_id: int = -1) -> list[int]:
        return [self.index.get(w, unk_id) for w in split_words(text)]

    def decode(self, ids: Iterable[int]) -> str:
        out = " ".join(self.words[i] for i in ids if 0 <= i < len(self.words))
        return re.sub(r" ([?.,!])", r"\1", out)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.words))

    @classmethod
    def load(cls, path: str | Path) -> "WordTokenizer":
        return cls(json.loads(Path(path).read_text()))
