"""Checkpoints: orbax-checkpoint's CheckpointManager in `<workdir>/checkpoints`.

A checkpoint holds everything a resumed run needs to continue exactly as the
uninterrupted run would: the TrainState (step, params, momentum, learning
rate, dropout key) and, as JSON, the schedule's state. The data iterator needs
no state of its own: its batches are a function of (seed, step).

- Saves are asynchronous (training goes on while the arrays are written) and
  atomic (orbax writes to a temporary directory and renames it when done; in
  a gs:// bucket, where renames are copies, it writes the step directory and
  then a commit_success.txt that marks it finished), so a kill -9 leaves the
  previous checkpoint intact.
- Kept: the last `keep` checkpoints plus the `keep_best` with the lowest
  validation top-1 error (checkpoints saved without an evaluation are only
  kept as "last"). The error is saved with the checkpoint (orbax writes a
  checkpoint's metrics only when `best_fn` is set), so a resumed run still
  knows which one is best.
- Written collectively: every process calls `save`, each writes its shards.
- Restored onto any mesh: the arrays are read straight into the shardings of
  the new mesh (a run trained on 2 towers x 2 data devices restores on one).

Damage (a failing disk, a full disk, a half-copied workdir):
- A checkpoint that cannot be read (truncated or missing array files, bad
  metadata, a missing item) is skipped: `restore` falls back to the next
  candidate, and once an older one has been read the unreadable ones are
  moved aside, never deleted, to `<dir>/corrupt-<step>-<UTC time>` (a name
  orbax treats neither as a step nor as a temporary directory to clean).
  When none can be read, nothing is moved (a changed config fails every step
  the same way) and `CheckpointError` lists each step and why. Every process
  restores the same step: they agree on each candidate before keeping it.
- A checkpoint whose saved metrics are unreadable would stop orbax's
  CheckpointManager from starting at all; `create_manager` moves it aside.
- Bit flips inside array data are not detected (orbax keeps no checksums).
- A full disk stops the run with `CheckpointError` (free space, then rerun
  the same command: it resumes from the latest checkpoint, which is intact):
  `save` checks the free space first, and a write that still fails for lack
  of space (raised by orbax from `save`, or later, for an asynchronous save,
  from `wait_until_finished` or `close`: call this module's) is translated.
"""

import datetime
import errno
import json
import os
import re
import shutil
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from alexnet_jax import paths
from alexnet_jax import train_step as train_step_lib

VAL_ERROR = 'val_top1_error'

# Unreadable steps are renamed to CORRUPT_PREFIX + '<step>-<UTC time>'.
CORRUPT_PREFIX = 'corrupt-'
# A save needs the size of the newest step on disk (or, before the first, the
# arrays' bytes) times (1 + SPACE_MARGIN) plus SPACE_MARGIN_BYTES.
SPACE_MARGIN = 0.1
SPACE_MARGIN_BYTES = 1 << 20

_STEP_NAME = re.compile(r'^(0|[1-9]\d*)$')  # orbax's step directories.
_REASON_BYTES = 1024  # Per process, when the processes compare notes.
# The step each manager is saving, for the error of a failed async save.
_saving = weakref.WeakKeyDictionary()


class CheckpointError(RuntimeError):
  """A checkpoint could not be read or written; the message says what to do."""


# --------------------------------------------------------------- processes
def _agree(ok: bool, reason: str = '') -> List[Tuple[bool, str]]:
  """[(ok, reason)] of every process, in process order (a collective)."""
  row = np.zeros(1 + _REASON_BYTES, np.uint8)
  row[0] = bool(ok)
  text = reason.encode('utf-8')[:_REASON_BYTES]
  row[1:1 + len(text)] = np.frombuffer(text, np.uint8)
  if jax.process_count() == 1:
    rows = row[None]
  else:
    rows = np.asarray(multihost_utils.process_allgather(row)).reshape(
        jax.process_count(), -1)
  return [(bool(r[0]), bytes(r[1:]).rstrip(b'\0').decode('utf-8', 'replace'))
          for r in rows]


def _from_process_0(steps: Sequence[int]) -> List[int]:
  """Process 0's list of steps, on every process (a collective)."""
  if jax.process_count() == 1:
    return [int(s) for s in steps]
  n = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
  if not n:
    return []
  mine = np.zeros(n, np.int32)
  if jax.process_index() == 0:
    mine[:] = steps
  return [int(s) for s in multihost_utils.broadcast_one_to_all(mine)]


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _summary(e: BaseException) -> str:
  """'Type: first line' of an exception and of its cause."""
  def one(x):
    lines = str(x).strip().splitlines()
    first = lines[0] if lines else ''
    for spec in (' See full TensorStore details', ' [tensorstore_spec'):
      first = first.split(spec)[0]  # TensorStore's long spec of the array.
    return f'{type(x).__name__}: {first[:500]}'
  cause = e.__cause__
  return one(e) + (f' (caused by {one(cause)})' if cause is not None else '')


def _combined(results: List[Tuple[bool, str]]) -> str:
  if len(results) == 1:
    return results[0][1]
  return '; '.join(f'process {i}: {r}' for i, (ok, r) in enumerate(results)
                   if not ok)


# ----------------------------------------------------------- moving aside
def move_aside(directory, step: int, reason: str) -> epath.Path:
  """Renames `<directory>/<step>` to `<directory>/corrupt-<step>-<UTC time>`
  (kept, never deleted) and says so at WARNING. One process calls it."""
  directory = epath.Path(directory)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime(
      '%Y%m%dT%H%M%SZ')
  target = directory / f'{CORRUPT_PREFIX}{step}-{stamp}'
  n = 1
  while target.exists():  # The same step can go bad twice in a second.
    n += 1
    target = directory / f'{CORRUPT_PREFIX}{step}-{stamp}-{n}'
  (directory / str(step)).rename(target)
  logging.warning('Checkpoint of step %d moved aside to %s (kept, not '
                  'deleted; it is never tried again): %s', step, target,
                  reason)
  return target


def _try_move_aside(directory, step: int, reason: str) -> None:
  try:
    move_aside(directory, step, reason)
  except Exception as e:  # pylint: disable=broad-except  # Others wait.
    logging.error('Could not move the unreadable checkpoint of step %d in %s '
                  'aside (%s); move it out of the way by hand. It was: %s',
                  step, directory, _summary(e), reason)


def _step_dirs(directory: epath.Path) -> Dict[int, epath.Path]:
  """{step: path} of the finished step directories, as orbax finds them."""
  if not directory.exists():
    return {}
  return {int(p.name): p for p in directory.iterdir()
          if _STEP_NAME.match(p.name) and p.is_dir()}


def _val_error(metrics) -> Optional[float]:
  """The validation error in a checkpoint's saved metrics, if a number."""
  value = metrics.get(VAL_ERROR) if isinstance(metrics, dict) else None
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return float(value)


def _metrics_problem(step_dir: epath.Path) -> Optional[str]:
  """Why orbax could not use the metrics saved with a step (None: it can)."""
  path = step_dir / 'metrics' / 'metrics'
  try:
    if not path.exists():
      return None  # Saved without an evaluation: orbax reads no metrics.
    metrics = json.loads(path.read_text())
  except Exception as e:  # pylint: disable=broad-except
    return f'its metrics file {path} is unreadable: {_summary(e)}'
  if _val_error(metrics) is None:
    return (f'its metrics file {path} holds no number {VAL_ERROR!r} '
            f'({str(metrics)[:100]})')
  return None


def saved_val_error(manager, step: int) -> Optional[float]:
  """The validation error saved with checkpoint `step`, or None (saved
  without an evaluation, or unreadable: said at WARNING)."""
  try:
    saved = manager.metrics(step)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('Checkpoint of step %d in %s: its saved metrics are '
                    'unreadable (%s).', step, manager.directory, _summary(e))
    return None
  return _val_error(saved)


def _move_aside_bad_metrics(directory) -> None:
  """Process 0 moves aside every step whose metrics would stop orbax's
  CheckpointManager from starting (it reads them all when constructed); the
  others wait for it."""
  if jax.process_index() == 0:
    try:
      steps = sorted(_step_dirs(epath.Path(directory)).items())
    except Exception as e:  # pylint: disable=broad-except  # Others wait.
      logging.error('Could not list %s to check its checkpoints\' metrics: '
                    '%s', directory, _summary(e))
      steps = []
    for step, path in steps:
      problem = _metrics_problem(path)
      if problem:
        _try_move_aside(directory, step, problem)
  _barrier('alexnet_jax.checkpoint: metrics checked')


# ---------------------------------------------------------------- manager
def create_manager(directory, checkpoint_config, read_only: bool = False
                   ) -> ocp.CheckpointManager:
  """A CheckpointManager for `config.checkpoint` (configs/alexnet.py).

  Steps whose saved metrics are unreadable are moved aside first (orbax's
  constructor would fail on them). `read_only`: for reading another run's
  checkpoints (evaluation, fine-tuning), which may still be training:
  nothing is moved, cleaned up, deleted or written, and the saved metrics
  are read only when asked for (`saved_val_error`).
  """
  if read_only:
    return ocp.CheckpointManager(epath.Path(directory), options=(
        ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0,
                                     create=False,
                                     lightweight_initialize=True)))
  c = checkpoint_config
  _move_aside_bad_metrics(directory)
  preserve = [policies.LatestN(n=c.keep)]
  if c.keep_best:
    preserve.append(policies.BestN(
        get_metric_fn=lambda m: -m[VAL_ERROR],  # Higher is better.
        n=c.keep_best, keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policies.AnyPreservationPolicy(preserve),
      # best_fn makes orbax write `metrics` into each checkpoint (and read
      # them back on restart); with a preservation_policy it chooses nothing
      # to delete, the policies above do.
      best_fn=lambda m: m[VAL_ERROR], best_mode='min',
      enable_async_checkpointing=c.async_save,
      create=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(epath.Path(directory), options=options)


# ------------------------------------------------------------------- save
def _bytes_on_disk(path) -> int:
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      try:
        st = os.lstat(os.path.join(root, name))
      except OSError:
        continue
      total += max(st.st_size, st.st_blocks * 512)
  return total


def _human(n: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if abs(n) < 1024 or unit == 'GiB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1024
  return f'{n:.1f} TiB'


def space_needed(directory, state) -> int:
  """Bytes a new checkpoint of `state` needs in local `directory`: the size
  on disk of the newest step there (a step is a full copy, and old steps are
  deleted only after the new one is complete), or else the arrays' bytes;
  plus a margin."""
  steps = _step_dirs(epath.Path(directory))
  if steps:
    base = _bytes_on_disk(steps[max(steps)])
  else:
    base = sum(int(getattr(x, 'nbytes', 0)) for x in jax.tree.leaves(state))
  return int(base * (1 + SPACE_MARGIN)) + SPACE_MARGIN_BYTES


def _free_bytes(directory) -> int:
  path = os.path.abspath(str(directory))
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free


def _advice(manager) -> str:
  steps = sorted(_step_dirs(epath.Path(manager.directory)))
  kept = (f'the checkpoints already there (steps {steps}) are intact'
          if steps else 'no earlier checkpoint is there')
  return (f'Training stops here rather than go on without a checkpoint to '
          f'return to. Free space on that disk (or move the workdir to a disk '
          f'with room and point --workdir there), then rerun the same '
          f'command: {kept}, and the run resumes from the latest of them '
          '(an unfinished step is removed when it restarts).')


def _check_space(manager, state, step: int) -> None:
  """Raises CheckpointError on every process if any lacks the space."""
  directory = manager.directory
  problem = ''
  if not paths.is_remote(directory):
    need, free = space_needed(directory, state), _free_bytes(directory)
    if free < need:
      problem = (f'Not enough disk space to save the checkpoint of step '
                 f'{step} in {directory}: it needs about {_human(need)} '
                 f'({need} bytes), {_human(free)} ({free} bytes) are free.')
  results = _agree(not problem, problem)
  if not all(ok for ok, _ in results):
    raise CheckpointError(
        f'{problem or _combined(results)} {_advice(manager)}')


def _disk_full(e: BaseException) -> bool:
  """Whether `e` (or an exception it chains) says the disk or quota is full."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    text = str(e)
    if ('No space left on device' in text or 'Disk quota exceeded' in text
        or f"os_error_code='{errno.ENOSPC}'" in text
        or f"os_error_code='{errno.EDQUOT}'" in text
        or ('RESOURCE_EXHAUSTED' in text and 'writing' in text.lower())):
      return True
    e = e.__cause__ or e.__context__
  return False


def _full_disk_error(manager, e: BaseException) -> CheckpointError:
  step = _saving.get(manager)
  what = ('The checkpoint' if step is None
          else f'The checkpoint of step {step}')
  free = (f' ({_human(_free_bytes(manager.directory))} free now)'
          if not paths.is_remote(manager.directory) else '')
  return CheckpointError(
      f'{what} could not be written to {manager.directory}: the disk is '
      f'full{free}. {_advice(manager)} The error: {_summary(e)}')


def _translating(manager, call, *args, **kwargs):
  try:
    return call(*args, **kwargs)
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    if _disk_full(e):
      raise _full_disk_error(manager, e) from e
    raise


def wait_until_finished(manager) -> None:
  """manager.wait_until_finished(); a full disk -> CheckpointError."""
  _translating(manager, manager.wait_until_finished)


def close(manager) -> None:
  """manager.close() (waits for saves); a full disk -> CheckpointError."""
  _translating(manager, manager.close)


def save(manager, state, extra: Dict[str, Any],
         val_error: Optional[float] = None, check_space: bool = True) -> None:
  """Starts saving `state` (and JSON-able `extra`) at its step, collectively.

  `val_error`: the validation top-1 error just measured on this state, if
  any; it ranks the checkpoint for keep_best. `check_space`: first wait for
  the previous save and check that the local disk has room for this one.
  Raises CheckpointError if the disk is full (now, or when the previous
  asynchronous save failed for lack of space).
  """
  step = int(jax.device_get(state.step))
  metrics = None if val_error is None else {VAL_ERROR: float(val_error)}
  if check_space:
    wait_until_finished(manager)  # orbax's save waits for it too.
    _check_space(manager, state, step)
  _saving[manager] = step
  _translating(manager, manager.save, step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)),
               metrics=metrics, force=True)


# ---------------------------------------------------------------- restore
def abstract_target(abstract_state, mesh):
  """ShapeDtypeStructs of a TrainState laid out on `mesh`."""
  shardings = train_step_lib.state_shardings(mesh, abstract_state)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract_state, shardings)


def _read(path: epath.Path, target):
  """(state, extra) of one step directory, read by the items' handlers
  directly: no barrier inside, so each process may fail on its own."""
  handler = ocp.CompositeCheckpointHandler()
  try:
    restored = handler.restore(path, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        extra=ocp.args.JsonRestore()))
    state = jax.block_until_ready(restored.state)
    return state, restored.extra
  finally:
    handler.close()


def restore_readable(manager, abstract_state, mesh,
                     step: Optional[int] = None,
                     candidates: Optional[Sequence[int]] = None,
                     read_only: bool = False
                     ) -> Tuple[Any, Dict[str, Any], int]:
  """(state, extra, step) of the first readable checkpoint, onto `mesh`.

  Tried in order: `step` alone if given (no fallback), else `candidates`
  (e.g. the steps ordered best first), else every step, newest first. Each
  unreadable one is logged at WARNING with the reason; once a later candidate
  reads, those before it are moved aside (`move_aside`) and the manager
  reloaded, unless `read_only` (another run's checkpoints, read with a
  read-only manager: they are only skipped). Collective: every process reads
  the same candidate and keeps it only if all could (process 0's list of
  candidates is used).

  Raises CheckpointError when none reads (nothing is then moved: the cause
  may be the run's config rather than the files), FileNotFoundError when
  there is no checkpoint to try.
  """
  directory = epath.Path(manager.directory)
  if step is not None:
    order = [int(step)]
  elif candidates is not None:
    order = [int(s) for s in candidates]
  else:
    order = sorted(manager.all_steps(), reverse=True)
  order = _from_process_0(order)
  if not order:
    raise FileNotFoundError(f'No checkpoint in {directory}.')
  if step is not None and not all(
      ok for ok, _ in _agree((directory / str(step)).is_dir())):
    raise FileNotFoundError(
        f'No checkpoint of step {step} in {directory}; it holds steps '
        f'{sorted(manager.all_steps())}.')
  target = abstract_target(abstract_state, mesh)
  failed: List[Tuple[int, str]] = []
  for s in order:
    path = directory / str(s)
    result, reason = None, ''
    try:
      if not path.is_dir():
        raise FileNotFoundError(f'{path} does not exist')
      result = _read(path, target)
    except Exception as e:  # pylint: disable=broad-except
      reason = _summary(e)  # Its type varies with what is damaged.
    results = _agree(result is not None, reason)
    if all(ok for ok, _ in results):
      break
    failed.append((s, _combined(results)))
    logging.warning('Checkpoint of step %d in %s cannot be read: %s', s,
                    directory, failed[-1][1])
  else:
    listing = '\n'.join(f'  step {s}: {why}' for s, why in failed)
    first = order[0]
    by_hand = f'mv {directory}/{first} {directory}/{CORRUPT_PREFIX}{first}'
    if step is not None:
      raise CheckpointError(
          f'The checkpoint of step {step} in {directory} cannot be read (no '
          f'other step is tried when a step is asked for):\n{listing}\n'
          'If the config or code changed since it was saved, use the run\'s '
          'own config; otherwise ask for another step (the directory holds '
          f'{sorted(manager.all_steps())}), or move this one out of the way '
          f'by hand ({by_hand}).')
    raise CheckpointError(
        f'No checkpoint in {directory} can be read; tried, in this order:\n'
        f'{listing}\nNone was moved aside: nothing shows that the files '
        'rather than this run\'s config are at fault. If the config or code '
        'changed since they were saved, rerun with the run\'s own config. If '
        'they are damaged, start afresh with a new --workdir, or move the '
        f'damaged step directories out of the way by hand (e.g. {by_hand}) '
        'and rerun: it resumes from the newest one left.')
  state, extra = result
  if failed and read_only:
    logging.warning('Read the checkpoint of step %d from %s instead of the '
                    'unreadable step(s) %s (left in place: this run only '
                    'reads them).', s, directory, [bad for bad, _ in failed])
  elif failed:
    if jax.process_index() == 0:
      for bad, why in failed:
        if (directory / str(bad)).is_dir():
          _try_move_aside(directory, bad, why)
    _barrier('alexnet_jax.checkpoint: moved aside')
    manager.reload()
    logging.warning('Restored the checkpoint of step %d from %s instead of '
                    'the unreadable step(s) %s.', s, directory,
                    [bad for bad, _ in failed])
  else:
    logging.info('Restored the checkpoint of step %d from %s.', s, directory)
  return state, extra, s


def restore(manager, abstract_state, mesh, step: Optional[int] = None,
            candidates: Optional[Sequence[int]] = None
            ) -> Tuple[Any, Dict[str, Any]]:
  """(state, extra) of checkpoint `step` (default: the newest readable one),
  onto `mesh`; see `restore_readable`.

  abstract_state: the TrainState's shapes, e.g. `jax.eval_shape` of its
  initialiser; the mesh may differ from the one that saved it.
  """
  state, extra, _ = restore_readable(manager, abstract_state, mesh, step,
                                     candidates)
  return state, extra
