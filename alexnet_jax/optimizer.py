"""The paper's update rule (§5) as an optax chain.

    v <- momentum * v - weight_decay * lr * w - lr * grad
    w <- w + v

The learning rate sits inside the velocity, unlike optax.sgd (and PyTorch),
whose velocity accumulates raw gradients and is scaled by the lr of the
current step: the two differ right after a learning-rate drop.

The learning rate is an injected hyperparameter held in the optimizer state
(`opt_state.hyperparams['learning_rate']`), so a schedule changes it between
steps without recompiling, and a checkpoint keeps it.
"""

import jax
import jax.numpy as jnp
import optax


def _is(name):
  """Mask function: True at parameters whose last path key is `name`."""

  def mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], 'key', None) == name, params)

  return mask


is_kernel, is_bias = _is('kernel'), _is('bias')


def paper_sgd(learning_rate, momentum, weight_decay, bias_lr_multiplier=1.0,
              decay_biases=True):
  """v <- m v - wd lr w - lr g; w <- w + v, with cuda-convnet's switches.

  decay_biases=False decays weights (kernels) only; bias_lr_multiplier=2
  gives biases twice the learning rate: both as in the authors' code.
  """
  return optax.chain(
      optax.add_decayed_weights(
          weight_decay, mask=None if decay_biases else is_kernel),
      optax.masked(optax.scale(bias_lr_multiplier), is_bias),
      optax.scale_by_learning_rate(learning_rate),  # Multiplies by -lr.
      optax.trace(decay=momentum),  # v <- m v + u; the update is v.
  )


def create_optimizer(optim_config) -> optax.GradientTransformation:
  """The optimizer of `config.optim` (configs/alexnet.py)."""
  return optax.inject_hyperparams(paper_sgd, static_args=('decay_biases',))(
      learning_rate=optim_config.learning_rate,
      momentum=optim_config.momentum,
      weight_decay=optim_config.weight_decay,
      bias_lr_multiplier=optim_config.bias_lr_multiplier,
      decay_biases=optim_config.decay_biases)


def get_learning_rate(opt_state) -> jax.Array:
  return opt_state.hyperparams['learning_rate']


def set_learning_rate(opt_state, learning_rate):
  """A copy of `opt_state` whose next updates use `learning_rate`."""
  old = opt_state.hyperparams['learning_rate']
  new = jax.device_put(jnp.asarray(learning_rate, old.dtype), old.sharding)
  return opt_state._replace(
      hyperparams={**opt_state.hyperparams, 'learning_rate': new})
