"""Host memory settings for XLA:CPU: glibc's malloc told to use huge pages and to keep the
memory a step frees, so that the next step does not page-fault it back in.

XLA:CPU allocates each step's temp buffer (0.8 GB for a 1-input train step at batch 25,
2.2 GB for 3 inputs, 3.1 GB for 4) with ``posix_memalign``. glibc serves an allocation that
large with a fresh ``mmap`` and unmaps it on free, so every step page-faults the whole
buffer back in:

* 4 KiB at a time, that was 2.1 M faults and about 3 s of kernel time out of a 12.6 s
  4-input step. ``glibc.malloc.hugetlb=1`` (glibc >= 2.35: transparent huge pages for
  malloc) cut it to about 6 K faults per step.
* Even so, each fault zeroes a fresh 2 MiB page. On a virtual machine the pages a process
  freed may go back to the host, and beside another busy process (the PyTorch worker of
  ``benchmarks/train_step.py``) the kernel then spent 3-5 s per 3-input step in
  ``clear_page`` (``perf``): 6.4-8.2 s per step against 4.4 s alone.

So glibc is also told never to ``mmap`` (``glibc.malloc.mmap_max=0``: large blocks come from
the heap) and never to shrink the heap on its own (``glibc.malloc.trim_threshold``, 64 GiB),
and XLA:CPU runs programs on the thread that calls them (:func:`keep_step_memory`), since
glibc's per-thread arenas fall back to ``mmap`` for blocks this large. The step's buffer then
comes from the main heap and stays there for the next step: a 3-input step beside PyTorch
takes 4.3 s, steadily, with 0.07 s of kernel time per step. Memory is handed back to the system
where it counts, after compiling (:func:`release_free_memory`).

glibc reads tunables once, when the process starts. So the entry points (``main.py``,
``python -m histo_jax.predict``, the benchmarks) call :func:`reexec_with_malloc_tuning`
first, and it restarts the same command line once with the tunables set. Tunables the user
set are kept; the restart is skipped when all are there, on non-Linux hosts, or when
``HISTO_JAX_MALLOC_TUNING=0``; huge pages are asked for only when the kernel has
transparent huge pages on.

:func:`release_free_memory` hands the heap memory that compiling left free back to the
system (``malloc_trim``): XLA's compiler peaks at ~2.3 GB for the 4-input train step, and
without it glibc keeps those pages, so that they add to the step's own temp buffer in the
process's peak memory.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Mapping

HUGE_PAGES = "glibc.malloc.hugetlb=1"
KEEP_MEMORY = ("glibc.malloc.mmap_max=0", f"glibc.malloc.trim_threshold={64 << 30}")
TUNABLES = (HUGE_PAGES, *KEEP_MEMORY)
TUNABLE = ":".join(TUNABLES)  # what a restart adds to an environment without tunables
OPT_OUT_ENV = "HISTO_JAX_MALLOC_TUNING"
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_available() -> bool:
    try:
        with open(_THP_ENABLED) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def _parse_tunables(text: str) -> dict[str, str]:
    """``GLIBC_TUNABLES`` text ('name=value:name=value') as a dict."""
    return dict(t.split("=", 1) for t in text.split(":") if "=" in t)


def tuned_environment(environ: Mapping[str, str], *, thp_available: bool | None = None) -> dict | None:
    """The environment to restart with, or None when nothing needs to change."""
    if environ.get(OPT_OUT_ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    present = _parse_tunables(tunables)
    wanted = TUNABLES if (_thp_available() if thp_available is None else thp_available) \
        else KEEP_MEMORY
    missing = [t for t in wanted if t.split("=", 1)[0] not in present]
    if not missing:
        return None  # Already set, by us or by the user.
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join([tunables, *missing] if tunables else missing)
    return env


def keep_step_memory() -> bool:
    """Makes XLA:CPU run each program on the calling thread (``jax_cpu_enable_async_dispatch``
    off) when glibc keeps freed memory (``KEEP_MEMORY`` in ``GLIBC_TUNABLES``), so that a
    step's buffers come from the main heap and stay resident for the next step (module
    docstring). Returns whether it did; other backends are not affected. Call it in an entry
    point, before the first computation."""
    tunables = _parse_tunables(os.environ.get("GLIBC_TUNABLES", ""))
    if (tunables.get("glibc.malloc.mmap_max") != "0"
            or "glibc.malloc.trim_threshold" not in tunables):
        return False
    import jax
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True


def reexec_with_malloc_tuning() -> None:
    """Restarts this process's command line once with :data:`TUNABLE` in ``GLIBC_TUNABLES``.

    Call it first thing in an entry point, before threads start and before heavy imports.
    It returns normally when no restart is needed; otherwise it does not return.
    """
    env = tuned_environment(os.environ)
    if env is None:
        return
    argv = [sys.executable, *getattr(sys, "orig_argv", [sys.executable, *sys.argv])[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


def release_free_memory() -> bool:
    """Returns free heap pages to the system (glibc ``malloc_trim(0)``, all arenas).

    Call it after compiling, before the first execution. Returns whether memory was
    released; a no-op returning False where the C library has no ``malloc_trim``.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))


class CompiledOnFirstCall:
    """A jitted step compiled ahead of its first call (on that call's arguments; again for
    arguments of new shapes), so that the compiler's freed memory goes back to the system
    (:func:`release_free_memory`) before the step allocates its own."""

    def __init__(self, jitted):
        self.jitted, self.compiled, self.last = jitted, {}, None

    def compile(self, *args):
        """The compiled program for these arguments (arrays or ``jax.ShapeDtypeStruct``),
        compiled now if it was not yet; its ``out_info`` describes the outputs."""
        import jax
        leaves, treedef = jax.tree.flatten(args)
        key = (treedef, tuple((getattr(x, "shape", None), getattr(x, "dtype", type(x)))
                              for x in leaves))
        if key not in self.compiled:
            self.compiled[key] = self.jitted.lower(*args).compile()
            release_free_memory()
        self.last = self.compiled[key]
        return self.last

    def __call__(self, *args):
        # The program of the last call first: a compiled program checks its arguments'
        # types itself, in C++, and refuses others with a TypeError before it runs (nothing
        # donated). Building this class's key on every call cost ~7 ms for a train state's
        # 800 arrays, ~100 ms per staged train step.
        if self.last is not None:
            try:
                return self.last(*args)
            except TypeError:
                pass
        return self.compile(*args)(*args)


def release_build_memory() -> bool:
    """After a model is built eagerly (op by op), before any step is compiled: empties JAX's
    caches, which hold the small program each of those ops compiled, and returns the freed
    heap to the system (``malloc_trim``). EfficientNet-B0 with 4 inputs: 373 -> 263 MB of
    RSS. Every jit cache is emptied, so call it once, at set-up."""
    import gc

    import jax
    jax.clear_caches()
    gc.collect()
    return release_free_memory()


_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
              "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")


def cpu_info(path: str = "/proc/cpuinfo") -> dict:
    """The CPU's vendor, model and the vector / matrix flags that decide XLA:CPU's and
    oneDNN's kernels (AVX-512, AVX512-BF16, AMX); what a benchmark's first line records."""
    fields: dict[str, str] = {}
    try:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        import platform  # noqa: PLC0415 - non-Linux hosts only
        return {"vendor": "", "model": platform.processor(), "flags": []}
    flags = set(fields.get("flags", "").split())
    return {"vendor": fields.get("vendor_id", ""), "model": fields.get("model name", ""),
            "flags": [f for f in _CPU_FLAGS if f in flags]}

