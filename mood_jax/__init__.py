"""mood_jax: masked-image-modeling OOD detection (MOOD) with an Unleashing-Mask logit fine-tune, in JAX."""
