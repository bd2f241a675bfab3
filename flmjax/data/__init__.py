"""Data: manifest, natural-monologue layout, delayed grid, tokenizers, audio/codec, grain loader,
and the embedded synthetic corpus. Import submodules directly (kept light: no jax import here)."""
