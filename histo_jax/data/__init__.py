"""Data: folder layout and validation, labels, TFDS preparation, splits, Grain pipelines, demo data."""
