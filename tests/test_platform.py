"""Per-backend choices (speed paths, XLA:CPU options, the accelerator
check), the synthetic loop and the profiler trace."""

import glob
import os

from absl import logging
import jax
import jax.numpy as jnp
import pytest

from alexnet_jax import backends
from alexnet_jax import lrn as lrn_lib
from alexnet_jax import pool
from alexnet_jax import startup
from alexnet_jax import train
from alexnet_jax import xla_cpu
from tests import train_helpers as th


def _custom_vjps(fn, *args):
  return str(jax.make_jaxpr(fn)(*args)).count('custom_vjp_call')


@pytest.mark.parametrize('backend,custom', [('cpu', True), ('gpu', False),
                                            ('tpu', False)])
def test_auto_is_the_hand_written_gradient_on_the_cpu_only(monkeypatch,
                                                           backend, custom):
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  assert backends.custom_gradient('auto', 'x') is custom
  assert backends.custom_gradient('custom', 'x')
  assert not backends.custom_gradient('xla', 'x')
  x = jnp.ones((1, 7, 7, 8))
  assert _custom_vjps(lambda x: pool.max_pool(x, 3, 2), x) == int(custom)
  assert _custom_vjps(lambda x: lrn_lib.lrn(x, k=2, n=5, alpha=1e-4,
                                            beta=0.75), x) == int(custom)
  with pytest.raises(ValueError, match="model.max_pool_grad='fast'"):
    pool.max_pool(x, 3, 2, 'fast')


def test_xla_cpu_options_only_for_a_cpu_run(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '')
  monkeypatch.setattr(startup, 'expected_platform', lambda: 'accelerator')
  assert not startup.set_xla_flags()
  assert os.environ['XLA_FLAGS'] == ''
  monkeypatch.setattr(startup, 'expected_platform', lambda: 'cpu')
  assert startup.set_xla_flags()
  assert xla_cpu.flags_set()


def test_an_unused_accelerator_is_said_loudly(monkeypatch):
  warnings = []
  monkeypatch.setattr(logging, 'warning',
                      lambda msg, *a: warnings.append(msg % a))
  monkeypatch.setattr(startup, 'accelerator_devices',
                      lambda: {'gpu': ['/dev/nvidia0'], 'tpu': []})
  startup.check_platform()  # JAX runs on the CPU here.
  assert len(warnings) == 1
  assert 'has a GPU (/dev/nvidia0) but JAX runs on the CPU' in warnings[0]
  assert f'"jax[cuda12]=={jax.__version__}"' in warnings[0]
  monkeypatch.setattr(startup, 'accelerator_devices',
                      lambda: {'gpu': [], 'tpu': ['/dev/accel0']})
  startup.check_platform()
  assert f'"jax[tpu]=={jax.__version__}"' in warnings[1]


def test_synthetic_loop_trains_and_writes_a_profile(tmp_path):
  """The whole loop on random device-made data (no input pipeline), with a
  profiler trace of steps 3-4 in the workdir for TensorBoard, and the final
  figures (their nearest neighbours read the training split once)."""
  workdir = str(tmp_path)
  config = th.tiny_config(None, total_steps=6, **{
      'data.dataset': 'synthetic', 'data.synthetic_eval_examples': 12,
      'data.mean': 'image', 'profile.start_step': 3, 'profile.num_steps': 2,
      'figures.enabled': True, 'figures.nearest_neighbours': True})
  state, val = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 6
  assert val['count'] == 12  # The masked last batch is left out.
  assert th.checkpoint_steps(workdir) == [2, 4, 6]
  traces = glob.glob(os.path.join(workdir, 'plugins', 'profile', '*',
                                  '*.xplane.pb'))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  assert os.path.exists(os.path.join(workdir, 'figures',
                                     'nearest_neighbours.png'))


def test_each_process_sizes_its_pipeline_to_its_share_of_the_host(
    monkeypatch):
  from alexnet_jax import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(os, 'cpu_count', lambda: 16)
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(16)))
  monkeypatch.delenv(startup.PROCESSES_ON_HOST, raising=False)
  assert ip.host_cores_for_this_process() == 16
  monkeypatch.setenv(startup.PROCESSES_ON_HOST, '8')  # One per GPU.
  assert ip.host_cores_for_this_process() == 2
  # A scheduler that pinned the process (--cpus-per-task=4) has decided.
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1, 2, 3})
  assert ip.host_cores_for_this_process() == 4


def test_library_chatter_passes_ours_and_drops_libraries_even_in_a_checkout():
  """Our records pass at any level; another library's INFO is dropped, also
  when it is installed in a virtualenv inside the checkout."""
  import logging as std_logging  # pylint: disable=g-import-not-at-top
  chatter = startup.LibraryChatter()

  def passes(path, level=std_logging.INFO, message='x'):
    return chatter.filter(std_logging.LogRecord(
        'name', level, path, 1, message, None, None))

  for ours in ('launch.py', 'alexnet_jax/train.py', 'configs/alexnet.py'):
    assert passes(os.path.join(th.REPO, ours)), ours
  venv = os.path.join(th.REPO, '.venv', 'lib', 'python3.11', 'site-packages',
                      'orbax', 'checkpoint', 'x.py')
  assert not passes(venv)
  assert not passes(th.REPO + '2/alexnet_jax/train.py')  # A sibling folder.
  assert passes(venv, std_logging.WARNING)
  assert not passes(venv, std_logging.WARNING, 'Using custom data '
                    'configuration demo')
  assert passes(venv, std_logging.ERROR, 'Using custom data configuration')


def test_distributed_flags_that_contradict_each_other_are_refused():
  with pytest.raises(ValueError, match='all of --coordinator_address'):
    startup.initialize_distributed('auto', coordinator_address='h:1')
  with pytest.raises(ValueError, match='--distributed=off contradicts'):
    startup.initialize_distributed('off', 'h:1', 2, 0)
  with pytest.raises(ValueError, match="--distributed='sometimes'"):
    startup.initialize_distributed('sometimes')
