"""Classification metrics (scikit-learn) and the run's scalar writer (JSON lines + TensorBoard)."""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
from sklearn import metrics as skm

# Imported here, at import time in the main thread, not when a writer is made: while another
# thread (Orbax, Grain, TFDS) is inside etils' `epy.lazy_imports()`, which patches the global
# `__import__`, an import made in this thread returns an unresolved LazyModule (seen once as
# "'LazyModule' object is not callable" on a resume).
try:
    from tensorboardX import SummaryWriter
except ImportError:  # TensorBoard files are optional; the JSON lines are not.
    SummaryWriter = None


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def classification_metrics(labels: np.ndarray, logits: np.ndarray, num_classes: int) -> dict:
    """Macro-F1 (the study's metric), accuracy, balanced accuracy, AUROC, confusion matrix."""
    labels = np.asarray(labels)
    probs = softmax(np.asarray(logits, np.float64))
    preds = probs.argmax(-1)
    classes = list(range(num_classes))
    out = {
        "macro_f1": float(skm.f1_score(labels, preds, average="macro", labels=classes, zero_division=0)),
        "accuracy": float(skm.accuracy_score(labels, preds)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(labels, preds)) if len(set(labels)) > 1 else float("nan"),
        "confusion_matrix": skm.confusion_matrix(labels, preds, labels=classes).tolist(),
        "num_samples": int(len(labels)),
    }
    present = np.unique(labels)
    if len(present) < 2:
        out["auroc"] = float("nan")
    elif num_classes == 2:
        out["auroc"] = float(skm.roc_auc_score(labels, probs[:, 1]))
    else:
        out["auroc"] = float(skm.roc_auc_score(labels, probs, multi_class="ovr", labels=classes))
    return out


class MetricWriter:
    """Writes scalars to ``<workdir>/metrics.jsonl`` and TensorBoard event files (primary process only)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
        if SummaryWriter is not None:
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict, **fields) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "time": time.time(), **fields}
        for k, v in scalars.items():
            v = float(v)
            row[k] = v if math.isfinite(v) else str(v)
            if self._tb is not None:
                self._tb.add_scalar(k, v, int(step))
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
