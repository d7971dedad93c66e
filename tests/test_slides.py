"""Whole slides (histo_jax/slides): reading and geometry, tissue detection, annotations,
``python -m histo_jax.data extract`` end to end, reruns, and bad input. Synthetic
pyramidal TIFFs written with tifffile, opened by OpenSlide as generic-tiff."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import datagen
from histo_jax.data import __main__ as cli
from histo_jax.data import layout
from histo_jax.slides import annotations, geometry, synthetic, tissue
from histo_jax.slides.reader import InputError, SlideError, open_slide

W, H = 2048, 1536


def _geojson(path, features):
    with open(path, "w") as f:
        json.dump({"type": "FeatureCollection", "features": features}, f)


def _polygon(ring, name="Tumor", holes=(), object_type="annotation"):
    rings = [list(map(list, ring)) + [list(ring[0])]] + [list(map(list, h)) + [list(h[0])] for h in holes]
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": {"objectType": object_type, "classification": {"name": name}}}


TUMOUR_RING = [(1100, 400), (1800, 400), (1800, 1200), (1100, 1200)]  # right part of the tissue


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    img = synthetic.toy_slide(W, H, seed=0, hole=300)
    synthetic.write_pyramid_tiff(str(root / "A.tiff"), img, 0.25)
    synthetic.write_pyramid_tiff(str(root / "B.tiff"), img[:, ::-1], 0.5)
    synthetic.write_pyramid_tiff(str(root / "nompp" / "C.tiff"), img[:1024, :1536], None)
    return {"root": root, "img": img, "A": str(root / "A.tiff"), "B": str(root / "B.tiff"),
            "C": str(root / "nompp" / "C.tiff")}


# ----------------------------------------------------------------------------- reading

def test_reading_fields_follows_spec_geometry_and_pyramid(slides):
    img = slides["img"]
    with open_slide(slides["A"]) as s:
        assert (s.width, s.height, s.mpp, s.mpp_source) == (W, H, 0.25, "metadata")
        assert s.level_downsamples == (1.0, 2.0, 4.0, 8.0) and s.vendor == "generic-tiff"
        for x, y in ((1000, 700), (1001, 333), (128, 1408)):
            for f in (64, 128, 256):  # docs/reference.md §6: [x - F/2, x + F/2) at level 0, nested.
                crop = s.read_field(x, y, f)
                np.testing.assert_array_equal(crop, img[y - f // 2:y + f // 2, x - f // 2:x + f // 2])
        # Across the border: white outside the slide, the image inside.
        crop = s.read_field(30, 1500, 128)
        assert (crop[:, :34] == 255).all() and (crop[100:, :] == 255).all()
        np.testing.assert_array_equal(crop[:100, 34:], img[1436:1536, :94])
        # A 1024 px field stored at 128 px comes from level 3 (downsample 8), and matches the
        # naive read (level 0, then resize) of this smooth slide within a grey level or two.
        assert s.field_level(1024, 128) == 3 and s.field_level(1024, 128, pyramid=False) == 0
        assert s.field_level(1024, 100) == 3 and s.field_level(1024, 256) == 2
        fast, naive = s.read_field(1000, 700, 1024, 128), s.read_field(1000, 700, 1024, 128, pyramid=False)
        assert fast.shape == naive.shape == (128, 128, 3)
        assert np.abs(fast.astype(int) - naive).mean() < 1.5
    with open_slide(slides["B"]) as s:
        assert s.mpp == 0.5
    with open_slide(slides["C"]) as s:
        assert s.mpp is None and s.mpp_source == ""
    with open_slide(slides["C"], mpp=0.3) as s:
        assert s.mpp == 0.3 and s.mpp_source == "--mpp"


def test_geometry():
    fovs = geometry.parse_fovs("512,256,1024,2048")
    assert [f.folder for f in fovs] == ["high_mag_256", "high_mag_512", "high_mag_1024", "high_mag_2048"]
    um = geometry.parse_fovs("64,128.5", "um")
    assert [f.folder for f in um] == ["fov_64um", "fov_128.5um"]
    assert [f.pixels(0.25) for f in um] == [256, 514] and um[0].pixels(0.3) == 214  # even px
    with pytest.raises(ValueError, match="S1.*mpp"):
        um[0].pixels(None, "S1")
    with pytest.raises(ValueError, match="even"):
        geometry.FieldOfView(255)
    for f in fovs + um:
        assert geometry.fov_of_folder(f.folder) == f
    with pytest.raises(ValueError, match="x40"):
        geometry.fov_of_folder("x40")
    assert geometry.reference_order([f.folder for f in fovs], [f.size for f in fovs]) == (
        "high_mag_1024", "high_mag_2048", "high_mag_512", "high_mag_256")
    xy = geometry.grid_centres(1000, 600, 256, 100)
    assert xy[0].tolist() == [128, 128] and geometry.inside(geometry.crop_boxes(xy, 256), 1000, 600).all()
    assert xy[:, 0].max() + 128 <= 1000 and xy[:, 0].max() + 128 > 900
    # A level window covers its box whatever the downsample.
    loc, size, box = geometry.level_window(-100, 37, 300, 4.0)
    assert loc == (-100, 36) and size == (75, 76) and box == (0.0, 0.25, 75.0, 75.25)


# ----------------------------------------------------------------------------- tissue

def test_tissue_detection_holes_debris_and_fractions():
    rgb = np.full((100, 160, 3), 244, np.uint8)
    rgb[10:90, 20:140] = (220, 140, 190)        # tissue: 80 x 120 mask px
    rgb[30:60, 80:120] = 244                     # big hole (30 x 40 px = 1.2e6 px² at 32x): excluded
    rgb[30:36, 30:36] = 244                      # small hole (36 px = 3.7e4 px²): filled
    rgb[88:96, 2:10] = (220, 140, 190)           # debris (64 px = 6.6e4 px² < 1e6): dropped
    m = tissue.detect_tissue(rgb, (32.0, 32.0))
    assert m.mask[50, 40] and m.mask[33, 33] and not m.mask[45, 100] and not m.mask[92, 5]
    assert not m.mask[5, 5] and m.threshold == 8
    kept = tissue.detect_tissue(rgb, (32.0, 32.0), tissue.TissueParams(min_area=1e4, min_hole_area=5e3))
    assert kept.mask[92, 5] and not kept.mask[33, 33]  # the area limits decide both
    otsu = tissue.detect_tissue(rgb, (32.0, 32.0), tissue.TissueParams(saturation="otsu"))
    assert 8 < otsu.threshold < 90 and (otsu.mask == m.mask).mean() > 0.99
    # Exact area fractions (level-0 boxes): half on tissue, quarter, none, outside the slide.
    x_edge, y_top = 20 * 32, 10 * 32  # the tissue's left and top edges, level 0
    frac = m.fraction(np.array([[x_edge - 64, 1600, x_edge + 64, 1728],
                                [1600, y_top - 16, 1696, y_top + 8],
                                [0, 0, 256, 256], [-512, -512, -256, -256]]))
    np.testing.assert_allclose(frac, [0.5, 1 / 3, 0.0, 0.0], atol=1e-9)
    assert tissue.otsu_threshold(np.r_[np.full(50, 10), np.full(50, 200)].astype(np.uint8)) in range(10, 200)
    with pytest.raises(ValueError, match="odd"):
        tissue.TissueParams(median=4)


# ----------------------------------------------------------------------------- inputs

def test_annotations_and_csv_inputs(tmp_path):
    cm = annotations.parse_class_map("Tumor=1,Normal=0,Stroma=ignore")
    assert cm == {"Tumor": 1, "Normal": 0, "Stroma": None}
    with pytest.raises(ValueError, match="NAME=LABEL"):
        annotations.parse_class_map("Tumor")
    p = str(tmp_path / "s.geojson")
    square = [(0, 0), (100, 0), (100, 100), (0, 100)]
    hole = [(40, 40), (60, 40), (60, 60), (40, 60)]
    multi = {"type": "Feature", "properties": {"classification": {"name": "Normal"}},
             "geometry": {"type": "MultiPolygon", "coordinates": [
                 [[[200, 0], [300, 0], [300, 100], [200, 0]]], [[[50, 150], [150, 150], [150, 250], [50, 250], [50, 150]]]]}}
    feats = [_polygon(square, "Tumor", holes=[hole]), multi, _polygon(square, "Stroma"),
             _polygon(square, "Tumor", object_type="detection"),
             {"type": "Feature", "properties": {}, "geometry": {"type": "Point", "coordinates": [5, 5]}}]
    _geojson(p, feats)
    a = annotations.read_annotations(p, cm)
    assert [r.name for r in a.regions] == ["Tumor", "Normal"] and a.ignored == 3
    labels, amb = a.labels(np.array([[10, 10], [50, 50], [280, 20], [100, 200], [120, 120], [100, 175]]))
    assert labels.tolist() == [1, -1, 0, 0, -1, 0] and not amb.any()
    _geojson(p, [_polygon(square, "Tumor"), _polygon([(50, 50), (150, 50), (150, 150), (50, 150)], "Normal")])
    labels, amb = annotations.read_annotations(p, cm).labels(np.array([[75, 75], [25, 25]]))
    assert labels.tolist() == [-1, 1] and amb.tolist() == [True, False]
    # Bad input: the error names the file and what is wrong.
    _geojson(p, [_polygon(square, "Necrosis")])
    with pytest.raises(InputError, match=r"s\.geojson.*'Necrosis' \(feature #0\) missing from the class map"):
        annotations.read_annotations(p, cm)
    with open(p, "w") as f:
        f.write('{"type": "FeatureCollection", "features": [')
    with pytest.raises(InputError, match=r"s\.geojson: malformed GeoJSON: not valid JSON"):
        annotations.read_annotations(p, cm)
    with open(p, "w") as f:
        json.dump({"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {
            "type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}}]}, f)
    with pytest.raises(InputError, match="malformed GeoJSON: feature #0 polygon #0 ring #0"):
        annotations.read_annotations(p, cm)
    pts = tmp_path / "p.csv"
    pts.write_text("slide,x,y,label\nA,10,20,1\nA,11.6,20,\nB,5,5,0\n")
    got = annotations.read_points(str(pts))
    assert [(q.x, q.y, q.label, q.line) for q in got["A"]] == [(10, 20, 1, 2), (12, 20, -1, 3)]
    pts.write_text("slide,x,y\nA,ten,20\n")
    with pytest.raises(InputError, match=r"p\.csv: line 2: x,y must be numbers"):
        annotations.read_points(str(pts))
    pts.write_text("name,x,y\nA,1,2\n")
    with pytest.raises(InputError, match="missing column.*slide"):
        annotations.read_points(str(pts))
    pat = tmp_path / "patients.csv"
    pat.write_text("slide,patient\nA,P_1\nB,P_1\n")
    assert annotations.read_patients(str(pat)) == {"A": "P_1", "B": "P_1"}
    assert annotations.safe_token("P_1 /x") == "P-1-x"


# ----------------------------------------------------------------------------- extraction

def _run(capsys, *argv):
    code = cli.main(["extract", *argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_extract_annotated_grid_writes_a_valid_layout_and_resumes(slides, tmp_path, capsys):
    # 8 slides (4 with a tumour region, 4 without), as few as stratified splits allow.
    src, ann = tmp_path / "src", tmp_path / "ann"
    src.mkdir(), ann.mkdir()
    for i in range(8):
        os.link(slides["A"], src / f"S{i}.tiff")
        _geojson(ann / f"S{i}.geojson", [_polygon(TUMOUR_RING)] if i % 2 else [])
    out = str(tmp_path / "out")
    args = ["--slides", str(src), "--out", out, "--annotations", str(ann), "--outside_label", "0",
            "--fovs", "64,128", "--stride", "128", "--workers", "2"]
    code, text = _run(capsys, *args)
    assert code == 0, text
    assert "--config.data.scales=\"('high_mag_64', 'high_mag_128')\"" in text
    cfg = datagen.tiny_data_config(out, scales=("high_mag_64", "high_mag_128"))
    report = layout.validate_dataset(cfg)
    assert report.ok, report.format()
    assert sorted(os.listdir(out)) == ["extract.json", "high_mag_128", "high_mag_64", "labels.csv",
                                       "locations.csv", "thumbnails"]
    rows = _rows(os.path.join(out, "locations.csv"))
    assert {"filename", "slide", "num_id", "x", "y", "label", "mpp", "tissue_fraction"} <= set(rows[0])
    assert len(rows) == len(report.samples) and {r["num_id"] for r in rows} == {f"S{i}" for i in range(8)}
    img = slides["img"]
    mask = annotations.Region("Tumor", 1, [[np.array(TUMOUR_RING, float)]])
    for r in rows:
        x, y = int(r["x"]), int(r["y"])
        assert r["filename"] == f"{r['slide']}_x{x}_y{y}" and r["mpp"] == "0.25"
        assert float(r["tissue_fraction"]) >= 0.5 and (x - 32) % 128 == 0
        assert r["label"] == ("1" if r["slide"] in ("S1", "S3", "S5", "S7") and mask.contains([[x, y]])[0] else "0")
    r = rows[len(rows) // 2]
    x, y = int(r["x"]), int(r["y"])
    crop = np.asarray(Image.open(os.path.join(out, "high_mag_128", r["filename"] + ".png")))
    np.testing.assert_array_equal(crop, img[y - 64:y + 64, x - 64:x + 64])  # native size
    labels = _rows(os.path.join(out, "labels.csv"))
    first = {}
    for lab in labels:
        first.setdefault(lab["filename"].split("_")[0], lab["label"])
    assert first == {f"S{i}": str(i % 2) for i in range(8)}  # each num_id: highest label first
    assert os.path.getsize(os.path.join(out, "thumbnails", "S1.png")) > 5000
    # Rerun: every crop is already there; nothing rewritten.
    png = os.path.join(out, "high_mag_64", r["filename"] + ".png")
    mtime = os.stat(png).st_mtime_ns
    os.remove(os.path.join(out, "high_mag_128", r["filename"] + ".png"))
    code, text = _run(capsys, *args)
    assert code == 0 and f"1 crops written, {2 * len(rows) - 1} already there" in text, text
    assert os.stat(png).st_mtime_ns == mtime and _rows(os.path.join(out, "locations.csv")) == rows
    # Other settings into the same folder, or a folder with someone else's files: refused.
    code, text = _run(capsys, *args[:-4], "--stride", "256")
    assert code == 1 and "other settings" in text and "stride: 128 -> 256" in text
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, text = _run(capsys, "--slides", slides["A"], "--out", str(mine), "--fovs", "64")
    assert code == 1 and "not empty" in text and (mine / "notes.txt").read_text() == "keep me"


def test_extract_points_um_fields_patients_and_stored_size(slides, tmp_path, capsys):
    pts = tmp_path / "points.csv"
    pts.write_text("slide,x,y,label\nA,1024,400,1\nA,100,100,0\nB,1024,400,0\nB,1024,400,0\n")
    pat = tmp_path / "patients.csv"
    pat.write_text("slide,patient\nA,P_1\nB,P_1\n")
    out = str(tmp_path / "out")
    base = ["--slides", slides["A"], slides["B"], "--points", str(pts), "--fovs_um", "16,32"]
    # A (0.25 um/px) and B (0.5 um/px) give crops of different native sizes: refused for B.
    code, text = _run(capsys, *base, "--out", out)
    assert code == 1 and "B.tiff" in text and "pass --size" in text
    out = str(tmp_path / "out2")
    code, text = _run(capsys, *base, "--out", out, "--size", "48", "--patients", str(pat))
    assert code == 0, text
    rows = _rows(os.path.join(out, "locations.csv"))
    assert [r["filename"] for r in rows] == ["P-1_A_x1024_y400", "P-1_A_x100_y100", "P-1_B_x1024_y400"]
    assert [r["num_id"] for r in rows] == ["P-1"] * 3 and [r["mpp"] for r in rows] == ["0.25", "0.25", "0.5"]
    assert float(rows[1]["tissue_fraction"]) == 0.0  # every point is extracted, even off tissue
    for folder in ("fov_16um", "fov_32um"):
        im = Image.open(os.path.join(out, folder, rows[2]["filename"] + ".png"))
        assert im.size == (48, 48)
    # The tissue filter applies to points only when asked.
    out3 = str(tmp_path / "out3")
    code, text = _run(capsys, *base, "--out", out3, "--size", "48", "--min_tissue", "0.5")
    assert code == 0 and len(_rows(os.path.join(out3, "locations.csv"))) == 2
    # A physical field of view on a slide without mpp: a clear error naming it; --mpp fixes it.
    code, text = _run(capsys, "--slides", slides["C"], "--out", str(tmp_path / "c"), "--fovs_um", "32")
    assert code == 1 and "C.tiff" in text and "mpp" in text and "Traceback" not in text
    code, text = _run(capsys, "--slides", slides["C"], "--out", str(tmp_path / "c2"), "--fovs_um", "32",
                      "--mpp", "0.25", "--size", "32")
    assert code == 0 and os.path.isdir(tmp_path / "c2" / "fov_32um"), text


def test_bad_input_is_named_and_does_not_stop_the_others(slides, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    data = open(slides["A"], "rb").read()
    (bad / "truncated.tiff").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (50, 50)).save(bad / "photo.png")
    (bad / "notes.svs").write_text("not a slide")
    # A slide whose level-0 tile data is damaged: it opens, but reading fails.
    import tifffile
    damaged = bytearray(data)
    with tifffile.TiffFile(slides["A"]) as tif:
        page = tif.pages[0]
        for off, n in zip(page.dataoffsets[20:40], page.databytecounts[20:40]):
            damaged[off:off + n] = b"\0" * n
    (bad / "damaged.tiff").write_bytes(bytes(damaged))
    out = str(tmp_path / "out")
    code, text = _run(capsys, "--slides", slides["A"], str(bad / "truncated.tiff"), str(bad / "photo.png"),
                      str(bad / "notes.svs"), str(bad / "damaged.tiff"), str(bad / "missing.tiff"),
                      "--out", out, "--fovs", "64,256", "--stride", "256")
    assert code == 1
    failed = text.split("FAILED: ")[-1]
    assert "5 slide(s)" in failed and "Traceback" not in text
    for name, reason in (("truncated.tiff", "unreadable or truncated TIFF"),
                         ("photo.png", "unsupported format (.png)"), ("notes.svs", "unreadable or truncated"),
                         ("damaged.tiff", "unreadable or truncated slide"), ("missing.tiff", "no such file")):
        assert any(name in line and reason in line for line in failed.splitlines()), (name, text)
    assert "A: " in text and len(_rows(os.path.join(out, "locations.csv"))) > 10  # A was extracted
    # Annotations: malformed GeoJSON and a class missing from the map, each naming its file.
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "A.geojson").write_text("{not json")
    _geojson(ann / "B.geojson", [_polygon(TUMOUR_RING, "Stroma")])
    code, text = _run(capsys, "--slides", slides["A"], slides["B"], "--annotations", str(ann),
                      "--out", str(tmp_path / "o2"), "--fovs", "64")
    assert code == 1 and "Traceback" not in text
    assert "A.geojson: malformed GeoJSON" in text and "B.geojson: annotation class(es) 'Stroma'" in text
    # Points outside the slide: the points file and its line are named.
    pts = tmp_path / "points.csv"
    pts.write_text("slide,x,y\nA,100,100\nA,5000,100\nB,100,100\n")
    code, text = _run(capsys, "--slides", slides["A"], slides["B"], "--points", str(pts),
                      "--out", str(tmp_path / "o3"), "--fovs", "64")
    assert code == 1 and "points.csv: 1 point(s) of slide A lie outside the slide" in text
    assert "line 3 (5000, 100)" in text and "B: 1 locations" in text
    # The real command line: exit code 1, no traceback.
    proc = subprocess.run([sys.executable, "-m", "histo_jax.data", "extract", "--slides", slides["A"],
                           str(bad / "truncated.tiff"), "--out", str(tmp_path / "o4"), "--fovs", "64",
                           "--stride", "512"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout
    assert "truncated.tiff: unreadable or truncated TIFF" in proc.stdout


def test_demo_slides_pyramid_tissue_and_annotations(tmp_path):
    out = str(tmp_path / "demo")
    summary = synthetic.write_demo_slides(out, num_train=1, num_train_tumour=1, num_new=0,
                                          width=2560, height=2048, num_processes=1)
    (info,) = summary["slides"]
    assert info["levels"][-1] == (160, 128) and sorted(info["regions"]) == ["architecture", "atypia"]
    with pytest.raises(FileExistsError, match="already exists"):
        synthetic.write_demo_slides(out, num_train=1, num_train_tumour=1, num_new=0)
    layout_ = synthetic.slide_layout(0, 0, 2560, 2048, tumour=True)  # the same slide, again
    import tifffile
    img = tifffile.imread(info["slide"])
    with open_slide(info["slide"]) as s:
        assert s.mpp == 0.25 and len(s.level_downsamples) == 5
        np.testing.assert_array_equal(s.read_field(1280, 1024, 256), img[896:1152, 1152:1408])
        m = tissue.detect_tissue(*s.thumbnail(32))
    # Tissue detection finds the tissue piece, drops the debris, excludes the hole.
    for part, expect in (("tissue", True), ("debris", False), ("hole", False)):
        cx, cy = layout_[part]["c"]
        assert m.at([[cx, cy]])[0] == expect, part
    ann = annotations.read_annotations(info["annotations"],
                                       annotations.parse_class_map(annotations.DEFAULT_CLASS_MAP))
    pts = np.random.default_rng(0).uniform(0, 2048, (200, 2))
    np.testing.assert_array_equal(ann.labels(pts)[0] == 1, synthetic.region_mask(layout_, pts))
    args = cli.build_parser().parse_args(["demo", "--slides", out])
    assert args.slides == out and args.out is None
    # The cues are drawn inside their regions: both hold far more haematoxylin-dark pixels
    # (atypical nuclei; crowded micro-follicle walls) than the rest of the tissue.
    yy, xx = np.mgrid[0:2048:4, 0:2560:4]
    xy = np.column_stack([xx.ravel(), yy.ravel()])
    on = synthetic._in_tissue(layout_, xx, yy).ravel()
    dark = (img[::4, ::4].mean(-1) < 110).ravel()
    normal = dark[on & ~synthetic.region_mask(layout_, xy)].mean()
    for r in layout_["regions"]:
        inside = on & synthetic._contains(r["polygon"], xy[:, 0], xy[:, 1])
        assert dark[inside].mean() > 2 * normal, r["cue"]
    with pytest.raises(SlideError, match="no such file"):
        open_slide(str(tmp_path / "nothing.tiff"))
