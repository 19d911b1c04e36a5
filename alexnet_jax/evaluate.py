"""Evaluation of finished runs: centre crop, 10 crops, ensembles (§4.1, §6).

  results = evaluate_runs(['/tmp/run1', '/tmp/run2'], checkpoint='best',
                          crops=('center', 'ten'))

Each run (a workdir written by `train.train_and_evaluate`) is rebuilt from
its config.json, restored from its latest, best or a given checkpoint onto
any mesh, and run over the whole validation set, every image once:

- 'center': the central crop_size x crop_size patch of the resize_size image;
- 'ten': the paper's ten patches, four corners and centre plus their
  horizontal reflections, "averaging the predictions made by the network's
  softmax layer on the ten patches" (§4.1).

An ensemble (several workdirs) averages its members' softmax outputs per
image, as the paper's 5 and 7 CNNs (§6): the members must score the same
images in the same order, which `predict` makes a fixed order (the eval
iterator's, a function of the data config) and `evaluate_runs` checks by
comparing the label sequences.

Results: `write_results` puts eval_results.json in the (first) workdir and
`results_table` a markdown table next to the paper's numbers. The command
line is evaluate.py at the repository root.
"""

import json
import os
from typing import Any, Dict, Optional, Sequence, Tuple

from absl import logging
import jax
import numpy as np

from alexnet_jax import input_pipeline
from alexnet_jax import mesh as mesh_lib
from alexnet_jax import paths
from alexnet_jax import run_dir
from alexnet_jax import train_step as train_step_lib

CROPS = ('center', 'ten')
CROP_NAMES = {'center': 'centre crop', 'ten': '10 crops'}
RESULTS_FILE = 'eval_results.json'

# ILSVRC-2012 validation error, docs/PAPER.md "Results to compare against"
# (the paper's Table 2 and §6; cuda-convnet2 for the centre crop).
# (model, top-1 error, top-5 error).
PAPER_RESULTS = (
    ('paper, 1 CNN (10-crop)', 0.407, 0.182),
    ('paper, 5 CNNs averaged', 0.381, 0.164),
    ('paper, 7 CNNs, 2 pre-trained on ImageNet Fall 2011', 0.367, 0.154),
    ('cuda-convnet2, 1 CNN, centre crop (top-1 only)', 0.425, None),
    ('torchvision alexnet (single tower, no LRN), centre crop', 0.4348,
     0.2093),
    ('Caffe bvlc_alexnet, centre 227 crop', 0.429, 0.198),
)


# ------------------------------------------------------------------- runs
def make_mesh(config, mesh_shape: Optional[Tuple[int, int]] = None):
  """(data, tower) mesh for evaluation: `mesh_shape` or every device."""
  if mesh_shape is None:
    return mesh_lib.make_mesh(config.model.num_towers)
  data, tower = mesh_shape
  return mesh_lib.make_mesh(config.model.num_towers, tower, data)


# ------------------------------------------------------------ predictions
def predict(predict_step, params, batches) -> Tuple[np.ndarray, np.ndarray]:
  """(log_probs (N, classes) float32, labels (N,)) of every real example of
  `batches` (padding, mask 0, dropped), in the batches' order."""
  log_probs, labels = [], []
  for batch in batches:
    out = mesh_lib.to_host(predict_step(params, batch['images']))
    real = mesh_lib.to_host(batch['mask']) > 0
    log_probs.append(out[real])
    labels.append(mesh_lib.to_host(batch['labels'])[real])
  if not log_probs:
    raise ValueError('The validation split is empty.')
  return np.concatenate(log_probs), np.concatenate(labels)


def predict_run(config, workdir: str, mesh, checkpoint: str = 'latest',
                crops: Sequence[str] = CROPS,
                compiled: Optional[Dict[Any, Any]] = None) -> Dict[str, Any]:
  """{'step': int, crop: (log_probs, labels) for each crop mode} of a run.

  compiled: a dict shared between runs so members with the same model and
  mesh (the paper's 5 CNNs) share one compiled predict_step.
  """
  model, params, step = run_dir.restore_params(config, workdir, mesh,
                                               checkpoint)
  compiled = {} if compiled is None else compiled
  key = (config.model.to_json(sort_keys=True), mesh)
  if key not in compiled:
    compiled[key] = train_step_lib.make_predict_step(model, mesh, params)
  predict_step = compiled[key]
  out = {'step': step}
  for crop in crops:
    batches = input_pipeline.eval_iterator(config, mesh,
                                           ten_crop=crop == 'ten')
    out[crop] = predict(predict_step, params, batches)
  return out


# ---------------------------------------------------------------- metrics
def metrics(probs: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
  """Loss and top-1/top-5 error of (averaged) softmax outputs `probs`.

  Ranks as eval_step (train_step.top_k_correct): an image counts as top-k
  correct when fewer than k other classes score at least as high as its
  label (NaN counts against it).
  """
  p_label = np.take_along_axis(probs, labels[:, None], axis=-1)
  rank = (~(probs < p_label)).sum(axis=-1) - 1
  with np.errstate(divide='ignore'):
    loss = -np.log(p_label[:, 0])
  return {'loss': float(loss.mean()),
          'top1_error': float((rank >= 1).mean()),
          'top5_error': float((rank >= 5).mean()),
          'count': int(labels.shape[0])}


def check_same_examples(labels: np.ndarray, reference: np.ndarray,
                        workdir: str, first: str, crop: str) -> None:
  """Ensemble members must score the same images in the same order."""
  if labels.shape != reference.shape or not np.array_equal(labels,
                                                           reference):
    raise ValueError(
        f'{workdir} and {first} do not evaluate the same validation images '
        f'in the same order ({crop}: {labels.shape[0]} vs '
        f'{reference.shape[0]} images, or different labels): ensemble '
        'members need the same validation data; point them at the same data '
        'with --config.data.* overrides (e.g. --config.data.data_dir=...), '
        'or evaluate them separately.')


def evaluate_runs(workdirs: Sequence[str], checkpoint: str = 'latest',
                  crops: Sequence[str] = CROPS,
                  mesh_shape: Optional[Tuple[int, int]] = None,
                  overrides: Optional[Dict[str, Any]] = None,
                  keep_predictions: bool = False,
                  defaults=None) -> Dict[str, Any]:
  """Each run and, for several, their ensemble (softmax averaged per image).

  Each run's saved config takes `defaults` (a ConfigDict) for the fields it
  predates and then the dotted `overrides`.
  Returns {'checkpoint', 'crops', 'members': [{'workdir', 'step', 'mesh',
  crop: metrics}], 'ensemble': {'size', crop: metrics} (2+ members only)};
  metrics as `metrics`. keep_predictions adds 'predictions': per member,
  {crop: (log_probs, labels)} (not written by `write_results`).
  """
  if not workdirs:
    raise ValueError('Give at least one --workdir.')
  unknown = [c for c in crops if c not in CROPS]
  if unknown or not crops:
    raise ValueError(f'--crops={",".join(crops)}: choose from '
                     f'{",".join(CROPS)}.')
  configs = [run_dir.load_config(w, defaults, overrides)
             for w in workdirs]
  for c in configs:
    paths.check_config(c)
  classes = {w: c.model.num_classes for w, c in zip(workdirs, configs)}
  if len(set(classes.values())) > 1:
    raise ValueError(
        'Ensemble members must have the same number of classes; '
        f'model.num_classes is {classes}. Evaluate them separately.')

  results = {'checkpoint': str(checkpoint), 'crops': list(crops),
             'members': []}
  sums, reference = {}, {}  # Per crop: sum of probabilities, labels.
  compiled, predictions = {}, []
  for workdir, config in zip(workdirs, configs):
    mesh = make_mesh(config, mesh_shape)
    run = predict_run(config, workdir, mesh, checkpoint, crops, compiled)
    if keep_predictions:
      predictions.append({crop: run[crop] for crop in crops})
    member = {'workdir': paths.absolute(workdir), 'step': run['step'],
              'mesh': [int(mesh.shape[mesh_lib.DATA]),
                       int(mesh.shape[mesh_lib.TOWER])]}
    for crop in crops:
      log_probs, labels = run[crop]
      if crop in reference:
        check_same_examples(labels, reference[crop], workdir, workdirs[0],
                            crop)
      else:
        reference[crop] = labels
      # float64: a sum of n equal members divided by n is the member, exactly.
      probs = np.exp(log_probs.astype(np.float64))
      sums[crop] = probs if crop not in sums else sums[crop] + probs
      member[crop] = metrics(probs, labels)
      logging.info('%s (step %d), %s: top-1 error %.2f%%, top-5 error '
                   '%.2f%%, loss %.4f (%d images).', workdir, run['step'],
                   CROP_NAMES[crop], 100 * member[crop]['top1_error'],
                   100 * member[crop]['top5_error'], member[crop]['loss'],
                   member[crop]['count'])
    results['members'].append(member)

  if len(workdirs) > 1:
    n = len(workdirs)
    results['ensemble'] = {'size': n, **{
        crop: metrics(sums[crop] / n, reference[crop]) for crop in crops}}
  if keep_predictions:
    results['predictions'] = predictions
  return results


# ---------------------------------------------------------------- reports
def write_results(results: Dict[str, Any], workdir: str) -> str:
  """eval_results.json in `workdir` (process 0 only); returns its path."""
  path = paths.join(workdir, RESULTS_FILE)
  if jax.process_index() == 0:
    paths.write_text(path, json.dumps(
        {k: v for k, v in results.items() if k != 'predictions'}, indent=2,
        sort_keys=True))
  return path


def _pct(x) -> str:
  return '' if x is None else f'{100 * x:.2f}%'


def results_table(results: Dict[str, Any]) -> str:
  """A markdown table: each member, the ensemble, then the paper's rows."""
  rows = ['| model | checkpoint | crops | top-1 error | top-5 error | loss '
          '| images |', '|---|---|---|---|---|---|---|']
  members = results['members']
  for i, m in enumerate(members):
    name = f'run {i + 1}: {os.path.basename(m["workdir"].rstrip("/"))}'
    for crop in results['crops']:
      r = m[crop]
      rows.append(f'| {name} | step {m["step"]} | {CROP_NAMES[crop]} | '
                  f'{_pct(r["top1_error"])} | {_pct(r["top5_error"])} | '
                  f'{r["loss"]:.4f} | {r["count"]} |')
  if 'ensemble' in results:
    e = results['ensemble']
    for crop in results['crops']:
      r = e[crop]
      rows.append(f'| ensemble of {e["size"]} (softmax averaged) | '
                  f'{results["checkpoint"]} | {CROP_NAMES[crop]} | '
                  f'{_pct(r["top1_error"])} | {_pct(r["top5_error"])} | '
                  f'{r["loss"]:.4f} | {r["count"]} |')
  for name, top1, top5 in PAPER_RESULTS:
    rows.append(f'| {name} | | | {_pct(top1)} | {_pct(top5)} | | 50000 |')
  return '\n'.join(rows)
