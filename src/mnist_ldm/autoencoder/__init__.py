"""The conv autoencoder (28->14->7->4 -> 16-d latent) or its MLP sibling, and its training."""
