"""Figures 3 and 4, the tower-specialisation measure and training curves."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from alexnet_jax import figures
from alexnet_jax import mesh as mesh_lib
from alexnet_jax import run_dir
from alexnet_jax import run_outputs
from alexnet_jax.model import AlexNet

RNG = np.random.default_rng(0)


def _params_with_conv1(kernel):
  return {'conv1': {'kernel': kernel, 'bias': np.zeros((kernel.shape[0], kernel.shape[-1]))}}


def _grey_kernels(n):
  """(11, 11, 3, n) kernels with equal R, G, B weights at each pixel."""
  return np.repeat(RNG.normal(size=(11, 11, 1, n)), 3, axis=2)


def _colour_kernels(n):
  """(11, 11, 3, n) kernels with R = -G, B = 0: no luminance at all."""
  r = RNG.normal(size=(11, 11, 1, n))
  return np.concatenate([r, -r, np.zeros_like(r)], axis=2)


# ------------------------------------------------------------- Figure 3
def test_kernel_grid_has_96_tiles_in_two_tower_blocks():
  kernels = np.zeros((2, 11, 11, 3, 48))
  kernels[1, :, :, 0, 5] = 1.0  # a red kernel, tower 2's sixth
  grid, tiles = figures.conv1_kernel_grid(
      _params_with_conv1(kernels), zoom=2, gap=1, tower_gap=6,
      return_layout=True)
  assert len(tiles) == 96
  assert grid.dtype == np.uint8 and grid.shape[2] == 3
  blocks = [[t for t in tiles if t.tower == i] for i in (0, 1)]
  assert [len(b) for b in blocks] == [48, 48]
  # Every tower-2 tile lies below every tower-1 tile, past the wider gap.
  bottom_1 = max(t.top + t.size for t in blocks[0])
  assert min(t.top for t in blocks[1]) >= bottom_1 + 6
  assert len({t.top for t in blocks[0]}) == 3  # 3 rows of 16 per tower
  # No overlap: 96 distinct positions, each at least one tile apart.
  assert len({(t.top, t.left) for t in tiles}) == 96
  for t in tiles:
    tile = grid[t.top:t.top + t.size, t.left:t.left + t.size].astype(int)
    if (t.tower, t.kernel) == (1, 5):
      np.testing.assert_array_equal(tile[..., 0], 255)  # red
      np.testing.assert_array_equal(tile[..., 1:], 128)
    else:
      np.testing.assert_array_equal(tile, 128)  # zero kernels: mid-grey
  # The 1-pixel gaps stay background.
  t = blocks[0][0]
  assert (grid[t.top, t.left + t.size] == 255).all()


def test_kernel_grid_any_towers_and_width():
  kernels = RNG.normal(size=(1, 11, 11, 3, 20))
  grid, tiles = figures.conv1_kernel_grid(_params_with_conv1(kernels),
                                          columns=8, zoom=1,
                                          return_layout=True, per='layer')
  assert len(tiles) == 20 and {t.tower for t in tiles} == {0}
  assert grid.shape[1] == 1 + 8 * 12  # 8 columns of 11 + 1-pixel gaps


# --------------------------------------------------- tower specialisation
def test_colour_specificity_grey_and_colour():
  np.testing.assert_allclose(figures.colour_specificity(_grey_kernels(4)), 0,
                             atol=1e-12)
  np.testing.assert_allclose(figures.colour_specificity(_colour_kernels(4)),
                             1, atol=1e-12)
  red = np.zeros((11, 11, 3, 1))
  red[..., 0, 0] = 1.0
  np.testing.assert_allclose(figures.colour_specificity(red), 2 / 3)
  s = figures.colour_specificity(RNG.normal(size=(11, 11, 3, 64)))
  assert ((s >= 0) & (s <= 1)).all()
  assert figures.colour_specificity(np.zeros((11, 11, 3, 2))).tolist() == [0, 0]


def test_tower_specialisation_separates_grey_and_colour_towers():
  kernels = np.stack([_grey_kernels(48) + 0.05 * RNG.normal(size=(11, 11, 3, 48)),
                      _colour_kernels(48)])
  stats = figures.tower_specialisation(_params_with_conv1(kernels))
  assert list(stats) == ['tower1', 'tower2']
  assert stats['tower1']['mean'] < 0.1 and stats['tower1']['fraction_colour'] == 0
  assert stats['tower2']['mean'] > 0.9 and stats['tower2']['fraction_colour'] == 1
  assert stats['tower2']['values'].shape == (48,)
  json.dumps(figures.specialisation_summary(stats))
  plot = figures.specialisation_plot(stats)
  assert plot.ndim == 3 and plot.shape[2] == 3 and plot.std() > 10


# ----------------------------------------------------------- Figure 4
def test_top5_figure():
  n, classes = 4, 10
  images = RNG.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
  probs = jax.nn.softmax(RNG.normal(size=(n, classes)) * 3)
  image = figures.top5_figure(images, probs, labels=[0, 1, 2, 3],
                              class_names=[f'class {i}' for i in range(classes)])
  assert image.shape == (360, 220 * n, 3) and image.dtype == np.uint8
  assert image.std() > 10
  red = (image[..., 0] > 180) & (image[..., 1] < 80) & (image[..., 2] < 80)
  assert red.any()  # the correct class's bar, where it is in the top 5


@pytest.fixture(scope='module')
def tiny_net():
  model = AlexNet(num_classes=10, width_multiplier=0.125, fc_features=64)
  images = jnp.asarray(RNG.normal(size=(8, 67, 67, 3)) * 50, jnp.float32)
  # Random weights of the right shapes: eval_shape skips init's compile.
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images[:1])
  params = jax.tree.map(
      lambda s: jnp.asarray(RNG.normal(size=s.shape) * 0.05, jnp.float32),
      shapes['params'])
  return model, params, images


def test_fc7_features_are_what_fc8_reads(tiny_net):
  model, params, images = tiny_net
  feats = figures.fc7_function(model)(params, images)
  assert feats.shape == (8, 2 * 8)  # two towers of 64 * 0.125
  w8 = jnp.concatenate(list(params['fc8']['kernel']), axis=0)  # tower order
  logits = jax.jit(model.apply)({'params': params}, images)
  np.testing.assert_allclose(feats @ w8 + params['fc8']['bias'], logits,
                             rtol=1e-4, atol=1e-4)
  mesh = mesh_lib.make_mesh(2)  # (data=4, tower=2) on 8 CPU devices
  np.testing.assert_allclose(figures.fc7_function(model, mesh)(params, images),
                             feats, rtol=1e-5, atol=1e-5)


def test_streaming_nearest_images_equal_brute_force():
  """run_outputs.merge_nearest over uneven, padded batches keeps, for each query,
  the images of the k nearest training examples, nearest first; each
  "image" here holds its example's index, so the kept ones can be read."""
  rng = np.random.default_rng(3)
  train = rng.normal(size=(50, 32)).astype(np.float32)
  queries = rng.normal(size=(5, 32)).astype(np.float32)
  queries[2] = train[17]  # A training image is its own nearest neighbour.
  k, start = 4, 0
  best_d2 = jnp.full((5, k), jnp.inf)
  best = jnp.zeros((5, k, 1, 1, 1))
  for size in (7, 16, 1, 20, 6):
    rows = 20  # Padded to one batch size; padding masked out.
    feats = np.zeros((rows, 32), np.float32)
    feats[:size] = train[start:start + size]
    index = np.zeros((rows, 1, 1, 1), np.float32)
    index[:size, 0, 0, 0] = np.arange(start, start + size)
    mask = (np.arange(rows) < size).astype(np.float32)
    best_d2, best = run_outputs.merge_nearest(best_d2, best, queries, feats, index,
                                       mask)
    start += size
  d = np.linalg.norm(queries[:, None] - train[None], axis=-1)
  expected = np.argsort(d, axis=1)[:, :k]
  np.testing.assert_array_equal(np.asarray(best)[:, :, 0, 0, 0], expected)
  np.testing.assert_allclose(np.sqrt(best_d2), np.take_along_axis(d, expected,
                                                                  1),
                             rtol=1e-4, atol=1e-3)
  assert expected[2, 0] == 17


def test_neighbours_figure():
  queries = RNG.normal(size=(3, 16, 16, 3))
  neighbours = RNG.integers(0, 256, size=(3, 4, 16, 16, 3), dtype=np.uint8)
  image = figures.neighbours_figure(queries, neighbours, gap=2, query_gap=8)
  assert image.shape == (3 * 18 + 2, 2 + 16 + 8 + 4 * 18, 3)
  np.testing.assert_array_equal(image[2:18, 26:42], neighbours[0, 0])
  np.testing.assert_array_equal(image[20:36, 2:18],
                                figures.to_display(queries)[1])


# ------------------------------------------------------ training curves
def _history():
  steps = list(range(0, 100, 10))
  return {'train/loss': [(s, 7 - s / 20) for s in steps],
          'train/top1_error': [(s, 1 - s / 200) for s in steps],
          'train/top5_error': [(s, 0.9 - s / 200) for s in steps],
          'train/learning_rate': [(s, 0.01 if s < 50 else 0.001) for s in steps],
          'val/loss': [(50, 5.0), (90, 4.0)],
          'val/top1_error': [(50, 0.8), (90, 0.7)],
          'val/top5_error': [(50, 0.6), (90, 0.5)]}


def test_training_curves():
  image = figures.training_curves(_history(), title='demo')
  assert image.shape == (340, 1200, 3) and image.std() > 10


def test_curves_from_workdir_reads_clu_tensorboard_events(tmp_path):
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  writer = metric_writers.SummaryWriter(str(tmp_path))
  for step, points in [(10, {'train/loss': 2.0, 'val/top1_error': 0.5}),
                       (20, {'train/loss': 1.5})]:
    writer.write_scalars(step, points)
  figures.write_to_tensorboard(writer, 20, {
      'conv1': np.zeros((8, 8, 3), np.uint8)})
  writer.flush()
  history = run_dir.read_curves(str(tmp_path))
  assert history == {'train/loss': [(10, 2.0), (20, 1.5)],
                     'val/top1_error': [(10, 0.5)]}


def test_curves_from_metrics_jsonl(tmp_path):
  rows = [{'step': 5, 'split': 'train', 'loss': 3.0, 'learning_rate': 0.01},
          {'step': 5, 'split': 'val', 'top1_error': 0.9}]
  (tmp_path / 'metrics.jsonl').write_text(
      ''.join(json.dumps(r) + '\n' for r in rows))
  assert run_dir.read_curves(str(tmp_path)) == {
      'train/loss': [(5, 3.0)], 'train/learning_rate': [(5, 0.01)],
      'val/top1_error': [(5, 0.9)]}


def test_png_round_trip(tmp_path):
  image = RNG.integers(0, 256, size=(13, 17, 3), dtype=np.uint8)
  path = tmp_path / 'sub' / 'kernels.png'
  figures.save_png(str(path), image)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
