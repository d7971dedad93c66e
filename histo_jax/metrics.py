"""Classification metrics (scikit-learn) and the run's scalar writer (JSON lines + TensorBoard)."""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import socket
import struct
import time

import numpy as np
from sklearn import metrics as skm

from histo_jax import errors

# TensorBoard event files are written here, synchronously, in the calling thread: with
# tensorboardX's SummaryWriter a full disk surfaced in its writer thread as a foreign
# traceback and a lost event, never as an error of the run. Only its protos and CRC are
# used; they are imported here, at import time, not when a writer is made (see
# tests/test_threads.py: imports made while another thread is inside etils' lazy imports).
try:
    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto import event_pb2, summary_pb2
except ImportError:  # TensorBoard files are optional; the JSON lines are not.
    event_pb2 = None


def _masked_crc(data: bytes) -> int:
    x = crc32c(data) & 0xFFFFFFFF
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class EventFile:
    """One TensorBoard event file (TFRecord of ``Event`` protos), written in the caller's
    thread; every ``flush`` reaches the OS, so a write error raises here."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self._f = open(self.path, "ab")
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def add_scalar(self, tag: str, value: float, step: int, walltime: float) -> None:
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag,
                                                                       simple_value=value)])
        self._write(event_pb2.Event(wall_time=walltime, step=step, summary=summary))

    def _write(self, event) -> None:
        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self._f.write(header + struct.pack("<I", _masked_crc(header)) + data
                      + struct.pack("<I", _masked_crc(data)))

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()


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


ROW_FIELDS = ("step", "time", "epoch")  # the non-scalar keys of a metrics.jsonl row


class MetricWriter:
    """Writes scalars to ``<workdir>/metrics.jsonl`` and TensorBoard event files (primary
    process only).

    ``metrics.jsonl`` is the record: a resumed run cuts it back to its checkpoint first.
    The TensorBoard files are rebuilt from it when the writer opens (the folder is replaced
    by a replay of the rows), so that after any number of kills and resumes they hold each
    step once, as the log does, with the rows' own wall times.
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        rows = _read_rows_tolerantly(path)
        self._jsonl = open(path, "a", encoding="utf-8")
        if event_pb2 is not None:
            tb_dir = os.path.join(workdir, "tensorboard")
            with writing_events(tb_dir):
                shutil.rmtree(tb_dir, ignore_errors=True)
                self._tb = EventFile(tb_dir)
                for row in rows:
                    for k, v in row.items():
                        if k not in ROW_FIELDS and isinstance(v, (int, float, str)):
                            try:
                                value = float(v)
                            except ValueError:
                                continue
                            self._tb.add_scalar(k, value, int(row["step"]), row["time"])
                self._tb.flush()

    def write(self, step: int, scalars: dict, **fields) -> None:
        if not self.enabled:
            return
        unknown = set(fields) - set(ROW_FIELDS)
        if unknown:
            raise ValueError(f"MetricWriter.write: unknown row fields {sorted(unknown)}; "
                             f"rows carry {ROW_FIELDS} besides scalars.")
        row = {"step": int(step), "time": time.time(), **fields}
        for k, v in scalars.items():
            v = float(v)
            row[k] = v if math.isfinite(v) else str(v)
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:  # after the log row: the record is metrics.jsonl
            with writing_events(os.path.dirname(self._tb.path)):
                for k in scalars:
                    self._tb.add_scalar(k, float(row[k]), int(step), row["time"])
                self._tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._tb is not None:
            with writing_events(os.path.dirname(self._tb.path)):
                self._tb.close()


def writing_events(tb_dir: str):
    """A failed TensorBoard write -> WriteFailedError saying that metrics.jsonl has every
    row and the event files are rebuilt from it."""
    return errors.writing("the TensorBoard events", tb_dir,
                   kept="metrics.jsonl holds every logged row; the TensorBoard files are "
                        "rebuilt from it when the run resumes.")


def _read_rows_tolerantly(path: str) -> list[dict]:
    """The rows of a metrics log to replay into TensorBoard; a line that is not a complete
    row (a write cut short) is left out rather than stopping the run."""
    rows = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and "step" in row and "time" in row:
                    rows.append(row)
    return rows


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_tensorboard_scalars(logdir: str) -> list[tuple[str, int, float]]:
    """Every scalar of the TensorBoard event files in ``logdir``, as (tag, step, value), in
    file and write order (TFRecord framing read directly; needs only tensorboardX's protos)."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            record = data[pos + 12:pos + 12 + length]  # skip the length's CRC
            pos += 12 + length + 4                     # and the record's
            if len(record) < length:
                break  # a record cut short by a kill
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                out.append((value.tag, int(event.step), float(value.simple_value)))
    return out
