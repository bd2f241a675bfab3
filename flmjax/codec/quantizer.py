"""Mimi's split residual vector quantizer (official `SplitResidualVectorQuantizer`).

Codebook 0 (semantic) quantizes its own 1x1 projection of the latent; codebooks 1.. (acoustic)
quantize another projection residually. Both read the same latent. Decoding sums each group's
centroids and projects it back; the two projections are added.

Shapes: B batch, F frames, D latent, Q quantizer dim, V codebook entries, K codebooks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flmjax.codec.mimi_transformer import dense


def nearest(x: jax.Array, codebook: jax.Array, norms: jax.Array) -> jax.Array:
  """x [B,F,Q], codebook [V,Q], norms [V] (its squared row norms) -> int32 [B,F]: the closest
  entry in Euclidean distance."""
  dots = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), codebook, (((1,), (1,)), ((), ())))
  dist = (
    jnp.sum(x * x, -1, keepdims=True) - 2 * dots.reshape(*x.shape[:-1], -1) + norms
  )  # BFQ,VQ->BFV [B,F,V]
  return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def encode(params, latent: jax.Array) -> jax.Array:
  """latent [B,F,D] -> codes int32 [B,K,F]."""
  books, norms = params['codebooks'], params['norms']  # K x [V,Q], K x [V]
  first = dense(latent, params['first_in'])  # BFD,DQ->BFQ
  codes = [nearest(first, books[0], norms[0])]
  residual = dense(latent, params['rest_in'])  # BFD,DQ->BFQ
  for k in range(1, len(books)):
    codes.append(nearest(residual, books[k], norms[k]))
    residual = residual - books[k][codes[-1]]
  return jnp.stack(codes, axis=1)


def decode(params, codes: jax.Array) -> jax.Array:
  """codes int [B,K,F] -> latent [B,F,D]."""
  books = params['codebooks']  # K x [V,Q]
  first = dense(books[0][codes[:, 0]], params['first_out'])  # BFQ,QD->BFD
  if len(books) == 1:
    return first
  rest = sum(books[k][codes[:, k]] for k in range(1, len(books)))  # [B,F,Q]
  return first + dense(rest, params['rest_out'])  # BFQ,QD->BFD
