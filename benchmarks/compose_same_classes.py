"""Model Composition, classification scenario 1 (BMVC 2021 §4.3) at small scale, offline.

Per seed: digits32 (downsampled to --size); 3 LeNet teachers, each trained on a third of the
training images (same 10 classes); the student (LeNet) is trained on the whole training set
*without labels* from the teachers' pseudo-labels. Compared: supervised training on the union of
the teachers' labelled data, plain distillation (mean of the teachers' soft labels, no filtering,
no aggregation), and composition with entropy filtering + consensus voting (the paper's
pipeline), with and without least-entropy selection. Every model trains for 20 epochs (as in
benchmarks/uhc.py); with 8 teacher / 6 student epochs all of them were still undertrained.
Prints mean ± std test accuracy (%) and, as ``<variant>_kept``, the percentage of the unlabeled
pool (the training images) each pseudo-labelling variant kept for its student: not an accuracy
(the per-seed lines give both as fractions).

    python benchmarks/compose_same_classes.py --seeds 3
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from neuralmerge.compose.labels import make_pseudo_labels
from neuralmerge.errors import NeuralMergeError
from neuralmerge.compose.student import train_student
from neuralmerge.zoo.architectures import LeNet
from neuralmerge.zoo.datasets import digits32
from neuralmerge.zoo.train import evaluate, predict_logits, train_classifier

from _cli import number, non_negative_int, positive_int  # benchmarks/_cli.py, beside this script


def shrink(x: np.ndarray, size: int) -> np.ndarray:
    return F.adaptive_avg_pool2d(torch.from_numpy(x), size).numpy() if x.shape[-1] != size else x


def trial(seed: int, args: argparse.Namespace) -> dict[str, float]:
    data = digits32(seed=seed, augment=args.augment)
    x, x_test = shrink(data.x_train, args.size), shrink(data.x_test, args.size)
    originals = len(x) // (args.augment + 1)
    third = (np.arange(len(x)) % originals) % 3              # an image and its copies go to one teacher
    logits, scores = [], {}
    for i in range(3):
        rows = np.flatnonzero(third == i)
        torch.manual_seed(seed * 10 + i)
        teacher = train_classifier(LeNet(10, 1, args.size), x[rows], data.y_train[rows], epochs=args.teacher_epochs,
                                   batch_size=32, seed=seed, quiet=True)
        scores[f"teacher{i}"] = evaluate(teacher, x_test, data.y_test)
        logits.append(predict_logits(teacher, x))
    supports = [np.arange(10)] * 3

    torch.manual_seed(seed)
    supervised = train_classifier(LeNet(10, 1, args.size), x, data.y_train, epochs=args.epochs, batch_size=64,
                                  seed=seed, quiet=True)
    scores["supervised"] = evaluate(supervised, x_test, data.y_test)
    variants = {
        "distillation": dict(method="sd"),
        "ours": dict(method="vote", strategy="consensus", tau=args.tau),
        "ours+select": dict(method="vote", strategy="consensus", tau=args.tau, select="least-entropy"),
    }
    for name, settings in variants.items():
        labels = make_pseudo_labels(logits, supports, 10, **settings)
        torch.manual_seed(seed)
        student = LeNet(10, 1, args.size)
        train_student(student, x[labels.keep], labels, epochs=args.epochs, batch_size=64, seed=seed, progress=False)
        scores[name] = evaluate(student, x_test, data.y_test)
        scores[f"{name}_kept"] = labels.stats["kept"] / len(x)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=positive_int, default=3)
    parser.add_argument("--size", type=number(int, 4), default=16)  # LeNet pools twice by 2
    parser.add_argument("--augment", type=non_negative_int, default=1)
    parser.add_argument("--teacher-epochs", type=positive_int, default=20)
    parser.add_argument("--epochs", type=positive_int, default=20)
    parser.add_argument("--tau", type=number(float, 0, 1), default=0.3, help="normalised-entropy threshold")
    args = parser.parse_args()
    torch.set_num_threads(1)  # shared machine
    start = time.time()
    results = []
    for seed in range(args.seeds):
        try:
            results.append(trial(seed, args))
        except NeuralMergeError as exc:  # e.g. a --tau that filters out every sample of a seed
            sys.exit(f"error: seed {seed}: {exc}")
        print(f"seed {seed}: " + "  ".join(f"{k} {v:.3f}" for k, v in results[-1].items()), flush=True)
    print(f"\n{args.seeds} seeds, digits32 at {args.size}x{args.size}, tau {args.tau}, {time.time() - start:.0f} s")
    for name in results[0]:
        values = np.array([r[name] for r in results])
        kept = "   % of the unlabeled pool kept, not an accuracy" if name.endswith("_kept") else ""
        print(f"  {name:<18} {100 * values.mean():5.1f} ± {100 * values.std():4.1f}{kept}")


if __name__ == "__main__":
    main()
