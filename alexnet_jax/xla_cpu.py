"""The XLA:CPU scheduler setting this project's entry points use.

XLA:CPU's concurrency-optimised scheduler (on by default in jax 0.10) orders
a step so that independent ops run side by side. With AlexNet's large ops
on a few cores they only compete, with each other and with tf.data's
threads: on the project's 2-core VM the demo took 142 s with it and 96 s
without (the same numbers to the last digit: only the order of independent
ops changes), the train step alone ~8% less CPU time (docs/BENCHMARKS.md).
It is an XLA flag, read when JAX starts its CPU backend, so launch.py,
evaluate.py, sweep.py and the benchmarks call `sequential_scheduler()`
before any JAX work. GPU and TPU ignore it. The tests keep XLA's default:
on their 8 fake devices sharing 2 cores it was ~10% faster.
"""

import os

OPTION = 'xla_cpu_enable_concurrency_optimized_scheduler'


def sequential_scheduler():
  """Turns the scheduler off in XLA_FLAGS, unless XLA_FLAGS already says."""
  flags = os.environ.get('XLA_FLAGS', '')
  if OPTION not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} --{OPTION}=false'.strip()
