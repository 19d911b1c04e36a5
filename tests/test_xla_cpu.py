"""alexnet_jax.xla_cpu: the XLA:CPU options the entry points set."""

import os
import re
import subprocess
import sys

from alexnet_jax import xla_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULER = '--xla_cpu_enable_concurrency_optimized_scheduler=false'
XNN = ('--xla_cpu_experimental_ynn_fusion_type=-individual_convolution '
       '--xla_cpu_experimental_xnn_fusion_type=+individual_convolution')


def test_adds_the_flags_and_keeps_the_users(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  xla_cpu.set_flags()
  assert os.environ['XLA_FLAGS'] == (
      f'--xla_force_host_platform_device_count=2 {SCHEDULER} {XNN}')
  user = '--xla_cpu_enable_concurrency_optimized_scheduler=true'
  monkeypatch.setenv('XLA_FLAGS', user)
  xla_cpu.set_flags()
  assert os.environ['XLA_FLAGS'] == f'{user} {XNN}'
  monkeypatch.delenv('XLA_FLAGS')
  xla_cpu.set_flags(xnn_convolutions=False)
  assert os.environ['XLA_FLAGS'] == SCHEDULER
  monkeypatch.delenv('XLA_FLAGS')
  xla_cpu.set_flags(sequential_scheduler=False)
  assert os.environ['XLA_FLAGS'] == XNN


def test_the_flags_reach_xla_when_set_by_an_entry_point():
  """XLA reads the flags when JAX starts its backend: a program that sets
  them as launch.py does compiles differently from one that does not, and an
  unknown flag would abort (XLA rejects flags it does not know)."""
  program = (
      'import sys; sys.path.insert(0, {root!r})\n'
      'from alexnet_jax import xla_cpu\n'
      '{call}\n'
      'import jax, jax.numpy as jnp\n'
      'def f(x, w, k):\n'
      '  y = jnp.tanh(x @ w) + jnp.sin(x @ w.T) + jnp.cos(x @ w)\n'
      '  return jax.lax.conv_general_dilated(\n'
      '      y.reshape(4, 32, 32, 16), k, (1, 1), "SAME",\n'
      '      dimension_numbers=("NHWC", "HWIO", "NHWC"))\n'
      'x = jnp.ones((256, 256))\n'
      'print(jax.jit(f).lower(x, x, jnp.ones((3, 3, 16, 64))).compile()'
      '.as_text())\n')
  # No compilation cache either: a loaded executable prints differently.
  env = {k: v for k, v in os.environ.items()
         if k not in ('XLA_FLAGS', 'JAX_COMPILATION_CACHE_DIR')}

  def hlo(call):
    return subprocess.run(
        [sys.executable, '-c', program.format(root=ROOT, call=call)],
        env=env, capture_output=True, text=True, check=True).stdout

  def ynn_convolution(text):  # The convolution as a YNNPACK fusion.
    return re.search(r'%ynn_fusion\S* = .*op_name="jit\(f\)/conv_general',
                     text) is not None

  default = hlo('pass')
  assert hlo('pass') == default  # Compiling is deterministic ...
  assert ynn_convolution(default)
  scheduler = hlo('xla_cpu.set_flags(xnn_convolutions=False)')
  assert scheduler != default and ynn_convolution(scheduler)
  assert not ynn_convolution(hlo('xla_cpu.set_flags()'))
