"""The paper's pictures (Figures 3 and 4), the tower-specialisation measure and
training curves, as uint8 RGB arrays (H, W, 3) ready for PNG or TensorBoard.

- `conv1_kernel_grid`: Figure 3, the conv1 kernels in one block per tower.
- `colour_specificity`, `tower_specialisation`, `specialisation_plot`: how
  colour-specific each conv1 kernel is, summarised per tower (§6.1: "the
  kernels on GPU 1 are largely color-agnostic, while the kernels on GPU 2 are
  largely color-specific").
- `top5_figure`: Figure 4 left, each image with its top-5 classes.
- `fc7_function`, `neighbours_figure`: Figure 4 right, the training images
  closest to a test image in fc7 space (the streaming search over the
  training split is `run_outputs.nearest_neighbour_figure`).
- `training_curves`: loss, error and learning rate (from
  `run_dir.read_curves`).

Plots draw on matplotlib's Agg canvas directly (no pyplot, no display).
"""

import dataclasses
import functools
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from alexnet_jax import mesh as mesh_lib

# Unit vector of the grey (luminance) axis of RGB space.
GREY_AXIS = np.ones(3) / np.sqrt(3.0)
# Expected colour_specificity of a kernel of i.i.d. weights: 2 of its 3 colour
# dimensions lie off the grey axis. A learned colour-agnostic kernel scores
# far below it, a colour blob near or above it.
RANDOM_KERNEL_SPECIFICITY = 2.0 / 3.0


# ----------------------------------------------------------------- helpers
def to_display(images) -> np.ndarray:
  """uint8 images, (..., H, W, 3): uint8 is kept, floats are min-max scaled
  per image (mean-subtracted network inputs become viewable)."""
  x = np.asarray(images)
  if x.dtype == np.uint8:
    return x
  x = x.astype(np.float64)
  axes = tuple(range(x.ndim - 3, x.ndim))
  lo, hi = x.min(axis=axes, keepdims=True), x.max(axis=axes, keepdims=True)
  x = (x - lo) / np.maximum(hi - lo, 1e-12)
  return np.round(255 * x).astype(np.uint8)


def _figure_to_array(fig: Figure) -> np.ndarray:
  canvas = FigureCanvasAgg(fig)
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_png(path: str, image) -> None:
  """Writes an (H, W, 3) or (H, W) image (uint8, or floats in [0, 1])."""
  x = np.asarray(image)
  if x.dtype != np.uint8:
    x = np.round(255 * np.clip(x, 0, 1)).astype(np.uint8)
  path = epath.Path(path)  # A local path or gs://.
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as f:
    Image.fromarray(x).save(f, format='PNG')


def write_to_tensorboard(writer, step: int, images: Mapping[str, np.ndarray]):
  """Writes {name: (H, W, 3) image} through a clu MetricWriter (as N=1)."""
  writer.write_images(step, {name: np.asarray(im)[None]
                             for name, im in images.items()})


# ----------------------------------------------- Figure 3: conv1 kernels
@dataclasses.dataclass(frozen=True)
class Tile:
  """Where kernel `kernel` of tower `tower` sits in the grid, in pixels."""
  tower: int
  kernel: int
  top: int
  left: int
  size: int


def kernel_grid_layout(num_towers: int, num_kernels: int, kernel_size: int,
                       columns: int = 16, gap: int = 1,
                       tower_gap: int = 6) -> Tuple[List[Tile], Tuple[int, int]]:
  """Tiles of a grid with one row block per tower, and the (H, W) of the grid.

  Each tower's `num_kernels` kernels fill rows of `columns` tiles (48 -> 3
  rows of 16 as in Figure 3); tiles are `gap` pixels apart and the tower
  blocks `tower_gap` pixels apart, with a `gap` border around the grid.
  """
  columns = max(1, min(columns, num_kernels))
  rows = -(-num_kernels // columns)
  step = kernel_size + gap
  block_height = rows * step - gap
  tiles = []
  for t in range(num_towers):
    block_top = gap + t * (block_height + tower_gap)
    for k in range(num_kernels):
      r, c = divmod(k, columns)
      tiles.append(Tile(t, k, block_top + r * step, gap + c * step,
                        kernel_size))
  height = 2 * gap + num_towers * block_height + (num_towers - 1) * tower_gap
  width = 2 * gap + columns * step - gap
  return tiles, (height, width)


def _normalise_kernels(kernels: np.ndarray, per: str) -> np.ndarray:
  """(T, O, H, W, 3) weights -> [0, 1], zero weight at mid-grey 0.5.

  Symmetric contrast scaling, 0.5 + 0.5 w / max|w|, so a colour-agnostic
  kernel stays grey-scale and a colour one keeps its hue. per='kernel' scales
  each kernel by its own max|w| (as Figure 3 shows them); per='layer' uses one
  scale for all, so weak kernels look faint.
  """
  if per == 'kernel':
    scale = np.abs(kernels).max(axis=(2, 3, 4), keepdims=True)
  elif per == 'layer':
    scale = np.abs(kernels).max()
  else:
    raise ValueError(f"per must be 'kernel' or 'layer', got {per!r}.")
  return 0.5 + 0.5 * kernels / np.maximum(scale, 1e-12)


def conv1_kernel_grid(params, *, columns: int = 16, zoom: int = 4,
                      gap: int = 1, tower_gap: int = 6, per: str = 'kernel',
                      background: int = 255, return_layout: bool = False):
  """Figure 3: the conv1 kernels, one row block per tower, as uint8 RGB.

  params['conv1']['kernel'] is (T, H, W, 3, O), HWIO per tower; every T and
  O works. Each kernel pixel becomes zoom x zoom pixels. With
  return_layout=True also returns the list of `Tile`s (pixel positions).
  """
  w = np.asarray(jax.device_get(params['conv1']['kernel']), np.float64)
  num_towers, size, _, channels, num_kernels = w.shape
  if channels != 3:
    raise ValueError(f'conv1 kernels need 3 input channels, got {channels}.')
  kernels = _normalise_kernels(np.moveaxis(w, -1, 1), per)  # (T, O, H, W, 3)
  kernels = kernels.repeat(zoom, axis=2).repeat(zoom, axis=3)
  tiles, (height, width) = kernel_grid_layout(
      num_towers, num_kernels, size * zoom, columns, gap, tower_gap)
  grid = np.full((height, width, 3), background, np.uint8)
  for tile in tiles:
    grid[tile.top:tile.top + tile.size, tile.left:tile.left + tile.size] = (
        np.round(255 * kernels[tile.tower, tile.kernel]).astype(np.uint8))
  return (grid, tiles) if return_layout else grid


# ------------------------------------------------ tower specialisation
def colour_specificity(kernel_hwio) -> np.ndarray:
  """Share of each kernel's energy off the grey axis, (O,) floats in [0, 1].

  For a kernel w (H, W, 3, O), each pixel's RGB weight vector v splits into
  its luminance part (v . g) g, g = (1, 1, 1)/sqrt(3), and the rest:

    colour_specificity = sum_pixels |v - (v . g) g|^2 / sum_pixels |v|^2.

  A kernel with equal R, G, B weights (it sees only brightness) scores 0; one
  whose colour weights sum to zero at every pixel (R = -G, or blue vs yellow)
  scores 1; a single-channel kernel scores 2/3, as does a random one on
  average. The kernel's spatial mean is kept: a uniform colour blob is a
  colour detector. An all-zero kernel scores 0.
  """
  w = np.asarray(jax.device_get(kernel_hwio), np.float64)
  total = (w ** 2).sum(axis=(0, 1, 2))
  luminance = (np.tensordot(w, GREY_AXIS, axes=([2], [0])) ** 2).sum(
      axis=(0, 1))
  colour = np.maximum(total - luminance, 0.0)
  return np.where(total > 0, colour / np.where(total > 0, total, 1.0), 0.0)


def tower_specialisation(params, threshold: float = 0.5) -> Dict[str, Dict]:
  """Per tower ('tower1', 'tower2', ...): the colour_specificity of its
  conv1 kernels (values) and their mean, median and fraction_colour, the
  share of kernels whose specificity is above `threshold`.

  The paper's claim reads: tower1 low (grey kernels), tower2 high. Which
  tower specialises in colour is not fixed by the architecture, only that
  they differ.
  """
  kernels = np.asarray(jax.device_get(params['conv1']['kernel']))
  stats = {}
  for t, kernel in enumerate(kernels):
    values = colour_specificity(kernel)
    stats[f'tower{t + 1}'] = {
        'mean': float(values.mean()), 'median': float(np.median(values)),
        'fraction_colour': float((values > threshold).mean()),
        'values': values}
  return stats


def specialisation_summary(stats) -> Dict[str, Dict[str, float]]:
  """tower_specialisation without the per-kernel values (for JSON, logs)."""
  return {t: {k: v for k, v in s.items() if k != 'values'}
          for t, s in stats.items()}


def specialisation_plot(stats, threshold: float = 0.5) -> np.ndarray:
  """Sorted colour_specificity bars per tower, as uint8 RGB."""
  fig = Figure(figsize=(3.2 * len(stats), 2.8), dpi=100)
  for i, (tower, s) in enumerate(stats.items()):
    ax = fig.add_subplot(1, len(stats), i + 1)
    values = np.sort(s['values'])
    ax.bar(np.arange(len(values)), values, width=1.0,
           color=np.where(values > threshold, 'tab:red', 'tab:gray'))
    ax.axhline(RANDOM_KERNEL_SPECIFICITY, color='k', ls=':', lw=1,
               label='random kernel')
    ax.set_ylim(0, 1)
    ax.set_title(f'{tower}: mean {s["mean"]:.2f}, '
                 f'{100 * s["fraction_colour"]:.0f}% > {threshold:g}',
                 fontsize=9)
    ax.set_xlabel('conv1 kernels, sorted', fontsize=8)
    if i == 0:
      ax.set_ylabel('colour specificity', fontsize=8)
      ax.legend(fontsize=7, loc='upper left')
  fig.tight_layout()
  return _figure_to_array(fig)


# ------------------------------------------ Figure 4 left: top-5 guesses
def top5_figure(images, probs, labels, class_names: Sequence[str],
                k: int = 5) -> np.ndarray:
  """Each image above its top-k classes as bars; the correct class in red.

  images (N, H, W, 3) uint8 or float (scaled per image); probs (N, C)
  softmax outputs; labels (N,) the correct classes.
  """
  images, probs = to_display(images), np.asarray(probs)
  labels = np.asarray(labels)
  n = len(images)
  fig = Figure(figsize=(2.2 * n, 3.6), dpi=100)
  for i in range(n):
    top = np.argsort(-probs[i])[:k]
    ax = fig.add_subplot(2, n, i + 1)
    ax.imshow(images[i])
    ax.set_title(class_names[labels[i]], fontsize=8)
    ax.axis('off')
    ax = fig.add_subplot(2, n, n + i + 1)
    colours = ['tab:red' if c == labels[i] else 'tab:blue' for c in top]
    ax.barh(np.arange(k), probs[i, top], color=colours)
    ax.set_yticks(np.arange(k), [class_names[c] for c in top], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.tick_params(axis='x', labelsize=6)
  fig.tight_layout()
  return _figure_to_array(fig)


# ------------------------------------ Figure 4 right: nearest neighbours
@functools.lru_cache(maxsize=None)
def fc7_function(model, mesh=None):
  """jit'd `fn(params, images) -> (B, num_towers * fc7 width)`.

  The towers' fc7 activations (the model sows them as intermediates
  'fc7_features'), concatenated in tower order: 4096-d for the paper's net.
  With a mesh the model runs under shard_map like training does, images
  split over 'data' and towers over 'tower'.
  """

  def local(m, params, images):
    _, state = m.apply({'params': params}, images, mutable=['intermediates'])
    (per_tower,) = state['intermediates']['fc7_features']
    return jnp.concatenate(per_tower, axis=-1)

  if mesh is None:
    return jax.jit(functools.partial(local, model))
  local_model = model.clone(tower_axis=mesh_lib.TOWER,
                            tower_axis_size=mesh.shape[mesh_lib.TOWER])

  def sharded(params, images):
    mesh_lib.check_batch_size(images.shape[0], mesh)
    return jax.shard_map(
        functools.partial(local, local_model), mesh=mesh,
        in_specs=(mesh_lib.param_specs(params), P(mesh_lib.DATA)),
        # Device (d, t) holds its towers' features: concatenating over the
        # tower axis puts them in tower order.
        out_specs=P(mesh_lib.DATA, mesh_lib.TOWER))(params, images)

  return jax.jit(sharded)


def neighbours_figure(query_images, neighbour_images, gap: int = 2,
                      query_gap: int = 8, background: int = 255) -> np.ndarray:
  """Each query image, a wider gap, then its neighbours, one row per query.

  query_images (Q, H, W, 3); neighbour_images (Q, k, H, W, 3); uint8 or
  float (scaled per image).
  """
  queries, neighbours = to_display(query_images), to_display(neighbour_images)
  q, k, h, w, _ = neighbours.shape
  height = q * (h + gap) + gap
  width = gap + w + query_gap + k * (w + gap)
  grid = np.full((height, width, 3), background, np.uint8)
  for i in range(q):
    top = gap + i * (h + gap)
    grid[top:top + h, gap:gap + w] = queries[i]
    for j in range(k):
      left = gap + w + query_gap + j * (w + gap)
      grid[top:top + h, left:left + w] = neighbours[i, j]
  return grid


# ---------------------------------------------------------- training curves
# Panels of `training_curves`: the metric names train.MetricsLog writes as
# '{split}/{name}' scalars.
CURVE_PANELS = (('loss', ('loss',)), ('error', ('top1_error', 'top5_error')),
                ('learning rate', ('learning_rate',)))


def training_curves(history: Mapping[str, Sequence[Tuple[int, float]]],
                    title: Optional[str] = None) -> np.ndarray:
  """Loss, top-1/top-5 error (train and val) and learning rate vs step.

  history: {'train/loss': [(step, value), ...], 'val/top1_error': ...}, as
  `run_dir.read_curves` returns; tags without a split ('loss') count as
  train. One colour per metric, train solid and val dashed; missing curves
  are left out.
  """
  fig = Figure(figsize=(12, 3.4), dpi=100)
  for i, (panel, names) in enumerate(CURVE_PANELS):
    ax = fig.add_subplot(1, len(CURVE_PANELS), i + 1)
    for tag, points in sorted(history.items()):
      split, _, name = tag.rpartition('/')
      if name not in names or not len(points):
        continue
      steps, values = zip(*points)
      ax.plot(steps, values, color=f'C{names.index(name)}',
              ls='--' if split == 'val' else '-',
              marker='.' if len(steps) < 30 else None,
              label=f'{split or "train"} {name}'.replace('_', ' '))
    if panel == 'learning rate' and ax.lines:
      ax.set_yscale('log')
    ax.set_xlabel('step')
    ax.set_title(panel)
    if ax.lines:
      ax.legend(fontsize=7)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return _figure_to_array(fig)
