"""Page bookkeeping of the paged KV cache, as pure functions of the decoder state.

A paged state has, besides the pool 'cache' (flmjax.model.paged):
  table [B,M] int32: session b's pages in order (entries held..M-1 are stale);
  held [B] int32: how many pages session b holds;
  free [NP] bool: the pool's free pages.
Pages are taken inside the frame, one when a session's position reaches held·P exactly, the
lowest free page ids to the lowest rows, so the outcome depends on the state only. A session
that finds none (the pool is full, or it holds M pages) keeps its pages and slides over them
(its position is then past held·P for good, so it never takes another and its ring stays whole);
under overflow='error' the decoder refuses that step on the host before it runs. Pages are
returned when a slot is reset or released.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from flmjax.model import paged


@dataclasses.dataclass(frozen=True)
class PagedKV:
  """pages: the pool's pages (per layer); page_size: positions a page; max_pages: pages one
  session may hold (max_len / page_size); kv_dtype: 'bf16' (the compute dtype) or 'int8';
  impl: the attention path (flmjax.model.paged.IMPLS)."""

  pages: int
  page_size: int
  max_pages: int
  kv_dtype: str = 'bf16'
  impl: str = 'auto'

  def __post_init__(self):
    if self.page_size < 1 or self.pages < 1 or self.max_pages < 1:
      raise ValueError(f'{self}: pages, page_size and max_pages must be positive')
    if self.kv_dtype not in paged.KV_DTYPES:
      raise ValueError(f'kv_dtype={self.kv_dtype!r}: use one of {paged.KV_DTYPES}')
    if self.impl not in paged.IMPLS:
      raise ValueError(f'impl={self.impl!r}: use one of {paged.IMPLS}')

  @property
  def max_len(self) -> int:
    return self.max_pages * self.page_size


def init(cfg, kv: PagedKV, batch: int) -> dict:
  """The paged leaves of a state of `batch` slots, every page free."""
  return {
    'cache': paged.init_pool(cfg, kv.pages, kv.page_size, kv_dtype=kv.kv_dtype),
    'table': jnp.zeros((batch, kv.max_pages), jnp.int32),
    'held': jnp.zeros((batch,), jnp.int32),
    'free': jnp.ones((kv.pages,), bool),
  }


def give_back(state: dict, mask: jax.Array) -> dict:
  """The pages of the slots where mask [B] returned to the pool; those slots hold none."""
  table, held = state['table'], state['held']
  owned = mask[:, None] & (jnp.arange(table.shape[1])[None, :] < held[:, None])
  ids = jnp.where(owned, table, state['free'].shape[0])  # out of range: dropped
  free = state['free'].at[ids.reshape(-1)].set(True, mode='drop')
  return {**state, 'free': free, 'held': jnp.where(mask, 0, held)}


def needs(offset, held, active, page_size: int):
  """[B] bool: sessions whose position this frame is the first past their pages."""
  return active & (offset == held * page_size)


def take(state: dict, page_size: int) -> dict:
  """Gives each session that needs a page this frame the lowest free one, rows in order."""
  table, held, free = state['table'], state['held'], state['free']
  B, M = table.shape
  want = needs(state['offset'], held, state['active'], page_size) & (held < M)
  rank = jnp.cumsum(want) - 1
  ids = jnp.nonzero(free, size=B, fill_value=free.shape[0])[0]  # the B lowest free ids
  page = ids[jnp.clip(rank, 0, B - 1)]
  got = want & (page < free.shape[0])
  rows = jnp.arange(B)
  column = jnp.where(got, held, M)  # out of range: dropped
  table = table.at[rows, column].set(page, mode='drop')
  free = free.at[jnp.where(got, page, free.shape[0])].set(False, mode='drop')
  return {**state, 'table': table, 'held': held + got, 'free': free}


def span(offset: np.ndarray, active: np.ndarray, kv: PagedKV) -> int:
  """Table columns the XLA path reads this frame: the batch's most pages a session can hold
  after this frame's take, rounded up to a power of two (one compiled frame per bucket)."""
  if not active.any():
    return 1
  most = int(min(kv.max_pages, (int(offset[active].max()) // kv.page_size) + 1))
  return min(kv.max_pages, 1 << (most - 1).bit_length())


def shortfall(state: dict, kv: PagedKV) -> np.ndarray:
  """Host check before a frame: the rows that need a page (and hold fewer than max_pages) that
  the pool cannot give, the last of the needing rows in the take's order."""
  offset, held, active = (np.asarray(state[k]) for k in ('offset', 'held', 'active'))
  growing = np.flatnonzero(needs(offset, held, active, kv.page_size) & (held < kv.max_pages))
  return growing[int(np.asarray(state['free']).sum()) :]
