"""The synthetic world: renders satisfy specs, the tokenizer round-trips, the detector is exact and robust."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from unirl_lightning.evaluation.detection import Detector
from unirl_lightning.evaluation.geneval import evaluate, relative_position
from unirl_lightning.worlds import (
    PatchTokenizer, WorldConfig, WorldDetector, render, render_batch, shape_mask,
)
from unirl_lightning.worlds.vocab import COLORS, POSITIONS, SHAPES, TASKS

N_SPECS = 30


def make_spec(task: str, rng: random.Random) -> dict:
    """A GenEval-style metadata dict for `task` over the world's vocabulary."""
    a, b = rng.sample(SHAPES, 2)
    c1, c2 = rng.sample(COLORS, 2)
    if task == "single_object":
        return {"tag": task, "include": [{"class": a, "count": 1}], "prompt": f"a photo of a {a}"}
    if task == "two_object":
        return {"tag": task, "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
                "prompt": f"a photo of a {a} and a {b}"}
    if task == "counting":
        n = rng.randint(2, 4)
        return {"tag": task, "include": [{"class": a, "count": n}], "exclude": [{"class": a, "count": n + 1}],
                "prompt": f"a photo of {n} {a}s"}
    if task == "colors":
        return {"tag": task, "include": [{"class": a, "count": 1, "color": c1}],
                "prompt": f"a photo of a {c1} {a}"}
    if task == "position":
        rel = rng.choice(POSITIONS)
        return {"tag": task,
                "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
                "prompt": f"a photo of a {a} {rel} a {b}"}
    if task == "color_attr":
        return {"tag": task,
                "include": [{"class": a, "count": 1, "color": c1}, {"class": b, "count": 1, "color": c2}],
                "prompt": f"a photo of a {c1} {a} and a {c2} {b}"}
    raise ValueError(task)


def specs_for(task: str, n: int = N_SPECS, seed: int = 0) -> list[dict]:
    rng = random.Random(f"{task}-{seed}")
    return [make_spec(task, rng) for _ in range(n)]


def correct_rate(images: torch.Tensor, specs: list[dict], detector: WorldDetector) -> float:
    dets = detector(images)
    return sum(evaluate(s, d).correct for s, d in zip(specs, dets)) / len(specs)


@pytest.fixture(scope="module")
def detector() -> WorldDetector:
    return WorldDetector()


@pytest.fixture(scope="module")
def tokenizer() -> PatchTokenizer:
    return PatchTokenizer()


# ---- shapes ---------------------------------------------------------------------------


def test_shapes_are_distinct_and_symmetric():
    masks = torch.stack([shape_mask(s, 8) for s in SHAPES]).flatten(1).float()
    inter = masks @ masks.T
    area = masks.sum(1)
    iou = inter / (area[:, None] + area[None] - inter)
    off_diag = iou[~torch.eye(len(SHAPES), dtype=torch.bool)]
    assert off_diag.max() < 0.85  # no shape is confusable with another at the world's size
    for s in ("square", "circle", "cross", "triangle"):
        m = shape_mask(s, 8)
        assert torch.equal(m, m.flip(1))  # left-right symmetric: box centre = visual centre horizontally
        assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any()  # fills its box
    assert shape_mask("triangle", 8)[0].sum() < shape_mask("triangle", 8)[-1].sum()  # points up
    assert shape_mask("circle", (6, 10)).shape == (6, 10)
    with pytest.raises(ValueError, match="unknown shape"):
        shape_mask("hexagon", 8)


# ---- render -> detect -> GenEval ------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_rendered_scenes_pass_geneval(task, detector):
    specs = specs_for(task)
    images, truth = render_batch(specs, list(range(len(specs))))
    assert images.dtype == torch.uint8 and images.shape == (len(specs), 3, 32, 32)
    dets = detector(images)
    assert sum(evaluate(s, d).correct for s, d in zip(specs, dets)) / len(specs) >= 0.99
    assert all(evaluate(s, t).correct for s, t in zip(specs, truth))  # the renderer's own boxes pass too
    for d_img, t_img in zip(dets, truth):
        key = lambda d: (d.box, d.label, d.color)  # noqa: E731
        assert sorted(map(key, d_img)) == sorted(map(key, t_img))
        assert all(d.score == 1.0 for d in d_img)


def test_render_geometry_and_determinism():
    cfg = WorldConfig()
    spec = {"tag": "counting", "include": [{"class": "cross", "count": 4}],
            "exclude": [{"class": "cross", "count": 5}]}
    for seed in range(20):
        image, dets = render(spec, seed, cfg)
        assert len(dets) == 4
        for i, d in enumerate(dets):
            x1, y1, x2, y2 = d.box
            assert 0 <= x1 < x2 <= cfg.canvas and 0 <= y1 < y2 <= cfg.canvas
            assert x1 % cfg.grid == 0 and y1 % cfg.grid == 0
            gap = cfg.gap * cfg.grid
            for e in dets[i + 1 :]:  # at least one free grid cell between any two objects
                ex1, ey1, ex2, ey2 = e.box
                assert x2 + gap <= ex1 or ex2 + gap <= x1 or y2 + gap <= ey1 or ey2 + gap <= y1
    a, _ = render(spec, 7)
    b, _ = render(spec, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    batch, _ = render_batch([spec, spec], [7, 8])
    assert torch.equal(batch[0], a) and not torch.equal(batch[1], a)


def test_position_is_honoured_for_a_later_target():
    spec = {"tag": "position", "include": [{"class": "circle", "count": 1, "position": ["above", 1]},
                                           {"class": "square", "count": 1}]}
    for seed in range(10):
        _, (c, s) = render(spec, seed)
        assert "above" in relative_position(c.box, s.box)


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"tag": "x", "include": [{"class": "dog", "count": 1}]}, r"class.*'dog'.*allowed"),
        ({"tag": "x", "include": [{"class": "square", "count": 1, "color": "teal"}]},
         r"color.*'teal'.*allowed"),
        ({"tag": "x", "include": [{"class": "square", "count": 5}]}, r"5 objects.*max_objects=4"),
        ({"tag": "x", "include": [{"class": "square", "count": 0}]}, r"count"),
        ({"tag": "x", "include": [{"class": "square", "count": 1, "position": ["near", 0]}]}, r"position"),
        ({"tag": "x", "include": [{"class": "square", "count": 2}],
          "exclude": [{"class": "square", "count": 2}]},
         r"exclude\[0\].*contradicts"),
        ({"tag": "x", "include": []}, r"include"),
    ],
)
def test_render_rejects_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        render(spec, 0)


def test_world_config_validation_and_capacity():
    with pytest.raises(ValueError, match="sizes"):
        WorldConfig(sizes=(6,))
    with pytest.raises(ValueError, match="multiple of grid"):
        WorldConfig(canvas=30)
    cfg = WorldConfig(canvas=16, max_objects=8)
    assert cfg.capacity == 1
    with pytest.raises(ValueError, match="capacity=1"):
        render({"tag": "x", "include": [{"class": "square", "count": 2}]}, 0, cfg)
    # An impossible chain of relations is reported after the bounded tries rather than looping forever.
    small = WorldConfig(canvas=16, gap=0, max_tries=5)
    chain = {"tag": "x", "include": [{"class": "square", "count": 1},
                                     {"class": "circle", "count": 1, "position": ["left of", 0]},
                                     {"class": "cross", "count": 1, "position": ["left of", 1]}]}
    with pytest.raises(ValueError, match="could not place.*5 tries"):
        render(chain, 0, small)


# ---- tokenizer ------------------------------------------------------------------------


def test_tokenizer_round_trip_is_exact(tokenizer):
    assert tokenizer.tokens_per_image == 64 and tokenizer.grid_hw == (8, 8)
    assert tokenizer.codebook_size == 131  # background + 10 colours x 13 distinct shape quarters
    assert tokenizer.codes.shape == (131, 48) and tokenizer.codes.dtype == torch.float32
    assert torch.equal(PatchTokenizer().codes, tokenizer.codes)  # deterministic
    specs = [s for t in TASKS for s in specs_for(t, 10, seed=1)]
    images, _ = render_batch(specs, 3)
    tokens = tokenizer.encode(images)
    assert tokens.shape == (len(specs), 64) and tokens.dtype == torch.long
    assert torch.equal(tokenizer.decode(tokens), images)
    # Nearest-code snapping undoes mild corruption.
    noisy = (images.float() + 8 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(tokenizer.decode(tokenizer.encode(noisy.clamp(0, 255).to(torch.uint8))), images)


def test_tokenizer_bad_inputs(tokenizer):
    with pytest.raises(ValueError, match=r"uint8 \[N, 3, 32, 32\]"):
        tokenizer.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"uint8 \[N, 3, 32, 32\]"):
        tokenizer.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[N, 64\]"):
        tokenizer.decode(torch.zeros(1, 63, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 131\)"):
        tokenizer.decode(torch.full((1, 64), 131))


# ---- detector robustness --------------------------------------------------------------


def test_detector_is_a_detector_and_rejects_bad_input(detector):
    assert isinstance(detector, Detector)
    for bad in (torch.zeros(1, 3, 32, 32), torch.zeros(3, 32, 32, dtype=torch.uint8),
                torch.zeros(1, 4, 32, 32, dtype=torch.uint8), [[0]]):
        with pytest.raises(ValueError, match=r"uint8 tensor \[N, 3, H, W\]"):
            detector(bad)
    background = torch.full((2, 3, 32, 32), 153, dtype=torch.uint8)
    assert detector(background) == [[], []]
    assert detector(torch.zeros(0, 3, 32, 32, dtype=torch.uint8)) == []


def test_uniform_noise_is_almost_never_correct(detector):
    gen = torch.Generator().manual_seed(0)
    for task in TASKS:
        specs = specs_for(task)
        noise = torch.randint(0, 256, (len(specs), 3, 32, 32), dtype=torch.uint8, generator=gen)
        assert correct_rate(noise, specs, detector) <= 0.05


def test_blur_and_noise_lower_scores_without_crashing(detector):
    specs = [s for t in TASKS for s in specs_for(t, 10, seed=2)]
    images, _ = render_batch(specs, 5)
    blurred = F.avg_pool2d(images.float(), 3, 1, 1, count_include_pad=False).round().to(torch.uint8)
    noisy = (images.float() + 40 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0)))
    noisy = noisy.clamp(0, 255).to(torch.uint8)
    for corrupted in (blurred, noisy):
        scores = [d.score for img in detector(corrupted) for d in img]
        assert all(0.0 <= s <= 1.0 for s in scores)
        assert sum(scores) / max(len(scores), 1) < 0.8  # clean renders score exactly 1.0
    assert correct_rate(noisy, specs, detector) < correct_rate(images, specs, detector)


def test_merged_same_colour_objects_score_low(detector):
    image = torch.full((1, 3, 32, 32), 153, dtype=torch.uint8)
    red = torch.tensor([220, 20, 20], dtype=torch.uint8).view(3, 1, 1)
    image[0, :, 8:16, 4:20] = red  # two touching 8 px squares: one 8x16 blob
    (det,) = detector(image)[0]
    assert det.label == "square" and det.color == "red" and det.score < 0.3
    assert det.box == (4.0, 8.0, 20.0, 16.0) and det.mask.sum() == 128


def test_flooded_canvas_and_specks_are_not_objects(detector):
    flooded = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    flooded[:] = torch.tensor([30, 60, 230], dtype=torch.uint8).view(3, 1, 1)
    specks = torch.full((1, 3, 32, 32), 153, dtype=torch.uint8)
    specks[0, :, 4:6, 4:6] = 10  # a 2x2 black speck
    assert detector(flooded) == [[]] and detector(specks) == [[]]


def test_detector_classes_filter(detector):
    spec = {"tag": "two_object", "include": [{"class": "circle", "count": 1}, {"class": "cross", "count": 1}]}
    image, _ = render(spec, 0)
    dets = detector(image[None], classes=["circle"])[0]
    assert [d.label for d in dets] == ["circle"]
