"""Checkpoint round trips (path and BytesIO), refusal of damaged files, crash-safe saving."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from scratchlm.train import AdamW, CheckpointError, load_checkpoint, save_checkpoint


def _tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def _trained(seed: int):
    model = _tiny_model(seed)
    optimizer = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).square().mean().backward()
        optimizer.step()
    return model, optimizer


def _assert_same_state(a_model, a_opt, b_model, b_opt):
    for (name, x), (_, y) in zip(a_model.state_dict().items(), b_model.state_dict().items()):
        assert torch.equal(x, y), name
    a_state, b_state = a_opt.state_dict(), b_opt.state_dict()
    assert a_state["param_groups"] == b_state["param_groups"]
    for key, entry in a_state["state"].items():
        assert entry["step"] == b_state["state"][key]["step"]
        assert torch.equal(entry["exp_avg"], b_state["state"][key]["exp_avg"])
        assert torch.equal(entry["exp_avg_sq"], b_state["state"][key]["exp_avg_sq"])


def _draw_all(sampler):
    return (torch.rand(3), random.random(), np.random.rand(), torch.randint(0, 10**6, (4,), generator=sampler))


@pytest.mark.parametrize("target", ["path", "bytesio"])
def test_round_trip_restores_model_optimizer_iteration_and_rng(tmp_path, target):
    model, optimizer = _trained(0)
    sampler = torch.Generator().manual_seed(7)
    torch.randint(0, 10, (3,), generator=sampler)  # move it off its seed
    out = tmp_path / "ckpt.pt" if target == "path" else io.BytesIO()
    save_checkpoint(model, optimizer, 42, out, model_config={"d_model": 8}, generators={"sampler": sampler})
    expected_draws = _draw_all(sampler)

    fresh_model, _ = _trained(1)
    fresh_optimizer = AdamW(fresh_model.parameters(), lr=5.0)
    fresh_sampler = torch.Generator().manual_seed(0)
    _draw_all(fresh_sampler)  # scramble every RNG
    if target == "bytesio":
        out.seek(0)
    iteration = load_checkpoint(out, fresh_model, fresh_optimizer, generators={"sampler": fresh_sampler})

    assert iteration == 42
    _assert_same_state(model, optimizer, fresh_model, fresh_optimizer)
    draws = _draw_all(fresh_sampler)
    assert torch.equal(draws[0], expected_draws[0])
    assert draws[1] == expected_draws[1] and draws[2] == expected_draws[2]
    assert torch.equal(draws[3], expected_draws[3])


def test_checkpoint_loads_with_weights_only(tmp_path):
    model, optimizer = _trained(0)
    save_checkpoint(model, optimizer, 3, tmp_path / "c.pt", generators={"s": torch.Generator()})
    payload = torch.load(tmp_path / "c.pt", weights_only=True)
    assert payload["iteration"] == 3 and payload["format"] == "scratchlm.checkpoint"
    assert set(payload["rng"]) == {"torch", "cuda", "python", "numpy", "generators"}


@pytest.mark.parametrize("keep_bytes", [0, 10, 200, -50])
def test_truncated_checkpoint_raises_naming_path(tmp_path, keep_bytes):
    model, optimizer = _trained(0)
    good = tmp_path / "good.pt"
    save_checkpoint(model, optimizer, 1, good)
    data = good.read_bytes()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[:keep_bytes])
    with pytest.raises(CheckpointError, match=r"bad\.pt.*truncated, corrupt"):
        load_checkpoint(bad, model, optimizer)


def test_foreign_and_missing_checkpoints_raise(tmp_path):
    model, optimizer = _trained(0)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match=r"foreign\.pt.*not a scratchlm checkpoint"):
        load_checkpoint(foreign, model, optimizer)
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        load_checkpoint(tmp_path / "nope.pt", model, optimizer)


def test_checkpoint_for_another_model_raises(tmp_path):
    model, optimizer = _trained(0)
    save_checkpoint(model, optimizer, 1, tmp_path / "c.pt")
    other = torch.nn.Linear(4, 3)
    with pytest.raises(CheckpointError, match=r"c\.pt.*does not fit this model"):
        load_checkpoint(tmp_path / "c.pt", other)


def test_crash_while_saving_keeps_previous_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch):
    model, optimizer = _trained(0)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(model, optimizer, 1, path)
    before = path.read_bytes()

    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[:1000])  # part of the new checkpoint reaches the disk...
        raise OSError("disk full")  # ...then the save dies

    monkeypatch.setattr(torch, "save", crashing_save)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, optimizer, 2, path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert load_checkpoint(path, _tiny_model(0), None) == 1


def test_save_rejects_bad_iteration(tmp_path):
    model, optimizer = _trained(0)
    with pytest.raises(ValueError, match="iteration must be an int >= 0, got -1"):
        save_checkpoint(model, optimizer, -1, tmp_path / "c.pt")
