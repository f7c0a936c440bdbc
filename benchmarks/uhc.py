"""UHC with random class subsets (Vongkulbhisal et al. 2019, Table 2 protocol, small and offline).

Per seed: digits32 (downsampled to --size), a random union L_U of --union digits (the others stay
unknown to every teacher), --teachers-min..--teachers-max LeNet teachers each knowing 2–5 random
classes of L_U and trained on disjoint samples; an unlabeled pool of other images from all 10
digits (so it also holds classes no teacher knows). Students (LeNet) are trained by every method
on the pool and tested on the test images of L_U; SPV is the same student trained supervised on
all teachers' labelled data. As in the paper, every model (teachers, students, SPV) trains for 20
epochs: with 8 teacher epochs the undertrained teachers cost `ce`'s pseudo-labels 3.5 points (seed 0).
Prints mean ± std accuracy over seeds.

    python benchmarks/uhc.py --seeds 5
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from neuralmerge.compose.labels import make_pseudo_labels
from neuralmerge.compose.student import train_student
from neuralmerge.zoo.architectures import LeNet
from neuralmerge.zoo.datasets import digits32
from neuralmerge.zoo.train import evaluate, predict_logits, train_classifier

from _cli import non_negative_int, number, positive_int  # benchmarks/_cli.py, beside this script

# (name, method, balance, backprop)
METHODS = [("sd", "sd", False, False), ("sd-bs", "sd", True, False), ("ce", "ce", False, False),
           ("ce-bs", "ce", True, False), ("mf-p", "mf-p", False, False), ("mf-lf", "mf-lf", False, False),
           ("mf-lf-bs", "mf-lf", True, False), ("ce-bp", "ce", False, True), ("mf-lf-bp", "mf-lf", False, True)]


def shrink(x: np.ndarray, size: int) -> np.ndarray:
    return F.adaptive_avg_pool2d(torch.from_numpy(x), size).numpy() if x.shape[-1] != size else x


def trial(seed: int, args: argparse.Namespace) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    data = digits32(seed=seed, augment=args.augment)
    x_train, x_test = shrink(data.x_train, args.size), shrink(data.x_test, args.size)
    originals = len(x_train) // (args.augment + 1)           # augmented copies follow the originals
    origin = np.arange(len(x_train)) % originals
    union = np.sort(rng.choice(10, args.union, replace=False))
    count = int(rng.integers(args.teachers_min, args.teachers_max + 1))
    while True:  # every class of L_U must be known to some teacher
        known = [np.sort(rng.choice(union, int(rng.integers(2, 6)), replace=False)) for _ in range(count)]
        if set(np.concatenate(known)) == set(union):
            break
    # half of the original images (with their copies) go to the teachers, split disjointly; half to the pool
    shuffled = rng.permutation(originals)
    teacher_part, pool_part = shuffled[: originals // 2], shuffled[originals // 2:]
    owner = np.full(originals, -1)
    for c in union:
        rows = teacher_part[data.y_train[teacher_part] == c]
        holders = [i for i, k in enumerate(known) if c in k]
        owner[rows] = np.array(holders)[np.arange(len(rows)) % len(holders)]
    pool = np.isin(origin, pool_part)

    logits, supports, spv_x, spv_y = [], [], [], []
    for i, classes in enumerate(known):
        rows = np.flatnonzero(owner[origin] == i)
        torch.manual_seed(seed * 100 + i)
        teacher = train_classifier(LeNet(len(classes), 1, args.size), x_train[rows],
                                   np.searchsorted(classes, data.y_train[rows]), epochs=args.teacher_epochs,
                                   batch_size=32, seed=seed, quiet=True)
        logits.append(predict_logits(teacher, x_train[pool]))
        supports.append(np.searchsorted(union, classes))
        spv_x.append(x_train[rows])
        spv_y.append(np.searchsorted(union, data.y_train[rows]))
    test = np.isin(data.y_test, union)
    x_eval, y_eval = x_test[test], np.searchsorted(union, data.y_test[test])

    torch.manual_seed(seed)
    spv = train_classifier(LeNet(len(union), 1, args.size), np.concatenate(spv_x), np.concatenate(spv_y),
                           epochs=args.epochs, batch_size=64, seed=seed, quiet=True)
    scores = {"spv": evaluate(spv, x_eval, y_eval)}
    for name, method, balance, backprop in METHODS:
        labels = make_pseudo_labels(logits, supports, len(union), method=method, temperature=args.temperature,
                                    balance=balance)
        torch.manual_seed(seed)
        student = LeNet(len(union), 1, args.size)
        train_student(student, x_train[pool][labels.keep], labels, epochs=args.epochs, batch_size=64,
                      backprop=method if backprop else None, seed=seed, progress=False)
        scores[name] = evaluate(student, x_eval, y_eval)
    return {**scores, "teachers": count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=positive_int, default=5)
    parser.add_argument("--union", type=number(int, 5, 10), default=7)  # a teacher may know 5 classes of it
    parser.add_argument("--teachers-min", type=positive_int, default=5)
    parser.add_argument("--teachers-max", type=positive_int, default=10)
    parser.add_argument("--size", type=number(int, 4), default=16)  # LeNet pools twice by 2
    parser.add_argument("--augment", type=non_negative_int, default=1)
    parser.add_argument("--teacher-epochs", type=positive_int, default=20)
    parser.add_argument("--epochs", type=positive_int, default=20)
    parser.add_argument("--temperature", type=number(float, 0, exclusive=True), default=3.0)
    args = parser.parse_args()
    if args.teachers_max < args.teachers_min:
        parser.error("--teachers-max must be >= --teachers-min")
    if 5 * args.teachers_min < args.union:  # teachers know at most 5 classes each: the draw would never end
        parser.error(f"--teachers-min must be >= {-(-args.union // 5)} for --union {args.union}")
    torch.set_num_threads(1)  # shared machine
    start = time.time()
    results = []
    for seed in range(args.seeds):
        results.append(trial(seed, args))
        print(f"seed {seed}: {results[-1]['teachers']} teachers  "
              + "  ".join(f"{k} {v:.3f}" for k, v in results[-1].items() if k != "teachers"), flush=True)
    print(f"\n{args.seeds} seeds, |L_U| = {args.union} of 10 digits, {args.size}x{args.size}, "
          f"T = {args.temperature}, {time.time() - start:.0f} s")
    names = ["spv"] + [m[0] for m in METHODS]
    sd = np.array([r["sd"] for r in results])
    for name in names:
        values = np.array([r[name] for r in results])
        print(f"  {name:<9} {100 * values.mean():5.1f} ± {100 * values.std():4.1f}"
              + (f"   vs sd {100 * (values - sd).mean():+5.1f}" if name != "sd" else ""))


if __name__ == "__main__":
    main()
