"""Pseudo-labels from several teachers: filtering, voting, UHC soft labels, balancing, selection.

Every teacher ``i`` knows a subset ``L_i`` of the union ``L_U`` of all class names. Its outputs are
held zero-padded over ``L_U`` (``probs``/``logits``, shape (n, N, L)) with a ``support`` mask
(N, L), and an ``active`` mask (n, N) says which teachers still speak for a sample after the
entropy filter. Methods (Model Composition, BMVC 2021; UHC, CVPR 2019; AKA, ICCV 2019):

* ``vote``: majority vote among the teachers that know the winning class (unanimous / consensus /
  affirmative, as in Algorithm 2 of Model Composition);
* ``sd``: naive distillation, undefined classes = 0, q = mean of padded p_i (argmin of eq. 1);
* ``ce``: argmin_q of eq. 7 (convex, eq. 9) by a closed-form MM update (see ``estimate_ce``);
* ``mf-p``: rank-1 masked factorisation of P in probability space, eq. 12–14, ALS + normalising u;
* ``mf-lu`` / ``mf-lf``: factorisation in logit space, eq. 15–16 with v free (λ = 0.01) or v = 1;
* ``balance``: class weights = inverse mean soft label (UHC §3.5.2);
* ``select="least-entropy"``: per sample, the label of the least-entropy teacher among those that
  know the sample's (aggregated) class (AKA §3.3).

``uhc_loss`` gives the same objectives as differentiable losses of a student's logits (the "-BP"
variants of UHC §3.5.1).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
import torch

from neuralmerge.compose import CompositionError

Method = Literal["vote", "sd", "ce", "mf-p", "mf-lu", "mf-lf"]
METHODS: tuple[str, ...] = ("vote", "sd", "ce", "mf-p", "mf-lu", "mf-lf")
BACKPROP_METHODS: tuple[str, ...] = ("sd", "ce", "mf-p", "mf-lu", "mf-lf")
STRATEGIES: tuple[str, ...] = ("unanimous", "consensus", "affirmative")
SELECTIONS: tuple[str, ...] = ("none", "least-entropy")
MF_LU_LAMBDA = 0.01  # the UHC paper's λ for MF-LU
_ITERATIONS = 1000
_TOLERANCE = 1e-9
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- class sets


def union_classes(class_lists: Sequence[Sequence[str]]) -> tuple[list[str], list[np.ndarray]]:
    """The union of the teachers' class names (first appearance order) and each teacher's indices into it."""
    union: dict[str, int] = {}
    for names in class_lists:
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise CompositionError(f"class '{name}' appears twice in one teacher's class list")
            seen.add(name)
            union.setdefault(name, len(union))
    return list(union), [np.array([union[n] for n in names], dtype=np.int64) for names in class_lists]


@dataclass(frozen=True, eq=False)
class TeacherOutputs:
    """All teachers' outputs on the unlabeled set, zero-padded over the class union."""

    logits: np.ndarray   # (n, N, L) float64, teacher logits / temperature, 0 outside each L_i
    probs: np.ndarray    # (n, N, L) float64, softmax over L_i at the temperature, 0 outside
    entropy: np.ndarray  # (n, N) normalised entropy of each teacher's plain (T = 1) softmax, in [0, 1]
    support: np.ndarray  # (N, L) bool, class l is in L_i

    @property
    def num_classes(self) -> int:
        return self.support.shape[1]


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """Entropy of each row divided by log(#columns), so 0 = certain and 1 = uniform whatever the class count.

    Normalised so that one ``tau`` fits teachers with 2 and with 20 classes alike.
    """
    k = probs.shape[1]
    if k < 2:
        return np.zeros(len(probs))
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(probs > 0, probs * np.log(probs), 0.0).sum(axis=1)
    return h / np.log(k)


def pad_outputs(teacher_logits: Sequence[np.ndarray], supports: Sequence[np.ndarray], num_classes: int,
                temperature: float = 1.0) -> TeacherOutputs:
    """Zero-pad each teacher's logits (n, K_i) over the union; softmax at ``temperature``."""
    if not 0 < temperature < math.inf:  # NaN too
        raise CompositionError(f"--temperature must be > 0, got {temperature}")
    n, count = len(teacher_logits[0]), len(teacher_logits)
    logits = np.zeros((n, count, num_classes))
    probs = np.zeros((n, count, num_classes))
    entropy = np.zeros((n, count))
    support = np.zeros((count, num_classes), dtype=bool)
    for i, (z, idx) in enumerate(zip(teacher_logits, supports)):
        z = np.asarray(z, dtype=np.float64)
        logits[:, i, idx] = z / temperature
        probs[:, i, idx] = _softmax(z / temperature)
        entropy[:, i] = normalised_entropy(_softmax(z))
        support[i, idx] = True
    return TeacherOutputs(logits, probs, entropy, support)


# ----------------------------------------------------------------------------------- filtering


def entropy_filter(outputs: TeacherOutputs, tau: float | None) -> np.ndarray:
    """Active mask (n, N): teacher i speaks for sample s when its normalised entropy is ≤ ``tau``.

    A sample no teacher speaks for is dropped. If that is every sample, the error quotes the
    quantiles of each sample's lowest teacher entropy, so a working ``tau`` can be read off.
    """
    active = np.ones(outputs.entropy.shape, dtype=bool)
    if tau is None:
        return active
    active = outputs.entropy <= tau
    if not active.any():
        best = outputs.entropy.min(axis=1)
        quantiles = ", ".join(f"{int(p * 100)}%={np.quantile(best, p):.3f}" for p in (0.05, 0.25, 0.5, 0.75, 0.95))
        raise CompositionError(f"--tau {tau} filters out every sample (per-sample lowest normalised teacher "
                               f"entropy: {quantiles})")
    return active


def _mask(outputs: TeacherOutputs, active: np.ndarray) -> np.ndarray:
    """(n, N, L) float mask: teacher i is active for sample s and knows class l."""
    return (active[:, :, None] & outputs.support[None]).astype(np.float64)


def _covered(mask: np.ndarray) -> np.ndarray:
    """(n, L) bool: some active teacher knows the class."""
    return mask.max(axis=1) > 0


def _normalise_rows(q: np.ndarray) -> np.ndarray:
    total = q.sum(axis=1, keepdims=True)
    return np.divide(q, total, out=np.zeros_like(q), where=total > 0)


# ----------------------------------------------------------------------------------- estimators


def _fixed_point(step, start: np.ndarray, iterations: int, method: str) -> np.ndarray:
    """Apply ``step`` from ``start`` until no entry moves by more than _TOLERANCE; say so when the
    iterations run out first (the labels may then be off)."""
    x = start
    change = 0.0
    for _ in range(iterations):
        updated = step(x)
        change = float(np.abs(updated - x).max(initial=0.0))
        x = updated
        if change < _TOLERANCE:
            return x
    log.warning("--method %s stopped after %d iterations still moving by %.1e: some soft labels may be off "
                "(a higher --temperature converges faster)", method, iterations, change)
    return x


def estimate_sd(outputs: TeacherOutputs, active: np.ndarray) -> np.ndarray:
    """Naive distillation: undefined classes count as 0 and q is the mean of the padded p_i (argmin of eq. 1)."""
    return _normalise_rows((outputs.probs * active[:, :, None]).sum(axis=1))


def estimate_ce(outputs: TeacherOutputs, active: np.ndarray, iterations: int = _ITERATIONS) -> np.ndarray:
    """argmin_q of UHC eq. 7, −Σ_i Σ_{l∈L_i} p_il log(q_l / Σ_{k∈L_i} q_k), for every sample at once.

    Setting the gradient of the convex form (eq. 9) to zero gives, for each class l,
    Σ_{i∋l} p_il = q_l Σ_{i∋l} 1/Q_i with Q_i = Σ_{k∈L_i} q_k. Eq. 7 is the likelihood of a
    generalised Bradley–Terry model, for which the update q_l ← Σ_{i∋l} p_il / Σ_{i∋l} 1/Q_i is
    Hunter's (2004) MM step: it decreases eq. 7 monotonically and needs no step size, unlike the
    paper's gradient descent. Classes no active teacher knows get q = 0.
    """
    mask = _mask(outputs, active)
    wins = (outputs.probs * mask).sum(axis=1)                       # (n, L): Σ_{i∋l} p_il

    def step(q: np.ndarray) -> np.ndarray:
        mass = np.einsum("nl,nil->ni", q, mask)                      # Q_i
        inverse = np.divide(1.0, mass, out=np.zeros_like(mass), where=mass > 0)
        denominator = np.einsum("ni,nil->nl", inverse, mask)
        return _normalise_rows(np.divide(wins, denominator, out=np.zeros_like(wins), where=denominator > 0))

    # Started from the MF-LF solution, which is exact when the teachers agree (UHC eq. 6) and
    # cheap; from the uniform start the MM steps crawl at T = 1.
    return _fixed_point(step, estimate_mf_lf(outputs, active, iterations), iterations, "ce")


def estimate_mf_p(outputs: TeacherOutputs, active: np.ndarray, iterations: int = _ITERATIONS) -> np.ndarray:
    """UHC eq. 12–14: min ‖M ⊙ (P − u vᵀ)‖² with u, v ≥ 0, Σu = 1, by ALS, normalising u each step.

    Both half-steps are exact non-negative least squares (one variable per entry), so each
    iteration lowers the cost; the scale moved between u and v is the gauge freedom of u vᵀ.
    """
    mask = _mask(outputs, active)
    p = outputs.probs * mask

    def step(u: np.ndarray) -> np.ndarray:
        u_sq = np.einsum("nl,nil->ni", u * u, mask)
        v = np.maximum(np.divide(np.einsum("nil,nl->ni", p, u), u_sq, out=np.zeros_like(u_sq), where=u_sq > 0), 0)
        v_sq = np.einsum("ni,nil->nl", v * v, mask)
        updated = np.divide(np.einsum("nil,ni->nl", p, v), v_sq, out=np.zeros_like(v_sq), where=v_sq > 0)
        return _normalise_rows(np.maximum(updated, 0))

    # Started from the MF-LF solution (see estimate_ce): from the naive mean, 1000 ALS steps left
    # 5% of the samples of a consistent test far from the optimum and 2% with the wrong argmax.
    return _fixed_point(step, estimate_mf_lf(outputs, active, iterations), iterations, "mf-p")


def _logit_softmax(u: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """softmax(u) over the covered classes; 0 for classes no active teacher knows."""
    u = np.where(covered, u, -np.inf)
    u = u - u.max(axis=1, keepdims=True)
    return _normalise_rows(np.where(covered, np.exp(u), 0.0))


def estimate_mf_lf(outputs: TeacherOutputs, active: np.ndarray, iterations: int = _ITERATIONS) -> np.ndarray:
    """UHC eq. 15 with v = 1: min Σ_i Σ_{l∈L_i} (z_il − u_l − c_i)², convex; q = softmax(u).

    Solved by exact block coordinate descent (c given u, then u given c: both are means), which
    converges to the global optimum of this convex quadratic.
    """
    mask = _mask(outputs, active)
    z = outputs.logits * mask
    per_teacher = mask.sum(axis=2)                                   # |L_i| (0 if inactive)
    per_class = mask.sum(axis=1)                                     # #active teachers knowing l

    def step(u: np.ndarray) -> np.ndarray:
        c = np.divide(np.einsum("nil->ni", z) - np.einsum("nl,nil->ni", u, mask), per_teacher,
                      out=np.zeros_like(per_teacher), where=per_teacher > 0)
        return np.divide(np.einsum("nil->nl", z) - np.einsum("ni,nil->nl", c, mask), per_class,
                         out=np.zeros_like(per_class), where=per_class > 0)

    return _logit_softmax(_fixed_point(step, np.zeros((len(z), outputs.num_classes)), iterations, "mf-lf"),
                          per_class > 0)


def estimate_mf_lu(outputs: TeacherOutputs, active: np.ndarray, iterations: int = _ITERATIONS,
                   regularisation: float = MF_LU_LAMBDA) -> np.ndarray:
    """UHC eq. 15–16: min ‖M ⊙ (Z − u vᵀ − 1 cᵀ)‖² + λ(‖u‖² + ‖v‖²), v ≥ 0, by ALS; q = softmax(u).

    Starts from the v = 1 solution. Given u, each teacher's (v_i, c_i) is a ridge regression of its
    logits on u with an intercept (v clipped at 0); given v and c, each u_l is a ridge mean.
    """
    mask = _mask(outputs, active)
    z = outputs.logits * mask
    per_teacher = mask.sum(axis=2)
    per_class = mask.sum(axis=1)
    covered = per_class > 0
    q0 = estimate_mf_lf(outputs, active, iterations)
    u = np.where(covered, np.log(np.where(covered, q0, 1.0)), 0.0)
    u -= (u * covered).sum(axis=1, keepdims=True) / np.maximum(covered.sum(axis=1, keepdims=True), 1)
    safe_count = np.maximum(per_teacher, 1)

    def step(u: np.ndarray) -> np.ndarray:
        u_mean = np.einsum("nl,nil->ni", u, mask) / safe_count
        z_mean = np.einsum("nil->ni", z) / safe_count
        centred_u = (u[:, None, :] - u_mean[:, :, None]) * mask
        v = np.maximum(np.einsum("nil,nil->ni", centred_u, z - z_mean[:, :, None] * mask)
                       / (np.einsum("nil,nil->ni", centred_u, centred_u) + regularisation), 0.0)
        c = z_mean - v * u_mean
        return (np.einsum("ni,nil->nl", v, z - c[:, :, None] * mask)
                / (np.einsum("ni,nil->nl", v * v, mask) + regularisation))

    return _logit_softmax(_fixed_point(step, u, iterations, "mf-lu"), covered)


_ESTIMATORS = {"sd": estimate_sd, "ce": estimate_ce, "mf-p": estimate_mf_p, "mf-lu": estimate_mf_lu,
               "mf-lf": estimate_mf_lf}


# ----------------------------------------------------------------------------------- voting, selection, balance


def vote(outputs: TeacherOutputs, active: np.ndarray, strategy: str) -> tuple[np.ndarray, np.ndarray]:
    """Majority vote of the active teachers' top classes; returns (soft labels, kept samples).

    The winner c has the most votes (ties: the larger summed probability). With K its votes and
    N_c the active teachers that know c, ``unanimous`` keeps K = N_c, ``consensus`` K ≥ N_c / 2,
    ``affirmative`` every sample (Model Composition, Algorithm 2). The soft label is the mean of
    the distributions of the teachers that voted for c.
    """
    if strategy not in STRATEGIES:
        raise CompositionError(f"unknown --strategy '{strategy}' (choose from {', '.join(STRATEGIES)})")
    n, count, num_classes = outputs.probs.shape
    top = outputs.probs.argmax(axis=2)                                        # (n, N) union index
    ballots = np.zeros((n, count, num_classes))
    np.put_along_axis(ballots, top[:, :, None], 1.0, axis=2)
    ballots *= active[:, :, None]
    votes = ballots.sum(axis=1)
    summed = (outputs.probs * active[:, :, None]).sum(axis=1)
    winner = (votes + 0.5 * summed / count).argmax(axis=1)                    # the tie-break term is < 1 vote
    rows = np.arange(n)
    k = votes[rows, winner]
    n_c = (active & outputs.support[:, winner].T).sum(axis=1)
    keep = {"unanimous": k >= n_c, "consensus": k >= n_c / 2, "affirmative": np.ones(n, dtype=bool)}[strategy]
    keep &= active.any(axis=1)
    voted = (top == winner[:, None]) & active
    soft = _normalise_rows((outputs.probs * voted[:, :, None]).sum(axis=1))
    return soft, keep


def select_least_entropy(outputs: TeacherOutputs, active: np.ndarray, soft: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Per sample, replace the soft label by the (padded) distribution of one teacher.

    The teacher is the one with the least (plain) entropy among the active teachers that know the
    sample's class argmax(soft) (AKA's selective learning, restricted to teachers that could
    have predicted that class). Returns (labels, chosen teacher per sample).
    """
    winner = soft.argmax(axis=1)
    candidates = active & outputs.support[:, winner].T
    # AKA eq. 6 ranks by the plain entropy; outputs.entropy is divided by log|L_i| (for --tau),
    # which would favour the teacher with more classes.
    class_counts = np.log(np.maximum(outputs.support.sum(axis=1), 2))
    entropy = np.where(candidates, outputs.entropy * class_counts[None, :], np.inf)
    chosen = entropy.argmin(axis=1)
    labels = outputs.probs[np.arange(len(soft)), chosen]
    return labels, chosen


def balance_weights(soft: np.ndarray) -> np.ndarray:
    """UHC §3.5.2 class weights: inverse mean soft label, scaled so Σ_l mean_l · w_l = 1 (0 for absent classes)."""
    mean = soft.mean(axis=0)
    present = mean > 0
    weights = np.zeros_like(mean)
    weights[present] = 1.0 / (mean[present] * present.sum())
    return weights


# ----------------------------------------------------------------------------------- the pipeline


@dataclass(eq=False)
class PseudoLabels:
    """Aggregated labels for the kept samples, with the padded teacher outputs for ``-BP`` training."""

    soft: np.ndarray                    # (n_kept, L) float32 rows summing to 1
    keep: np.ndarray                    # (n,) bool over the unlabeled set
    outputs: TeacherOutputs             # restricted to kept samples
    active: np.ndarray                  # (n_kept, N)
    class_weights: np.ndarray | None    # (L,) or None
    stats: dict[str, Any] = field(default_factory=dict)


def make_pseudo_labels(teacher_logits: Sequence[np.ndarray], supports: Sequence[np.ndarray], num_classes: int, *,
                       method: str = "ce", strategy: str = "consensus", tau: float | None = None,
                       temperature: float = 1.0, balance: bool = False, select: str = "none") -> PseudoLabels:
    """Teachers' logits → filtered, aggregated soft labels over the class union (Algorithm 1's middle)."""
    if method not in METHODS:
        raise CompositionError(f"unknown --method '{method}' (choose from {', '.join(METHODS)})")
    if select not in SELECTIONS:
        raise CompositionError(f"unknown --select '{select}' (choose from {', '.join(SELECTIONS)})")
    if tau is not None and not 0.0 <= tau <= 1.0:
        raise CompositionError(f"--tau is a normalised entropy in [0, 1], got {tau}")
    outputs = pad_outputs(teacher_logits, supports, num_classes, temperature)
    n = len(outputs.probs)
    active = entropy_filter(outputs, tau)
    keep = active.any(axis=1)
    after_filter = int(keep.sum())
    if method == "vote":
        soft, keep = vote(outputs, active, strategy)
        if not keep.any():
            raise CompositionError(f"--strategy {strategy} keeps no sample: the teachers never agree enough")
    else:
        soft = _ESTIMATORS[method](outputs, active)
    chosen = None
    if select == "least-entropy":
        soft, chosen = select_least_entropy(outputs, active, soft)
    soft, active = soft[keep], active[keep]
    kept_outputs = TeacherOutputs(outputs.logits[keep], outputs.probs[keep], outputs.entropy[keep], outputs.support)
    weights = balance_weights(soft) if balance else None
    stats: dict[str, Any] = {
        "samples": int(n),
        "after_entropy_filter": after_filter,
        "kept": int(keep.sum()),
        "teacher_predictions_kept": [int(a) for a in active.sum(axis=0)],
        "entropy_quantiles": {f"{int(p * 100)}%": round(float(np.quantile(outputs.entropy.min(axis=1), p)), 4)
                              for p in (0.05, 0.25, 0.5, 0.75, 0.95)},
        "class_mass": [round(float(m), 4) for m in soft.mean(axis=0)],
    }
    if chosen is not None:
        stats["selected_teacher_counts"] = [int(c) for c in np.bincount(chosen[keep], minlength=len(supports))]
    if weights is not None:
        stats["class_weights"] = [round(float(w), 4) for w in weights]
    return PseudoLabels(soft.astype(np.float32), keep, kept_outputs, active, weights, stats)


# ----------------------------------------------------------------------------------- -BP losses


def uhc_loss(method: str, student_logits: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor,
             mask: torch.Tensor, regularisation: float = MF_LU_LAMBDA) -> torch.Tensor:
    """The UHC objective of ``method`` with the student's output as q (UHC §3.5.1), batch mean.

    ``logits``/``probs`` are the padded teacher outputs (B, N, L) and ``mask`` (B, N, L) marks
    active teacher/class pairs. The per-teacher variables (v, c) are solved in closed form with u
    fixed and not differentiated: at their optimum the gradient through them vanishes anyway.
    """
    batch = student_logits.shape[0]
    if method == "sd":
        log_q = torch.log_softmax(student_logits, dim=1)
        return -(probs * mask * log_q[:, None, :]).sum() / batch
    if method == "ce":
        masked = student_logits[:, None, :].masked_fill(mask == 0, float("-inf"))
        log_norm = torch.logsumexp(masked, dim=2, keepdim=True)                     # (B, N, 1)
        log_norm = torch.where(torch.isfinite(log_norm), log_norm, torch.zeros_like(log_norm))
        return -(probs * mask * (student_logits[:, None, :] - log_norm)).sum() / batch
    if method == "mf-p":
        u = torch.softmax(student_logits, dim=1)
        with torch.no_grad():
            u_sq = (u * u)[:, None, :].mul(mask).sum(dim=2)
            v = ((probs * mask * u[:, None, :]).sum(dim=2) / u_sq.clamp_min(1e-12)).clamp_min(0)
        return ((mask * (probs - u[:, None, :] * v[:, :, None])) ** 2).sum() / batch
    count = mask.sum(dim=2).clamp_min(1)
    u = student_logits
    if method == "mf-lf":
        with torch.no_grad():
            c = (mask * (logits - u[:, None, :])).sum(dim=2) / count
        return ((mask * (logits - u[:, None, :] - c[:, :, None])) ** 2).sum() / batch
    if method == "mf-lu":
        with torch.no_grad():
            u_mean = (mask * u[:, None, :]).sum(dim=2) / count
            z_mean = (mask * logits).sum(dim=2) / count
            centred = mask * (u[:, None, :] - u_mean[:, :, None])
            v = ((centred * (logits - z_mean[:, :, None])).sum(dim=2)
                 / ((centred ** 2).sum(dim=2) + regularisation)).clamp_min(0)
            c = z_mean - v * u_mean
        residual = mask * (logits - u[:, None, :] * v[:, :, None] - c[:, :, None])
        return ((residual ** 2).sum() + regularisation * ((u ** 2).sum() + (v ** 2).sum())) / batch
    raise CompositionError(f"--backprop supports {', '.join(BACKPROP_METHODS)}, not '{method}'")
