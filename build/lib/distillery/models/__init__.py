"""Encoders, heads, and their artifacts; ``load_pruned`` loads a structurally pruned export."""

from distillery.models.pruning import load_pruned

__all__ = ["load_pruned"]
