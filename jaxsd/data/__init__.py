"""Datasets that jaxsd generates itself (no downloads)."""
