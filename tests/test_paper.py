"""The paper's recipe as the code runs it: initialisation (§5), the constants
and layer table of docs/PAPER.md against the config and the model, the
ablation variants against the independent reference, the plateau drop inside
a real run, the step-0 live-unit fraction, and the PCA lighting noise's
covariance (§4.1)."""

import ast
import logging as py_logging
import os
import re

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from alexnet_jax import checkpoint as checkpoint_lib
from alexnet_jax import input_pipeline
from alexnet_jax import mesh as mesh_lib
from alexnet_jax import optimizer as optimizer_lib
from alexnet_jax import preprocess as pp
from alexnet_jax import run_dir
from alexnet_jax import train
from alexnet_jax import train_step as train_step_lib
from alexnet_jax.model import conv1_padding, create_model
from configs.alexnet import get_config
from tests import train_helpers as th
from tests.reference import (fresh_rng, init_small, reference_forward,
                             reference_layers, rel_err)

PAPER_MD = os.path.join(th.REPO, 'docs', 'PAPER.md')
CONV_LAYERS = ('conv1', 'conv2', 'conv3', 'conv4', 'conv5')
FC_LAYERS = ('fc6', 'fc7', 'fc8')
BIAS_ONE = ('conv2', 'conv4', 'conv5', 'fc6', 'fc7')  # §5.


# ------------------------------------------------------------ init (§5)
def test_paper_initialisation_is_n_0_001_with_the_papers_biases():
  """The full network as the trainer initialises it (create_train_state,
  224 crops, on a (1, 2) mesh): every kernel ~ N(0, 0.01), the towers drawn
  apart; biases exactly 1 in conv2, conv4, conv5, fc6, fc7 and 0 in conv1,
  conv3, fc8.

  Tolerances: 4 standard errors of each estimator for the layer's n weights
  (std: 0.01 / sqrt(2n), 0.4% for fc6's 19M weights per tower and 1.5% for
  conv1's 35k; mean: 0.01 / sqrt(n); excess kurtosis: sqrt(24 / n)).
  Catches another stddev (Caffe's 0.005 in fc6/fc7, He's fan-in scaling), a
  truncated (-12% std) or uniform (kurtosis -1.2) draw, the same draw in
  both towers, and biases of 1 in the wrong layers (e.g. conv3)."""
  config = get_config()
  assert tuple(config.model.init_bias_one) == BIAS_ONE
  seed, _ = fresh_rng()
  model = create_model(config.model)
  mesh = mesh_lib.make_mesh(2, 2, 1)
  state = train_step_lib.create_train_state(
      model, optimizer_lib.create_optimizer(config.optim), mesh,
      jax.random.PRNGKey(seed), config.data.crop_size)
  params = jax.device_get(state.params)
  assert sorted(params) == sorted(CONV_LAYERS + FC_LAYERS)
  sd = 0.01
  for layer, p in params.items():
    k = p['kernel'].astype(np.float64)
    n = k.size
    mean, std = k.mean(), k.std()
    kurtosis = np.mean((k - mean) ** 4) / std ** 4 - 3
    assert abs(mean) < 4 * sd / np.sqrt(n), (seed, layer, mean)
    assert abs(std - sd) < 4 * sd / np.sqrt(2 * n), (seed, layer, std)
    assert abs(kurtosis) < 4 * np.sqrt(24 / n), (seed, layer, kurtosis)
    assert not np.array_equal(k[0], k[1]), layer  # Two towers' own draws.
    want = 1.0 if layer in BIAS_ONE else 0.0
    np.testing.assert_array_equal(p['bias'], np.full(p['bias'].shape, want),
                                  err_msg=layer)


# ------------------------------------------------------ docs/PAPER.md
def markdown_table(header):
  """Rows (lists of stripped cells) of the table whose header line is
  `header` in docs/PAPER.md."""
  with open(PAPER_MD) as f:
    lines = [l.strip() for l in f]
  assert header in lines, f'No table with header {header!r} in PAPER.md.'
  i = lines.index(header)
  assert set(lines[i + 1]) <= set('|-: '), lines[i + 1]  # The separator.
  rows = []
  for line in lines[i + 2:]:
    if not line.startswith('|'):
      break
    rows.append([c.strip() for c in line.strip('|').split('|')])
  n = header.count('|') - 1
  assert all(len(r) == n for r in rows), rows
  return rows


def dotted(config, name):
  node = config
  for part in name.split('.'):
    node = node[part]
  return node


def unquote(cell):
  assert cell.startswith('`') and cell.endswith('`'), cell
  return cell[1:-1]


REQUIRED_CONSTANTS = (
    'model.lrn_k', 'model.lrn_n', 'model.lrn_alpha', 'model.lrn_beta',
    'model.pool_window', 'model.pool_stride', 'model.dropout_rate',
    'optim.learning_rate', 'optim.momentum', 'optim.weight_decay',
    'batch_size', 'data.pca_eigvecs', 'data.pca_stddevs')


def test_papers_constants_table_is_the_config():
  """Every row of PAPER.md's constants table (value: a Python literal)
  equals get_config()'s field, exactly, and the table covers the paper's
  hyper-parameters. Catches a config value changed away from the paper's
  (or the document's) and a documented field the config lacks."""
  rows = markdown_table('| quantity | value | paper | config field |')
  config = get_config()
  fields = []
  for quantity, value, source, field in rows:
    want, field = ast.literal_eval(unquote(value)), unquote(field)
    got = dotted(config, field)
    assert source, quantity
    if isinstance(want, tuple):
      assert np.shape(got) == np.shape(want), field
      np.testing.assert_array_equal(np.asarray(got, np.float64),
                                    np.asarray(want, np.float64),
                                    err_msg=field)
    else:
      assert type(got) is type(want) and got == want, (field, got, want)
    fields.append(field)
  assert len(fields) == len(set(fields))
  assert set(REQUIRED_CONSTANTS) <= set(fields), (
      set(REQUIRED_CONSTANTS) - set(fields))


LAYER_HEADER = ('| layer | input per tower | kernel / stride / pad | output '
                'per tower | total maps or units | reads other tower | '
                'parameters |')


def leading_int(cell):
  m = re.match(r'(\d+)', cell)
  assert m, cell
  return int(m.group(1))


def test_papers_layer_table_is_the_model():
  """PAPER.md's layer table against the network get_config() builds
  (jax.eval_shape: nothing computed): each layer's parameter count exactly,
  the total 60,965,224, the widths (96/256/384/384/256, 4096/4096/1000 =
  towers x per-tower widths), per-tower input and output maps, kernel sizes,
  strides and conv1's padding, and "reads other tower" = yes exactly for the
  exchange layers and fc8. Catches the document and the model drifting
  apart: a width, a kernel, the exchange or a parameter count changed on
  either side."""
  config = get_config()
  m = config.model
  model = create_model(m)
  size = config.data.crop_size
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, size, size, 3)))['params']
  counts = {l: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(p))
            for l, p in params.items()}
  rows = {r[0]: r for r in markdown_table(LAYER_HEADER)}
  layers = [name for name in rows if name in params]
  assert layers == list(CONV_LAYERS + FC_LAYERS)
  assert list(rows)[-1] == 'total'
  towers = m.num_towers
  total_maps = {**{f'conv{i + 1}': towers * w
                   for i, w in enumerate(m.conv_features)},
                'fc6': towers * m.fc_features, 'fc7': towers * m.fc_features,
                'fc8': m.num_classes}
  assert [total_maps[l] for l in layers] == [96, 256, 384, 384, 256, 4096,
                                             4096, 1000]
  exchange = set(m.exchange) | {'fc8'}
  assert exchange == {'conv3', 'fc6', 'fc7', 'fc8'}
  for name, row in rows.items():
    _, inputs, kernel, outputs, maps, reads, count = row
    if name == 'total':
      assert int(count.replace(',', '')) == sum(counts.values()) == 60_965_224
      continue
    if name not in params:  # LRN and pooling rows: no parameters.
      assert count == '0' and reads == 'no', name
      assert kernel == f'{m.pool_window} / {m.pool_stride} / 0 (pool)', name
      continue
    k = params[name]['kernel'].shape  # (towers, [h, w,] in, out)
    assert int(count.replace(',', '')) == counts[name], name
    # fc8's towers each make partial logits of every class (then summed).
    assert int(maps) == total_maps[name] == (
        k[-1] if name == 'fc8' else k[0] * k[-1]), name
    assert reads == ('yes' if name in exchange else 'no'), name
    per_tower_in = k[0] * k[1] if name == 'fc8' else k[-2]
    assert leading_int(inputs) == per_tower_in, name
    assert leading_int(outputs) == k[-1], name
    if name in CONV_LAYERS:
      assert k[1] == k[2] and int(kernel.split('/')[0]) == k[1], name
      stride, pad = (p.strip() for p in kernel.split('/')[1:])
      if name == 'conv1':
        assert int(stride) == 4 and inputs.startswith(f'3x{size}x{size}')
        assert ast.literal_eval(f'({pad})') == conv1_padding(
            m.conv1_padding, size)
      else:
        assert (int(stride), int(pad)) == (1, k[1] // 2), name
    else:
      assert kernel == '-', name


# ------------------------------------------------- ablation variants
@pytest.mark.parametrize('variant', ['no_lrn', 'tanh', 'no_overlap'])
def test_ablation_variant_equals_reference_and_changes_the_network(variant):
  """The variant's model fields (what configs.alexnet changes, applied
  through create_model to a small network) run on a (2, 2) mesh give the
  independent reference's logits, and differ from the baseline's with the
  same parameters. Catches the model ignoring the switch (no change) and a
  switch implemented unlike the paper's ablation (reference mismatch)."""
  base, varied = get_config().model, get_config(variant).model
  changed = {k: v for k, v in varied.items() if base[k] != v}
  assert changed, variant
  small = dict(num_classes=10, width_multiplier=0.25, fc_features=64,
               init_stddev=0.05)
  model = create_model(varied, **small)
  baseline = create_model(base, **small)
  seed, rng = fresh_rng()
  params = model.init(jax.random.PRNGKey(seed),
                      jnp.zeros((1, 99, 99, 3)))['params']
  images = jnp.asarray(rng.normal(0, 60, (4, 99, 99, 3)), jnp.float32)
  mesh = mesh_lib.make_mesh(2, 2, 2)
  sharded = jax.device_put(params, mesh_lib.param_shardings(mesh, params))
  got = jax.jit(mesh_lib.sharded_apply(model, mesh))(sharded, images)
  want = reference_forward(model, params, images)
  assert rel_err(got, want) <= 1e-5, (seed, variant)
  before = reference_forward(baseline, params, images)
  assert rel_err(before, want) > 1e-2, (seed, variant)


# ------------------------------------------------ a real run's schedule
class Records(py_logging.Handler):
  """Keeps every log message."""

  def __init__(self):
    super().__init__(py_logging.INFO)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@pytest.fixture(scope='module')
def plateau_run(data_dir, tmp_path_factory):
  """A tiny run with the plateau rule at patience 1 and min_delta 10 (no
  evaluation after the first improves on the best), evaluating every step,
  at most 2 drops: lr drops after steps 2 and 3. fc biases 0 (no bias of
  1), so that the step-0 live-unit fractions are not trivially 100%."""
  workdir = str(tmp_path_factory.mktemp('plateau'))
  config = th.tiny_config(data_dir, total_steps=4, **{
      'schedule.kind': 'plateau', 'schedule.patience': 1,
      'schedule.min_delta': 10.0, 'schedule.max_drops': 2,
      'eval.every_steps': 1, 'checkpoint.every_steps': 2,
      'model.init_bias_one': ()})
  records = Records()
  root = py_logging.getLogger()
  verbosity = logging.get_verbosity()
  root.addHandler(records)
  logging.set_verbosity(logging.INFO)
  try:
    state, _ = train.train_and_evaluate(config, workdir)
  finally:
    logging.set_verbosity(verbosity)
    root.removeHandler(records)
  return config, workdir, jax.device_get(state), records.messages


def test_plateau_drop_changes_the_learning_rate_of_the_next_step(
    plateau_run):
  """The learning rate the optimizer state holds (what the update uses, and
  train_step logs) is the base rate up to the step whose evaluation drops
  it, then base/10, then base/100 after the second drop; max_drops stops a
  third. The returned state holds the last rate, and the checkpoints hold
  the rule's state (drop_steps). Catches a drop decided but never written
  into the optimizer state, written a step late, and a schedule state not
  checkpointed."""
  config, workdir, state, messages = plateau_run
  base = config.optim.learning_rate
  metrics = th.read_metrics(workdir)
  lrs = [metrics[('train', s)]['learning_rate'] for s in range(1, 5)]
  np.testing.assert_allclose(lrs, [base, base, base / 10, base / 100],
                             rtol=1e-6)
  assert sorted(s for split, s in metrics if split == 'val') == [1, 2, 3, 4]
  assert float(optimizer_lib.get_learning_rate(state.opt_state)) == (
      pytest.approx(base / 100, rel=1e-6))
  drops = [m for m in messages if 'learning rate divided by 10' in m]
  assert len(drops) == 2 and drops[0].endswith('at step 2.') and (
      drops[1].endswith('at step 3.')), drops

  assert th.checkpoint_steps(workdir) == [2, 4]
  mesh = mesh_lib.make_mesh(config.model.num_towers, 1, 1)
  abstract, _ = run_dir.abstract_train_state(
      config, create_model(config.model),
      optimizer_lib.create_optimizer(config.optim), mesh)
  manager = checkpoint_lib.create_manager(run_dir.checkpoint_dir(workdir),
                                          config.checkpoint)
  try:
    saved = {s: checkpoint_lib.restore(manager, abstract, mesh, s)
             for s in (2, 4)}
  finally:
    manager.close()
  assert list(saved[2][1]['schedule']['drop_steps']) == [2]
  assert list(saved[4][1]['schedule']['drop_steps']) == [2, 3]
  assert saved[4][1]['schedule']['drops'] == 2
  # The checkpoint of step 2 was saved after that step's drop was decided,
  # before the next step wrote it into the optimizer state.
  assert float(optimizer_lib.get_learning_rate(
      saved[2][0].opt_state)) == pytest.approx(base, rel=1e-6)
  assert float(optimizer_lib.get_learning_rate(
      saved[4][0].opt_state)) == pytest.approx(base / 100, rel=1e-6)


# ----------------------------------------------------- live units (§5)
def hidden_features(model, params, images):
  return jax.device_get(jax.jit(reference_layers, static_argnums=0)(
      model, params, images)[1])


def set_live_units(model, params, images, layer, live_per_tower, rng):
  """params with `layer`'s biases set so that exactly live_per_tower[t]
  units of tower t fire for some image (their largest pre-activation over
  the batch is +margin) and the rest for none (-margin), units chosen at
  random; the pre-activations come from the reference."""
  hidden = hidden_features(model, params, images)
  bias = np.asarray(params[layer]['bias'], np.float64)  # (towers, units)
  z = np.asarray(hidden[f'{layer}_pre'], np.float64) - bias.reshape(-1)
  margin = 0.1 * z.std()
  live = np.zeros(bias.shape, bool)
  for t, n in enumerate(live_per_tower):
    live[t, rng.choice(bias.shape[1], n, replace=False)] = True
  new = -z.max(axis=0).reshape(bias.shape) + np.where(live, margin, -margin)
  params = jax.tree.map(lambda x: x, params)
  params[layer] = {**params[layer], 'bias': jnp.asarray(new, jnp.float32)}
  return params


def test_live_units_are_the_fraction_firing_on_some_image():
  """train.live_units on a (2, 2) mesh against a network built to have
  exactly 18 of 32 fc6 units (12 + 6 by tower) and 10 of 32 fc7 units
  (2 + 8) firing on some image of the batch, and against numpy on the
  reference's fc6/fc7 activations. Catches '>= 0' for '> 0' (100%), a
  mean over images (or 'all') instead of 'any', one tower's units only
  (75% / 6%) and the layers swapped."""
  seed, rng = fresh_rng()
  model, params, images, _ = init_small(rng, batch=8)
  params = set_live_units(model, params, images, 'fc6', (12, 6), rng)
  params = set_live_units(model, params, images, 'fc7', (2, 8), rng)
  hidden = hidden_features(model, params, images)
  numpy_live = {l: float((np.asarray(hidden[l]) > 0).any(axis=0).mean())
                for l in ('fc6', 'fc7')}
  assert numpy_live == {'fc6': 18 / 32, 'fc7': 10 / 32}, seed
  mesh = mesh_lib.make_mesh(2, 2, 2)
  sharded = jax.device_put(params, mesh_lib.param_shardings(mesh, params))
  got = train.live_units(model, mesh, sharded, images)
  assert {l: float(v) for l, v in got.items()} == numpy_live, seed


def test_run_logs_the_step_0_live_units_of_its_first_batch(plateau_run):
  """The trainer's step-0 log line holds live_units of the initial
  parameters on the first training batch (recomputed here from the config:
  the same init and batch), as the numpy count on the reference's
  activations gives them."""
  config, _, _, messages = plateau_run
  lines = [m for m in messages if m.startswith('Live ReLU units at step 0')]
  assert len(lines) == 1, lines
  logged = re.search(r'fc6 ([\d.]+)%, fc7 ([\d.]+)%', lines[0]).groups()
  model = create_model(config.model)
  mesh = mesh_lib.make_mesh(config.model.num_towers,
                            config.mesh.tower_axis_size,
                            config.mesh.data_axis_size)
  _, init = run_dir.abstract_train_state(
      config, model, optimizer_lib.create_optimizer(config.optim), mesh)
  params = init().params
  batches = input_pipeline.train_iterator(config, mesh)
  try:
    images = next(batches)['images']
  finally:
    batches.close()
  live = train.live_units(model, mesh, params, images)
  hidden = hidden_features(model, jax.device_get(params),
                           np.asarray(images))
  for layer, text in zip(('fc6', 'fc7'), logged):
    ours = (np.asarray(hidden[layer]) > 0).any(axis=0).mean()
    assert float(live[layer]) == pytest.approx(ours, abs=1e-7), layer
    assert text == f'{100 * ours:.1f}', (layer, lines[0])
  assert min(float(v) for v in live.values()) < 1.0, live  # Not trivial.


# ---------------------------------------------------- PCA lighting (§4.1)
def test_pca_lighting_noise_has_the_papers_covariance_per_component():
  """The shift pca_lighting adds to every pixel, over N stateless draws,
  has covariance V diag((0.1 s)^2) V^T: in eigen-coordinates (V^-1 shift =
  alpha s) each component's variance is (0.1 s_i)^2 within 5 standard errors
  of the variance estimator (relative 5 sqrt(2/N) = 4.5% at N = 25,000),
  each component's mean 0 within 5 standard errors, and the components'
  correlations 0 within 5/sqrt(N). Per component, so the smallest one
  ((0.1 x 19.72)^2 = 3.9, 3% of the largest) is held to its own size.
  Catches eigenvalues for standard deviations, a wrong alpha stddev, the
  stddevs permuted (even the two smaller ones swapped), V transposed, and
  one alpha shared by the three components."""
  d = get_config().data
  v, s, sd = (np.array(d.pca_eigvecs), np.array(d.pca_stddevs),
              d.pca_alpha_stddev)
  n = 25_000
  ds = tf.data.Dataset.range(n).map(
      lambda i: pp.pca_lighting(tf.zeros((1, 1, 3)), tf.stack([i, i * 0 + 1]),
                                d.pca_eigvecs, d.pca_stddevs, sd)[0, 0],
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  shifts = np.concatenate(list(ds.batch(5000).as_numpy_iterator())).astype(
      np.float64)
  assert shifts.shape == (n, 3)
  components = np.linalg.solve(v, shifts.T).T  # alpha * s per draw.
  want_var = (sd * s) ** 2
  var = components.var(axis=0)
  np.testing.assert_array_less(np.abs(var / want_var - 1),
                               5 * np.sqrt(2 / n))
  np.testing.assert_array_less(np.abs(components.mean(axis=0)),
                               5 * np.sqrt(want_var / n))
  corr = np.corrcoef(components.T)
  off = corr[~np.eye(3, dtype=bool)]
  np.testing.assert_array_less(np.abs(off), 5 / np.sqrt(n))
  # And so the RGB covariance, entry by entry, relative to its scale.
  want = v @ np.diag(want_var) @ v.T
  np.testing.assert_allclose(np.cov(shifts.T), want,
                             atol=5 * np.sqrt(2 / n) * want_var.max())
