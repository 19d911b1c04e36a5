"""Per-backend choices of speed paths that give the same numbers.

A hand-written gradient (the max-pool's, LRN's) earns its keep where XLA's
own is slow, which is XLA:CPU; on GPU and TPU XLA's own is as fast or faster
(docs/BENCHMARKS.md). A model setting is 'custom', 'xla' or 'auto' (the
hand-written one on the CPU, XLA's elsewhere).
"""

import jax

GRADIENTS = ('auto', 'custom', 'xla')


def custom_gradient(choice: str, setting: str) -> bool:
  """Whether the hand-written gradient is used for `choice` ('auto',
  'custom' or 'xla'); `setting` names the config field in errors."""
  if choice not in GRADIENTS:
    raise ValueError(f'{setting}={choice!r}: use one of {GRADIENTS}.')
  if choice == 'auto':
    return jax.default_backend() == 'cpu'
  return choice == 'custom'
