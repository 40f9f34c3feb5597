"""Demonstrations that run on what ships with lorakit (no download, no GPU)."""
