"""Imports and threads: nothing is imported for the first time from a thread other than the
main one once the entry modules are loaded.

While any thread is inside etils' ``epy.lazy_imports()`` (TFDS, Orbax and Grain enter it
while their modules are imported), the global ``__import__`` is patched for every thread:
an import statement elsewhere then gets an unresolved ``LazyModule`` or a ValueError (seen
once as "'LazyModule' object is not callable" on a resume). Module-top imports, done once
in the main thread, rule that out; this test holds the code to it.

A fresh interpreter imports the entry modules, then runs the threaded paths (slide reads,
tissue detection and crop writes in extraction's thread pool, prepared-record reads from
several threads, a Grain loader with worker processes, an Orbax checkpoint save and
restore), and records with an audit hook every module first imported by a thread other than
the main one. The hook itself is checked: a lazy import in a thread is caught."""
import json
import os
import subprocess
import sys
import textwrap

import datagen
from histo_jax.data import prepare
from histo_jax.slides import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent('''
    import json, sys, threading
    import numpy as np
    import jax.numpy as jnp
    import concurrent.futures as cf

    # The entry modules, as main.py, predict and the data command line import them.
    from histo_jax import checkpointing, train
    from histo_jax.data import pipeline, sources
    from histo_jax.slides import extract, reader

    seen = []

    def hook(event, args):
        if event == "import" and threading.current_thread() is not threading.main_thread():
            seen.append([args[0], threading.current_thread().name])
    sys.addaudithook(hook)

    args = json.loads(sys.argv[1])
    if args.get("self_check"):  # a module imported in a thread is seen
        t = threading.Thread(target=lambda: __import__("tabnanny"), name="check")
        t.start()
        t.join()
    else:
        # Slides: reads, tissue detection, PNG writes, in extraction's threads.
        cfg = extract.ExtractConfig(fovs=extract.geometry.parse_fovs("64,128", "px"),
                                    stride=256, workers=4)
        result = extract.extract([args["slide"]], args["crops"], cfg, progress=False,
                                 log=lambda m: None)
        assert result.ok and result.slides["A"]["written"] == 40, result.format()
        with reader.open_slide(args["slide"]) as slide, cf.ThreadPoolExecutor(4) as pool:
            crops = list(pool.map(lambda k: slide.read_field(300 + 50 * k, 400, 256), range(8)))
        assert all(c.shape == (256, 256, 3) for c in crops)
        # Prepared records, opened and read from several threads at once.
        src = sources.PreparedSource(args["prepared"])
        with cf.ThreadPoolExecutor(4) as pool:
            recs = list(pool.map(lambda i: src[i], range(len(src))))
        assert len(recs) == len(src)
        # A Grain loader with worker processes (and its reader threads).
        loader = pipeline.make_train_loader(src, np.arange(len(src)), global_batch_size=4,
                                            num_inputs=2, seed=0, num_workers=2)
        it = iter(loader)
        batch = next(it)
        assert batch["images"].shape[0] == 4
        # An Orbax checkpoint save (its own threads) and restore.
        ckpt = checkpointing.Checkpoints(args["workdir"])
        state = {"w": jnp.arange(6.0), "step": jnp.int32(3)}
        ckpt.save_latest(3, state, it, checkpointing.LoopState())
        ckpt.close()
        ckpt = checkpointing.Checkpoints(args["workdir"])
        step, restored, _ = ckpt.restore_latest(state)
        ckpt.close()
        assert step == 3 and np.array_equal(np.asarray(restored["w"]), np.arange(6.0))
        it.close() if hasattr(it, "close") else None
        del it, loader
    print(json.dumps({"imported_in_threads": seen}))
''')


def _run(args: dict) -> list:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu",
                                   XLA_FLAGS="--xla_force_host_platform_device_count=1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["imported_in_threads"]


def test_threaded_paths_import_nothing_in_threads(tmp_path):
    data = str(tmp_path / "data")
    datagen.write_valid_dataset(data, num_ids=10, per_id=1)
    cfg = datagen.tiny_data_config(data, prepared_dir=str(tmp_path / "prepared"))
    cfg.scales = cfg.scales[:2]
    prepared = prepare.prepare_dataset(cfg, log=lambda m: None, progress=False)
    slide = str(tmp_path / "A.tiff")
    synthetic.write_pyramid_tiff(slide, synthetic.toy_slide(2048, 1536, seed=0, hole=300),
                                 0.25)
    args = {"slide": slide, "crops": str(tmp_path / "crops"), "prepared": prepared.path,
            "workdir": str(tmp_path / "wd")}
    assert ["tabnanny", "check"] in _run({"self_check": True})
    imported = _run(args)
    assert imported == [], "\n".join(map(str, imported))
