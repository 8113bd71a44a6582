"""Shipped molecular systems (the repository's systems/ folder, shipped as package data)."""
