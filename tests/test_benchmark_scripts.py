"""Flow benchmark scripts: drift from a reference, the curve of snapshots, minutes to a target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unirl_lightning.data import OnPolicyDataModule
from unirl_lightning.models.flow import TinyFlowModel
from unirl_lightning.worlds.vocab import TASKS


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend("benchmarks")  # the scripts import their siblings by name
    import evaluate_flow
    import flow_rl_curves

    return evaluate_flow, flow_rl_curves


def _specs(n_per_task: int = 1) -> list[dict]:
    data = OnPolicyDataModule()
    data.setup("fit")
    return [s for t in TASKS for s in [v for v in data.val_specs if v["tag"] == t][:n_per_task]]


def _policy(seed: int) -> TinyFlowModel:
    torch.manual_seed(seed)
    return TinyFlowModel(num_layers=1, num_heads=2, head_dim=16).eval()


def test_evaluate_flow_drift_is_zero_against_itself_and_positive_against_another(scripts):
    evaluate_flow, _ = scripts
    policy, other, specs = _policy(0), _policy(1), _specs()
    same = evaluate_flow.evaluate_flow(policy, specs, samples=1, steps=3, reference=policy)
    assert same["velocity_mse"] == 0.0
    drift = evaluate_flow.evaluate_flow(policy, specs, samples=1, steps=3, reference=other)["velocity_mse"]
    # by hand: both velocities at every state of the same seeded ODE trajectories
    with torch.no_grad():
        rollout = policy.sample(
            [s["prompt"] for s in specs],
            num_steps=3,
            noise_level=0.0,
            generator=torch.Generator().manual_seed(0),
        )
        per_step = []
        for t in range(3):
            x, sigma = rollout.latents[:, t], rollout.sigmas[t].expand(len(specs))
            v = policy.velocity(x, sigma, policy.encode_text(rollout.prompts))
            v_ref = other.velocity(x, sigma, other.encode_text(rollout.prompts))
            per_step.append(float((v - v_ref).square().mean()))
    assert drift > 0 and drift == pytest.approx(sum(per_step) / 3, rel=1e-5)
    assert same["no_position"] == pytest.approx(sum(same[t] for t in TASKS if t != "position") / 5)


def test_curve_scores_each_snapshot_once_and_finds_the_minutes_to_a_target(scripts, tmp_path):
    _, curves = scripts
    specs = _specs()
    index = []
    for i, minutes in enumerate((2.1, 4.05)):
        _policy(i).save_pretrained(tmp_path / f"cpu-{minutes:06.2f}")
        index.append({"folder": f"cpu-{minutes:06.2f}", "cpu_minutes": minutes, "step": i, "rollouts": 4 * i})
    (tmp_path / "index.json").write_text(json.dumps(index))
    first = curves.run_curve(tmp_path, specs, samples=1)
    assert [m for m, _ in first] == [2.1, 4.05] and all(0 <= v <= 1 for _, v in first)
    assert (tmp_path / "cpu-002.10" / "geneval-1.json").is_file()
    (tmp_path / "cpu-002.10" / "geneval-1.json").write_text(json.dumps({"overall": 0.5}))
    assert curves.run_curve(tmp_path, specs, samples=1)[0] == (2.1, 0.5)  # cached, not rescored
    assert curves.at_marks([(2.1, 0.5), (4.05, 0.6), (19.8, 0.7)], 2.0) == {1: 0.5, 2: 0.6, 10: 0.7}
    points = [(0.0, 0.5), (2.0, 0.6), (4.0, 0.8)]
    assert curves.minutes_to_reach(points, 0.7) == pytest.approx(3.0)
    assert curves.minutes_to_reach(points, 0.5) == 0.0 and curves.minutes_to_reach(points, 0.9) is None
    with pytest.raises(FileNotFoundError, match="PolicySnapshots"):
        curves.run_curve(tmp_path / "nowhere", specs, samples=1)


def test_geneval_agreement_reads_official_records_and_scores_them_again(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend("benchmarks")
    import geneval_agreement as ga
    from PIL import Image

    from unirl_lightning.evaluation import Detection

    specs = [
        {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
        {"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": "a photo of two cats"},
        {"tag": "counting", "include": [{"class": "cat", "count": 3}], "prompt": "a photo of three cats"},
    ]
    lines = []
    for i, (spec, official) in enumerate(zip(specs, (True, True, True))):
        Image.new("RGB", (16, 16)).save(tmp_path / f"{i}.png")
        record = {
            "filename": f"{i}.png",
            "tag": spec["tag"],
            "correct": official,
            "metadata": json.dumps(spec),
        }
        lines.append(json.dumps(record))
    (tmp_path / "results.jsonl").write_text("\n".join(lines))

    def detector(images, classes=None):  # one dog and two cats in every image
        assert images.dtype == torch.uint8 and images.shape == (1, 3, 16, 16)
        return [[Detection("dog", 0.95, (0, 0, 4, 4))] + [Detection("cat", 0.95, (8, 8, 12, 12))] * 2]

    rows = ga.read_results(tmp_path / "results.jsonl")
    assert rows[1]["metadata"]["include"][0]["count"] == 2 and Path(rows[0]["filename"]).is_file()
    ours = ga.our_verdicts(rows, detector)
    assert ours == [True, True, False]
    table = {r["task"]: r for r in ga.agreement_table(rows, ours)}
    assert table["counting"]["images"] == 2 and table["counting"]["agreement"] == 0.5
    assert table["overall"]["official"] == 1.0 and table["overall"]["ours"] == pytest.approx(2 / 3)
    assert ga.cohen_kappa([True, False, True, False], [True, False, True, False]) == 1.0
    assert ga.cohen_kappa([True, False], [False, True]) == -1.0
    (tmp_path / "bad.jsonl").write_text(json.dumps({"filename": "0.png"}))
    with pytest.raises(ValueError, match=r"bad.jsonl:1: record lacks"):
        ga.read_results(tmp_path / "bad.jsonl")


def test_evaluate_unigrpo_scores_text_and_images_per_riddle_with_standard_errors(monkeypatch):
    monkeypatch.syspath_prepend("benchmarks")
    import evaluate_unigrpo
    from unirl_lightning.data.reasoning import WARM_START_HELD_OUT, generate_reasoning_specs
    from unirl_lightning.models.text.policies import TextRollout

    mean, se = evaluate_unigrpo.mean_se(torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]]))
    assert mean == pytest.approx(0.5) and se == pytest.approx(0.5 / 3**0.5)

    specs = generate_reasoning_specs(4, 0)
    answers = {s["reasoning_prompt"]: s["prompt"] for s in specs}

    class Oracle:  # writes the exact prompt greedily; sampled, only for the first riddle
        def generate(self, riddles, temperature=1.0, generator=None):
            first = specs[0]["reasoning_prompt"]
            texts = [answers[r] if temperature == 0 or r == first else "a photo of" for r in riddles]
            return TextRollout(texts, torch.zeros(len(riddles), 1), torch.zeros(len(riddles), 1),
                               torch.ones(len(riddles), 1, dtype=torch.bool))

    res = evaluate_unigrpo.evaluate_unigrpo(_policy(0), Oracle(), specs, samples=2, text_samples=3, steps=3)
    assert res["text_greedy"] == 1.0 and res["text_greedy_se"] == 0.0
    assert res["text_sampled"] == pytest.approx(0.25)  # 1 riddle of 4, every sample
    assert [s["riddle"] in WARM_START_HELD_OUT for s in specs] == [False, False, False, True]
    assert res["text_greedy_held_out"] == 1.0 and res["text_sampled_held_out"] == 0.0  # the 4th riddle only
    assert all(0.0 <= res[c] <= 1.0 for c in evaluate_unigrpo.COLUMNS)
    a, b = torch.tensor([1.0, 0.5, 0.0]), torch.tensor([0.5, 0.5, 0.5])
    diff, diff_se = evaluate_unigrpo.paired_difference(a, b)
    assert diff == pytest.approx(0.0) and diff_se == pytest.approx(0.5 / 3**0.5)


@pytest.mark.parametrize("order", ["autoregressive", "masked"])
def test_unified_binding_probe_finds_no_gap_in_a_model_blind_to_words(monkeypatch, order):
    """Word embeddings all alike: the model cannot tell a prompt from its swapped twin, so the
    losses agree exactly (in masked order only if both prompts are scored under the same masks);
    a model that reads words (random embeddings) gives the two prompts different losses."""
    from unirl_lightning.models import TinyUnifiedModel

    monkeypatch.syspath_prepend("benchmarks")
    import unified_binding_probe

    data = OnPolicyDataModule()
    data.setup("fit")
    splits = {"train": data.train_specs[:200], "held-out": data.val_specs}
    torch.manual_seed(0)
    policy = TinyUnifiedModel(d_model=32, n_layers=1, n_heads=2, image_order=order, mask_steps=2).eval()
    reads = unified_binding_probe.probe(policy, splits, n=4)
    words = slice(policy.word_offset, policy.image_offset)
    with torch.no_grad():
        policy.tok_emb.weight[words] = policy.tok_emb.weight[words].mean(0)
    blind = unified_binding_probe.probe(policy, splits, n=4)
    tasks, measures = ("position", "color_attr"), ("loss", "pass")
    assert list(blind) == [f"{t} {s} {m}" for t in tasks for s in splits for m in measures]
    for key in blind:
        if key.endswith("loss"):
            true, swapped = blind[key].split(" / ")
            assert true == swapped, key
    assert any(r.split(" / ")[0] != r.split(" / ")[1] for k, r in reads.items() if k.endswith("loss"))
