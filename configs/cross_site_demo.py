"""Cross-site demo: train on site A, test on site B (other patients, other H&E staining),
with no stain handling, HED augmentation, and Macenko normalisation fitted on site A.

    python main.py --config=configs/cross_site_demo.py          # workdir: runs/cross_site_demo

The two demo sites (``python -m histo_jax.data demo --out DIR --sites 2`` writes them too)
are generated into the cache on first use; site B's haematoxylin and eosin vectors are
Macenko et al.'s reference matrix, with 1.3x haematoxylin and 0.75x eosin
(histo_jax/data/demo.py). Each setting trains 3 seeds (same split of site A) with the demo's
small-model recipe (configs/demo.py) on the 1024 px crop (one scale: the demo is about
stain, and 9 runs must fit in about 10 minutes on 2 CPU cores), tests the best weights on
site A's test split and on every sample of site B, and writes results.md (site-B test
macro-F1, mean +- population std over seeds) and cross_site.png. Your own sites:
--config.cross_site.site_a=DIR_A --config.cross_site.site_b=DIR_B (site B needs labels).
"""
import ml_collections

from histo_jax.config import get_base_config


def get_config():
    config = get_base_config()
    config.num_inputs = 1                # the 1024 px crop (input 0 of the reference order)
    config.data.scales = config.data.scales[:1]
    config.data.image_size = 96          # the demo's small-model recipe (configs/demo.py)
    config.data.color_jitter = ((0.0, 0.0, 0.0, 0.0),) * 4
    config.data.erasing_prob = (0.0, 0.0, 0.0, 0.0)
    config.model.variant = "tiny"
    config.model.pretrained = "none"
    config.model.dropout = 0.1
    config.model.attn_dropout = 0.1
    config.model.stochastic_depth = 0.0
    config.batch_size = 12
    config.eval_batch_size = 48
    config.optimizer.learning_rate = 3e-3
    config.num_epochs = 20
    config.patience = 8
    config.xla_cpu_memory_scheduler = False  # faster compiles; the same numbers
    config.cross_site = ml_collections.ConfigDict()
    config.cross_site.site_a = ""        # empty (with site_b): the demo sites
    config.cross_site.site_b = ""
    config.cross_site.seeds = (0, 1, 2)
    config.cross_site.fit_images = 64    # site-A images the 'fit' normaliser is fitted to
    # Macenko's tissue threshold (OD in every channel): the demo's stroma is pale (red OD
    # ~0.06), below torchstain's default 0.15, which would leave eosin to nuclei and bands.
    config.cross_site.fit_beta = 0.05
    config.cross_site.names = ("none", "hed", "macenko")
    config.cross_site.settings = ml_collections.ConfigDict({
        "none": {},
        # Strong HED jitter (Tellez et al. 2018's "HED-strong" range for alpha).
        "hed": {"stain_augment": {"method": "hed", "hed_alpha": 0.3, "hed_beta": 0.05}},
        "macenko": {"stain": {"method": "macenko", "file": "fit"}},
    })
    return config
