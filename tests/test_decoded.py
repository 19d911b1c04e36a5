"""The decoded copy (alexnet_jax/decoded_copy.py) and the augmentation on
the device (alexnet_jax/device_augment.py): the crops equal numpy's on the
same stored pixels on any mesh, batches resume exactly, bad shards stop the
run with what to do."""

import os
import shutil

import jax
import numpy as np
import pytest

from alexnet_jax import decoded_copy
from alexnet_jax import device_augment
from alexnet_jax import input_pipeline as ip
from alexnet_jax import prepare
from tests.data_fixtures import demo_config, demo_dir, make_mesh, SPEC  # pylint: disable=unused-import


@pytest.fixture(scope='module')
def decoded(demo_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('decoded'))
  meta = prepare.prepare(demo_config(demo_dir), out, shard_size=10,
                         decoded=True)
  return out, meta


def decoded_config(demo_dir, out, batch_size=16):
  c = demo_config(demo_dir, batch_size)
  c.data.prepared_dir = out
  return c


def test_copy_holds_the_resized_squares_in_order(demo_dir, decoded):
  """Every decodable record, in the dataset's order, as the rounded
  resize_size square the eval path computes; shards of 10 records."""
  out, meta = decoded
  assert meta['format'] == 'decoded' and meta['skipped'] == {'train': 1,
                                                              'eval': 0}
  c = demo_config(demo_dir)
  want = list(prepare.resized_images(
      c, ip.get_source(c, 'eval', 0, 1)).as_numpy_iterator())
  reader = decoded_copy.Reader(out, 'eval', 0, 1, c.data.resize_size)
  images, labels = reader.read(np.arange(reader.num_examples))
  assert len(want) == reader.num_examples == (
      SPEC.num_classes * SPEC.val_per_class)
  np.testing.assert_array_equal(images, np.stack([w for w, _ in want]))
  np.testing.assert_array_equal(labels, [l for _, l in want])
  assert all(n <= 10 for _, n in meta['splits']['eval'])
  # Process shares are disjoint and cover the split.
  shares = [decoded_copy.Reader(out, 'train', i, 3, c.data.resize_size)
            for i in range(3)]
  firsts = [s.read(np.arange(s.num_examples))[0] for s in shares]
  whole = decoded_copy.Reader(out, 'train', 0, 1, c.data.resize_size)
  np.testing.assert_array_equal(np.concatenate(firsts),
                                whole.read(np.arange(whole.num_examples))[0])


def numpy_augment(images, offsets, flips, alphas, mean, eigvecs, stddevs,
                  crop):
  """The paper's train augmentation written out in numpy, float64."""
  out = []
  for img, (oy, ox), flip, alpha in zip(images, offsets, flips, alphas):
    x = img[oy:oy + crop, ox:ox + crop].astype(np.float64)
    m = mean[oy:oy + crop, ox:ox + crop] if mean.ndim == 3 else mean
    x = x - m + np.asarray(eigvecs) @ (alpha * np.asarray(stddevs))
    out.append(x[:, ::-1] if flip else x)
  return np.stack(out)


@pytest.mark.parametrize('mesh_shape', [(1, 1), (2, 2), (8, 1), (4, 2)],
                         ids=str)
@pytest.mark.parametrize('per_pixel', [False, True])
def test_device_crops_equal_numpy_on_any_mesh(demo_dir, decoded, mesh_shape,
                                              per_pixel):
  out, _ = decoded
  c = decoded_config(demo_dir, out)
  r, k = c.data.resize_size, c.data.crop_size
  reader = decoded_copy.Reader(out, 'train', 0, 1, r)
  images, _ = reader.read(np.arange(16))
  rng = np.random.default_rng(0)
  mean = (rng.uniform(0, 200, (r, r, 3)) if per_pixel else
          np.asarray(c.data.channel_means)).astype(np.float32)
  mesh = make_mesh(*mesh_shape)
  augment = device_augment.make_train_augment(c, mesh, mean)
  step = 7
  got = np.asarray(augment(jax.device_put(images, ip.NamedSharding(
      mesh, ip.P('data'))), step))
  offsets, flips, alphas = jax.device_get(device_augment.draws(
      c.seed, step, 16, r - k, c.data.pca_alpha_stddev))
  assert flips.any() and not flips.all()  # Both kinds in the batch.
  assert len({tuple(o) for o in offsets}) > 8  # Varied windows.
  want = numpy_augment(images, offsets, flips, alphas, mean,
                       c.data.pca_eigvecs, c.data.pca_stddevs, k)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)
  # Another step draws other windows.
  other = np.asarray(augment(jax.device_put(images, ip.NamedSharding(
      mesh, ip.P('data'))), step + 1))
  assert not np.allclose(other, got)


def test_eval_views_equal_numpy_crops(demo_dir, decoded):
  out, _ = decoded
  c = decoded_config(demo_dir, out, batch_size=8)
  r, k = c.data.resize_size, c.data.crop_size
  images, _ = decoded_copy.Reader(out, 'eval', 0, 1, r).read(np.arange(8))
  mean = np.asarray(c.data.channel_means, np.float32)
  mesh = make_mesh(2, 2)
  x = images.astype(np.float64) - mean
  o, lim = (r - k) // 2, r - k
  centre = np.asarray(device_augment.make_eval_views(c, mesh, mean)(images))
  np.testing.assert_allclose(centre, x[:, o:o + k, o:o + k], atol=1e-4)
  ten = np.asarray(device_augment.make_eval_views(c, mesh, mean, True)(images))
  corners = [(0, 0), (0, lim), (lim, 0), (lim, lim), (o, o)]
  for v, (y, z) in enumerate(corners):
    np.testing.assert_allclose(ten[:, v], x[:, y:y + k, z:z + k], atol=1e-4)
    np.testing.assert_allclose(ten[:, v + 5],
                               x[:, y:y + k, z:z + k][:, :, ::-1], atol=1e-4)


def test_training_batches_resume_at_any_step(demo_dir, decoded):
  """Batch N of a run started at step 0 is batch 0 of a run restarted at
  step N, across an epoch boundary; labels cover the epoch once."""
  out, _ = decoded
  c = decoded_config(demo_dir, out)
  mesh = make_mesh(2, 2)
  steps = ip.steps_per_epoch(c)
  it = ip.train_iterator(c, mesh)
  run = [jax.device_get(next(it)) for _ in range(steps + 3)]
  it.close()
  for start in (2, steps + 1):
    again = ip.train_iterator(c, mesh, start_step=start)
    b = jax.device_get(next(again))
    again.close()
    np.testing.assert_array_equal(b['images'], run[start]['images'])
    np.testing.assert_array_equal(b['labels'], run[start]['labels'])
  labels = np.concatenate([b['labels'] for b in run[:steps]])
  whole = decoded_copy.Reader(out, 'train', 0, 1, c.data.resize_size)
  all_labels = whole.read(np.arange(whole.num_examples))[1]
  assert len(labels) == steps * c.batch_size <= len(all_labels)
  # An epoch takes each record at most once.
  assert np.all(np.bincount(labels, minlength=SPEC.num_classes) <=
                np.bincount(all_labels, minlength=SPEC.num_classes))
  assert not np.array_equal(run[0]['labels'], run[steps]['labels'])


def test_eval_iterator_reads_every_image_once(demo_dir, decoded):
  out, _ = decoded
  c = decoded_config(demo_dir, out, batch_size=16)
  batches = list(ip.eval_iterator(c, make_mesh(2, 1)))
  masks = np.concatenate([np.asarray(b['mask']) for b in batches])
  assert masks.sum() == SPEC.num_classes * SPEC.val_per_class
  assert batches[0]['images'].shape == (16, c.data.crop_size,
                                        c.data.crop_size, 3)


def test_bad_shards_say_what_to_do(demo_dir, decoded, tmp_path):
  out, _ = decoded
  bad = str(tmp_path / 'bad')
  os.makedirs(bad)
  for name in os.listdir(out):
    with open(os.path.join(out, name), 'rb') as f:
      data = f.read()
    with open(os.path.join(bad, name), 'wb') as f:
      f.write(data)
  c = decoded_config(demo_dir, bad)
  shard = os.path.join(bad, 'train-00001.bin')
  full = os.path.getsize(shard)
  with open(shard, 'r+b') as f:  # Short: half a record missing.
    f.truncate(full - 100)
  with pytest.raises(ValueError, match=r'train-00001.bin holds .* truncated '
                     r'or corrupt\. Write the copy again'):
    ip.get_source(c, 'train', 0, 1)
  os.remove(shard)
  with pytest.raises(ValueError, match='holds nothing'):
    ip.get_source(c, 'train', 0, 1)
  with open(shard, 'wb') as f:  # The right size, garbage labels.
    f.write(b'\xff' * full)
  reader = ip.get_source(c, 'train', 0, 1).decoded
  with pytest.raises(ValueError, match='holds label -1 .* corrupt'):
    reader.read(np.arange(reader.num_examples))
  c.data.prepared_dir = 'gs://bucket/decoded'
  with pytest.raises(ValueError, match='must be on a local disk'):
    decoded_copy.Reader(c.data.prepared_dir, 'train', 0, 1, 64)


def test_a_copy_moved_to_another_disk_keeps_its_mean_image(demo_dir, decoded,
                                                            tmp_path):
  """The statistics cached inside a copy are keyed by what prepared.json
  says of it, not by its path: copied to each host's disk, the copy's mean
  image is read, not recomputed (a multi-process run would stop on it);
  a copy written again gets a new key."""
  out, _ = decoded
  here = str(tmp_path / 'here')
  shutil.copytree(out, here)
  c = decoded_config(demo_dir, here)
  c.data.mean = 'image'
  ip.forget_training_set_stats()
  stats = ip.training_set_stats(c, compute_if_missing=True)
  moved = str(tmp_path / 'moved')
  shutil.copytree(here, moved)
  c.data.prepared_dir = moved
  ip.forget_training_set_stats()
  again = ip.training_set_stats(c, compute_if_missing=False)
  np.testing.assert_array_equal(again['mean_image'], stats['mean_image'])
  prepare.prepare(demo_config(demo_dir), moved, shard_size=10, decoded=True)
  ip.forget_training_set_stats()
  with pytest.raises(FileNotFoundError, match='computed for other data'):
    ip.training_set_stats(c, compute_if_missing=False)

