"""Learning-rate schedules: the paper's plateau rule, fixed steps, warm-up.

The paper (§5): "The heuristic which we followed was to divide the learning
rate by 10 when the validation error rate stopped improving with the current
learning rate ... reduced three times prior to termination."

A schedule gives the learning rate of the next step from the step number and
its own state; the trainer writes it into the optimizer state between steps
(`optimizer.set_learning_rate`), so nothing recompiles. The plateau rule's
state changes only at evaluations and is a small dict of numbers, checkpointed
with the train state so that a resumed run takes the same decisions.

  kind='plateau'   lr = base * factor**drops; a drop after `patience`
                   evaluations without a min_delta improvement of the best
                   validation top-1 error, at most `max_drops` times.
  kind='steps'     lr = base * factor**(number of boundaries passed),
                   boundaries in epochs.
  kind='constant'  lr = base.
  warmup_epochs    linear ramp from base/warmup_steps to base over the first
                   warmup_epochs (any kind).
"""

import dataclasses
import math
from typing import Any, Dict, Optional, Sequence

from absl import logging

KINDS = ('plateau', 'steps', 'constant')


@dataclasses.dataclass
class PlateauState:
  """What the plateau rule remembers between evaluations."""
  best_error: float = math.inf
  evals_since_best: int = 0
  drops: int = 0
  # Learning rate divided at these steps (kept in checkpoints).
  drop_steps: Sequence[int] = ()


@dataclasses.dataclass
class Schedule:
  """`learning_rate(step)` and, for 'plateau', `observe(step, val_error)`."""
  kind: str
  base_learning_rate: float
  steps_per_epoch: int
  factor: float = 0.1
  patience: int = 1
  min_delta: float = 0.0
  max_drops: int = 3
  boundaries_epochs: Sequence[float] = ()
  warmup_epochs: float = 0.0
  state: PlateauState = dataclasses.field(default_factory=PlateauState)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'config.schedule.kind={self.kind!r} is unknown; use '
                       f'one of {", ".join(KINDS)}.')

  @property
  def warmup_steps(self) -> int:
    return int(round(self.warmup_epochs * self.steps_per_epoch))

  def learning_rate(self, step: int) -> float:
    """Learning rate of update number `step` + 1 (state.step == step)."""
    if self.kind == 'plateau':
      lr = self.base_learning_rate * self.factor**self.state.drops
    elif self.kind == 'steps':
      passed = sum(step >= round(b * self.steps_per_epoch)
                   for b in self.boundaries_epochs)
      lr = self.base_learning_rate * self.factor**passed
    else:
      lr = self.base_learning_rate
    if step < self.warmup_steps:
      lr *= (step + 1) / self.warmup_steps
    return lr

  def observe(self, step: int, val_error: float) -> bool:
    """Feeds one validation error to the plateau rule; True if lr dropped."""
    if self.kind != 'plateau':
      return False
    s = self.state
    if val_error < s.best_error - self.min_delta:
      s.best_error, s.evals_since_best = float(val_error), 0
      return False
    s.evals_since_best += 1
    if s.evals_since_best < self.patience or s.drops >= self.max_drops:
      return False
    s.drops += 1
    s.evals_since_best = 0
    s.drop_steps = tuple(s.drop_steps) + (int(step),)
    logging.info('Validation error %.4f has not improved on %.4f for %d '
                 'evaluations: learning rate divided by %g (drop %d of %d) '
                 'at step %d.', val_error, s.best_error, self.patience,
                 1 / self.factor, s.drops, self.max_drops, step)
    return True

  def state_dict(self) -> Dict[str, Any]:
    """JSON-able state (inf is stored as None)."""
    s = dataclasses.asdict(self.state)
    s['best_error'] = None if math.isinf(s['best_error']) else s['best_error']
    s['drop_steps'] = list(s['drop_steps'])
    return s

  def load_state_dict(self, d: Optional[Dict[str, Any]]):
    if not d:
      return
    best = d['best_error']
    self.state = PlateauState(
        best_error=math.inf if best is None else float(best),
        evals_since_best=int(d['evals_since_best']), drops=int(d['drops']),
        drop_steps=tuple(d['drop_steps']))


def create_schedule(config, steps_per_epoch: int) -> Schedule:
  """The schedule of `config.schedule` on top of `config.optim.learning_rate`."""
  s = config.schedule
  return Schedule(
      kind=s.kind, base_learning_rate=config.optim.learning_rate,
      steps_per_epoch=steps_per_epoch, factor=s.factor, patience=s.patience,
      min_delta=s.min_delta, max_drops=s.max_drops,
      boundaries_epochs=tuple(s.boundaries_epochs),
      warmup_epochs=s.warmup_epochs)
