"""GenEvalScore and ImbalanceScore: aggregation by hand, DDP reduction on CPU, plotting."""

from __future__ import annotations

import os
import random
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unirl_lightning.evaluation import GenEvalScore, ImbalanceScore
from unirl_lightning.worlds.vocab import TASKS


def _data(seed: int, n: int = 200, tasks: tuple[str, ...] = TASKS, max_prompts: int = 40):
    rng = random.Random(seed)
    names = [rng.choice(tasks) for _ in range(n)]
    gen = torch.tensor([rng.random() < 0.6 for _ in range(n)])
    und = torch.tensor([rng.random() < 0.7 for _ in range(n)])
    pids = torch.tensor([rng.randrange(max_prompts) for _ in range(n)])
    return names, gen, und, pids


def _by_hand(names, gen, und, pids):
    """Plain-Python versions of the documented definitions."""
    acc, imb = {}, {}
    for t in sorted(set(names)):
        idx = [i for i, x in enumerate(names) if x == t]
        acc[t] = sum(bool(gen[i]) for i in idx) / len(idx)
        gen_ok = [i for i in idx if gen[i]]
        imb[t] = sum(not und[i] for i in gen_ok) / len(gen_ok) if gen_ok else 0.0
    per_prompt: dict[int, list[bool]] = {}
    for p, g in zip(pids.tolist(), gen.tolist()):
        per_prompt.setdefault(p, []).append(g)
    prompt_rate = sum(all(v) for v in per_prompt.values()) / len(per_prompt)
    gen_ok = [i for i in range(len(names)) if gen[i]]
    overall_imb = sum(not und[i] for i in gen_ok) / len(gen_ok)
    return acc, sum(acc.values()) / len(acc), prompt_rate, imb, overall_imb


def test_aggregation_matches_hand_computation():
    names, gen, und, pids = _data(0)
    acc, overall, prompt_rate, imb, overall_imb = _by_hand(names, gen, und, pids)
    m, b = GenEvalScore(max_prompts=40), ImbalanceScore()
    for s in range(0, len(names), 37):  # uneven batches
        m.update(names[s : s + 37], gen[s : s + 37], pids[s : s + 37])
        b.update(names[s : s + 37], gen[s : s + 37], und[s : s + 37])
    out, imb_out = m.compute(), b.compute()
    for t in TASKS:
        assert out[f"geneval/{t}"].item() == pytest.approx(acc[t])
        assert imb_out[f"imbalance/{t}"].item() == pytest.approx(imb[t])
    assert out["geneval/overall"].item() == pytest.approx(overall)
    assert out["geneval/prompt_correct_rate"].item() == pytest.approx(prompt_rate)
    assert imb_out["imbalance/overall"].item() == pytest.approx(overall_imb)
    table = b.confusion()
    assert sum(int(t.sum()) for t in table.values()) == len(names)
    assert int(table["counting"][1, 0]) == sum(
        1 for n, g, u in zip(names, gen, und) if n == "counting" and g and not u
    )


def test_unseen_tasks_and_empty_cases_are_nan_free():
    m, b = GenEvalScore(), ImbalanceScore()
    m.update(["counting", "counting"], torch.tensor([True, False]))
    b.update(["position"], torch.tensor([False]), torch.tensor([False]))  # no generation-correct image
    out, imb = m.compute(), b.compute()
    assert set(out) == {"geneval/counting", "geneval/overall"}  # no prompt ids given, no prompt rate
    assert out["geneval/overall"].item() == 0.5
    assert imb == {"imbalance/position": torch.tensor(0.0), "imbalance/overall": torch.tensor(0.0)}
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert GenEvalScore().compute()["geneval/overall"].item() == 0.0


def test_bad_updates():
    m = GenEvalScore(max_prompts=4)
    with pytest.raises(ValueError, match="unknown task"):
        m.update(["painting"], torch.tensor([True]))
    with pytest.raises(ValueError, match="entries"):
        m.update(["counting"], torch.tensor([True, False]))
    with pytest.raises(ValueError, match="max_prompts"):
        m.update(["counting"], torch.tensor([True]), torch.tensor([4]))


def test_plot_works_or_says_what_is_missing():
    m = GenEvalScore()
    m.update(["counting", "colors"], torch.tensor([True, False]))
    m.update(["counting"], torch.tensor([False]))  # counting 1 of 2: a rate, not a count
    try:
        import matplotlib
    except ImportError:
        with pytest.raises(ModuleNotFoundError, match="pip install matplotlib"):
            m.plot()
    else:
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = m.plot()
        assert fig is not None and ax.figure is fig
        # one labelled point per score: its label names the task, its height is the task's score
        scores = {k: float(v) for k, v in m.compute().items()}
        assert scores == {"geneval/counting": 0.5, "geneval/colors": 0.0, "geneval/overall": 0.25}
        points = {line.get_label(): tuple(line.get_xydata()[0]) for line in ax.get_lines()}
        assert set(points) == set(scores)
        assert {k: y for k, (_, y) in points.items()} == scores
        assert len({x for x, _ in points.values()}) == len(scores)  # side by side, not on top of each other
        assert [t.get_text() for t in ax.get_legend().get_texts()] == list(points)
        assert ax.get_ylabel() == "GenEvalScore"
        low, high = ax.get_ylim()  # the metric's bounds, 0 and 1, are both in view
        assert low <= 0.0 and high >= 1.0
        plt.close(fig)


# ---- DDP on CPU ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        names, gen, und, pids = _data(1)
        # uneven shards; rank 1 never sees "counting" locally if we drop it there
        mine = [
            i for i in range(len(names)) if i % world == rank and not (rank == 1 and names[i] == "counting")
        ]
        m, b = GenEvalScore(max_prompts=40), ImbalanceScore()
        m.update([names[i] for i in mine], gen[mine], pids[mine])
        b.update([names[i] for i in mine], gen[mine], und[mine])
        torch.save(
            {"geneval": m.compute(), "imbalance": b.compute(), "confusion": b.confusion()},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_ddp_reduction_equals_single_process(tmp_path):
    world = 2
    # spawn, not fork: forking a process whose torch thread pools already ran (the full suite)
    # deadlocks the children
    method = "spawn"
    mp.start_processes(
        _ddp_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, start_method=method
    )
    names, gen, und, pids = _data(1)
    keep = [i for i in range(len(names)) if not (i % world == 1 and names[i] == "counting")]
    m, b = GenEvalScore(max_prompts=40), ImbalanceScore()
    m.update([names[i] for i in keep], gen[keep], pids[keep])
    b.update([names[i] for i in keep], gen[keep], und[keep])
    want = {"geneval": m.compute(), "imbalance": b.compute(), "confusion": b.confusion()}
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for key in want:
            assert got[key].keys() == want[key].keys()
            for k in want[key]:
                torch.testing.assert_close(got[key][k], want[key][k])


@pytest.mark.parametrize("metric", [GenEvalScore(), ImbalanceScore()], ids=["geneval", "imbalance"])
def test_states_reset_under_inference_mode_still_update_in_training(metric):
    """Validation resets metrics under inference mode; `trainer.validate()` then `fit` must still count."""
    gen, und = torch.tensor([True, False]), torch.tensor([False, False])
    flags = [gen] if isinstance(metric, GenEvalScore) else [gen, und]
    with torch.inference_mode():
        metric.update(["single_object", "counting"], *flags)
        metric.compute()
        metric.reset()
    metric.update(["single_object", "counting"], *flags)
    metric.update(["single_object", "counting"], *flags)
    out = metric.compute()
    if isinstance(metric, GenEvalScore):
        assert out["geneval/single_object"] == 1.0 and out["geneval/counting"] == 0.0
    else:
        assert out["imbalance/single_object"] == 1.0  # gen right, und wrong
