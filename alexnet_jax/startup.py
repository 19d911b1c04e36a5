"""What the command-line entry points (launch.py, evaluate.py, sweep.py and
the `python -m` tools) do to the process before any work; importing a
library module never does any of it.

- `set_xla_flags()`, before JAX starts: the XLA:CPU options of xla_cpu.py.
- `hide_gpus_from_tensorflow()`: TensorFlow runs only the input pipeline;
  left alone it would take a GPU's memory that JAX needs.
- `quiet_libraries(verbose)`: the console tells the run's story (identity,
  progress, evaluations, warnings that matter, errors). Other libraries'
  INFO lines (orbax's save internals, JAX's backend probing, tfds's builder
  notes) and their known harmless warnings are dropped unless `verbose`
  (the entry points' `--verbosity=1`, absl's own flag).
"""

import logging
import os

from alexnet_jax import xla_cpu

# This project's files: their records always pass.
_OURS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Warnings other libraries repeat that say nothing about the run.
HARMLESS_WARNINGS = (
    # tfds, at each use of the demo's own builder config.
    'Using custom data configuration',
    # orbax: a checkpoint saved without an evaluation has no metrics, by
    # design (best_fn is set so that those with one are ranked).
    'did not provide metrics',
)


def set_xla_flags(**options):
  """The XLA:CPU options (xla_cpu.set_flags(**options)); call it before
  anything imports JAX."""
  xla_cpu.set_flags(**options)


def hide_gpus_from_tensorflow():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')


class LibraryChatter(logging.Filter):
  """Drops other libraries' records below WARNING and their harmless
  warnings; this project's records and every error pass."""

  def filter(self, record):
    if record.pathname.startswith(_OURS) or record.levelno >= logging.ERROR:
      return True
    if record.levelno >= logging.WARNING:
      message = record.getMessage()
      return not any(w in message for w in HARMLESS_WARNINGS)
    return False


def quiet_libraries(verbose: bool = False):
  """Installs LibraryChatter on absl's handler (which every Python logger
  reaches), unless `verbose`."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  handler = absl_logging.get_absl_handler()
  for f in list(handler.filters):
    if isinstance(f, LibraryChatter):
      handler.removeFilter(f)
  if not verbose:
    handler.addFilter(LibraryChatter())
