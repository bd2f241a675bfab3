"""The training loop: stages in order, resumable mid-stage from the last orbax checkpoint."""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp

from flmjax import sharding as shd
from flmjax.checkpoint import checkpointer as ckpt_lib
from flmjax.checkpoint.storage import make_run_dir
from flmjax.distributed import initialize_distributed
from flmjax.errors import FlmjaxError
from flmjax.model import lora as lora_lib
from flmjax.model.transforms import join
from flmjax.platforms import compile_fresh_on_cpu_mesh
from flmjax.train import data as data_lib
from flmjax.train import observe
from flmjax.train.config import TrainConfig, TrainConfigError, to_json
from flmjax.train.preemption import PreemptionWatch
from flmjax.train.schedule import learning_rates, position, stage_start
from flmjax.train.state import init_base, init_state, params_from_model, relayout, state_spec
from flmjax.train.step import batch_shardings, jit_train_step


class NonFiniteError(FlmjaxError, FloatingPointError):
  """The loss or the gradients became NaN/inf; the run stops without saving that state."""


def config_mesh(tc: TrainConfig) -> jax.sharding.Mesh:
  """The mesh of `tc.mesh` over every device (flmjax.sharding.make_mesh builds it)."""
  m = tc.mesh
  return shd.make_mesh(*m.resolve(jax.device_count()), dcn_data=m.dcn_data, dcn_fsdp=m.dcn_fsdp)


_DTYPE_FIELDS = ('dtype', 'param_dtype', 'checkpoint_dtype')
_LAYOUT_FIELDS = _DTYPE_FIELDS + ('tensor_parallel',)  # the run decides these, not the model


def check_init_from(tc: TrainConfig) -> None:
  """`init_from` must be an official checkpoint of the training config's model: checked from
  its config.json and safetensors headers before the run creates anything."""
  from flmjax.checkpoint.official import CheckpointError, check_official

  try:
    cfg, _ = check_official(tc.init_from)
  except CheckpointError as e:
    raise TrainConfigError(f'`init_from` {e}') from None
  ours, theirs = dataclasses.asdict(tc.model), dataclasses.asdict(cfg)
  diff = sorted(k for k in ours if k not in _LAYOUT_FIELDS and ours[k] != theirs[k])
  if diff:
    raise TrainConfigError(
      f'`init_from` {tc.init_from}: its config.json differs from the '
      f'training config in {diff}: ' + ', '.join(f'{k}={theirs[k]!r} vs {ours[k]!r}' for k in diff)
    )


def _official_params(tc: TrainConfig, mesh: jax.sharding.Mesh):
  from flmjax.checkpoint import load_official

  # Read straight into the training shardings (padded for the mesh's tensor axis): the full fp32
  # model never sits on one device. A LoRA base is read in bf16 (then quantized, or kept).
  dtype = 'bfloat16' if tc.lora is not None and tc.lora.base_dtype != 'float32' else 'float32'
  return params_from_model(load_official(tc.init_from, dtype=dtype, mesh=mesh))


def _check_schedule(tc: TrainConfig, meta: dict, directory: str) -> None:
  """A resumed step must sit at the same stage and step in stage as when it was saved: an edited
  schedule would otherwise apply one stage's data-iterator state to another."""
  saved = (
    f'{directory}: step {meta["global_step"]} was saved at stage {meta["stage_name"]!r} '
    f'step {meta["step_in_stage"]}'
  )
  if int(meta['global_step']) > tc.total_steps:
    raise TrainConfigError(
      f'{saved}, but this config has only {tc.total_steps} steps: the '
      'schedule changed; use a new `run_dir`'
    )
  pos = position(tc, int(meta['global_step']))
  name = tc.stages[pos.stage].name if pos.stage < len(tc.stages) else 'done'
  if (name, pos.step_in_stage) != (meta['stage_name'], int(meta['step_in_stage'])):
    raise TrainConfigError(
      f'{saved}, but this config puts it at stage {name!r} step {pos.step_in_stage}: the '
      'schedule changed; use a new `run_dir`'
    )


def check_batch_fits_mesh(tc: TrainConfig, mesh: jax.sharding.Mesh) -> None:
  ways = mesh.shape['data'] * mesh.shape['fsdp']
  for batch in sorted({tc.batch_size} | {tc.stage_batch_size(i) for i in range(len(tc.stages))}):
    micro = batch // max(tc.grad_accum, 1)
    if batch % max(tc.grad_accum, 1) or micro % ways:
      raise TrainConfigError(
        f'batch_size {batch} with grad_accum {tc.grad_accum} gives micro-batches of '
        f'{batch / max(tc.grad_accum, 1):g} rows, which must be a whole multiple of the '
        f"mesh's data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']} = {ways}"
      )


def _meta(tc: TrainConfig, global_step: int, tensor_parallel: int, fingerprint: str | None) -> dict:
  pos = position(tc, global_step)
  name = tc.stages[pos.stage].name if pos.stage < len(tc.stages) else 'done'
  model = dataclasses.asdict(tc.model.replace(tensor_parallel=tensor_parallel))
  return {
    'global_step': global_step,
    'stage': pos.stage,
    'stage_name': name,
    'step_in_stage': pos.step_in_stage,
    'model_config': model,
    'train_config': to_json(tc),
    'lora': to_json(tc.lora),
    'base_fingerprint': fingerprint,
  }


def _check_lora(tc: TrainConfig, meta: dict, fingerprint: str | None, directory) -> None:
  """A LoRA checkpoint holds adapters only: it resumes with its LoRA config on its base."""
  saved, ours = meta.get('lora'), to_json(tc.lora)
  if saved is None and ours is None:
    return
  if saved is None:
    raise TrainConfigError(
      f'{directory}: the checkpoint is a full fine-tune; this config sets '
      f'lora={tc.lora}: use a new `run_dir` (or export it and `init_from`)'
    )
  if ours is None:
    raise TrainConfigError(
      f'{directory}: the checkpoint holds LoRA adapters (rank '
      f'{saved["rank"]}, targets {saved["targets"]}) but this config has no '
      'lora: set TrainConfig.lora as the run had it'
    )
  if saved != ours:
    diff = sorted(k for k in ours if saved.get(k) != ours[k])
    raise TrainConfigError(
      f"{directory}: the checkpoint's LoRA config differs in "
      + ', '.join(f'{k}={saved.get(k)!r} vs {ours[k]!r}' for k in diff)
      + '; use a new `run_dir`'
    )
  if meta.get('base_fingerprint') != fingerprint:
    raise TrainConfigError(
      f"{directory}: the checkpoint's adapters were trained on another base "
      f'(fingerprint {str(meta.get("base_fingerprint"))[:12]}, this base '
      f'{str(fingerprint)[:12]}): give the `init_from` the run used'
    )


def _padded_for(meta: dict) -> int:
  """The tensor size a checkpoint's vocab and depth MLP are padded for."""
  return int(meta['model_config'].get('tensor_parallel', 1))


def _check_model(tc: TrainConfig, meta: dict, directory) -> None:
  saved, ours = meta['model_config'], dataclasses.asdict(tc.model)
  diff = sorted(
    k
    for k in ours
    if k not in _LAYOUT_FIELDS
    and saved.get(k) != ours[k]
    and not (isinstance(ours[k], tuple) and tuple(saved.get(k) or ()) == ours[k])
  )
  if diff:
    raise TrainConfigError(
      f'{directory}: the checkpoint was trained with another model '
      f'config ({", ".join(f"{k}={saved.get(k)!r}" for k in diff)}); '
      f'use a new `run_dir`'
    )


class _Metrics:
  """Per-step metrics stay on the device until `fetch`: one host sync for many steps, so the
  host keeps dispatching steps while the device works. Non-finite values stop the run at fetch
  time, naming the first bad step; the loop fetches before every save, so a poisoned state is
  never saved."""

  def __init__(self, tc: TrainConfig, obs: observe.Observer, ckpt):
    self.tc, self.obs, self.ckpt = tc, obs, ckpt
    # (global step, stage, step in stage, metrics on the device, this host's data counts)
    self.pending: list[tuple[int, int, int, dict, dict]] = []
    self.t0 = time.perf_counter()

  def add(
    self, global_step: int, stage: int, step_in_stage: int, metrics: dict, counts: dict
  ) -> None:
    self.pending.append((global_step, stage, step_in_stage, metrics, counts))

  def restart_clock(self) -> None:
    self.t0 = time.perf_counter()

  def fetch(self) -> None:
    if not self.pending:
      return
    values = jax.device_get([m for *_, m, _ in self.pending])
    counts = data_lib.sum_over_hosts([c for *_, c in self.pending])
    now = time.perf_counter()
    stage = self.pending[0][1]  # a fetch never spans two stages (the loop fetches at the end)
    frames = self.tc.stage_batch_size(stage) * (self.tc.stage_window(stage) - 1)
    frames_per_s = frames * len(values) / (now - self.t0)
    self.t0 = now
    for (step, stage, in_stage, *_), m, c in zip(self.pending, values, counts):
      m = {k: float(v) for k, v in m.items()}
      if not (math.isfinite(m['loss']) and math.isfinite(m['grad_norm'])):
        self.pending.clear()
        raise NonFiniteError(
          f'non-finite loss ({m["loss"]}) or grad norm ({m["grad_norm"]}) at step {step} '
          f'(stage {self.tc.stages[stage].name!r}, step {in_stage + 1} of the stage); stopping '
          f'without saving this state (last checkpoint: {self.ckpt.latest_step()})'
        )
      m['frames_per_s'] = frames_per_s  # averaged over the steps of this fetch
      m.update(c)
      self.obs.record(step, stage, m)
    self.pending.clear()


def train(
  tc: TrainConfig,
  *,
  mesh: jax.sharding.Mesh | None = None,
  stop_after: int | None = None,
  log=print,
) -> dict:
  """Runs (or resumes) `tc` until the schedule ends, `stop_after` global steps, or a preemption
  notice (SIGTERM), which saves first.

  Returns {'state', 'global_step', 'spec', 'mesh', 'stages': per-stage summaries, 'eval',
  'preempted'}.
  """
  d = tc.distributed
  initialize_distributed(*dataclasses.astuple(d))
  primary = jax.process_index() == 0
  log = log if primary else (lambda *a, **k: None)
  compile_fresh_on_cpu_mesh(log)
  mesh = mesh or config_mesh(tc)
  shd.validate_mesh(tc.model, mesh.shape)
  check_batch_fits_mesh(tc, mesh)
  if tc.corpus is not None:  # the config names the data; it is made here, once per directory
    tc.corpus.build(log=log)
  data_lib.check_sources(tc)
  if tc.init_from:
    check_init_from(tc)
  run_dir = make_run_dir(tc.run_dir)
  spec = state_spec(tc, mesh)
  for line in shd.sharding_report(
    spec.abstract.params,
    spec.shardings.params,
    spec.abstract.opt_state,
    spec.shardings.opt_state,
    spec.base,
  ):
    log(line)
  base, fingerprint = None, None
  if tc.lora is not None:  # the frozen base first: a resume checks it is the run's base
    base = init_base(spec, tc, _official_params(tc, mesh) if tc.init_from else None)
    fingerprint = lora_lib.fingerprint(tc.model, tc.lora.base_dtype, base)
  ckpt = ckpt_lib.Checkpointer(
    run_dir / 'checkpoints',
    every=tc.checkpoint_every,
    keep=tc.keep_checkpoints,
    use_async=tc.async_checkpointing,
  )

  def check(meta: dict):
    _check_model(tc, meta, ckpt.directory)
    _check_lora(tc, meta, fingerprint, ckpt.directory)
    _check_schedule(tc, meta, ckpt.directory)
    if int(meta['step_in_stage']) == 0:
      return None
    # Mid-stage: a new loader of the step's stage, which the restore sets to the saved state.
    return data_lib.make_stage_loader(tc, position(tc, int(meta['global_step'])).stage)

  resumed_loader = None
  # A checkpoint padded for another tensor size restores as saved, then is re-padded (exact).
  saved_layout = lambda meta: state_spec(tc, mesh, _padded_for(meta)).abstract
  try:
    restored = ckpt.restore_latest(saved_layout, check=check, log=log)
  except BaseException:  # a refused resume leaves no checkpoint manager (and its threads) behind
    ckpt.close()
    raise
  if restored is not None:
    state, meta, resumed_loader = restored
    if _padded_for(meta) != mesh.shape['tensor']:
      state = relayout(state, spec)
      log(
        f'vocab and depth MLP padding changed from tensor={_padded_for(meta)} to '
        f'tensor={mesh.shape["tensor"]}'
      )
    global_step = int(meta['global_step'])
    log(
      f'resumed from {ckpt.directory} at step {global_step} '
      f'(stage {meta["stage_name"]!r}, step {meta["step_in_stage"]} in stage)'
    )
  else:
    official = tc.init_from and tc.lora is None
    state = init_state(spec, tc, _official_params(tc, mesh) if official else None)
    global_step = 0
  step_fn = jit_train_step(spec, tc, mesh)
  frozen = () if base is None else (base,)
  bsh = batch_shardings(mesh)
  end = tc.total_steps if stop_after is None else min(tc.total_steps, stop_after)
  obs = observe.Observer(tc, enabled=primary, initial_step=global_step, total=tc.total_steps)
  metrics = _Metrics(tc, obs, ckpt)
  loader, loader_stage, preempted, first = None, -1, False, True
  try:
    with PreemptionWatch() as watch:
      while global_step < end:
        pos = position(tc, global_step)
        stage = tc.stages[pos.stage]
        if pos.stage != loader_stage:
          if resumed_loader is None:
            resumed_loader = data_lib.make_stage_loader(tc, pos.stage)
          loader, loader_stage, resumed_loader = resumed_loader, pos.stage, None  # one stage only
          lrs = learning_rates(stage)
          obs.begin_stage(pos.stage, stage_start(tc, pos.stage))
          metrics.restart_clock()
        batch = next(loader)
        if first or pos.step_in_stage == 0:
          data_lib.check_batch(tc, batch, f'stage {stage.name!r}', pos.stage)
        state, step_metrics = step_fn(
          state, data_lib.to_global(batch, bsh), jnp.float32(lrs[pos.step_in_stage]), *frozen
        )
        metrics.add(
          global_step + 1,
          pos.stage,
          pos.step_in_stage,
          step_metrics,
          data_lib.data_counts(batch, all_hosts=False),
        )
        global_step += 1
        if first:  # the first step includes compilation: keep it out of frames/s
          metrics.fetch()
          first = False
        preempted = watch.reached(global_step)
        nxt = position(tc, global_step)
        if (
          preempted
          or global_step % tc.checkpoint_every == 0
          or global_step in (end, tc.total_steps)
        ):  # a stop loses nothing
          metrics.fetch()
          keep_data = nxt.stage == loader_stage  # a finished stage's iterator is not carried over
          ckpt.save(
            global_step,
            state,
            _meta(tc, global_step, mesh.shape['tensor'], fingerprint),
            loader if keep_data else None,
            force=True,
          )
        elif global_step % tc.log_every == 0:
          metrics.fetch()
        if nxt.stage != loader_stage or global_step == end or preempted:
          metrics.fetch()
          obs.end_stage(pos.stage, log, finished=nxt.stage != loader_stage)
        if preempted:
          log(f'preemption notice: saved step {global_step}; run the same command to resume')
          break
  finally:
    ckpt.close()
    obs.close()
  summaries = obs.stage_summaries
  result = {
    'state': state,
    'global_step': global_step,
    'spec': spec,
    'mesh': mesh,
    'stages': summaries,
    'eval': None,
    'preempted': preempted,
    'base': base,
  }
  if global_step == tc.total_steps:
    if primary:
      result['plots'] = observe.write_plots(tc.run_dir, tc)
    if tc.eval_sources:
      from flmjax.train.evaluate import evaluate, format_metrics

      result['eval'] = evaluate(tc, spec, mesh, join(base, state.params), tc.eval_sources)
      log('held-out teacher-forced metrics:\n' + format_metrics(result['eval']))
  return result
