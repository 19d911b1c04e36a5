"""The one-time data work (alexnet_jax/prepare.py): the command, the
pre-resized copy and reading it."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from alexnet_jax import input_pipeline as ip
from alexnet_jax import prepare
from alexnet_jax import preprocess as pp
from tests import train_helpers as th
from tests.data_fixtures import demo_config, demo_dir, make_mesh, SPEC  # pylint: disable=unused-import


@pytest.fixture(scope='module')
def prepared(demo_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('prepared'))
  meta = prepare.prepare(demo_config(demo_dir), out, shard_size=20)
  return out, meta


def _decodes(x):
  try:
    pp.decode_and_resize(x, 8)
    return True
  except tf.errors.InvalidArgumentError:
    return False


def test_copy_has_same_examples_resized(demo_dir, prepared):
  """Same order, labels and classes; the corrupt record left out; images
  the resize_size central squares (up to the JPEG re-encoding)."""
  out, meta = prepared
  c = demo_config(demo_dir)
  assert meta['skipped'] == {'train': 1, 'eval': 0}  # The corrupt file.
  c2 = demo_config(demo_dir)
  c2.data.prepared_dir = out
  for split in ('train', 'eval'):
    orig = [(x, l) for x, l in ip.get_source(c, split, 0, 1).records(
        None, 0).as_numpy_iterator() if _decodes(x)]
    src = ip.get_source(c2, split, 0, 1)
    copy = list(src.records(None, 0).as_numpy_iterator())
    assert src.num_classes == SPEC.num_classes
    assert [l for _, l in copy] == [l for _, l in orig]
    for (x, _), (y, _) in list(zip(copy, orig))[:5]:
      img = tf.io.decode_jpeg(x).numpy()
      assert img.shape == (64, 64, 3)
      ref = pp.decode_and_resize(y, 64).numpy()
      assert np.abs(img - ref).mean() < 4.0  # JPEG quality 95.


def test_pipeline_on_copy_resumes_and_covers(demo_dir, prepared):
  out, _ = prepared
  c = demo_config(demo_dir, batch_size=8)
  c.data.prepared_dir = out
  mesh = make_mesh(2)
  it = ip.train_iterator(c, mesh)
  full = [{k: np.asarray(v) for k, v in next(it).items()} for _ in range(5)]
  assert full[0]['images'].shape == (8, 56, 56, 3)
  resumed = ip.train_iterator(c, mesh, start_step=3)
  for a in full[3:]:
    b = next(resumed)
    np.testing.assert_array_equal(a['images'], np.asarray(b['images']))
  batches = list(ip.eval_iterator(c, mesh))
  assert sum(float(b['mask'].sum()) for b in batches) == (
      SPEC.num_classes * SPEC.val_per_class)
  # Multi-process shares are disjoint and cover the split.
  seen = []
  for i in range(3):
    src = ip.get_source(c, 'eval', i, 3)
    seen += [bytes(x) for x, _ in src.records(None, 0).as_numpy_iterator()]
  assert len(seen) == len(set(seen)) == SPEC.num_classes * SPEC.val_per_class


def test_wrong_size_or_missing(demo_dir, prepared, tmp_path):
  out, _ = prepared
  c = demo_config(demo_dir)
  c.data.prepared_dir = out
  c.data.resize_size = 72
  with pytest.raises(ValueError, match='prepare it again'):
    ip.get_source(c, 'train', 0, 1)
  c.data.prepared_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match='alexnet_jax.prepare'):
    ip.get_source(c, 'train', 0, 1)


def test_prepare_command_does_the_one_time_work(tmp_path):
  """python -m alexnet_jax.prepare: builds the dataset, writes the copy,
  caches the mean image next to it, prints the training command."""
  data, copy = str(tmp_path / 'tfds'), str(tmp_path / 'copy')
  flags = [f'--config.data.data_dir={data}', '--config.data.mean=image',
           '--config.data.demo_num_classes=3', '--config.model.num_classes=3',
           '--config.data.demo_train_per_class=4',
           '--config.data.demo_val_per_class=2']
  proc = subprocess.run(
      [sys.executable, '-m', 'alexnet_jax.prepare',
       '--config=configs/alexnet.py:demo', f'--copy_dir={copy}'] + flags,
      cwd=th.REPO, env=th.subprocess_env(1), capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert ('python launch.py --config=configs/alexnet.py:demo ' +
          ' '.join(flags) + f' --config.data.prepared_dir={copy} '
          '--workdir=<WORKDIR>') in proc.stdout
  c = demo_config(data)
  c.data.update(demo_num_classes=3, demo_train_per_class=4,
                demo_val_per_class=2, resize_size=72, mean='image')
  built = ip.get_source(c, 'train', 0, 1).total_examples  # Built: no error.
  c.data.prepared_dir = copy
  with open(os.path.join(copy, ip.PREPARED_META)) as f:
    skipped = json.load(f)['skipped']['train']
  assert ip.get_source(c, 'train', 0, 1).total_examples == built - skipped
  assert os.path.exists(os.path.join(copy, 'stats', 'mean_image_72.npy'))
  stats = ip.training_set_stats(c, compute_if_missing=False)  # Cached.
  assert stats['mean_image'].shape == (72, 72, 3)


def test_several_processes_never_build_a_dataset(monkeypatch, tmp_path):
  """A dataset (or mean image) missing in a multi-process run stops every
  process at start, naming the command; nothing is generated."""
  monkeypatch.setattr(ip.jax, 'process_count', lambda: 2)
  c = demo_config(str(tmp_path))
  with pytest.raises(FileNotFoundError, match='python -m alexnet_jax.prepare'):
    ip.get_source(c, 'train', 0, 2)
  assert not any(tmp_path.iterdir())


def test_training_command_keeps_the_config_flags_in_either_form():
  argv = ['prepare.py', '--config', 'configs/alexnet.py:demo',
          '--config.data.manual_dir', '/data/in', '--copy_dir=/c',
          '--config.data.prepared_dir=/old', '--config.batch_size=64']
  assert prepare.training_command(argv, '/c') == (
      'python launch.py --config=configs/alexnet.py:demo '
      '--config.data.manual_dir=/data/in --config.batch_size=64 '
      '--config.data.prepared_dir=/c --workdir=<WORKDIR>')
  assert prepare.training_command(argv) == (
      'python launch.py --config=configs/alexnet.py:demo '
      '--config.data.manual_dir=/data/in --config.data.prepared_dir=/old '
      '--config.batch_size=64 --workdir=<WORKDIR>')
