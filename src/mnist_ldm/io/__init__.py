"""Reading and writing files: atomic outputs, checkpoints, pictures, one-line errors."""
