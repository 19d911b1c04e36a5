"""Evaluation of finished runs: 10-crop averaging, ensembles, the command
line, restoring a (2, 2)-mesh run onto one device."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import evaluate
from alexnet_jax import mesh as mesh_lib
from alexnet_jax import model as model_lib
from alexnet_jax import optimizer as optimizer_lib
from alexnet_jax import run_dir
from alexnet_jax import train
from alexnet_jax import train_step as train_step_lib
from tests import train_helpers as th


@pytest.fixture(scope='module')
def runs(data_dir, tmp_path_factory):
  """Two finished tiny runs: `a` trained 2 steps on 2 data x 2 tower devices
  (checkpoints and evaluations at steps 1 and 2), `b` the same run stopped
  at step 1 (a's workdir without its last checkpoint)."""
  root = tmp_path_factory.mktemp('runs')
  a, b = str(root / 'a'), str(root / 'b')
  config = th.tiny_config(data_dir, total_steps=2, **{
      'mesh.data_axis_size': 2, 'mesh.tower_axis_size': 2,
      'eval.every_steps': 1, 'checkpoint.every_steps': 1})
  train.train_and_evaluate(config, a)
  shutil.copytree(a, b)
  shutil.rmtree(os.path.join(b, 'checkpoints', '2'))
  return a, b


def _softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _hand_metrics(probs, labels):
  """Top-1/top-5 error and loss by numpy sorting (distinct probabilities)."""
  order = np.argsort(-probs, axis=-1)
  k5 = min(5, probs.shape[-1])
  return {'top1_error': float(np.mean(order[:, 0] != labels)),
          'top5_error': float(np.mean(
              [l not in o[:k5] for o, l in zip(order, labels)])),
          'loss': float(np.mean(-np.log(probs[np.arange(len(labels)),
                                              labels])))}


def test_ten_crop_is_the_softmax_average_of_the_views():
  """predict_step and eval_step average the 10 views' softmax (§4.1), as
  numpy does from the per-view logits of the unsharded model."""
  config = th.tiny_config()
  model = model_lib.create_model(config.model)
  mesh = mesh_lib.make_mesh(config.model.num_towers, 2, 1)
  state = train_step_lib.create_train_state(
      model, optimizer_lib.create_optimizer(config.optim), mesh,
      jax.random.PRNGKey(3), 64)
  b, v = 4, 10
  views = np.asarray(jax.random.normal(jax.random.PRNGKey(1),
                                       (b, v, 64, 64, 3))) * 60
  labels = np.arange(b) % config.model.num_classes
  host_params = jax.device_get(state.params)
  logits = np.asarray(jax.jit(model.apply)(
      {'params': host_params}, views.reshape((b * v, 64, 64, 3))))
  hand = _softmax(logits.astype(np.float64)).reshape(b, v, -1).mean(axis=1)

  predict_step = train_step_lib.make_predict_step(model, mesh, state.params)
  ours = np.exp(np.asarray(predict_step(state.params, views), np.float64))
  np.testing.assert_allclose(ours, hand, rtol=1e-5, atol=1e-7)
  assert not np.allclose(hand, _softmax(logits.reshape(b, v, -1)[:, 0]))

  sums = jax.device_get(train_step_lib.make_eval_step(
      model, mesh, state.params)(state.params,
                                 {'images': views, 'labels': labels}))
  expected = _hand_metrics(hand, labels)
  assert sums['count'] == b
  assert 1 - sums['top1_correct'] / b == expected['top1_error']
  assert 1 - sums['top5_correct'] / b == expected['top5_error']
  np.testing.assert_allclose(sums['loss'] / b, expected['loss'], rtol=1e-5)
  assert evaluate.metrics(ours, labels)['top1_error'] == expected[
      'top1_error']


def test_2x2_run_restored_on_one_device_gives_the_trainers_centre_numbers(
    runs):
  a, _ = runs
  results = evaluate.evaluate_runs([a], checkpoint='latest',
                                   crops=('center',), mesh_shape=(1, 1))
  member = results['members'][0]
  assert member['mesh'] == [1, 1] and member['step'] == 2
  assert 'ensemble' not in results
  trained = th.read_metrics(a)[('val', 2)]  # eval_step on the (2, 2) mesh.
  ours = member['center']
  assert ours['count'] == trained['count'] == 4 * 6
  assert ours['top1_error'] == pytest.approx(trained['top1_error'], abs=1e-9)
  assert ours['top5_error'] == pytest.approx(trained['top5_error'], abs=1e-9)
  assert ours['loss'] == pytest.approx(trained['loss'], rel=1e-5)


def test_ensemble_of_identical_members_is_the_member(runs):
  a, _ = runs
  results = evaluate.evaluate_runs([a, a], crops=('center', 'ten'),
                                   mesh_shape=(1, 2))
  member, ensemble = results['members'][0], results['ensemble']
  assert ensemble['size'] == 2
  for crop in ('center', 'ten'):
    assert ensemble[crop] == member[crop] == results['members'][1][crop]


def test_ensemble_of_two_members_is_the_average_of_their_softmax(runs):
  a, b = runs
  results = evaluate.evaluate_runs([a, b], crops=('center',),
                                   mesh_shape=(1, 2), keep_predictions=True)
  assert [m['step'] for m in results['members']] == [2, 1]
  (lp_a, labels), (lp_b, labels_b) = [p['center']
                                      for p in results['predictions']]
  np.testing.assert_array_equal(labels, labels_b)
  assert not np.allclose(lp_a, lp_b)
  average = (np.exp(lp_a.astype(np.float64)) +
             np.exp(lp_b.astype(np.float64))) / 2
  ours = results['ensemble']['center']
  hand = _hand_metrics(average, labels)
  assert ours['count'] == len(labels) == 24
  assert ours['top1_error'] == hand['top1_error']
  assert ours['top5_error'] == hand['top5_error']
  assert ours['loss'] == pytest.approx(hand['loss'], rel=1e-12)
  assert results['members'][0]['center']['loss'] == pytest.approx(
      _hand_metrics(np.exp(lp_a.astype(np.float64)), labels)['loss'])


def test_command_line_end_to_end_writes_eval_results(runs, tmp_path):
  a, b = runs
  out = subprocess.run(
      [sys.executable, os.path.join(th.REPO, 'evaluate.py'),
       f'--workdir={a}', f'--workdir={b}', '--checkpoint=best',
       '--crops=center,ten', '--mesh=1,1', '--config.data.prefetch=1'],
      env=th.subprocess_env(2), cwd=th.REPO, capture_output=True, text=True,
      timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(os.path.join(a, evaluate.RESULTS_FILE)) as f:
    results = json.load(f)
  assert results['checkpoint'] == 'best'
  assert [m['step'] for m in results['members']] == [2, 1]  # Ties: later.
  assert results['ensemble']['size'] == 2
  for part in results['members'] + [results['ensemble']]:
    assert part['center']['count'] == part['ten']['count'] == 24
  assert '| ensemble of 2 (softmax averaged) | best | 10 crops |' in out.stdout
  assert '| paper, 5 CNNs averaged | | | 38.10% | 16.40% |' in out.stdout


def test_clear_errors_for_missing_runs_and_mismatched_members(runs,
                                                             tmp_path):
  a, _ = runs
  with pytest.raises(FileNotFoundError, match='training run wrote'):
    evaluate.evaluate_runs([str(tmp_path / 'nowhere')])
  with pytest.raises(FileNotFoundError, match=r'holds steps \[1, 2\]'):
    evaluate.evaluate_runs([a], checkpoint='7', crops=('center',))
  with pytest.raises(ValueError, match='choose from center,ten'):
    evaluate.evaluate_runs([a], crops=('centre',))
  other = tmp_path / 'other'
  other.mkdir()
  config = run_dir.load_config(a)
  config.model.num_classes = 10
  (other / 'config.json').write_text(config.to_json())
  with pytest.raises(ValueError, match='same number of classes'):
    evaluate.evaluate_runs([a, str(other)])
  with pytest.raises(ValueError, match='same validation images'):
    evaluate.check_same_examples(np.array([0, 1]), np.array([1, 0]), 'x',
                                 'y', 'center')


def test_best_checkpoint_is_the_lowest_validation_error(runs):
  a, _ = runs
  from alexnet_jax import checkpoint as checkpoint_lib
  config = run_dir.load_config(a)
  manager = checkpoint_lib.create_manager(os.path.join(a, 'checkpoints'),
                                          config.checkpoint)
  try:
    # The validation error saved with each checkpoint ranks them, and
    # outranks errors read elsewhere (metrics.jsonl).
    stored = {s: manager.metrics(s)[checkpoint_lib.VAL_ERROR]
              for s in manager.all_steps()}
    assert sorted(stored) == [1, 2]
    best = min(stored, key=lambda s: (stored[s], -s))
    assert run_dir.checkpoint_step(manager, 'best') == best
    assert run_dir.checkpoint_step(
        manager, 'best', {s: -e for s, e in stored.items()}) == best
    assert run_dir.checkpoint_step(manager, 'latest') == 2
  finally:
    manager.close()

  class Scored:  # Distinct saved errors: the lowest wins, ties the later.
    directory = a
    saved = {1: 0.3, 2: 0.1, 3: 0.2, 4: 0.1}
    all_steps = lambda self: list(self.saved)
    metrics = lambda self, step: {checkpoint_lib.VAL_ERROR: self.saved[step]}

  assert run_dir.checkpoint_step(Scored(), 'best') == 4
  # Saved errors outrank errors read elsewhere.
  assert run_dir.checkpoint_step(Scored(), 'best',
                                  {1: 0.0, 2: 0.9, 3: 0.9, 4: 0.9}) == 4

  class Unscored:  # Checkpoints saved without metrics (older runs).
    directory = a
    all_steps = lambda self: [1, 2]
    metrics = lambda self, step: None

  assert run_dir.checkpoint_step(Unscored(), 'best', {1: 0.5, 2: 0.6}) == 1
  assert run_dir.checkpoint_step(Unscored(), 'best', {1: 0.5, 2: 0.4}) == 2
  with pytest.raises(ValueError, match='none is "best"'):
    run_dir.checkpoint_step(Unscored(), 'best', {3: 0.1})


def test_top_k_rules_on_hand_made_scores():
  """The one ranking rule, in jnp (train/eval steps) and numpy (ensembles),
  with more classes than k: a label counts as top-k when fewer than k
  classes score strictly higher (ties go to the label)."""
  scores = np.array([
      [0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 0: rank 0
      [0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05],  # label 6: rank 6
      [0.2, 0.2, 0.2, 0.2, 0.1, 0.1, 0.0, 0.0],  # label 4: rank 4
      [0.2, 0.2, 0.2, 0.2, 0.2, 0.0, 0.0, 0.0],  # label 4: rank 0 (tie)
      [0.5, 0.2, 0.1, 0.1, 0.05, 0.04, 0.01, 0.0],  # label 5: rank 5
  ], np.float32)
  labels = np.array([0, 6, 4, 4, 5], np.int32)
  top1 = train_step_lib.top_k_correct(jnp.asarray(scores), labels, 1)
  top5 = train_step_lib.top_k_correct(jnp.asarray(scores), labels, 5)
  np.testing.assert_array_equal(top1, [1, 0, 0, 1, 0])
  np.testing.assert_array_equal(top5, [1, 0, 1, 1, 0])
  m = evaluate.metrics(scores, labels)
  assert m['top1_error'] == pytest.approx(3 / 5)
  assert m['top5_error'] == pytest.approx(2 / 5)
  assert m['count'] == 5
  assert m["loss"] == pytest.approx(
      -np.log(scores[np.arange(5), labels]).mean())
