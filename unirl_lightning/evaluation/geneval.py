"""GenEval scoring rules (official), plus Flow-GRPO-style strict and partial credit.

`evaluate(spec, detections)` reproduces GenEval's `evaluate_images.py` on detections that carry
their colour: threshold (strictly greater), per-class sort and cap, no NMS, include clauses
(>= count, colour and position checked on the top-count objects, a position needs its target
clause to have passed), exclude clauses (fail at >= count). The position rule: box centres, a
margin of `margin * (dim_a + dim_b)` per axis, then the normalised offset's sign beyond 0.5.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from unirl_lightning.evaluation.detection import Box, Detection
from unirl_lightning.evaluation.vocab import COLORS, POSITIONS


def relative_position(box_a: Box, box_b: Box, margin: float = 0.1) -> set[str]:
    """Relations of `box_a` with respect to `box_b`: a subset of {"left of", "right of", "above", "below"}.

    Boxes are (x1, y1, x2, y2) in pixels, y down. Empty when the centres are within the margin.
    """
    ca = ((box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2)
    cb = ((box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2)
    dims_a = (box_a[2] - box_a[0], box_a[3] - box_a[1])
    dims_b = (box_b[2] - box_b[0], box_b[3] - box_b[1])
    offset = (ca[0] - cb[0], ca[1] - cb[1])
    revised = [
        max(abs(o) - margin * (da + db), 0.0) * math.copysign(1.0, o) if o != 0 else 0.0
        for o, da, db in zip(offset, dims_a, dims_b)
    ]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    norm = math.hypot(*offset)  # GenEval divides the revised offset by the raw offset's norm
    dx, dy = revised[0] / norm, revised[1] / norm
    rels: set[str] = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


# --------------------------------------------------------------------------------------
# Spec validation
# --------------------------------------------------------------------------------------

RELATIONS: tuple[str, ...] = POSITIONS
_COLORS: tuple[str, ...] = COLORS


def _positive_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def _check_clause(clause: Any, where: str, *, include_index: int | None) -> None:
    """Raise ValueError naming `where` (e.g. "spec['include'][1]") when a clause is malformed."""
    if not isinstance(clause, Mapping):
        raise ValueError(f"{where} must be a mapping like {{'class': 'dog', 'count': 1}}, got {clause!r}")
    name = clause.get("class")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}['class'] must be a non-empty class name, got {name!r}")
    if not _positive_int(clause.get("count")):
        raise ValueError(
            f"{where}['count'] must be a positive int (1 for 'a dog'), got {clause.get('count')!r}"
        )
    if include_index is None:  # exclude clauses carry class and count only
        return
    if "color" in clause and clause["color"] not in _COLORS:
        raise ValueError(
            f"{where}['color'] must be one of GenEval's colours {_COLORS}, got {clause['color']!r}"
        )
    if "position" in clause:
        pos = clause["position"]
        if not isinstance(pos, Sequence) or isinstance(pos, str) or len(pos) != 2:
            raise ValueError(
                f"{where}['position'] must be [relation, index], e.g. ['left of', 0], got {pos!r}"
            )
        relation, target = pos
        if relation not in RELATIONS:
            raise ValueError(f"{where}['position'][0] must be one of {RELATIONS}, got {relation!r}")
        if (
            not isinstance(target, numbers.Integral)
            or isinstance(target, bool)
            or not 0 <= target < include_index
        ):
            raise ValueError(
                f"{where}['position'][1] must index an earlier include clause (0..{include_index - 1}), "
                f"got {target!r}; point it at the clause of the reference object"
            )


def validate_spec(spec: Any) -> None:
    """Check a GenEval metadata dict (tag, include, exclude?); raise ValueError naming the bad field."""
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"spec must be a GenEval metadata mapping (tag, include, ...), got {type(spec).__name__}"
        )
    if not isinstance(spec.get("tag"), str) or not spec["tag"]:
        raise ValueError(f"spec['tag'] must be a task name such as 'counting', got {spec.get('tag')!r}")
    include = spec.get("include")
    if not isinstance(include, Sequence) or isinstance(include, str) or len(include) == 0:
        raise ValueError(
            f"spec['include'] must be a non-empty list of clauses {{'class', 'count', ...}}, got {include!r}"
        )
    for i, clause in enumerate(include):
        _check_clause(clause, f"spec['include'][{i}]", include_index=i)
    exclude = spec.get("exclude", [])
    if not isinstance(exclude, Sequence) or isinstance(exclude, str):
        raise ValueError(f"spec['exclude'] must be a list of {{'class', 'count'}} clauses, got {exclude!r}")
    for i, clause in enumerate(exclude):
        _check_clause(clause, f"spec['exclude'][{i}]", include_index=None)


# --------------------------------------------------------------------------------------
# Detections: validation and per-class grouping
# --------------------------------------------------------------------------------------


def _validated(d: Detection | Mapping[str, Any], index: int) -> Detection:
    """A Detection with a float score and a finite, well-ordered float box (ValueError otherwise)."""
    det = Detection.from_any(d)
    if not isinstance(det.label, str):
        raise ValueError(f"detections[{index}].label must be a class name string, got {det.label!r}")
    try:
        score = float(det.score)
        box = tuple(float(v) for v in det.box)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"detections[{index}] needs a numeric score and box, got {det.score!r}, {det.box!r}"
        ) from err
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise ValueError(
            f"detections[{index}].box must be 4 finite numbers (x1, y1, x2, y2), got {det.box!r}"
        )
    if box[2] < box[0] or box[3] < box[1]:
        raise ValueError(
            f"detections[{index}].box must have x2 >= x1 and y2 >= y1 (pixels, y down), got {box}"
        )
    return Detection(det.label, score, box, det.color, det.mask)  # type: ignore[arg-type]


def group_detections(
    detections: Sequence[Detection], threshold: float, max_objects: int
) -> dict[str, list[Detection]]:
    """GenEval's filtering: keep score > threshold (NaN never passes), sort by score descending
    (ties keep input order), at most `max_objects` per class, no NMS."""
    groups: dict[str, list[Detection]] = {}
    for det in detections:
        if det.score > threshold:  # strict, as GenEval; a NaN comparison is False
            groups.setdefault(det.label, []).append(det)
    return {k: sorted(v, key=lambda d: -d.score)[:max_objects] for k, v in groups.items()}


# --------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenEvalResult:
    """Verdict on one image.

    correct: GenEval's official verdict; strict: the same with exact counts (Flow-GRPO's
    `strict_correct`); partial: graded credit in [0, 1]; reason: why it failed ("" when correct).
    """

    correct: bool
    reason: str
    strict: bool
    partial: float


def _color_of(det: Detection) -> str | None:
    return det.color.lower() if isinstance(det.color, str) else None


def _judge(
    spec: Mapping[str, Any], groups: Mapping[str, list[Detection]], *, exact: bool
) -> tuple[bool, list[str]]:
    """GenEval's `evaluate` on grouped detections; `exact` demands == count instead of >= count."""
    ok, reasons = True, []
    matched: list[list[Detection] | None] = []  # per include clause: its objects if it passed, else None
    for clause in spec["include"]:
        name, count = clause["class"], clause["count"]
        found_all = groups.get(name, [])
        found = found_all[:count]  # GenEval checks colour and position on the top-count objects only
        passed = len(found_all) == count if exact else len(found) >= count
        if not passed:
            reasons.append(
                f"expected {name}{'==' if exact else '>='}{count}, found {len(found_all if exact else found)}"
            )
        if passed and "color" in clause:
            n_color = sum(_color_of(d) == clause["color"] for d in found)
            if n_color < count:
                passed = False
                tally = [_color_of(d) for d in found]
                seen = ", ".join(f"{tally.count(c)} {c}" for c in _COLORS if c in tally) or "no colour"
                reasons.append(
                    f"expected {clause['color']} {name}>={count}, "
                    f"found {n_color} {clause['color']}; and {seen}"
                )
        if passed and "position" in clause:
            relation, target = clause["position"]
            targets = matched[target]
            if targets is None:
                passed = False
                reasons.append(f"no target for {name} to be {relation}")
            else:
                for a in found:
                    bad = next((b for b in targets if relation not in relative_position(a.box, b.box)), None)
                    if bad is not None:  # GenEval stops at the first failing pair
                        passed = False
                        rels = " and ".join(sorted(relative_position(a.box, bad.box))) or "no relation"
                        reasons.append(f"expected {name} {relation} target, found {rels}")
                        break
        ok = ok and passed
        matched.append(found if passed else None)
    for clause in spec.get("exclude", []):
        name, count = clause["class"], clause["count"]
        if len(groups.get(name, [])) >= count:
            ok = False
            reasons.append(f"expected {name}<{count}, found {len(groups[name])}")
    return ok, reasons


def _partial(spec: Mapping[str, Any], groups: Mapping[str, list[Detection]]) -> float:
    """Flow-GRPO-style graded credit, the mean of per-clause terms, each in [0, 1].

    Per include clause: count term 1 - |count - found| / count (floored at 0); colour term = share
    of the `count` expected objects among the top-count found that have the colour; position term =
    share of the count x target_count expected pairs (top-count objects of both clauses) that hold
    the relation. Unlike Flow-GRPO, colour/position terms are not zeroed when the count is off
    (denser signal), and an exclude clause on a class no include names adds a 0/1 term (for
    included classes the count term already penalises extras, as in Flow-GRPO's counting reward).
    """
    terms: list[float] = []
    included = {c["class"] for c in spec["include"]}
    for clause in spec["include"]:
        count, found_all = clause["count"], groups.get(clause["class"], [])
        found = found_all[:count]
        terms.append(max(0.0, 1.0 - abs(count - len(found_all)) / count))
        if "color" in clause:
            terms.append(sum(_color_of(d) == clause["color"] for d in found) / count)
        if "position" in clause:
            relation, target = clause["position"]
            t_clause = spec["include"][target]
            targets = groups.get(t_clause["class"], [])[: t_clause["count"]]
            hits = sum(relation in relative_position(a.box, b.box) for a in found for b in targets)
            terms.append(hits / (count * t_clause["count"]))
    for clause in spec.get("exclude", []):
        if clause["class"] not in included:
            terms.append(float(len(groups.get(clause["class"], [])) < clause["count"]))
    return min(1.0, max(0.0, sum(terms) / len(terms)))


def evaluate(
    spec: Mapping[str, Any],
    detections: Sequence[Detection | Mapping[str, Any]],
    *,
    threshold: float = 0.3,
    counting_threshold: float = 0.9,
    max_objects: int = 16,
) -> GenEvalResult:
    """Score one image's detections against a GenEval metadata dict, by GenEval's official rules.

    Detections with score > threshold (> counting_threshold when spec["tag"] == "counting") are
    kept, sorted by score, at most `max_objects` per class. `strict` repeats the verdict with exact
    counts (== instead of >=; exclude clauses still apply); `partial` is described in `_partial`.
    Raises ValueError on a malformed spec or a detection with a non-finite or inverted box; NaN
    scores count as below threshold; no detections gives correct=False with a reason.
    """
    validate_spec(spec)
    if not _positive_int(max_objects):
        raise ValueError(f"max_objects must be a positive int, got {max_objects!r}")
    dets = [_validated(d, i) for i, d in enumerate(detections)]
    thr = counting_threshold if spec["tag"] == "counting" else threshold
    groups = group_detections(dets, thr, max_objects)
    correct, reasons = _judge(spec, groups, exact=False)
    strict, _ = _judge(spec, groups, exact=True)
    if not dets:
        reasons.insert(0, "no detections")
    elif not groups:
        reasons.insert(0, f"no detection scored above {thr}")
    return GenEvalResult(
        correct=correct, reason="; ".join(reasons), strict=strict, partial=_partial(spec, groups)
    )
