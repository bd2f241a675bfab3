"""The training loop: stages in order, resumable mid-stage from the last orbax checkpoint."""
from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp

from flmjax import sharding as shd
from flmjax.train import checkpointing as ckpt_lib
from flmjax.train import data as data_lib
from flmjax.train import observe
from flmjax.train.config import TrainConfig, TrainConfigError, to_json
from flmjax.train.schedule import learning_rate, position, stage_start
from flmjax.train.state import init_state, params_from_model, state_spec
from flmjax.train.step import batch_shardings, jit_train_step


class NonFiniteError(FloatingPointError):
  """The loss or the gradients became NaN/inf; the run stops without saving that state."""


def make_mesh(tc: TrainConfig) -> jax.sharding.Mesh:
  return shd.make_mesh(*tc.mesh.resolve(jax.device_count()))


_DTYPE_FIELDS = ('dtype', 'param_dtype', 'checkpoint_dtype')


def _official_params(tc: TrainConfig, mesh: jax.sharding.Mesh):
  from flmjax.checkpoint import load_official
  # Read straight into the training shardings: the full fp32 model never sits on one device.
  model = load_official(tc.init_from, dtype='float32', mesh=mesh)
  ours, theirs = dataclasses.asdict(tc.model), dataclasses.asdict(model.cfg)
  diff = sorted(k for k in ours if k not in _DTYPE_FIELDS and ours[k] != theirs[k])
  if diff:
    raise TrainConfigError(f'--init_from {tc.init_from}: its config.json differs from the '
                           f'training config in {diff}: ' +
                           ', '.join(f'{k}={theirs[k]!r} vs {ours[k]!r}' for k in diff))
  return params_from_model(model)


def _check_schedule(tc: TrainConfig, meta: dict, directory: str) -> None:
  """A resumed step must sit at the same stage and step in stage as when it was saved: an edited
  schedule would otherwise apply one stage's data-iterator state to another."""
  pos = position(tc, int(meta['global_step']))
  name = tc.stages[pos.stage].name if pos.stage < len(tc.stages) else 'done'
  if (name, pos.step_in_stage) != (meta['stage_name'], int(meta['step_in_stage'])):
    raise TrainConfigError(
        f'{directory}: step {meta["global_step"]} was saved at stage {meta["stage_name"]!r} step '
        f'{meta["step_in_stage"]}, but this config puts it at stage {name!r} step '
        f'{pos.step_in_stage}: the schedule changed; use a new --run_dir')


def _check_batch_fits_mesh(tc: TrainConfig, mesh: jax.sharding.Mesh) -> None:
  ways = mesh.shape['data'] * mesh.shape['fsdp']
  micro = tc.batch_size // max(tc.grad_accum, 1)
  if tc.batch_size % max(tc.grad_accum, 1) or micro % ways:
    raise TrainConfigError(
        f'batch_size {tc.batch_size} with grad_accum {tc.grad_accum} gives micro-batches of '
        f'{tc.batch_size / max(tc.grad_accum, 1):g} rows, which must be a whole multiple of the '
        f'mesh\'s data x fsdp = {mesh.shape["data"]} x {mesh.shape["fsdp"]} = {ways}')


def _meta(tc: TrainConfig, global_step: int, data_state) -> dict:
  pos = position(tc, global_step)
  name = tc.stages[pos.stage].name if pos.stage < len(tc.stages) else 'done'
  return {'global_step': global_step, 'stage': pos.stage, 'stage_name': name,
          'step_in_stage': pos.step_in_stage,
          'data_state': None if data_state is None else ckpt_lib.encode_data_state(data_state),
          'model_config': dataclasses.asdict(tc.model), 'train_config': to_json(tc)}


def train(tc: TrainConfig, *, mesh: jax.sharding.Mesh | None = None,
          stop_after: int | None = None, log=print) -> dict:
  """Runs (or resumes) `tc` until the schedule ends or `stop_after` global steps.

  Returns {'state', 'global_step', 'spec', 'mesh', 'stages': per-stage summaries}.
  """
  shd.maybe_initialize_distributed()
  mesh = mesh or make_mesh(tc)
  _check_batch_fits_mesh(tc, mesh)
  data_lib.check_sources(tc)
  primary = jax.process_index() == 0
  log = log if primary else (lambda *a, **k: None)
  os.makedirs(tc.run_dir, exist_ok=True)
  spec = state_spec(tc, mesh)
  ckpt = ckpt_lib.Checkpointer(os.path.join(tc.run_dir, 'checkpoints'), every=tc.checkpoint_every,
                               keep=tc.keep_checkpoints, use_async=tc.async_checkpointing)
  data_state = None
  if ckpt.latest_step() is not None:
    saved = ckpt.restore_meta()['model_config']
    ours = dataclasses.asdict(tc.model)
    diff = sorted(k for k in ours if k not in _DTYPE_FIELDS and saved.get(k) != ours[k]
                  and not (isinstance(ours[k], tuple) and tuple(saved.get(k) or ()) == ours[k]))
    if diff:
      raise TrainConfigError(f'{ckpt.directory}: the checkpoint was trained with another model '
                             f'config ({", ".join(f"{k}={saved.get(k)!r}" for k in diff)}); '
                             f'use a new --run_dir')
    state, meta = ckpt.restore(spec.abstract)
    global_step = int(meta['global_step'])
    _check_schedule(tc, meta, ckpt.directory)
    if meta.get('data_state') is not None:
      data_state = ckpt_lib.decode_data_state(meta['data_state'])
    log(f'resumed from {ckpt.directory} at step {global_step} '
        f'(stage {meta["stage_name"]!r}, step {meta["step_in_stage"]} in stage)')
  else:
    state = init_state(spec, tc, _official_params(tc, mesh) if tc.init_from else None)
    global_step = 0
  step_fn = jit_train_step(spec, tc, mesh)
  bsh = batch_shardings(mesh)
  end = tc.total_steps if stop_after is None else min(tc.total_steps, stop_after)
  obs = observe.Observer(tc, enabled=primary, initial_step=global_step, total=tc.total_steps)
  frames_per_step = tc.batch_size * (tc.window - 1)
  loader, loader_stage = None, -1
  try:
    while global_step < end:
      pos = position(tc, global_step)
      stage = tc.stages[pos.stage]
      if pos.stage != loader_stage:
        loader, loader_stage = data_lib.make_stage_loader(tc, pos.stage), pos.stage
        if data_state is not None:
          loader.set_state(data_state)  # only ever set when resuming inside this stage
          data_state = None
        obs.begin_stage(pos.stage, stage_start(tc, pos.stage))
      t0 = time.perf_counter()
      batch = next(loader)
      if global_step == 0 or pos.step_in_stage == 0 or obs.steps_this_run == 0:
        data_lib.check_batch(tc, batch, f'stage {stage.name!r}')
      lr = learning_rate(stage, pos.step_in_stage)
      state, metrics = step_fn(state, data_lib.to_global(batch, bsh), jnp.float32(lr))
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      global_step += 1
      if not (math.isfinite(metrics['loss']) and math.isfinite(metrics['grad_norm'])):
        raise NonFiniteError(
            f'non-finite loss ({metrics["loss"]}) or grad norm ({metrics["grad_norm"]}) at step '
            f'{global_step} (stage {stage.name!r}, step {pos.step_in_stage + 1} of the stage); '
            f'stopping without saving this state (last checkpoint: {ckpt.latest_step()})')
      metrics['frames_per_s'] = frames_per_step / (time.perf_counter() - t0)
      metrics.update(data_lib.data_counts(batch))
      obs.record(global_step, pos.stage, metrics)
      nxt = position(tc, global_step)
      keep_data = nxt.stage == loader_stage  # a finished stage's iterator is not carried over
      ckpt.save(global_step, state, _meta(tc, global_step, loader.get_state() if keep_data else None),
                force=global_step in (end, tc.total_steps))  # a stop loses nothing
      if nxt.stage != loader_stage or global_step == end:
        obs.end_stage(pos.stage, log, finished=nxt.stage != loader_stage)
  finally:
    ckpt.close()
    obs.close()
  summaries = obs.stage_summaries
  result = {'state': state, 'global_step': global_step, 'spec': spec, 'mesh': mesh,
            'stages': summaries, 'eval': None}
  if global_step == tc.total_steps:
    if primary:
      result['plots'] = observe.write_plots(tc.run_dir, tc)
    if tc.eval_sources:
      from flmjax.train.evaluate import evaluate, format_metrics
      result['eval'] = evaluate(tc, spec, mesh, state.params, tc.eval_sources)
      log('held-out teacher-forced metrics:\n' + format_metrics(result['eval']))
  return result

