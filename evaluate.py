r"""Evaluates finished runs: flags only; the work is `alexnet_jax.evaluate`.

  python evaluate.py --workdir=/tmp/alexnet_demo
  python evaluate.py --workdir=/ckpt/run1 --workdir=/ckpt/run2 ... \
      --checkpoint=best --crops=center,ten --mesh=1,1 \
      --config.data.data_dir=/data/tfds

Each --workdir is a training run's directory (config.json, checkpoints/);
several form an ensemble whose softmax outputs are averaged per image (the
paper's 5 and 7 CNNs). Centre-crop and 10-crop top-1/top-5 error and loss on
the whole validation set, for each run and the ensemble, go to
<first workdir>/eval_results.json and are printed as a markdown table next
to the paper's numbers.

--config.<field>=<value> overrides a field of every run's saved config
(e.g. where the data now lives, or a smaller --config.batch_size); the
fields are those of the first run's config.json, so a misspelt one fails.
--mesh=D,T evaluates on D data x T tower devices (default: every device);
a run restores onto any mesh.
"""

import sys

from alexnet_jax import startup

startup.set_xla_flags()  # Before JAX starts, on a CPU (alexnet_jax/xla_cpu.py).

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from alexnet_jax import evaluate
from alexnet_jax import run_dir
from configs import alexnet

_WORKDIRS = flags.DEFINE_multi_string(
    'workdir', None, 'A training run\'s directory; repeat for an ensemble.')
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', 'latest',
    'latest, best (lowest validation top-1 error) or a step number.')
_CROPS = flags.DEFINE_list(
    'crops', list(evaluate.CROPS),
    'Crop modes: center (the central patch), ten (4 corners + centre and '
    'their reflections, softmax averaged).')
_MESH = flags.DEFINE_string(
    'mesh', '', 'D,T: a (data, tower) mesh of D x T devices; default every '
    'device.')
_START_DISTRIBUTED = startup.define_distributed_flags()


def _first_workdir(argv):
  """The first --workdir of the command line (before flags are parsed)."""
  for i, arg in enumerate(argv):
    if arg.startswith('--workdir='):
      return arg.split('=', 1)[1]
    if arg == '--workdir' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _template_config(argv):
  """The config whose fields --config.* may override: the first run's
  (configs/alexnet.py's defaults when there is none, e.g. for --help)."""
  workdir = _first_workdir(argv)
  if workdir is None:
    return alexnet.saved_run_defaults()
  try:
    return run_dir.load_config(workdir, alexnet.saved_run_defaults())
  except (FileNotFoundError, ValueError):  # main() reports a bad workdir.
    return alexnet.saved_run_defaults()


_CONFIG = config_flags.DEFINE_config_dict(
    'config', _template_config(sys.argv), 'Overrides of the runs\' saved '
    'configs: --config.<field>=<value>.', lock_config=True)


def _mesh_shape(text):
  if not text:
    return None
  try:
    data, tower = (int(x) for x in text.split(','))
  except ValueError:
    raise app.UsageError(f'--mesh={text!r}: give D,T, e.g. --mesh=1,1 or '
                         '--mesh=4,2.') from None
  return data, tower


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not _WORKDIRS.value:
    raise app.UsageError('Give --workdir=DIR (repeat it for an ensemble).')
  startup.quiet_libraries(verbose=logging.get_verbosity() >= 1)
  startup.hide_gpus_from_tensorflow()
  _START_DISTRIBUTED()
  startup.check_platform()
  overrides = config_flags.get_override_values(flags.FLAGS['config'])
  results = evaluate.evaluate_runs(
      _WORKDIRS.value, checkpoint=_CHECKPOINT.value, crops=_CROPS.value,
      mesh_shape=_mesh_shape(_MESH.value), overrides=overrides,
      defaults=alexnet.saved_run_defaults())
  path = evaluate.write_results(results, _WORKDIRS.value[0])
  if jax.process_index() == 0:
    logging.info('Wrote %s.', path)
    print(evaluate.results_table(results))
    print(f'\nResults: {path}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
