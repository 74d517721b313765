"""Datasets and input pipelines; importing `sources.embedded` registers its TFDS builders."""
