"""alexnet_jax.conv: the tap-by-tap kernel gradient against XLA's own."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from alexnet_jax import conv as conv_lib
from alexnet_jax.mesh import make_mesh


@pytest.mark.parametrize('size,kernel,stride,padding', [
    (224, 11, 4, ((2, 1), (2, 1))),  # conv1 at 224 (cuda-convnet's padding)
    (227, 11, 4, ((0, 0), (0, 0))),  # conv1 at 227
    (224, 11, 4, ((2, 2), (2, 2))),  # torchvision's padding: unused border
    (27, 5, 1, ((2, 2), (2, 2))),    # conv2
    (13, 3, 1, ((1, 1), (1, 1))),    # conv3-5
    (20, 3, 2, ((0, 1), (1, 0))),    # kernel not a multiple of the stride
    (17, 4, 3, ((0, 0), (0, 0))),
])
def test_kernel_grad_taps_matches_xla(size, kernel, stride, padding):
  rng = np.random.default_rng(size + kernel + stride)
  with jax.enable_x64(True):
    # Non-square input: rows and columns must not be swapped.
    x = jnp.asarray(rng.normal(size=(2, size, size + stride, 3)))
    k = jnp.asarray(rng.normal(size=(kernel, kernel, 3, 5)))
    y, vjp = jax.vjp(lambda k: conv_lib.xla_conv(x, k, stride, padding), k)
    dy = jnp.asarray(rng.normal(size=y.shape))
    got = conv_lib.kernel_grad_taps(x, dy, k.shape, stride, padding)
    np.testing.assert_allclose(got, vjp(dy)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('stride,padding', [(4, ((2, 1), (2, 1))),
                                            (1, ((1, 1), (1, 1)))])
def test_shared_input_towers_match_separate_xla_convs(stride, padding):
  """conv() of one input with a stack of kernels: each output, and the
  gradients of the input and of every kernel, as separate XLA convs."""
  rng = np.random.default_rng(stride)
  size, kernel = (35, 11) if stride == 4 else (9, 3)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.normal(size=(3, size, size, 4)))
    ks = jnp.asarray(rng.normal(size=(2, kernel, kernel, 4, 6)))
    w = jnp.asarray(rng.normal(size=(2,) + conv_lib.xla_conv(
        x, ks[0], stride, padding).shape))

    def loss(x, ks, kernel_grad):
      ys = conv_lib.conv(x, ks, stride, padding, kernel_grad)
      return sum(jnp.sum(y * w[t]) for t, y in enumerate(ys))

    got = jax.value_and_grad(loss, (0, 1))(x, ks, 'taps')
    want = jax.value_and_grad(loss, (0, 1))(x, ks, 'xla')
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-10)


def test_taps_under_shard_map_sums_kernel_gradient_over_data():
  """A replicated kernel, a data-sharded input: the kernel's gradient is
  the sum over all shards' examples, as with XLA's own rule."""
  mesh = make_mesh(num_towers=1, tower_axis_size=1, data_axis_size=4)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 13, 13, 4)), jnp.float32)
  ks = jnp.asarray(rng.normal(size=(1, 3, 3, 4, 5)), jnp.float32)
  pad = ((1, 1), (1, 1))

  def grad(kernel_grad):
    def local(x, ks):
      return jax.lax.psum(
          jnp.sum(conv_lib.conv(x, ks, 1, pad, kernel_grad)[0] ** 2), 'data')
    f = jax.shard_map(local, mesh=mesh, in_specs=(P('data'), P()),
                      out_specs=P())
    return jax.jit(jax.grad(f, argnums=1))(x, ks)

  np.testing.assert_allclose(grad('taps'), grad('xla'), rtol=2e-5, atol=1e-3)
  full = jax.grad(lambda ks: jnp.sum(conv_lib.xla_conv(x, ks[0], 1, pad)
                                     ** 2))(ks)
  np.testing.assert_allclose(grad('taps'), full, rtol=2e-5, atol=1e-3)


def test_unknown_kernel_grad_is_an_error():
  x = jnp.zeros((1, 5, 5, 1))
  with pytest.raises(ValueError, match="'auto', 'xla' or 'taps'"):
    conv_lib.conv(x, jnp.zeros((1, 3, 3, 1, 1)), 1, ((1, 1), (1, 1)), 'rows')


def test_auto_follows_the_convolution_library(monkeypatch):
  """'auto' on the CPU: taps with XLA's default convolutions, XLA's own
  gradient with the XNNPACK convolutions the entry points ask for."""
  from alexnet_jax import xla_cpu  # pylint: disable=g-import-not-at-top
  x, ks = jnp.zeros((1, 5, 5, 1)), jnp.zeros((1, 3, 3, 1, 1))

  def uses_taps():
    jaxpr = jax.make_jaxpr(lambda x, ks: conv_lib.conv(
        x, ks, 1, ((1, 1), (1, 1)), 'auto'))(x, ks)
    return 'custom_vjp_call' in str(jaxpr)

  monkeypatch.delenv('XLA_FLAGS', raising=False)
  assert uses_taps()
  xla_cpu.set_flags()  # Only the environment: this process's XLA is up.
  assert not uses_taps()
  monkeypatch.delenv('XLA_FLAGS')
  xla_cpu.set_flags(xnn_convolutions=False)
  assert uses_taps()
