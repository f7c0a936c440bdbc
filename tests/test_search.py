"""The budgeted r/C search: candidates, their order, shares, the drop measure, the bisection, end to end."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import neuralmerge
from neuralmerge.calibrate import search as search_module
from neuralmerge.calibrate.search import _expected_accuracy_drop, budget_shares, candidates, encoded_bytes
from neuralmerge.pipeline import plan
from neuralmerge.settings import CalibrationSettings, GroupSetting
from hetero_models import hetero_pair


@pytest.fixture(scope="module")
def model_b(tmp_path_factory):
    folder = tmp_path_factory.mktemp("search")
    _, b = hetero_pair(folder)
    x = folder / "b.npy"
    np.save(x, np.random.default_rng(0).standard_normal((64, 1, 28, 28)).astype(np.float32))
    return b, x


def test_candidates_follow_the_depth_and_sort_by_bytes(model_b):
    b, _ = model_b
    groups = {g.name: g for g in plan([b]).groups}   # conv1 depth 1, conv2 depth 6, fc1 depth 637
    assert {(s.r, s.codewords) for s in candidates(groups["conv1"])} == {(1, 64), (1, 128), (1, 256)}
    assert {s.r for s in candidates(groups["conv2"])} == {4, 6}
    assert {s.r for s in candidates(groups["fc1"])} == {4, 8, 16, 32} and len(candidates(groups["fc1"])) == 12
    fc1 = groups["fc1"]
    # fewer bytes with longer segments and fewer codewords; fp16 codebooks are smaller
    assert encoded_bytes(fc1, GroupSetting(32, 64)) < encoded_bytes(fc1, GroupSetting(8, 64)) \
        < encoded_bytes(fc1, GroupSetting(8, 256)) < encoded_bytes(fc1, GroupSetting(4, 256))
    assert encoded_bytes(fc1, GroupSetting(8, 128), 2) < encoded_bytes(fc1, GroupSetting(8, 128), 4)
    # exact for fc1: 30 rows × ceil(637/8) one-byte codes + 80 segments × 128 × 8 floats
    assert encoded_bytes(fc1, GroupSetting(8, 128)) == 30 * 80 + 80 * 128 * 8 * 4


class _FakeCalibrator:
    """Stands in for the trainer: the drop shrinks as the candidate's bytes grow, and halves when calibrated."""
    fits: list = []

    def __init__(self, teachers, merged, data, heads, settings, **kwargs):
        self.bytes, self.calibrated, self.measured = merged, False, False

    def measure_int8_ranges(self):  # with --int8-aware, every candidate is scored on the int8 tables
        self.measured = True

    def fit(self):
        _FakeCalibrator.fits.append(self.bytes)
        self.calibrated = True


def _fake_drop(calibrator) -> float:
    assert calibrator.measured  # an uncalibrated candidate too (it was scored in fp32 under --int8-aware)
    return 100 * 1e6 / calibrator.bytes / (2 if calibrator.calibrated else 1)


def test_bisection_finds_the_most_compressive_fitting_candidate(model_b, monkeypatch):
    b, _ = model_b
    fc1 = next(g for g in plan([b]).groups if g.name == "fc1")
    monkeypatch.setattr(search_module, "Calibrator", _FakeCalibrator)
    monkeypatch.setattr(search_module, "fidelity_drop", _fake_drop)
    _FakeCalibrator.fits = []
    ordered = sorted(encoded_bytes(fc1, s) for s in candidates(fc1))
    budget = 100 * 1e6 / ordered[7] / 2  # exactly candidate 7 (and every larger one) fits once calibrated
    result = search_module.search([fc1], [], [], [], CalibrationSettings(), budget,
                                  lambda g, s: encoded_bytes(g, s), quiet=True)
    chosen = result["groups"][0]
    assert encoded_bytes(fc1, GroupSetting(chosen["r"], chosen["codewords"])) == ordered[7] and chosen["fits"]
    assert chosen["drop"] == pytest.approx(budget) and chosen["share"] == pytest.approx(budget)
    assert len(_FakeCalibrator.fits) <= 5 < len(ordered)   # bisection, not a sweep
    # a candidate that fits before calibration is not calibrated
    _FakeCalibrator.fits = []
    loose = search_module.search([fc1], [], [], [], CalibrationSettings(), 100 * 1e6 / ordered[0],
                                 lambda g, s: encoded_bytes(g, s), quiet=True)
    assert loose["groups"][0]["r"] == 32 and _FakeCalibrator.fits == []
    assert not any(c["calibrated"] for c in loose["groups"][0]["candidates"])


def test_budget_shares_follow_the_weights(model_b):
    b, _ = model_b
    groups = plan([b]).groups
    shares = budget_shares(groups, 2.0)
    sizes = {g.name: sum(m.weight.size for m in g.members) for g in groups}
    assert sum(shares.values()) == pytest.approx(2.0)
    assert shares["fc1"] / shares["conv2"] == pytest.approx(sizes["fc1"] / sizes["conv2"])


def test_expected_accuracy_drop():
    teacher = torch.log(torch.tensor([[0.5, 0.4, 0.1], [0.9, 0.05, 0.05]]))
    student = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])   # flips the near-tie only
    assert _expected_accuracy_drop(teacher, student, None).tolist() == pytest.approx([0.1, 0.0])
    labels = torch.tensor([0, 1])
    assert _expected_accuracy_drop(teacher, student, labels).tolist() == [1.0, 0.0]


def test_budget_merge_end_to_end(model_b, tmp_path):
    b, x = model_b
    result = neuralmerge.merge([b], tmp_path / "m.onnx", calib=[x], budget=100.0, quiet=True,
                               calibration={"epochs": 1, "batch_size": 32}, report=tmp_path / "r.json")
    search = result.report["search"]
    assert search["budget"] == 100.0 and sum(g["share"] for g in search["groups"]) == pytest.approx(100.0)
    chosen = {g["name"]: (g["r"], g["codewords"]) for g in search["groups"]}
    assert chosen == {g["name"]: (g["r"], g["codewords"]) for g in result.report["groups"]}
    for g in search["groups"]:
        assert g["fits"] and g["candidates"]
        assert all(0 <= c["drop"] <= 100 for c in g["candidates"])
    assert "## Budget search" in (tmp_path / "r.md").read_text()
