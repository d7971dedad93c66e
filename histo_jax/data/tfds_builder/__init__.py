"""TFDS builder of the prepared (resized once, ArrayRecord) histology dataset."""
from histo_jax.data.tfds_builder.histo_jax_dataset import HistoJaxDataset, SPLIT

__all__ = ["HistoJaxDataset", "SPLIT"]
