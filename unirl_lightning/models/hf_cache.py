"""The key / value cache argument of transformers' models, by the name the installed version uses.

Recent transformers releases (5.25 here) renamed `past_key_values` (argument and output field) to
`cache` and warn on the old name; earlier releases know only `past_key_values`. Recipes pass and
read the cache through these helpers so every supported version runs without the warning.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any, Callable


@lru_cache(maxsize=None)
def _keyword(forward: Callable) -> str:
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_keyword(module: Any) -> str:
    """The name `module`'s forward takes the cache by: "cache", or "past_key_values" on older releases.
    Look it up outside compiled code (`torch.compile` would trace the signature lookup)."""
    return _keyword(type(module).forward)


def cache_kwargs(module: Any, cache: Any) -> dict[str, Any]:
    """`{name: cache}` for `module`'s forward: `cache=` where it takes it, else `past_key_values=`."""
    return {cache_keyword(module): cache}


def output_cache(out: Any) -> Any:
    """The cache a transformers model output returns (`out.cache`, or `out.past_key_values`)."""
    found = out.get("cache")
    return found if found is not None else out.get("past_key_values")
