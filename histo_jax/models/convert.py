"""PyTorch state dicts -> histo_jax NNX models (torchvision, timm and reference checkpoints).

Three name formats are recognised from the keys (a leading ``module.`` is stripped):

* ``torchvision``: ``efficientnet_b0`` -> ``features.*`` (``classifier.*`` ignored);
* ``timm``: ``efficientnet_b0`` -> ``conv_stem``, ``bn1``, ``blocks.i.j.*``, ``conv_head``,
  ``bn2`` (``classifier.*`` ignored). timm's B0 is the same network as torchvision's
  (BatchNorm eps 1e-5, symmetric padding, SE to ``block_in // 4``), only the names differ;
* ``reference``: the original project's ``MultiInputModule`` (``feature_extractor.*`` =
  torchvision names, ``proj``, ``attention_layers.{i}.*``, ``ffn.0/3``, ``norm1/2``,
  ``classifier.1/4``).

``num_batches_tracked`` is ignored. All missing, unexpected and mis-shaped keys are reported in
ONE :class:`WeightImportError`. Conversions: conv OIHW -> HWIO, depthwise (C, 1, k, k) ->
(k, k, 1, C) (the same transposition), Linear (out, in) -> (in, out).
"""
from __future__ import annotations

import os
import pathlib
import re
import zlib
from typing import Any, Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from histo_jax.models import layers
from histo_jax.models.efficientnet import EfficientNet, SqueezeExcite
from histo_jax.models.fusion import MultiInputClassifier, TorchMultiheadAttention

FORMATS = ("torchvision", "timm", "reference")


class WeightImportError(ValueError):
    """A PyTorch state dict does not fit the histo_jax model (lists every problem at once)."""


# ---------------------------------------------------------------------------------------------
# Name tables: torch name -> (nnx Variable, torch shape). Transforms are derived from the rank.

def _conv(prefix: str, m: layers.Conv2d | layers.DepthwiseConv2d) -> Iterator[tuple[str, Any]]:
    yield f"{prefix}.weight", m.kernel
    if getattr(m, "bias", None) is not None:
        yield f"{prefix}.bias", m.bias


def _bn(prefix: str, m: layers.BatchNorm) -> Iterator[tuple[str, Any]]:
    yield f"{prefix}.weight", m.scale
    yield f"{prefix}.bias", m.bias
    yield f"{prefix}.running_mean", m.mean
    yield f"{prefix}.running_var", m.var


def _linear(prefix: str, m: nnx.Linear | nnx.LayerNorm) -> Iterator[tuple[str, Any]]:
    yield f"{prefix}.weight", m.kernel if isinstance(m, nnx.Linear) else m.scale
    yield f"{prefix}.bias", m.bias


def _se(a: str, b: str, m: SqueezeExcite) -> Iterator[tuple[str, Any]]:
    yield from _conv(a, m.reduce)
    yield from _conv(b, m.expand)


def _torchvision_names(enc: EfficientNet, root: str = "features") -> Iterator[tuple[str, Any]]:
    yield from _conv(f"{root}.0.0", enc.stem.conv)
    yield from _bn(f"{root}.0.1", enc.stem.bn)
    for s, blocks in enumerate(enc.stage_blocks(), start=1):
        for j, blk in enumerate(blocks):
            base, m = f"{root}.{s}.{j}.block", 0
            if blk.expand is not None:
                yield from _conv(f"{base}.0.0", blk.expand.conv)
                yield from _bn(f"{base}.0.1", blk.expand.bn)
                m = 1
            yield from _conv(f"{base}.{m}.0", blk.dw)
            yield from _bn(f"{base}.{m}.1", blk.dw_bn)
            yield from _se(f"{base}.{m + 1}.fc1", f"{base}.{m + 1}.fc2", blk.se)
            yield from _conv(f"{base}.{m + 2}.0", blk.project.conv)
            yield from _bn(f"{base}.{m + 2}.1", blk.project.bn)
    head = len(enc.stage_ends) + 1
    yield from _conv(f"{root}.{head}.0", enc.head.conv)
    yield from _bn(f"{root}.{head}.1", enc.head.bn)


def _timm_names(enc: EfficientNet) -> Iterator[tuple[str, Any]]:
    yield from _conv("conv_stem", enc.stem.conv)
    yield from _bn("bn1", enc.stem.bn)
    for s, blocks in enumerate(enc.stage_blocks()):
        for j, blk in enumerate(blocks):
            base = f"blocks.{s}.{j}"
            if blk.expand is None:  # timm DepthwiseSeparableConv
                yield from _conv(f"{base}.conv_dw", blk.dw)
                yield from _bn(f"{base}.bn1", blk.dw_bn)
                yield from _se(f"{base}.se.conv_reduce", f"{base}.se.conv_expand", blk.se)
                yield from _conv(f"{base}.conv_pw", blk.project.conv)
                yield from _bn(f"{base}.bn2", blk.project.bn)
            else:  # timm InvertedResidual
                yield from _conv(f"{base}.conv_pw", blk.expand.conv)
                yield from _bn(f"{base}.bn1", blk.expand.bn)
                yield from _conv(f"{base}.conv_dw", blk.dw)
                yield from _bn(f"{base}.bn2", blk.dw_bn)
                yield from _se(f"{base}.se.conv_reduce", f"{base}.se.conv_expand", blk.se)
                yield from _conv(f"{base}.conv_pwl", blk.project.conv)
                yield from _bn(f"{base}.bn3", blk.project.bn)
    yield from _conv("conv_head", enc.head.conv)
    yield from _bn("bn2", enc.head.bn)


def _mha(prefix: str, m: TorchMultiheadAttention) -> Iterator[tuple[str, Any]]:
    yield f"{prefix}.in_proj_weight", m.in_proj.kernel
    yield f"{prefix}.in_proj_bias", m.in_proj.bias
    yield from _linear(f"{prefix}.out_proj", m.out_proj)


def _reference_names(model: MultiInputClassifier) -> Iterator[tuple[str, Any]]:
    yield from _torchvision_names(model.encoder, root="feature_extractor")
    yield from _linear("proj", model.proj)
    for i, mha in enumerate(model.attention):
        yield from _mha(f"attention_layers.{i}", mha)
    yield from _linear("ffn.0", model.ffn1)
    yield from _linear("ffn.3", model.ffn2)
    yield from _linear("norm1", model.norm1)
    yield from _linear("norm2", model.norm2)
    yield from _linear("classifier.1", model.fc1)
    yield from _linear("classifier.4", model.fc2)


def _to_torch_layout(a: np.ndarray) -> np.ndarray:
    if a.ndim == 4:
        return a.transpose(3, 2, 0, 1)  # HWIO -> OIHW ; (k, k, 1, C) -> (C, 1, k, k)
    if a.ndim == 2:
        return a.T
    return a


def _from_torch_layout(a: np.ndarray) -> np.ndarray:
    if a.ndim == 4:
        return a.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if a.ndim == 2:
        return a.T
    return a


def name_table(target: EfficientNet | MultiInputClassifier, fmt: str) -> dict[str, Any]:
    """Torch state-dict name -> NNX Variable of ``target`` for format ``fmt``."""
    if fmt == "reference":
        if not isinstance(target, MultiInputClassifier):
            raise WeightImportError("reference (MultiInputModule) names need a "
                                    "MultiInputClassifier target, got an encoder.")
        items = _reference_names(target)
    else:
        enc = target.encoder if isinstance(target, MultiInputClassifier) else target
        if fmt == "torchvision":
            items = _torchvision_names(enc)
        elif fmt == "timm":
            items = _timm_names(enc)
        else:
            raise ValueError(f"unknown weight format {fmt!r}; use one of {FORMATS}.")
    return dict(items)


def torch_shapes(target: EfficientNet | MultiInputClassifier, fmt: str) -> dict[str, tuple]:
    """The PyTorch state-dict shapes ``target`` expects in format ``fmt`` (no BN counters)."""
    return {k: tuple(_to_torch_layout(np.zeros(v[...].shape, np.int8)).shape)
            for k, v in name_table(target, fmt).items()}


def export_state_dict(target: EfficientNet | MultiInputClassifier, fmt: str
                      ) -> dict[str, np.ndarray]:
    """The model's weights as a PyTorch state dict (float32 numpy arrays) in format ``fmt``."""
    return {k: np.ascontiguousarray(_to_torch_layout(np.asarray(v[...], np.float32)))
            for k, v in name_table(target, fmt).items()}


# ---------------------------------------------------------------------------------------------
# Loading.

_IGNORED = re.compile(r"(^|\.)num_batches_tracked$")
_BACKBONE_IGNORED = re.compile(r"^classifier\.")


def _strip_module_prefix(sd: Mapping[str, Any]) -> dict[str, Any]:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def detect_format(state_dict: Mapping[str, Any], source_name: str = "<state dict>") -> str:
    """'reference', 'torchvision' or 'timm', from the key names."""
    keys = list(_strip_module_prefix(state_dict))
    if any(k.startswith("feature_extractor.") for k in keys):
        return "reference"
    if any(k.startswith("features.") for k in keys):
        return "torchvision"
    if "conv_stem.weight" in keys or any(k.startswith("blocks.") for k in keys):
        return "timm"
    raise WeightImportError(
        f"{source_name}: not a recognised PyTorch EfficientNet state dict (expected torchvision "
        f"'features.*', timm 'conv_stem/blocks.*' or MultiInputModule 'feature_extractor.*' "
        f"keys); first keys: {keys[:5]}.")


def _fmt_list(title: str, items: list[str], limit: int = 40) -> str:
    shown = ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)"
                                        if len(items) > limit else "")
    return f"  {title} ({len(items)}): {shown}"


def load_state_dict(target: EfficientNet | MultiInputClassifier,
                    state_dict: Mapping[str, Any], source_name: str = "<state dict>") -> str:
    """Copy a PyTorch state dict into ``target`` (in place, all or nothing); return the format.

    A backbone file (torchvision / timm) fills the encoder of a classifier or an encoder; a
    reference file fills a whole classifier, or only the encoder when ``target`` is an
    encoder (its head keys are then ignored).
    """
    sd = {k: v for k, v in _strip_module_prefix(state_dict).items() if not _IGNORED.search(k)}
    fmt = detect_format(sd, source_name)
    if fmt == "reference" and isinstance(target, EfficientNet):
        prefix = "feature_extractor."
        sd = {"features." + k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        table, fmt_used = name_table(target, "torchvision"), "torchvision"
    else:
        if fmt != "reference":
            sd = {k: v for k, v in sd.items() if not _BACKBONE_IGNORED.match(k)}
        table, fmt_used = name_table(target, fmt), fmt
    missing = sorted(set(table) - set(sd))
    unexpected = sorted(set(sd) - set(table))
    mismatched, arrays = [], {}
    for name in sorted(set(table) & set(sd)):
        var = table[name]
        value = np.asarray(sd[name])
        if value.ndim != var[...].ndim:
            mismatched.append(f"{name}: file {tuple(value.shape)} vs model "
                              f"{tuple(_to_torch_layout(np.zeros(var[...].shape, np.int8)).shape)}")
            continue
        converted = _from_torch_layout(value)
        if tuple(converted.shape) != tuple(var[...].shape):
            mismatched.append(f"{name}: file {tuple(value.shape)} vs model "
                              f"{tuple(_to_torch_layout(np.zeros(var[...].shape, np.int8)).shape)}")
            continue
        arrays[name] = converted
    if missing or unexpected or mismatched:
        parts = [f"{source_name}: cannot load these {fmt} weights into {type(target).__name__} "
                 f"({'encoder' if fmt_used != 'reference' else 'full model'} names "
                 f"'{fmt_used}'). Check that the model config (variant, width/depth multipliers, "
                 "number of inputs, embed_dim, ffn_dim, num_classes) matches the file."]
        if missing:
            parts.append(_fmt_list("missing keys", missing))
        if unexpected:
            parts.append(_fmt_list("unexpected keys", unexpected))
        if mismatched:
            parts.append(_fmt_list("shape mismatches", mismatched))
        raise WeightImportError("\n".join(parts))
    for name, value in arrays.items():
        table[name][...] = jnp.asarray(value, jnp.float32)
    return fmt


def load_encoder_weights(model_or_encoder: EfficientNet | MultiInputClassifier,
                         state_dict: Mapping[str, Any], source_name: str = "<state dict>") -> str:
    """Load backbone (or full reference) weights into a classifier or encoder; return format."""
    return load_state_dict(model_or_encoder, state_dict, source_name)


def _read(path: str | os.PathLike) -> dict[str, np.ndarray]:
    from histo_jax.models import torch_io  # helper module: reads .pth / .safetensors safely
    return torch_io.read_state_dict(path)


def load_pretrained(model: MultiInputClassifier, spec: str) -> str:
    """Apply ``model.pretrained`` ('imagenet' or a file path) to ``model``; return the format."""
    if spec == "imagenet":
        from histo_jax.models import pretrained
        path = pretrained.imagenet_weights_path()
    else:
        path = pathlib.Path(os.path.expanduser(spec))
        if not path.is_file():
            raise FileNotFoundError(
                f"model.pretrained = {spec!r} is neither 'none', 'imagenet' nor an existing file; "
                "give the path of a PyTorch .pth / .safetensors state dict.")
    return load_state_dict(model, _read(path), str(path))


# ---------------------------------------------------------------------------------------------
# Deterministic synthetic weights / inputs shared with scripts/make_parity_reference.py.

def synthetic_state_dict(shapes: Mapping[str, tuple], seed: int) -> dict[str, np.ndarray]:
    """Non-trivial float32 weights for a PyTorch-named state dict, reproducible without torch.

    Each tensor is drawn from ``np.random.default_rng(zlib.crc32(name) ^ seed)``: weights of
    rank >= 2 ~ N(0, 1 / fan_in), except attention ``in_proj_weight`` ~ N(0, 16 / fan_in) (so
    attention is far from uniform); 1-D ``*.weight`` (norm scales) ~ U(1.05, 2.05); biases and
    ``running_mean`` ~ N(0, 0.02^2); ``running_var`` ~ U(0.5, 1.5). These ranges keep the input
    signal alive through 16 random eval-mode blocks (features differ between images) without
    blowing it up.
    """
    out = {}
    for name, shape in shapes.items():
        rng = np.random.default_rng(zlib.crc32(name.encode()) ^ int(seed))
        shape = tuple(int(s) for s in shape)
        if name.endswith("running_var"):
            a = rng.uniform(0.5, 1.5, shape)
        elif name.endswith("running_mean") or "bias" in name.rsplit(".", 1)[-1]:
            a = 0.02 * rng.standard_normal(shape)
        elif name.endswith("in_proj_weight"):
            a = 4.0 * rng.standard_normal(shape) / np.sqrt(shape[1])
        elif len(shape) >= 2:
            a = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        else:
            a = rng.uniform(1.05, 2.05, shape)
        out[name] = a.astype(np.float32)
    return out


def synthetic_images(shape: tuple, seed: int) -> np.ndarray:
    """Distinct float32 test images in [0, 1], shape (..., H, W, C); shared with the script.

    Each image is a random 8 x 8 colour mosaic (nearest upsampling) with a random contrast plus
    pixel noise, so pooled deep features differ between images (plain iid noise would give
    nearly identical features). Drawn from ``np.random.default_rng(seed)``.
    """
    *lead, h, w, c = (int(s) for s in shape)
    rng = np.random.default_rng(int(seed))
    low = rng.random((*lead, 8, 8, c))
    contrast = rng.uniform(0.2, 1.0, (*lead, 1, 1, 1))
    noise = rng.random((*lead, h, w, c))
    rows, cols = np.arange(h) * 8 // h, np.arange(w) * 8 // w
    mosaic = low[..., rows, :, :][..., :, cols, :]
    img = 0.5 + contrast * (mosaic - 0.5) + 0.15 * (noise - 0.5)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


__all__: list[str] = [
    "FORMATS", "WeightImportError", "detect_format", "export_state_dict", "load_encoder_weights",
    "load_pretrained", "load_state_dict", "name_table", "synthetic_images",
    "synthetic_state_dict", "torch_shapes"]
