"""The ablation sweep and its report, built from real (tiny) workdirs."""

import json
import os

import numpy as np
import pytest

from alexnet_jax import figures
from alexnet_jax import mesh as mesh_lib
from alexnet_jax import report
from alexnet_jax import run_dir
from alexnet_jax import sweep
from tests import train_helpers as th

# tests/train_helpers.tiny_config as sweep overrides: 4 classes, an eighth
# of the kernels, 8-image batches, 6 steps, both towers on a (1, 2) mesh.
TINY_RUN = {
    **{f'data.{k}': v for k, v in th.TINY_DATA.items()},
    'data.prefetch': 1, 'data.num_parallel_calls': 2,
    'model.num_classes': th.TINY_DATA['demo_num_classes'],
    'model.width_multiplier': 0.125, 'model.fc_features': 256,
    'batch_size': 8, 'mesh.data_axis_size': 1, 'total_steps': 6,
    'schedule.kind': 'constant', 'eval.every_epochs': 0.0,
    'eval.every_steps': 3, 'checkpoint.every_epochs': 0.0,
    'checkpoint.every_steps': 3, 'log_every_steps': 1,
}
if 'figures' in th.tiny_config():  # Per-run figures: not what this tests.
  TINY_RUN['figures.enabled'] = False
VARIANTS = ('baseline', 'one_tower')


@pytest.fixture(scope='module')
def swept(tmp_path_factory):
  data_dir = th.prepare_data(
      str(tmp_path_factory.getbasetemp() / 'demo_data'))
  root = str(tmp_path_factory.mktemp('sweep'))
  records = sweep.run_sweep(root, VARIANTS, short_run=TINY_RUN,
                            overrides={'data.data_dir': data_dir})
  return root, records


def test_sweep_writes_one_finished_workdir_per_variant(swept):
  root, records = swept
  assert [r['variant'] for r in records] == list(VARIANTS)
  for r in records:
    assert r['workdir'] == os.path.join(root, r['variant'])
    assert r['finished'] and r['steps'] == 6 and r['train_seconds'] > 0
    with open(os.path.join(r['workdir'], 'config.json')) as f:
      config = json.load(f)
    assert config['total_steps'] == 6
  with open(os.path.join(root, 'one_tower', 'config.json')) as f:
    assert json.load(f)['model']['num_towers'] == 1


def test_sweep_skips_finished_workdirs(swept):
  root, records = swept
  before = {r['variant']: os.path.getmtime(
      os.path.join(r['workdir'], 'metrics.jsonl')) for r in records}
  again = sweep.run_sweep(root, VARIANTS, short_run=TINY_RUN,
                          overrides={'data.data_dir': 'unused'})
  assert [r['train_seconds'] for r in again] == [
      r['train_seconds'] for r in records]
  for r in again:
    assert os.path.getmtime(os.path.join(r['workdir'], 'metrics.jsonl')) == (
        before[r['variant']])


def test_report_rows_match_the_workdirs(swept, tmp_path):
  root, _ = swept
  out = str(tmp_path / 'ABLATIONS.md')
  text, aggregated = report.build_report(root, out)
  assert [a['variant'] for a in aggregated] == list(VARIANTS)
  by_name = {a['variant']: a for a in aggregated}
  for name in VARIANTS:
    workdir = os.path.join(root, name)
    metrics = th.read_metrics(workdir)
    last_val = metrics[('val', 6)]
    a = by_name[name]
    assert a['val_top1_error'] == pytest.approx(last_val['top1_error'])
    assert a['val_top5_error'] == pytest.approx(last_val['top5_error'])
    train = sorted((r['epoch'], r['top1_error'])
                   for (split, _), r in metrics.items() if split == 'train')
    assert len(train) == 6
    assert a['epochs_to_25'] == report.epochs_to_error(train)
    # Parameters and colour specificity from the final checkpoint itself.
    config = run_dir.load_config(workdir)
    _, params, step = run_dir.restore_params(
        config, workdir, mesh_lib.make_mesh(config.model.num_towers, 1, 1))
    assert step == 6
    import jax  # pylint: disable=g-import-not-at-top
    assert a['num_params'] == sum(x.size for x in jax.tree.leaves(params))
    stats = figures.tower_specialisation(params)
    assert a['colour_specificity'] == pytest.approx(
        {t: s['mean'] for t, s in stats.items()})
    row = next(l for l in text.splitlines() if l.startswith(f'| {name} '))
    assert (f'| {100 * last_val["top1_error"]:.1f} / '
            f'{100 * last_val["top5_error"]:.1f} |') in row
    assert f'| {a["num_params"]:,} |' in row
  base, one = by_name['baseline'], by_name['one_tower']
  assert len(base['colour_specificity']) == 2
  assert len(one['colour_specificity']) == 1
  assert base['exchange_bytes_per_image'] > 0
  assert one['exchange_bytes_per_image'] == 0  # Nothing to exchange.
  assert one['diff_top1'] == pytest.approx(
      one['val_top1_error'] - base['val_top1_error'])
  assert '+1.7 / +1.2' in text  # The paper's claim for one tower.
  assert 'does not show' in text
  for png in ('val_error.png', 'relu_vs_tanh.png'):
    assert os.path.getsize(tmp_path / 'ablations' / png) > 1000


def test_epochs_to_25_percent_training_error():
  # Logged every quarter epoch; one epoch's window is 4 batches.
  errors = [0.9, 0.8, 0.6, 0.5,  # epoch 1
            0.4, 0.1, 0.4, 0.3,  # epoch 2: one lucky batch is not enough
            0.3, 0.25, 0.2, 0.1,  # epoch 3
            0.1, 0.1, 0.1, 0.1]
  history = [(0.25 * (i + 1), e) for i, e in enumerate(errors)]
  # Means of the last epoch's 4 batches: 0.275 at 2.25, 0.3125 at 2.5,
  # 0.2625 at 2.75, 0.2125 at 3.0: the first <= 0.25 is at epoch 3.0.
  means = {e: np.mean([x for f, x in history if e - 1 < f <= e])
           for e, _ in history}
  assert means[2.75] > 0.25 and means[3.0] <= 0.25
  assert report.epochs_to_error(history) == 3.0
  assert report.epochs_to_error(history, window_epochs=0.25) == 1.5
  assert report.epochs_to_error(history, target=0.05) is None
  assert report.epochs_to_error(list(reversed(history))) == 3.0  # Any order.


def test_bad_variant_and_override_fail_before_training(tmp_path):
  with pytest.raises(ValueError, match='Unknown sweep variants'):
    sweep.run_sweep(str(tmp_path), ('baseline', 'no_relu'))
  with pytest.raises(KeyError, match='learning_rat'):
    sweep.run_sweep(str(tmp_path), ('baseline',),
                    overrides={'optim.learning_rat': 0.1})
  assert not os.listdir(tmp_path)
  with pytest.raises(FileNotFoundError, match='No sweep workdirs'):
    report.collect(str(tmp_path))
