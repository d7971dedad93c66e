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
    """Returns the data ConfigDict with the reference defaults (SPEC §1, §2, §4)."""
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
    # Splits (on num_id): test fraction, then validation fraction of the rest.
    cfg.test_size = 0.2
    cfg.val_size = 0.25
    return cfg
