"""The original project's training procedure in PyTorch, for end-to-end timing.

Torch-only (torch, torchvision, Pillow, numpy; no JAX, no histo_jax imports). It runs
``--epochs`` epochs the way the original does (docs/reference.md §1, §2 and §4):

* a Dataset that decodes each sample's full-size PNG crops on every access, resizes them
  to 224 (bilinear, antialiased), scales to [0, 1] and, in training, applies the per-input
  torchvision augmentation (flips, rotation, ColorJitter, GaussianBlur, RandomErasing, clamp);
* a ``DataLoader`` with ``--workers`` worker processes and a ``WeightedRandomSampler``
  (balanced class weights, with replacement, one epoch = len(train) draws);
* the reference model and step (``reference/torch_model.py``: weighted CE, clip 1.0, Adam,
  OneCycle);
* after each epoch, validation macro-F1, keeping the best weights; at the end, the test
  macro-F1 of the best weights.

The splits come from a histo_jax run's ``splits.json``, so both sides train, validate and
test on the same samples. One JSON line with phase timings and results goes to stdout.

    python benchmarks/torch_original.py --data_dir DIR --splits RUN/splits.json [--inputs 4]
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import pathlib
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from reference import torch_model  # noqa: E402

SCALES = ("high_mag_1024", "high_mag_2048", "high_mag_512", "high_mag_256")
JITTER = ((0.3, 0.3, 0.3, 0.1), (0.4, 0.4, 0.4, 0.2), (0.35, 0.35, 0.35, 0.15),
          (0.38, 0.38, 0.38, 0.18))
ERASING = (0.3, 0.4, 0.35, 0.38)


class OriginalDataset(torch.utils.data.Dataset):
    """Decodes and resizes every crop on each access; augments per input in training."""

    def __init__(self, data_dir: str, filenames: list[str], labels: list[int], num_inputs: int,
                 train: bool, size: int = 224):
        tv = torch_model.import_torchvision()
        T = tv.transforms
        self.data_dir, self.filenames, self.labels = data_dir, filenames, labels
        self.scales, self.size, self.train = SCALES[:num_inputs], size, train
        self.resize = T.Resize((size, size), antialias=True)
        self.to_tensor = T.ToTensor()
        self.augment = [T.Compose([
            T.RandomHorizontalFlip(), T.RandomVerticalFlip(), T.RandomRotation(15),
            T.ColorJitter(*JITTER[i]), T.GaussianBlur(3, sigma=(0.1, 2.0)),
            T.RandomErasing(p=ERASING[i], scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0),
        ]) for i in range(num_inputs)]

    def __len__(self) -> int:
        return len(self.filenames)

    def __getitem__(self, i: int):
        crops = []
        for k, scale in enumerate(self.scales):
            # labels.csv names samples without the extension (docs/reference.md §1).
            with Image.open(os.path.join(self.data_dir, scale, self.filenames[i] + ".png")) as im:
                x = self.resize(self.to_tensor(im.convert("RGB")))
            if self.train:
                x = torch.clamp(self.augment[k](x), 0.0, 1.0)
            crops.append(x)
        return torch.stack(crops), self.labels[i]


def macro_f1(labels: np.ndarray, preds: np.ndarray, num_classes: int = 2) -> float:
    f1s = []
    for c in range(num_classes):
        tp = np.sum((preds == c) & (labels == c))
        fp = np.sum((preds == c) & (labels != c))
        fn = np.sum((preds != c) & (labels == c))
        f1s.append(2 * tp / max(2 * tp + fp + fn, 1))
    return float(np.mean(f1s))


def evaluate(model, loader) -> float:
    model.eval()
    preds, labels = [], []
    with torch.inference_mode():
        for images, y in loader:
            logits, _ = model(images)
            preds.append(logits.argmax(1).numpy())
            labels.append(y.numpy())
    return macro_f1(np.concatenate(labels), np.concatenate(preds))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--splits", required=True, help="splits.json of a histo_jax run")
    p.add_argument("--inputs", type=int, default=4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--schedule_epochs", type=int, default=0,
                   help="OneCycle length in epochs (default: --epochs, as the histo_jax run)")
    a = p.parse_args()
    t_start = time.perf_counter()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    with open(os.path.join(a.data_dir, "labels.csv"), newline="") as f:
        label_of = {row["filename"]: int(row["label"]) for row in csv.DictReader(f)}
    with open(a.splits) as f:
        splits = json.load(f)

    def dataset(name, train):
        names = splits[name]["filenames"]
        return OriginalDataset(a.data_dir, names, [label_of[n] for n in names], a.inputs, train)

    train_ds, val_ds, test_ds = dataset("train", True), dataset("val", False), dataset("test", False)
    counts = np.bincount(train_ds.labels, minlength=2)
    class_w = len(train_ds) / (2 * counts)
    sampler = torch.utils.data.WeightedRandomSampler(
        [float(class_w[y]) for y in train_ds.labels], num_samples=len(train_ds), replacement=True)
    loader_kw = dict(batch_size=a.batch, num_workers=a.workers, persistent_workers=a.workers > 0)
    train_loader = torch.utils.data.DataLoader(train_ds, sampler=sampler, **loader_kw)
    val_loader = torch.utils.data.DataLoader(val_ds, shuffle=False, **loader_kw)
    test_loader = torch.utils.data.DataLoader(test_ds, shuffle=False, **loader_kw)

    model = torch_model.MultiInputModule(a.inputs)
    steps_per_epoch = len(train_loader)
    step = torch_model.make_train_step(
        model, torch.tensor(class_w, dtype=torch.float32),
        (a.schedule_epochs or a.epochs) * steps_per_epoch)
    setup_s = time.perf_counter() - t_start

    best_f1, best_state, epochs = -1.0, None, []
    for epoch in range(a.epochs):
        t0 = time.perf_counter()
        losses = [step(images, labels) for images, labels in train_loader]
        t1 = time.perf_counter()
        val_f1 = evaluate(model, val_loader)
        t2 = time.perf_counter()
        epochs.append({"epoch": epoch + 1, "train_s": round(t1 - t0, 2), "val_s": round(t2 - t1, 2),
                       "train_loss": float(np.mean(losses)), "val_macro_f1": val_f1,
                       "train_samples_per_s": round(len(train_ds) / (t1 - t0), 3)})
        if val_f1 > best_f1:
            best_f1, best_state = val_f1, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    t0 = time.perf_counter()
    test_f1 = evaluate(model, test_loader)
    test_s = time.perf_counter() - t0
    print(json.dumps({
        "framework": "torch", "procedure": "original", "n_inputs": a.inputs,
        "train_samples": len(train_ds), "val_samples": len(val_ds), "test_samples": len(test_ds),
        "steps_per_epoch": steps_per_epoch, "workers": a.workers, "threads": a.threads,
        "torch": torch.__version__, "setup_s": round(setup_s, 2), "epochs": epochs,
        "test_s": round(test_s, 2), "test_macro_f1": test_f1,
        "total_s": round(time.perf_counter() - t_start, 2)}), flush=True)


if __name__ == "__main__":
    main()
