r"""Trains AlexNet: flags only; the work is `alexnet_jax.train.train_and_evaluate`.

  python launch.py --config=configs/alexnet.py:demo --workdir=/tmp/alexnet_demo
  python launch.py --config=configs/alexnet.py --workdir=/tmp/alexnet \
      --config.data.prepared_dir=/data/alexnet_copy --config.batch_size=256

Any config field can be overridden with --config.<field>=<value>; the config
is locked, so a misspelt field fails before anything runs. Running again in a
workdir that holds checkpoints resumes from the latest.

Many processes: run the same command in every process. jax.distributed
starts by itself where jax detects the cluster (a SLURM job step, Open MPI,
a Cloud TPU slice, GKE, Kubernetes; --distributed=auto), or from
--coordinator_address=host:port --num_processes=N --process_id=i
(alexnet_jax/startup.py; README "Many hosts").
"""

from alexnet_jax import startup

startup.set_xla_flags()  # Before JAX starts, on a CPU (alexnet_jax/xla_cpu.py).

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from alexnet_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, `path.py` or `path.py:variant[,variant]`.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, TensorBoard logs, config.')
_START_DISTRIBUTED = startup.define_distributed_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  startup.quiet_libraries(verbose=logging.get_verbosity() >= 1)
  startup.hide_gpus_from_tensorflow()
  _START_DISTRIBUTED()
  startup.check_platform()
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
