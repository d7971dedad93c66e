"""Cross-site evaluation: train on site A, test on site B, under several stain settings.

``run_cross_site(config, workdir)`` (``main.py`` with a config that has a ``cross_site``
block, e.g. ``configs/cross_site_demo.py``) trains one run per (setting, seed) on site A,
in ``<workdir>/<setting>/seed<s>/`` (each a workdir of its own: identity, resume,
checkpoints), tests its best weights on site A's own test split (as any run) and on every
sample of site B (``<cell>/site_b_metrics.json``). Without ``cross_site.site_a`` / ``site_b``,
site A is the embedded demo dataset and site B the demo's second site (written once
into the cache, only the crop sizes of ``config.data.scales``). A setting is a set of overrides of
``config.data`` (e.g. ``{'stain_augment': {'method': 'hed'}}``); ``stain.file = 'fit'``
means the normaliser fitted on site A (``<workdir>/stain_site_a.json``, from site A's images
of the first scale). Writes ``results.csv`` / ``results.json`` / ``results.md`` (site-B
test macro-F1, mean and population std over the seeds, and site A's for comparison) and
``cross_site.png`` (one sample as each site stores it and as each setting feeds it to
the model). Finished cells are skipped when the command is rerun.
"""
from __future__ import annotations

import csv
import json
import logging
import os

import jax
import ml_collections
import numpy as np

from histo_jax import paths, train
from histo_jax import workdir as workdir_lib
from histo_jax.stain import normalize as stain_lib

log = logging.getLogger(__name__)

FIT = "fit"  # data.stain.file value: the normaliser fitted on site A


def ensure_demo_site_b(sizes) -> str:
    """Demo site B (only the crop sizes used), written once into the cache."""
    from histo_jax.data import demo  # noqa: PLC0415

    path = os.path.join(paths.cache_root(), "demo_site_b-" + "-".join(str(s) for s in sizes))
    if os.path.exists(os.path.join(path, "labels.csv")):
        return path
    log.info("Writing demo site B to %s (once).", path)
    tmp = f"{path}.tmp-{os.getpid()}"
    demo.write_demo_dataset(tmp, site="b", sizes=tuple(sizes))
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished first
        if not os.path.exists(os.path.join(path, "labels.csv")):
            raise
    return path


def site_dirs(config) -> tuple[str, str]:
    cs = config.cross_site
    if cs.site_a and cs.site_b:
        return os.path.expanduser(cs.site_a), os.path.expanduser(cs.site_b)
    if cs.site_a or cs.site_b:
        raise ValueError("cross_site: give both site_a and site_b, or neither (the demo sites).")
    # Site A is the embedded demo dataset (main.py's default data).
    sizes = sorted(int(s.rsplit("_", 1)[1]) for s in config.data.scales)
    return train.ensure_demo_dataset(config.data.get("demo_dir", "")), ensure_demo_site_b(sizes)


def _merge(cfg: ml_collections.ConfigDict, overrides: dict, where: str) -> None:
    for key, value in overrides.items():
        if key not in cfg:
            raise ValueError(f"cross_site setting: {where}.{key} is not a config field.")
        if isinstance(value, dict):
            _merge(cfg[key], value, f"{where}.{key}")
        else:
            cfg[key] = value


def cell_config(config, setting: str, seed: int, site_a: str, stain_file: str):
    """The single-run config of one (setting, seed): site A as data, the setting's overrides."""
    d = config.to_dict()
    del d["cross_site"]
    cfg = ml_collections.ConfigDict(d)
    cfg.grid.num_inputs, cfg.grid.runs = (), ()
    cfg.seed = int(seed)
    cfg.data.dir = site_a
    _merge(cfg.data, config.cross_site.settings[setting].to_dict(), "data")
    if cfg.data.stain.method != "none" and cfg.data.stain.file == FIT:
        cfg.data.stain.file = stain_file
    return cfg


def fit_site_a(config, site_a: str, path: str) -> str:
    """The normaliser fitted on site A's images (first scale, evenly chosen), once."""
    from histo_jax.stain import cli  # noqa: PLC0415

    methods = {s.stain.method for s in config.cross_site.settings.values()
               if "stain" in s and s.stain.get("file") == FIT}
    if not methods:
        return path
    if len(methods) > 1:
        raise ValueError(f"cross_site: settings fit {sorted(methods)} on site A; one method only.")
    method = methods.pop()
    beta = float(config.cross_site.get("fit_beta", stain_lib.DEFAULT_BETA))
    if os.path.exists(path):
        old = stain_lib.load(path)
        if old.method == method and old.beta == beta:
            return path
    
    images, names = cli.reference_images([os.path.join(site_a, config.data.scales[0])],
                                         max_images=int(config.cross_site.fit_images))
    stain_lib.fit(images, method, names=(os.path.join(site_a, config.data.scales[0]),),
                  beta=beta, what=f"site A ({site_a})").save(path)
    log.info("Fitted %s on %d images of site A -> %s", method, len(images), path)
    return path


def test_on(run_dir: str, data_dir: str, out: str) -> dict:
    """Test metrics of a finished run's best weights on every sample of ``data_dir`` (its
    preparation is cached and shared by all cells), with the run's preprocessing and stain
    normaliser; written to ``out`` (reused when it exists)."""
    from histo_jax import hostenv, parallel, predict, steps  # noqa: PLC0415 - predict imports train
    from histo_jax.data import pipeline, sources  # noqa: PLC0415
    from histo_jax.metrics import classification_metrics  # noqa: PLC0415

    if os.path.exists(out):
        with open(out) as f:
            return json.load(f)
    cfg, model = predict.load_run(run_dir)
    data_cfg = ml_collections.ConfigDict(cfg.data.to_dict())
    data_cfg.dir = data_dir
    source = sources.load_dataset(data_cfg, log=log.info)
    mesh = parallel.make_mesh()
    graphs, params, batch_stats = steps.split_model(model)
    repl = parallel.replicated(mesh)
    params, batch_stats = jax.device_put((params, batch_stats), repl)
    eval_step = hostenv.CompiledOnFirstCall(jax.jit(
        steps.make_eval_step(graphs, data_cfg.normalization, stain_lib.from_config(data_cfg.stain)),
        in_shardings=(repl, repl, parallel.batch_sharding(mesh)),
        compiler_options=steps.compiler_options(memory_scheduler=cfg.xla_cpu_memory_scheduler)))
    loader = pipeline.make_eval_loader(
        source, np.arange(len(source)), global_batch_size=cfg.eval_batch_size,
        num_inputs=cfg.num_inputs, process_index=jax.process_index(),
        process_count=jax.process_count())
    ev = train.evaluate_dataset(eval_step, params, batch_stats, loader, mesh)
    result = classification_metrics(ev["labels"], ev["logits"], cfg.model.num_classes)
    result["data_dir"] = data_dir
    if jax.process_index() == 0:
        workdir_lib.write_atomic(out, json.dumps(result, indent=2), "the site-B test metrics")
    log.info("%s on %s: macro-F1 %.4f, accuracy %.4f", run_dir, data_dir, result["macro_f1"],
             result["accuracy"])
    return result


def run_cross_site(config, workdir: str, *, discard_old_run: bool = False) -> list[dict]:
    """Trains every (setting, seed) on site A, tests on site B; writes the summary files."""
    site_a, site_b = site_dirs(config)
    cs = config.cross_site
    results = {}
    with train.hold_workdir(workdir):
        stain_file = fit_site_a(config, site_a, os.path.join(workdir, "stain_site_a.json"))
        for setting in cs.names:
            for seed in cs.seeds:
                wd = os.path.join(workdir, setting, f"seed{seed}")
                cfg = cell_config(config, setting, seed, site_a, stain_file)
                log.info("Cross-site cell: %s, seed %d -> %s", setting, seed, wd)
                site_a_result = train.train_and_evaluate(cfg, wd, discard_old_run=discard_old_run)
                site_b_result = test_on(wd, site_b, os.path.join(wd, "site_b_metrics.json"))
                results[(setting, seed)] = {"site_a": site_a_result["macro_f1"],
                                            "site_b": site_b_result["macro_f1"]}
        rows = summarize(results, list(cs.names), site_a, site_b)
        if jax.process_index() == 0:
            write_summary(rows, workdir)
            picture(config, site_a, site_b, stain_file, os.path.join(workdir, "cross_site.png"))
    return rows


def summarize(results: dict, settings: list[str], site_a: str, site_b: str) -> list[dict]:
    rows = []
    for setting in settings:
        cells = [results[k] for k in sorted(results) if k[0] == setting]
        b = np.array([c["site_b"] for c in cells])
        a = np.array([c["site_a"] for c in cells])
        rows.append({"setting": setting, "n_seeds": len(cells),
                     "mean_site_b_f1": float(b.mean()), "std_site_b_f1": float(b.std()),
                     "mean_site_a_test_f1": float(a.mean()), "std_site_a_test_f1": float(a.std()),
                     "site_b_f1_per_seed": [round(float(v), 4) for v in b],
                     "site_a": site_a, "site_b": site_b})
    return rows


def write_summary(rows: list[dict], workdir: str) -> None:
    with workdir_lib.writing("the cross-site summary", workdir):
        with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(rows, f, indent=2)
        lines = ["| setting | site B test macro-F1 | site A test macro-F1 | seeds |",
                 "|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['setting']} | {r['mean_site_b_f1']:.3f} ± {r['std_site_b_f1']:.3f} "
                         f"| {r['mean_site_a_test_f1']:.3f} ± {r['std_site_a_test_f1']:.3f} "
                         f"| {r['n_seeds']} |")
        with open(os.path.join(workdir, "results.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
    for line in lines:
        log.info("%s", line)
    log.info("Cross-site summary -> %s", os.path.join(workdir, "results.md"))


def picture(config, site_a: str, site_b: str, stain_file: str, path: str) -> str:
    """One sample of site A and one of site B (the first file of each), at the model's input
    size, as stored and as each setting feeds it to the model (one augmentation draw)."""
    import jax.numpy as jnp  # noqa: PLC0415
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    from histo_jax import plots  # noqa: PLC0415 - Agg backend
    from histo_jax.stain import augment as stain_aug  # noqa: PLC0415

    scale, size = config.data.scales[0], int(config.data.image_size)

    def first(site):
        with open(os.path.join(site, config.data.labels_file)) as f:
            name = f.read().splitlines()[1].split(",")[0]
        img = Image.open(os.path.join(site, scale, name + ".png")).convert("RGB")
        return name, np.asarray(img.resize((size, size), Image.BILINEAR)) / 255.0

    samples = [("site A", *first(site_a)), ("site B", *first(site_b))]
    if not (config.cross_site.site_a or config.cross_site.site_b):
        # The demo sites: the same tissue as site A holds it and as site B would stain it.
        from histo_jax.data import demo  # noqa: PLC0415
        name, label, strengths = demo.demo_plan(0, 40, 6)[0]
        fov = int(scale.rsplit("_", 1)[1])
        crop = demo.render_sample(0, 0, label, strengths, (fov,), demo.SITES["b"])[0][fov]
        same = np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR)) / 255.0
        samples[1] = ("site B staining", name, same)
    settings = list(config.cross_site.names)
    fig, axes = plt.subplots(2, len(settings), figsize=(2.6 * len(settings), 5.6), squeeze=False)
    for i, (site, name, img) in enumerate(samples):
        for j, setting in enumerate(settings):
            cfg = cell_config(config, setting, 0, site_a, stain_file)
            x = jnp.asarray(img, jnp.float32)[None, None]
            normalizer = stain_lib.from_config(cfg.data.stain)
            title = setting
            if normalizer is not None:
                x, ok = normalizer(x)
                title += "" if bool(ok.all()) else " (passed through)"
            aug = stain_aug.StainAugmentConfig.from_config(cfg.data.stain_augment)
            if aug.enabled:
                x = stain_aug.stain_augment(jax.random.PRNGKey(j + 7 * i), x, aug)
                title += " (one draw)"
            axes[i, j].imshow(np.clip(np.asarray(x[0, 0]), 0, 1))
            axes[i, j].set_title(f"{site}: {title}", fontsize=9)
            axes[i, j].set_xticks([]), axes[i, j].set_yticks([])
        axes[i, 0].set_ylabel(name, fontsize=8)
    fig.suptitle(f"{scale} crop at {size} px: what the model sees", fontsize=10)
    return plots._save(fig, path)
