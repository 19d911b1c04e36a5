"""Checkpoints: kill -9 and resume is bitwise the uninterrupted run; SIGTERM
saves and exits 0; keep last N + best; restore onto another mesh."""

import functools
import json
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alexnet_jax import checkpoint as checkpoint_lib
from alexnet_jax import mesh as mesh_lib
from alexnet_jax import model as model_lib
from alexnet_jax import optimizer as optimizer_lib
from alexnet_jax import run_dir
from alexnet_jax import train
from alexnet_jax import train_step as train_step_lib
from tests import train_helpers as th


def test_kill9_then_resume_is_bitwise_the_uninterrupted_run(data_dir,
                                                            tmp_path):
  overrides = {'data.data_dir': data_dir, 'total_steps': 10,
               'checkpoint.every_steps': 3, 'eval.every_steps': 4,
               'schedule.kind': 'plateau', 'schedule.patience': 1}
  whole, broken = str(tmp_path / 'whole'), str(tmp_path / 'broken')
  uninterrupted = th.start(whole, overrides)
  proc = th.start(broken, overrides, sleep=0.3)
  th.wait_for(lambda: 6 in th.checkpoint_steps(broken), proc,
              what='the checkpoint of step 6')
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert max(th.checkpoint_steps(broken)) < 10, 'killed too late'
  out, _ = uninterrupted.communicate(timeout=300)
  assert uninterrupted.returncode == 0, out[-3000:]
  proc = th.start(broken, overrides)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert 'Resumed from the checkpoint of step' in out

  config = th.tiny_config(**overrides)
  a, a_extra = th.restore_latest(whole, config)
  b, b_extra = th.restore_latest(broken, config)
  assert int(a.step) == int(b.step) == 10
  th.assert_trees_equal(a, b)  # Params, momentum, lr, rng: bit for bit.
  assert a_extra == b_extra  # The plateau rule's state ...
  assert a_extra['schedule']['best_error'] is not None  # ... not a blank one.
  assert th.read_metrics(whole) == th.read_metrics(broken)


def test_sigterm_saves_at_next_step_and_exits_zero(data_dir, tmp_path):
  workdir = str(tmp_path)
  overrides = {'data.data_dir': data_dir, 'total_steps': 200,
               'checkpoint.every_steps': 1000, 'eval.every_steps': 1000}
  proc = th.start(workdir, overrides, sleep=0.2)
  th.wait_for(lambda: os.path.exists(os.path.join(workdir, 'metrics.jsonl'))
              and len(th.read_metrics(workdir)) >= 3, proc,
              what='three logged steps')
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  assert 'Preempted' in out
  last = max(s for split, s in th.read_metrics(workdir) if split == 'train')
  assert last < 200
  assert th.checkpoint_steps(workdir) == [last]


def _tiny_state(step, value):
  return train_step_lib.TrainState(
      step=jnp.asarray(step, jnp.int32), params={'w': jnp.full((3,), value)},
      opt_state=(), rng=jax.random.PRNGKey(0))


def test_keeps_the_last_n_plus_the_best(tmp_path):
  c = ml_collections.ConfigDict(dict(keep=2, keep_best=1, async_save=True))
  manager = checkpoint_lib.create_manager(str(tmp_path), c)
  for step, err in [(1, 0.5), (2, 0.2), (3, 0.4), (4, None), (5, None)]:
    checkpoint_lib.save(manager, _tiny_state(step, step), {'s': step}, err)
  manager.wait_until_finished()
  assert manager.all_steps() == [2, 4, 5]
  mesh = mesh_lib.make_mesh(1, 1, 1)
  state, extra = checkpoint_lib.restore(
      manager, jax.eval_shape(lambda: _tiny_state(0, 0.0)), mesh, step=2)
  assert extra == {'s': 2} and float(state.params['w'][0]) == 2.0
  manager.close()


def test_restore_onto_another_mesh(data_dir, tmp_path):
  """Trained on 2 data x 2 towers, restored and evaluated on one device."""
  workdir = str(tmp_path)
  config = th.tiny_config(data_dir, total_steps=2,
                          **{'mesh.data_axis_size': 2,
                             'mesh.tower_axis_size': 2})
  trained, _ = train.train_and_evaluate(config, workdir)
  big = trained.params['conv2']['kernel'].sharding.mesh
  assert dict(big.shape) == {'data': 2, 'tower': 2}

  one = mesh_lib.make_mesh(config.model.num_towers, 1, 1)
  state, _ = th.restore_latest(workdir, config, one)
  th.assert_trees_equal(jax.device_get(trained), state)

  model = model_lib.create_model(config.model)
  manager = checkpoint_lib.create_manager(
      os.path.join(workdir, 'checkpoints'), config.checkpoint)
  abstract = jax.eval_shape(functools.partial(
      train_step_lib.create_train_state, model,
      optimizer_lib.create_optimizer(config.optim), one,
      jax.random.PRNGKey(0), config.data.crop_size))
  restored, _ = checkpoint_lib.restore(manager, abstract, one)
  manager.close()
  assert restored.params['conv2']['kernel'].sharding.mesh.devices.size == 1
  images = jax.random.normal(jax.random.PRNGKey(1), (4, 64, 64, 3)) * 50
  batch = {'images': images, 'labels': jnp.arange(4) % 4}
  on_one = train_step_lib.make_eval_step(model, one, restored.params)(
      restored.params, batch)
  on_four = train_step_lib.make_eval_step(model, big, trained.params)(
      trained.params, batch)
  np.testing.assert_allclose(on_one['loss'], on_four['loss'], rtol=1e-5)
  assert float(on_one['top1_correct']) == float(on_four['top1_correct'])


def test_best_is_stored_with_its_checkpoint_and_survives_a_resume(tmp_path):
  """The validation error is written into the checkpoint (orbax does so only
  with best_fn), so a new manager (a resumed run) still keeps the best."""
  c = ml_collections.ConfigDict(dict(keep=2, keep_best=1, async_save=True))
  manager = checkpoint_lib.create_manager(str(tmp_path), c)
  for step, err in [(1, 0.5), (2, 0.2), (3, 0.4)]:
    checkpoint_lib.save(manager, _tiny_state(step, step), {'s': step}, err)
  manager.wait_until_finished()
  manager.close()
  with open(tmp_path / '2' / 'metrics' / 'metrics') as f:  # orbax's item.
    assert json.load(f) == {checkpoint_lib.VAL_ERROR: 0.2}

  resumed = checkpoint_lib.create_manager(str(tmp_path), c)
  assert resumed.metrics(2) == {checkpoint_lib.VAL_ERROR: 0.2}
  for step, err in [(4, None), (5, 0.3), (6, None)]:
    checkpoint_lib.save(resumed, _tiny_state(step, step), {'s': step}, err)
  resumed.wait_until_finished()
  assert resumed.all_steps() == [2, 5, 6]
  # 'best' reads the stored metric, not metrics.jsonl (here: none given).
  assert run_dir.checkpoint_steps(resumed, 'best')[0] == 2
  assert run_dir.checkpoint_steps(resumed, 'best', {5: 0.1})[0] == 2
  resumed.close()
