"""Prediction on a new folder from a trained run: CSV columns and values, metrics, pictures."""

import csv
import json
import os
import shutil

import numpy as np
import pytest

from histo_jax import predict
from histo_jax.metrics import softmax


@pytest.fixture(scope="module")
def loaded(trained_run):
    return predict.load_run(trained_run["workdir"])


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_labelled_folder_matches_training_evaluation(trained_run, loaded, tmp_path):
    config, model = loaded
    out = str(tmp_path / "pred")
    summary = predict.predict_folder(config, model, trained_run["config"].data.dir, out, panels=2)
    rows = _rows(os.path.join(out, "predictions.csv"))
    assert len(rows) == 36 == summary["num_samples"]
    scales = ["high_mag_1024", "high_mag_2048"]
    expected_cols = (["filename", "num_id", "label", "predicted", "predicted_label", "prob_normal",
                      "prob_tumour"] + [f"attn_{a}_to_{b}" for a in scales for b in scales])
    assert list(rows[0]) == expected_cols
    for r in rows:
        assert r["num_id"] == r["filename"].split("_")[0]
        p = np.array([float(r["prob_normal"]), float(r["prob_tumour"])])
        np.testing.assert_allclose(p.sum(), 1.0, atol=1e-5)
        assert r["predicted"] == ["normal", "tumour"][int(p.argmax())] and int(r["predicted_label"]) == p.argmax()
        attn = np.array([float(r[f"attn_{a}_to_{b}"]) for a in scales for b in scales]).reshape(2, 2)
        np.testing.assert_allclose(attn.sum(1), 1.0, atol=1e-5)  # each query's weights sum to 1
    # The test split's probabilities equal those the trainer wrote for the same weights.
    test_rows = {r["filename"]: r for r in _rows(os.path.join(trained_run["workdir"], "test_predictions.csv"))}
    by_name = {r["filename"]: r for r in rows}
    for name, r in test_rows.items():
        np.testing.assert_allclose(float(by_name[name]["prob_tumour"]), float(r["prob_tumour"]), atol=1e-5)
    assert set(summary["metrics"]) >= {"macro_f1", "accuracy", "auroc", "confusion_matrix"}
    for pic in ["confusion_matrix.png", "roc_curve.png"] + [os.path.relpath(p, out) for p in summary["panels"]]:
        assert os.path.getsize(os.path.join(out, pic)) > 1000, pic
    assert len(summary["panels"]) == 2


def test_predict_without_labels_and_with_tta(trained_run, loaded, tmp_path):
    config, model = loaded
    data = tmp_path / "unlabelled"
    shutil.copytree(trained_run["config"].data.dir, data)
    os.remove(data / "labels.csv")
    # A sample missing from one used scale folder is not predictable: it is reported, not guessed.
    names = sorted(os.listdir(data / "high_mag_1024"))
    os.remove(data / "high_mag_2048" / names[0])
    with pytest.raises(ValueError, match=names[0].removesuffix(".png")):
        predict.predict_folder(config, model, str(data), str(tmp_path / "p0"))
    os.remove(data / "high_mag_1024" / names[0])
    out = str(tmp_path / "p1")
    summary = predict.predict_folder(config, model, str(data), out, tta=True, panels=[names[1][:-4]])
    rows = _rows(os.path.join(out, "predictions.csv"))
    assert len(rows) == 35 and "label" not in rows[0] and "metrics" not in summary
    assert summary["tta"] and os.path.getsize(summary["panels"][0]) > 1000
    assert not os.path.exists(os.path.join(out, "confusion_matrix.png"))


def test_load_run_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        predict.load_run(str(tmp_path))


def test_softmax_is_stable():
    p = softmax(np.array([[1000.0, 0.0], [0.0, 0.0]]))
    np.testing.assert_allclose(p, [[1.0, 0.0], [0.5, 0.5]])
