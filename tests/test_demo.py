"""Tests of histo_jax.data.demo: layout, nesting, determinism, labels."""
import csv
import os

import numpy as np
import pytest
from PIL import Image

from histo_jax.data import demo

SIZES = (256, 512, 1024, 2048)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    summary = demo.write_demo_dataset(out, seed=3, num_ids=2, samples_per_id=2, num_processes=1)
    return out, summary


def _load(out, size, name):
    return np.asarray(Image.open(os.path.join(out, f"high_mag_{size}", name + ".png")).convert("RGB"))


def test_layout_and_labels(demo_dir):
    out, summary = demo_dir
    assert summary["num_samples"] == 4 and summary["class_counts"] == {"normal": 2, "tumour": 2}
    assert sorted(os.listdir(out)) == ["high_mag_1024", "high_mag_2048", "high_mag_256", "high_mag_512",
                                       "labels.csv"]
    with open(os.path.join(out, "labels.csv")) as f:
        rows = list(csv.DictReader(f))
    names = [r["filename"] for r in rows]
    for size in SIZES:
        assert sorted(os.listdir(os.path.join(out, f"high_mag_{size}"))) == sorted(n + ".png" for n in names)
    for row in rows:
        num_id, k, token = row["filename"].split("_")
        assert num_id.isdigit() and k.isdigit()
        assert row["label"] == ("0" if token == "normal" else "1")
        assert token == "normal" or token in demo.TUMOUR_TYPES
    by_id = {}
    for row in rows:  # Label is per num_id.
        by_id.setdefault(row["filename"].split("_")[0], set()).add(row["label"])
    assert all(len(v) == 1 for v in by_id.values()) and len(by_id) == 2
    img = _load(out, 2048, names[0])
    assert img.shape == (2048, 2048, 3) and img.dtype == np.uint8
    assert 60 < img.mean() < 240 and img.std() > 10  # Not blank.


def _downsample(img, factor):
    h, w, c = img.shape
    return img.reshape(h // factor, factor, w // factor, factor, c).mean(axis=(1, 3))


def test_crops_are_nested_and_centred(demo_dir):
    out, _ = demo_dir
    name = sorted(os.listdir(os.path.join(out, "high_mag_256")))[0][:-4]
    for small, big in zip(SIZES[:-1], SIZES[1:]):
        centre = _load(out, big, name)[small // 2: small // 2 + small, small // 2: small // 2 + small]
        np.testing.assert_allclose(_downsample(centre, 8), _downsample(_load(out, small, name), 8), atol=1.0)


def test_deterministic_and_seed_dependent(demo_dir, tmp_path):
    out, summary = demo_dir
    again = demo.write_demo_dataset(str(tmp_path / "a"), seed=3, num_ids=2, samples_per_id=2,
                                    sizes=(256,), num_processes=2)
    assert again["cues"] == summary["cues"]
    assert all(tuple(v.values()) == demo.sample_cues(3, i, int(n.split("_")[2] != "normal"))
               for i, (n, v) in enumerate(summary["cues"].items()))
    for name in sorted(os.listdir(os.path.join(out, "high_mag_256"))):
        with open(os.path.join(out, "high_mag_256", name), "rb") as f1, \
                open(tmp_path / "a" / "high_mag_256" / name, "rb") as f2:
            assert f1.read() == f2.read()
    other = demo.write_demo_dataset(str(tmp_path / "b"), seed=4, num_ids=2, samples_per_id=2,
                                    sizes=(256,), num_processes=1)
    first = sorted(os.listdir(tmp_path / "b" / "high_mag_256"))[0][:-4]
    assert other["num_samples"] == 4
    if os.path.exists(os.path.join(out, "high_mag_256", first + ".png")):
        assert not np.array_equal(_load(out, 256, first), _load(str(tmp_path / "b"), 256, first))


def test_refuses_existing_dataset(demo_dir):
    out, _ = demo_dir
    with pytest.raises(FileExistsError, match="labels.csv"):
        demo.write_demo_dataset(out, num_ids=2, samples_per_id=1)


def test_cues_follow_class_probabilities():
    """Cue flags: tumour samples show each cue far more often than normal samples."""
    plan = demo.demo_plan(0, 40, 6)
    rates = {0: [], 1: []}
    for i, (_, label, _) in enumerate(plan):
        rates[label].append(demo.sample_cues(0, i, label))
    tumour, normal = np.mean(rates[1], axis=0), np.mean(rates[0], axis=0)
    assert np.all(tumour > 0.45) and np.all(normal < 0.2)
