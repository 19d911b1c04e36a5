"""The train state, the jit-compiled train step over the mesh, and the eval step."""

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from alexnet_jax import mesh as mesh_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # Number of updates applied.
  params: Any
  opt_state: Any
  rng: jax.Array  # Base dropout key; step s uses fold_in(rng, s).


def state_shardings(mesh, state):
  """Shardings of a (possibly abstract) TrainState: weights and their
  optimizer statistics by tower, everything else replicated."""
  specs = mesh_lib.param_specs(state.params)
  params_tree = jax.tree.structure(state.params)
  by_tower = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  replicated = NamedSharding(mesh, P())

  def is_params_like(node):
    return jax.tree.structure(node) == params_tree

  def sharding(node):  # A params-shaped subtree (e.g. the momentum) or a leaf.
    return by_tower if is_params_like(node) else replicated

  return TrainState(
      step=replicated, params=by_tower,
      opt_state=jax.tree.map(sharding, state.opt_state, is_leaf=is_params_like),
      rng=replicated)


def create_train_state(model, tx, mesh, rng, image_size: int) -> TrainState:
  """Parameters initialised as the paper says, sharded over the mesh.

  The parameters are a function of `rng` alone, whatever the mesh.
  """
  init_rng, dropout_rng = jax.random.split(rng)

  def init():
    params = model.init(init_rng, jnp.zeros((1, image_size, image_size, 3),
                                             jnp.float32))['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=dropout_rng)

  shardings = state_shardings(mesh, jax.eval_shape(init))
  return jax.jit(init, out_shardings=shardings)()


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def view_log_probs(apply, params, images):
  """Log-probabilities (B, classes) of images (B, H, W, 3), or for (B, V, H,
  W, 3) the log of the softmax averaged over each image's V views (§4.1)."""
  if images.ndim == 4:
    return jax.nn.log_softmax(apply(params, images).astype(jnp.float32))
  b, v = images.shape[:2]
  # Example-major views: data shards keep whole examples.
  logits = apply(params, images.reshape((b * v,) + images.shape[2:]))
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  return (jax.nn.logsumexp(log_probs.reshape(b, v, -1), axis=1) -
          jnp.log(float(v)))


def top_k_correct(logits, labels, k):
  """1.0 where the label is within the top k, honest on ties: fewer than k
  other classes score at least as high as the label (a class whose score is
  not below the label's, NaN included, counts against it). A network whose
  logits are all equal scores 0."""
  label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  # The label itself is never below itself (and a NaN label is): minus 1.
  at_least_as_high = (~(logits < label_logit)).sum(axis=-1) - 1
  return (at_least_as_high < k).astype(jnp.float32)


def make_train_step(model, tx, mesh, state):
  """`train_step(state, batch) -> (state, metrics)`, jit-compiled over `mesh`.

  batch: {'images': (B, H, W, 3) float32, 'labels': (B,) int32}, sharded (or
  to be sharded) over 'data'. The state is donated. The loss is the mean over
  the global batch, so parameter gradients are averaged over 'data' exactly
  once (shard_map's transpose sums the per-shard contributions of 1/B-weighted
  losses) and each tower's weights get only their own gradient.
  """
  apply = mesh_lib.sharded_apply(model, mesh)
  shardings = state_shardings(mesh, state)
  batch_sharding = mesh_lib.data_sharding(mesh)

  def loss_fn(params, images, labels, dropout_rng):
    logits = apply(params, images, train=True, dropout_rng=dropout_rng)
    return cross_entropy(logits, labels), logits

  @functools.partial(
      jax.jit, donate_argnums=0,
      in_shardings=(shardings, batch_sharding),
      out_shardings=(shardings, NamedSharding(mesh, P())))
  def train_step(state, batch):
    dropout_rng = jax.random.fold_in(state.rng, state.step)
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch['images'], batch['labels'], dropout_rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        'loss': loss,
        'top1_error': 1.0 - top_k_correct(logits, batch['labels'], 1).mean(),
        'top5_error': 1.0 - top_k_correct(logits, batch['labels'], 5).mean(),
        'learning_rate': opt_state.hyperparams['learning_rate'],
        'grad_norm': optax.tree.norm(grads),
        'param_norm': optax.tree.norm(params),
    }
    new_state = state.replace(step=state.step + 1, params=params,
                              opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_predict_step(model, mesh, params):
  """`predict_step(params, images) -> log_probs` (B, classes), on the mesh.

  images (B, H, W, 3): the log-softmax of each image; (B, V, H, W, 3): the
  log of the softmax averaged over the V views (§4.1), as eval_step.
  """
  apply = mesh_lib.sharded_apply(model, mesh)
  by_data = mesh_lib.data_sharding(mesh)

  @functools.partial(jax.jit, out_shardings=by_data,
                     in_shardings=(mesh_lib.param_shardings(mesh, params),
                                   by_data))
  def predict_step(params, images):
    return view_log_probs(apply, params, images)

  return predict_step


def make_eval_step(model, mesh, params):
  """`eval_step(params, batch) -> sums` over the mesh, centre or multi-crop.

  batch['images'] is (B, H, W, 3), or (B, V, H, W, 3) for V views of each
  image (e.g. the 10 crops), whose softmax outputs are averaged (§4.1).
  batch['mask'] (optional) marks real examples (1) and padding (0). Returns
  sums over real examples: loss, top-1/top-5 correct, count.
  """
  apply = mesh_lib.sharded_apply(model, mesh)

  @functools.partial(jax.jit, in_shardings=(
      mesh_lib.param_shardings(mesh, params), None),
                     out_shardings=NamedSharding(mesh, P()))
  def eval_step(params, batch):
    images, labels = batch['images'], batch['labels']
    mask = batch.get('mask', jnp.ones(labels.shape, jnp.float32))
    mask = mask.astype(jnp.float32)
    log_probs = view_log_probs(apply, params, images)
    losses = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    return {
        'loss': (losses * mask).sum(),
        'top1_correct': (top_k_correct(log_probs, labels, 1) * mask).sum(),
        'top5_correct': (top_k_correct(log_probs, labels, 5) * mask).sum(),
        'count': mask.sum(),
    }

  return eval_step
