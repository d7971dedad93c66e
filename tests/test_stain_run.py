"""Stain handling end to end: a run trained with a normaliser keeps it, its identity holds it,
predict applies it; slide prediction and extraction with ``--stain``; a restained slide."""
import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from histo_jax import predict, train
from histo_jax import workdir as workdir_lib
from histo_jax.data import __main__ as data_cli
from histo_jax.data import demo
from histo_jax.slides import predict as slides_predict
from histo_jax.slides import synthetic
from histo_jax.stain import normalize as N
from runutil import tiny_config


def _probs(path: str, key=lambda r: r["filename"]) -> dict:
    with open(path, newline="") as f:
        return {key(r): float(r["prob_tumour"]) for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def stain_run(tmp_path_factory):
    """A tiny 2-scale run on H&E-like crops with Macenko normalisation and HED augmentation."""
    root = tmp_path_factory.mktemp("stainrun")
    data = str(root / "data")
    demo.write_demo_dataset(data, num_ids=8, samples_per_id=2, sizes=(256, 512), num_processes=1)
    assert data_cli.main(["stain", "fit", "--ref", os.path.join(data, "high_mag_512"),
                          "--out", str(root / "stain.json")]) == 0
    c = tiny_config(data, str(root / "prepared"), str(root / "jax_cache"))
    c.data.scales = ("high_mag_512", "high_mag_256")
    c.num_epochs, c.checkpoint_every_steps = 2, 0
    c.data.stain.method, c.data.stain.file = "macenko", str(root / "stain.json")
    c.data.stain_augment.method = "hed"
    workdir = str(root / "run")
    result = train.train_and_evaluate(c, workdir)
    return {"root": root, "config": c, "workdir": workdir, "result": result, "data": data}


def test_the_run_keeps_its_normaliser_in_its_identity_and_logs_pass_throughs(stain_run):
    wd, root = stain_run["workdir"], stain_run["root"]
    fitted = N.load(str(root / "stain.json"))
    assert N.load(os.path.join(wd, "stain.json")).params() == fitted.params()
    fields = json.load(open(os.path.join(wd, "identity.json")))["fields"]
    assert fields["data.stain.fitted"] == fitted.fingerprint()
    assert fields["data.stain_augment.method"] == "hed" and "data.stain.file" not in fields
    rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows if "train/stain_passthrough" in r] == [1, 2]

    # The same normaliser under another path is the same run; other numbers are another run.
    moved = str(root / "moved.json")
    os.replace(str(root / "stain.json"), moved)
    c = stain_run["config"].copy_and_resolve_references()
    c.data.stain.file = moved
    assert train.train_and_evaluate(c, wd)["macro_f1"] == stain_run["result"]["macro_f1"]
    N.fit(np.asarray(Image.open(os.path.join(stain_run["data"], "high_mag_512",
                                            sorted(os.listdir(os.path.join(stain_run["data"], "high_mag_512")))[0]))),
          "macenko").save(str(root / "other.json"))
    c.data.stain.file = str(root / "other.json")
    with pytest.raises(workdir_lib.IdentityMismatchError, match="data.stain.fitted"):
        train.train_and_evaluate(c, wd)
    c.data.stain.file = str(root / "gone.json")
    with pytest.raises(N.StainError, match="gone.json not found"):
        train.train_and_evaluate(c, wd)
    os.replace(moved, str(root / "stain.json"))


def test_predict_applies_the_runs_normaliser(stain_run, tmp_path, monkeypatch):
    from histo_jax import steps

    built = []
    make = steps.make_eval_step
    monkeypatch.setattr(steps, "make_eval_step",
                        lambda graphs, norm, stain=None: built.append(stain) or make(graphs, norm, stain))
    config, model = predict.load_run(stain_run["workdir"])
    assert config.data.stain.file == os.path.join(stain_run["workdir"], "stain.json")
    got = predict.predict_folder(config, model, stain_run["data"], str(tmp_path / "p"), panels=0)
    assert built[-1] is not None
    assert built[-1].fitted.params() == N.load(str(stain_run["root"] / "stain.json")).params()
    # The run's test split predicted in training = the same samples predicted here.
    test_rows = _probs(os.path.join(stain_run["workdir"], "test_predictions.csv"))
    rows = _probs(got["predictions"])
    assert test_rows
    for name, p in test_rows.items():
        assert rows[name] == pytest.approx(p, abs=1e-5)
    # --stain replaces the run's normaliser; a bad file is refused before any work.
    N.fit(np.full((64, 64, 3), (150, 60, 140), np.uint8), "reinhard").save(str(tmp_path / "r.json"))
    predict.use_stain_file(config, str(tmp_path / "r.json"))
    predict.predict_folder(config, model, stain_run["data"], str(tmp_path / "r"), panels=0)
    assert built[-1].fitted.method == "reinhard"
    with pytest.raises(N.StainError, match="nope.json not found"):
        predict.use_stain_file(config, str(tmp_path / "nope.json"))


def _restain(img: np.ndarray) -> np.ndarray:
    """The same tissue stained elsewhere: OD unmixed with the demo's H and E vectors, remixed
    with site B's (1.3x H, 0.75x E)."""
    a = np.stack([demo._HAEM, demo._EOSIN], 1).astype(np.float64)
    b = np.stack([np.asarray(demo.SITES["b"].haem) * 1.3, np.asarray(demo.SITES["b"].eosin) * 0.75], 1)
    od = -np.log(np.maximum(img.astype(np.float64), 1) / 255.0)
    conc = od.reshape(-1, 3) @ np.linalg.pinv(a).T
    out = 255.0 * np.exp(-(conc @ b.T)).reshape(img.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def test_extract_and_slide_prediction_with_stain_undo_a_restained_slide(trained_run, tmp_path, capsys):
    layout = synthetic.slide_layout(0, 0, 3072, 2048, tumour=False)
    original = synthetic.render_slide(layout)
    synthetic.write_pyramid_tiff(str(tmp_path / "orig.tiff"), original, 0.25)
    synthetic.write_pyramid_tiff(str(tmp_path / "restained.tiff"), _restain(original), 0.25)
    stain = str(tmp_path / "stain.json")
    # --beta 0.05: the synthetic stroma is paler (red OD ~0.06) than the default 0.15 assumes.
    assert data_cli.main(["stain", "fit", "--ref", str(tmp_path / "orig.tiff"), "--out", stain,
                          "--beta", "0.05"]) == 0
    assert "Fitted macenko to" in capsys.readouterr().out
    crops = {}
    for name in ("orig", "restained"):
        for flag in ([], ["--stain", stain]):
            out = str(tmp_path / f"{name}{len(flag)}")
            assert data_cli.main(["extract", "--slides", str(tmp_path / f"{name}.tiff"), "--out", out,
                                  "--fovs", "1024,2048", "--size", "64", "--border", "pad",
                                  "--stride", "512"] + flag) == 0
            folder = os.path.join(out, "high_mag_1024")
            crops[name, bool(flag)] = {f.split("_", 1)[1]: np.asarray(Image.open(os.path.join(folder, f)),
                                                                    float)
                                       for f in os.listdir(folder)}
            manifest = json.load(open(os.path.join(out, "extract.json")))
            assert (manifest["stain"] is not None) == bool(flag)
    capsys.readouterr()
    # Tissue detection sees other colours, so compare the locations both extractions kept.
    common = sorted(set(crops["orig", False]) & set(crops["restained", False]))
    assert len(common) >= 5

    def diff(flag):
        a = np.stack([crops["orig", flag][k] for k in common])
        b = np.stack([crops["restained", flag][k] for k in common])
        return np.sqrt(np.mean((a - b) ** 2))

    before, after = diff(False), diff(True)
    assert before > 8 and after < 0.4 * before, (before, after)  # measured: 10.1 -> 3.3 grey levels

    # predict --slides with --stain: the slide's locations get the probabilities of the
    # normalised crops that extract --stain writes (to the uint8 rounding of those crops).
    config, model = predict.load_run(trained_run["workdir"])
    predict.use_stain_file(config, stain)
    assert config.data.stain.method == "macenko"
    summary = slides_predict.predict_slides(config, model, [str(tmp_path / "restained.tiff")],
                                            str(tmp_path / "pred"), stride=512, progress=False)
    assert summary["stain"]["method"] == "macenko" and summary["stain"]["file"] == stain
    slide = _probs(str(tmp_path / "pred" / "restained" / "predictions.csv"),
                   key=lambda r: f"restained_x{r['x']}_y{r['y']}")
    crops_dir = str(tmp_path / "rest32")
    assert data_cli.main(["extract", "--slides", str(tmp_path / "restained.tiff"), "--out", crops_dir,
                          "--fovs", "1024,2048", "--size", "32", "--border", "pad", "--stride", "512",
                          "--stain", stain]) == 0
    capsys.readouterr()
    plain, model2 = predict.load_run(trained_run["workdir"])
    folder = predict.predict_folder(plain, model2, crops_dir, str(tmp_path / "fold"), panels=0)
    by_name = _probs(folder["predictions"])
    assert len(slide) > 5 and set(slide) == set(by_name)
    assert max(abs(by_name[k] - p) for k, p in slide.items()) < 0.02
