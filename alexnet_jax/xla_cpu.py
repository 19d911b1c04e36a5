"""The XLA:CPU options this project's entry points set.

Both are XLA flags, read when JAX starts its CPU backend, so the entry
points set them (alexnet_jax/startup.py) before any JAX work. Why each
(docs/BENCHMARKS.md, "Train step on the CPU", has the measurements):

- The concurrency-optimised scheduler off (on by default in jax 0.10): it
  orders a step so that independent ops run side by side, which with
  AlexNet's large ops on a few cores only makes them compete, with each
  other and with tf.data's threads. Only the order of independent ops
  changes: the numbers are the same to the last digit.
- Convolutions through XNNPACK instead of YNNPACK (jax 0.10's default for
  them): YNNPACK runs a convolution with 64 or fewer output channels on one
  core (conv1's forward pass, 48 channels a tower, and conv2's input
  gradient); XNNPACK runs all of them on every core (which is also why
  XLA's own convolution weight gradients are used, not hand-written ones).
  Matrix products stay YNNPACK's.

The tests keep XLA's defaults: their time is compiling, and on their 8 fake
devices sharing 2 cores the default scheduler was faster.
"""

import os

SCHEDULER = {'xla_cpu_enable_concurrency_optimized_scheduler': 'false'}
XNN_CONVOLUTIONS = {
    'xla_cpu_experimental_ynn_fusion_type': '-individual_convolution',
    'xla_cpu_experimental_xnn_fusion_type': '+individual_convolution',
}


def set_flags(sequential_scheduler=True, xnn_convolutions=True):
  """Adds the options to XLA_FLAGS, each unless XLA_FLAGS already names it."""
  options = {**(SCHEDULER if sequential_scheduler else {}),
             **(XNN_CONVOLUTIONS if xnn_convolutions else {})}
  flags = os.environ.get('XLA_FLAGS', '')
  for option, value in options.items():
    if option not in flags:
      flags = f'{flags} --{option}={value}'.strip()
  os.environ['XLA_FLAGS'] = flags


def flags_set() -> bool:
  """Whether XLA_FLAGS holds every option set_flags() sets by default."""
  flags = os.environ.get('XLA_FLAGS', '').split()
  return all(f'--{option}={value}' in flags
             for option, value in {**SCHEDULER, **XNN_CONVOLUTIONS}.items())
