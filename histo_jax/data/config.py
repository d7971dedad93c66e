"""Data configuration: every data field with its reference default.

The reference configuration reads the four magnification folders in the order
1024, 2048, 512, 256 (input 0..3), scales pixels to [0, 1] without ImageNet
normalisation and applies the per-input augmentation of the original project.
"""
from __future__ import annotations

import ml_collections

REFERENCE_SCALES = ("high_mag_1024", "high_mag_2048", "high_mag_512", "high_mag_256")
ON_BAD_SAMPLE_CHOICES = ("error", "skip")
NORMALIZATION_CHOICES = ("none", "imagenet")


def get_data_config() -> ml_collections.ConfigDict:
    """Returns the data ConfigDict with the reference defaults (docs/reference.md §1, §2, §4)."""
    cfg = ml_collections.ConfigDict()
    # Layout.
    cfg.dir = ""  # Empty: the trainer uses the embedded demo dataset.
    cfg.scales = REFERENCE_SCALES  # Folder of input 0, 1, ...
    cfg.labels_file = "labels.csv"
    cfg.image_size = 224
    cfg.num_classes = 2
    cfg.class_names = ("normal", "tumour")
    # Preparation / loading.
    cfg.prepared_dir = ""  # Empty: $HISTO_JAX_CACHE/datasets (~/.cache/histo_jax/datasets).
    cfg.on_bad_sample = "error"  # 'error' or 'skip' (explicit, logged, counted).
    cfg.num_workers = 2
    # Preprocessing: 'none' = [0, 1] (reference), 'imagenet' = ImageNet mean/std.
    cfg.normalization = "none"
    # Training augmentation (per input, independent draws unless shared_geometry).
    cfg.augment = True
    cfg.shared_geometry = False
    cfg.hflip_prob = 0.5
    cfg.vflip_prob = 0.5
    cfg.rotation_degrees = 15.0
    cfg.color_jitter = (
            (0.3, 0.3, 0.3, 0.1),
            (0.4, 0.4, 0.4, 0.2),
            (0.35, 0.35, 0.35, 0.15),
            (0.38, 0.38, 0.38, 0.18),
    )
    cfg.blur_kernel = 3
    cfg.blur_sigma = (0.1, 2.0)
    cfg.erasing_prob = (0.3, 0.4, 0.35, 0.38)
    cfg.erasing_scale = (0.02, 0.33)
    cfg.erasing_ratio = (0.3, 3.3)
    # Stain handling (histo_jax/stain; none of it in the reference, so all off by default).
    # Normalisation: a normaliser fitted once (`python -m histo_jax.data stain fit --ref ...
    # --method macenko --out stain.json`), applied to every image before augmentation in the
    # jitted train and eval steps, and so in predict and predict --slides (the run keeps a
    # copy, <workdir>/stain.json). Its numbers are part of the run identity.
    cfg.stain = ml_collections.ConfigDict()
    cfg.stain.method = "none"     # 'none' (reference) | 'macenko' | 'reinhard'
    cfg.stain.file = ""           # the fitted stain.json (its method must match)
    cfg.stain.where = "step"      # 'step': on device, inside the jitted steps (train, eval,
    #                               predict); crops on disk: `stain apply` / `extract --stain`
    cfg.stain.min_tissue = 0.02   # fewer tissue pixels: the image passes unchanged (counted)
    cfg.stain.max_angle = 30.0    # Macenko: estimated vs reference stain vector, degrees (0: off)
    # Augmentation inside the jitted train step: 'hed' (Tellez et al. 2018: per-channel
    # scale and shift of H, E, DAB concentrations in OD space) or 'lab' (RandStainNA-style
    # LAB statistics jitter). One draw per sample, shared by its scales, unless per_input.
    cfg.stain_augment = ml_collections.ConfigDict()
    cfg.stain_augment.method = "none"   # 'none' (reference) | 'hed' | 'lab'
    cfg.stain_augment.per_input = False
    cfg.stain_augment.prob = 1.0
    cfg.stain_augment.hed_alpha = 0.05  # alpha ~ U(1 - a, 1 + a)
    cfg.stain_augment.hed_beta = 0.05   # beta ~ U(-b, b), OD units
    cfg.stain_augment.lab_mean = (5.0, 3.0, 3.0)  # std of the L, a, b mean shifts
    cfg.stain_augment.lab_std = (0.1, 0.1, 0.1)   # std of the L, a, b spread factors
    # Splits (on num_id): test fraction, then validation fraction of the rest.
    cfg.test_size = 0.2
    cfg.val_size = 0.25
    return cfg
