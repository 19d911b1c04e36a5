"""Training and evaluation, top to bottom: `train_and_evaluate(config, workdir)`.

One linear function in marked sections (logging, mesh, input, model,
checkpoint, update, evals, loop), as the paper's §5 reads: SGD on batches of
`config.batch_size`, the learning rate divided when the validation error stops
improving, evaluation on the whole validation set.

Resume. A workdir holding checkpoints resumes from the latest one: the train
state, the schedule's state and the data iterator (restarted at that step,
its batches a function of (seed, step)), so the resumed run is the
uninterrupted one, bit for bit on CPU.

Preemption. SIGTERM makes the run save a checkpoint after the step in flight
and return normally (on many hosts jax's preemption service picks a step all
hosts agree on).

Divergence. A non-finite loss, gradient norm or parameter norm raises
DivergenceError naming the step; the state is never saved, so the last good checkpoint stays the
latest.

Fine-tuning. With `config.init_from` (another run's workdir) a new run
starts from that run's parameters except fc8, which is initialised afresh
for `config.model.num_classes`; fresh optimizer state, step 0.

Outputs in the workdir: config.json, metrics.jsonl (one JSON line per
logged step or evaluation), TensorBoard event files, checkpoints/,
communication.json (cross-tower bytes) and figures/*.png
(alexnet_jax/run_outputs.py).
"""

import functools
import json
import math
import os
import signal
import threading
import time
from typing import Any, Dict, Tuple

from absl import logging
from clu import metric_writers
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from alexnet_jax import checkpoint as checkpoint_lib
from alexnet_jax import input_pipeline
from alexnet_jax import mesh as mesh_lib
from alexnet_jax import model as model_lib
from alexnet_jax import native
from alexnet_jax import optimizer as optimizer_lib
from alexnet_jax import run_outputs
from alexnet_jax import schedules
from alexnet_jax import train_step as train_step_lib


class DivergenceError(FloatingPointError):
  """The loss (or the parameters) became NaN or infinite."""


# ------------------------------------------------------------------ helpers
def every(step: int, *, total_steps: int, steps_per_epoch: int,
          every_steps: int = 0, every_epochs: float = 0.0,
          first: bool = False, last: bool = False) -> bool:
  """The one cadence rule: does something happen after update `step`?

  Steps count from 1 (the first update) to total_steps. every_steps and
  every_epochs (0: never) may both be set; first/last force the first and
  the last step.
  """
  if (first and step == 1) or (last and step == total_steps):
    return True
  if every_steps and step % every_steps == 0:
    return True
  if every_epochs:
    period = max(1, int(round(every_epochs * steps_per_epoch)))
    return step % period == 0
  return False


def parameter_table(params) -> Tuple[str, int]:
  """A per-layer table (kernel shape per tower, towers, counts) and the total."""
  rows = [f'{"layer":<6} {"kernel per tower":<20} {"towers":>6} '
          f'{"per tower":>11} {"total":>11}']
  total = 0
  for layer, p in params.items():
    towers = p['kernel'].shape[0]
    kernel = p['kernel'].shape[1:]
    count = p['kernel'].size + p['bias'].size
    per_tower = (p['kernel'].size + p['bias'].size *
                 (p['bias'].ndim > 1)) // towers
    rows.append(f'{layer:<6} {"x".join(map(str, kernel)):<20} {towers:>6} '
                f'{per_tower:>11,} {count:>11,}')
    total += count
  rows.append(f'{"total":<6} {"":<20} {"":>6} {"":>11} {total:>11,}')
  return '\n'.join(rows), total


def live_units(model, mesh, params, images) -> Dict[str, float]:
  """Fraction of fc6/fc7 ReLUs that fire for at least one image (§5 init).

  Runs the whole model on the mesh without dropout; the model sows each
  hidden fc layer's tower activations as 'intermediates' `<layer>_features`.
  """

  def fractions(params, images):
    _, state = model.apply({'params': params}, images,
                           mutable=['intermediates'])
    inter = state['intermediates']
    return {l: (jnp.concatenate(inter[f'{l}_features'][0], axis=-1) > 0).any(
        axis=0).mean() for l in ('fc6', 'fc7')}

  return jax.device_get(jax.jit(
      fractions, out_shardings=NamedSharding(mesh, P()))(params, images))


def evaluate(eval_step, params, batches) -> Dict[str, float]:
  """Loss and top-1/top-5 error over every batch (masked padding excluded)."""
  sums = None
  for batch in batches:
    out = eval_step(params, batch)
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = jax.device_get(sums)
  n = float(sums['count'])
  return {'loss': float(sums['loss']) / n,
          'top1_error': 1.0 - float(sums['top1_correct']) / n,
          'top5_error': 1.0 - float(sums['top5_correct']) / n,
          'count': n}


def _source_workdir(path: str) -> str:
  """The run directory of `config.init_from` (a workdir or its checkpoints/)."""
  path = os.path.normpath(path)
  if os.path.basename(path) == 'checkpoints':
    path = os.path.dirname(path)
  if not os.path.isdir(os.path.join(path, 'checkpoints')):
    raise FileNotFoundError(
        f'--config.init_from={path!r} holds no checkpoints/: give the workdir '
        'of a finished training run (or its checkpoints/ directory).')
  return path


def pretrained_params(config, params, mesh):
  """`params` (a fresh initialisation) with every layer but fc8 taken from
  the checkpoint `config.init_from_step` of the run `config.init_from`.

  The source run's architecture must match in every layer but fc8 (whose
  number of classes may differ); a clear error names the layers that differ.
  """
  from alexnet_jax import evaluate  # pylint: disable=g-import-not-at-top
  workdir = _source_workdir(config.init_from)
  source_config = evaluate.load_config(workdir)
  source_model = model_lib.create_model(source_config.model)
  size = config.data.crop_size
  source_shapes = jax.eval_shape(
      source_model.init, jax.random.PRNGKey(0),
      jnp.zeros((1, size, size, 3)))['params']
  shapes = lambda tree: {
      jax.tree_util.keystr(path): tuple(x.shape)
      for path, x in jax.tree_util.tree_leaves_with_path(tree)
      if not jax.tree_util.keystr(path).startswith("['fc8']")}
  want, have = shapes(params), shapes(source_shapes)
  differ = [f'{k}: {have.get(k, "missing")} in the source, '
            f'{want.get(k, "missing")} here'
            for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
  if differ:
    raise ValueError(
        f'Cannot fine-tune from {workdir}: its network differs from this '
        'one outside fc8 (only fc8 may change, for a new number of classes):'
        '\n  ' + '\n  '.join(differ))
  _, source, step = evaluate.restore_params(source_config, workdir, mesh,
                                            str(config.init_from_step))
  logging.info('Fine-tuning from %s, checkpoint of step %d: all layers but '
               'fc8 (re-initialised for %d classes; the source had %d).',
               workdir, step, config.model.num_classes,
               source_config.model.num_classes)
  return {layer: (params[layer] if layer == 'fc8' else source[layer])
          for layer in params}


class Preemption:
  """SIGTERM -> stop after the next step; many hosts agree on that step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if (jax.process_count() == 1 and
        threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM: saving a checkpoint after this step, then '
                    'stopping.')
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def stop_now(self, step: int) -> bool:
    if jax.process_count() > 1:  # jax.distributed's preemption service.
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested


class MetricsLog:
  """TensorBoard (clu) plus metrics.jsonl; process 0 writes, others log."""

  def __init__(self, workdir):
    self.is_writer = jax.process_index() == 0
    self.writer = metric_writers.create_default_writer(
        workdir, just_logging=not self.is_writer)
    self.path = os.path.join(workdir, 'metrics.jsonl')

  def write(self, step: int, split: str, scalars: Dict[str, float]):
    self.writer.write_scalars(step, {f'{split}/{k}': v
                                     for k, v in scalars.items()})
    if self.is_writer:
      with open(self.path, 'a') as f:
        f.write(json.dumps({'step': step, 'split': split, **scalars}) + '\n')

  def close(self):
    self.writer.flush()
    self.writer.close()


def _check_finite(step: int, metrics: Dict[str, float]):
  for name in ('loss', 'param_norm', 'grad_norm'):
    if not math.isfinite(metrics[name]):
      raise DivergenceError(
          f'Training diverged: {name} is {metrics[name]} at step {step} '
          f'(learning rate {metrics["learning_rate"]:g}). The last good '
          'checkpoint was kept as the latest; lower --config.optim.'
          'learning_rate or add warm-up (--config.schedule.warmup_epochs) '
          'and rerun in the same workdir to resume from it.')


def _fmt_time(seconds: float) -> str:
  seconds = int(seconds)
  d, r = divmod(seconds, 86400)
  return (f'{d}d ' if d else '') + time.strftime('%H:%M:%S', time.gmtime(r))


# -------------------------------------------------------------------- main
def train_and_evaluate(config, workdir: str) -> Tuple[Any, Dict[str, float]]:
  """Trains `config` in `workdir` (resuming if it holds checkpoints).

  Returns the final TrainState and the last validation metrics.
  """
  # ---------------------------------------------------------------- logging
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  log = MetricsLog(workdir)
  logging.info('Workdir %s. Processes: %d (this is %d); devices: %d global, '
               '%d local (%s).', workdir, jax.process_count(),
               jax.process_index(), jax.device_count(),
               jax.local_device_count(), jax.devices()[0].platform)
  logging.info('Config:\n%s', config)

  # ------------------------------------------------------------------- mesh
  mesh = mesh_lib.make_mesh(config.model.num_towers,
                            config.mesh.tower_axis_size,
                            config.mesh.data_axis_size)
  mesh_lib.check_batch_size(config.batch_size, mesh)
  logging.info('%s', mesh_lib.device_table(mesh))
  logging.info('Batch: %d global, %d per data shard (device), %d per '
               'process.', config.batch_size,
               config.batch_size // mesh.shape[mesh_lib.DATA],
               config.batch_size // jax.process_count())

  # ------------------------------------------------------------------ input
  classes = input_pipeline.num_classes(config)
  if classes != config.model.num_classes:
    raise ValueError(
        f'The dataset {config.data.dataset!r} has {classes} classes but '
        f'config.model.num_classes={config.model.num_classes}: set '
        f'--config.model.num_classes={classes}.')
  # The augmentation's resample: builds the native op on first use, and
  # fails here with what to do if config.data.resample='native' cannot.
  native.resample_op(config.data.resample)
  steps_per_epoch = input_pipeline.steps_per_epoch(config)
  total_steps = config.total_steps or config.num_epochs * steps_per_epoch
  cadence = functools.partial(every, total_steps=total_steps,
                              steps_per_epoch=steps_per_epoch)
  logging.info('%d steps per epoch, %d steps (%.1f epochs) in all.',
               steps_per_epoch, total_steps, total_steps / steps_per_epoch)

  # ------------------------------------------------------------------ model
  model = model_lib.create_model(config.model)
  tx = optimizer_lib.create_optimizer(config.optim)
  init = functools.partial(train_step_lib.create_train_state, model, tx,
                           mesh, jax.random.PRNGKey(config.seed),
                           config.data.crop_size)
  abstract_state = jax.eval_shape(init)
  table, num_params = parameter_table(abstract_state.params)
  logging.info('Parameters (%s):\n%s', f'{num_params:,}', table)
  schedule = schedules.create_schedule(config, steps_per_epoch)

  # ------------------------------------------------------------- checkpoint
  manager = checkpoint_lib.create_manager(
      os.path.join(workdir, 'checkpoints'), config.checkpoint)
  if manager.latest_step() is not None:
    state, extra = checkpoint_lib.restore(manager, abstract_state, mesh)
    schedule.load_state_dict(extra['schedule'])
    logging.info('Resumed from the checkpoint of step %d in %s%s.',
                 int(state.step), manager.directory,
                 ' (init_from is only read by a fresh run)'
                 if config.get('init_from') else '')
  else:
    state = init()
    if config.get('init_from'):
      state = state.replace(params=pretrained_params(config, state.params,
                                                     mesh))
  start_step = int(jax.device_get(state.step))

  # ----------------------------------------------------------------- update
  train_step = train_step_lib.make_train_step(model, tx, mesh, state)
  eval_step = train_step_lib.make_eval_step(model, mesh, state.params)
  train_iter = input_pipeline.train_iterator(config, mesh,
                                             start_step=start_step)

  run_outputs.write_communication(config, workdir, model, mesh)
  figures_on = config.get('figures') is not None and config.figures.enabled

  # ------------------------------------------------------------------ evals
  def run_eval(step):
    t0 = time.time()
    val = evaluate(eval_step, state.params,
                   input_pipeline.eval_iterator(config, mesh))
    log.write(step, 'val', val)
    logging.info('Validation at step %d: top-1 error %.2f%%, top-5 error '
                 '%.2f%%, loss %.4f (%d images, %.1fs).', step,
                 100 * val['top1_error'], 100 * val['top5_error'],
                 val['loss'], val['count'], time.time() - t0)
    if figures_on:  # Figure 3 and how colour-specific each tower is.
      towers = run_outputs.kernel_figures(workdir, log.writer, step,
                                          state.params)
      log.write(step, 'specialisation', towers)
      logging.info('conv1 colour specificity (mean per tower): %s.', ', '.join(
          f'{k[:-5]} {v:.3f}' for k, v in towers.items()
          if k.endswith('_mean')))
    return val

  # ------------------------------------------------------------------- loop
  last_val = {}
  current_lr = None
  t_log, step_log = time.time(), start_step

  def finish(step, metrics):
    """A step's metrics to the host: the divergence check and the log."""
    nonlocal t_log, step_log
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    _check_finite(step, metrics)
    if cadence(step, every_steps=config.log_every_steps, first=True,
               last=True):
      dt = time.time() - t_log
      steps_per_sec = (step - step_log) / max(dt, 1e-9)
      log.write(step, 'train', {
          **metrics, 'images_per_sec': steps_per_sec * config.batch_size,
          'epoch': step / steps_per_epoch})
      logging.info(
          'step %d/%d  epoch %.2f  %.2f steps/s  ETA %s  loss %.4f  top-1 '
          'error %.2f%%  lr %g', step, total_steps, step / steps_per_epoch,
          steps_per_sec, _fmt_time((total_steps - step) / steps_per_sec),
          metrics['loss'], 100 * metrics['top1_error'],
          metrics['learning_rate'])
      t_log, step_log = time.time(), step

  # A step's metrics are fetched while the next step runs (no per-step wait
  # for the device), except where the host acts on that step: logging,
  # evaluation, a checkpoint (never of a diverged state), the end.
  pending = None
  try:
    with Preemption() as preemption:
      for step in range(start_step + 1, total_steps + 1):
        batch = next(train_iter)
        if step == 1:
          live = live_units(model, mesh, state.params, batch['images'])
          logging.info('Live ReLU units at step 0 (firing on some image of '
                       'the first batch): fc6 %.1f%%, fc7 %.1f%%.',
                       100 * live['fc6'], 100 * live['fc7'])
        lr = schedule.learning_rate(step - 1)
        if lr != current_lr:
          state = state.replace(opt_state=optimizer_lib.set_learning_rate(
              state.opt_state, lr))
          current_lr = lr
        state, metrics = train_step(state, batch)
        if pending:
          finish(*pending)
        pending = (step, metrics)
        do_eval = cadence(step, every_steps=config.eval.every_steps,
                          every_epochs=config.eval.every_epochs, first=True,
                          last=True)
        stop = preemption.stop_now(step)
        do_save = stop or cadence(
            step, every_steps=config.checkpoint.every_steps,
            every_epochs=config.checkpoint.every_epochs, last=True)
        if do_eval or do_save or cadence(
            step, every_steps=config.log_every_steps, first=True, last=True):
          finish(*pending)
          pending = None

        val_error = None
        if do_eval:
          last_val = run_eval(step)
          val_error = last_val['top1_error']
          schedule.observe(step, val_error)

        if do_save:
          checkpoint_lib.save(manager, state,
                              {'schedule': schedule.state_dict()}, val_error)
        if stop:
          logging.warning('Preempted: checkpoint of step %d saved; stopping.',
                          step)
          break
      else:
        if figures_on and start_step < total_steps:
          t0 = time.time()
          run_outputs.final_figures(config, workdir, log.writer, total_steps,
                                    model, mesh, state.params)
          logging.info('Figures written to %s (%.1fs).',
                       os.path.join(workdir, run_outputs.FIGURES),
                       time.time() - t0)
  finally:  # In-flight saves complete, even on DivergenceError.
    train_iter.close()  # Stops its prefetch thread.
    manager.wait_until_finished()
    manager.close()
    log.close()
  return state, last_val
