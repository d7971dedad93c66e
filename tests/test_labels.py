"""labels.csv from the class token of the file names."""
import collections
import os

import numpy as np
import pytest

import datagen
from histo_jax.data import labels

SCALES = ("high_mag_1024", "high_mag_2048")


def _touch(root, scale, name, size=40):
    os.makedirs(os.path.join(root, scale), exist_ok=True)
    datagen.random_crop(np.random.default_rng(0), size).save(
        os.path.join(root, scale, name + ".png"))


@pytest.fixture()
def named_dir(tmp_path):
    root = str(tmp_path / "d")
    names = ["1_a_normal", "1_b_normal", "2_a_pap", "3_a_pap+fol", "4_a_skler", "5_a_normal",
             "6_a_embol", "7_a_Background", "8_a_weird", "9_a_fol"]
    for scale in SCALES:
        for n in names:
            if not (scale == "high_mag_2048" and n == "9_a_fol"):
                _touch(root, scale, n)
    _touch(root, "high_mag_2048", "10_a_normal")  # Only in the non-reference folder.
    return root


def test_class_token_and_reference_map():
    assert labels.class_token("12_3_pap+fol+sol.png") == "pap+fol+sol"
    assert labels.class_token("12_3_Normal") == "normal"
    for token in ("pap", "fol", "sol", "pap+fol", "pap+sol", "pap+fol+sol", "fol+sol", "skler"):
        assert labels.REFERENCE_CLASS_MAP[token] == 1
    assert labels.REFERENCE_CLASS_MAP["normal"] == 0


def test_parse_class_map():
    assert labels.parse_class_map("normal=0, PAP=1") == {"normal": 0, "pap": 1}
    for bad in ("normal", "normal=x", "=1", ""):
        with pytest.raises(ValueError):
            labels.parse_class_map(bad)


def test_build_labels_reports_unknown_ignored_and_mismatches(named_dir):
    result = labels.build_labels(named_dir, SCALES)
    assert result.rows == [("1_a_normal", 0), ("1_b_normal", 0), ("2_a_pap", 1),
                           ("3_a_pap+fol", 1), ("4_a_skler", 1), ("5_a_normal", 0)]
    assert result.unknown == {"weird": ["8_a_weird"]}
    assert result.ignored == {"embol": 1, "background": 1}
    assert result.missing_in == {"high_mag_2048": ["9_a_fol"]}
    assert result.extra_in == {"high_mag_2048": ["10_a_normal"]}
    text = result.format()
    assert "UNKNOWN class 'weird'" in text and "8_a_weird" in text
    assert "9_a_fol.png" in text and "10_a_normal.png" in text


def test_custom_map_and_ignore(named_dir):
    result = labels.build_labels(named_dir, SCALES[:1], class_map={"normal": 0, "weird": 1},
                                 ignore=["pap", "pap+fol", "skler", "fol", "embol",
                                         "background"])
    assert result.rows == [("1_a_normal", 0), ("1_b_normal", 0), ("5_a_normal", 0),
                           ("8_a_weird", 1)]
    assert not result.unknown


def test_balance_undersamples_deterministically():
    rows = [(f"{i}_x", int(i % 4 == 0)) for i in range(40)]
    a, dropped = labels.balance_rows(rows, seed=1)
    b, _ = labels.balance_rows(rows, seed=1)
    c, _ = labels.balance_rows(rows, seed=2)
    assert collections.Counter(lab for _, lab in a) == {0: 10, 1: 10}
    assert dropped == 20 and a == b and a != c
    assert a == [r for r in rows if r in set(a)]  # Order kept.


def test_write_labels_refuses_overwrite(tmp_path):
    path = str(tmp_path / "labels.csv")
    labels.write_labels(path, [("a_normal", 0)])
    with pytest.raises(FileExistsError, match="--overwrite"):
        labels.write_labels(path, [("b_pap", 1)])
    labels.write_labels(path, [("b_pap", 1)], overwrite=True)
    assert open(path).read().split() == ["filename,label", "b_pap,1"]


def test_missing_reference_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="high_mag_1024"):
        labels.build_labels(str(tmp_path), SCALES)
