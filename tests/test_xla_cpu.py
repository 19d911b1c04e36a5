"""alexnet_jax.xla_cpu: the scheduler flag the entry points set."""

import os
import subprocess
import sys

from alexnet_jax import xla_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_adds_the_flag_and_keeps_the_users(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  xla_cpu.sequential_scheduler()
  assert os.environ['XLA_FLAGS'] == (
      '--xla_force_host_platform_device_count=2 '
      '--xla_cpu_enable_concurrency_optimized_scheduler=false')
  monkeypatch.setenv('XLA_FLAGS',
                     '--xla_cpu_enable_concurrency_optimized_scheduler=true')
  xla_cpu.sequential_scheduler()
  assert os.environ['XLA_FLAGS'] == (
      '--xla_cpu_enable_concurrency_optimized_scheduler=true')
  monkeypatch.delenv('XLA_FLAGS')
  xla_cpu.sequential_scheduler()
  assert os.environ['XLA_FLAGS'] == (
      '--xla_cpu_enable_concurrency_optimized_scheduler=false')


def test_the_flag_reaches_xla_when_set_by_an_entry_point():
  """XLA reads the flag when JAX starts its backend: a program that sets it
  as launch.py does compiles differently from one that does not, and an
  unknown flag would abort (XLA rejects flags it does not know)."""
  program = (
      'import sys; sys.path.insert(0, {root!r})\n'
      'from alexnet_jax import xla_cpu\n'
      '{call}\n'
      'import jax, jax.numpy as jnp\n'
      'f = lambda x, w: jnp.tanh(x @ w) + jnp.sin(x @ w.T) + jnp.cos(x @ w)\n'
      'x = jnp.ones((64, 64))\n'
      'print(jax.jit(f).lower(x, x).compile().as_text())\n')
  # No compilation cache either: a loaded executable prints differently.
  env = {k: v for k, v in os.environ.items()
         if k not in ('XLA_FLAGS', 'JAX_COMPILATION_CACHE_DIR')}

  def hlo(call):
    return subprocess.run(
        [sys.executable, '-c', program.format(root=ROOT, call=call)],
        env=env, capture_output=True, text=True, check=True).stdout

  default = hlo('pass')
  assert hlo('pass') == default  # Compiling is deterministic ...
  assert hlo('xla_cpu.sequential_scheduler()') != default  # ... the flag not.
