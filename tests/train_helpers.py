"""Helpers for the training tests: a tiny config, generated data, subprocesses.

Also a script: `python tests/train_helpers.py WORKDIR OVERRIDES_JSON
[--sleep S] [--emulate_processes N] [--distributed] [--heartbeat S]` runs
`train_and_evaluate` on the tiny config (each batch delayed S seconds, so a
test can kill it mid-run; with N, each global batch is the concatenation of
what N processes would read, so one process reproduces an N-process run;
with --distributed, jax.distributed starts as launch.py starts it, from the
cluster environment the test gives the process).
"""

import glob
import json
import os
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

# Tiny generated ImageNet: 4 classes, 12 training and 6 validation images
# each, small images.
TINY_DATA = dict(demo_num_classes=4, demo_train_per_class=12,
                 demo_val_per_class=6, demo_image_size=(40, 90))


def tiny_config(data_dir=None, **overrides):
  """configs/alexnet.py:demo, shrunk: 8-image batches, 64x64 crops, a few
  steps. overrides: dotted names ('optim.learning_rate') -> values."""
  from configs import alexnet  # pylint: disable=g-import-not-at-top
  config = alexnet.get_config('demo')
  if data_dir is not None:
    config.data.data_dir = data_dir
  config.data.update(TINY_DATA)
  config.data.prefetch = 1
  config.data.num_parallel_calls = 2
  config.model.num_classes = TINY_DATA['demo_num_classes']
  config.model.width_multiplier = 0.125
  config.model.fc_features = 256
  config.batch_size = 8
  config.mesh.data_axis_size = 1  # (1, 2): two towers, fast on 2 cores.
  config.total_steps = 6
  config.schedule.kind = 'constant'
  config.schedule.warmup_epochs = 0.0
  config.eval.every_epochs = 0.0
  config.eval.every_steps = 3
  config.checkpoint.every_epochs = 0.0
  config.checkpoint.every_steps = 2
  config.log_every_steps = 1
  config.figures.enabled = False  # tests/test_run_outputs.py turns them on.
  for name, value in overrides.items():
    *parents, leaf = name.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = tuple(value) if isinstance(value, list) else value
  return config


def prepare_data(data_dir):
  """Generates and builds the tiny demo data once per data_dir."""
  from alexnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  input_pipeline.demo_builder(tiny_config(data_dir))
  return data_dir


def prepare_data_with(data_dir, overrides):
  """Generates and builds the tiny demo data with dotted `overrides`
  (e.g. {'data.demo_num_classes': 3})."""
  from alexnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  input_pipeline.demo_builder(tiny_config(data_dir, **overrides))
  return data_dir


def read_metrics(workdir):
  """{(split, step): record} from a workdir's metrics.jsonl
  (`metrics_of_text`)."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return metrics_of_text(f.read())


def metrics_of_text(text):
  """{(split, step): record} of a metrics.jsonl's text, the last record
  winning (a resumed run logs again the steps a killed run logged after its
  last checkpoint); images/s, a timing, is dropped."""
  out = {}
  for line in text.splitlines():
    r = json.loads(line)
    r.pop('images_per_sec', None)
    out[(r['split'], r['step'])] = r
  return out


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def checkpoint_steps(workdir):
  """Finished checkpoints (orbax renames a step's directory when done)."""
  d = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def restore_latest(workdir, config, mesh=None):
  """The latest checkpoint's (state, extra) as numpy, on `mesh` (default one
  device)."""
  import jax  # pylint: disable=g-import-not-at-top
  from alexnet_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from alexnet_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from alexnet_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from alexnet_jax import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from alexnet_jax import run_dir  # pylint: disable=g-import-not-at-top
  mesh = mesh or mesh_lib.make_mesh(config.model.num_towers, 1, 1)
  abstract, _ = run_dir.abstract_train_state(
      config, model_lib.create_model(config.model),
      optimizer_lib.create_optimizer(config.optim), mesh)
  manager = checkpoint_lib.create_manager(run_dir.checkpoint_dir(workdir),
                                          config.checkpoint)
  state, extra = checkpoint_lib.restore(manager, abstract, mesh)
  manager.close()
  return jax.device_get(state), extra


def subprocess_env(num_devices=8):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={num_devices}'
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  return env


def start(workdir, overrides, sleep=0.0, emulate_processes=0,
          num_devices=2, cluster_env=None, heartbeat=100) -> subprocess.Popen:
  """Runs this file as a script in a subprocess (see the module docstring);
  with `cluster_env` (e.g. a SLURM job step's variables), one process of a
  distributed run."""
  cmd = [sys.executable, os.path.abspath(__file__), workdir,
         json.dumps(overrides), f'--sleep={sleep}',
         f'--emulate_processes={emulate_processes}']
  if cluster_env:
    cmd += ['--distributed', f'--heartbeat={heartbeat}']
  return subprocess.Popen(cmd, env={**subprocess_env(num_devices),
                                    **(cluster_env or {})}, cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def wait_for(predicate, proc, timeout=240.0, what='condition'):
  t0 = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f'Process ended (rc {proc.returncode}) before '
                           f'{what}:\n{proc.stdout.read()[-3000:]}')
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError(f'Timed out waiting for {what}.')
    time.sleep(0.05)


def _emulated_train_iterator(num_processes):
  """train_iterator whose global batch is N processes' local batches."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from alexnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from alexnet_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  original = input_pipeline.train_iterator

  def train_iterator(config, mesh, start_step=0):
    one = mesh_lib.make_mesh(1, 1, 1)
    its = [original(config, one, start_step, process_index=i,
                    process_count=num_processes)
           for i in range(num_processes)]
    sharding = mesh_lib.data_sharding(mesh)
    while True:
      parts = [next(it) for it in its]
      yield {k: jax.device_put(np.concatenate([np.asarray(p[k])
                                               for p in parts]), sharding)
             for k in parts[0]}

  return train_iterator


def _main(argv):
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser()
  parser.add_argument('workdir')
  parser.add_argument('overrides')
  parser.add_argument('--sleep', type=float, default=0.0)
  parser.add_argument('--emulate_processes', type=int, default=0)
  parser.add_argument('--distributed', action='store_true')
  parser.add_argument('--heartbeat', type=int, default=100)
  args = parser.parse_args(argv)
  if args.distributed:
    from alexnet_jax import startup  # pylint: disable=g-import-not-at-top
    startup.initialize_distributed(
        'on', heartbeat_timeout_seconds=args.heartbeat)
  from absl import logging  # pylint: disable=g-import-not-at-top
  from alexnet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from alexnet_jax import train  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  overrides = json.loads(args.overrides)
  config = tiny_config(**overrides)
  if args.emulate_processes:
    input_pipeline.train_iterator = _emulated_train_iterator(
        args.emulate_processes)
  if args.sleep:
    original = input_pipeline.train_iterator

    def slow(*a, **k):
      for batch in original(*a, **k):
        time.sleep(args.sleep)
        yield batch

    input_pipeline.train_iterator = slow
  train.train_and_evaluate(config, args.workdir)


if __name__ == '__main__':
  _main(sys.argv[1:])


def truncate_array_data(step_dir):
  """Halves every array data file of an orbax step directory, as a failing
  disk or an interrupted copy leaves them."""
  paths = (glob.glob(os.path.join(step_dir, 'state', 'd', '*')) +
           glob.glob(os.path.join(step_dir, 'state', 'ocdbt.process_*', 'd',
                                  '*')))
  assert paths
  for path in paths:
    os.truncate(path, os.path.getsize(path) // 2)


def assert_trees_equal(a, b, **tolerance):
  """The same tree structure and, leaf by leaf, the same arrays: bit for bit,
  or within `tolerance` (assert_allclose's rtol/atol)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  a, b = jax.device_get((a, b))
  assert jax.tree.structure(a) == jax.tree.structure(b), (
      jax.tree.structure(a), jax.tree.structure(b))
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a),
                          jax.tree.leaves(b)):
    if tolerance:
      np.testing.assert_allclose(x, y, err_msg=jax.tree_util.keystr(path),
                                 **tolerance)
    else:
      np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
