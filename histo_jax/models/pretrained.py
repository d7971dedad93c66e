"""ImageNet EfficientNet-B0 weights on demand: a verified local cache, downloaded once.

``imagenet_weights_path()`` returns the path of a checksum-verified weight file, downloading
it (urllib, progress on stderr) into ``<cache>/weights/`` when missing.  ``<cache>`` is
``$HISTO_JAX_CACHE``, else ``$XDG_CACHE_HOME/histo_jax``, else ``~/.cache/histo_jax``.
A verified file gets a ``<file>.sha256`` sidecar recording its digest, size and mtime, so
later runs skip rehashing until the file changes.  Offline machines get an error naming the
URL to fetch and the exact path to put the file at.  Read the file with
:func:`histo_jax.models.torch_io.read_state_dict`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import logging
import os
import pathlib
import sys
import tempfile
import urllib.error
import urllib.request

from tqdm import tqdm

from histo_jax import paths

__all__ = [
    "SOURCES",
    "WeightSource",
    "WeightsUnavailableError",
    "imagenet_weights_path",
    "sha256_file",
    "weights_cache_dir",
]

log = logging.getLogger(__name__)

CACHE_ENV = paths.CACHE_ENV
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class WeightSource:
    """One downloadable weight file and its SHA-256."""

    name: str
    url: str
    filename: str
    sha256: str
    description: str = ""


SOURCES: dict[str, WeightSource] = {
    # torchvision EfficientNet_B0_Weights.IMAGENET1K_V1, the reference's backbone.
    # torchvision itself only checks the 8-hex prefix in the file name; the full digest
    # (which starts with that prefix) is the one published for this file, 21,444,401 bytes.
    "torchvision": WeightSource(
        name="torchvision",
        url="https://download.pytorch.org/models/efficientnet_b0_rwightman-7f5810bc.pth",
        filename="efficientnet_b0_rwightman-7f5810bc.pth",
        sha256="7f5810bc96def8f7552d5b7e68d53c4786f81167d28291b21c0d90e1fca14934",
        description="torchvision EfficientNet_B0_Weights.IMAGENET1K_V1",
    ),
    # timm efficientnet_b0.ra_in1k, pinned to a Hugging Face Hub revision; the digest is
    # the LFS SHA-256 the Hub records for model.safetensors (21,355,344 bytes).
    "timm": WeightSource(
        name="timm",
        url="https://huggingface.co/timm/efficientnet_b0.ra_in1k/resolve/"
            "1b5383e5f79cc0f7fc067e372f8f26a5fa73f26a/model.safetensors",
        filename="efficientnet_b0.ra_in1k.safetensors",
        sha256="d569899762ea9b1384ee07f4af64805cf8caa1c55f9253ebb1080dc40e87a2cd",
        description="timm efficientnet_b0.ra_in1k",
    ),
}
_ALIASES = {"torchvision.IMAGENET1K_V1": "torchvision", "IMAGENET1K_V1": "torchvision",
            "efficientnet_b0.ra_in1k": "timm", "timm/efficientnet_b0.ra_in1k": "timm"}


class WeightsUnavailableError(RuntimeError):
    """The weight file is missing or wrong and could not be downloaded."""


def weights_cache_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """``<cache>/weights``: ``cache_dir`` or ``$HISTO_JAX_CACHE`` or the XDG cache."""
    if not cache_dir:
        cache_dir = paths.cache_root()
    return pathlib.Path(cache_dir).expanduser() / "weights"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _sidecar(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + ".sha256")


def _stat_key(path: pathlib.Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _verified(path: pathlib.Path, sha256: str) -> bool:
    """Whether ``path`` has digest ``sha256``; trusts a sidecar whose size+mtime still match."""
    try:
        record = json.loads(_sidecar(path).read_text())
        if record == {"sha256": sha256, **_stat_key(path)}:
            return True
    except (OSError, ValueError):
        pass
    if sha256_file(path) != sha256:
        return False
    _write_sidecar(path, sha256)
    return True


def _write_sidecar(path: pathlib.Path, sha256: str) -> None:
    try:
        _sidecar(path).write_text(json.dumps({"sha256": sha256, **_stat_key(path)}) + "\n")
    except OSError as e:  # a read-only cache still works, it is just rehashed next time
        log.warning("could not write %s (%s); the file will be rehashed next time",
                    _sidecar(path), e)


def _manual_instructions(src: WeightSource, dest: pathlib.Path, reason: str) -> str:
    return (
        f"Could not get the {src.description or src.name} ImageNet weights: {reason}\n"
        f"Download this file by hand:\n    {src.url}\n"
        f"and save it exactly as:\n    {dest}\n"
        f"(expected SHA-256 {src.sha256}), e.g.\n"
        f"    mkdir -p '{dest.parent}' && curl -L --fail -o '{dest}' '{src.url}'\n"
        f"To keep weights in another folder, set {CACHE_ENV}=/some/dir "
        f"(files then go to /some/dir/weights/), or pass cache_dir=."
    )


def _download(src: WeightSource, dest: pathlib.Path) -> None:
    """Fetch ``src.url`` into a temp file beside ``dest``, verify, then rename atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = pathlib.Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(src.url, timeout=60) as resp:
                    total = int(resp.headers.get("Content-Length") or 0) or None
                    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                              desc=f"downloading {dest.name}", file=sys.stderr,
                              leave=False) as bar:
                        while chunk := resp.read(_CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                reason = e if isinstance(e, urllib.error.HTTPError) else (
                    getattr(e, "reason", None) or e)
                raise WeightsUnavailableError(_manual_instructions(
                    src, dest, f"the download from {src.url} failed ({reason}); "
                               "the machine may be offline.")) from e
        if (got := digest.hexdigest()) != src.sha256:
            raise WeightsUnavailableError(_manual_instructions(
                src, dest, f"the downloaded file has SHA-256 {got}, not the expected "
                           f"{src.sha256} (corrupted transfer, proxy page or changed file)."))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    _write_sidecar(dest, src.sha256)
    log.info("downloaded %s to %s (SHA-256 verified)", src.url, dest)


def imagenet_weights_path(source: str | WeightSource = "torchvision", *,
                          cache_dir: str | os.PathLike | None = None,
                          download: bool = True) -> pathlib.Path:
    """Path of the verified ImageNet EfficientNet-B0 weight file, downloading it if needed.

    Args:
      source: ``"torchvision"`` (IMAGENET1K_V1, what the reference uses) or ``"timm"``
        (``efficientnet_b0.ra_in1k`` safetensors), or a custom :class:`WeightSource`.
      cache_dir: cache root (default ``$HISTO_JAX_CACHE`` / XDG cache); the file lives in
        its ``weights/`` subfolder.
      download: fetch the file when it is missing or fails its checksum; when False such a
        file is an error.

    Raises:
      ValueError: unknown ``source``.
      WeightsUnavailableError: missing/corrupt and not downloadable (offline, checksum
        mismatch, ``download=False``); the message says what to fetch from where, and where
        to put it.
    """
    if isinstance(source, str):
        key = _ALIASES.get(source, source)
        if key not in SOURCES:
            raise ValueError(f"unknown ImageNet weight source {source!r}; known: "
                             f"{sorted(SOURCES) + sorted(_ALIASES)}")
        source = SOURCES[key]
    dest = weights_cache_dir(cache_dir) / source.filename
    if dest.is_file():
        if _verified(dest, source.sha256):
            return dest
        problem = (f"{dest} exists but its SHA-256 is not {source.sha256} (a partial or "
                   "different file).")
        if not download:
            raise WeightsUnavailableError(_manual_instructions(
                source, dest, problem + " Delete it, or allow downloading."))
        log.warning("%s Downloading it again.", problem)
    elif not download:
        raise WeightsUnavailableError(_manual_instructions(
            source, dest, f"{dest} does not exist and download=False."))
    _download(source, dest)
    return dest
