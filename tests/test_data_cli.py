"""``python -m histo_jax.data``: exit codes and outputs of validate / labels / prepare / demo."""
import os
import subprocess
import sys
import types

import numpy as np
import pytest

import datagen
from histo_jax.data import __main__ as cli
from histo_jax.data import prepare

TINY = ["--image_size", "32"]


@pytest.fixture()
def data_dir(tmp_path):
    root = str(tmp_path / "data")
    datagen.write_valid_dataset(root, num_ids=10, per_id=1)
    return root


def test_validate_exit_codes(data_dir, capsys):
    assert cli.main(["validate", "--data_dir", data_dir] + TINY) == 0
    assert "RESULT: OK" in capsys.readouterr().out
    datagen.MALFORMED["unlabelled_file"](data_dir)  # A warning does not fail.
    assert cli.main(["validate", "--data_dir", data_dir]) == 0
    expect = datagen.MALFORMED["not_square"](data_dir)
    assert cli.main(["validate", "--data_dir", data_dir]) == 1
    out = capsys.readouterr().out
    assert expect.names in out and "RESULT: FAILED" in out
    assert cli.main(["validate", "--data_dir", data_dir, "--on_bad_sample", "skip"]) == 0
    assert "SKIPPED" in capsys.readouterr().out


def test_validate_as_module_subprocess(data_dir):
    datagen.MALFORMED["missing_file"](data_dir)
    proc = subprocess.run([sys.executable, "-m", "histo_jax.data", "validate", "--data_dir",
                           data_dir, "--scales", "high_mag_512,high_mag_256"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "high_mag_512/" in proc.stdout and "missing_file" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "histo_jax.data", "validate", "--data_dir",
                           data_dir, "--scales", "high_mag_256"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_bad_command_line_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["validate"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["validate", "--data_dir", "x", "--on_bad_sample", "ignore"])
    assert e.value.code == 2


def test_labels_command(data_dir, capsys):
    labels_path = os.path.join(data_dir, "labels.csv")
    original = open(labels_path).read()
    assert cli.main(["labels", "--data_dir", data_dir]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert open(labels_path).read() == original
    datagen.random_crop(np.random.default_rng(0), 64).save(
        os.path.join(data_dir, "high_mag_1024", "050_0_strange.png"))
    assert cli.main(["labels", "--data_dir", data_dir, "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "UNKNOWN class 'strange'" in out
    # Same labels as the generator's (class token pap -> 1, normal -> 0), sorted names.
    assert sorted(datagen.read_rows(data_dir)) == sorted(
        [line.split(",") for line in original.split()[1:]])
    assert cli.main(["labels", "--data_dir", data_dir, "--labels_file", "bal.csv", "--balance",
                     "--seed", "3", "--class_map", "normal=0,pap=1,strange=1"]) == 0
    rows = datagen.read_rows(data_dir, "bal.csv")
    assert sum(r[1] == "1" for r in rows) == sum(r[1] == "0" for r in rows) == 5
    assert cli.main(["labels", "--data_dir", data_dir, "--labels_file", "x.csv",
                     "--class_map", "normal"]) == 1
    assert "NAME=INT" in capsys.readouterr().err


def test_prepare_command(data_dir, tmp_path, capsys):
    args = ["prepare", "--data_dir", data_dir, "--prepared_dir", str(tmp_path / "p")] + TINY
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "Prepared dataset:" in out and "reused" not in out
    assert cli.main(args) == 0
    assert "reused" in capsys.readouterr().out
    assert len(list((tmp_path / "p").glob(f"*/{prepare.META_FILE}"))) == 1
    expect = datagen.MALFORMED["label_out_of_range"](data_dir)
    assert cli.main(args) == 1
    assert expect.names in capsys.readouterr().err


def test_demo_command_calls_write_demo_dataset(monkeypatch, tmp_path, capsys):
    calls = []
    fake = types.ModuleType("histo_jax.data.demo")
    fake.write_demo_dataset = lambda out, seed=0: calls.append((out, seed)) or {"samples": 3}
    monkeypatch.setitem(sys.modules, "histo_jax.data.demo", fake)
    out = str(tmp_path / "demo")
    assert cli.main(["demo", "--out", out, "--seed", "5"]) == 0
    assert calls == [(out, 5)] and "samples" in capsys.readouterr().out
