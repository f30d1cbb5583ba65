"""mnist-ldm: a reproducible latent-diffusion pipeline for MNIST digits."""
