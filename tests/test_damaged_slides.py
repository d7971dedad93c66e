"""Damaged and hostile slides (tests/damaged_slides.py): ``extract`` and ``predict --slides``
skip each with a line naming it and the reason, finish the others, list the skipped ones in
their summary and exit non-zero; a slide that crashes or hangs the reader costs that slide
only (it is sampled in a separate process first); a slide that changes while it is read is
left out."""
import functools
import json
import os

import pytest

import damaged_slides
from histo_jax import predict
from histo_jax.data import __main__ as data_cli
from histo_jax.slides import extract, reader, synthetic
from histo_jax.slides import predict as slides_predict

FLAGS = ["--fovs", "64,128", "--stride", "256", "--workers", "2"]


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    good = str(root / "good.tiff")
    synthetic.write_pyramid_tiff(good, synthetic.toy_slide(2048, 1536, seed=0, hole=300), 0.25)
    cases = damaged_slides.build(str(root / "bad"), good)
    assert len(cases) >= 12
    return good, cases


def _failure_lines(text: str) -> dict[str, str]:
    lines = text.split("FAILED:", 1)[1].splitlines()[1:]
    return dict(line.strip().split(": ", 1) for line in lines if line.startswith("  "))


def test_extract_skips_every_damaged_slide_and_finishes_the_good_one(catalogue, tmp_path, capfd):
    good, cases = catalogue
    out = str(tmp_path / "crops")
    code = data_cli.main(["extract", "--slides", good, *(p for p, _ in cases.values()),
                          "--out", out, *FLAGS])
    text = capfd.readouterr()
    assert code == 1 and "Traceback" not in text.out + text.err
    failed = _failure_lines(text.out)
    bad = {name: case for name, case in cases.items() if case[1] is not None}
    for name, (path, reason) in bad.items():
        assert path in failed, f"{name} not reported:\n{text.out}"
        assert reason in failed[path], f"{name}: {failed[path]}"
    manifest = json.load(open(os.path.join(out, extract.MANIFEST)))
    readable = sorted(["good"] + [n for n, (_, r) in cases.items() if r is None])
    assert sorted(manifest["slides"]) == readable and len(manifest["failures"]) == len(bad)
    assert all(manifest["slides"][n]["written"] == 40 for n in readable)
    for name in readable[1:]:  # the damaged but readable slides give the good slide's crops
        for folder in ("high_mag_64", "high_mag_128"):
            for f in sorted(os.listdir(os.path.join(out, folder)))[:3]:
                if f.startswith("good_"):
                    twin = os.path.join(out, folder, f.replace("good_", f"{name}_", 1))
                    assert open(twin, "rb").read() == open(os.path.join(out, folder, f), "rb").read()
    assert "ERROR: %d slide(s) or input file(s) failed" % len(bad) in text.err


def test_a_slide_that_changes_during_extraction_is_left_out(catalogue, tmp_path, monkeypatch, capfd):
    good, _ = catalogue
    changing = str(tmp_path / "changing.tiff")
    damaged_slides._copy(good, changing)
    write_crops = extract._write_crops

    def then_modified(slide, *args, **kwargs):
        out = write_crops(slide, *args, **kwargs)
        if slide.path == changing:  # rewritten by a scanner while we read it
            with open(changing, "ab") as f:
                f.write(b"\0" * 100)
        return out
    monkeypatch.setattr(extract, "_write_crops", then_modified)
    out = str(tmp_path / "crops")
    assert data_cli.main(["extract", "--slides", good, changing, "--out", out, *FLAGS]) == 1
    failed = _failure_lines(capfd.readouterr().out)
    assert list(failed) == [changing] and "the file changed while it was read" in failed[changing]
    assert list(json.load(open(os.path.join(out, extract.MANIFEST)))["slides"]) == ["good"]


def test_a_slide_that_crashes_or_hangs_the_reader_costs_only_that_slide(catalogue, tmp_path,
                                                                      monkeypatch, capfd):
    good, _ = catalogue
    crash = damaged_slides._copy(good, str(tmp_path / "crash.tiff"))
    monkeypatch.setattr(extract, "IsolatedProbe", functools.partial(
        reader.IsolatedProbe, probe_fn="damaged_slides:crash_probe"))
    out = str(tmp_path / "crops")
    after = damaged_slides._copy(good, str(tmp_path / "after.tiff"))
    assert data_cli.main(["extract", "--slides", crash, good, after, "--out", out, *FLAGS]) == 1
    failed = _failure_lines(capfd.readouterr().out)
    assert list(failed) == [crash] and "crashed the isolated reader process (signal 6)" in failed[crash]
    assert sorted(json.load(open(os.path.join(out, extract.MANIFEST)))["slides"]) == [
        "after", "good"]  # the reader process was restarted for the slides after it
    with reader.IsolatedProbe("damaged_slides:crash_probe", timeout=3) as probe:
        hang = damaged_slides._copy(good, str(tmp_path / "hang.tiff"))
        assert "did not finish within 3 s" in probe(hang)
        assert probe(good) is None


def test_predict_slides_skips_every_damaged_slide(trained_run, catalogue, tmp_path):
    good, cases = catalogue
    config, model = predict.load_run(trained_run["workdir"])
    msgs = []
    code = slides_predict.run(config, model, [good, *(p for p, _ in cases.values())],
                              str(tmp_path / "pred"), log_fn=msgs.append, err_fn=msgs.append,
                              stride=1024, num_workers=2)
    text = "\n".join(msgs)
    assert code == 1 and "Traceback" not in text
    summary = json.load(open(tmp_path / "pred" / "summary.json"))
    bad = {name: case for name, case in cases.items() if case[1] is not None}
    assert sorted(r["slide"] for r in summary["slides"]) == sorted(
        ["good"] + [n for n, (_, r) in cases.items() if r is None])
    failed = dict(summary["failures"])
    for name, (path, reason) in bad.items():
        assert reason in failed.get(path, "missing"), f"{name}: {failed.get(path)}"
    assert f"{len(bad)} slide(s) failed" in text
