"""What crosses between devices: the collectives of a compiled step, read from
its HLO, and the cross-tower traffic worked out from the layer table.

Bytes "moved" are the bytes each device receives in a ring implementation:
an all-gather or reduce-scatter over n devices moves (n-1)/n of the full
array, an all-reduce 2(n-1)/n of it.
"""

import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alexnet_jax import mesh as mesh_lib

_KINDS = ('all-gather', 'all-reduce', 'reduce-scatter', 'collective-permute',
          'all-to-all')
_DTYPE_BYTES = {'f32': 4, 'bf16': 2, 'f16': 2, 's32': 4, 'u32': 4, 'f64': 8,
                's64': 8, 'pred': 1, 'u8': 1, 's8': 1}
_OP = re.compile(
    r'^\s*%?(?P<name>\S+) = (?P<shape>.+?) (?P<kind>' + '|'.join(_KINDS) +
    r')(?:-start)?\((?P<args>.*)$')
_ARRAY = re.compile(r'(\w+)\[([\d,]*)\]')


@dataclasses.dataclass
class Collective:
  kind: str
  groups: tuple  # Device-id groups, or () when HLO gives them in iota form.
  shapes: list  # [(dtype, dims)] of the result (all arrays of a tuple).
  op_name: str

  @property
  def elements(self):
    return sum(math.prod(d) for _, d in self.shapes)

  @property
  def bytes(self):
    return sum(_DTYPE_BYTES[t] * math.prod(d) for t, d in self.shapes)

  @property
  def group_size(self):
    return len(self.groups[0]) if self.groups else 0

  def bytes_moved(self):
    """Bytes each device receives (ring algorithms)."""
    n = self.group_size
    if n <= 1:
      return 0
    if self.kind == 'all-gather':
      return self.bytes * (n - 1) // n
    if self.kind == 'reduce-scatter':  # The result is 1/n of the operand.
      return self.bytes * (n - 1)
    if self.kind == 'all-reduce':
      return 2 * self.bytes * (n - 1) // n
    return self.bytes


def collectives(hlo_text: str):
  """The collectives of an optimised HLO module, in program order."""
  found = []
  for line in hlo_text.splitlines():
    m = _OP.match(line)
    if not m:
      continue
    shapes = [(t, tuple(int(x) for x in d.split(',') if x))
              for t, d in _ARRAY.findall(m['shape'])]
    g = re.search(r'replica_groups=\{(\{[\d,{}]*\})\}', line)
    groups = tuple(tuple(int(x) for x in grp.split(','))
                   for grp in re.findall(r'\{([\d,]+)\}', g[1])) if g else ()
    op = re.search(r'op_name="([^"]*)"', line)
    found.append(Collective(m['kind'], groups, shapes, op[1] if op else ''))
  return found


def axis_groups(mesh, axis):
  """Device-id groups of the collectives over `axis` of `mesh`."""
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  i = mesh.axis_names.index(axis)
  ids = np.moveaxis(ids, i, -1).reshape(-1, mesh.shape[axis])
  return tuple(sorted(tuple(sorted(int(x) for x in g)) for g in ids))


def by_axis(found, mesh):
  """{'tower': [...], 'data': [...], 'other': [...]} by replica groups."""
  out = {mesh_lib.TOWER: [], mesh_lib.DATA: [], 'other': []}
  groups = {a: axis_groups(mesh, a) for a in (mesh_lib.TOWER, mesh_lib.DATA)}
  for c in found:
    key = tuple(sorted(tuple(sorted(g)) for g in c.groups))
    axis = next((a for a, g in groups.items() if key == g), 'other')
    out[axis].append(c)
  return out


def exchange_table(model, image_size: int):
  """Per-image cross-tower traffic the layer table implies, forward pass.

  For each exchange (conv3, fc6, fc7 gather every tower's maps; fc8 sums
  partial logits): floats each tower contributes per image, and the bytes a
  device holding one tower receives (float32) when the towers sit on
  `num_towers` devices. The backward pass moves the same amounts the other
  way (reduce-scatter for a gather; nothing for fc8's sum, whose transpose is
  a broadcast).
  """
  # Each exchange's layer and per-tower input, from the model's own calls.
  exchanges = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == '_exchange':
      layer, xs = args
      exchanges.append((layer, xs[0].shape))
    return next_fun(*args, **kwargs)

  image = jnp.zeros((1, image_size, image_size, 3))
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), image)
  with nn.intercept_methods(record):
    jax.eval_shape(model.apply, params, image)
  t = model.num_towers
  rows = []
  for name, shape in exchanges:
    per_tower = math.prod(shape[1:])
    rows.append({'layer': name, 'kind': 'all-gather',
                 'floats_per_tower': per_tower,
                 'bytes_received': 4 * per_tower * (t - 1)})
  rows.append({'layer': 'fc8', 'kind': 'all-reduce',
               'floats_per_tower': model.num_classes,
               'bytes_received': 2 * 4 * model.num_classes * (t - 1) // t})
  return rows
