"""ImageNet weight cache: resolution, verified download, sidecar, offline errors (no network)."""
from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request

import pytest

from histo_jax.models import pretrained
from histo_jax.models.pretrained import (
    SOURCES,
    WeightSource,
    WeightsUnavailableError,
    imagenet_weights_path,
    weights_cache_dir,
)

PAYLOAD = b"fake efficientnet weights \x00\x01\x02" * 1000


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Any real network access fails the test; the cache defaults to a temp folder."""
    def refuse(url, *args, **kwargs):
        target = getattr(url, "full_url", url)
        if str(target).startswith("file://"):
            return real_urlopen(url, *args, **kwargs)
        raise AssertionError(f"test tried to reach the network: {target}")

    real_urlopen = urllib.request.urlopen
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setenv("HISTO_JAX_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def local_source(tmp_path) -> WeightSource:
    served = tmp_path / "served" / "weights.pth"
    served.parent.mkdir()
    served.write_bytes(PAYLOAD)
    return WeightSource(name="local", url=served.as_uri(), filename="local-weights.pth",
                        sha256=hashlib.sha256(PAYLOAD).hexdigest(), description="test")


def _cache_files(tmp_path) -> list[str]:
    root = tmp_path / "cache" / "weights"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_cache_dir_resolution(monkeypatch, tmp_path):
    assert weights_cache_dir() == tmp_path / "cache" / "weights"
    assert weights_cache_dir(tmp_path / "x") == tmp_path / "x" / "weights"
    monkeypatch.delenv("HISTO_JAX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weights_cache_dir() == tmp_path / "xdg" / "histo_jax" / "weights"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert weights_cache_dir() == tmp_path / "home" / ".cache" / "histo_jax" / "weights"


def test_known_sources_are_consistent():
    tv = SOURCES["torchvision"]
    # torchvision names its files <name>-<first 8 hex digits of the SHA-256>.pth
    assert tv.filename.endswith(f"-{tv.sha256[:8]}.pth") and tv.url.endswith("/" + tv.filename)
    for src in SOURCES.values():
        assert src.url.startswith("https://") and len(src.sha256) == 64
        int(src.sha256, 16)
    with pytest.raises(ValueError, match="unknown ImageNet weight source 'imagenet22k'"):
        imagenet_weights_path("imagenet22k")


def test_download_verify_and_cache(local_source, tmp_path, monkeypatch):
    path = imagenet_weights_path(local_source)
    assert path == tmp_path / "cache" / "weights" / "local-weights.pth"
    assert path.read_bytes() == PAYLOAD
    assert _cache_files(tmp_path) == ["local-weights.pth", "local-weights.pth.sha256"]
    record = json.loads(path.with_name(path.name + ".sha256").read_text())
    assert record["sha256"] == local_source.sha256 and record["size"] == len(PAYLOAD)

    # Second call: no download and no rehash (the sidecar still matches size + mtime).
    def fail(*a, **k):
        raise AssertionError("should not be called")

    monkeypatch.setattr(urllib.request, "urlopen", fail)
    monkeypatch.setattr(pretrained, "sha256_file", fail)
    assert imagenet_weights_path(local_source, download=False) == path


def test_changed_cached_file_is_rehashed_and_replaced(local_source, tmp_path):
    path = imagenet_weights_path(local_source)
    path.write_bytes(PAYLOAD[:-1] + b"X")
    os.utime(path, ns=(1, 1))  # make sure size+mtime no longer match the sidecar
    with pytest.raises(WeightsUnavailableError, match="exists but its SHA-256 is not"):
        imagenet_weights_path(local_source, download=False)
    assert imagenet_weights_path(local_source) == path
    assert path.read_bytes() == PAYLOAD


def test_manually_placed_file_is_accepted(tmp_path):
    """A user who followed the offline instructions: file present, no sidecar yet."""
    src = WeightSource("manual", "https://example.invalid/w.pth", "w.pth",
                       hashlib.sha256(PAYLOAD).hexdigest())
    dest = tmp_path / "cache" / "weights" / "w.pth"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(PAYLOAD)
    assert imagenet_weights_path(src, download=False) == dest
    assert _cache_files(tmp_path) == ["w.pth", "w.pth.sha256"]


def test_cached_real_source_with_sidecar_is_used_without_network(tmp_path):
    tv = SOURCES["torchvision"]
    dest = tmp_path / "cache" / "weights" / tv.filename
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"stand-in")
    st = dest.stat()
    dest.with_name(dest.name + ".sha256").write_text(json.dumps(
        {"sha256": tv.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    assert imagenet_weights_path("torchvision") == dest


def _expect_instructions(err: pytest.ExceptionInfo, src: WeightSource, tmp_path) -> None:
    msg = str(err.value)
    dest = tmp_path / "cache" / "weights" / src.filename
    assert src.url in msg and f"save it exactly as:\n    {dest}\n" in msg
    assert "HISTO_JAX_CACHE" in msg and src.sha256 in msg


def test_offline_error_says_what_to_download_and_where(tmp_path, monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(WeightsUnavailableError, match="name resolution") as err:
        imagenet_weights_path("torchvision")
    _expect_instructions(err, SOURCES["torchvision"], tmp_path)
    assert _cache_files(tmp_path) == []  # no partial file left behind

    with pytest.raises(WeightsUnavailableError, match="download=False") as err:
        imagenet_weights_path("timm", download=False)
    _expect_instructions(err, SOURCES["timm"], tmp_path)


def test_checksum_mismatch_keeps_nothing(local_source, tmp_path):
    wrong = WeightSource("local", local_source.url, "local-weights.pth", "0" * 64, "test")
    with pytest.raises(WeightsUnavailableError, match="downloaded file has SHA-256") as err:
        imagenet_weights_path(wrong)
    _expect_instructions(err, wrong, tmp_path)
    assert _cache_files(tmp_path) == []


def test_truncated_transfer_is_an_error(local_source, tmp_path, monkeypatch):
    real = urllib.request.urlopen

    class Broken:
        def __init__(self, resp):
            self.resp, self.headers = resp, {"Content-Length": str(len(PAYLOAD))}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.resp.close()

        def read(self, n):
            raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, **k: Broken(real(url)))
    with pytest.raises(WeightsUnavailableError, match="connection reset"):
        imagenet_weights_path(local_source)
    assert _cache_files(tmp_path) == []
