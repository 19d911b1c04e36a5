"""Two processes (2 fake CPU devices each, jax.distributed on localhost, gloo)
train in lockstep to the parameters one process with 4 devices reaches on
the same (2 data, 2 tower) mesh; only process 0 writes logs."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests import train_helpers as th


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _flags(overrides):
  return [f'--config.{k}={v}' for k, v in overrides.items()]


def test_two_processes_match_one_process(data_dir, tmp_path):
  overrides = {'data.data_dir': data_dir, 'total_steps': 4,
               'mesh.data_axis_size': 2, 'mesh.tower_axis_size': 2,
               'checkpoint.every_steps': 2, 'eval.every_steps': 0}
  config = th.tiny_config(**overrides)
  # launch.py takes the demo config plus the tiny overrides as flags.
  tiny = {'data.data_dir': data_dir, 'total_steps': 4,
          'mesh.data_axis_size': 2, 'mesh.tower_axis_size': 2,
          'model.num_classes': config.model.num_classes,
          'model.width_multiplier': config.model.width_multiplier,
          'model.fc_features': config.model.fc_features,
          'batch_size': config.batch_size,
          'schedule.kind': 'constant', 'log_every_steps': 1,
          'eval.every_epochs': 0.0, 'eval.every_steps': 0,
          'checkpoint.every_epochs': 0.0, 'checkpoint.every_steps': 2,
          'data.prefetch': 1, 'data.num_parallel_calls': 2,
          'figures.enabled': False}
  tiny.update({f'data.{k}': v for k, v in th.TINY_DATA.items()
               if k != 'demo_image_size'})
  lo, hi = th.TINY_DATA['demo_image_size']
  multi = str(tmp_path / 'multi')
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, 'launch.py', '--config=configs/alexnet.py:demo',
       f'--workdir={multi}', f'--coordinator_address=localhost:{port}',
       '--num_processes=2', f'--process_id={i}',
       f'--config.data.demo_image_size=({lo},{hi})'] + _flags(tiny),
      cwd=th.REPO, env=th.subprocess_env(2), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  single = str(tmp_path / 'single')  # At the same time.
  proc = th.start(single, overrides, emulate_processes=2, num_devices=4)
  outs = [p.communicate(timeout=400)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  assert 'JAX process 1 of 2' in outs[1]
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]

  a, _ = th.restore_latest(multi, config)
  b, _ = th.restore_latest(single, config)
  assert int(a.step) == int(b.step) == 4
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  m, s = th.read_metrics(multi), th.read_metrics(single)
  assert m.keys() == s.keys()
  lines = lambda d: open(os.path.join(d, 'metrics.jsonl')).read().count('\n')
  assert lines(multi) == lines(single)  # Process 1 appended nothing.
  for k in m:
    assert m[k]['loss'] == pytest.approx(s[k]['loss'], rel=1e-5)
  # One writer: one events file, and process 1 logged but wrote nothing.
  events = [f for f in os.listdir(multi) if f.startswith('events.out')]
  assert len(events) == 1

