"""The trainer end to end on generated data; cadence, schedules, divergence,
the launcher's locked config."""

import math
import os
import subprocess
import sys

import pytest

from alexnet_jax import checkpoint as checkpoint_lib
from alexnet_jax import native
from alexnet_jax import schedules
from alexnet_jax import train
from tests import train_helpers as th


def test_every_first_last_steps_epochs():
  cadence = train.Cadence(None, steps_per_epoch=4, total_steps=10)
  fired = lambda **k: [s for s in range(1, 11) if cadence.every(s, **k)]
  assert fired(every_steps=3) == [3, 6, 9]
  assert fired(every_epochs=1.0) == [4, 8]
  assert fired(every_epochs=0.5, first=True, last=True) == [1, 2, 4, 6, 8, 10]
  assert fired() == []


def test_plateau_rule_drops_at_most_max_drops_and_round_trips():
  s = schedules.Schedule('plateau', 0.01, steps_per_epoch=10, patience=2,
                         min_delta=0.01, max_drops=2)
  errors = [0.9, 0.8, 0.795, 0.79, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]
  drops = [step for step, e in enumerate(errors) if s.observe(step, e)]
  assert drops == [3, 6]  # Two evaluations without a 0.01 improvement.
  assert s.learning_rate(100) == pytest.approx(0.01 * 0.1**2)
  again = schedules.Schedule('plateau', 0.01, steps_per_epoch=10)
  again.load_state_dict(s.state_dict())
  assert again.state == s.state


def test_step_schedule_and_warmup():
  s = schedules.Schedule('steps', 0.1, steps_per_epoch=10,
                         boundaries_epochs=(1.0, 2.0), warmup_epochs=0.5)
  assert [s.learning_rate(i) for i in (0, 4, 9, 10, 20)] == pytest.approx(
      [0.02, 0.1, 0.1, 0.01, 0.001])


def test_train_and_evaluate_end_to_end(data_dir, tmp_path):
  workdir = str(tmp_path)
  config = th.tiny_config(data_dir, **{'mesh.data_axis_size': -1})  # (4, 2)
  state, val = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 6
  assert val['count'] == 4 * 6  # Every validation image, once.
  metrics = th.read_metrics(workdir)
  assert sorted(s for split, s in metrics if split == 'train') == list(
      range(1, 7))
  assert sorted(s for split, s in metrics if split == 'val') == [1, 3, 6]
  for r in metrics.values():
    assert all(math.isfinite(v) for v in r.values() if isinstance(v, float))
  assert metrics[('train', 6)]['learning_rate'] == pytest.approx(
      config.optim.learning_rate)
  assert th.checkpoint_steps(workdir) == [2, 4, 6]
  assert os.path.exists(os.path.join(workdir, 'config.json'))
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))


def test_resample_setting_checked_before_the_model(data_dir, tmp_path,
                                                   monkeypatch):
  """An unknown config.data.resample, or 'native' where the op cannot be
  built, stops at start with what to set (nothing trained or saved)."""
  config = th.tiny_config(data_dir, **{'data.resample': 'fast'})
  with pytest.raises(ValueError, match="use one of \\('auto', 'native'"):
    train.train_and_evaluate(config, str(tmp_path / 'a'))
  monkeypatch.setenv('ALEXNET_JAX_CACHE_DIR', str(tmp_path / 'ops'))
  monkeypatch.setenv('CXX', 'false')
  native.reset()
  try:
    config = th.tiny_config(data_dir, **{'data.resample': 'native'})
    with pytest.raises(native.BuildError, match='--config.data.resample=tf'):
      train.train_and_evaluate(config, str(tmp_path / 'b'))
  finally:
    native.reset()
  assert th.checkpoint_steps(str(tmp_path / 'b')) == []


# Checked at once (a log and a save every step), or one step late: step 4
# neither logs nor saves, so its metrics are fetched while step 5 runs, and
# step 5's checkpoint must still not be written.
@pytest.mark.parametrize('every', [1, 5], ids=['checked_at_once',
                                               'checked_next_step'])
def test_divergence_names_the_step_and_keeps_last_good(data_dir, tmp_path,
                                                       every):
  workdir = str(tmp_path)
  train.train_and_evaluate(
      th.tiny_config(data_dir, total_steps=3,
                     **{'checkpoint.every_steps': 1,
                        'eval.every_steps': 0}), workdir)
  # Resume with an absurd learning rate: the first update overflows.
  config = th.tiny_config(data_dir, total_steps=8,
                          **{'checkpoint.every_steps': every,
                             'log_every_steps': every,
                             'eval.every_steps': 0,
                             'optim.learning_rate': 1e30})
  with pytest.raises(train.DivergenceError, match='at step 4'):
    train.train_and_evaluate(config, workdir)
  assert th.checkpoint_steps(workdir)[-1] == 3
  manager = checkpoint_lib.create_manager(
      os.path.join(workdir, 'checkpoints'), config.checkpoint)
  assert manager.latest_step() == 3
  manager.close()


def test_misspelt_override_fails_clearly(tmp_path):
  proc = subprocess.run(
      [sys.executable, 'launch.py', '--config=configs/alexnet.py:demo',
       f'--workdir={tmp_path}', '--config.optim.learning_rat=0.1'],
      cwd=th.REPO, env=th.subprocess_env(1), capture_output=True, text=True,
      timeout=120)
  assert proc.returncode != 0
  assert 'Did you mean "learning_rate"' in proc.stderr
  assert not os.listdir(tmp_path)  # Failed before doing anything.
