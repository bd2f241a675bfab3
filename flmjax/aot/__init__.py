"""Ahead-of-time compilation for TPU topologies (`flmjax aot`)."""
