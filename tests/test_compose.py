"""Classification composition: UHC estimators and losses, voting, filtering, balance, selection,
teacher caching, the student pipeline, the ``compose`` CLI and its bad-input errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from torch import nn

from neuralmerge.compose import CompositionError, compose
from neuralmerge.compose.cli_compose import compose_cmd
from neuralmerge.compose.labels import (
    balance_weights,
    entropy_filter,
    estimate_ce,
    estimate_mf_lf,
    estimate_mf_lu,
    estimate_mf_p,
    estimate_sd,
    make_pseudo_labels,
    pad_outputs,
    select_least_entropy,
    uhc_loss,
    union_classes,
    vote,
)
from neuralmerge.compose.student import read_classes
from neuralmerge.compose.teachers import Teacher, teacher_logits
from neuralmerge.errors import NeuralMergeError
from neuralmerge.zoo.train import export_onnx, train_classifier

# ------------------------------------------------------------------------------ synthetic UHC case

CLASS_SETS = [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 0, 1], [1, 3, 5, 0], [0, 2, 4, 5]]  # connected, overlapping


def synthetic(scale_spread: float = 0.0, n: int = 40, seed: int = 0, concentration: float = 1.0):
    """Ground-truth q over 6 classes and teachers whose outputs are exact renormalised subsets of q.

    Each teacher's logits are log p_i plus a random shift (softmax ignores it) and, with
    ``scale_spread``, times a random per-sample scale (a different temperature per teacher).
    """
    rng = np.random.default_rng(seed)
    q = rng.dirichlet(np.full(6, concentration), size=n)
    logits = []
    for classes in CLASS_SETS:
        p = q[:, classes] / q[:, classes].sum(axis=1, keepdims=True)
        scale = rng.uniform(1 - scale_spread, 1 + scale_spread, (n, 1))
        logits.append(np.log(p) * scale + rng.normal(size=(n, 1)))
    supports = [np.array(c) for c in CLASS_SETS]
    return q, logits, supports


def test_union_keeps_first_appearance_order_and_maps_each_teacher():
    union, supports = union_classes([["cat", "dog"], ["car", "cat"], ["bus"]])
    assert union == ["cat", "dog", "car", "bus"]
    assert [s.tolist() for s in supports] == [[0, 1], [2, 0], [3]]
    with pytest.raises(CompositionError, match="'dog' appears twice"):
        union_classes([["dog", "dog"]])


@pytest.mark.parametrize("concentration, n", [(1.0, 40), (0.3, 400)])
@pytest.mark.parametrize("estimator", [estimate_ce, estimate_mf_p, estimate_mf_lf])
def test_ce_mf_p_mf_lf_recover_ground_truth_q(estimator, concentration, n):
    # Peaked distributions (Dirichlet 0.3) are where the iterations crawl at T = 1: from a naive
    # start 1000 MF-P steps left 5% of such samples far from q and 2% with the wrong argmax.
    q, logits, supports = synthetic(n=n, concentration=concentration)
    outputs = pad_outputs(logits, supports, 6)
    estimate = estimator(outputs, np.ones((len(q), len(supports)), dtype=bool))
    np.testing.assert_allclose(estimate, q, atol=1e-5)


def test_sd_does_not_recover_q():
    q, logits, supports = synthetic()
    outputs = pad_outputs(logits, supports, 6)
    assert np.abs(estimate_sd(outputs, np.ones((len(q), 5), dtype=bool)) - q).max() > 0.1


def test_mf_lu_recovers_q_up_to_temperature_when_teachers_scale_logits_differently():
    q, logits, supports = synthetic(scale_spread=0.5)
    outputs = pad_outputs(logits, supports, 6)
    active = np.ones((len(q), 5), dtype=bool)
    estimate = estimate_mf_lu(outputs, active)
    # log q̂ = α log q + const per sample (v absorbs each teacher's scale; λ fixes the overall one)
    log_q = np.log(q) - np.log(q).mean(axis=1, keepdims=True)
    log_e = np.log(estimate) - np.log(estimate).mean(axis=1, keepdims=True)
    alpha = (log_e * log_q).sum(axis=1) / (log_q * log_q).sum(axis=1)
    assert np.abs(log_e - alpha[:, None] * log_q).max() < 0.05
    assert (estimate.argmax(axis=1) == q.argmax(axis=1)).mean() >= 0.95  # λ biases near-ties
    # with different teacher temperatures, v = 1 (mf-lf) is no longer exact
    assert np.abs(estimate_mf_lf(outputs, active) - q).max() > 0.01


def test_estimators_give_zero_mass_to_classes_no_active_teacher_knows():
    q, logits, supports = synthetic(n=5)
    outputs = pad_outputs(logits[:1], supports[:1], 6)              # one teacher: classes 0..3
    active = np.ones((5, 1), dtype=bool)
    for estimator in (estimate_sd, estimate_ce, estimate_mf_p, estimate_mf_lf, estimate_mf_lu):
        estimate = estimator(outputs, active)
        np.testing.assert_allclose(estimate[:, 4:], 0.0)
        np.testing.assert_allclose(estimate.sum(axis=1), 1.0)


@pytest.mark.parametrize("method,tolerance", [("ce", 1e-3), ("mf-lf", 1e-3), ("mf-p", 1e-2), ("sd", None)])
def test_backprop_losses_are_minimised_by_ground_truth(method, tolerance):
    q, logits, supports = synthetic(n=8)
    outputs = pad_outputs(logits, supports, 6)
    mask = torch.from_numpy(outputs.support[None].repeat(8, axis=0)).float()
    z, p = torch.from_numpy(outputs.logits).float(), torch.from_numpy(outputs.probs).float()
    u = torch.zeros(8, 6, requires_grad=True)                        # a "student" that is its own output
    optimizer = torch.optim.Adam([u], lr=0.05)
    for _ in range(1500):
        optimizer.zero_grad()
        uhc_loss(method, u, z, p, mask).backward()
        optimizer.step()
    found = torch.softmax(u, dim=1).detach().numpy()
    if tolerance is None:  # naive distillation converges to the mean of the zero-padded p_i instead
        np.testing.assert_allclose(found, estimate_sd(outputs, np.ones((8, 5), dtype=bool)), atol=1e-3)
        assert np.abs(found - q).max() > 0.05
    else:
        np.testing.assert_allclose(found, q, atol=tolerance)


def test_mf_lu_backprop_loss_orders_classes_like_q():
    q, logits, supports = synthetic(n=8, scale_spread=0.5)
    outputs = pad_outputs(logits, supports, 6)
    mask = torch.from_numpy(outputs.support[None].repeat(8, axis=0)).float()
    u = torch.zeros(8, 6, requires_grad=True)
    with torch.no_grad():
        u += 0.01 * torch.arange(6)                                  # v needs a non-constant u to start
    optimizer = torch.optim.Adam([u], lr=0.05)
    for _ in range(1500):
        optimizer.zero_grad()
        uhc_loss("mf-lu", u, torch.from_numpy(outputs.logits).float(), torch.from_numpy(outputs.probs).float(),
                 mask).backward()
        optimizer.step()
    assert (np.argsort(u.detach().numpy(), axis=1) == np.argsort(q, axis=1)).all()


# ------------------------------------------------------------------------------ vote, filter, balance, select


def one_hot_logits(classes: list[int], width: int, confidence: float = 10.0) -> np.ndarray:
    logits = np.zeros((len(classes), width))
    logits[np.arange(len(classes)), classes] = confidence
    return logits


def test_least_entropy_selection_ranks_teachers_by_plain_entropy():
    # AKA eq. 6: a 2-class teacher at 0.9/0.1 (0.33 nats) is more certain than a 10-class one at
    # 0.8 (0.94 nats), though the latter's entropy divided by log 10 is the smaller.
    classes = [["cat", "dog"], ["cat", "dog", "car", "bus", "ship", "tree", "bird", "frog", "horse", "deer"]]
    union, supports = union_classes(classes)
    logits = [np.log(np.array([[0.9, 0.1]])), np.log(np.array([[0.8] + [0.2 / 9] * 9]))]
    outputs = pad_outputs(logits, supports, len(union))
    _, chosen = select_least_entropy(outputs, np.ones((1, 2), bool), estimate_sd(outputs, np.ones((1, 2), bool)))
    assert chosen.tolist() == [0]


def test_vote_strategies_on_hand_made_ballots():
    # three teachers over the same 3 classes; per sample their top classes are:
    # s0: 0,0,0 (all agree)  s1: 0,0,1 (2 of 3)  s2: 0,1,2 (no majority; tie broken by probability)
    tops = [[0, 0, 0], [0, 0, 1], [0, 1, 2]]
    logits = [one_hot_logits([row[t] for row in tops], 3) for t in range(3)]
    logits[0][2, 0] = 12.0                                           # teacher 0 is the most confident on s2
    supports = [np.arange(3)] * 3
    outputs = pad_outputs(logits, supports, 3)
    active = np.ones((3, 3), dtype=bool)
    kept = {s: vote(outputs, active, s)[1].tolist() for s in ("unanimous", "consensus", "affirmative")}
    assert kept == {"unanimous": [True, False, False], "consensus": [True, True, False],
                    "affirmative": [True, True, True]}
    soft, _ = vote(outputs, active, "affirmative")
    assert soft.argmax(axis=1).tolist() == [0, 0, 0]
    # the soft label averages only the teachers that voted for the winner
    np.testing.assert_allclose(soft[1], outputs.probs[1, :2].mean(axis=0))


def test_vote_counts_only_teachers_that_know_the_class():
    # teacher 0 knows {a, b}, teacher 1 knows {b, c}; both pick their own class: a gets 1 vote of N_a = 1.
    union, supports = union_classes([["a", "b"], ["b", "c"]])
    logits = [one_hot_logits([0, 1], 2), one_hot_logits([1, 1], 2)]  # s0: a / c ; s1: b / c
    outputs = pad_outputs(logits, supports, 3)
    soft, keep = vote(outputs, np.ones((2, 2), dtype=bool), "unanimous")
    assert keep.tolist() == [True, False]      # s0: 'a' wins the tie by probability, known only to teacher 0
    assert soft[0].argmax() == 0


def test_entropy_filter_drops_uncertain_teachers_and_samples():
    certain, unsure = [5.0, 0.0, 0.0], [0.1, 0.0, 0.0]
    logits = [np.array([certain, unsure, unsure]), np.array([unsure, certain, unsure])]
    outputs = pad_outputs(logits, [np.arange(3)] * 2, 3)
    active = entropy_filter(outputs, 0.5)
    assert active.tolist() == [[True, False], [False, True], [False, False]]
    labels = make_pseudo_labels(logits, [np.arange(3)] * 2, 3, method="ce", tau=0.5)
    assert labels.keep.tolist() == [True, True, False]
    assert labels.stats["after_entropy_filter"] == 2 and labels.soft.shape == (2, 3)
    with pytest.raises(CompositionError, match=r"--tau 0.01 filters out every sample .*50%=0\.073, 75%=0\.536"):
        make_pseudo_labels(logits, [np.arange(3)] * 2, 3, tau=0.01)


def test_balance_weights_are_inverse_mean_soft_labels():
    soft = np.array([[0.8, 0.2, 0.0], [0.6, 0.4, 0.0]])
    weights = balance_weights(soft)                                  # means 0.7, 0.3, 0 (absent)
    np.testing.assert_allclose(weights, [1 / (0.7 * 2), 1 / (0.3 * 2), 0.0])
    np.testing.assert_allclose((soft.mean(axis=0) * weights).sum(), 1.0)


def test_least_entropy_selection_picks_the_surest_teacher_that_knows_the_class():
    union, supports = union_classes([["a", "b"], ["a", "b"], ["c", "d"]])
    logits = [np.array([[3.0, 0.0]]), np.array([[6.0, 0.0]]), np.array([[20.0, 0.0]])]
    outputs = pad_outputs(logits, supports, 4)
    soft = np.array([[0.6, 0.1, 0.3, 0.0]])                          # aggregated class: a
    labels, chosen = select_least_entropy(outputs, np.ones((1, 3), dtype=bool), soft)
    assert chosen.tolist() == [1]              # teacher 2 is surer but does not know 'a'
    np.testing.assert_allclose(labels[0], outputs.probs[0, 1])


# ------------------------------------------------------------------------------ teachers and caching


class CountingTeacher:
    def __init__(self, weights: np.ndarray):
        self.weights, self.calls = weights, 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        return batch.reshape(len(batch), -1) @ self.weights


def test_teacher_outputs_are_cached_by_teacher_and_data(tmp_path):
    rng = np.random.default_rng(0)
    fn = CountingTeacher(rng.normal(size=(4, 3)))
    teacher = Teacher(fn, "t", cache_key="t-v1")
    x = rng.normal(size=(10, 4)).astype(np.float32)
    first, hits = teacher_logits([teacher], x, batch_size=4, cache_dir=tmp_path, progress=False)
    assert fn.calls == 3 and hits == [False]
    again, hits = teacher_logits([teacher], x, batch_size=4, cache_dir=tmp_path, progress=False)
    assert fn.calls == 3 and hits == [True]
    np.testing.assert_array_equal(first[0], again[0])
    teacher_logits([teacher], x + 1, batch_size=4, cache_dir=tmp_path, progress=False)   # other data
    assert fn.calls == 6
    teacher_logits([Teacher(fn, "t", cache_key="t-v2")], x, batch_size=4, cache_dir=tmp_path, progress=False)
    assert fn.calls == 9
    uncached = Teacher(fn, "t")                                      # no key: never cached
    teacher_logits([uncached], x, batch_size=4, cache_dir=tmp_path, progress=False)
    teacher_logits([uncached], x, batch_size=4, cache_dir=tmp_path, progress=False)
    assert fn.calls == 15


def test_compose_reuses_cached_teachers_across_settings(tmp_path):
    x = np.random.default_rng(0).normal(size=(40, 1, 8, 8)).astype(np.float32)
    fns = [CountingTeacher(np.random.default_rng(i).normal(size=(64, 3))) for i in range(2)]
    teachers = [Teacher(fn, f"t{i}", cache_key=f"k{i}") for i, fn in enumerate(fns)]
    classes = [["a", "b", "c"], ["c", "d", "e"]]
    for method in ("ce", "mf-lf"):
        result = compose(teachers, classes, x, method=method, epochs=1, cache_dir=tmp_path, progress=False)
    assert [fn.calls for fn in fns] == [1, 1]
    assert [t["cached"] for t in result.report["teachers"]] == [True, True]


def test_failing_nan_and_misshapen_teachers_are_one_line_errors():
    x = np.zeros((5, 4), dtype=np.float32)

    def broken(batch):
        raise RuntimeError("device lost\nsecond line")

    with pytest.raises(CompositionError, match=r"^teacher t failed on samples 0\.\.4: device lost$"):
        teacher_logits([Teacher(broken, "t")], x, progress=False)
    with pytest.raises(CompositionError, match="NaN or infinite logits .first at sample 2"):
        teacher_logits([Teacher(lambda b: np.where(np.arange(len(b))[:, None] == 2, np.nan, 0.0) + np.zeros((len(b), 3)),
                                "t")], x, progress=False)
    with pytest.raises(CompositionError, match=r"returned shape \[5\]"):
        teacher_logits([Teacher(lambda b: b[:, 0], "t")], x, progress=False)


def test_compose_rejects_bad_api_input():
    x = np.zeros((6, 1, 8, 8), dtype=np.float32)
    three = lambda b: np.zeros((len(b), 3))  # noqa: E731
    with pytest.raises(CompositionError, match="outputs 3 logits but its class list has 2 names"):
        compose([three], [["a", "b"]], x, epochs=1, progress=False)
    with pytest.raises(CompositionError, match="'a' appears twice"):
        compose([three], [["a", "b", "a"]], x, epochs=1, progress=False)
    with pytest.raises(CompositionError, match="the unlabeled set is empty"):
        compose([three], [["a", "b", "c"]], x[:0], epochs=1, progress=False)
    with pytest.raises(CompositionError, match="2 teachers but 1 class lists"):
        compose([three, three], [["a", "b", "c"]], x, epochs=1, progress=False)
    with pytest.raises(CompositionError, match="does not apply with --backprop"):
        compose([three], [["a", "b", "c"]], x, backprop=True, balance=True, progress=False)
    # NaN passes every range comparison: each number is checked for it
    for options, words in [({"lr": float("nan")}, "--lr must be a positive number"),
                           ({"batch_size": 0}, "--batch-size must be >= 1"),
                           ({"temperature": float("nan")}, "--temperature must be > 0"),
                           ({"labeled": (np.full((2, 1, 8, 8), np.nan, np.float32), [0, 1])}, "labeled x must be finite")]:
        with pytest.raises(CompositionError, match=words):
            compose([three], [["a", "b", "c"]], x, epochs=1, progress=False, **options)


# ------------------------------------------------------------------------------ end to end on real digits


def _tiny(num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(128, num_classes))


@pytest.fixture(scope="module")
def digits_case(tmp_path_factory):
    """Two tiny ONNX teachers on 8×8 digits, 0–5 and 4–9, trained on disjoint samples; a pool and a test split."""
    folder = tmp_path_factory.mktemp("compose")
    data = load_digits()
    x = ((data.images[:, None] / 16.0 - 0.3) / 0.4).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], data.target[order]
    test, pool, train = slice(0, 300), slice(300, 900), slice(900, None)
    paths = []
    for i, known in enumerate([[0, 1, 2, 3, 4, 5], [4, 5, 6, 7, 8, 9]]):
        rows = np.flatnonzero(np.isin(y[train], known))[i::2]        # disjoint halves
        torch.manual_seed(i)
        model = train_classifier(_tiny(6), x[train][rows], np.searchsorted(known, y[train][rows]), epochs=30,
                                 batch_size=32, quiet=True)
        paths.append(str(export_onnx(model, folder / f"t{i}.onnx", (1, 8, 8))))
        (folder / f"t{i}.txt").write_text("".join(f"digit{c}\n" for c in known))
    np.save(folder / "pool.npy", x[pool])
    few = np.arange(900, 960)
    np.savez(folder / "few.npz", x=x[few], y=np.array([f"digit{c}" for c in y[few]]))
    return {"dir": folder, "teachers": paths, "classes": [str(folder / "t0.txt"), str(folder / "t1.txt")],
            "pool": str(folder / "pool.npy"), "x_test": x[test], "y_test": y[test]}


def _cli(case, tmp_path, *extra, output="student.onnx"):
    args = [*case["teachers"]]
    for path in case["classes"]:
        args += ["--classes", path]
    args += ["--unlabeled", case["pool"], "-o", str(tmp_path / output), "--cache-dir", str(tmp_path / "cache"),
             "--threads", "1", "--epochs", "6", *extra]
    return CliRunner().invoke(compose_cmd, args)


def _accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    names = read_classes(path)
    return float((np.array([int(n.removeprefix("digit")) for n in names])[logits.argmax(axis=1)] == y).mean())


def test_cli_composes_two_teachers_into_one_student(digits_case, tmp_path):
    result = _cli(digits_case, tmp_path, "--method", "ce", "--balance", "--report", str(tmp_path / "report.json"))
    assert result.exit_code == 0, result.output
    assert "2 teachers (0 from cache), 10 classes" in result.output
    student = tmp_path / "student.onnx"
    names = read_classes(student)
    assert names == [f"digit{c}" for c in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]]
    model = onnx.load(str(student))
    assert model.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 10
    assert _accuracy(student, digits_case["x_test"], digits_case["y_test"]) > 0.8
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["classes"] == names and report["labels"]["kept"] == 600
    assert report["settings"]["method"] == "ce" and len(report["labels"]["class_weights"]) == 10
    assert report["training"]["best_val_agreement"] > 0.8

    # a rerun with other settings takes the teachers from the cache, and the ONNX student resizes its head
    again = _cli(digits_case, tmp_path, "--method", "mf-lf", "--backprop", "--student", str(student),
                 "--labeled", str(digits_case["dir"] / "few.npz"), "-q", output="second.onnx")
    assert again.exit_code == 0, again.output
    assert again.output == ""
    assert read_classes(tmp_path / "second.onnx") == names
    assert _accuracy(tmp_path / "second.onnx", digits_case["x_test"], digits_case["y_test"]) > 0.7


def test_onnx_student_with_a_narrower_gemm_head_is_resized(digits_case, tmp_path):
    torch.manual_seed(0)
    export_onnx(_tiny(3), tmp_path / "init.onnx", (1, 8, 8))
    result = compose(digits_case["teachers"], [[f"d{c}" for c in range(6)], [f"d{c}" for c in range(4, 10)]],
                     np.load(digits_case["pool"]), student=str(tmp_path / "init.onnx"), epochs=2,
                     output=tmp_path / "out.onnx", seed=3, progress=False)
    assert read_classes(tmp_path / "out.onnx") == [f"d{c}" for c in range(10)]
    session = ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: digits_case["x_test"][:4]})[0]
    assert out.shape == (4, 10)
    expected = result.model(torch.from_numpy(digits_case["x_test"][:4])).detach().numpy()
    np.testing.assert_allclose(out, expected, atol=1e-4)


def _nan_teacher(path: Path) -> None:
    """An ONNX classifier whose logits are 0/0 = NaN."""
    weight = numpy_helper.from_array(np.zeros((64, 6), np.float32), "w")
    zero = numpy_helper.from_array(np.zeros((6,), np.float32), "zero")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["mm"]),
         helper.make_node("Div", ["mm", "zero"], ["logits"])],
        "nan", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 6])], [weight, zero])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


@pytest.mark.parametrize("case", ["class_count", "duplicate_class", "empty_unlabeled", "tau_filters_all",
                                  "nan_teacher", "teacher_input_shape", "missing_npz_key"])
def test_cli_bad_input_is_a_one_line_error_and_writes_nothing(case, digits_case, tmp_path):
    extra: list[str] = []
    case_data = dict(digits_case)
    if case == "class_count":
        short = tmp_path / "short.txt"
        short.write_text("digit0\ndigit1\n")
        case_data["classes"] = [str(short), digits_case["classes"][1]]
        expected = "short.txt has 2 class names but"
    elif case == "duplicate_class":
        dup = tmp_path / "dup.txt"
        dup.write_text("a\nb\na\nc\nd\ne\n")
        case_data["classes"] = [str(dup), digits_case["classes"][1]]
        expected = "class 'a' is listed twice"
    elif case == "empty_unlabeled":
        np.save(tmp_path / "empty.npy", np.zeros((0, 1, 8, 8), np.float32))
        case_data["pool"] = str(tmp_path / "empty.npy")
        expected = "the unlabeled set is empty"
    elif case == "tau_filters_all":
        extra = ["--tau", "0.0"]
        expected = "--tau 0.0 filters out every sample (per-sample lowest normalised teacher entropy: 5%="
    elif case == "nan_teacher":
        _nan_teacher(tmp_path / "nan.onnx")
        case_data["teachers"] = [digits_case["teachers"][0], str(tmp_path / "nan.onnx")]
        expected = "nan.onnx returned NaN or infinite logits"
    elif case == "teacher_input_shape":
        np.save(tmp_path / "wide.npy", np.zeros((5, 1, 9, 9), np.float32))
        case_data["pool"] = str(tmp_path / "wide.npy")
        expected = "takes inputs [1, 8, 8] but the unlabeled samples are [1, 9, 9]"
    else:
        np.savez(tmp_path / "pool.npz", images=np.zeros((5, 1, 8, 8), np.float32))
        case_data["pool"] = str(tmp_path / "pool.npz")
        expected = "no array 'x' (found images)"
    result = _cli(case_data, tmp_path, *extra, "--report", str(tmp_path / "report.json"), "--no-cache", "-q")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output
    assert not (tmp_path / "student.onnx").exists() and not (tmp_path / "report.json").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_cli_verbose_shows_traceback_and_existing_output_needs_force(digits_case, tmp_path):
    (tmp_path / "student.onnx").write_bytes(b"keep me")
    result = _cli(digits_case, tmp_path)
    assert result.exit_code == 1 and "exists (use --force to overwrite)" in result.output
    assert (tmp_path / "student.onnx").read_bytes() == b"keep me"
    result = _cli(digits_case, tmp_path, "--tau", "0", "--force", "-v")
    # -v lets the error propagate with its traceback (the project-wide convention, neuralmerge.cli_support)
    assert result.exit_code == 1 and isinstance(result.exception, CompositionError)
    assert str(result.exception).startswith("--tau 0.0 filters out every sample")


def test_api_errors_are_neuralmerge_errors():
    assert issubclass(CompositionError, NeuralMergeError)


@pytest.mark.parametrize("name", ["lenet", "resnet", "mobilenet"])
def test_builtin_students_output_one_logit_per_union_class(name):
    from neuralmerge.compose.student import build_student

    student = build_student(name, ["a", "b", "c", "d", "e"], (1, 16, 16), seed=0)
    assert student.template is None
    assert student.model.eval()(torch.zeros(2, 1, 16, 16)).shape == (2, 5)


def test_student_choice_errors():
    from neuralmerge.compose.student import build_student

    with pytest.raises(CompositionError, match="square images"):
        build_student("lenet", ["a"], (1, 16, 12))
    with pytest.raises(CompositionError, match="takes images"):
        build_student("resnet", ["a"], (64,))
    with pytest.raises(CompositionError, match="one of lenet, resnet, mobilenet or an ONNX file"):
        build_student("vgg", ["a"], (1, 8, 8))


def test_cli_method_choices_match_the_label_methods():
    from neuralmerge.compose import cli_compose, labels

    assert cli_compose._METHODS == labels.METHODS and cli_compose._STRATEGIES == labels.STRATEGIES
