"""Checkpoints: orbax-checkpoint's CheckpointManager in `<workdir>/checkpoints`.

A checkpoint holds everything a resumed run needs to continue exactly as the
uninterrupted run would: the TrainState (step, params, momentum, learning
rate, dropout key) and, as JSON, the schedule's state. The data iterator needs
no state of its own: its batches are a function of (seed, step).

- Saves are asynchronous (training goes on while the arrays are written) and
  atomic (orbax writes to a temporary directory and renames it when done), so
  a kill -9 leaves the previous checkpoint intact.
- Kept: the last `keep` checkpoints plus the `keep_best` with the lowest
  validation top-1 error (checkpoints saved without an evaluation are only
  kept as "last"). The error is saved with the checkpoint (orbax writes a
  checkpoint's metrics only when `best_fn` is set), so a resumed run still
  knows which one is best.
- Written collectively: every process calls `save`, each writes its shards.
- Restored onto any mesh: the arrays are read straight into the shardings of
  the new mesh (a run trained on 2 towers x 2 data devices restores on one).
"""

from typing import Any, Dict, Optional, Tuple

from etils import epath
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from alexnet_jax import train_step as train_step_lib

VAL_ERROR = 'val_top1_error'


def create_manager(directory, checkpoint_config) -> ocp.CheckpointManager:
  """A CheckpointManager for `config.checkpoint` (configs/alexnet.py)."""
  c = checkpoint_config
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


def save(manager, state, extra: Dict[str, Any],
         val_error: Optional[float] = None) -> None:
  """Starts saving `state` (and JSON-able `extra`) at its step, collectively.

  `val_error`: the validation top-1 error just measured on this state, if
  any; it ranks the checkpoint for keep_best.
  """
  step = int(jax.device_get(state.step))
  metrics = None if val_error is None else {VAL_ERROR: float(val_error)}
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)),
               metrics=metrics, force=True)


def abstract_target(abstract_state, mesh):
  """ShapeDtypeStructs of a TrainState laid out on `mesh`."""
  shardings = train_step_lib.state_shardings(mesh, abstract_state)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract_state, shardings)


def restore(manager, abstract_state, mesh, step: Optional[int] = None
            ) -> Tuple[Any, Dict[str, Any]]:
  """(state, extra) of checkpoint `step` (default: latest), onto `mesh`.

  abstract_state: the TrainState's shapes, e.g. `jax.eval_shape` of its
  initialiser; the mesh may differ from the one that saved it.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'No checkpoint in {manager.directory}.')
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_target(abstract_state, mesh)),
      extra=ocp.args.JsonRestore()))
  return restored.state, restored.extra
