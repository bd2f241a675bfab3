"""Topology-aware meshes (one slice and several) and the checks of the distributed setup."""

import dataclasses

import jax
import numpy as np
import pytest

from flmjax import distributed
from flmjax import sharding as shd
from flmjax.train.config import MeshConfig, TrainConfigError


def test_single_slice_mesh_is_jax_make_mesh():
  mesh = shd.make_mesh(2, 2, 2)
  want = jax.make_mesh((2, 2, 2), shd.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  assert mesh.axis_names == shd.MESH_AXES
  assert [d.id for d in mesh.devices.flat] == [d.id for d in want.devices.flat]
  assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}
  assert shd.make_mesh(1, 1, 1).devices.shape == (1, 1, 1)  # a subset of the devices


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  """What mesh_utils reads of a device on a multi-slice job (CPU devices are all in slice 0)."""

  id: int
  slice_index: int
  process_index: int
  platform: str = 'cpu'
  device_kind: str = 'cpu'


def test_multi_slice_grid_keeps_each_slice_in_one_block_of_the_dcn_axis():
  # 2 slices of 4 devices, listed interleaved: dcn_data=2 must still put each slice in one half
  # of the data axis, so only the data axis crosses the data-center network.
  devices = [FakeDevice(i, slice_index=i % 2, process_index=i % 2) for i in range(8)]
  grid = shd.device_grid((1, 2, 2), (2, 1, 1), devices)
  assert grid.shape == (2, 2, 2)
  slices = np.vectorize(lambda d: d.slice_index)(grid)
  assert (slices[0] == 0).all() and (slices[1] == 1).all()
  grid = shd.device_grid((2, 1, 2), (1, 2, 1), devices)  # dcn_fsdp: the fsdp axis spans slices
  assert (np.vectorize(lambda d: d.slice_index)(grid) == [[[0, 0], [1, 1]]] * 2).all()
  with pytest.raises(
    ValueError,
    match=r'dcn_data x dcn_fsdp = 4 must equal the number of '
    r'slices, 2',
  ):
    shd.device_grid((1, 1, 2), (4, 1, 1), devices)


def test_processes_are_the_slices_when_all_devices_are_in_slice_0():
  with pytest.raises(ValueError, match='must equal the number of processes, 1'):
    shd.make_mesh(4, 1, 1, dcn_data=2)  # one process here


def test_mesh_config_with_dcn_axes():
  assert MeshConfig(fsdp=2, dcn_data=2).resolve(8) == (2, 2, 1)  # per slice
  with pytest.raises(
    TrainConfigError,
    match=r'not a multiple of fsdp\*tensor\*dcn_data\*dcn_fsdp'
    r' = 12',
  ):
    MeshConfig(fsdp=3, dcn_data=2, dcn_fsdp=2).resolve(8)
  with pytest.raises(
    TrainConfigError,
    match=r'MeshConfig.dcn_data is 0; it must be an integer '
    r'>= 1$',
  ):
    MeshConfig(dcn_data=0)


def test_distributed_settings_are_checked(monkeypatch):
  for var in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    monkeypatch.delenv(var, raising=False)
  assert distributed.initialize_distributed() is False  # a lone process joins nothing
  assert distributed.initialize_distributed('127.0.0.1:1', 1, 0) is False
  with pytest.raises(ValueError, match=r'process_id 2 is outside 0..1'):
    distributed.initialize_distributed('127.0.0.1:1', 2, 2)
  with pytest.raises(ValueError, match='without a coordinator address'):
    distributed.initialize_distributed(None, 2, 0)
  monkeypatch.setenv('JAX_NUM_PROCESSES', 'two')
  with pytest.raises(ValueError, match=r"\$JAX_NUM_PROCESSES='two' is not an integer"):
    distributed.initialize_distributed()
  assert not jax.distributed.is_initialized()


def test_one_tpu_worker_host_is_not_a_cluster():
  # `flmjax aot` sets TPU_WORKER_HOSTNAMES=localhost to compile; a later train in the same process
  # must not try to join a multi-host job because of it.
  env = lambda d: d.get
  assert not distributed._in_cluster(env({'TPU_WORKER_HOSTNAMES': 'localhost'}))
  assert not distributed._in_cluster(env({}))
  assert distributed._in_cluster(env({'TPU_WORKER_HOSTNAMES': '10.0.0.1,10.0.0.2'}))
  assert distributed._in_cluster(env({'SLURM_JOB_NUM_NODES': '2'}))


def test_persistent_compilation_cache_is_off_on_a_cpu_mesh(tmp_path):
  """XLA:CPU steps with collectives loaded from jax's persistent cache can deadlock: on several
  CPU devices a run compiles fresh, and says so once."""
  from flmjax.platforms import compile_fresh_on_cpu_mesh

  old_dir = jax.config.jax_compilation_cache_dir
  old_enabled = jax.config.jax_enable_compilation_cache
  lines = []
  try:
    jax.config.update('jax_compilation_cache_dir', None)
    assert not compile_fresh_on_cpu_mesh(lines.append)  # no cache set: nothing to turn off
    jax.config.update('jax_compilation_cache_dir', str(tmp_path))
    assert compile_fresh_on_cpu_mesh(lines.append)
    assert not jax.config.jax_enable_compilation_cache
    assert len(lines) == 1 and str(tmp_path) in lines[0]
    assert not compile_fresh_on_cpu_mesh(lines.append)  # already off: said once
  finally:
    jax.config.update('jax_compilation_cache_dir', old_dir)
    jax.config.update('jax_enable_compilation_cache', old_enabled)
