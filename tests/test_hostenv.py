"""The host allocator setting of the entry points (histo_jax/hostenv.py)."""
import os
import subprocess
import sys

import pytest

from histo_jax import hostenv


def test_adds_the_tunable_once_and_keeps_the_users_tunables():
    env = hostenv.tuned_environment({"PATH": "/bin"}, thp_available=True)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": hostenv.TUNABLE}
    env = hostenv.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, thp_available=True)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + hostenv.TUNABLE
    # Already there (the restarted process, or the user's own choice): nothing to do.
    assert hostenv.tuned_environment(env, thp_available=True) is None
    # The user's own value of one tunable is kept; the others are added.
    env = hostenv.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},
                                    thp_available=True)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0:" + ":".join(hostenv.KEEP_MEMORY)
    assert hostenv.tuned_environment(env, thp_available=True) is None


def test_opt_out_means_no_restart_and_no_huge_pages_means_keep_memory_only():
    assert hostenv.tuned_environment({hostenv.OPT_OUT_ENV: "0"}, thp_available=True) is None
    env = hostenv.tuned_environment({}, thp_available=False)
    assert env["GLIBC_TUNABLES"] == ":".join(hostenv.KEEP_MEMORY)
    assert hostenv.tuned_environment(env, thp_available=False) is None


def test_keep_step_memory_runs_programs_on_the_calling_thread_only_with_the_tunables():
    """keep_step_memory turns XLA:CPU's async dispatch off when glibc keeps freed memory
    (the step buffers then come from the main heap and stay for the next step; measured in
    benchmarks/README.md), and leaves it on otherwise."""
    script = ("from histo_jax import hostenv\n"
              "kept = hostenv.keep_step_memory()\n"
              "import jax\n"
              "print(kept, jax.config.values['jax_cpu_enable_async_dispatch'])\n")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = {}
    for name, tunables in (("kept", hostenv.TUNABLE), ("default", "glibc.malloc.hugetlb=1"),
                           ("mmap", "glibc.malloc.mmap_max=65536:glibc.malloc.trim_threshold=1")):
        env["GLIBC_TUNABLES"] = tunables
        out[name] = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                                   text=True, check=True).stdout.split()
    assert out == {"kept": ["True", "False"], "default": ["False", "True"],
                   "mmap": ["False", "True"]}


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hostenv._thp_available(),
                    reason="needs Linux with transparent huge pages")
def test_entry_point_restarts_itself_with_the_tunable(tmp_path):
    script = tmp_path / "entry.py"
    script.write_text(
        "import os, sys\n"
        "from histo_jax import hostenv\n"
        "print('start', flush=True)\n"
        "hostenv.reexec_with_malloc_tuning()\n"
        "print('tunables', os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostenv.OPT_OUT_ENV)}
    out = subprocess.run([sys.executable, str(script), "--flag=1"], env=env, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    # Started twice (the second time with the tunable), same arguments, then ran on.
    assert out == ["start", "start", f"tunables {hostenv.TUNABLE} ['--flag=1']"]
    env[hostenv.OPT_OUT_ENV] = "0"
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == ["start", "tunables None []"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_release_free_memory_returns_freed_heap_pages():
    """Freed small-chunk memory stays resident until malloc_trim hands it back."""
    script = (
        "import ctypes, ctypes.util\n"
        "from histo_jax import hostenv\n"
        "libc = ctypes.CDLL(ctypes.util.find_library('c'))\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        "def rss():\n"
        "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1])\n"
        "ptrs = [libc.malloc(64 * 1024) for _ in range(4000)]\n"  # 256 MB of heap chunks
        "for p in ptrs: ctypes.memset(p, 1, 64 * 1024)\n"
        "keep = libc.malloc(100 * 1024)\n"  # from the heap top (no free chunk that large):
        # it pins the top, so free() alone cannot shrink the heap
        "for p in ptrs: libc.free(p)\n"
        "before = rss()\n"
        "released = hostenv.release_free_memory()\n"
        "print(released, before - rss())\n")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env[hostenv.OPT_OUT_ENV] = "0"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == "True"
    assert int(out[1]) > 200 * 1024  # kB: most of the 256 MB went back to the system


def test_compiled_on_first_call_compiles_once_per_shape_and_build_caches_can_go(monkeypatch):
    """CompiledOnFirstCall: one ahead-of-time compile (then malloc_trim) per argument shape,
    the jitted function's numbers; release_build_memory empties the jit caches."""
    import jax
    import jax.numpy as jnp
    trims = []
    monkeypatch.setattr(hostenv, "release_free_memory", lambda: trims.append(1) or True)
    traced = []

    def f(x):
        traced.append(x.shape)
        return x * 2 + 1

    step = hostenv.CompiledOnFirstCall(jax.jit(f))
    for shape in ((3,), (3,), (2, 2), (3,)):
        x = jnp.arange(int(jnp.prod(jnp.asarray(shape))), dtype=jnp.float32).reshape(shape)
        assert jnp.array_equal(step(x), x * 2 + 1)
    assert traced == [(3,), (2, 2)] and len(trims) == 2 and len(step.compiled) == 2
    # Another dtype, same shape: the last program refuses it, a new one is compiled.
    assert jnp.array_equal(step(jnp.arange(3)), jnp.arange(3) * 2 + 1)
    assert step(jnp.arange(3)).dtype == jnp.int32 and len(step.compiled) == 3
    trims.clear()
    jitted = jax.jit(f)
    jitted(jnp.ones(4))
    assert jitted._cache_size() == 1
    hostenv.release_build_memory()
    assert jitted._cache_size() == 0 and len(trims) == 1
