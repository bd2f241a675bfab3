"""Pallas kernels for flmjax: the fused depth-transformer step (see kernels/README.md)."""
