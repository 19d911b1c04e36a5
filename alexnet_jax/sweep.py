"""The paper's ablations as experiments: a sweep of config variants, one
workdir each, run one after another (`python sweep.py --root=DIR`).

Each variant is the demo (`demo` in configs/alexnet.py: 10 generated
classes, a quarter of the kernels) with one change the paper measured or a reader asks about (§3.1
ReLU vs tanh, §3.2 two towers vs one, §3.3 LRN, §3.4 overlapping pooling,
§4.1 PCA colour noise, §4.2 dropout, §7 depth, the towers' exchange), shortened
by SHORT_RUN so that the default sweep runs in minutes on a CPU
(docs/ABLATIONS.md says how long it took).

Workdirs: <root>/<variant> (seed 0) and <root>/<variant>_seed<k> for further
seeds. Each holds what `train.train_and_evaluate` writes plus sweep.json
(variant, seed, description, the paper's claim, train seconds, finished).
Resumable: a finished workdir is skipped; an unfinished one resumes from its
latest checkpoint (its config must equal the one the sweep builds now).
`alexnet_jax/report.py` turns the workdirs into docs/ABLATIONS.md.
"""

import dataclasses
import json
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from absl import logging

from alexnet_jax import input_pipeline
from alexnet_jax import paths
from alexnet_jax import run_dir
from alexnet_jax import train
from configs import alexnet

SWEEP_FILE = 'sweep.json'


@dataclasses.dataclass(frozen=True)
class Variant:
  """One arm of the sweep: `configs/alexnet.py` variants plus overrides."""
  config_variants: str  # For alexnet.get_config: 'demo,no_lrn'.
  overrides: Tuple[Tuple[str, Any], ...] = ()  # (dotted field, value).
  description: str = ''
  paper: str = ''  # The paper's claim for this change, '' if it gives none.
  # The paper's top-1 / top-5 error difference vs the full network, in
  # percentage points (variant minus baseline), where it gives one.
  paper_top1: Optional[float] = None
  paper_top5: Optional[float] = None


# Differences are "variant error minus baseline error": positive means the
# change hurts, as the paper's ablations report.
VARIANTS: Dict[str, Variant] = {
    'baseline': Variant(
        'demo', (), 'the demo network: ReLU, LRN, 3x3/2 pools, two towers '
        'exchanging at conv3/fc6/fc7, PCA noise, no dropout (the demo '
        'config)'),
    'no_lrn': Variant(
        'demo,no_lrn', (), 'no local response normalisation (§3.3)',
        'LRN lowers top-1/top-5 error by 1.4/1.2 points (§3.3)', 1.4, 1.2),
    'no_overlap': Variant(
        'demo,no_overlap', (), '2x2/2 pools instead of overlapping 3x3/2 '
        '(§3.4)', 'overlapping pools lower top-1/top-5 error by 0.4/0.3 '
        'points (§3.4)', 0.4, 0.3),
    'one_tower': Variant(
        'demo,one_tower', (),
        'one tower, half the conv kernels (conv5 and fc6/fc7 whole: both '
        "towers' units) (§3.2)", 'two towers lower top-1/top-5 error by 1.7/1.2 '
        'points vs one tower with half the kernels (§3.2)', 1.7, 1.2),
    'tanh': Variant(
        'demo,tanh', (), 'tanh instead of ReLU (§3.1)',
        'ReLU reaches 25% training error 6x faster than tanh (4-layer CNN, '
        'CIFAR-10, Figure 1)'),
    # The demo turns dropout off (it only slows a net with 128 units per
    # tower), so the pair is "dropout 0 (baseline) vs 0.5".
    'dropout': Variant(
        'demo', (('model.dropout_rate', 0.5),), 'dropout 0.5 in fc6 and fc7, '
        "the paper's setting (the demo's baseline has none) (§4.2)",
        'without dropout the net overfits substantially; dropout roughly '
        'doubles the iterations to converge (§4.2)'),
    'no_pca_noise': Variant(
        'demo', (('data.pca_noise', False),), 'no PCA colour noise (§4.1)',
        'PCA noise lowers top-1 error by over 1 point (§4.1)', 1.0),
    'deeper': Variant(
        'demo,deeper', (), 'one more 3x3 conv layer (another conv4) (§7)',
        'none measured ("depth really is important", §7)'),
    'shallower': Variant(
        'demo,shallower', (), 'one conv layer fewer (no conv4) (§7)',
        'removing a middle conv layer costs about 2 points of top-1 (§7)',
        2.0),
    'no_exchange': Variant(
        'demo,no_exchange', (), 'the towers never exchange maps; fc8 sums '
        'their logits (§3.2 communication)',
        'none measured; the connectivity was "tuned by cross-validation" '
        '(§3.2)'),
}

# Every variant's run length at CPU scale: the demo's 24 epochs (960 steps of
# 64 images) cut to 10, lr / 10 after epoch 8; validation every 2 epochs;
# training error logged 4 times an epoch for the Figure 1 measure.
SHORT_RUN: Dict[str, Any] = {
    'num_epochs': 10,
    'schedule.boundaries_epochs': (8.0,),
    'eval.every_epochs': 2.0,
    'checkpoint.every_epochs': 5.0,
    'log_every_steps': 10,
}


def workdir_name(variant: str, seed_index: int) -> str:
  return variant if seed_index == 0 else f'{variant}_seed{seed_index}'


def variant_config(name: str, overrides: Mapping[str, Any] = (),
                   seed_index: int = 0, short_run: Mapping[str, Any] = None):
  """The config of variant `name`: its configs/alexnet.py variants, then
  SHORT_RUN (or `short_run`), the sweep's shared `overrides`, the variant's
  own overrides (they define it, so they win), and seed + seed_index."""
  if name not in VARIANTS:
    raise ValueError(f'Unknown sweep variant {name!r}; valid: '
                     f'{", ".join(VARIANTS)}.')
  v = VARIANTS[name]
  config = alexnet.get_config(v.config_variants)
  config.lock()  # A misspelt field is a KeyError that names it.
  shared = dict(SHORT_RUN if short_run is None else short_run)
  shared.update(dict(overrides))
  config.update_from_flattened_dict(shared)
  for field, value in v.overrides:
    if field in shared and shared[field] != value:
      logging.warning('Variant %s sets %s=%r over the shared override %r.',
                      name, field, value, shared[field])
  config.update_from_flattened_dict(dict(v.overrides))
  config.seed = config.seed + seed_index
  return config


def read_sweep_file(workdir: str) -> Optional[Dict[str, Any]]:
  path = paths.join(workdir, SWEEP_FILE)
  if not paths.exists(path):
    return None
  return json.loads(paths.read_text(path))


def _write_sweep_file(workdir: str, record: Dict[str, Any]):
  paths.write_text(paths.join(workdir, SWEEP_FILE),
                   json.dumps(record, indent=2, sort_keys=True))


def _check_same_config(config, workdir: str):
  """An unfinished workdir resumes only the run the sweep would start now."""
  changed = run_dir.changed_sections(config, workdir)
  if changed:
    raise ValueError(
        f'{workdir} holds an unfinished run of another config (sections '
        f'{changed} differ): resuming it would mix two runs. Use another '
        '--root, delete that workdir, or rerun with the same overrides.')


def run_variant(name: str, workdir: str, config, seed_index: int = 0
                ) -> Dict[str, Any]:
  """Trains one variant in `workdir` (skipped when finished); its record."""
  record = read_sweep_file(workdir) or {}
  if record.get('finished'):
    changed = run_dir.changed_sections(config, workdir)
    if changed:
      logging.warning('Sweep: the finished run in %s differs from the config '
                      'the sweep builds now in %s (new fields or other '
                      'overrides?); kept. Delete it to rerun.', workdir,
                      changed)
    logging.info('Sweep: %s is finished in %s (%.0f s); skipped.', name,
                 workdir, record.get('train_seconds', 0.0))
    return record
  _check_same_config(config, workdir)
  paths.makedirs(workdir)
  v = VARIANTS[name]
  record = {'variant': name, 'seed_index': seed_index, 'seed': config.seed,
            'config_variants': v.config_variants,
            'variant_overrides': dict(v.overrides),
            'description': v.description, 'paper': v.paper,
            'paper_top1': v.paper_top1, 'paper_top5': v.paper_top5,
            'finished': False,
            'train_seconds': record.get('train_seconds', 0.0)}
  _write_sweep_file(workdir, record)
  logging.info('Sweep: training %s (%s) in %s.', name, v.description, workdir)
  t0 = time.time()
  state, last_val = train.train_and_evaluate(config, workdir)
  seconds = time.time() - t0
  total_steps = (config.total_steps or
                 config.num_epochs * input_pipeline.steps_per_epoch(config))
  step = int(state.step)
  record.update(train_seconds=record['train_seconds'] + seconds,
                finished=step == total_steps, steps=step,
                total_steps=total_steps,
                val_top1_error=last_val.get('top1_error'),
                val_top5_error=last_val.get('top5_error'))
  _write_sweep_file(workdir, record)
  logging.info('Sweep: %s took %.1f s (step %d of %d), validation top-1 '
               'error %.2f%%.', name, seconds, step, total_steps,
               100 * (last_val.get('top1_error') or float('nan')))
  return record


def run_sweep(root: str, variants: Sequence[str] = tuple(VARIANTS),
              seeds: int = 1, overrides: Mapping[str, Any] = (),
              short_run: Optional[Mapping[str, Any]] = None
              ) -> List[Dict[str, Any]]:
  """Runs `variants` x `seeds` one after another under `root`; their records.

  overrides: {dotted field: value} applied to every variant (after
  SHORT_RUN, or `short_run` when given).
  """
  paths.check(root, '--root')
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown:
    raise ValueError(f'Unknown sweep variants {unknown}; valid: '
                     f'{", ".join(VARIANTS)}.')
  if seeds < 1:
    raise ValueError(f'seeds={seeds}: run at least one seed.')
  # Every config is built first, so a bad override fails before any run.
  plan = [(name, k, variant_config(name, overrides, k, short_run))
          for k in range(seeds) for name in variants]
  records = []
  t0 = time.time()
  for name, k, config in plan:
    workdir = paths.join(root, workdir_name(name, k))
    records.append({**run_variant(name, workdir, config, k),
                    'workdir': workdir})
  logging.info('Sweep of %d runs done in %.1f s:\n%s', len(records),
               time.time() - t0, '\n'.join(
                   f'  {paths.name(r["workdir"]):<20} '
                   f'{r.get("train_seconds", 0):7.1f} s  val top-1 error '
                   f'{100 * (r.get("val_top1_error") or float("nan")):.2f}%'
                   for r in records))
  return records
