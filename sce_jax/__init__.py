"""sce_jax: Similarity Contrastive Estimation (Denize et al., WACV 2023) in JAX/Flax."""

__version__ = "0.1.0"
