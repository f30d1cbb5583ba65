"""The params: one typed section per `params.yaml` section, read and checked once."""
