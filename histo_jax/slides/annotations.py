"""What users give beside the slides: points and patients CSVs, QuPath GeoJSON annotations.

* Points CSV: columns ``slide,x,y[,label]``; ``slide`` is the slide's file name without
  extension, ``x,y`` the level-0 centre in px (rounded to integers), ``label`` an optional
  integer class (empty: unlabelled).
* Patients CSV: columns ``slide,patient``: the patient becomes the samples' ``num_id``
  so that splits keep all slides of a patient together.
* QuPath GeoJSON (File > Export objects as GeoJSON, or an annotation export script): a
  FeatureCollection, a list of Features or one Feature; coordinates in level-0 px.
  Polygons and MultiPolygons (holes respected) are regions; their class is
  ``properties.classification.name`` (``Unclassified`` when absent) mapped to a label by
  a class map such as ``Tumor=1,Normal=0,Stroma=ignore``. Detections and cells (QuPath
  ``objectType`` other than ``annotation``) and non-area geometries (points, lines) are
  not regions and are counted as ignored.

Every problem raises :class:`InputError` naming the file (and line or feature).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from typing import Mapping

import numpy as np
from matplotlib.path import Path

from histo_jax.slides.reader import InputError

DEFAULT_CLASS_MAP = "Tumor=1,Tumour=1,Normal=0"
UNCLASSIFIED = "Unclassified"
_UNSAFE = re.compile(r"[_\s,/\\:*?\"<>|]+")


def safe_token(text: str) -> str:
    """A file-name token without ``_`` (num_id ends at the first ``_``) or path characters."""
    token = _UNSAFE.sub("-", str(text).strip()).strip("-")
    return token or "x"


def parse_class_map(text: str) -> dict[str, int | None]:
    """``'Tumor=1,Normal=0,Stroma=ignore'`` -> {name: label or None (ignored)}."""
    out: dict[str, int | None] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, sep, value = item.rpartition("=")
        if not sep or not name.strip():
            raise ValueError(f"class map entry {item!r} is not NAME=LABEL (e.g. Tumor=1,Normal=0,"
                             "Stroma=ignore)")
        value = value.strip()
        if value.lower() == "ignore":
            out[name.strip()] = None
            continue
        try:
            out[name.strip()] = int(value)
        except ValueError:
            raise ValueError(f"class map entry {item!r}: the label must be an integer or 'ignore'") from None
        if out[name.strip()] < 0:
            raise ValueError(f"class map entry {item!r}: labels are >= 0")
    if not out:
        raise ValueError(f"empty class map {text!r}")
    return out


# ----------------------------------------------------------------------------- CSVs

def _read_csv(path: str, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in required if c not in fields]
            if missing:
                raise InputError(path, f"missing column(s) {', '.join(missing)} (found: "
                                 f"{', '.join(fields) or 'nothing'}); the header must hold "
                                 f"{','.join(required)}")
            reader.fieldnames = fields
            return [(line, {k: (v or "").strip() for k, v in row.items() if k})
                    for line, row in enumerate(reader, start=2)]
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(path, f"cannot read ({type(e).__name__}: {e})") from None


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int
    label: int  # -1: unlabelled
    line: int   # line of the points CSV


def read_points(path: str) -> dict[str, list[Point]]:
    """Points CSV -> {slide name: points}, in file order."""
    rows = _read_csv(path, ("slide", "x", "y"))
    out: dict[str, list[Point]] = {}
    for line, row in rows:
        if not any(row.values()):
            continue
        if not row["slide"]:
            raise InputError(path, f"line {line}: empty slide name")
        try:
            x, y = (int(round(float(row[k]))) for k in ("x", "y"))
        except ValueError:
            raise InputError(path, f"line {line}: x,y must be numbers, got "
                             f"{row['x']!r},{row['y']!r}") from None
        raw = row.get("label", "")
        try:
            label = int(raw) if raw != "" else -1
        except ValueError:
            raise InputError(path, f"line {line}: label {raw!r} is not an integer") from None
        if raw != "" and label < 0:
            raise InputError(path, f"line {line}: label {label} is negative")
        out.setdefault(row["slide"], []).append(Point(x, y, label, line))
    if not out:
        raise InputError(path, "no point given")
    return out


def read_patients(path: str) -> dict[str, str]:
    """Patients CSV -> {slide name: patient}."""
    out: dict[str, str] = {}
    for line, row in _read_csv(path, ("slide", "patient")):
        if not any(row.values()):
            continue
        if not row["slide"] or not row["patient"]:
            raise InputError(path, f"line {line}: empty slide or patient")
        if out.get(row["slide"], row["patient"]) != row["patient"]:
            raise InputError(path, f"line {line}: slide {row['slide']} is given two patients "
                             f"({out[row['slide']]}, {row['patient']})")
        out[row["slide"]] = row["patient"]
    return out


# ----------------------------------------------------------------------------- GeoJSON

@dataclasses.dataclass
class Region:
    """One annotated area: class name, label, polygons as (outer ring, *holes) vertex arrays."""

    name: str
    label: int
    polygons: list[list[np.ndarray]]

    def contains(self, xy: np.ndarray) -> np.ndarray:
        xy = np.asarray(xy, np.float64).reshape(-1, 2)
        inside = np.zeros(len(xy), bool)
        for rings in self.polygons:
            hit = Path(rings[0]).contains_points(xy)
            for hole in rings[1:]:
                hit &= ~Path(hole).contains_points(xy)
            inside |= hit
        return inside


@dataclasses.dataclass
class Annotations:
    path: str
    regions: list[Region]
    ignored: int  # detections, non-area geometries and classes mapped to 'ignore'

    def labels(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Label of each level-0 point (-1: in no region) and whether it is ambiguous (inside
        regions of different labels; its label is then -1)."""
        xy = np.asarray(xy, np.float64).reshape(-1, 2)
        labels = np.full(len(xy), -1, np.int64)
        ambiguous = np.zeros(len(xy), bool)
        for r in self.regions:
            hit = r.contains(xy)
            ambiguous |= hit & (labels >= 0) & (labels != r.label)
            labels[hit & (labels < 0)] = r.label
        labels[ambiguous] = -1
        return labels, ambiguous


def _ring(path: str, where: str, ring) -> np.ndarray:
    try:
        arr = np.asarray(ring, np.float64)
    except (TypeError, ValueError):
        raise InputError(path, f"{where}: coordinates are not numbers") from None
    if arr.ndim != 2 or arr.shape[1] < 2 or len(arr) < 3 or not np.all(np.isfinite(arr)):
        raise InputError(path, f"{where}: a polygon ring must be a list of at least 3 [x, y] points")
    return arr[:, :2]


def _polygons(path: str, where: str, geom) -> tuple[list[list[np.ndarray]], int]:
    """Polygons of a GeoJSON geometry and the count of non-area geometries in it."""
    if not isinstance(geom, dict) or "type" not in geom:
        raise InputError(path, f"{where}: 'geometry' must be an object with a 'type'")
    kind = geom["type"]
    if kind == "GeometryCollection":
        polys, ignored = [], 0
        for i, g in enumerate(geom.get("geometries") or []):
            p, n = _polygons(path, f"{where} geometry #{i}", g)
            polys += p
            ignored += n
        return polys, ignored
    if kind in ("Point", "MultiPoint", "LineString", "MultiLineString"):
        return [], 1
    if kind not in ("Polygon", "MultiPolygon"):
        raise InputError(path, f"{where}: unknown geometry type {kind!r}")
    coords = geom.get("coordinates")
    if not isinstance(coords, list) or not coords:
        raise InputError(path, f"{where}: {kind} without coordinates")
    polys = [coords] if kind == "Polygon" else coords
    out = []
    for k, rings in enumerate(polys):
        if not isinstance(rings, list) or not rings:
            raise InputError(path, f"{where}: polygon #{k} has no ring")
        out.append([_ring(path, f"{where} polygon #{k} ring #{j}", r) for j, r in enumerate(rings)])
    return out, 0


def _class_name(props) -> str:
    if not isinstance(props, dict):
        return UNCLASSIFIED
    c = props.get("classification")
    if isinstance(c, dict):
        c = c.get("name")
    return str(c) if c else UNCLASSIFIED


def read_annotations(path: str, class_map: Mapping[str, int | None]) -> Annotations:
    """Regions of a QuPath GeoJSON export (module docstring)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except json.JSONDecodeError as e:
        raise InputError(path, f"malformed GeoJSON: not valid JSON (line {e.lineno}, column "
                         f"{e.colno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot read ({type(e).__name__}: {e})") from None
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features")
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        features = [doc]
    elif isinstance(doc, list):
        features = doc
    else:
        raise InputError(path, "malformed GeoJSON: expected a FeatureCollection, a Feature or a "
                         "list of Features")
    if not isinstance(features, list):
        raise InputError(path, "malformed GeoJSON: 'features' must be a list")
    regions, ignored, unknown = [], 0, {}
    for i, feat in enumerate(features):
        where = f"feature #{i}"
        if not isinstance(feat, dict) or feat.get("type") != "Feature":
            raise InputError(path, f"malformed GeoJSON: {where} is not a Feature object")
        props = feat.get("properties") or {}
        if isinstance(props, dict) and props.get("objectType", "annotation") != "annotation":
            ignored += 1
            continue
        polys, n = _polygons(path, f"malformed GeoJSON: {where}", feat.get("geometry"))
        ignored += n
        if not polys:
            continue
        name = _class_name(props)
        if name not in class_map:
            unknown.setdefault(name, i)
            continue
        label = class_map[name]
        if label is None:
            ignored += 1
            continue
        regions.append(Region(name, label, polys))
    if unknown:
        listing = ", ".join(f"'{n}' (feature #{i})" for n, i in unknown.items())
        suggestion = ",".join([class_map_to_text(class_map)] + [f"{n}=ignore" for n in unknown])
        raise InputError(path, f"annotation class(es) {listing} missing from the class map "
                         f"({class_map_to_text(class_map)}); map them to labels or ignore them, "
                         f"e.g. --annotation_classes \"{suggestion}\"")
    return Annotations(path, regions, ignored)


def class_map_to_text(class_map: Mapping[str, int | None]) -> str:
    return ",".join(f"{k}={'ignore' if v is None else v}" for k, v in class_map.items())


def annotation_file(folder: str, slide: str) -> str:
    """``<folder>/<slide>.geojson`` (or ``.json``); raises InputError when neither exists."""
    for ext in (".geojson", ".json"):
        p = os.path.join(folder, slide + ext)
        if os.path.isfile(p):
            return p
    raise InputError(os.path.join(folder, slide + ".geojson"),
                     f"no annotation file for slide {slide} (expected {slide}.geojson or "
                     f"{slide}.json in {folder}; an unannotated slide needs an empty "
                     "FeatureCollection)")
