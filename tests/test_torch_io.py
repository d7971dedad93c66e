"""Torch-free reading of PyTorch weight files (fixtures from scripts/make_torch_io_fixtures.py)."""
from __future__ import annotations

import collections
import io
import pathlib
import pickle
import pickletools
import sys
import types
import zipfile

import numpy as np
import pytest

from histo_jax.models.torch_io import (
    CheckpointNotFoundError,
    TorchCheckpointError,
    UnsafeCheckpointError,
    load_torch_file,
    read_state_dict,
)

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "torch_io"
PWNED_FILE = "PWNED_BY_TORCH_IO_FIXTURE"


@pytest.fixture(scope="module")
def expected() -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    with np.load(FIXTURES / "expected.npz") as npz:
        for k in npz.files:
            stem, name = k.split("|", 1)
            out[stem][name] = npz[k]
    return out


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype and g.shape == w.shape, (k, g.dtype, g.shape, w.dtype, w.shape)
        np.testing.assert_array_equal(g, w, err_msg=k)


# ---------------------------------------------------------------- real torch.save files
@pytest.mark.parametrize("name", ["tensors.pth", "tensors_legacy.pth"])
def test_reads_every_dtype_and_layout_exactly(name, expected):
    sd = read_state_dict(FIXTURES / name)
    assert_same(sd, expected["tensors"])
    assert sd["bf16"].dtype == np.float32 and sd["f16"].dtype == np.float16
    assert sd["i64"][2] == 2**40 and sd["bool"].dtype == np.bool_
    assert sd["scalar"].shape == () and float(sd["scalar"]) == 3.5
    assert sd["transposed"].shape == (4, 3) and sd["strided_slice"].shape == (3, 3)
    np.testing.assert_array_equal(sd["shared_a"], [2, 3, 4, 5, 6])
    np.testing.assert_array_equal(sd["shared_b"], [[1, 2, 3, 4], [6, 7, 8, 9]])
    # Views are copied out of the storage: independent, writable, contiguous arrays.
    for arr in sd.values():
        assert arr.flags.c_contiguous and arr.flags.writeable
    sd["shared_a"][:] = -1
    assert sd["shared_b"][0, 0] == 1


def test_checkpoint_dict_is_unwrapped_and_plain_values_survive(expected):
    assert_same(read_state_dict(FIXTURES / "checkpoint.pth"), expected["checkpoint"])
    ckpt = load_torch_file(FIXTURES / "checkpoint.pth")
    assert ckpt["epoch"] == 3 and ckpt["best_f1"] == 0.75 and ckpt["run"] == "n4_run0"
    assert ckpt["history"] == [0.5, 0.75] and ckpt["shape"] == (1, 2)
    assert ckpt["tags"] == {"a", "b"} and ckpt["blob"] == b"\x00\xffbytes"
    assert ckpt["config"] == {"lr": 3e-4, "inputs": [1024, 2048]}
    adam = ckpt["optimizer"]["state"][0]
    assert adam["exp_avg"].shape == expected["checkpoint"]["0.weight"].shape


def test_dataparallel_prefix_is_stripped(expected):
    assert_same(read_state_dict(FIXTURES / "dataparallel.pth"), expected["checkpoint"])


def test_big_endian_archive(tmp_path, expected):
    """Re-pack a real archive as a big-endian machine would have written it."""
    src = zipfile.ZipFile(FIXTURES / "float32_pair.pth")
    dst = tmp_path / "big.pth"
    with zipfile.ZipFile(dst, "w") as zf:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:  # every storage in this file is float32
                data = np.frombuffer(data, "<f4").astype(">f4").tobytes()
            zf.writestr(info, data)
    sd = read_state_dict(dst)
    assert_same(sd, expected["float32_pair"])
    assert sd["a"].dtype.isnative


# ---------------------------------------------------------------- nothing from a file runs
def _system_global(path: pathlib.Path) -> str:
    data = path.read_bytes()
    if zipfile.is_zipfile(path):
        data = zipfile.ZipFile(path).read("malicious/data.pkl")
    else:  # legacy stream: the hostile pickle follows three small header pickles
        f = io.BytesIO(data)
        for _ in range(3):
            pickle.load(f)
        data = f.read()
    return next(arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL")


@pytest.mark.parametrize("name", ["malicious.pth", "malicious_legacy.pth"])
def test_malicious_pickle_is_refused_and_not_run(name, tmp_path, monkeypatch):
    path = FIXTURES / name
    module, func = _system_global(path).split(" ")
    assert func == "system"  # the fixture really is a hostile payload
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match=rf"'{module}\.system'") as err:
        read_state_dict(path)
    assert str(path) in str(err.value)
    assert not (tmp_path / PWNED_FILE).exists()
    assert list(tmp_path.iterdir()) == []


class _Call:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _zip_with_pickle(path: pathlib.Path, payload: bytes, **records: bytes) -> pathlib.Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        for name, data in records.items():
            zf.writestr(f"archive/{name}", data)
    return path


_BUILTIN = r"(builtins|__builtin__)"  # pickle protocols < 3 write Python 2 module names


@pytest.mark.parametrize("obj, name", [
    (_Call(eval, "1 + 1"), rf"{_BUILTIN}\.eval"),
    (_Call(exec, "x = 1"), rf"{_BUILTIN}\.exec"),
    (_Call(getattr, 1, "real"), rf"{_BUILTIN}\.getattr"),
    (_Call(collections.Counter, "ab"), r"collections\.Counter"),
    (_Call(pathlib.Path.unlink, pathlib.Path("x")),
     rf"({_BUILTIN}\.getattr|pathlib\.Path\.unlink)"),
], ids=["eval", "exec", "getattr", "counter", "unlink"])
@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_any_other_global_is_refused(tmp_path, obj, name, protocol):
    path = _zip_with_pickle(tmp_path / "bad.pth", pickle.dumps({"w": obj}, protocol=protocol))
    with pytest.raises(UnsafeCheckpointError, match=f"refusing to load the global '{name}'"):
        read_state_dict(path)


def test_non_storage_persistent_id_is_refused(tmp_path):
    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("module", "torch.nn", "source") if obj == "m" else None

    buf = io.BytesIO()
    P(buf, protocol=2).dump({"m": "m"})
    path = _zip_with_pickle(tmp_path / "bad.pth", buf.getvalue())
    with pytest.raises(UnsafeCheckpointError, match="'module'"):
        load_torch_file(path)


# ---------------------------------------------------------------- torch-free archive writer
@pytest.fixture
def write_archive(monkeypatch):
    """Write torch.save-style archives with fake ``torch`` modules (pickle needs them only
    to name the globals; the reader never imports anything)."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    storage_types = {}
    for tname in ("FloatStorage", "LongStorage"):
        cls = type(tname, (), {"__module__": "torch"})
        setattr(torch, tname, cls)
        storage_types[tname] = cls
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)

    class Tensor:
        def __init__(self, key, offset, size, stride):
            self.key, self.args = key, (offset, size, stride)

        def __reduce__(self):
            return (_rebuild_tensor_v2,
                    (("storage", self.key),) + self.args + (False, collections.OrderedDict()))

    def write(path, obj, storages: dict[str, np.ndarray], skip_records=()):
        class Pickler(pickle.Pickler):
            def persistent_id(self, o):
                if isinstance(o, tuple) and len(o) == 2 and o[0] == "storage":
                    arr = storages[o[1]]
                    kind = "LongStorage" if arr.dtype == np.int64 else "FloatStorage"
                    return ("storage", storage_types[kind], o[1], "cpu", arr.size)
                return None

        buf = io.BytesIO()
        Pickler(buf, protocol=2).dump(obj)
        records = {f"data/{k}": v.astype(v.dtype.newbyteorder("<")).tobytes()
                   for k, v in storages.items() if k not in skip_records}
        return _zip_with_pickle(path, buf.getvalue(), byteorder=b"little", **records)

    write.Tensor = Tensor
    return write


def test_nested_containers_and_mixed_dicts(tmp_path, write_archive):
    T = write_archive.Tensor
    storages = {"0": np.arange(6, dtype=np.float32), "1": np.array([7], dtype=np.int64)}
    weights = {"module.fc.weight": T("0", 0, (2, 3), (3, 1)),
               "module.fc.bias": T("0", 4, (2,), (1,))}
    nested = write_archive(tmp_path / "nested.pth",
                           {"epoch": 1, "model": {"state_dict": weights, "arch": "x"}}, storages)
    sd = read_state_dict(nested)
    assert sorted(sd) == ["fc.bias", "fc.weight"]
    np.testing.assert_array_equal(sd["fc.bias"], [4, 5])

    mixed = write_archive(tmp_path / "mixed.pth",
                          {"step": T("1", 0, (), ()), "epoch": 2, "w": T("0", 1, (2, 2), (1, 2))},
                          storages)
    sd = read_state_dict(mixed)
    assert sorted(sd) == ["step", "w"] and sd["step"].dtype == np.int64 and sd["step"] == 7
    np.testing.assert_array_equal(sd["w"], [[1, 3], [2, 4]])

    picked = write_archive(tmp_path / "picked.pth",
                           {"ema": {"w": T("0", 0, (6,), (1,))}, "state_dict": weights}, storages)
    assert sorted(read_state_dict(picked, key="ema")) == ["w"]
    with pytest.raises(TorchCheckpointError, match="no entry 'nope'"):
        read_state_dict(picked, key="nope")


def test_checkpoint_without_weights_says_so(tmp_path, write_archive):
    path = write_archive(tmp_path / "meta.pth", {"epoch": 3, "args": {"lr": 1e-3}}, {})
    with pytest.raises(TorchCheckpointError, match=r"holds no state dict.*'epoch'"):
        read_state_dict(path)


@pytest.mark.parametrize("case", ["past_end", "missing_record", "bad_geometry"])
def test_damaged_tensors_are_reported(tmp_path, write_archive, case):
    T = write_archive.Tensor
    storages = {"0": np.arange(4, dtype=np.float32)}
    tensor = {"past_end": T("0", 2, (2, 2), (2, 1)), "missing_record": T("0", 0, (4,), (1,)),
              "bad_geometry": T("0", 0, (2, 2), (1,))}[case]
    path = write_archive(tmp_path / "bad.pth", {"w": tensor}, storages,
                         skip_records=("0",) if case == "missing_record" else ())
    with pytest.raises(TorchCheckpointError, match=r"bad\.pth is truncated or corrupt"):
        read_state_dict(path)


# ---------------------------------------------------------------- unreadable files
def test_missing_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="nowhere.pth does not exist") as err:
        read_state_dict(tmp_path / "nowhere.pth")
    assert isinstance(err.value, FileNotFoundError)


@pytest.mark.parametrize("source, cut", [("tensors.pth", 0.5), ("tensors.pth", 0.97),
                                         ("tensors_legacy.pth", 0.5),
                                         ("tensors_legacy.pth", 0.97)])
def test_truncated_files(tmp_path, source, cut):
    data = (FIXTURES / source).read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(TorchCheckpointError, match=r"cut\.pth is truncated or corrupt"):
        read_state_dict(path)


@pytest.mark.parametrize("content, match", [
    (b"", "empty"),
    (b"hello world, not weights" * 10, "neither a safetensors file nor a torch.save"),
    (pickle.dumps({"w": 1.0}, protocol=2), "not a torch.save file"),
])
def test_foreign_files(tmp_path, content, match):
    path = tmp_path / "x.bin"
    path.write_bytes(content)
    with pytest.raises(TorchCheckpointError, match=match):
        read_state_dict(path)


def test_torchscript_and_npz_are_refused_with_a_hint():
    with pytest.raises(TorchCheckpointError, match="TorchScript archive"):
        read_state_dict(FIXTURES / "torchscript.pt")
    with pytest.raises(TorchCheckpointError, match=r"\.npz\? load it with numpy.load"):
        read_state_dict(FIXTURES / "expected.npz")


# ---------------------------------------------------------------- safetensors
def test_safetensors_round_trip(tmp_path):
    import ml_dtypes
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    arrays = {"w": rng.normal(size=(3, 4)).astype(np.float32),
              "h": rng.normal(size=5).astype(np.float16),
              "n": np.array(12, dtype=np.int64), "m": np.array([True, False])}
    bf16 = rng.normal(size=(2, 2)).astype(ml_dtypes.bfloat16)
    path = tmp_path / "w.safetensors"
    save_file({**arrays, "module_b": bf16}, str(path))
    sd = read_state_dict(path)
    assert_same({k: v for k, v in sd.items() if k != "module_b"}, arrays)
    assert sd["module_b"].dtype == np.float32
    np.testing.assert_array_equal(sd["module_b"], bf16.astype(np.float32))

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(TorchCheckpointError, match=r"cut\.safetensors .*truncated or corrupt"):
        read_state_dict(cut)
