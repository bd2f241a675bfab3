"""Teacher-forced held-out accuracies of a model (no training run needed): per-stream loss and
accuracy on prepared datasets, through the model's loss sums (flmjax.model.loss) on a data mesh
over every device, as training evaluates."""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flmjax import sharding as shd
from flmjax.data.grid import LossWeights
from flmjax.model import loss
from flmjax.model.flm import abstract

SEED = 12345  # the loader's seed: every model sees the same windows (training's evaluate too)


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
    self.sets, self.window, self.num_batches = sets, window, num_batches
    self.cfg = cfg.replace(dtype='float32', param_dtype='float32')
    if batch_size % jax.process_count():
      raise ValueError(
        f'batch_size {batch_size} is not a multiple of the {jax.process_count()} hosts'
      )
    self.local_batch = batch_size // jax.process_count()
    self.mesh = mesh = shd.make_mesh(jax.device_count(), 1, 1)
    graphdef, state = nnx.split(abstract(self.cfg))
    self.param_shardings = nnx.to_pure_dict(shd.state_shardings(state, mesh))
    self.batch_shardings = shd.batch_shardings(mesh)

    def sums(params, batch):
      model = nnx.merge(graphdef, params)
      constrain = shd.activation_constraint(mesh)
      return loss.loss_sums(model, batch['tokens'], batch['weights'], constrain=constrain)

    self.step = jax.jit(
      shd.traced_on(mesh, sums),
      in_shardings=(self.param_shardings, self.batch_shardings),
      out_shardings=NamedSharding(mesh, P()),
    )

  def __call__(self, model) -> dict[str, dict]:
    """name -> metrics (acc_text, acc_semantic, loss, ...) of this model."""
    from flmjax.data.pipeline import make_loader

    params = jax.device_put(nnx.to_pure_dict(nnx.state(model)), self.param_shardings)
    out = {}
    for name, sources in self.sets.items():
      loader = make_loader(
        self.cfg,
        tuple(sources),
        window=self.window,
        batch_size=self.local_batch,
        seed=SEED,
        loss_weights=LossWeights(),
        shard_index=jax.process_index(),
        shard_count=jax.process_count(),
      )
      batches = (shd.to_global(next(loader), self.batch_shardings) for _ in range(self.num_batches))
      out[name] = loss.evaluate_batches(self.step, params, batches)
    return out


def teacher_forced(model, sets: dict[str, tuple], **kw) -> dict[str, dict]:
  """One model on `sets` (see TeacherForced)."""
  return TeacherForced(model.cfg, sets, **kw)(model)
