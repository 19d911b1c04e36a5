"""A run directory (workdir): what a finished or running training run holds.

  <workdir>/config.json     the run's config (process 0 writes it at start)
  <workdir>/metrics.jsonl   one JSON line per logged step or evaluation
  <workdir>/checkpoints/    orbax checkpoints (alexnet_jax/checkpoint.py)
  <workdir>/events.out.*    TensorBoard scalars and images

Training writes them (`write_config`, `MetricsLog`, the checkpoint manager);
evaluation, fine-tuning, sweeps and reports read them back through this
module: the saved config, the metrics history, the step of a checkpoint
('latest', 'best' or a number) and its parameters restored onto any mesh.
"""

import copy
import functools
import json
from typing import Any, Dict, List, Optional, Tuple

from absl import logging
from clu import metric_writers
import jax
import ml_collections

from alexnet_jax import checkpoint as checkpoint_lib
from alexnet_jax import model as model_lib
from alexnet_jax import optimizer as optimizer_lib
from alexnet_jax import paths
from alexnet_jax import train_step as train_step_lib

CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.jsonl'
CHECKPOINTS = 'checkpoints'


def is_writer() -> bool:
  """Process 0 writes a run's shared files; every process reads them."""
  return jax.process_index() == 0


# ----------------------------------------------------------------- config
def write_config(workdir: str, config) -> None:
  if is_writer():
    paths.makedirs(workdir)
    paths.write_text(paths.join(workdir, CONFIG_FILE),
                     config.to_json_best_effort(indent=2, sort_keys=True))


def _tuples(node):
  """JSON lists back to the config's tuples (ConfigDict keeps dicts)."""
  if isinstance(node, dict):
    return {k: _tuples(v) for k, v in node.items()}
  if isinstance(node, list):
    return tuple(_tuples(v) for v in node)
  return node


def _fill_missing(config, defaults, path=''):
  """Adds fields newer than the run (from `defaults`) to `config`."""
  added = []
  for key, value in defaults.items():
    if key not in config:
      config[key] = copy.deepcopy(value)
      added.append(path + key)
    elif isinstance(value, ml_collections.ConfigDict) and isinstance(
        config[key], ml_collections.ConfigDict):
      added += _fill_missing(config[key], value, f'{path}{key}.')
  return added


def _drop_unknown(config, defaults, path=''):
  """Removes fields `defaults` no longer has (speed switches retired since
  the run, e.g. model.conv_kernel_grad)."""
  removed = []
  for key in list(config.keys()):
    if key not in defaults:
      del config[key]
      removed.append(path + key)
    elif isinstance(defaults[key], ml_collections.ConfigDict) and isinstance(
        config[key], ml_collections.ConfigDict):
      removed += _drop_unknown(config[key], defaults[key], f'{path}{key}.')
  return removed


def load_config(workdir: str, defaults=None,
                overrides: Optional[Dict[str, Any]] = None
                ) -> ml_collections.ConfigDict:
  """The run's config.json as a ConfigDict, with dotted `overrides`.

  Fields the run predates are taken from `defaults` (a ConfigDict, e.g.
  configs/alexnet.py's `get_config()`), and named in the log.
  """
  path = paths.join(paths.check(workdir, '--workdir'), CONFIG_FILE)
  if not paths.exists(path):
    raise FileNotFoundError(
        f'{path} does not exist: --workdir must be the directory a training '
        'run wrote (python launch.py --config=... --workdir=DIR writes '
        f'DIR/{CONFIG_FILE} and DIR/{CHECKPOINTS}/).')
  config = ml_collections.ConfigDict(_tuples(json.loads(paths.read_text(
      path))))
  if defaults is not None:
    added = _fill_missing(config, defaults)
    removed = _drop_unknown(config, defaults)
    if added:
      logging.info('%s predates config fields %s: using their defaults.',
                   workdir, ', '.join(added))
    if removed:
      logging.info('%s has config fields this version no longer has, '
                   'ignored: %s.', workdir, ', '.join(removed))
  if overrides:
    config.lock()  # A misspelt field fails instead of being added.
    config.update_from_flattened_dict(dict(overrides))
    config.unlock()
  return config


def changed_sections(config, workdir: str) -> List[str]:
  """Top-level config sections in which the run saved in `workdir` differs
  from `config` ([] when it saved no config)."""
  path = paths.join(workdir, CONFIG_FILE)
  if not paths.exists(path):
    return []
  old = json.loads(paths.read_text(path))
  new = json.loads(config.to_json_best_effort(indent=2, sort_keys=True))
  return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


# ---------------------------------------------------------------- metrics
class MetricsLog:
  """TensorBoard (clu's asynchronous writer) plus metrics.jsonl, written by
  process 0. (The trainer logs its own progress lines: no clu logging
  writer, which would repeat every scalar in the log.)"""

  def __init__(self, workdir):
    self.writer = metric_writers.AsyncMultiWriter(
        [metric_writers.SummaryWriter(workdir)] if is_writer() else [])
    self.path = paths.join(workdir, METRICS_FILE)
    if is_writer() and paths.exists(self.path):
      text = paths.read_text(self.path)
      if text and not text.endswith('\n'):
        # A line cut off by a kill or a full disk stays a line of its own
        # (read_metrics skips it), not glued to the next record.
        paths.append_text(self.path, '\n')

  def write(self, step: int, split: str, scalars: Dict[str, float]):
    self.writer.write_scalars(step, {f'{split}/{k}': v
                                     for k, v in scalars.items()})
    if is_writer():
      paths.append_text(self.path, json.dumps(
          {'step': step, 'split': split, **scalars}) + '\n')

  def close(self):
    self.writer.flush()
    self.writer.close()


def read_metrics(workdir: str) -> Dict[str, Dict[int, Dict[str, Any]]]:
  """{split: {step: record}} from metrics.jsonl ('train', 'val', ...; the
  last record of a step wins: a resumed run logs some steps again). A line
  that does not parse (cut off by a kill or a full disk) is skipped with a
  warning."""
  path = paths.join(workdir, METRICS_FILE)
  if not paths.exists(path):
    raise FileNotFoundError(f'{path} does not exist: {workdir} is not a '
                            'training run (or it has not logged yet).')
  out = {'train': {}, 'val': {}}
  for number, line in enumerate(paths.read_text(path).splitlines(), 1):
    try:
      r = json.loads(line)
      out.setdefault(r['split'], {})[int(r['step'])] = r
    except (ValueError, KeyError, TypeError) as e:
      logging.warning('%s line %d skipped (%s: %s): %.80r', path, number,
                      type(e).__name__, e, line)
  return out


def _scalar_value(value) -> Optional[float]:
  """The scalar of a TensorBoard summary value, or None if it is not one:
  a simple_value (TF1 style) or a rank-0 tensor of the 'scalars' plugin (clu
  and tf.summary write these)."""
  kind = value.WhichOneof('value')
  if kind == 'simple_value':
    return float(value.simple_value)
  if kind == 'tensor' and value.metadata.plugin_data.plugin_name == 'scalars':
    from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
    return float(tensor_util.make_ndarray(value.tensor))
  return None


def read_curves(workdir: str) -> Dict[str, List[Tuple[int, float]]]:
  """{tag: [(step, value)]} from the workdir's TensorBoard event files, or
  from metrics.jsonl when there are none."""
  history: Dict[str, Dict[int, float]] = {}
  files = sorted(str(f) for f in paths.path(workdir).glob(
      'events.out.tfevents.*'))
  if files:
    from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
    for path in files:
      for event in event_file_loader.EventFileLoader(path).Load():
        for value in event.summary.value:
          v = _scalar_value(value)
          if v is not None:  # images, text and histograms are skipped
            history.setdefault(value.tag, {})[int(event.step)] = v
  else:
    for split, records in read_metrics(workdir).items():
      for step, row in records.items():
        for name, v in row.items():
          if name not in ('step', 'split') and isinstance(v, (int, float)):
            history.setdefault(f'{split}/{name}', {})[step] = v
  return {tag: sorted(points.items()) for tag, points in history.items()}


def val_errors(workdir: str) -> Dict[int, float]:
  """{step: validation top-1 error} of the run ({} before it logged)."""
  try:
    val = read_metrics(workdir)['val']
  except FileNotFoundError:
    return {}
  return {s: float(r['top1_error']) for s, r in val.items()
          if 'top1_error' in r}


# ------------------------------------------------------------ checkpoints
def checkpoint_dir(workdir: str) -> str:
  return paths.join(workdir, CHECKPOINTS)


def run_workdir(path: str) -> str:
  """The run directory of `path`, a workdir or its checkpoints/ (as given
  to config.init_from); an error if it holds no checkpoints."""
  path = paths.check(path, '--config.init_from').rstrip('/')
  if paths.name(path) == CHECKPOINTS:
    path = str(paths.path(path).parent)
  if not paths.path(checkpoint_dir(path)).is_dir():
    raise FileNotFoundError(
        f'{path!r} holds no {CHECKPOINTS}/: give the workdir of a training '
        f'run that saved a checkpoint (or its {CHECKPOINTS}/ directory).')
  return path


def checkpoint_steps(manager, which: str = 'latest',
                     errors: Optional[Dict[int, float]] = None) -> List[int]:
  """The steps checkpoint `which` may be, in the order to try them when one
  cannot be read: 'latest', newest first; 'best', by the lowest validation
  top-1 error measured at a kept checkpoint's step (from the metrics saved
  with it or else `errors`, {step: error}, e.g. `val_errors(workdir)`), the
  later first on ties; a step number, just that one.
  """
  steps = list(manager.all_steps())
  where = str(manager.directory)
  if not steps:
    raise FileNotFoundError(
        f'No checkpoint in {where}: the run saved none yet (train first, or '
        'check --workdir).')
  which = str(which)
  if which == 'latest':
    return sorted(steps, reverse=True)
  if which == 'best':
    scored = {}
    for s in steps:
      saved = checkpoint_lib.saved_val_error(manager, s)
      if saved is not None:
        scored[s] = saved
      elif errors and s in errors:
        scored[s] = errors[s]
    if not scored:
      raise ValueError(
          f'No checkpoint in {where} has a validation error measured at its '
          f'step (steps {steps}), so none is "best": use '
          '--checkpoint=latest or a step number.')
    return sorted(scored, key=lambda s: (scored[s], -s))
  if not which.isdigit():
    raise ValueError(f'--checkpoint={which!r}: use latest, best or a step '
                     f'number ({steps} in {where}).')
  if int(which) not in steps:
    raise FileNotFoundError(
        f'No checkpoint of step {which} in {where}; it holds steps {steps}.')
  return [int(which)]


def abstract_train_state(config, model, tx, mesh):
  """The TrainState's shapes for `config` (nothing computed), and the
  function that initialises it."""
  init = functools.partial(train_step_lib.create_train_state, model, tx, mesh,
                           jax.random.PRNGKey(config.seed),
                           config.data.crop_size)
  return jax.eval_shape(init), init


def restore_params(config, workdir: str, mesh, checkpoint: str = 'latest'
                   ) -> Tuple[Any, Any, int]:
  """(model, params, step) of the run's checkpoint `checkpoint` ('latest',
  'best' or a step number), placed on `mesh`; `config` is the run's. An
  unreadable 'latest' or 'best' falls back to the next readable one in
  checkpoint_steps's order (checkpoint.restore_readable)."""
  directory = checkpoint_dir(workdir)
  if not paths.path(directory).is_dir():
    raise FileNotFoundError(
        f'No {CHECKPOINTS}/ in {workdir}: the run saved no checkpoint (train '
        'it first, or check --workdir).')
  model = model_lib.create_model(config.model)
  abstract_state, _ = abstract_train_state(
      config, model, optimizer_lib.create_optimizer(config.optim), mesh)
  # Read-only: the run may still be training; its checkpoints are its own.
  manager = checkpoint_lib.create_manager(directory, config.checkpoint,
                                          read_only=True)
  try:
    steps = checkpoint_steps(manager, checkpoint, val_errors(workdir)
                             if str(checkpoint) == 'best' else None)
    exact = str(checkpoint).isdigit()
    state, _, step = checkpoint_lib.restore_readable(
        manager, abstract_state, mesh, step=steps[0] if exact else None,
        candidates=None if exact else steps, read_only=True)
  finally:
    checkpoint_lib.close(manager)
  return model, state.params, step
