"""Compose three classifiers that each know a few digits into one student for all of them.

    python examples/compose_teachers.py [--epochs 20] [--out composed]

Teachers are black boxes: two ONNX files (run through onnxruntime) and one plain Python function
returning logits. Each is trained here on five of scikit-learn's digit classes (overlapping sets). The student learns from their predictions on an unlabeled pool (UHC's `ce`
soft labels, balanced) and is written as ONNX with its class names in the metadata; its accuracy
on held-out digits is printed beside the same student trained on all teachers' labelled data.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from neuralmerge.compose import compose
from neuralmerge.compose.student import build_student, read_classes
from neuralmerge.compose.teachers import Teacher
from neuralmerge.zoo.train import export_onnx, onnx_accuracy, predict_logits, train_classifier

TEACHER_CLASSES = ([0, 1, 2, 3, 4], [3, 4, 5, 6, 7], [6, 7, 8, 9, 0])


def small_cnn(classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(16 * 4 * 4, classes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="student epochs")
    parser.add_argument("--out", type=Path, default=Path("composed"), help="folder for the teachers and the student")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    digits = load_digits()
    x = ((digits.images / 16.0 - 0.3) / 0.4).astype(np.float32)[:, None]  # N×1×8×8
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], digits.target[order]
    test, pool, train = slice(0, 300), slice(300, 1200), slice(1200, None)

    teachers, class_lists, labelled = [], [], []
    for i, known in enumerate(TEACHER_CLASSES):
        rows = np.flatnonzero(np.isin(y[train], known))  # every training sample of the teacher's classes
        torch.manual_seed(i)
        targets = np.array([known.index(c) for c in y[train][rows]])  # output k of teacher i is known[k]
        model = train_classifier(small_cnn(len(known)), x[train][rows], targets, epochs=30, batch_size=32,
                                 quiet=True)
        names = [f"digit{c}" for c in known]
        if i < 2:  # an ONNX file, as it would arrive from elsewhere
            teachers.append(str(export_onnx(model, args.out / f"teacher{i}.onnx", (1, 8, 8))))
        else:  # any function from a float32 batch to logits; a cache_key lets compose cache its outputs
            teachers.append(Teacher(lambda batch, m=model: predict_logits(m, batch), "python-teacher"))
        class_lists.append(names)
        labelled.append((x[train][rows], [f"digit{c}" for c in y[train][rows]]))

    result = compose(teachers, class_lists, x[pool], method="ce", balance=True, student="lenet",
                     epochs=args.epochs, output=args.out / "student.onnx", force=True, seed=0, progress=False)
    classes = read_classes(args.out / "student.onnx")
    digit_of = np.array([int(name.removeprefix("digit")) for name in classes])
    print(f"student classes (union, first appearance): {', '.join(classes)}")
    print(f"pseudo-labelled {result.report['labels']['kept']} of {len(x[pool])} unlabeled samples")

    # The reference: the same student trained on the labelled data the teachers had (which compose never sees).
    lx = np.concatenate([a for a, _ in labelled])
    ly = np.array([classes.index(name) for _, names in labelled for name in names])
    torch.manual_seed(0)
    supervised = build_student("lenet", classes, (1, 8, 8), seed=0).model
    train_classifier(supervised, lx, ly, epochs=args.epochs, batch_size=64, quiet=True)
    supervised_accuracy = float((digit_of[predict_logits(supervised, x[test]).argmax(1)] == y[test]).mean())

    composed_accuracy = onnx_accuracy(args.out / "student.onnx", x[test], _index_of(digit_of, y[test]))
    print(f"test accuracy: composed from unlabeled data {100 * composed_accuracy:.1f}%, "
          f"supervised on the teachers' labels {100 * supervised_accuracy:.1f}%")
    print(f"wrote {args.out / 'student.onnx'}")


def _index_of(digit_of: np.ndarray, digits: np.ndarray) -> np.ndarray:
    """Student output index of each digit."""
    return np.array([int(np.flatnonzero(digit_of == d)[0]) for d in digits])


if __name__ == "__main__":
    main()
