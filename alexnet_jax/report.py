"""The ablation report: a sweep's workdirs as a markdown table and plots.

`build_report(root, out)` reads every <root>/*/sweep.json (alexnet_jax/
sweep.py), the run's metrics.jsonl, config.json and final checkpoint, and
writes `out` (markdown) with its PNGs in `<out without .md, lowercased>/`,
e.g. docs/ABLATIONS.md and docs/ablations/*.png. Per variant (averaged over
seeds):

- final validation top-1/top-5 error (centre crop, the run's last evaluation)
  and the difference to the baseline, in percentage points, next to the
  paper's claimed difference;
- parameters, train time (wall seconds of train_and_evaluate);
- epochs to reach 25% training error, the paper's Figure 1 measure;
- the colour specificity of each tower's conv1 kernels (figures.
  tower_specialisation: mean over the tower's kernels);
- cross-tower bytes per image, forward pass, from audit.exchange_table.
"""

import datetime
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import logging
import jax
import numpy as np

from alexnet_jax import audit
from alexnet_jax import figures
from alexnet_jax import mesh as mesh_lib
from alexnet_jax import model as model_lib
from alexnet_jax import paths
from alexnet_jax import run_dir
from alexnet_jax import sweep as sweep_lib

BASELINE = 'baseline'
FIGURE1_TARGET = 0.25  # "reach 25% training error" (Figure 1).


# ----------------------------------------------------------- reading a run
def steps_per_epoch(history) -> float:
  """From the train records' (step, epoch) pairs."""
  for step, r in sorted(history['train'].items(), reverse=True):
    if r.get('epoch'):
      return step / r['epoch']
  raise ValueError('No train record with an epoch: cannot convert steps to '
                   'epochs.')


def train_error_by_epoch(history) -> List[Tuple[float, float]]:
  """[(epoch, training top-1 error of that logged batch)], by step."""
  return [(r['epoch'], r['top1_error'])
          for _, r in sorted(history['train'].items())]


def val_error_by_epoch(history) -> List[Tuple[float, float, float]]:
  """[(epoch, val top-1 error, val top-5 error)], by step."""
  spe = steps_per_epoch(history)
  return [(step / spe, r['top1_error'], r['top5_error'])
          for step, r in sorted(history['val'].items())]


def epochs_to_error(points: Sequence[Tuple[float, float]],
                    target: float = FIGURE1_TARGET,
                    window_epochs: float = 1.0) -> Optional[float]:
  """The paper's Figure 1 measure: the first epoch at which the training
  error reaches `target`; None if it never does.

  points: [(epoch, training error of the batch logged then)]. One batch's
  error is noisy, so the error at a logged epoch e is the mean over the
  logged batches of the last `window_epochs` epochs, (e - window, e]; the
  first e where that mean is <= target is returned.
  """
  points = sorted(points)
  for epoch, _ in points:
    window = [err for e, err in points if epoch - window_epochs < e <= epoch]
    if np.mean(window) <= target:
      return float(epoch)
  return None


def run_summary(workdir: str, defaults=None) -> Dict[str, Any]:
  """One workdir's row: sweep.json, final errors, Figure 1 measure,
  parameters, traffic and the towers' colour specificity. `defaults`: the
  config fields the run predates (run_dir.load_config)."""
  record = sweep_lib.read_sweep_file(workdir)
  if record is None:
    raise FileNotFoundError(f'No {sweep_lib.SWEEP_FILE} in {workdir}: not a '
                            'sweep workdir (python sweep.py --root=... '
                            'writes one per variant).')
  history = run_dir.read_metrics(workdir)
  if not history['val']:
    raise ValueError(f'{workdir} has no validation record in metrics.jsonl.')
  final_step = max(history['val'])
  final = history['val'][final_step]
  config = run_dir.load_config(workdir, defaults)
  model = model_lib.create_model(config.model)
  size = config.data.crop_size
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jax.numpy.zeros((1, size, size, 3)))
  num_params = sum(int(np.prod(x.shape))
                   for x in jax.tree.leaves(shapes['params']))
  traffic = sum(r['bytes_received'] for r in audit.exchange_table(model, size))
  row = {
      'variant': record['variant'], 'seed': record['seed'],
      'workdir': workdir, 'finished': bool(record.get('finished')),
      'description': record.get('description', ''),
      'paper': record.get('paper', ''),
      'paper_top1': record.get('paper_top1'),
      'paper_top5': record.get('paper_top5'),
      'train_seconds': record.get('train_seconds'),
      'final_step': final_step,
      'epochs': final_step / steps_per_epoch(history),
      'num_classes': config.model.num_classes,
      'val_top1_error': final['top1_error'],
      'val_top5_error': final['top5_error'],
      'epochs_to_25': epochs_to_error(train_error_by_epoch(history)),
      'num_params': num_params,
      'exchange_bytes_per_image': traffic,
      'history': history,
  }
  mesh = mesh_lib.make_mesh(config.model.num_towers, 1, 1)
  _, params, _ = run_dir.restore_params(config, workdir, mesh, 'latest')
  stats = figures.tower_specialisation(params)
  row['colour_specificity'] = {t: s['mean'] for t, s in stats.items()}
  return row


def collect(root: str, defaults=None) -> List[Dict[str, Any]]:
  """run_summary of every finished sweep workdir under `root`, in
  VARIANTS order (unfinished ones are skipped, with a warning)."""
  dirs = sorted(str(p.parent) for p in
                paths.path(root).glob(f'*/{sweep_lib.SWEEP_FILE}'))
  if not dirs:
    raise FileNotFoundError(f'No sweep workdirs (*/{sweep_lib.SWEEP_FILE}) '
                            f'under {root}: run python sweep.py --root={root} '
                            'first.')
  order = list(sweep_lib.VARIANTS)
  rows = []
  for d in dirs:
    if not (sweep_lib.read_sweep_file(d) or {}).get('finished'):
      logging.warning('Skipping %s: its run has not finished (still '
                      'training, or interrupted: rerun python sweep.py).', d)
      continue
    rows.append(run_summary(d, defaults))
  if not rows:
    raise ValueError(f'No sweep workdir under {root} has finished yet.')
  return sorted(rows, key=lambda r: (order.index(r['variant'])
                                     if r['variant'] in order else len(order),
                                     r['seed']))


# ----------------------------------------------------------- the table
def _mean(values):
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def aggregate(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
  """One entry per variant: seeds averaged, differences to the baseline."""
  by_variant: Dict[str, List[Dict[str, Any]]] = {}
  for r in rows:
    by_variant.setdefault(r['variant'], []).append(r)
  out = []
  for name, runs in by_variant.items():
    first = runs[0]
    reached = [r['epochs_to_25'] for r in runs]
    towers = sorted({t for r in runs for t in r.get('colour_specificity', {})})
    out.append({
        'variant': name, 'seeds': len(runs),
        'finished': all(r['finished'] for r in runs),
        'description': first['description'], 'paper': first['paper'],
        'paper_top1': first['paper_top1'], 'paper_top5': first['paper_top5'],
        'num_classes': first['num_classes'],
        'val_top1_error': _mean([r['val_top1_error'] for r in runs]),
        'val_top5_error': _mean([r['val_top5_error'] for r in runs]),
        'val_top1_std': float(np.std([r['val_top1_error'] for r in runs])),
        'epochs': _mean([r['epochs'] for r in runs]),
        'train_seconds': _mean([r['train_seconds'] for r in runs]),
        'num_params': first['num_params'],
        'exchange_bytes_per_image': first['exchange_bytes_per_image'],
        # Not reached in some seed: reported as not reached.
        'epochs_to_25': None if None in reached else _mean(reached),
        'colour_specificity': {t: _mean([r['colour_specificity'].get(t)
                                         for r in runs])
                               for t in towers},
    })
  base = next((a for a in out if a['variant'] == BASELINE), None)
  for a in out:
    for k in ('top1', 'top5'):
      a[f'diff_{k}'] = (None if base is None else
                        a[f'val_{k}_error'] - base[f'val_{k}_error'])
  return out


def _pct(x, signed=False):
  if x is None:
    return '-'
  return f'{100 * x:+.1f}' if signed else f'{100 * x:.1f}'


def _paper_diff(a):
  if a['paper_top1'] is None:
    return '-'
  if a['paper_top5'] is None:
    return f'+{a["paper_top1"]:g} / -'
  return f'+{a["paper_top1"]:g} / +{a["paper_top5"]:g}'


def table_markdown(aggregated: Sequence[Dict[str, Any]]) -> str:
  """The headline table (errors in %, differences in percentage points)."""
  header = ('| variant | val top-1 / top-5 error (%) | vs baseline (pts) | '
            'paper (pts) | parameters | train time (s) | epochs to 25% '
            'train error | conv1 colour specificity per tower | cross-tower '
            'bytes/image (fwd) |')
  lines = [header, '|' + '---|' * header.count(' | ') + '---|']
  for a in aggregated:
    name = a['variant'] + ('' if a['finished'] else ' (unfinished)')
    if a['val_top1_error'] >= 1 - 1 / a['num_classes'] - 0.02:
      name += ' (at chance)'
    if a['seeds'] > 1:
      name += f' ({a["seeds"]} seeds, top-1 sd {_pct(a["val_top1_std"])})'
    diff = ('-' if a['variant'] == BASELINE or a['diff_top1'] is None else
            f'{_pct(a["diff_top1"], True)} / {_pct(a["diff_top5"], True)}')
    e25 = ('not reached' if a['epochs_to_25'] is None else
           f'{a["epochs_to_25"]:.2f}')
    spec = ', '.join(f'{v:.2f}' for _, v in sorted(
        a['colour_specificity'].items())) or '-'
    lines.append(
        f'| {name} | {_pct(a["val_top1_error"])} / '
        f'{_pct(a["val_top5_error"])} | {diff} | {_paper_diff(a)} | '
        f'{a["num_params"]:,} | {a["train_seconds"]:.0f} | {e25} | {spec} | '
        f'{a["exchange_bytes_per_image"]:,} |')
  return '\n'.join(lines)


# ----------------------------------------------------------- the plots
def _new_figure(size=(7.5, 4.5)):
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  return Figure(figsize=size, dpi=100)


def _save(fig, path):
  fig.tight_layout()
  with paths.path(path).open('wb') as f:  # A local path or gs://.
    fig.savefig(f, format='png')


def plot_val_curves(rows, path):
  """Validation top-1 error vs epoch, every variant (seed 0) on one axis."""
  fig = _new_figure()
  ax = fig.add_subplot(1, 1, 1)
  first = {}
  for r in rows:  # Seed 0 of each variant (rows are sorted by seed).
    first.setdefault(r['variant'], r)
  for i, r in enumerate(first.values()):
    pts = val_error_by_epoch(r['history'])
    ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker='.',
            color=f'C{i % 10}', ls='-' if i < 10 else '--',
            lw=2.5 if r['variant'] == BASELINE else 1.2, label=r['variant'])
  ax.set_xlabel('epoch')
  ax.set_ylabel('validation top-1 error (%), centre crop')
  ax.set_title('Validation error of each variant')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, ncol=2)
  _save(fig, path)


def plot_relu_vs_tanh(rows, path):
  """Training top-1 error vs epoch, ReLU (baseline) vs tanh: Figure 1."""
  fig = _new_figure()
  ax = fig.add_subplot(1, 1, 1)
  for name, label, colour in ((BASELINE, 'ReLU (baseline)', 'C0'),
                              ('tanh', 'tanh', 'C3')):
    runs = [r for r in rows if r['variant'] == name]
    if not runs:
      continue
    r = runs[0]
    pts = train_error_by_epoch(r['history'])
    ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], color=colour,
            alpha=0.35, lw=0.8)
    smooth = [(e, np.mean([x for f, x in pts if e - 1.0 < f <= e]))
              for e, _ in pts]
    ax.plot([p[0] for p in smooth], [100 * p[1] for p in smooth],
            color=colour, lw=2, label=f'{label}, mean of the last epoch')
    if r['epochs_to_25'] is not None:
      ax.axvline(r['epochs_to_25'], color=colour, ls=':', lw=1)
  ax.axhline(100 * FIGURE1_TARGET, color='k', ls='--', lw=1,
             label='25% training error')
  ax.set_xlabel('epoch')
  ax.set_ylabel('training top-1 error (%)')
  ax.set_title('Figure 1 measure: ReLU vs tanh (thin: logged batches)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  _save(fig, path)


# ----------------------------------------------------------- the report
SCOPE = """\
## What this does and does not show

This is a smoke test of the ablations, not a reproduction of the paper's
numbers. Each run is the demo network (a quarter of AlexNet's kernels, 64x64
crops) trained for about {epochs:g} epochs on 10 generated pattern classes
(2,600 training, 500 validation images), with {seeds} seed(s) per variant.

- It shows that every ablation runs end to end through the same training
  code, how each change moves parameters and cross-tower traffic (exact
  numbers), and the direction of large effects at this scale. Train times
  are wall-clock seconds (start-up and compilation included) on a machine
  other jobs may share: a rough guide only.
- It does not show the paper's effects. On 500 validation images one image
  is 0.2 points; with one seed and short runs, differences of a few points
  are within run-to-run noise (a different seed or one more epoch can
  reverse them). The paper measured its differences on ImageNet (1.2M
  images, 1000 classes) after ~90 epochs of the full network; Figure 1's
  6x is a 4-layer CNN on CIFAR-10. Effects that help a 60M-parameter net
  generalise (dropout, PCA noise, LRN) may hurt or do nothing on a tiny net
  that trains for {epochs:g} epochs on easy synthetic classes.
- Runs this short stop before the error levels off (see the validation
  curves below): the table ranks how fast each variant learns as much as how
  well it ends up. A variant that learns slower at first (dropout, tanh, a
  deeper net) looks worse here than it may be after 90 epochs.
- "epochs to 25% training error" is measured on the logged training batches
  (augmented, with dropout where on), averaged over the last epoch.
- Colour specificity is the share of a conv1 kernel's energy off the grey
  axis (figures.colour_specificity; a random kernel scores 0.67): the paper's
  Figure 3 split would show as one tower low and the other high.
"""


def report_markdown(rows, aggregated, out_dir_name: str, command: str,
                    preface: str = '') -> str:
  epochs = _mean([a['epochs'] for a in aggregated]) or 0.0
  seeds = max(a['seeds'] for a in aggregated)
  total = sum(r['train_seconds'] or 0.0 for r in rows)
  parts = []
  if preface:
    parts.append(preface.rstrip() + '\n')
  parts.append(f"""\
# Ablations at CPU scale

Written by the report command on {datetime.date.today().isoformat()}
from the workdirs of `python sweep.py`; do not edit by hand, rerun:

    {command}

{len(rows)} runs, {total / 60:.1f} minutes of training in all (the sum of
each run's wall time, sequential, on the machine that ran the sweep).

{SCOPE.format(epochs=epochs, seeds=seeds)}
## Results

Errors are the last validation evaluation (centre crop, all 500 images), in
%; differences are variant minus baseline in percentage points (positive:
the change hurts), next to the paper's claimed difference for the same
change (the paper reports the gain of its choice, so its ablated variant is
worse by that much).

{table_markdown(aggregated)}

What each variant changes, and what the paper says about it:

""")
  for a in aggregated:
    parts.append(f'- **{a["variant"]}**: {a["description"]}. Paper: '
                 f'{a["paper"] or "(the reference)"}.\n')
  by_name = {a['variant']: a for a in aggregated}
  if BASELINE in by_name and 'tanh' in by_name:
    def reached(a):
      return (f'at epoch {a["epochs_to_25"]:.2f}' if a['epochs_to_25']
              is not None else f'not within its {a["epochs"]:g} epochs')
    relu, tanh = by_name[BASELINE], by_name['tanh']
    ratio = ''
    if relu['epochs_to_25'] and tanh['epochs_to_25']:
      ratio = (f' ({tanh["epochs_to_25"] / relu["epochs_to_25"]:.1f}x; the '
               'paper: 6x)')
    parts.append(f'\nFigure 1 measure: ReLU reached 25% training error '
                 f'{reached(relu)}, tanh {reached(tanh)}{ratio}.\n')
  parts.append(f"""
## Plots

Validation top-1 error of every variant:

![validation error of every variant]({out_dir_name}/val_error.png)

ReLU vs tanh, training error by epoch (the paper's Figure 1 measure):

![ReLU vs tanh training error]({out_dir_name}/relu_vs_tanh.png)
""")
  return ''.join(parts)


def build_report(root: str, out: str, command: str = '',
                 preface: str = '', defaults=None
                 ) -> Tuple[str, List[Dict[str, Any]]]:
  """Writes `out` (markdown) and its PNGs in <out without .md, lowercased>/;
  returns (markdown, aggregated rows). `defaults`: as run_summary."""
  paths.check(root, '--root')
  paths.check(out, '--out')
  rows = collect(root, defaults)
  aggregated = aggregate(rows)
  out_path = paths.path(out)
  out_dir = out_path.parent / out_path.stem.lower()
  out_dir.mkdir(parents=True, exist_ok=True)
  plot_val_curves(rows, str(out_dir / 'val_error.png'))
  plot_relu_vs_tanh(rows, str(out_dir / 'relu_vs_tanh.png'))
  text = report_markdown(rows, aggregated, out_dir.name,
                         command or f'python report.py --root={root} '
                         f'--out={out}', preface)
  paths.write_text(out, text)
  return text, aggregated
