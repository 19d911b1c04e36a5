"""One of two local processes (jax.distributed over gloo, 2 CPU devices each)
for tests/test_faults.py. Both save the checkpoints of steps 1 and 2 and close
the manager; process 0 then truncates the array data files process 1 wrote
for step 2 (state/ocdbt.process_1/d/*, as a failing disk leaves them); then,
as a restarted run, both open a new manager and restore the newest readable
checkpoint, and print what they got.

  python tests/fault_restore_agree.py PROCESS_ID PORT DIRECTORY

The mesh puts tower 0 on process 0's devices and tower 1 on process 1's, so
each process writes (into state/ocdbt.process_<i>/) and reads back only its
own tower's rows of `w`: damage to process 1's files fails only process 1.
Prints one line `RESULT {json}`.
"""

import glob
import json
import os
import sys

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from alexnet_jax import checkpoint as checkpoint_lib
from alexnet_jax import mesh as mesh_lib
from alexnet_jax import train_step as train_step_lib

ROW = 4096  # float32: 16 KiB per tower's row, far above OCDBT's inline limit.


def values(step):
  """The saved `w` of `step` on the host: row t is tower t's."""
  return (np.arange(2 * ROW, dtype=np.float32).reshape(2, ROW) +
          1000.0 * step)


def main(process_id, port, directory):
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(f'localhost:{port}', num_processes=2,
                             process_id=process_id,
                             initialization_timeout=60)
  p0, p1 = ([d for d in jax.devices() if d.process_index == i]
            for i in range(2))
  devices = [p0[0], p1[0], p0[1], p1[1]]  # (data, tower): tower t = process t
  mesh = mesh_lib.make_mesh(2, tower_axis_size=2, data_axis_size=2,
                            devices=devices)
  towers = {i: sorted({d.process_index for d in mesh.devices[:, i]})
            for i in range(2)}
  config = ml_collections.ConfigDict(dict(keep=3, keep_best=1,
                                          async_save=True))

  def state(step):
    abstract = jax.eval_shape(lambda: train_step_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params={'w': jnp.zeros((2, ROW))},
        opt_state=(), rng=jax.random.PRNGKey(0)))
    target = checkpoint_lib.abstract_target(abstract, mesh)
    host = train_step_lib.TrainState(
        step=np.int32(step), params={'w': values(step)}, opt_state=(),
        rng=np.asarray(jax.random.PRNGKey(step)))
    return abstract, jax.tree.map(
        lambda x, t: jax.make_array_from_callback(
            t.shape, t.sharding, lambda idx, x=x: np.asarray(x)[idx]),
        host, target)

  manager = checkpoint_lib.create_manager(directory, config)
  for step in (1, 2):
    checkpoint_lib.save(manager, state(step)[1], {'step': step}, 0.5)
  checkpoint_lib.close(manager)
  saved = manager.all_steps()
  multihost_utils.sync_global_devices('saved')
  damaged = []
  if process_id == 0:
    for path in glob.glob(os.path.join(directory, '2', 'state',
                                       'ocdbt.process_1', 'd', '*')):
      os.truncate(path, os.path.getsize(path) // 2)
      damaged.append(path)
  multihost_utils.sync_global_devices('damaged')

  manager = checkpoint_lib.create_manager(directory, config)  # A restart.
  restored, extra, step = checkpoint_lib.restore_readable(
      manager, state(0)[0], mesh)
  rows = {}
  for shard in restored.params['w'].addressable_shards:
    rows[shard.index[0].start] = bool(np.array_equal(
        np.asarray(shard.data), values(step)[shard.index]))
  result = {'saved': saved, 'damaged': damaged, 'step': step, 'extra': extra,
            'rows_equal': rows, 'all_steps': manager.all_steps(),
            'towers': towers}
  checkpoint_lib.close(manager)
  print('RESULT ' + json.dumps({'process': process_id, **result}),
        flush=True)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
