"""The ('data', 'tower') device mesh and the towers' placement on it.

Each tower-local parameter has a leading tower dimension and the spec
P('tower'): tower t lives on the devices of tower-axis index
t // towers_per_device, replicated over 'data'. Only fc8's bias has no tower.
Images, labels and logits are split over 'data' and replicated over 'tower'
(conv1 of every tower reads the whole image).
"""

import functools

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA, TOWER = 'data', 'tower'


def make_mesh(num_towers: int, tower_axis_size: int = -1,
              data_axis_size: int = -1, devices=None) -> jax.sharding.Mesh:
  """A (data, tower) mesh over `devices` (default: all devices).

  tower_axis_size=-1 puts the towers on num_towers devices when the device
  count allows, else 1 (every device runs every tower); data_axis_size=-1
  takes the remaining devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if tower_axis_size == -1:
    tower_axis_size = num_towers if n % num_towers == 0 else 1
  if tower_axis_size < 1 or num_towers % tower_axis_size:
    raise ValueError(
        f'mesh.tower_axis_size={tower_axis_size} must divide '
        f'model.num_towers={num_towers} (use 1, or {num_towers}).')
  if data_axis_size == -1:
    data_axis_size = n // tower_axis_size
  if data_axis_size < 1 or data_axis_size * tower_axis_size > n:
    raise ValueError(
        f'A ({data_axis_size}, {tower_axis_size}) mesh needs '
        f'{data_axis_size * tower_axis_size} devices, only {n} exist: lower '
        'mesh.data_axis_size or mesh.tower_axis_size.')
  used = devices[:data_axis_size * tower_axis_size]
  return jax.make_mesh((data_axis_size, tower_axis_size), (DATA, TOWER),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=used)


def param_specs(params):
  """PartitionSpecs of a parameter tree: P('tower') but for fc8's bias."""

  def spec(path, _):
    names = [getattr(k, 'key', None) for k in path]
    return P() if names[-2:] == ['fc8', 'bias'] else P(TOWER)

  return jax.tree_util.tree_map_with_path(spec, params)


def param_shardings(mesh, params):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params))


def data_sharding(mesh):
  """Sharding of a batch: leading axis over 'data', replicated over 'tower'."""
  return NamedSharding(mesh, P(DATA))


def to_host(x) -> np.ndarray:
  """A global array as one numpy array, on every process."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def check_batch_size(batch_size: int, mesh) -> None:
  d = mesh.shape[DATA]
  if batch_size % d:
    raise ValueError(
        f'Global batch size {batch_size} does not divide over the {d} devices '
        f'of the data axis: use a batch size that is a multiple of {d}, or set '
        '--config.mesh.data_axis_size to a divisor of the batch size.')


def sharded_apply(model, mesh):
  """`apply(params, images, *, train, dropout_rng) -> logits` over the mesh.

  The model runs under jax.shard_map: each device holds its towers' weights
  and its data shard of the batch; the towers exchange features only through
  the model's explicit collectives over the 'tower' axis. Differentiating
  through it gives the transposed collectives (all_gather -> reduce-scatter)
  and sums parameter gradients over 'data' (their cotangents are the
  transpose of replicating the weights to every data shard).
  """
  towers = mesh.shape[TOWER]
  if model.num_towers % towers:
    raise ValueError(f'The mesh tower axis ({towers}) must divide '
                     f'num_towers={model.num_towers}.')
  local_model = model.clone(tower_axis=TOWER, tower_axis_size=towers)

  def local(params, images, example_ids, dropout_rng, train):
    return local_model.apply({'params': params}, images, train=train,
                             dropout_rng=dropout_rng, example_ids=example_ids)

  def apply(params, images, *, train=False, dropout_rng=None):
    check_batch_size(images.shape[0], mesh)
    if dropout_rng is None:
      dropout_rng = jax.random.PRNGKey(0)  # Unused when train=False.
    example_ids = jnp.arange(images.shape[0])
    fn = jax.shard_map(
        functools.partial(local, train=train), mesh=mesh,
        in_specs=(param_specs(params), P(DATA), P(DATA), P()),
        out_specs=P(DATA))
    return fn(params, images, example_ids, dropout_rng)

  return apply


def device_table(mesh) -> str:
  """Which devices hold which (data shard, towers), for the run's log."""
  rows = []
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  for i in range(ids.shape[0]):
    rows.append(' '.join(f'{d:>3}' for d in ids[i]))
  return (f'mesh (data={mesh.shape[DATA]}, tower={mesh.shape[TOWER]}), '
          'device ids by row=data, col=tower:\n' + '\n'.join(rows))
