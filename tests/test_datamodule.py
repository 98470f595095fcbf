import torch

from unirl_lightning.data import OnPolicyDataModule, PromptGroupStream


def _take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_stream_is_deterministic_per_seed_and_rank():
    specs = [
        {"tag": "single_object", "include": [{"class": "cross", "count": 1}], "prompt": f"p{i}"}
        for i in range(50)
    ]
    a = _take(PromptGroupStream(specs, 4, 3, seed=0, rank=0, world_size=2), 3)
    b = _take(PromptGroupStream(specs, 4, 3, seed=0, rank=0, world_size=2), 3)
    c = _take(PromptGroupStream(specs, 4, 3, seed=0, rank=1, world_size=2), 3)
    d = _take(PromptGroupStream(specs, 4, 3, seed=1, rank=0, world_size=2), 3)
    assert [x.prompts for x in a] == [x.prompts for x in b]
    assert [x.prompts for x in a] != [x.prompts for x in c]
    assert [x.prompts for x in a] != [x.prompts for x in d]
    # groups are whole (G consecutive copies) and group ids are unique across ranks and steps
    for x in a:
        assert len(x) == 12 and all(len(set(x.prompts[i : i + 3])) == 1 for i in range(0, 12, 3))
    ids_a = torch.cat([x.group_ids for x in a]).unique()
    ids_c = torch.cat([x.group_ids for x in c]).unique()
    assert len(set(ids_a.tolist()) & set(ids_c.tolist())) == 0 and len(ids_a) == 12


def test_train_and_val_prompts_disjoint_and_every_task_present():
    dm = OnPolicyDataModule(num_train=300, num_val=60, seed=3)
    dm.setup("fit")
    train = {s["prompt"] for s in dm.train_specs}
    val = {s["prompt"] for s in dm.val_specs}
    assert not train & val
    assert {s["tag"] for s in dm.train_specs} == {s["tag"] for s in dm.val_specs}
    assert len({s["tag"] for s in dm.val_specs}) == 6


def test_bad_paths_fail_before_compute(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="train_prompts"):
        OnPolicyDataModule(train_prompts=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="group_size"):
        OnPolicyDataModule(group_size=0)


def test_prompt_files_with_coco_classes_load(tmp_path):
    from unirl_lightning.data import load_official_specs, save_specs

    specs = load_official_specs()
    save_specs(specs[:400], tmp_path / "train.jsonl")
    save_specs(specs[400:], tmp_path / "val.jsonl")
    for vocab in (None, "geneval"):
        dm = OnPolicyDataModule(
            train_prompts=str(tmp_path / "train.jsonl"),
            val_prompts=str(tmp_path / "val.jsonl"),
            vocabulary=vocab,
        )
        dm.setup("fit")
        assert len(dm.train_specs) == 400 and len(dm.val_specs) == 153
    import pytest

    with pytest.raises(ValueError, match="vocabulary"):
        OnPolicyDataModule(
            train_prompts=str(tmp_path / "train.jsonl"),
            val_prompts=str(tmp_path / "val.jsonl"),
            vocabulary="shapes",
        ).setup("fit")


def test_train_task_weights_reshape_training_prompts_only():
    plain = OnPolicyDataModule(num_train=600, num_val=60, seed=3)
    plain.setup("fit")
    dm = OnPolicyDataModule(
        num_train=600, num_val=60, seed=3, train_task_weights={"position": 3.0, "color_attr": 1.0}
    )
    dm.setup("fit")
    assert [s["prompt"] for s in dm.val_specs] == [s["prompt"] for s in plain.val_specs]
    tags = [s["tag"] for s in dm.train_specs]
    assert set(tags) == {"position", "color_attr"} and len(tags) == len(plain.train_specs)
    assert tags.count("position") == 3 * tags.count("color_attr")
    train_prompts = {s["prompt"] for s in plain.train_specs}
    assert all(s["prompt"] in train_prompts for s in dm.train_specs)


def test_bad_train_task_weights_fail_at_construction():
    import pytest

    with pytest.raises(ValueError, match="train_task_weights: unknown task.*'posiiton'"):
        OnPolicyDataModule(train_task_weights={"posiiton": 1.0})
    with pytest.raises(ValueError, match="at least one > 0"):
        OnPolicyDataModule(train_task_weights={"position": 0.0})


def test_stream_started_at_k_continues_the_stream_where_k_batches_were_used():
    specs = [{"tag": "single_object", "include": [{"class": "cross", "count": 1}], "prompt": f"p{i}"}
             for i in range(50)]
    whole = _take(PromptGroupStream(specs, 4, 3, seed=0, rank=1, world_size=2), 5)
    tail = _take(PromptGroupStream(specs, 4, 3, seed=0, rank=1, world_size=2, start=3), 2)
    assert [x.prompts for x in tail] == [x.prompts for x in whole[3:]]
    assert all(torch.equal(a.group_ids, b.group_ids) for a, b in zip(tail, whole[3:]))


def test_datamodule_state_is_the_streams_position():
    dm = OnPolicyDataModule(num_train=40, num_val=8, prompts_per_step=2, group_size=2)
    dm.setup("fit")
    first = _take(dm.train_dataloader(), 4)
    resumed = OnPolicyDataModule(num_train=40, num_val=8, prompts_per_step=2, group_size=2)
    resumed.load_state_dict({"batches_used": 3})
    resumed.setup("fit")
    assert resumed.state_dict() == {"batches_used": 3}
    assert _take(resumed.train_dataloader(), 1)[0].prompts == first[3].prompts


def test_a_prompt_file_with_a_bad_line_fails_at_setup_naming_file_line_and_field(tmp_path):
    """A run's prompt file with a malformed spec stops the run at setup, before any rollout."""
    import json

    import pytest

    from unirl_lightning.data import generate_specs
    from unirl_lightning.data.specs import SpecError

    good = generate_specs(4, ["circle", "square"], seed=0)
    lines = [json.dumps(s) for s in good[:2]] + ['{"tag": "counting", "include": [{"class": "circle"}]}']
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "val.jsonl").write_text("\n".join(json.dumps(s) for s in good[2:]) + "\n")
    dm = OnPolicyDataModule(
        train_prompts=str(tmp_path / "train.jsonl"), val_prompts=str(tmp_path / "val.jsonl")
    )
    with pytest.raises(SpecError, match=r"train\.jsonl:3: .*include\[0\] is missing \"count\""):
        dm.setup("fit")


def test_flow_scenes_curriculum_draws_first_tasks_then_the_mixture():
    import pytest

    from unirl_lightning.data import FlowSceneDataModule

    data = FlowSceneDataModule(
        batch_size=16, num_train=120, num_val=12, first_steps=3, first_task_weights={"position": 1.0}
    )
    data.setup("fit")
    stream = iter(data.train_dataloader())
    first = [next(stream) for _ in range(3)]
    assert all(s["tag"] == "position" for b in first for s in b["specs"])
    later = {s["tag"] for _ in range(6) for s in next(stream)["specs"]}
    assert len(later) >= 4  # the whole mixture once the first phase is over
    # the images are those of their specs (rendered per batch, as in the mixture)
    assert first[0]["images"].shape == (16, 3, 32, 32)
    with pytest.raises(ValueError, match="first_steps and data.first_task_weights"):
        FlowSceneDataModule(first_steps=5)
    with pytest.raises(ValueError, match="unknown task"):
        FlowSceneDataModule(first_steps=5, first_task_weights={"posture": 1.0})


def test_flow_scenes_phases_draw_each_phase_in_order_then_the_mixture():
    import pytest

    from unirl_lightning.data import FlowSceneDataModule

    phases = [{"steps": 2, "task_weights": {"position": 1.0}},
              {"steps": 3, "task_weights": {"colors": 1.0, "color_attr": 1.0}}]
    data = FlowSceneDataModule(batch_size=16, num_train=120, num_val=12, phases=phases)
    data.setup("fit")
    stream = iter(data.train_dataloader())
    tags = [{s["tag"] for s in next(stream)["specs"]} for _ in range(5)]
    assert tags[:2] == [{"position"}] * 2
    colour = {"colors", "color_attr"}
    assert all(t <= colour for t in tags[2:]) and set().union(*tags[2:]) == colour
    later = {s["tag"] for _ in range(6) for s in next(stream)["specs"]}
    assert len(later) >= 4
    with pytest.raises(ValueError, match=r"data.phases\[1\]"):
        FlowSceneDataModule(phases=[phases[0], {"steps": 0, "task_weights": {"colors": 1.0}}])
    with pytest.raises(ValueError, match=r"data.phases\[0\].task_weights"):
        FlowSceneDataModule(phases=[{"steps": 2, "task_weights": {"colour": 1.0}}])
    with pytest.raises(ValueError, match="not both"):
        FlowSceneDataModule(phases=phases, first_steps=2, first_task_weights={"position": 1.0})
