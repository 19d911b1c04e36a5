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
  """Top-1/top-5 error and loss by numpy sorting, independent of the rule's
  implementation: each row sorted by descending score with the label placed
  after every class tied with it (ties count against the network); top-k
  correct when the label's position is < k."""
  k5 = min(5, probs.shape[-1])
  positions = []
  for row, label in zip(probs, labels):
    is_label = np.arange(len(row)) == label
    order = np.lexsort((is_label, -row))  # Last key first: -score, then label.
    positions.append(int(np.flatnonzero(order == label)[0]))
  positions = np.array(positions)
  return {'top1_error': float(np.mean(positions >= 1)),
          'top5_error': float(np.mean(positions >= k5)),
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
  """The ensemble's metrics are those of the members' averaged softmax
  (§6), computed here in numpy from each member's predictions. The members
  differ (steps 2 and 1), and so does the ensemble's loss from each
  member's, so an ensemble that returned one member's predictions, or
  averaged the log-probabilities (a geometric mean), fails."""
  a, b = runs
  results = evaluate.evaluate_runs([a, b], crops=('center',),
                                   mesh_shape=(1, 2), keep_predictions=True)
  assert [m['step'] for m in results['members']] == [2, 1]
  (lp_a, labels), (lp_b, labels_b) = [p['center']
                                      for p in results['predictions']]
  np.testing.assert_array_equal(labels, labels_b)
  assert np.abs(lp_a - lp_b).max() > 1e-3
  p_a, p_b = (np.exp(lp.astype(np.float64)) for lp in (lp_a, lp_b))
  average = (p_a + p_b) / 2
  ours = results['ensemble']['center']
  hand = _hand_metrics(average, labels)
  assert ours['count'] == len(labels) == 24
  assert ours['top1_error'] == hand['top1_error']
  assert ours['top5_error'] == hand['top5_error']
  assert ours['loss'] == pytest.approx(hand['loss'], rel=1e-12)
  members = [_hand_metrics(p, labels) for p in (p_a, p_b)]
  for got, want in zip(results['members'], members):
    for k in ('top1_error', 'top5_error'):
      assert got['center'][k] == want[k]
    assert got['center']['loss'] == pytest.approx(want['loss'], rel=1e-12)
  # The average is not a member, nor the members' geometric mean: each
  # loss differs from the ensemble's by far more than the tolerance above.
  geometric = np.exp((lp_a.astype(np.float64) + lp_b) / 2)
  for other in members + [_hand_metrics(geometric, labels)]:
    assert abs(other['loss'] - hand['loss']) > 1e-6 * hand['loss']


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
                                          config.checkpoint, read_only=True)
  try:
    # The validation error saved with each checkpoint ranks them, and
    # outranks errors read elsewhere (metrics.jsonl).
    stored = {s: manager.metrics(s)[checkpoint_lib.VAL_ERROR]
              for s in manager.all_steps()}
    assert sorted(stored) == [1, 2]
    best = min(stored, key=lambda s: (stored[s], -s))
    assert run_dir.checkpoint_steps(manager, 'best')[0] == best
    assert run_dir.checkpoint_steps(
        manager, 'best', {s: -e for s, e in stored.items()})[0] == best
    assert run_dir.checkpoint_steps(manager, 'latest')[0] == 2
  finally:
    manager.close()

  class Scored:  # Distinct saved errors: the lowest wins, ties the later.
    directory = a
    saved = {1: 0.3, 2: 0.1, 3: 0.2, 4: 0.1}
    all_steps = lambda self: list(self.saved)
    metrics = lambda self, step: {checkpoint_lib.VAL_ERROR: self.saved[step]}

  assert run_dir.checkpoint_steps(Scored(), 'best')[0] == 4
  # Saved errors outrank errors read elsewhere.
  assert run_dir.checkpoint_steps(Scored(), 'best',
                                  {1: 0.0, 2: 0.9, 3: 0.9, 4: 0.9})[0] == 4

  class Unscored:  # Checkpoints saved without metrics (older runs).
    directory = a
    all_steps = lambda self: [1, 2]
    metrics = lambda self, step: None

  best = lambda errors: run_dir.checkpoint_steps(Unscored(), 'best', errors)
  assert best({1: 0.5, 2: 0.6}) == [1, 2]
  assert best({1: 0.5, 2: 0.4}) == [2, 1]
  with pytest.raises(ValueError, match='none is "best"'):
    best({3: 0.1})


def test_top_k_rules_on_hand_made_scores():
  """The one ranking rule, in jnp (train/eval steps) and numpy (ensembles),
  with more classes than k: a label counts as top-k when fewer than k OTHER
  classes score at least as high (ties count against the label)."""
  scores = np.array([
      [0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 0: alone on top
      [0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05],  # label 6: 6 above, 1 tie
      [0.2, 0.2, 0.2, 0.2, 0.1, 0.1, 0.0, 0.0],  # label 4: 4 above, 1 tie
      [0.2, 0.2, 0.2, 0.2, 0.2, 0.0, 0.0, 0.0],  # label 4: 4 ties
      [0.5, 0.2, 0.1, 0.1, 0.05, 0.04, 0.01, 0.0],  # label 5: 5 above
      [0.1, 0.1, 0.3, 0.1, 0.1, 0.1, 0.1, 0.1],  # label 2: alone on top
      [0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05],  # label 3: 2 above, 3 ties
  ], np.float32)
  labels = np.array([0, 6, 4, 4, 5, 2, 3], np.int32)
  top1 = train_step_lib.top_k_correct(jnp.asarray(scores), labels, 1)
  top5 = train_step_lib.top_k_correct(jnp.asarray(scores), labels, 5)
  np.testing.assert_array_equal(top1, [1, 0, 0, 0, 0, 1, 0])
  np.testing.assert_array_equal(top5, [1, 0, 0, 1, 0, 1, 0])
  m = evaluate.metrics(scores, labels)
  assert m['top1_error'] == pytest.approx(5 / 7)
  assert m['top5_error'] == pytest.approx(4 / 7)
  assert m['count'] == 7
  assert m['loss'] == pytest.approx(
      -np.log(scores[np.arange(7), labels]).mean())
  hand = _hand_metrics(scores.astype(np.float64), labels)
  assert (hand['top1_error'], hand['top5_error']) == (m['top1_error'],
                                                      m['top5_error'])


# (name, scores of 10 classes, label, top-1 correct, top-5 correct).
TIES = [
    ('label alone on top', [5, 1, 1, 1, 1, 1, 1, 1, 1, 1], 0, 1, 1),
    ('tied with 1 other', [5, 5, 1, 1, 1, 1, 1, 1, 1, 1], 0, 0, 1),
    ('tied with 1 other, label second', [5, 5, 1, 1, 1, 1, 1, 1, 1, 1], 1,
     0, 1),
    ('tied with 4 others', [5, 5, 5, 5, 5, 1, 1, 1, 1, 1], 2, 0, 1),
    ('tied with 5 others', [5, 5, 5, 5, 5, 5, 1, 1, 1, 1], 2, 0, 0),
    ('3 above, tied with 1', [9, 8, 7, 5, 5, 1, 1, 1, 1, 1], 4, 0, 1),
    ('3 above, tied with 2', [9, 8, 7, 5, 5, 5, 1, 1, 1, 1], 4, 0, 0),
    ('all equal', [3] * 10, 7, 0, 0),
    ('NaN in another class', [5, np.nan, 1, 1, 1, 1, 1, 1, 1, 1], 0, 0, 1),
    ('NaN in 5 others', [5] + [np.nan] * 5 + [1] * 4, 0, 0, 0),
    ('NaN label', [5, np.nan, 1, 1, 1, 1, 1, 1, 1, 1], 1, 0, 0),
    ('NaN label, others below', [np.nan] + [-np.inf] * 9, 0, 0, 0),
    ('-inf elsewhere', [0] + [-np.inf] * 9, 0, 1, 1),
]


@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_top_k_ties_and_nan_count_against_the_label(dtype):
  """Hand-made ties and NaNs, the jnp rule (top_k_correct) and the numpy
  one (evaluate.metrics) against the hand answers: a label tied with
  another class is not top-1, tied with 5 others (or 5 NaNs) not top-5; a
  NaN label never counts. Catches the old strict rule (ties to the label:
  a constant network at 0% error), ties counted twice, NaN ignored, and
  the two paths disagreeing."""
  scores = np.array([t[1] for t in TIES], dtype)
  labels = np.array([t[2] for t in TIES], np.int32)
  want1 = np.array([t[3] for t in TIES], np.float32)
  want5 = np.array([t[4] for t in TIES], np.float32)
  names = [t[0] for t in TIES]
  with jax.enable_x64(dtype == np.float64):
    got1, got5 = (np.asarray(train_step_lib.top_k_correct(
        jnp.asarray(scores), jnp.asarray(labels), k)) for k in (1, 5))
  assert dict(zip(names, got1)) == dict(zip(names, want1))
  assert dict(zip(names, got5)) == dict(zip(names, want5))
  with np.errstate(invalid='ignore'):
    m = evaluate.metrics(scores, labels)
  assert m['top1_error'] == pytest.approx(1 - want1.mean())
  assert m['top5_error'] == pytest.approx(1 - want5.mean())
  # Row by row, the numpy rule agrees with the jnp one.
  for i, name in enumerate(names):
    with np.errstate(invalid='ignore', divide='ignore'):
      one = evaluate.metrics(scores[i:i + 1], labels[i:i + 1])
    assert (1 - one['top1_error'], 1 - one['top5_error']) == (
        got1[i], got5[i]), name


def test_constant_network_scores_100_percent_error():
  """All logits equal (a dead or untrained network): every image wrong at
  top-1 and top-5, in both paths and through eval_step's log-softmax."""
  labels = jnp.array([0, 1, 999, 500])
  logits = jnp.zeros((4, 1000))
  np.testing.assert_array_equal(
      train_step_lib.top_k_correct(logits, labels, 1), np.zeros(4))
  np.testing.assert_array_equal(
      train_step_lib.top_k_correct(logits, labels, 5), np.zeros(4))
  log_probs = jax.nn.log_softmax(logits)
  np.testing.assert_array_equal(
      train_step_lib.top_k_correct(log_probs, labels, 5), np.zeros(4))
  m = evaluate.metrics(np.full((4, 1000), 1e-3), np.asarray(labels))
  assert m['top1_error'] == m['top5_error'] == 1.0
  assert m['loss'] == pytest.approx(np.log(1000))


# orbax's reads of a damaged file leave coroutines whose exceptions nobody
# retrieves; Python reports them when they are collected.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_reading_a_damaged_run_falls_back_and_changes_nothing(runs, tmp_path):
  """evaluate/fine-tuning read another run, which may still be training:
  an unreadable latest or best checkpoint falls back to the next readable
  one, but nothing in the run is moved or written. A metrics.jsonl line cut
  off (a kill or a full disk mid-write) is skipped, not fatal."""
  a, _ = runs
  c = str(tmp_path / 'c')
  shutil.copytree(a, c)
  ckpt = os.path.join(c, 'checkpoints')
  th.truncate_array_data(os.path.join(ckpt, '2'))
  with open(os.path.join(ckpt, '2', 'metrics', 'metrics'), 'w') as f:
    f.write('{"val_top1_err')  # Garbled: 'best' ranks step 2 by the log.
  with open(os.path.join(c, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 3, "split": "val", "top1_er')
  before = sorted(os.listdir(ckpt))
  config = run_dir.load_config(c)
  mesh = mesh_lib.make_mesh(1, 1, 1)
  for which in ('latest', 'best'):
    _, params, step = run_dir.restore_params(config, c, mesh, which)
    assert step == 1, which
  _, expected, _ = run_dir.restore_params(config, a, mesh, '1')
  th.assert_trees_equal(params, expected)
  assert sorted(os.listdir(ckpt)) == before
  assert set(run_dir.val_errors(c)) == {1, 2}
