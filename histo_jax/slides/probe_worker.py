"""The isolated slide reader (:class:`histo_jax.slides.reader.IsolatedProbe`): reads JSON
paths, one per line, on stdin; answers ``{"reason": null | "..."}`` per line on stdout.

    python -m histo_jax.slides.probe_worker [module:function]

The probe function (default :func:`histo_jax.slides.reader.probe`) opens each slide and
decodes a sample of it; if OpenSlide crashes or hangs on a file, only this process goes.
The answers go to a private copy of stdout: anything a C library prints lands on stderr.
"""
from __future__ import annotations

import importlib
import json
import os
import sys


def main() -> None:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # C libraries' prints (libtiff warnings) cannot corrupt the answers
    if len(sys.argv) > 1:
        module, _, name = sys.argv[1].partition(":")
        fn = getattr(importlib.import_module(module), name)
    else:
        from histo_jax.slides.reader import probe as fn
    for line in sys.stdin:
        path = json.loads(line)
        try:
            reason = fn(path)
        except Exception as e:  # noqa: BLE001 - any failure means the slide is unusable
            reason = f"reading it failed ({type(e).__name__}: {e})"
        out.write(json.dumps({"reason": reason}) + "\n")


if __name__ == "__main__":
    main()
