"""Read PyTorch weight files into NumPy arrays, without torch and without running their code.

Formats (detected from the file's bytes, not its extension):

* ``safetensors`` (read with ``safetensors.numpy``);
* ``torch.save`` zip archives (PyTorch >= 1.6; ``.pth``/``.pt``/``.bin``/``.ckpt``):
  ``<dir>/data.pkl`` + ``<dir>/data/<key>`` raw storages + ``<dir>/byteorder``;
* the legacy pre-1.6 ``torch.save`` stream (magic number, sys-info, pickle, raw storages).

Pickles are read by a restricted unpickler: ``find_class`` resolves only the handful of
globals that tensor and state-dict reconstruction needs (``collections.OrderedDict``, the
``torch._utils._rebuild_*`` functions, the ``torch.*Storage`` types, ...), each mapped to a
local, side-effect-free replacement.  Any other global (``os.system``, ``builtins.eval``, a
pickled ``nn.Module`` class, ...) raises :class:`UnsafeCheckpointError` before anything from
the file runs.  Plain values (dict, list, tuple, str, int, float, bool, None, bytes) come
from pickle opcodes and need no globals.

Dtypes: float32/float16/float64, int8/16/32/64, uint8 (and uint16/32/64), bool and
complex keep their NumPy equivalents; bfloat16 (and float8 from safetensors) is widened to
float32, since NumPy has no such type.
"""
from __future__ import annotations

import collections
import io
import logging
import os
import pathlib
import pickle
import struct
import zipfile
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np

__all__ = [
    "CheckpointNotFoundError",
    "TorchCheckpointError",
    "UnsafeCheckpointError",
    "load_torch_file",
    "read_state_dict",
]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

# Keys under which training scripts commonly nest the weights, in order of preference.
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module")

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001  # torch.serialization.PROTOCOL_VERSION
_RESAVE_HINT = (
    "If you trust the file, re-save just its weights with PyTorch: "
    "`obj = torch.load(path, weights_only=False)`, then `torch.save(obj['state_dict'], "
    "'weights.pth')` (or `obj.state_dict()` for a pickled module), or export them with "
    "safetensors.torch.save_file."
)


class TorchCheckpointError(ValueError):
    """A weight file that cannot be read: unknown format, truncated, corrupt or unsupported."""


class UnsafeCheckpointError(TorchCheckpointError):
    """A pickle asked for a global outside the allow-list; nothing from it was executed."""


class CheckpointNotFoundError(FileNotFoundError):
    """The weight file does not exist."""

    def __str__(self) -> str:  # FileNotFoundError(errno, msg) would print "[Errno 2] ..."
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------------------
# Dtypes
# --------------------------------------------------------------------------------------
class _DType:
    """An element type as stored on disk: NumPy code (little-endian) or None if unsupported."""

    __slots__ = ("name", "code", "bfloat16")

    def __init__(self, name: str, code: str | None, bfloat16: bool = False):
        self.name, self.code, self.bfloat16 = name, code, bfloat16

    def numpy(self, byteorder: str) -> np.dtype:
        if self.code is None:
            raise TypeError(f"tensor dtype torch.{self.name} is not supported")
        dt = np.dtype(self.code)
        return dt.newbyteorder("<" if byteorder == "little" else ">") if dt.itemsize > 1 else dt


_DTYPES = {d.name: d for d in (
    _DType("float32", "f4"), _DType("float64", "f8"), _DType("float16", "f2"),
    _DType("bfloat16", "u2", bfloat16=True), _DType("int64", "i8"), _DType("int32", "i4"),
    _DType("int16", "i2"), _DType("int8", "i1"), _DType("uint8", "u1"), _DType("bool", "?"),
    _DType("uint16", "u2"), _DType("uint32", "u4"), _DType("uint64", "u8"),
    _DType("complex64", "c8"), _DType("complex128", "c16"),
)}
_DTYPE_ALIASES = {"float": "float32", "double": "float64", "half": "float16", "long": "int64",
                  "int": "int32", "short": "int16", "cfloat": "complex64",
                  "cdouble": "complex128"}
_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8",
}
# torch dtype objects that _rebuild_tensor_v3 may name (newer, "untyped storage" dtypes).
_V3_DTYPE_NAMES = {"uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2",
                   "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "int1", "int2",
                   "int3", "int4", "int5", "int6", "int7", "uint1", "uint2", "uint3", "uint4",
                   "uint5", "uint6", "uint7", "float4_e2m1fn_x2", "bits8", "bits16"}


def _torch_dtype(name: str) -> _DType:
    name = _DTYPE_ALIASES.get(name, name)
    return _DTYPES.get(name) or _DType(name, None)


class _StorageType:
    """Stands in for ``torch.FloatStorage`` etc. inside the unpickler (not callable)."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: _DType):
        self.dtype = dtype


# --------------------------------------------------------------------------------------
# Storages and lazily materialised tensors
# --------------------------------------------------------------------------------------
class _Storage:
    """Raw bytes of one torch storage; ``data`` is filled before tensors are materialised."""

    __slots__ = ("key", "dtype", "numel", "data", "base", "offset")

    def __init__(self, key: str, dtype: _DType, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.data: bytes | None = None
        self.base: _Storage | None = None  # legacy-format storage views
        self.offset = 0  # element offset into ``base``

    def buffer(self) -> bytes | memoryview:
        if self.base is not None:
            itemsize = np.dtype(self.base.dtype.code or "u1").itemsize
            start = self.offset * itemsize
            return memoryview(self.base.buffer())[start:start + self.numel * itemsize]
        if self.data is None:
            raise TypeError(f"storage {self.key!r} has no data")
        return self.data


class _Tensor:
    """What the unpickler builds for a tensor; turned into an ndarray once storages are read."""

    __slots__ = ("storage", "offset", "size", "stride", "dtype")

    def __init__(self, storage: Any, offset: Any, size: Any, stride: Any, dtype: _DType):
        if not isinstance(storage, _Storage):
            raise TypeError(f"tensor storage is a {type(storage).__name__}, not a storage")
        if not (_is_int_tuple(size) and _is_int_tuple(stride) and len(size) == len(stride)
                and isinstance(offset, int) and offset >= 0 and min(stride, default=0) >= 0
                and min(size, default=0) >= 0):
            raise TypeError(f"bad tensor geometry size={size!r} stride={stride!r} "
                            f"offset={offset!r}")
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
        self.dtype = dtype

    def __setstate__(self, state):
        raise TypeError("tensor state is not supported")

    def materialize(self, byteorder: str) -> np.ndarray:
        np_dtype = self.dtype.numpy(byteorder)
        if 0 in self.size:
            out = np.zeros(self.size, dtype=np_dtype.newbyteorder("="))
        else:
            flat = np.frombuffer(self.storage.buffer(), dtype=np_dtype)
            last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
            if last >= flat.size:
                raise TypeError(f"tensor of size {self.size} (stride {self.stride}, offset "
                                f"{self.offset}) reads past its storage of {flat.size} elements")
            view = np.lib.stride_tricks.as_strided(
                flat[self.offset:], shape=self.size,
                strides=[s * np_dtype.itemsize for s in self.stride], writeable=False)
            out = np.array(view, dtype=np_dtype.newbyteorder("="), order="C", copy=True)
        if self.dtype.bfloat16:
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out


def _is_int_tuple(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise TypeError("_rebuild_tensor_v2 expects a storage")
    return _Tensor(storage, storage_offset, size, stride, storage.dtype)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
    if not isinstance(dtype, _DType):
        raise TypeError("_rebuild_tensor_v3 expects a torch dtype")
    return _Tensor(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None, state=None):
    if not isinstance(data, _Tensor):
        raise TypeError("a Parameter must wrap a tensor")
    return data


class _TypeMarker:
    """Stands in for ``torch.Tensor`` / ``torch.nn.Parameter`` (only ever compared)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter):
        raise TypeError("_rebuild_from_type_v2 with an unexpected rebuild function")
    if not isinstance(new_type, _TypeMarker) or not isinstance(args, tuple):
        raise TypeError("_rebuild_from_type_v2 of an unsupported tensor subclass")
    return func(*args)


def _latin1_encode(obj, encoding="latin1"):
    """Pickle protocol 2 stores ``bytes`` as ``_codecs.encode(text, 'latin1')``."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise TypeError("_codecs.encode is only allowed for latin1 bytes")
    return obj.encode("latin1")


def _torch_device(kind, index=None):
    if not isinstance(kind, str) or not (index is None or isinstance(index, int)):
        raise TypeError("bad torch.device arguments")
    return kind if index is None else f"{kind}:{index}"


def _allowed_global(module: str, name: str) -> Any:
    """The local replacement for an allowed pickle global, or None when refused."""
    if module in ("builtins", "__builtin__"):
        return {"set": set, "frozenset": frozenset, "complex": complex,
                "bytearray": bytearray}.get(name)
    if module == "collections" and name == "OrderedDict":
        return collections.OrderedDict
    if module == "_codecs" and name == "encode":
        return _latin1_encode
    if module == "torch._utils":
        return {"_rebuild_tensor_v2": _rebuild_tensor_v2,
                "_rebuild_tensor_v3": _rebuild_tensor_v3,
                "_rebuild_parameter": _rebuild_parameter,
                "_rebuild_parameter_with_state": _rebuild_parameter}.get(name)
    if module == "torch._tensor" and name == "_rebuild_from_type_v2":
        return _rebuild_from_type_v2
    if module == "torch.nn.parameter" and name == "Parameter":
        return _TypeMarker("Parameter")
    if module == "torch":
        if name in _STORAGE_DTYPES:
            return _StorageType(_DTYPES[_STORAGE_DTYPES[name]])
        if name in _DTYPES or name in _DTYPE_ALIASES or name in _V3_DTYPE_NAMES:
            return _torch_dtype(name)
        if name == "Tensor":
            return _TypeMarker("Tensor")
        if name == "Size":
            return tuple
        if name == "device":
            return _torch_device
    return None


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and torch storage references."""

    def __init__(self, file: BinaryIO, path: pathlib.Path,
                 load_storage: Callable[[tuple], _Storage] | None):
        super().__init__(file, encoding="utf-8")
        self._path, self._load_storage = path, load_storage

    def find_class(self, module: str, name: str) -> Any:
        obj = _allowed_global(module, name)
        if obj is None:
            raise UnsafeCheckpointError(
                f"{self._path}: refusing to load the global '{module}.{name}' from its pickle. "
                "Only tensors, state dicts and plain Python values are accepted: loading a "
                f"checkpoint must never run code stored in it. {_RESAVE_HINT}")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        if self._load_storage is None:
            raise UnsafeCheckpointError(f"{self._path}: unexpected persistent id {pid!r}")
        if not isinstance(pid, tuple) or not pid:
            raise TypeError(f"bad persistent id {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind != "storage":
            raise UnsafeCheckpointError(
                f"{self._path}: refusing persistent object of kind {kind!r} (only tensor "
                f"storages are supported). {_RESAVE_HINT}")
        return self._load_storage(pid[1:])


def _storage_args(args: tuple, n: int) -> tuple[_DType, str, int]:
    if len(args) != n or not isinstance(args[0], _StorageType):
        raise TypeError(f"bad storage reference {args!r}")
    key = args[1].decode("ascii") if isinstance(args[1], bytes) else args[1]
    numel = args[3]
    if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
        raise TypeError(f"bad storage reference {args!r}")
    return args[0].dtype, key, numel


def _materialize(obj: Any, byteorder: str) -> Any:
    """Replace every lazily rebuilt tensor in a container tree by its ndarray."""
    if isinstance(obj, _Tensor):
        return obj.materialize(byteorder)
    if isinstance(obj, dict):
        return {k: _materialize(v, byteorder) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialize(v, byteorder) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialize(v, byteorder) for v in obj)
    if isinstance(obj, (_Storage, _StorageType, _DType, _TypeMarker)):
        raise TypeError(f"bare {type(obj).__name__.strip('_')} objects are not supported")
    return obj


# --------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------
def _load_zip(path: pathlib.Path) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkls = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
            raise TorchCheckpointError(
                f"{path} is a TorchScript archive (torch.jit.save), not a torch.save file. "
                "Save its weights instead: `torch.save(torch.jit.load(p).state_dict(), "
                "'weights.pth')`.")
        if len(pkls) != 1:
            hint = " (a NumPy .npz? load it with numpy.load)" if any(
                n.endswith(".npy") for n in names) else ""
            raise TorchCheckpointError(
                f"{path} is a zip archive but not a torch.save file: expected exactly one "
                f"'<dir>/data.pkl', found {len(pkls)}{hint}. Re-save it with torch.save or "
                "as .safetensors.")
        prefix = pkls[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise TypeError(f"unknown byteorder record {byteorder!r}")
        storages: dict[str, _Storage] = {}

        def load_storage(args: tuple) -> _Storage:
            dtype, key, numel = _storage_args(args, 4)
            if key not in storages:
                storage = _Storage(key, dtype, numel)
                storage.data = zf.read(f"{prefix}data/{key}")
                storages[key] = storage
            return storages[key]

        obj = _SafeUnpickler(io.BytesIO(zf.read(pkls[0])), path, load_storage).load()
        return _materialize(obj, byteorder)


def _load_legacy(path: pathlib.Path, f: BinaryIO) -> Any:
    def plain() -> Any:
        return _SafeUnpickler(f, path, None).load()

    if plain() != _LEGACY_MAGIC:
        raise TorchCheckpointError(
            f"{path} is a pickle but not a torch.save file (no torch magic number). Re-save "
            "the weights with torch.save or as .safetensors.")
    if (version := plain()) != _LEGACY_PROTOCOL:
        raise TorchCheckpointError(f"{path}: unsupported legacy torch.save protocol {version}.")
    sys_info = plain()
    byteorder = "little" if not isinstance(sys_info, dict) or sys_info.get(
        "little_endian", True) else "big"
    storages: dict[str, _Storage] = {}

    def load_storage(args: tuple) -> _Storage:
        dtype, key, numel = _storage_args(args[:4], 4)
        view = args[4] if len(args) == 5 else None
        if key not in storages:
            storages[key] = _Storage(key, dtype, numel)
        if view is None:
            return storages[key]
        view_key, offset, view_size = view
        if view_key not in storages:
            sub = _Storage(view_key, dtype, view_size)
            sub.base, sub.offset = storages[key], offset
            storages[view_key] = sub
        return storages[view_key]

    obj = _SafeUnpickler(f, path, load_storage).load()
    keys = plain()
    if not isinstance(keys, list):
        raise TypeError("storage key list missing")
    for key in keys:
        storage = storages[key]
        (numel,) = struct.unpack("<q" if byteorder == "little" else ">q", f.read(8))
        nbytes = numel * np.dtype(storage.dtype.code or "u1").itemsize
        storage.data = f.read(nbytes)
        if len(storage.data) != nbytes:
            raise EOFError(f"storage {key} is cut short")
    return _materialize(obj, byteorder)


def _is_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= size - 8 and head[8:9] == b"{"


def _load_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:  # SafetensorError, OSError, TypeError for unknown dtypes
        raise TorchCheckpointError(
            f"{path} looks like a safetensors file but cannot be read ({e}); it is probably "
            "truncated or corrupt: download or export it again.") from e
    widened = []
    for k, v in tensors.items():
        if v.dtype.name == "bfloat16" or v.dtype.name.startswith("float8"):
            tensors[k] = v.astype(np.float32)
            widened.append(k)
    if widened:
        log.info("%s: widened %d bfloat16/float8 tensors to float32 (NumPy has no such type)",
                 path, len(widened))
    return tensors


def load_torch_file(path: PathLike) -> Any:
    """Load a weight file without torch: tensors become ``np.ndarray``, the rest plain Python.

    Returns the whole saved object (e.g. ``{'epoch': 3, 'state_dict': {...}}``); use
    :func:`read_state_dict` to get just the weights.  Raises :class:`CheckpointNotFoundError`,
    :class:`UnsafeCheckpointError` (a pickle wanted a forbidden global) or
    :class:`TorchCheckpointError` (unknown format, truncated, corrupt, unsupported dtype).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"weight file {path} does not exist{' (it is a directory)' if path.is_dir() else ''}"
            ": check the path (see histo_jax.models.pretrained.imagenet_weights_path for the "
            "ImageNet weights).")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(512)
        try:
            if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
                return _load_zip(path)
            if _is_safetensors(head, size):
                return _load_safetensors(path)
            if head[:1] == b"\x80":
                f.seek(0)
                return _load_legacy(path, f)
        except TorchCheckpointError:
            raise
        except Exception as e:  # any decoding failure means a damaged or foreign file
            raise TorchCheckpointError(
                f"{path} is truncated or corrupt ({type(e).__name__}: {e}). Download or "
                "re-save it (torch.save or .safetensors).") from e
    if head[257:262] == b"ustar":
        raise TorchCheckpointError(
            f"{path} uses the tar-based torch.save format of PyTorch < 0.4, which is not "
            "supported: load it with an old torch and re-save it with torch.save.")
    what = "empty" if size == 0 else f"starts with {head[:8]!r}"
    raise TorchCheckpointError(
        f"{path} is neither a safetensors file nor a torch.save checkpoint ({what}). "
        "Expected a .safetensors file or a .pth/.pt/.bin/.ckpt written by torch.save.")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and any(
        isinstance(v, np.ndarray) for v in obj.values())


def _find_state_dict(obj: Any, path: pathlib.Path, key: str | None) -> Mapping:
    if key is not None:
        for part in key.split("/"):
            if not isinstance(obj, Mapping) or part not in obj:
                raise TorchCheckpointError(
                    f"{path} has no entry {key!r}; top-level keys: {_keys(obj)}.")
            obj = obj[part]
        if not _is_state_dict(obj):
            raise TorchCheckpointError(f"{path}: entry {key!r} holds no tensors.")
        return obj
    for _ in range(4):  # e.g. {'model': {'state_dict': {...}}}
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, np.ndarray) for v in obj.values()):
            return obj
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if _is_state_dict(obj):
        return obj
    raise TorchCheckpointError(
        f"{path} holds no state dict: expected a dict of tensors, possibly under one of "
        f"{list(CONTAINER_KEYS)}; found {type(obj).__name__} with keys {_keys(obj)}. "
        "Pass key='<entry>' to pick the entry that holds the weights.")


def _keys(obj: Any) -> list:
    return list(obj)[:20] if isinstance(obj, Mapping) else []


def read_state_dict(path: PathLike, *, key: str | None = None) -> dict[str, np.ndarray]:
    """Read the weights of a ``.safetensors`` or ``torch.save`` file as ``{name: ndarray}``.

    A checkpoint dict is unwrapped: a dict whose values are all tensors is the state dict,
    else the first of ``state_dict``, ``model_state_dict``, ``model``, ``module`` holding
    one (``key='a/b'`` picks an entry explicitly).  Non-tensor entries of the state dict
    are dropped, and a ``module.`` (DataParallel) prefix shared by all keys is removed.
    Never imports torch and never executes code from the file (see module docstring).
    """
    path = pathlib.Path(path)
    sd = _find_state_dict(load_torch_file(path), path, key)
    out = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, np.ndarray)}
    if dropped := [k for k in sd if k not in out]:
        log.info("%s: ignoring %d non-tensor entries: %s", path, len(dropped), dropped[:10])
    if out and all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
    return out
