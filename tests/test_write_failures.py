"""A full disk or an I/O error in each place histo_jax writes outside a training checkpoint
(prepare, extract, TensorBoard, predictions, slide outputs and their pictures): one clear
message naming the file and saying what was kept, no traceback first, a non-zero exit, and
the same command succeeds once the problem is gone. (Checkpoints, the metrics log and the
test outputs of a run: tests/test_train.py.)"""
import errno
import json
import os

import numpy as np
import pytest

import datagen
from histo_jax import errors, metrics, plots, predict
from histo_jax.data import __main__ as data_cli
from histo_jax.data import prepare
from histo_jax.data.tfds_builder import histo_jax_dataset
from histo_jax.slides import extract, pictures, synthetic
from histo_jax.slides import predict as slides_predict


def _fail(code=errno.ENOSPC, after=0):
    """A stand-in that works ``after`` times, then raises OSError(code)."""
    calls = [0]

    def wrap(original):
        def fn(*args, **kwargs):
            calls[0] += 1
            if calls[0] > after:
                raise OSError(code, os.strerror(code))
            return original(*args, **kwargs)
        return fn
    return wrap


def test_prepare_full_disk_removes_the_unfinished_dataset(tmp_path, capfd, monkeypatch):
    data = str(tmp_path / "data")
    datagen.write_valid_dataset(data, num_ids=10, per_id=1)
    prepared = str(tmp_path / "prepared")
    argv = ["prepare", "--data_dir", data, "--image_size", "32", "--prepared_dir", prepared]
    gen = histo_jax_dataset.HistoJaxDataset._generate_examples

    def failing_generate(self, manual_dir):  # the disk fills up after 3 records
        for k, example in enumerate(gen(self, manual_dir)):
            if k == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            yield example
    monkeypatch.setattr(histo_jax_dataset.HistoJaxDataset, "_generate_examples", failing_generate)
    assert data_cli.main(argv) == 1
    out = capfd.readouterr()
    text = out.out + out.err
    assert "Traceback" not in text
    assert "ERROR: Could not write the prepared dataset" in out.err and "the disk is full" in out.err
    assert "Nothing was kept" in out.err and f"{data} is untouched" in out.err
    assert os.listdir(prepared) == []  # the unfinished folder is gone
    monkeypatch.undo()

    # The completion marker itself (an I/O error): the same message, nothing kept.
    monkeypatch.setattr(prepare.json, "dump", _fail(errno.EIO)(json.dump))
    assert data_cli.main(argv) == 1
    assert "an I/O error" in capfd.readouterr().err and os.listdir(prepared) == []
    monkeypatch.undo()
    assert data_cli.main(argv) == 0 and len(os.listdir(prepared)) == 1


def test_extract_full_disk_keeps_finished_slides_and_resumes(tmp_path, capfd, monkeypatch):
    img = synthetic.toy_slide(2048, 1536, seed=0, hole=300)  # 20 locations
    for name in ("A", "B"):
        synthetic.write_pyramid_tiff(str(tmp_path / f"{name}.tiff"), img, 0.25)
    out = str(tmp_path / "crops")
    argv = ["extract", "--slides", str(tmp_path / "A.tiff"), str(tmp_path / "B.tiff"),
            "--out", out, "--fovs", "64,128", "--stride", "256", "--workers", "1"]
    # A's 40 crops are written, then the disk fills up during B's.
    monkeypatch.setattr(extract, "_save_png", _fail(after=45)(extract._save_png))
    assert data_cli.main(argv) == 1
    text = capfd.readouterr()
    assert "Traceback" not in text.out + text.err
    assert "ERROR: Could not write the crops of slide B" in text.err
    assert "the disk is full" in text.err and "Kept: the 1 slide(s) finished before it" in text.err
    manifest = json.load(open(os.path.join(out, extract.MANIFEST)))
    assert list(manifest["slides"]) == ["A"]
    monkeypatch.undo()
    assert data_cli.main(argv) == 0
    manifest = json.load(open(os.path.join(out, extract.MANIFEST)))
    assert sorted(manifest["slides"]) == ["A", "B"] and manifest["slides"]["A"]["written"] == 0
    capfd.readouterr()

    # Its tables: the crops stay, the message says so; the rerun finishes.
    monkeypatch.setattr(extract, "_atomic_write_text", _fail(errno.EIO)(extract._atomic_write_text))
    assert data_cli.main(argv) == 1
    err = capfd.readouterr().err
    assert "Could not write the extraction's tables" in err and "crops written are kept" in err


def test_tensorboard_write_failure_is_clear_and_the_log_row_is_kept(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path))
    writer.write(1, {"train/loss": 0.5})
    writer._tb._f.write = _fail()(writer._tb._f.write)
    with pytest.raises(errors.WriteFailedError) as e:
        writer.write(2, {"train/loss": 0.25})
    assert str(e.value).startswith(f"Could not write the TensorBoard events ({tmp_path}/"
                                   "tensorboard): the disk is full")
    assert "metrics.jsonl holds every logged row" in str(e.value)
    assert [r["step"] for r in metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))] == [1, 2]
    # Reopened (as on resume): the event files are rebuilt from the log, each step once.
    metrics.MetricWriter(str(tmp_path)).close()
    assert metrics.read_tensorboard_scalars(str(tmp_path / "tensorboard")) == [
        ("train/loss", 1, 0.5), ("train/loss", 2, 0.25)]


def test_event_files_are_read_by_tensorboard_itself(tmp_path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    writer = metrics.MetricWriter(str(tmp_path))
    writer.write(3, {"a": 1.5, "b": float("nan")}, epoch=1)
    writer.close()
    [path] = [os.path.join(tmp_path, "tensorboard", f)
              for f in os.listdir(tmp_path / "tensorboard")]
    # The loader migrates scalars into tensors (as TensorBoard shows them).
    scalars = [(v.tag, ev.step, float(tensor_util.make_ndarray(v.tensor)))
               for ev in EventFileLoader(path).Load() for v in ev.summary.value]
    assert scalars[0] == ("a", 3, 1.5) and scalars[1][:2] == ("b", 3) and np.isnan(scalars[1][2])


def test_predictions_and_their_pictures_full_disk(trained_run, tmp_path, monkeypatch):
    config, model = predict.load_run(trained_run["workdir"])
    out = str(tmp_path / "pred")
    monkeypatch.setattr(plots, "confusion_matrix", _fail()(plots.confusion_matrix))
    with pytest.raises(errors.WriteFailedError) as e:
        predict.predict_folder(config, model, trained_run["config"].data.dir, out)
    assert str(e.value).startswith(f"Could not write the predictions ({out}): the disk is full")
    assert "Files written before it are kept" in str(e.value)
    assert os.path.exists(os.path.join(out, "predictions.csv"))  # written before the picture


def test_slide_outputs_io_error_is_clear(trained_run, tmp_path, monkeypatch):
    config, model = predict.load_run(trained_run["workdir"])
    synthetic.write_pyramid_tiff(str(tmp_path / "A.tiff"), synthetic.toy_slide(3072, 2048, seed=2),
                                 0.25)
    monkeypatch.setattr(pictures, "heatmap", _fail(errno.EIO)(pictures.heatmap))
    msgs = []
    code = slides_predict.run(config, model, [str(tmp_path / "A.tiff")], str(tmp_path / "out"),
                              log_fn=msgs.append, err_fn=msgs.append, stride=1024,
                              num_workers=2)
    assert code == 1 and len(msgs) == 1
    assert msgs[0].startswith(f"ERROR: Could not write the outputs of slide A ({tmp_path}/out): "
                              "an I/O error")
    assert os.path.exists(tmp_path / "out" / "A" / "predictions.csv")
