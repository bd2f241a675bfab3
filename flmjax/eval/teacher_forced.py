"""Teacher-forced held-out accuracies of a model (no training run needed): per-stream loss and
accuracy on prepared datasets, through the training code's own evaluation step."""

from __future__ import annotations


class TeacherForced:
  """Evaluates models of one config on fixed held-out sets, compiling the step once.

  sets: name -> SourceSpecs of prepared data. The batch must split over the devices; the loader
  seed is fixed, so every model sees the same windows.
  """

  def __init__(
    self,
    cfg,
    sets: dict[str, tuple],
    *,
    window: int = 64,
    batch_size: int = 8,
    num_batches: int = 4,
  ):
    from flmjax.data.grid import LossWeights
    from flmjax.train.config import StageConfig, TrainConfig
    from flmjax.train.loop import config_mesh
    from flmjax.train.state import state_spec
    from flmjax.train.step import jit_eval_step

    self.sets, self.tensor_parallel = sets, cfg.tensor_parallel
    first = next(iter(sets.values()))
    self.tc = TrainConfig(
      model=cfg.replace(dtype='float32', param_dtype='float32'),
      run_dir='',
      window=window,
      batch_size=batch_size,
      compute_dtype='float32',
      eval_batches=num_batches,
      stages=(StageConfig('eval', steps=1, sources=tuple(first), loss_weights=LossWeights()),),
    )
    self.mesh = config_mesh(self.tc)
    self.spec = state_spec(self.tc, self.mesh, tensor_parallel=cfg.tensor_parallel)
    self.step = jit_eval_step(self.spec, self.tc, self.mesh)

  def __call__(self, model) -> dict[str, dict]:
    """name -> metrics (acc_text, acc_semantic, loss, ...) of this model."""
    import jax

    from flmjax.train.evaluate import evaluate
    from flmjax.train.state import params_from_model

    params = jax.device_put(params_from_model(model), self.spec.shardings.params)
    return {
      name: evaluate(self.tc, self.spec, self.mesh, params, sources, step=self.step)
      for name, sources in self.sets.items()
    }


def teacher_forced(model, sets: dict[str, tuple], **kw) -> dict[str, dict]:
  """One model on `sets` (see TeacherForced)."""
  return TeacherForced(model.cfg, sets, **kw)(model)
