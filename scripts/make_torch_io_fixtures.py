"""Write the small PyTorch checkpoint fixtures used by ``tests/test_torch_io.py``.

The tests must run WITHOUT torch, so the ``.pth`` files are produced once by a real
``torch.save`` and committed, together with ``expected.npz`` (the arrays each file must
decode to, bfloat16 already widened to float32).  Run it only when the fixtures must change,
from the repository root, with the PyTorch venv::

    .venv-torch/bin/python scripts/make_torch_io_fixtures.py

It writes into ``tests/fixtures/torch_io/``:

* ``tensors.pth`` - a plain state dict: every supported dtype, a transposed and a strided
  slice (non-contiguous views), two views sharing one storage at different offsets,
  0-d tensors and an ``nn.Parameter``;
* ``tensors_legacy.pth`` - the same dict in the pre-1.6 (non-zip) ``torch.save`` format;
* ``checkpoint.pth`` - ``{'epoch': 3, 'state_dict': ..., 'optimizer': ...}`` plus plain
  Python values (str, float, list, tuple, set, bytes, nested dicts);
* ``dataparallel.pth`` - ``nn.DataParallel(model).state_dict()`` (``module.`` prefix);
* ``float32_pair.pth`` - two float32 tensors (the test re-packs it as big-endian);
* ``torchscript.pt`` - a ``torch.jit.save`` archive (must be refused with a hint);
* ``malicious.pth`` / ``malicious_legacy.pth`` - zip and legacy layouts whose pickle calls
  ``os.system('echo pwned > PWNED_BY_TORCH_IO_FIXTURE')``, written with plain pickle;
* ``expected.npz`` - keys ``<file stem>|<state-dict key>``.
"""
from __future__ import annotations

import io
import os
import pathlib
import pickle
import sys
import zipfile

import numpy as np

# torchvision is not needed here; torch alone imports fine beside it.
import torch
from torch import nn

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "torch_io"
PWNED_FILE = "PWNED_BY_TORCH_IO_FIXTURE"


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy().copy()


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 4, generator=g)
    shared = torch.arange(10, dtype=torch.float32)
    wide = torch.randn(4, 6, generator=g)
    return {
        "conv.weight": torch.randn(2, 3, 3, 3, generator=g),
        "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "f64": torch.randn(2, 2, generator=g).double(),
        "i64": torch.tensor([-3, 0, 2**40], dtype=torch.int64),
        "i32": torch.tensor([[-7, 8], [9, 2**30]], dtype=torch.int32),
        "i16": torch.tensor([-300, 300], dtype=torch.int16),
        "i8": torch.tensor([-5, 5], dtype=torch.int8),
        "u8": torch.tensor([0, 7, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "transposed": base.t(),
        "strided_slice": wide[1:, ::2],
        "shared_a": shared[2:7],
        "shared_b": shared.view(2, 5)[:, 1:],
        "scalar": torch.tensor(3.5),
        "bn.num_batches_tracked": torch.tensor(12, dtype=torch.int64),
        "param": nn.Parameter(torch.randn(3, generator=g)),
        "empty": torch.zeros(0, 4),
    }


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    model(torch.randn(6, 3)).sum().backward()  # BN running stats + grads for the optimiser
    return model


class _SystemCall:
    """Pickles as ``os.system(cmd)``: what a hostile checkpoint does on load."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _write_zip(path: pathlib.Path, data_pkl: bytes) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("malicious/data.pkl", data_pkl)
        zf.writestr("malicious/byteorder", "little")
        zf.writestr("malicious/version", "3\n")


def _legacy_prefix() -> bytes:
    buf = io.BytesIO()
    pickle.dump(0x1950A86A20F9469CFC6C, buf, protocol=2)  # torch.serialization.MAGIC_NUMBER
    pickle.dump(1001, buf, protocol=2)  # PROTOCOL_VERSION
    pickle.dump({"protocol_version": 1001, "little_endian": True,
                 "type_sizes": {"short": 2, "int": 4, "long": 4}}, buf, protocol=2)
    return buf.getvalue()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    expected: dict[str, np.ndarray] = {}

    tensors = _tensors()
    torch.save(tensors, OUT / "tensors.pth")
    torch.save(tensors, OUT / "tensors_legacy.pth", _use_new_zipfile_serialization=False)
    for k, v in tensors.items():
        expected[f"tensors|{k}"] = _np(v)

    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt.step()
    sd = model.state_dict()
    torch.save({"epoch": 3, "best_f1": 0.75, "run": "n4_run0", "history": [0.5, 0.75],
                "shape": (1, 2), "tags": {"a", "b"}, "blob": b"\x00\xffbytes",
                "config": {"lr": 3e-4, "inputs": [1024, 2048]},
                "state_dict": sd, "optimizer": opt.state_dict()},
               OUT / "checkpoint.pth")
    for k, v in sd.items():
        expected[f"checkpoint|{k}"] = _np(v)

    torch.save(nn.DataParallel(model).state_dict(), OUT / "dataparallel.pth")

    pair = {"a": torch.linspace(-1, 1, 6).reshape(2, 3), "b": torch.tensor([1.5, -2.25])}
    torch.save(pair, OUT / "float32_pair.pth")
    for k, v in pair.items():
        expected[f"float32_pair|{k}"] = _np(v)

    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), OUT / "torchscript.pt")

    payload = pickle.dumps({"weight": _SystemCall(f"echo pwned > {PWNED_FILE}")}, protocol=2)
    _write_zip(OUT / "malicious.pth", payload)
    (OUT / "malicious_legacy.pth").write_bytes(_legacy_prefix() + payload)

    np.savez(OUT / "expected.npz", **expected)
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {len(list(OUT.iterdir()))} files, {total} bytes, into {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
