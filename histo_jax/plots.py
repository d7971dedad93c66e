"""The pictures users look at (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def training_curves(history: Sequence[dict], path: str) -> str:
    """Loss (train, validation) and validation macro-F1 per epoch; the best epoch marked."""
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train (weighted CE)")
    a.plot(ep, [h["val_loss"] for h in history], "s-", label="validation (weighted CE)")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.set_title("Loss"), a.legend(), a.grid(alpha=.3)
    f1 = [h["val_macro_f1"] for h in history]
    b.plot(ep, f1, "o-", color="tab:green", label="validation macro-F1")
    if f1:
        best = int(np.argmax(f1))
        b.axvline(ep[best], color="gray", ls="--", label=f"best epoch {ep[best]} ({f1[best]:.3f})")
    b.set_ylim(0, 1.02), b.set_xlabel("epoch"), b.set_title("Validation macro-F1")
    b.legend(loc="lower right"), b.grid(alpha=.3)
    return _save(fig, path)


def confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: str,
                     title: str = "Test confusion matrix") -> str:
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    rows = cm.sum(1, keepdims=True).clip(min=1)
    ax.imshow(cm / rows, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            frac = cm[i, j] / rows[i, 0]
            ax.text(j, i, f"{cm[i, j]}\n({frac:.0%})", ha="center", va="center",
                    color="white" if frac > 0.5 else "black")
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted"), ax.set_ylabel("true"), ax.set_title(title)
    return _save(fig, path)


def roc_curve(labels: np.ndarray, scores: np.ndarray, path: str, title: str = "Test ROC") -> str:
    fpr, tpr, _ = skm.roc_curve(labels, scores)
    auc = skm.auc(fpr, tpr)
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot(fpr, tpr, lw=2, label=f"AUROC = {auc:.3f}")
    ax.plot([0, 1], [0, 1], "--", color="gray", lw=1)
    ax.set_xlabel("false positive rate"), ax.set_ylabel("true positive rate")
    ax.set_title(title), ax.legend(loc="lower right"), ax.grid(alpha=.3)
    ax.set_xlim(0, 1), ax.set_ylim(0, 1.01)
    return _save(fig, path)


def f1_vs_scales(rows: Sequence[dict], path: str) -> str:
    """Mean test macro-F1 against the number of scales, error bars = standard deviation."""
    n = [r["num_inputs"] for r in rows]
    fig, ax = plt.subplots(figsize=(4.8, 3.8))
    ax.errorbar(n, [r["mean_test_f1"] for r in rows], yerr=[r["std_test_f1"] for r in rows],
                fmt="o-", capsize=5, lw=2)
    for r in rows:
        ax.annotate(f"{r['mean_test_f1']:.3f} (n={r['n_runs']})", (r["num_inputs"], r["mean_test_f1"]),
                    textcoords="offset points", xytext=(6, 6), fontsize=8)
    lo = min(r["mean_test_f1"] - r["std_test_f1"] for r in rows)
    ax.set_ylim(max(0.0, min(0.5, lo - 0.05)), 1.0)
    ax.set_xticks(sorted(set(n)))
    ax.set_xlabel("number of scales (inputs)"), ax.set_ylabel("test macro-F1")
    ax.set_title("Test macro-F1 vs number of scales"), ax.grid(alpha=.3)
    return _save(fig, path)


def attention_panel(images: np.ndarray, attention: np.ndarray, scales: Sequence[str], path: str,
                    title: str = "") -> str:
    """The N crops of one sample side by side, and the heatmap of each scale's query over the scales.

    ``images``: (N, H, W, 3) uint8 or float in [0, 1]; ``attention``: (N, N), row i = query i.
    """
    n = len(scales)
    fig = plt.figure(figsize=(2.6 * n + 3.8, 3.2))
    grid = fig.add_gridspec(1, n + 1, width_ratios=[1] * n + [1.25], wspace=0.35)
    for i in range(n):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(images[i])
        ax.set_title(f"input {i}: {scales[i]}", fontsize=9)
        ax.axis("off")
    ax = fig.add_subplot(grid[0, n])
    im = ax.imshow(attention, cmap="viridis", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{attention[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if attention[i, j] < 0.6 else "black")
    short = [s.replace("high_mag_", "") for s in scales]
    ax.set_xticks(range(n), short, fontsize=8), ax.set_yticks(range(n), short, fontsize=8)
    ax.set_xlabel("key (attended scale)"), ax.set_ylabel("query scale")
    ax.set_title("attention", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
