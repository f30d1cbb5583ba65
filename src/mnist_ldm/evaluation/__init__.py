"""Scoring samples: FCD with its floors, precision/recall, class balance."""
