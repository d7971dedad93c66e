"""Validation of the dataset layout: every malformed case is reported with its file."""
import os

import numpy as np
import pytest
from PIL import Image

import datagen
from histo_jax.data import layout


@pytest.fixture()
def valid_dir(tmp_path):
    root = str(tmp_path / "data")
    datagen.write_valid_dataset(root)
    return root


def test_valid_dataset_is_clean(valid_dir):
    report = layout.validate_dataset(datagen.tiny_data_config(valid_dir))
    assert report.ok and not report.issues, report.format()
    assert len(report.samples) == 20
    assert report.samples[0] == layout.Sample("000_0_normal", "000", 0)
    assert "RESULT: OK" in report.format()


@pytest.mark.parametrize("case", sorted(datagen.MALFORMED))
def test_malformed_case_is_reported_with_file(valid_dir, case):
    expect = datagen.MALFORMED[case](valid_dir)
    report = layout.validate_dataset(datagen.tiny_data_config(valid_dir))
    hits = [i for i in report.issues if i.kind == expect.kind]
    assert hits, f"{case}: no {expect.kind} issue in\n{report.format()}"
    assert all(i.severity == expect.severity for i in hits)
    assert any(expect.names in i.message for i in hits), report.format()
    text = report.format()
    assert expect.names in text and f"[{expect.kind}]" in text
    assert report.ok == (expect.severity == "warning"), text
    assert ("RESULT: FAILED" in text) == (expect.severity == "error")


def test_every_problem_reported_in_one_pass(valid_dir):
    for case in ("truncated_image", "grayscale", "label_out_of_range", "unlabelled_file"):
        datagen.MALFORMED[case](valid_dir)
    os.remove(os.path.join(valid_dir, "high_mag_256", "004_1_normal.png"))
    report = layout.validate_dataset(datagen.tiny_data_config(valid_dir))
    assert {"unreadable_image", "unsupported_mode", "bad_label", "unlabelled_file",
            "missing_file"} <= report.kinds()
    assert "high_mag_256/004_1_normal.png" in report.format()


def test_listing_is_capped_but_all_counted(valid_dir):
    for n in range(30):
        datagen.random_crop(np.random.default_rng(n), 64).save(
            os.path.join(valid_dir, "high_mag_1024", f"9{n:02d}_x_normal.png"))
    report = layout.validate_dataset(datagen.tiny_data_config(valid_dir), decode=False)
    text = report.format(max_listed=20)
    assert "Image without a label (ignored): 30" in text
    assert "... and 10 more" in text
    assert report.ok


def test_skip_excludes_bad_samples_and_lists_them(valid_dir):
    truncated = datagen.MALFORMED["truncated_image"](valid_dir)
    os.remove(os.path.join(valid_dir, "high_mag_512", "003_0_pap.png"))
    cfg = datagen.tiny_data_config(valid_dir, on_bad_sample="skip")
    report = layout.validate_dataset(cfg)
    assert report.ok, report.format()
    bad = truncated.names.split("/")[1][:-4]
    assert set(report.skipped) == {bad, "003_0_pap"}
    assert report.skipped[bad] == ["unreadable_image"]
    assert len(report.samples) == 18
    assert bad not in {s.filename for s in report.samples}
    text = report.format()
    assert "SKIPPED (on_bad_sample='skip'): 2 sample(s)" in text and "003_0_pap" in text


def test_skip_cannot_hide_dataset_level_errors(valid_dir):
    datagen.MALFORMED["missing_labels_file"](valid_dir)
    report = layout.validate_dataset(datagen.tiny_data_config(valid_dir, on_bad_sample="skip"))
    assert not report.ok and "missing_labels_file" in report.kinds()


def test_user_files_never_modified(valid_dir):
    datagen.MALFORMED["truncated_image"](valid_dir)
    datagen.MALFORMED["palette_converted"](valid_dir)
    before = {(d, f): os.stat(os.path.join(valid_dir, d, f)).st_mtime_ns
              for d in os.listdir(valid_dir) if os.path.isdir(os.path.join(valid_dir, d))
              for f in os.listdir(os.path.join(valid_dir, d))}
    layout.validate_dataset(datagen.tiny_data_config(valid_dir, on_bad_sample="skip"))
    after = {(d, f): os.stat(os.path.join(valid_dir, d, f)).st_mtime_ns for d, f in before}
    assert before == after


def test_structure_scan_does_not_decode(valid_dir):
    datagen.MALFORMED["garbage_image"](valid_dir)
    report = layout.scan_folder(datagen.tiny_data_config(valid_dir))
    assert report.ok and not report.decoded


def test_scan_without_labels_for_prediction(valid_dir):
    datagen.MALFORMED["missing_labels_file"](valid_dir)
    report = layout.scan_folder(datagen.tiny_data_config(valid_dir), require_labels=False)
    assert report.ok, report.format()
    assert len(report.samples) == 20 and {s.label for s in report.samples} == {-1}


def test_custom_labels_file_and_scales(tmp_path):
    root = str(tmp_path / "d")
    scales = ("high_mag_256", "high_mag_512")
    datagen.write_valid_dataset(root, scales=scales, labels_file="labels_all.csv")
    cfg = datagen.tiny_data_config(root, scales=scales, labels_file="labels_all.csv")
    report = layout.validate_dataset(cfg)
    assert report.ok and report.scales == scales, report.format()


def test_num_id_is_prefix_before_first_underscore():
    assert layout.num_id_of("12_a_b_normal") == "12"
    assert layout.num_id_of("nounderscore") == "nounderscore"


def test_load_helpers_and_mode_policy(tmp_path):
    rgb = datagen.random_crop(np.random.default_rng(0), 48)
    rgb.save(tmp_path / "a.png")
    rgb.convert("P", palette=Image.ADAPTIVE).save(tmp_path / "p.png")
    np.testing.assert_array_equal(layout.load_rgb(str(tmp_path / "a.png")), np.asarray(rgb))
    assert layout.load_rgb(str(tmp_path / "p.png")).shape == (48, 48, 3)
    expected = np.asarray(rgb.resize((32, 32), Image.BILINEAR, reducing_gap=None))
    np.testing.assert_array_equal(layout.load_resized(str(tmp_path / "a.png"), 32), expected)
    rgb.convert("L").save(tmp_path / "g.png")
    with pytest.raises(layout.BadImageError, match="g.png.*mode L"):
        layout.load_rgb(str(tmp_path / "g.png"))
