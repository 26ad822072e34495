"""Data layer: the dataset store, ingest, synthetic tissue, crops, sampling, pipeline, augmentations."""
