"""Datasets and input pipelines; importing `embedded` registers its TFDS builders."""
