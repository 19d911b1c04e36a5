"""The code's layout: modules import only modules of a lower concern (so no
circles and train never imports evaluate), nobody calls another module's
private names, and importing the library does nothing but define things."""

import ast
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# alexnet_jax's modules by concern, lowest first: a module may import only
# modules of a lower tier. Every module must be listed.
TIERS = (
    ('building blocks', ('xla_cpu', 'backends', 'native', 'mesh',
                         'optimizer', 'schedules', 'demo_data', 'paths',
                         'decoded_copy')),
    ('layers, ops, plots, process set-up', (
        'lrn', 'pool', 'preprocess', 'figures', 'audit', 'startup',
        'device_augment')),
    ('training-set statistics', ('data_stats',)),
    ('the network, the data, the steps', ('model', 'input_pipeline',
                                          'train_step')),
    ('checkpoints, the one-time data work', ('checkpoint', 'prepare')),
    ('a run directory', ('run_dir',)),
    ('what a run writes besides checkpoints', ('run_outputs',)),
    ('programs', ('train', 'evaluate')),
    ('the ablation sweep', ('sweep',)),
    ('its report', ('report',)),
)
# The only library modules that may import the configs package: the
# ablation sweep is defined in terms of configs/alexnet.py's variants.
MAY_IMPORT_CONFIGS = ('sweep',)
ENTRY_POINTS = ('launch.py', 'evaluate.py', 'sweep.py', 'report.py')


def project_imports(path):
  """{imported module: lineno} of alexnet_jax.* and configs.* in `path`."""
  found = {}
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module in ('alexnet_jax', 'configs'):
        for a in node.names:
          found[f'{node.module}.{a.name}'] = node.lineno
      elif node.module.startswith(('alexnet_jax.', 'configs.')):
        found[node.module] = node.lineno
    elif isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith(('alexnet_jax.', 'configs.')):
          found[a.name] = node.lineno
  return found


def library_modules():
  return sorted(os.path.basename(p)[:-3] for p in glob.glob(
      os.path.join(ROOT, 'alexnet_jax', '*.py'))
                if not p.endswith('__init__.py'))


def test_every_module_has_a_tier():
  tiered = [m for _, mods in TIERS for m in mods]
  assert sorted(tiered) == library_modules()


def test_modules_import_only_lower_concerns():
  tier = {m: i for i, (_, mods) in enumerate(TIERS) for m in mods}
  wrong = []
  for m in library_modules():
    for imported, line in project_imports(
        os.path.join(ROOT, 'alexnet_jax', f'{m}.py')).items():
      package, name = imported.split('.', 1)
      if package == 'configs':
        if m not in MAY_IMPORT_CONFIGS:
          wrong.append(f'alexnet_jax/{m}.py:{line} imports {imported}')
      elif tier[name] >= tier[m]:
        wrong.append(f'alexnet_jax/{m}.py:{line} imports {imported} '
                     f'({TIERS[tier[name]][0]}, not below '
                     f'{TIERS[tier[m]][0]})')
  assert not wrong, '\n'.join(wrong)


def test_configs_import_one_way():
  assert project_imports(os.path.join(ROOT, 'configs', 'alexnet.py')) == {}
  assert list(project_imports(os.path.join(ROOT, 'configs', 'demo.py'))) == [
      'configs.alexnet']


def _python_files():
  for pattern in ('alexnet_jax/*.py', 'configs/*.py', 'tests/*.py',
                  'benchmarks/*.py', '*.py'):
    yield from sorted(glob.glob(os.path.join(ROOT, pattern)))


def test_no_module_uses_another_modules_private_names():
  """`module._name` where `module` is an imported project module (as
  `from alexnet_jax import x` or `... as y`), anywhere in the repository."""
  wrong = []
  for path in _python_files():
    tree = ast.parse(open(path).read())
    aliases = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module in (
          'alexnet_jax', 'configs', 'tests'):
        aliases |= {a.asname or a.name for a in node.names}
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and node.attr.startswith('_') and
          not node.attr.startswith('__') and
          isinstance(node.value, ast.Name) and node.value.id in aliases):
        wrong.append(f'{os.path.relpath(path, ROOT)}:{node.lineno} '
                     f'{node.value.id}.{node.attr}')
      if isinstance(node, ast.ImportFrom) and node.module and (
          node.module.startswith(('alexnet_jax', 'configs', 'tests'))):
        wrong += [f'{os.path.relpath(path, ROOT)}:{node.lineno} imports '
                  f'{a.name} from {node.module}' for a in node.names
                  if a.name.startswith('_')]
  assert not wrong, '\n'.join(wrong)


def test_no_test_file_imports_another_test_file():
  wrong = [f'{os.path.relpath(p, ROOT)} imports {m}'
           for p in glob.glob(os.path.join(ROOT, 'tests', 'test_*.py'))
           for m in project_imports_tests(p) if m.startswith('tests.test_')]
  assert not wrong, wrong


def project_imports_tests(path):
  out = []
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == 'tests':
        out += [f'tests.{a.name}' for a in node.names]
      elif node.module.startswith('tests.'):
        out.append(node.module)
  return out


@pytest.mark.parametrize('entry', ENTRY_POINTS)
def test_entry_points_set_up_the_process(entry):
  """The process set-up that library modules no longer do on import is done
  by each entry point (report.py runs no TensorFlow and no XLA:CPU work)."""
  source = open(os.path.join(ROOT, entry)).read()
  assert 'startup.quiet_libraries(' in source
  if entry != 'report.py':
    assert 'startup.hide_gpus_from_tensorflow()' in source
    assert 'startup.set_xla_flags(' in source


def test_importing_the_library_does_nothing_but_define_things():
  """In a fresh process: the environment, TensorFlow's visible devices, the
  logging filters and the SIGTERM handler are as they were after importing
  every alexnet_jax module."""
  program = f'''
import importlib, logging, os, signal, sys
sys.path.insert(0, {ROOT!r})
import tensorflow as tf
from absl import logging as absl_logging
calls = []
tf.config.set_visible_devices = lambda *a, **k: calls.append(a)
def state():
  handler = absl_logging.get_absl_handler()
  return (dict(os.environ), list(handler.filters),
          list(logging.getLogger().filters),
          list(logging.getLogger('absl').filters),
          signal.getsignal(signal.SIGTERM))
before = state()
for m in {library_modules()!r}:
  importlib.import_module('alexnet_jax.' + m)
assert state() == before, 'state changed'
assert not calls, calls
print('unchanged')
'''
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out = subprocess.run([sys.executable, '-c', program], env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and 'unchanged' in out.stdout, out.stderr[-3000:]
