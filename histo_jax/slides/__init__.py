"""Whole slides in, crops and heatmaps out (docs/reference.md §6).

* ``reader``: OpenSlide reading (``Slide.read_field``: one field of view from the fitting
  pyramid level), clear errors for bad slides;
* ``tissue``: CLAM-style tissue detection on a low-resolution overview;
* ``geometry``: fields of view, their folders, crop boxes, the tissue grid;
* ``annotations``: points / patients CSVs and QuPath GeoJSON regions;
* ``locate``: where samples sit on a slide (grid, points, regions; tissue and border filters);
* ``extract``: ``python -m histo_jax.data extract``, crops in the dataset layout;
* ``predict``: ``python -m histo_jax.predict --slides``, slide-level prediction and maps;
* ``pictures``: thumbnails, heatmaps, attention maps;
* ``synthetic``: pyramidal TIFF writer and the slide demo (``python -m histo_jax.data demo
  --slides OUT``).
"""
