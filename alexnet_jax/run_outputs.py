"""What a training run writes besides checkpoints: the paper's figures, the
tower-specialisation numbers and the communication report.

Called by `train.train_and_evaluate`; every process runs the computations
(they are collective on a multi-host mesh), process 0 writes the files:

- at each evaluation: `conv1_kernels.png` (Figure 3) and
  `tower_specialisation.png`, plus the per-tower colour specificity as
  scalars ('specialisation/tower1_mean', ...);
- at the end: `top5.png` (Figure 4 left), `nearest_neighbours.png` (Figure 4
  right; config.figures.nearest_neighbours) and `training_curves.png`;
- at the start: `communication.json`, the bytes each cross-tower exchange
  moves, per image and per step.

PNGs go to `<workdir>/figures/` (the latest overwrites; TensorBoard keeps
every step's as images).
"""

import json
from typing import Dict, List

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from alexnet_jax import audit
from alexnet_jax import figures
from alexnet_jax import input_pipeline
from alexnet_jax import mesh as mesh_lib
from alexnet_jax import paths
from alexnet_jax import run_dir
from alexnet_jax import train_step as train_step_lib

FIGURES = 'figures'


def _write_images(workdir, writer, step, images: Dict[str, np.ndarray]):
  if not run_dir.is_writer():
    return
  for name, image in images.items():
    figures.save_png(paths.join(workdir, FIGURES, f'{name}.png'), image)
  figures.write_to_tensorboard(writer, step,
                               {f'figures/{n}': im for n, im in images.items()})


def _replicated(mesh, fn, *args):
  """fn(*args) under jit, its result on every device (so on every host)."""
  return jax.device_get(jax.jit(fn, out_shardings=NamedSharding(mesh, P()))(
      *args))


# ---------------------------------------------------- at each evaluation
def kernel_figures(workdir, writer, step: int, params) -> Dict[str, float]:
  """Figure 3 and the specialisation plot; returns the summary scalars
  {'tower1_mean': ..., 'tower1_median': ..., 'tower1_fraction_colour': ...}.
  """
  params = {'conv1': {'kernel': multihost_utils.process_allgather(
      params['conv1']['kernel'], tiled=True)}}
  stats = figures.tower_specialisation(params)
  _write_images(workdir, writer, step, {
      'conv1_kernels': figures.conv1_kernel_grid(params),
      'tower_specialisation': figures.specialisation_plot(stats)})
  return {f'{tower}_{k}': v
          for tower, s in figures.specialisation_summary(stats).items()
          for k, v in s.items()}


# ----------------------------------------------------------- at the end
def class_names(config) -> List[str]:
  """Names of the dataset's classes: the synset ids tfds gives (tfds ships
  no human-readable ImageNet names), with the demo's pattern names."""
  d = config.data
  if d.dataset == 'demo':
    from alexnet_jax import demo_data  # pylint: disable=g-import-not-at-top
    return [f'{demo_data.PATTERNS[i % len(demo_data.PATTERNS)]} ({w})'
            for i, w in enumerate(demo_data.class_wnids(d.demo_num_classes))]
  if d.dataset == 'imagenet2012' and not d.get('prepared_dir'):
    builder = input_pipeline.imagenet_builder(config)
    return list(builder.info.features['label'].names)
  if d.dataset == 'folder' and d.folder:
    train = paths.path(d.folder) / 'train'
    return sorted(n.name for n in train.iterdir() if n.is_dir())
  return [str(i) for i in range(config.model.num_classes)]


def to_pixels(config, images) -> np.ndarray:
  """Network inputs (mean-subtracted, 0-255 scale) back to uint8 pixels."""
  mean = input_pipeline.load_mean(config)
  if mean.ndim == 3:  # Per-pixel mean: its central crop.
    c, r = config.data.crop_size, config.data.resize_size
    o = (r - c) // 2
    mean = mean[o:o + c, o:o + c]
  return np.clip(np.round(np.asarray(images) + mean), 0, 255).astype(np.uint8)


def unaugmented_train_batches(config, mesh):
  """Every training image once, in the split's order: the central crop as
  in evaluation (no flips, no PCA noise), as global batches with a mask."""
  return input_pipeline.eval_iterator(config, mesh, split='train')


def merge_nearest(best_d2, best_images, queries, features, images, mask):
  """The running k nearest training images of each query, merged with one
  batch: squared distances, top-k, and the k images themselves."""
  q2 = jnp.sum(queries * queries, axis=1, keepdims=True)
  c2 = jnp.sum(features * features, axis=1)
  cross = jnp.dot(queries, features.T, precision=jax.lax.Precision.HIGHEST)
  d2 = jnp.maximum(q2 - 2 * cross + c2[None], 0.0)
  d2 = jnp.where(mask[None] > 0, d2, jnp.inf)
  k = best_d2.shape[1]
  # Ties keep the earlier candidate (top_k is stable): the kept ones first.
  neg, pick = jax.lax.top_k(-jnp.concatenate([best_d2, d2], axis=1), k)
  kept = jnp.take_along_axis(best_images,
                             jnp.minimum(pick, k - 1)[:, :, None, None, None],
                             axis=1)
  new = images[jnp.maximum(pick - k, 0)]  # (Q, k, H, W, 3)
  return -neg, jnp.where((pick < k)[:, :, None, None, None], kept, new)


def nearest_neighbour_figure(config, model, mesh, params, query_images,
                             k: int) -> np.ndarray:
  """Figure 4 right: for each query, the k training images closest in fc7
  space, from one streaming pass over the training split sharded over the
  mesh (fc7 on the mesh; only the k best images per query are kept)."""
  fc7 = figures.fc7_function(model, mesh)
  queries = _replicated(mesh, lambda f: f[:len(query_images)],
                        fc7(params, query_batch(config, mesh, query_images)))
  best_d2 = jnp.full((len(queries), k), jnp.inf, jnp.float32)
  best_images = jnp.zeros((len(queries), k) + query_images.shape[1:],
                          jnp.float32)
  replicated = NamedSharding(mesh, P())
  merge = jax.jit(merge_nearest, out_shardings=(replicated, replicated))
  for batch in unaugmented_train_batches(config, mesh):
    best_d2, best_images = merge(best_d2, best_images, jnp.asarray(queries),
                                 fc7(params, batch['images']),
                                 batch['images'], batch['mask'])
  best_images = jax.device_get(best_images)
  return figures.neighbours_figure(to_pixels(config, query_images),
                                   to_pixels(config, best_images))


def query_batch(config, mesh, images):
  """`images` padded to a batch the mesh takes (as a global array)."""
  data = mesh.shape[mesh_lib.DATA]
  n = len(images) + -len(images) % data
  x = np.zeros((n,) + images.shape[1:], np.float32)
  x[:len(images)] = images
  return jax.device_put(x, mesh_lib.data_sharding(mesh))


def final_figures(config, workdir, writer, step: int, model, mesh, params):
  """top5.png, nearest_neighbours.png (if configured), training_curves.png."""
  f = config.figures
  batch = next(iter(input_pipeline.eval_iterator(config, mesh)))
  host = {k: mesh_lib.to_host(v) for k, v in batch.items()}
  real = np.flatnonzero(host['mask'] > 0)[:f.num_images]
  images, labels = host['images'][real], host['labels'][real]
  predict_step = train_step_lib.make_predict_step(model, mesh, params)
  probs = np.exp(mesh_lib.to_host(predict_step(params, batch['images'])))[real]
  out = {'top5': figures.top5_figure(to_pixels(config, images), probs, labels,
                                     class_names(config),
                                     k=min(5, probs.shape[1]))}
  if f.nearest_neighbours:
    out['nearest_neighbours'] = nearest_neighbour_figure(
        config, model, mesh, params, images, f.num_neighbours)
  if run_dir.is_writer():
    writer.flush()
    out['training_curves'] = figures.training_curves(
        run_dir.read_curves(workdir), title=paths.name(workdir))
  _write_images(workdir, writer, step, out)


# -------------------------------------------------------- communication
def communication_report(config, model, mesh) -> Dict:
  """Cross-tower traffic of the layer table (audit.exchange_table): bytes a
  device holding one tower receives, per image and per step, forward and
  backward. A gather's backward is a reduce-scatter of the same size; fc8's
  sum (an all-reduce of partial logits) has a broadcast, nothing, as its
  backward. With the towers on one device (tower axis 1) nothing crosses
  between devices: the per-step figures are then 0."""
  rows = audit.exchange_table(model, config.data.crop_size)
  towers_apart = mesh.shape[mesh_lib.TOWER] > 1
  images_per_device = config.batch_size // mesh.shape[mesh_lib.DATA]
  for r in rows:
    r['forward_bytes_per_image'] = r.pop('bytes_received')
    r['backward_bytes_per_image'] = (
        r['forward_bytes_per_image'] if r['kind'] == 'all-gather' else 0)
    for d in ('forward', 'backward'):
      r[f'{d}_bytes_per_step_per_device'] = (
          r[f'{d}_bytes_per_image'] * images_per_device * towers_apart)
  total = lambda key: sum(r[key] for r in rows)
  return {
      'exchange': list(config.model.exchange),
      'num_towers': model.num_towers,
      'mesh': dict(mesh.shape),
      'batch_size': config.batch_size,
      'images_per_device': images_per_device,
      'towers_on_separate_devices': bool(towers_apart),
      'layers': rows,
      'total_bytes_per_image': total('forward_bytes_per_image') +
                               total('backward_bytes_per_image'),
      'total_bytes_per_step_per_device':
          total('forward_bytes_per_step_per_device') +
          total('backward_bytes_per_step_per_device'),
  }


def communication_table(report: Dict) -> str:
  rows = [f'{"layer":<6} {"kind":<11} {"floats/tower":>12} {"fwd B/image":>12}'
          f' {"bwd B/image":>12} {"fwd MB/step":>12} {"bwd MB/step":>12}']
  for r in report['layers']:
    rows.append(
        f'{r["layer"]:<6} {r["kind"]:<11} {r["floats_per_tower"]:>12,} '
        f'{r["forward_bytes_per_image"]:>12,} '
        f'{r["backward_bytes_per_image"]:>12,} '
        f'{r["forward_bytes_per_step_per_device"] / 1e6:>12.3f} '
        f'{r["backward_bytes_per_step_per_device"] / 1e6:>12.3f}')
  rows.append(f'total: {report["total_bytes_per_image"]:,} bytes per image, '
              f'{report["total_bytes_per_step_per_device"] / 1e6:.3f} MB per '
              f'step per device ({report["images_per_device"]} images per '
              'device' + ('' if report['towers_on_separate_devices'] else
                          '; the towers share each device, so nothing crosses '
                          'between devices') + ').')
  return '\n'.join(rows)


def write_communication(config, workdir, model, mesh) -> Dict:
  report = communication_report(config, model, mesh)
  logging.info('Cross-tower exchanges (%s), bytes a tower\'s device '
               'receives:\n%s', ', '.join(report['exchange']) or 'none; fc8 '
               'sums the logits', communication_table(report))
  if run_dir.is_writer():
    paths.write_text(paths.join(workdir, 'communication.json'),
                     json.dumps(report, indent=2))
  return report
