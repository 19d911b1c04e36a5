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

import contextlib
import dataclasses
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, Tuple

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from alexnet_jax import checkpoint as checkpoint_lib
from alexnet_jax import input_pipeline
from alexnet_jax import mesh as mesh_lib
from alexnet_jax import model as model_lib
from alexnet_jax import optimizer as optimizer_lib
from alexnet_jax import paths
from alexnet_jax import run_dir
from alexnet_jax import run_outputs
from alexnet_jax import schedules
from alexnet_jax import train_step as train_step_lib


class DivergenceError(FloatingPointError):
  """The loss (or the parameters) became NaN or infinite."""


class LostProcessError(RuntimeError):
  """Another process of a multi-process run stopped answering."""


# What a collective or jax.distributed says when a peer process is gone
# (not bare status codes such as UNAVAILABLE, which a bucket's failing
# request raises too).
_LOST_PEER = ('Gloo', 'Connection closed by peer', 'Connection reset by peer',
              'heartbeat', 'coordination service', 'distributed service')


def _lost_process(error: Exception, checkpoints: str):
  """A LostProcessError saying what to do, when `error` is a collective
  failing because another process is gone; else None."""
  if jax.process_count() == 1 or not any(s in str(error) for s in _LOST_PEER):
    return None
  first = str(error).strip().splitlines()[0][:300]
  return LostProcessError(
      f'Training stopped: another process of this run stopped answering '
      f'({type(error).__name__}: {first}). Its host may have died or been '
      'killed (a preemption with notice saves a checkpoint instead). The '
      f'checkpoints in {checkpoints} are intact: when every host is back, '
      'run the same command in every process to resume from the latest.')


# ------------------------------------------------------------------ cadence
@dataclasses.dataclass(frozen=True)
class StepPlan:
  """What the loop does after one update."""
  log: bool  # The progress line and the train scalars.
  evaluate: bool  # Validation (and, with figures on, Figure 3).
  save: bool  # A checkpoint.
  stop: bool  # Preempted: save this step, then stop.
  final: bool  # The last step of the run: the final figures.

  @property
  def needs_metrics(self) -> bool:
    """The host acts on this step: its metrics must be checked first (a
    diverged state is never saved)."""
    return self.log or self.evaluate or self.save


class Cadence:
  """The run's one cadence rule, owning the log, eval and checkpoint
  intervals: `plan(step)` says what happens after update `step`.

  Steps count from 1 (the first update) to total_steps. An interval is
  every_steps or every_epochs (0: never); evaluations and logs also happen
  at the first and the last step, checkpoints at the last.
  """

  def __init__(self, config, steps_per_epoch: int, total_steps: int):
    self.config = config
    self.steps_per_epoch = steps_per_epoch
    self.total_steps = total_steps

  def every(self, step: int, every_steps: int = 0, every_epochs: float = 0.0,
            first: bool = False, last: bool = False) -> bool:
    if (first and step == 1) or (last and step == self.total_steps):
      return True
    if every_steps and step % every_steps == 0:
      return True
    if every_epochs:
      period = max(1, int(round(every_epochs * self.steps_per_epoch)))
      return step % period == 0
    return False

  def plan(self, step: int, preempted: bool = False) -> StepPlan:
    c = self.config
    return StepPlan(
        log=self.every(step, c.log_every_steps, first=True, last=True),
        evaluate=self.every(step, c.eval.every_steps, c.eval.every_epochs,
                            first=True, last=True),
        save=preempted or self.every(step, c.checkpoint.every_steps,
                                     c.checkpoint.every_epochs, last=True),
        stop=preempted, final=step == self.total_steps and not preempted)


class ProfileTrace:
  """A profiler trace of steps [start, start + n) (config.profile) written
  into the workdir, where TensorBoard's profile plugin finds it (one
  folder a process when there are several: their trace files, named after
  the host, would overwrite each other)."""

  def __init__(self, config, workdir):
    p = config.get('profile')
    self.start = p.start_step if p else 0
    self.end = self.start + (p.num_steps if p else 0) - 1
    if jax.process_count() > 1:
      workdir = paths.join(workdir, f'process_{jax.process_index()}')
    self.workdir, self.active = workdir, False

  def before(self, step: int):
    if self.start and not self.active and self.start <= step <= self.end:
      jax.profiler.start_trace(self.workdir)
      self.active = True

  def after(self, step: int, metrics):
    if self.active and step >= self.end:
      self.stop(metrics)
      logging.info('Profiler trace of steps %d-%d written to %s (TensorBoard: '
                   'Profile tab).', self.start, step,
                   paths.join(self.workdir, 'plugins', 'profile'))

  def stop(self, metrics=None):
    if self.active:
      jax.block_until_ready(metrics)
      jax.profiler.stop_trace()
      self.active = False


# ------------------------------------------------------------ train metrics
class PendingMetrics:
  """A step's metrics, fetched while the next step runs.

  `push` keeps a step's (device) metrics and hands the previous step's to
  `on_metrics(step, host_metrics, log)`; `flush` hands over the kept ones at
  once, for a step the host acts on (log, evaluation, checkpoint, end).
  """

  def __init__(self, on_metrics: Callable[[int, Dict[str, float], bool],
                                          None]):
    self._on_metrics = on_metrics
    self._pending = None

  def push(self, step: int, metrics, log: bool):
    self.flush()
    self._pending = (step, metrics, log)

  def flush(self):
    if self._pending is not None:
      step, metrics, log = self._pending
      self._pending = None
      self._on_metrics(step, {k: float(v) for k, v in
                              jax.device_get(metrics).items()}, log)


class Progress:
  """The divergence check on every step's metrics; at the log cadence the
  progress line and the train scalars (with images/s since the last)."""

  def __init__(self, log: run_dir.MetricsLog, cadence: Cadence,
               batch_size: int, start_step: int):
    self.log, self.cadence, self.batch_size = log, cadence, batch_size
    self.t_last, self.step_last = time.time(), start_step

  def __call__(self, step: int, metrics: Dict[str, float], log: bool):
    _check_finite(step, metrics)
    if not log:
      return
    steps_per_sec = (step - self.step_last) / max(time.time() - self.t_last,
                                                  1e-9)
    total, per_epoch = self.cadence.total_steps, self.cadence.steps_per_epoch
    self.log.write(step, 'train', {
        **metrics, 'images_per_sec': steps_per_sec * self.batch_size,
        'epoch': step / per_epoch})
    logging.info(
        'step %d/%d  epoch %.2f  %.2f steps/s  ETA %s  loss %.4f  top-1 '
        'error %.2f%%  lr %g', step, total, step / per_epoch, steps_per_sec,
        _fmt_time((total - step) / steps_per_sec), metrics['loss'],
        100 * metrics['top1_error'], metrics['learning_rate'])
    self.t_last, self.step_last = time.time(), step


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


# -------------------------------------------------------------- evaluation
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


class Validation:
  """The evaluation at the eval cadence: the whole validation set, logged;
  with figures on, Figure 3 and the towers' colour specificity too."""

  def __init__(self, config, workdir, mesh, eval_step, log):
    self.config, self.workdir, self.mesh = config, workdir, mesh
    self.eval_step, self.log = eval_step, log
    self.figures = config.get('figures') is not None and config.figures.enabled

  def __call__(self, step: int, params) -> Dict[str, float]:
    t0 = time.time()
    val = evaluate(self.eval_step, params,
                   input_pipeline.eval_iterator(self.config, self.mesh))
    self.log.write(step, 'val', val)
    logging.info('Validation at step %d: top-1 error %.2f%%, top-5 error '
                 '%.2f%%, loss %.4f (%d images, %.1fs).', step,
                 100 * val['top1_error'], 100 * val['top5_error'],
                 val['loss'], val['count'], time.time() - t0)
    if self.figures:
      towers = run_outputs.kernel_figures(self.workdir, self.log.writer, step,
                                          params)
      self.log.write(step, 'specialisation', towers)
      logging.info('conv1 colour specificity (mean per tower): %s.', ', '.join(
          f'{k[:-5]} {v:.3f}' for k, v in towers.items()
          if k.endswith('_mean')))
    return val


# ------------------------------------------------------------ start-up logs
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


# ------------------------------------------------------------- fine-tuning
def pretrained_params(config, params, mesh):
  """`params` (a fresh initialisation) with every layer but fc8 taken from
  the checkpoint `config.init_from_step` of the run `config.init_from`.

  The source run's architecture must match in every layer but fc8 (whose
  number of classes may differ); a clear error names the layers that differ.
  Fields the source run's config predates take this run's values.
  """
  workdir = run_dir.run_workdir(config.init_from)
  source_config = run_dir.load_config(workdir, defaults=config)
  source_model = model_lib.create_model(source_config.model)
  size = source_config.data.crop_size  # fc6's input depends on it.
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
  _, source, step = run_dir.restore_params(source_config, workdir, mesh,
                                           str(config.init_from_step))
  logging.info('Fine-tuning from %s, checkpoint of step %d: all layers but '
               'fc8 (re-initialised for %d classes; the source had %d).',
               workdir, step, config.model.num_classes,
               source_config.model.num_classes)
  return {layer: (params[layer] if layer == 'fc8' else source[layer])
          for layer in params}


# -------------------------------------------------------------- preemption
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


# -------------------------------------------------------------------- main
def train_and_evaluate(config, workdir: str) -> Tuple[Any, Dict[str, float]]:
  """Trains `config` in `workdir` (resuming if it holds checkpoints).

  Returns the final TrainState and the last validation metrics.
  """
  # ---------------------------------------------------------------- logging
  paths.check_config(config, workdir)  # Before anything is written.
  run_dir.write_config(workdir, config)
  # What the run opens is closed whatever happens, the last opened first,
  # each even if one before it fails.
  with contextlib.ExitStack() as opened:
    log = run_dir.MetricsLog(workdir)
    opened.callback(log.close)
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
    input_pipeline.check_config(config)
    steps_per_epoch = input_pipeline.steps_per_epoch(config)
    total_steps = config.total_steps or config.num_epochs * steps_per_epoch
    cadence = Cadence(config, steps_per_epoch, total_steps)
    logging.info('%d steps per epoch, %d steps (%.1f epochs) in all.',
                 steps_per_epoch, total_steps, total_steps / steps_per_epoch)

    # ------------------------------------------------------------------ model
    model = model_lib.create_model(config.model)
    tx = optimizer_lib.create_optimizer(config.optim)
    abstract_state, init = run_dir.abstract_train_state(config, model, tx, mesh)
    table, num_params = parameter_table(abstract_state.params)
    logging.info('Parameters (%s):\n%s', f'{num_params:,}', table)
    schedule = schedules.create_schedule(config, steps_per_epoch)

    # ------------------------------------------------------------- checkpoint
    manager = checkpoint_lib.create_manager(run_dir.checkpoint_dir(workdir),
                                            config.checkpoint)
    opened.callback(checkpoint_lib.close, manager)
    # In-flight saves complete, even on DivergenceError; a full disk is then a
    # clear CheckpointError (checkpoint.py).
    opened.callback(checkpoint_lib.wait_until_finished, manager)
    if manager.latest_step() is not None:
      # The newest readable checkpoint; unreadable newer ones are moved aside.
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
    run_outputs.write_communication(config, workdir, model, mesh)

    # ------------------------------------------------------------------ evals
    validate = Validation(config, workdir, mesh, eval_step, log)
    last_val = {}

    # ------------------------------------------------------------------- loop
    train_iter = input_pipeline.train_iterator(config, mesh,
                                               start_step=start_step)
    opened.callback(train_iter.close)  # Stops its prefetch thread.
    # A step's metrics are fetched while the next step runs (no per-step wait
    # for the device), except where the host acts on that step.
    pending = PendingMetrics(Progress(log, cadence, config.batch_size,
                                      start_step))
    learning_rate = None
    trace = ProfileTrace(config, workdir)
    opened.callback(trace.stop)
    try:
      with Preemption() as preemption:
        for step in range(start_step + 1, total_steps + 1):
          trace.before(step)
          batch = next(train_iter)
          if step == 1:
            live = live_units(model, mesh, state.params, batch['images'])
            logging.info('Live ReLU units at step 0 (firing on some image of '
                         'the first batch): fc6 %.1f%%, fc7 %.1f%%.',
                         100 * live['fc6'], 100 * live['fc7'])
          lr = schedule.learning_rate(step - 1)
          if lr != learning_rate:
            learning_rate = lr
            state = state.replace(opt_state=optimizer_lib.set_learning_rate(
                state.opt_state, learning_rate))
          state, metrics = train_step(state, batch)
          trace.after(step, metrics)
          plan = cadence.plan(step, preemption.stop_now(step))
          pending.push(step, metrics, plan.log)
          if plan.needs_metrics:
            pending.flush()

          val_error = None
          if plan.evaluate:
            last_val = validate(step, state.params)
            val_error = last_val['top1_error']
            schedule.observe(step, val_error)
          if plan.save:
            checkpoint_lib.save(manager, state,
                                {'schedule': schedule.state_dict()}, val_error)
          if plan.stop:
            logging.warning('Preempted: checkpoint of step %d saved; stopping.',
                            step)
            break
          if plan.final and validate.figures:
            t0 = time.time()
            run_outputs.final_figures(config, workdir, log.writer, step, model,
                                      mesh, state.params)
            logging.info('Figures written to %s (%.1fs).',
                         os.path.join(workdir, run_outputs.FIGURES),
                         time.time() - t0)
    except Exception as e:  # pylint: disable=broad-except
      lost = _lost_process(e, str(manager.directory))
      if lost is None:
        raise
      logging.error('%s', lost)
      raise lost from e
  return state, last_val
