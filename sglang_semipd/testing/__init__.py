"""Helpers that make test inputs (models, datasets); shipped so the GPU host can use them."""
