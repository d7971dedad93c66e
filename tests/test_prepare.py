"""Prepared TFDS ArrayRecord dataset: round trip, reuse, rebuild, skip, sources."""
import os
import pickle

import numpy as np
import pytest
from PIL import Image

import datagen
from histo_jax.data import layout, prepare, sources


@pytest.fixture()
def data_dir(tmp_path):
    root = str(tmp_path / "data")
    datagen.write_valid_dataset(root, num_ids=10, per_id=2)
    return root


def _cfg(data_dir, tmp_path, **kw):
    return datagen.tiny_data_config(data_dir, prepared_dir=str(tmp_path / "prepared"), **kw)


def _direct(data_dir, scales, name, size):
    out = []
    for scale in scales:
        with Image.open(os.path.join(data_dir, scale, name + ".png")) as im:
            out.append(np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR,
                                                           reducing_gap=None)))
    return np.stack(out)


def test_round_trip_reuse_and_rebuild(data_dir, tmp_path, capfd):
    cfg = _cfg(data_dir, tmp_path)
    logs = []
    src = sources.load_dataset(cfg, log=logs.append)
    # Nothing is downloaded: TFDS's "Downloading and preparing dataset" line is not printed.
    out = capfd.readouterr()
    assert "Downloading" not in out.out + out.err and "downloaded" not in out.out + out.err
    assert isinstance(src, sources.PreparedSource) and not src.prepared.reused
    rows = datagen.read_rows(data_dir)
    assert len(src) == 20 and src.filenames == [r[0] for r in rows]
    np.testing.assert_array_equal(src.labels, [int(r[1]) for r in rows])
    assert src.num_ids == [r[0].split("_")[0] for r in rows]
    assert src.scales == tuple(cfg.scales) and src.image_size == 32
    for i in (0, 7, 19):
        rec = src[i]
        assert rec["images"].dtype == np.uint8 and rec["images"].shape == (4, 32, 32, 3)
        np.testing.assert_array_equal(rec["images"],
                                      _direct(data_dir, cfg.scales, src.filenames[i], 32))
        assert rec["label"] == src.labels[i] and rec["index"] == i
        assert rec["label"].dtype == np.int32 and rec["index"].dtype == np.int32
        stored = src.read_record(i)
        assert stored["filename"].decode() == src.filenames[i]
        assert stored["num_id"].decode() == src.num_ids[i]
    batch = src.__getitems__([3, 1])
    assert [int(r["index"]) for r in batch] == [3, 1]
    with pytest.raises(IndexError):
        src[20]

    # Picklable (Grain worker processes) and still readable after unpickling.
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone[5]["images"], src[5]["images"])

    # Unchanged input: reused, no rebuild (marker untouched, log says so).
    meta = os.path.join(src.prepared.path, prepare.META_FILE)
    mtime = os.stat(meta).st_mtime_ns
    logs.clear()
    again = sources.load_dataset(cfg, log=logs.append)
    assert again.prepared.reused and again.prepared.path == src.prepared.path
    assert os.stat(meta).st_mtime_ns == mtime and any("Reusing" in m for m in logs)

    # A changed image (same name): new fingerprint, rebuilt, new content served.
    name = src.filenames[4]
    changed = os.path.join(data_dir, "high_mag_512", name + ".png")
    datagen.random_crop(np.random.default_rng(99), 48).save(changed)
    rebuilt = sources.load_dataset(cfg, log=logs.append)
    assert not rebuilt.prepared.reused and rebuilt.prepared.path != src.prepared.path
    np.testing.assert_array_equal(rebuilt[4]["images"],
                                  _direct(data_dir, cfg.scales, name, 32))
    assert not np.array_equal(rebuilt[4]["images"], src[4]["images"])

    # FolderSource (raw decode + resize every access) serves the same values.
    folder = sources.FolderSource(cfg)
    assert folder.filenames == rebuilt.filenames
    for i in (0, 4, 19):
        np.testing.assert_array_equal(folder[i]["images"], rebuilt[i]["images"])
        assert folder[i]["label"] == rebuilt[i]["label"]


def test_changed_labels_or_config_is_not_reused(data_dir, tmp_path):
    cfg = _cfg(data_dir, tmp_path, scales=("high_mag_256",))
    first = prepare.prepare_dataset(cfg, log=lambda m: None)
    rows = datagen.read_rows(data_dir)
    rows[0][1] = "1" if rows[0][1] == "0" else "0"
    datagen.write_labels_csv(os.path.join(data_dir, "labels.csv"), rows)
    second = prepare.prepare_dataset(cfg, log=lambda m: None)
    assert not second.reused and second.fingerprint != first.fingerprint
    assert second.samples[0].label == int(rows[0][1])
    cfg.image_size = 24
    assert prepare.compute_fingerprint(cfg, data_dir, list(second.samples)) != second.fingerprint


def test_bad_data_is_never_prepared(data_dir, tmp_path):
    expect = datagen.MALFORMED["truncated_image"](data_dir)
    cfg = _cfg(data_dir, tmp_path)
    with pytest.raises(layout.DataValidationError, match=expect.names) as err:
        sources.load_dataset(cfg, log=lambda m: None)
    assert "unreadable_image" in err.value.report.kinds()
    root = tmp_path / "prepared"
    assert not root.exists() or not any(root.glob(f"*/{prepare.META_FILE}"))


def test_skip_excludes_and_lists_bad_samples(data_dir, tmp_path):
    expect = datagen.MALFORMED["grayscale"](data_dir)
    bad = expect.names.split("/")[1][:-4]
    logs = []
    src = sources.load_dataset(_cfg(data_dir, tmp_path, on_bad_sample="skip"), log=logs.append)
    assert len(src) == 19 and bad not in src.filenames
    assert src.prepared.skipped == {bad: ["unsupported_mode"]}
    assert any(bad in m and "SKIPPED" in m for m in logs)


def test_default_prepared_root_honours_env(monkeypatch, tmp_path):
    cfg = datagen.tiny_data_config()
    monkeypatch.setenv("HISTO_JAX_CACHE", str(tmp_path / "hj"))
    assert prepare.prepared_root(cfg) == str(tmp_path / "hj" / "datasets")
    monkeypatch.delenv("HISTO_JAX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert prepare.prepared_root(cfg) == str(tmp_path / "xdg" / "histo_jax" / "datasets")
    cfg.prepared_dir = str(tmp_path / "explicit")
    assert prepare.prepared_root(cfg) == str(tmp_path / "explicit")


def test_folder_source_for_prediction(data_dir, tmp_path):
    os.remove(os.path.join(data_dir, "labels.csv"))
    cfg = _cfg(data_dir, tmp_path, scales=("high_mag_512", "high_mag_256"))
    src = sources.FolderSource(cfg)
    assert len(src) == 20 and set(src.labels.tolist()) == {-1}
    assert src[0]["images"].shape == (2, 32, 32, 3)
    with open(os.path.join(data_dir, "high_mag_256", src.filenames[2] + ".png"), "wb") as f:
        f.write(b"broken")
    with pytest.raises(layout.BadImageError, match=f"high_mag_256/{src.filenames[2]}.png"):
        src[2]
    with pytest.raises(layout.DataValidationError, match="labels.csv"):
        sources.FolderSource(cfg, require_labels=True)


def test_prepare_decodes_each_file_once(data_dir, tmp_path, monkeypatch):
    from histo_jax.data import layout as layout_mod

    calls = []
    original = layout_mod._open_rgb
    monkeypatch.setattr(layout_mod, "_open_rgb", lambda p: calls.append(p) or original(p))
    cfg = _cfg(data_dir, tmp_path)
    src = sources.load_dataset(cfg, log=lambda m: None)
    assert sorted(calls) == sorted(set(calls)) and len(calls) == 20 * 4
    assert not list((tmp_path / "prepared").glob("*/resized.tmp.npy"))
    np.testing.assert_array_equal(src[2]["images"], _direct(data_dir, cfg.scales,
                                                            src.filenames[2], 32))
