"""mnist-ldm: a reproducible latent-diffusion pipeline for MNIST digits."""

__version__ = "0.1.0"
