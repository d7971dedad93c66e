"""Slide prediction (``python -m histo_jax.predict --slides``) with the tiny trained run:
outputs, equality with predicting the extracted crops, bad slides, the command line."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from histo_jax import predict
from histo_jax.data import __main__ as data_cli
from histo_jax.slides import predict as slides_predict
from histo_jax.slides import synthetic

W, H = 3072, 2048  # the run's fields of view are 1024 and 2048 px (high_mag_1024, high_mag_2048)


@pytest.fixture(scope="module")
def loaded(trained_run):
    return predict.load_run(trained_run["workdir"])


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("pslides")
    img = synthetic.toy_slide(W, H, seed=2)
    synthetic.write_pyramid_tiff(str(root / "A.tiff"), img, 0.25)
    synthetic.write_pyramid_tiff(str(root / "B.tiff"), img[::-1], 0.25)
    data = open(root / "A.tiff", "rb").read()
    (root / "bad.tiff").write_bytes(data[: len(data) // 3])
    ann = root / "ann"
    ann.mkdir()
    ring = [[1536, 200], [2800, 200], [2800, 1900], [1536, 1900], [1536, 200]]
    with open(ann / "A.geojson", "w") as f:
        json.dump({"type": "FeatureCollection", "features": [{
            "type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}}]}, f)
    return root


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_slides_outputs_and_equality_with_extracted_crops(loaded, slides, tmp_path, capsys):
    config, model = loaded
    out = str(tmp_path / "pred")
    summary = slides_predict.predict_slides(
        config, model, [str(slides / "A.tiff"), str(slides / "B.tiff"), str(slides / "bad.tiff")],
        out, stride=256, annotations_dir=str(slides / "ann"), progress=False)
    assert [r["slide"] for r in summary["slides"]] == ["A", "B"]
    assert len(summary["failures"]) == 1 and "bad.tiff" in summary["failures"][0][0]
    assert summary["devices"] == 4 and summary["scales"] == ["high_mag_1024", "high_mag_2048"]
    t = summary["timing"]
    assert t["model_seconds"] > 0 and t["read_seconds_summed_over_threads"] > 0
    scales = ["high_mag_1024", "high_mag_2048"]
    rows = _rows(os.path.join(out, "A", "predictions.csv"))
    assert list(rows[0]) == (["x", "y", "tissue_fraction", "padded", "predicted", "prob_normal", "prob_tumour"]
                             + [f"attn_{a}_to_{b}" for a in scales for b in scales])
    assert len(rows) == summary["slides"][0]["locations"] > 20
    p = np.array([[float(r["prob_normal"]), float(r["prob_tumour"])] for r in rows])
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)
    attn = np.array([[float(r[f"attn_{a}_to_{b}"]) for a in scales for b in scales] for r in rows])
    np.testing.assert_allclose(attn.reshape(-1, 2, 2).sum(2), 1, atol=1e-5)
    a = summary["slides"][0]
    assert a["max_prob"] == pytest.approx(p[:, 1].max(), abs=1e-6)
    assert a["tumour_fraction"] == pytest.approx((p[:, 1] >= 0.5).mean())
    assert 0 < a["annotated_positive"] < len(rows) and 0 <= a["auroc"] <= 1
    assert "auroc" not in summary["slides"][1]  # B has no annotation file: predicted only
    for slide in ("A", "B"):
        for pic in ("heatmap.png", "attention.png"):
            assert os.path.getsize(os.path.join(out, slide, pic)) > 5000
    assert [r["slide"] for r in _rows(os.path.join(out, "slides.csv"))] == ["A", "B"]
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["num_locations"] == len(rows) + summary["slides"][1]["locations"]

    # The same locations extracted as PNGs at the model's size give the same probabilities:
    # reading in memory is the folder pipeline without the files.
    crops = str(tmp_path / "crops")
    assert data_cli.main(["extract", "--slides", str(slides / "A.tiff"), "--out", crops, "--fovs",
                          "1024,2048", "--size", "32", "--border", "pad", "--stride", "256"]) == 0
    capsys.readouterr()
    folder = predict.predict_folder(config, model, crops, str(tmp_path / "fold"), panels=0)
    by_name = {r["filename"]: float(r["prob_tumour"]) for r in _rows(folder["predictions"])}
    assert len(by_name) == len(rows)
    for r in rows:
        assert by_name[f"A_x{r['x']}_y{r['y']}"] == pytest.approx(float(r["prob_tumour"]), abs=1e-5)


def test_predict_slides_command_line(trained_run, slides, tmp_path):
    out = str(tmp_path / "cli")
    proc = subprocess.run(
        [sys.executable, "-m", "histo_jax.predict", f"--run={trained_run['workdir']}",
         f"--slides={slides / 'A.tiff'}", str(slides / "bad.tiff"), f"--out={out}", "--stride=512",
         "--num_workers=2"], capture_output=True, text=True, timeout=300,
        env=dict(os.environ, HISTO_JAX_MALLOC_TUNING="0"))
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text  # one bad slide: reported, non-zero exit, no traceback
    assert "Traceback" not in text and "bad.tiff: unreadable or truncated TIFF" in text
    assert "A: " in proc.stdout and os.path.getsize(os.path.join(out, "A", "heatmap.png")) > 5000


def test_predict_slides_with_an_original_project_checkpoint(slides, tmp_path):
    """``--pytorch=CKPT`` (an original-project checkpoint, full B0) works with ``--slides``:
    the scales are the reference's first N, images in [0, 1], and each location's
    probabilities are the model's on that location's fields read from the slide."""
    from flax import nnx
    from safetensors.numpy import save_file

    from histo_jax.config import get_base_config
    from histo_jax.metrics import softmax
    from histo_jax.models import build_model, convert
    from histo_jax.slides.reader import open_slide

    src = build_model(get_base_config().model, 2, nnx.Rngs(params=5))
    path = str(tmp_path / "multi_input_model.safetensors")
    save_file(convert.export_state_dict(src, "reference"), path)
    del src
    config, model = predict.load_pytorch_run(path, image_size=32)
    out = str(tmp_path / "pt")
    summary = slides_predict.predict_slides(config, model, [str(slides / "A.tiff")], out,
                                            stride=1024, progress=False, pictures_too=False)
    assert summary["scales"] == ["high_mag_1024", "high_mag_2048"] and not summary["failures"]
    rows = _rows(os.path.join(out, "A", "predictions.csv"))
    assert len(rows) == summary["slides"][0]["locations"] >= 2
    model.eval()
    with open_slide(str(slides / "A.tiff")) as s:
        crops = np.stack([[s.read_field(int(r["x"]), int(r["y"]), f, 32) for f in (1024, 2048)]
                          for r in rows[:2]])
    logits, _ = nnx.jit(lambda m, x: m(x))(model, crops.astype(np.float32) / 255.0)
    p = softmax(np.asarray(logits, np.float64))
    np.testing.assert_allclose([float(r["prob_tumour"]) for r in rows[:2]], p[:, 1], atol=1e-5)
