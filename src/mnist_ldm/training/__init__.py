"""Training loops of the three networks; they report per-epoch figures through callbacks and know nothing of MLflow."""
