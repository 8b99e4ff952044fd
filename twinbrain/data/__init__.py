"""Data sources, graphs and window loaders."""

