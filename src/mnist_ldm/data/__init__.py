"""MNIST: where it comes from, the prepared splits and the cached latents."""
