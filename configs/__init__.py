"""Hydra configs of the bgflow_mini apps (the repository's configs/, shipped as package data)."""
