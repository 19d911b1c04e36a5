"""The XLA:CPU options this project's entry points set.

Both are XLA flags, read when JAX starts its CPU backend, so launch.py,
evaluate.py, sweep.py and the benchmarks call `set_flags()` before any JAX
work. GPU and TPU ignore them. Measured on the project's 2-core VM
(docs/BENCHMARKS.md, "Train step on the CPU", attempts 10 and 15):

- The concurrency-optimised scheduler off (on by default in jax 0.10): it
  orders a step so that independent ops run side by side, which with
  AlexNet's large ops on a few cores only makes them compete, with each
  other and with tf.data's threads: the demo took 142 s with it and 96 s
  without (the same numbers to the last digit: only the order of
  independent ops changes), the train step alone ~8% less CPU time.
- Convolutions through XNNPACK instead of YNNPACK (jax 0.10's default for
  them): YNNPACK runs a convolution with 64 or fewer output channels on one
  core (conv1's forward pass, 48 channels a tower, and conv2's input
  gradient) and the 13x13 layers at 60-80% of the matmul rate; XNNPACK
  runs all of them on every core. The train step: 1,797-2,217 -> 1,533-1,690
  ms at batch 32, 51-58% -> 66-71% of the matmul rate (with XLA's own weight
  gradients, which are faster than conv.py's taps with these convolutions).
  Matrix products stay YNNPACK's.

The tests keep XLA's defaults: their time is compiling, and on their 8 fake
devices sharing 2 cores the default scheduler was ~10% faster.
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


def xnn_convolutions():
  """Whether XLA_FLAGS asks for XNNPACK convolutions as set_flags() does
  (read by alexnet_jax.conv, whose fastest weight gradient depends on it)."""
  flags = os.environ.get('XLA_FLAGS', '').split()
  return all(f'--{option}={value}' in flags
             for option, value in XNN_CONVOLUTIONS.items())
