r"""Trains AlexNet: flags only; the work is `alexnet_jax.train.train_and_evaluate`.

  python launch.py --config=configs/alexnet.py:demo --workdir=/tmp/alexnet_demo
  python launch.py --config=configs/alexnet.py --workdir=/tmp/alexnet \
      --config.data.manual_dir=/data/imagenet --config.batch_size=256

Any config field can be overridden with --config.<field>=<value>; the config
is locked, so a misspelt field fails before anything runs. Running again in a
workdir that holds checkpoints resumes from the latest.

Many hosts: pass --coordinator_address=host:port --num_processes=N
--process_id=i on every host, or nothing on a cluster whose environment
announces several processes (SLURM, Open MPI, multi-host Cloud TPU, see
_CLUSTER_ENV): jax.distributed then detects the rest by itself. A single host
needs nothing.
"""

import os

from alexnet_jax import startup

startup.set_xla_flags()  # Before JAX starts (alexnet_jax/xla_cpu.py).

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from alexnet_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, `path.py` or `path.py:variant[,variant]`.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, TensorBoard logs, config.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None,
    'host:port of process 0, for jax.distributed on many hosts.')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Number of processes (hosts) in the run.')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'This process\'s index in [0, num_processes).')

# Environment variables by which the clusters jax.distributed can detect on
# its own announce themselves with more than one process.
_CLUSTER_ENV = (
    ('SLURM_NTASKS', lambda v: int(v) > 1),
    ('OMPI_COMM_WORLD_SIZE', lambda v: int(v) > 1),
    ('TPU_WORKER_HOSTNAMES', lambda v: ',' in v),
    ('MEGASCALE_COORDINATOR_ADDRESS', bool),
)


def _on_cluster() -> bool:
  return any(name in os.environ and ok(os.environ[name])
             for name, ok in _CLUSTER_ENV)


def initialize_distributed():
  """jax.distributed for multi-host runs; a single host needs nothing."""
  given = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if any(v is not None for v in given) and None in given:
    raise app.UsageError('Give all of --coordinator_address, --num_processes '
                         'and --process_id, or none of them.')
  if None not in given or _on_cluster():
    # Cross-process collectives on CPU (tests, debugging) go through gloo;
    # GPUs and TPUs ignore this.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(*given)  # None: detected from the cluster.


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  startup.quiet_libraries(verbose=logging.get_verbosity() >= 1)
  startup.hide_gpus_from_tensorflow()
  initialize_distributed()
  logging.info('JAX process %d of %d, local devices: %s',
               jax.process_index(), jax.process_count(), jax.local_devices())
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
