"""Pallas kernels for flmjax: the fused depth-transformer step (docs/kernels.md)."""
