r"""Runs the paper's ablations at CPU scale: one workdir per config variant.

  python sweep.py --root=/tmp/alexnet_sweep
  python sweep.py --root=/tmp/alexnet_sweep --variants=baseline,tanh \
      --seeds=3 --config.num_epochs=6
  python report.py --root=/tmp/alexnet_sweep --out=docs/ABLATIONS.md

Variants (alexnet_jax/sweep.py VARIANTS): baseline (the demo), no_lrn,
no_overlap, one_tower, tanh, dropout (0.5; the demo has none), no_pca_noise,
deeper, shallower, no_exchange. Each is the demo shortened to 10 epochs
(alexnet_jax/sweep.py SHORT_RUN); `--config.<field>=<value>` overrides apply
to every variant (a misspelt field fails before anything runs). Runs go one
after another; running the command again skips finished workdirs and resumes
an interrupted one.

Expected time: about 9-26 minutes for the 10 default variants on a 2-core
CPU (docs/ABLATIONS.md says how long its run took; the
first run also generates the demo data); each run's time is logged and kept
in <workdir>/sweep.json.
"""

import os

from alexnet_jax import startup

startup.set_xla_flags()  # Before JAX starts, on a CPU (alexnet_jax/xla_cpu.py).

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from alexnet_jax import sweep

_ROOT = flags.DEFINE_string('root', None, 'Directory holding one workdir per '
                            'variant (<root>/<variant>[_seed<k>]).')
_VARIANTS = flags.DEFINE_list(
    'variants', list(sweep.VARIANTS),
    f'Variants to run, in order; from {", ".join(sweep.VARIANTS)}.')
_SEEDS = flags.DEFINE_integer('seeds', 1, 'Runs per variant (seeds 0..N-1 '
                              'added to config.seed).')
# Only its --config.<field>=<value> overrides are used: they are checked
# against the demo config, then applied to every variant.
_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           'configs', 'alexnet.py') + ':demo',
    'Leave as is; pass --config.<field>=<value> to override a field in every '
    'variant.', lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  startup.quiet_libraries(verbose=logging.get_verbosity() >= 1)
  startup.hide_gpus_from_tensorflow()
  startup.check_platform()
  overrides = config_flags.get_override_values(flags.FLAGS['config'])
  if overrides:
    logging.info('Overrides for every variant: %s', overrides)
  sweep.run_sweep(_ROOT.value, _VARIANTS.value, _SEEDS.value, overrides)


if __name__ == '__main__':
  flags.mark_flags_as_required(['root'])
  app.run(main)
