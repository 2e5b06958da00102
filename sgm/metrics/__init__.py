"""Metrics that judge samples (digit accuracy and Fréchet distance for the shipped digit model)."""
