"""The network: exact parameter counts, shapes, and sharded == reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax import mesh as mesh_lib
from alexnet_jax.model import conv1_padding, create_model, dropout_mask, lrn
from configs.alexnet import get_config
from tests.reference import fresh_rng, init_small, lrn as reference_lrn
from tests.reference import rel_err
from tests.reference import (reference_forward, reference_train_in_float64,
                             xent)

# docs/PAPER.md's layer table.
PAPER_PARAMS = {'conv1': 34_944, 'conv2': 307_456, 'conv3': 885_120,
                'conv4': 663_936, 'conv5': 442_624, 'fc6': 37_752_832,
                'fc7': 16_781_312, 'fc8': 4_097_000}

MESHES = [(1, 1), (1, 2), (2, 2), (4, 2), (8, 1)]


def param_shapes(model, size):
  v = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                     jnp.zeros((1, size, size, 3)))
  return v['params']


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_paper_parameter_count_is_exact():
  params = param_shapes(create_model(get_config().model), 224)
  assert count(params) == 60_965_224
  assert {k: count(v) for k, v in params.items()} == PAPER_PARAMS
  # Each tower-local layer is split evenly; only fc8's bias has no tower.
  for layer, p in params.items():
    assert p['kernel'].shape[0] == 2, layer
  assert params['fc8']['bias'].shape == (1000,)
  # fc6 reads 2 x 6x6x128 maps: conv1 made 55x55 maps (55 -> 27 -> 13 -> 6).
  assert params['fc6']['kernel'].shape == (2, 9216, 2048)


def test_depth_variants_rename_the_per_layer_settings():
  """deeper/shallower rename the conv layers after the one added/removed,
  and the exchange and bias-1 settings follow, in any variant order: the
  last conv layer keeps the paper's bias 1; exchange_all exchanges before
  every layer of the net it is given."""
  def config(variant):
    return get_config(variant).model
  convs = lambda n: tuple(f'conv{k}' for k in range(2, n + 1))
  for variant in ('deeper,exchange_all', 'exchange_all,deeper'):
    assert config(variant).exchange == convs(6) + ('fc6', 'fc7'), variant
  for variant in ('shallower,exchange_all', 'exchange_all,shallower'):
    assert config(variant).exchange == convs(4) + ('fc6', 'fc7'), variant
    model = create_model(config(variant))
    assert 'conv5' not in param_shapes(model, 224)
  assert config('deeper').exchange == ('conv3', 'fc6', 'fc7')
  model = create_model(config('demo,deeper'))
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  biases = {k: np.unique(v['bias']).tolist()
            for k, v in params['params'].items()}
  assert biases == {'conv1': [0], 'conv2': [1], 'conv3': [0], 'conv4': [1],
                    'conv5': [1], 'conv6': [1], 'fc6': [1], 'fc7': [1],
                    'fc8': [0]}
  assert config('shallower').init_bias_one == ('conv2', 'conv4', 'fc6',
                                                'fc7')


@pytest.mark.parametrize('mode,size', [('cuda-convnet', 224), ('valid', 227),
                                       ('torchvision', 224)])
def test_conv1_makes_55x55_maps(mode, size):
  pad = conv1_padding(mode, size)
  out = [(size + sum(p) - 11) // 4 + 1 for p in pad]
  assert out == [55, 55]
  if mode == 'cuda-convnet':
    assert pad == ((0, 3), (0, 3))  # Zeros past the bottom/right edge only.
  model = create_model(get_config().model, conv1_padding=mode)
  assert count(param_shapes(model, size)) == 60_965_224


def test_ablation_variants_build():
  one = param_shapes(create_model(get_config('one_tower').model), 224)
  # One tower, half the kernels but conv5 and fc whole (paper, footnote 2).
  assert one['conv1']['kernel'].shape == (1, 11, 11, 3, 48)
  assert one['conv5']['kernel'].shape == (1, 3, 3, 192, 256)
  assert one['fc6']['kernel'].shape == (1, 9216, 4096)
  for variant in ('no_lrn', 'no_overlap', 'tanh'):
    model = create_model(get_config(variant).model)
    assert count(param_shapes(model, 224)) == 60_965_224, variant
  # Depth +/- one conv layer: another 3x3x192x192 layer per tower, or none.
  extra = 2 * (3 * 3 * 192 * 192 + 192)
  deeper = param_shapes(create_model(get_config('deeper').model), 224)
  assert count(deeper) == 60_965_224 + extra
  assert deeper['conv6']['kernel'].shape == (2, 3, 3, 192, 128)
  shallower = param_shapes(create_model(get_config('shallower').model), 224)
  assert count(shallower) == 60_965_224 - extra
  assert 'conv5' not in shallower
  # Towers that never exchange: conv3 and the fc layers read one tower.
  alone = param_shapes(create_model(get_config('no_exchange').model), 224)
  assert alone['conv3']['kernel'].shape == (2, 3, 3, 128, 192)
  assert alone['fc6']['kernel'].shape == (2, 4608, 2048)


# Every mesh with the paper's dropout scaling (the default); with 'inverted',
# one mesh with both a tower per device and the data axis.
SCALED_MESHES = ([(shape, 'paper') for shape in MESHES] +
                 [((2, 2), 'inverted')])


@pytest.mark.parametrize('shape,dropout_scaling', SCALED_MESHES, ids=str)
def test_sharded_equals_reference(shape, dropout_scaling):
  """Forward logits (with and without dropout) and gradients (with dropout)
  of the towers-on-a-mesh model equal the single-device grouped-convolution
  network's, on fresh random inputs, in either dropout scaling (catches the
  model scaling in the wrong mode or phase: train by 1/(1-rate) in 'paper',
  eval by 1-rate in 'inverted', or not at all).

  Logits: the float32 model against the float64 reference. Gradients: both
  in float64, since a max-pool's gradient jumps where two inputs of a window
  nearly tie, and float32 and float64 break such near-ties differently
  (about one test in ten meets one and differs by ~1e-3 in conv1's bias)."""
  seed, rng = fresh_rng()
  model, params, images, labels = init_small(
      rng, dropout_scaling=dropout_scaling)
  mesh = mesh_lib.make_mesh(2, shape[1], shape[0])
  dropout_rng = jax.random.PRNGKey(seed)

  def sharded_loss_and_grad(model, params):
    apply = mesh_lib.sharded_apply(model, mesh)
    sharded = jax.device_put(params, mesh_lib.param_shardings(mesh, params))

    @jax.jit
    def loss_and_grad(p):
      def loss(p):
        logits = apply(p, images, train=True, dropout_rng=dropout_rng)
        return xent(logits, labels), logits
      return jax.value_and_grad(loss, has_aux=True)(p), apply(p, images)

    return loss_and_grad(sharded)

  ((_, logits), _), eval_logits = sharded_loss_and_grad(model, params)
  ref_eval_logits = reference_forward(model, params, images)
  (ref_loss, ref_logits), ref_grads = reference_train_in_float64(
      model, params, images, labels, dropout_rng)
  assert rel_err(eval_logits, ref_eval_logits) <= 1e-5, seed
  assert rel_err(logits, ref_logits) <= 1e-5, seed

  with jax.enable_x64(True):
    params64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
    ((loss, _), grads), _ = sharded_loss_and_grad(
        model.clone(dtype='float64'), params64)
    # The gradients stay where their towers are.
    k = grads['conv2']['kernel']
    by_tower = jax.sharding.NamedSharding(mesh,
                                          jax.sharding.PartitionSpec('tower'))
    assert k.sharding.is_equivalent_to(by_tower, k.ndim)
    grads = jax.device_get(grads)
  assert rel_err(loss, ref_loss) <= 1e-5, seed
  ref = dict(jax.tree_util.tree_leaves_with_path(ref_grads))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert g.dtype == np.float64
    assert rel_err(g, ref[path]) <= 1e-5, (seed, jax.tree_util.keystr(path))


def test_full_size_network_equals_reference():
  """The paper's network itself, 224 crops, on a (2, 2) mesh."""
  seed, rng = fresh_rng()
  model = create_model(get_config().model)
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 224, 224, 3)))
  params = params['params']
  images = jnp.asarray(rng.normal(0, 60, (2, 224, 224, 3)), jnp.float32)
  mesh = mesh_lib.make_mesh(2, 2, 2)
  sharded = jax.device_put(params, mesh_lib.param_shardings(mesh, params))
  got = jax.jit(mesh_lib.sharded_apply(model, mesh))(sharded, images)
  want = reference_forward(model, params, images)
  assert got.shape == (2, 1000)
  assert rel_err(got, want) <= 1e-5, seed


def test_lrn_alpha_over_n_switch():
  seed, rng = fresh_rng()
  model, params, images, _ = init_small(rng, lrn_alpha_over_n=True,
                                        lrn_alpha=0.5)
  got = model.apply({'params': params}, images)
  want = reference_forward(model, params, images)
  assert rel_err(got, want) <= 1e-5, seed
  plain = model.clone(lrn_alpha_over_n=False)
  assert rel_err(plain.apply({'params': params}, images), want) > 1e-3


@pytest.mark.parametrize('beta', [0.75, 0.5])
def test_lrn_value_and_hand_written_gradient(beta):
  """lrn's custom gradient against autodiff of the reference's shifted
  sums, with an alpha large enough that the cross-channel term matters."""
  rng = np.random.default_rng(int(beta * 100))
  with jax.enable_x64(True):
    x = jnp.asarray(rng.normal(size=(2, 4, 4, 9)) * 3)
    w = jnp.asarray(rng.normal(size=x.shape))
    ours = lambda x: jnp.sum(w * lrn(x, k=2.0, n=5, alpha=0.05, beta=beta))
    ref = lambda x: jnp.sum(w * reference_lrn(x, 1, 2.0, 5, 0.05, beta))
    np.testing.assert_allclose(ours(x), ref(x), rtol=1e-12)
    np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(ref)(x),
                               rtol=1e-10, atol=1e-12)


def test_dropout_masks_rate_and_independence():
  rng = jax.random.PRNGKey(0)
  ids = jnp.arange(256)
  m = dropout_mask(rng, 'fc6', 0, ids, (2048,), 0.5)
  dropped = float((m == 0).mean())
  assert abs(dropped - 0.5) < 0.005
  # A 0/1 keep-mask: the scaling is the model's (dropout_scaling), not the
  # mask's (catches a mask still divided by 1 - rate: {0, 2}).
  assert set(np.unique(np.asarray(m))) == {0.0, 1.0}
  assert m.dtype == jnp.float32
  assert float((dropout_mask(rng, 'fc6', 0, ids, (2048,), 0.2) == 0).mean()
               ) == pytest.approx(0.2, abs=0.005)
  # Different per example, per tower, per layer.
  assert not np.array_equal(m[0], m[1])
  assert not np.array_equal(m, dropout_mask(rng, 'fc6', 1, ids, (2048,), 0.5))
  assert not np.array_equal(m, dropout_mask(rng, 'fc7', 0, ids, (2048,), 0.5))


@functools.partial(jax.jit, static_argnums=0, static_argnames='train')
def _fc_features(model, params, images, **kw):
  _, state = model.apply({'params': params}, images, mutable=['intermediates'],
                         **kw)
  inter = state['intermediates']
  return {l: jnp.concatenate(inter[f'{l}_features'][0], axis=-1)
          for l in ('fc6', 'fc7')}


def fc_features(model, params, images, **kw):
  """The model's sown fc6 and fc7 features (every tower's units, in tower
  order), as float64 numpy."""
  return {k: np.asarray(v, np.float64)
          for k, v in _fc_features(model, params, images, **kw).items()}


@pytest.mark.parametrize('dropout_scaling', ['paper', 'inverted'])
def test_dropout_train_features_average_to_the_eval_features(dropout_scaling):
  """In either scaling the train-mode fc6 features, averaged over many
  masks, are the eval-mode features: E[x * mask * c] = x (1 - rate) c, with
  c = 1 (paper: eval x (1 - rate)) or 1 / (1 - rate) (inverted: eval x).

  One image repeated N times, each copy its own example id and so its own
  masks. Each unit's mean has standard error x c sqrt(rate (1 - rate) / N);
  every unit must be within 5 of them. A rate of 0.3, not 0.5, so that rate
  and 1 - rate differ. Catches a scaling missing, doubled, applied in the
  wrong phase or by `rate` instead of `1 - rate` (each is off by >= 30% of
  x, >= 10 standard errors at N = 512), and masks repeated across examples
  (the mean would be one mask)."""
  seed, rng = fresh_rng()
  rate, n = 0.3, 512
  # 67 pixels: the smallest input with a 1x1 pool5, to keep N images cheap;
  # 128 fc units.
  model, params, image, _ = init_small(rng, size=67, batch=1,
                                       fc_features=512, dropout_rate=rate,
                                       dropout_scaling=dropout_scaling)
  images = jnp.broadcast_to(image, (n,) + image.shape[1:])
  train = fc_features(model, params, images, train=True,
                      dropout_rng=jax.random.PRNGKey(seed))['fc6']
  want = fc_features(model, params, image)['fc6'][0]  # Eval mode.
  # A unit's largest value over the N draws is x c (kept at least once).
  xc = train.max(0)
  live = xc > 0
  assert live.sum() >= 16, seed  # Enough live units to test.
  kept = (train[:, live] != 0).mean()
  assert abs(kept - (1 - rate)) < 5 * np.sqrt(
      rate * (1 - rate) / train[:, live].size), seed
  stderr = xc[live] * np.sqrt(rate * (1 - rate) / n)
  z = np.abs(train.mean(0)[live] - want[live]) / stderr
  assert z.max() < 5, (seed, z.max())
  np.testing.assert_array_equal(want[~live], 0)  # Dead in eval too.


def test_dropout_scalings_differ_only_by_the_factor():
  """With the same parameters and masks: paper-mode eval fc6 features are
  (1 - rate) = 0.5 x the inverted ones, and paper-mode train features x 2
  are the inverted ones (the same masks, only the scale moved from train to
  test), up to float rounding; the logits differ. Catches a mode switch
  ignored (all equal) or a mode whose masks depend on the scaling."""
  seed, rng = fresh_rng()
  paper, params, images, _ = init_small(rng, dropout_scaling='paper')
  inverted = paper.clone(dropout_scaling='inverted')
  assert paper.dropout_rate == 0.5
  rng = jax.random.PRNGKey(seed)
  p_eval, i_eval = (fc_features(m, params, images) for m in (paper, inverted))
  p_train, i_train = (fc_features(m, params, images, train=True,
                                  dropout_rng=rng) for m in (paper, inverted))
  assert (i_eval['fc6'] > 0).sum() >= 4 and (p_train['fc6'] == 0).any()
  np.testing.assert_array_equal(p_eval['fc6'], 0.5 * i_eval['fc6'])
  np.testing.assert_array_equal(2 * p_train['fc6'], i_train['fc6'])
  np.testing.assert_array_equal(p_train['fc6'] == 0, i_train['fc6'] == 0)
  # fc7 reads the scaled fc6 (its bias is not scaled): the logits differ.
  logits = [m.apply({'params': params}, images) for m in (paper, inverted)]
  assert rel_err(logits[0], logits[1]) > 1e-3, seed


def test_unknown_dropout_scaling_fails_clearly():
  _, rng = fresh_rng()
  model, params, images, _ = init_small(rng, batch=1)
  with pytest.raises(ValueError, match="dropout_scaling='caffe'"):
    model.clone(dropout_scaling='caffe').apply({'params': params}, images)


def test_dropout_differs_across_data_shards_and_is_off_in_eval():
  """A batch of one image repeated: with dropout every example (on every data
  shard) gets its own masks; without it they all agree."""
  _, rng = fresh_rng()
  model, params, images, _ = init_small(rng, batch=8)
  images = jnp.broadcast_to(images[:1], images.shape)
  mesh = mesh_lib.make_mesh(2, 2, 4)
  sharded = jax.device_put(params, mesh_lib.param_shardings(mesh, params))
  apply = jax.jit(mesh_lib.sharded_apply(model, mesh),
                  static_argnames='train')
  out = np.asarray(apply(sharded, images, train=True,
                         dropout_rng=jax.random.PRNGKey(1)))
  assert len({row.tobytes() for row in out}) == 8
  out = np.asarray(apply(sharded, images, train=False))
  # Equal up to float32 rounding (GEMM rounds rows differently by position).
  np.testing.assert_allclose(out, np.broadcast_to(out[:1], out.shape),
                             rtol=1e-5, atol=1e-6 * np.abs(out).max())


def test_batch_not_divisible_by_data_axis_fails_clearly():
  _, rng = fresh_rng()
  model, params, images, _ = init_small(rng, batch=6)
  mesh = mesh_lib.make_mesh(2, 2, 4)
  with pytest.raises(ValueError, match='multiple of 4'):
    mesh_lib.sharded_apply(model, mesh)(params, images)


def test_tower_axis_must_divide_towers():
  with pytest.raises(ValueError, match='must divide'):
    mesh_lib.make_mesh(num_towers=1, tower_axis_size=2)
