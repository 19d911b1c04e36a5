"""Damaged checkpoints and full disks, with real files (checkpoint.py).

- An unreadable newest checkpoint (array data truncated as a failing disk
  leaves it, garbled metadata, a missing item, garbled metrics that would stop
  orbax's CheckpointManager from starting): the previous step is restored
  bit for bit, the bad one is renamed to corrupt-<step>-* with its contents,
  a warning names the step and the reason, and a restart does not retry it.
  None readable, or an explicit step unreadable: CheckpointError listing each.
- Two processes (jax.distributed, gloo) of which only one cannot read the
  newest step restore the same older step; the bad step is renamed once.
- A full disk (a small tmpfs this test mounts; as a non-root user the test
  reruns itself in `unshare -rm`): the save stops with CheckpointError naming
  the directory and the space needed, whether caught before writing or when
  the write fails (async: from wait_until_finished); the earlier checkpoints
  restore and a new manager lists no partial step.
"""

import errno
import glob
import json
import logging
import os
import shutil
import subprocess
import sys

from etils import epath
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from alexnet_jax import checkpoint as checkpoint_lib
from alexnet_jax import mesh as mesh_lib
from alexnet_jax import train_step as train_step_lib
from tests import train_helpers as th

# orbax's reads of a damaged file leave coroutines whose exceptions nobody
# retrieves; Python reports them when they are collected.
pytestmark = pytest.mark.filterwarnings(
    'ignore::pytest.PytestUnraisableExceptionWarning')

ROW = 4096  # float32 per tower: 16 KiB per shard, not inlined by OCDBT.
IN_NAMESPACE = 'ALEXNET_JAX_FAULT_TESTS_IN_NAMESPACE'


def config(**overrides):
  return ml_collections.ConfigDict(
      {**dict(keep=3, keep_best=1, async_save=True), **overrides})


def host_state(step, row=ROW):
  """A small TrainState of numpy arrays, different at every step (random
  weights: zstd cannot shrink them)."""
  rng = np.random.default_rng(step)
  return train_step_lib.TrainState(
      step=np.int32(step),
      params={'w': rng.standard_normal((2, row)).astype(np.float32),
              'b': np.full((2, 8), step, np.float32)},
      opt_state=(), rng=np.array([0, step], np.uint32))


def abstract(row=ROW):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                      host_state(0, row))


@pytest.fixture(scope='module')
def mesh():
  return mesh_lib.make_mesh(2)  # 8 devices: 4 data x 2 towers.


def on_mesh(state, mesh):
  target = checkpoint_lib.abstract_target(
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state),
      mesh)
  return jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), state,
                      target)


def assert_same(restored, step, row=ROW):
  th.assert_trees_equal(restored, host_state(step, row))


def files_under(path):
  return sorted(os.path.relpath(os.path.join(r, f), path)
                for r, _, fs in os.walk(path) for f in fs)


def warnings_of(caplog):
  return [r.getMessage() for r in caplog.records
          if r.levelno >= logging.WARNING]


# ------------------------------------------------------------------ damage
def garble(relative):
  def damage(step_dir):
    path = os.path.join(step_dir, relative)
    assert os.path.exists(path), path
    with open(path, 'wb') as f:
      f.write(b'\x00garbage{{{')
  return damage


def remove_item(step_dir):
  shutil.rmtree(os.path.join(step_dir, 'extra'))


# name: (damage, what the warning says)
DAMAGE = {
    'array data truncated': (th.truncate_array_data, 'OUT_OF_RANGE'),
    '_METADATA garbled': (garble('state/_METADATA'), 'JSONDecodeError'),
    'manifest garbled': (garble('state/manifest.ocdbt'), 'DATA_LOSS'),
    'item missing': (remove_item, "KeyError: 'Item \"extra\" was not found"),
    'metrics garbled': (garble('metrics/metrics'), 'JSONDecodeError'),
}


@pytest.fixture(scope='module')
def saved(tmp_path_factory, mesh):
  """Checkpoints of steps 1, 2, 3 (saved once; each test copies them)."""
  d = str(tmp_path_factory.mktemp('faults') / 'template')
  manager = checkpoint_lib.create_manager(d, config())
  for step, err in ((1, 0.3), (2, 0.2), (3, 0.1)):
    checkpoint_lib.save(manager, on_mesh(host_state(step), mesh),
                        {'step': step}, err)
  checkpoint_lib.close(manager)
  return d


@pytest.fixture
def ckpt(saved, tmp_path):
  d = str(tmp_path / 'checkpoints')
  shutil.copytree(saved, d)
  return d


def restore(d, mesh, **kwargs):
  manager = checkpoint_lib.create_manager(d, config())
  try:
    return checkpoint_lib.restore_readable(manager, abstract(), mesh,
                                           **kwargs), manager.all_steps()
  finally:
    checkpoint_lib.close(manager)


@pytest.mark.parametrize('damage', list(DAMAGE))
def test_unreadable_latest_falls_back_and_is_moved_aside(ckpt, mesh, caplog,
                                                         damage):
  do, reason = DAMAGE[damage]
  do(os.path.join(ckpt, '3'))
  contents = files_under(os.path.join(ckpt, '3'))
  with caplog.at_level(logging.WARNING):
    (state, extra, step), steps = restore(ckpt, mesh)
  assert step == 2 and extra == {'step': 2} and steps == [1, 2]
  assert_same(state, 2)
  moved = glob.glob(os.path.join(ckpt, 'corrupt-3-*'))
  assert len(moved) == 1 and not os.path.exists(os.path.join(ckpt, '3'))
  assert files_under(moved[0]) == contents  # Kept as it was.
  said = [w for w in warnings_of(caplog) if 'step 3' in w]
  assert any(reason in w for w in said), warnings_of(caplog)
  assert any(moved[0] in w for w in said), said

  caplog.clear()  # A restart does not try step 3 again.
  with caplog.at_level(logging.WARNING):
    (state, _, step), steps = restore(ckpt, mesh)
  assert step == 2 and steps == [1, 2]
  assert_same(state, 2)
  assert not [w for w in warnings_of(caplog) if 'step 3' in w]
  assert glob.glob(os.path.join(ckpt, 'corrupt-3-*')) == moved


def test_garbled_metrics_would_stop_orbax_from_starting(ckpt):
  """Why create_manager checks them: orbax reads every step's metrics when
  its CheckpointManager is constructed (best_fn set)."""
  garble('metrics/metrics')(os.path.join(ckpt, '3'))
  with pytest.raises(json.JSONDecodeError):
    ocp.CheckpointManager(
        epath.Path(ckpt), options=ocp.CheckpointManagerOptions(
            best_fn=lambda m: m[checkpoint_lib.VAL_ERROR], best_mode='min',
            read_only=True))
  manager = checkpoint_lib.create_manager(ckpt, config())
  assert manager.all_steps() == [1, 2]
  checkpoint_lib.close(manager)


def test_candidates_are_tried_in_their_order(ckpt, mesh):
  th.truncate_array_data(os.path.join(ckpt, '1'))
  (state, _, step), steps = restore(ckpt, mesh, candidates=[1, 2, 3])
  assert step == 2 and steps == [2, 3]  # 1 moved aside, 3 not tried.
  assert_same(state, 2)
  assert len(glob.glob(os.path.join(ckpt, 'corrupt-1-*'))) == 1


def test_none_readable_is_a_clear_error_and_moves_nothing(ckpt, mesh):
  th.truncate_array_data(os.path.join(ckpt, '3'))
  garble('state/_METADATA')(os.path.join(ckpt, '2'))
  remove_item(os.path.join(ckpt, '1'))
  with pytest.raises(checkpoint_lib.CheckpointError) as e:
    restore(ckpt, mesh)
  message = str(e.value)
  for line in ('step 3: ValueError: OUT_OF_RANGE',
               'step 2: JSONDecodeError', 'step 1: KeyError'):
    assert line in message, message
  assert ckpt in message and 'new --workdir' in message
  # Nothing proves the files rather than the config are at fault: kept.
  assert sorted(os.listdir(ckpt)) == ['1', '2', '3']


def test_a_changed_config_moves_nothing(ckpt, mesh):
  manager = checkpoint_lib.create_manager(ckpt, config())
  with pytest.raises(checkpoint_lib.CheckpointError) as e:
    checkpoint_lib.restore(manager, abstract(row=ROW // 2), mesh)
  checkpoint_lib.close(manager)
  assert 'not compatible with the stored shape' in str(e.value)
  assert sorted(os.listdir(ckpt)) == ['1', '2', '3']


def test_an_unreadable_explicit_step_is_an_error(ckpt, mesh):
  th.truncate_array_data(os.path.join(ckpt, '3'))
  with pytest.raises(checkpoint_lib.CheckpointError) as e:
    restore(ckpt, mesh, step=3)
  assert 'step 3' in str(e.value) and 'no other step is tried' in str(e.value)
  (state, _, step), _ = restore(ckpt, mesh, step=2)
  assert step == 2
  assert_same(state, 2)
  with pytest.raises(FileNotFoundError, match='No checkpoint of step 7'):
    restore(ckpt, mesh, step=7)


# ---------------------------------------------------------- two processes
def test_two_processes_agree_on_the_older_step(tmp_path):
  """Only process 1 cannot read step 2 (its own shard's file is truncated);
  both restore step 1, and step 2 is moved aside once."""
  d = str(tmp_path / 'checkpoints')
  port = th.free_port()
  procs = [subprocess.Popen(
      [sys.executable, os.path.join('tests', 'fault_restore_agree.py'),
       str(i), str(port), d], cwd=th.REPO, env=th.subprocess_env(2),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    outs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  results = {}
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
    line = [l for l in out.splitlines() if l.startswith('RESULT ')][-1]
    r = json.loads(line[len('RESULT '):])
    results[r['process']] = r
  for i, r in results.items():
    assert r['towers'] == {'0': [0], '1': [1]}  # Tower t on process t.
    assert r['saved'] == [1, 2] and r['step'] == 1 and r['extra'] == {
        'step': 1}
    assert r['rows_equal'] == {str(i): True}, r  # Its own tower, step 1's.
    assert r['all_steps'] == [1]
  assert results[0]['damaged']
  # Process 0 read step 2 and process 1 did not: both say why.
  for out in outs:
    assert 'Checkpoint of step 2' in out and 'process 1: ' in out, out[-3000:]
  listing = sorted(os.listdir(d))
  assert len(listing) == 2 and listing[0] == '1', listing
  assert listing[1].startswith('corrupt-2-')


# --------------------------------------------------------------- full disk
def on_small_disk(request, tmp_path, size, body):
  """Runs body(path) on a fresh tmpfs of `size` mounted at a temporary path
  (unmounted after). Not root: reruns this test in `unshare -rm` (a user and
  mount namespace, where it may mount); skips if neither can mount."""
  disk = tmp_path / 'disk'
  disk.mkdir()
  mount = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}',
                          'tmpfs', str(disk)], capture_output=True, text=True)
  if mount.returncode == 0:
    try:
      body(str(disk))
    finally:
      subprocess.run(['umount', str(disk)], check=True)
    return
  why = f'cannot mount a tmpfs: {mount.stderr.strip()}'
  if os.environ.get(IN_NAMESPACE):
    pytest.skip(f'{why} (inside unshare -rm)')
  if not shutil.which('unshare'):
    pytest.skip(f'{why}, and no unshare to make a mount namespace')
  inner = subprocess.run(
      ['unshare', '-rm', sys.executable, '-m', 'pytest', '-q', '-rs',
       '-p', 'no:cacheprovider', f'{__file__}::{request.node.name}'],
      cwd=th.REPO, env={**os.environ, IN_NAMESPACE: '1'},
      capture_output=True, text=True, timeout=300)
  out = inner.stdout + inner.stderr
  if inner.returncode == 0 and ' passed' not in out:
    said = [l for l in out.splitlines() if l.startswith('SKIPPED')]
    pytest.skip(f'{why}; in unshare -rm: {(said or [out.strip()])[-1]}')
  if inner.returncode != 0 and 'unshare:' in out and ' passed' not in out \
      and ' failed' not in out:
    pytest.skip(f'{why}; unshare -rm failed: {out.strip()[-300:]}')
  assert inner.returncode == 0, out[-4000:]


def fill(disk, leave):
  """A ballast file that leaves about `leave` bytes free on `disk`."""
  free = shutil.disk_usage(disk).free
  with open(os.path.join(disk, 'ballast'), 'wb') as f:
    os.posix_fallocate(f.fileno(), 0, max(free - leave, 0))
  return shutil.disk_usage(disk).free


BIG = 64 * 1024  # A 512 KiB state.


def save_two(d, mesh, async_save):
  manager = checkpoint_lib.create_manager(
      d, config(keep=2, keep_best=0, async_save=async_save))
  for step in (1, 2):
    checkpoint_lib.save(manager, on_mesh(host_state(step, BIG), mesh),
                        {'step': step})
  checkpoint_lib.wait_until_finished(manager)
  return manager


def assert_steps_1_2_intact(d, mesh):
  manager = checkpoint_lib.create_manager(d, config(keep=2, keep_best=0))
  assert manager.all_steps() == [1, 2]
  assert th.checkpoint_steps(os.path.dirname(d)) == [1, 2]
  state, extra, step = checkpoint_lib.restore_readable(
      manager, abstract(BIG), mesh)
  assert step == 2 and extra == {'step': 2}
  assert_same(state, 2, BIG)
  return manager


def resume_after_freeing_space(disk, d, mesh, state):
  """A rerun (new manager) restores step 2, and with room again saves 3;
  the unfinished step 3 of the failed save (if any) is gone."""
  manager = assert_steps_1_2_intact(d, mesh)
  os.remove(os.path.join(disk, 'ballast'))
  checkpoint_lib.save(manager, state, {'step': 3})
  checkpoint_lib.close(manager)
  assert sorted(os.listdir(d)) == ['2', '3'], os.listdir(d)


def test_a_full_disk_stops_the_save_before_it_starts(request, tmp_path, mesh):
  def body(disk):
    d = os.path.join(disk, 'checkpoints')
    manager = save_two(d, mesh, async_save=True)
    state = on_mesh(host_state(3, BIG), mesh)
    need = checkpoint_lib.space_needed(d, state)
    free = fill(disk, need // 2)
    with pytest.raises(checkpoint_lib.CheckpointError) as e:
      checkpoint_lib.save(manager, state, {'step': 3})
    message = str(e.value)
    assert f'in {d}: it needs about' in message, message
    assert f'({need} bytes)' in message and f'({free} bytes) are free' in (
        message)
    assert 'steps [1, 2]) are intact' in message
    assert 'rerun the same command' in message
    assert not [n for n in os.listdir(d) if n.startswith('3')]  # Not begun.
    checkpoint_lib.close(manager)
    resume_after_freeing_space(disk, d, mesh, state)
  on_small_disk(request, tmp_path, '8m', body)


@pytest.mark.parametrize('async_save', [True, False], ids=['async', 'sync'])
def test_a_disk_that_fills_while_writing_stops_the_run(request, tmp_path, mesh,
                                                       async_save):
  """The free-space check is off (or fooled): orbax's own write fails."""
  def body(disk):
    d = os.path.join(disk, 'checkpoints')
    manager = save_two(d, mesh, async_save)
    step_size = sum(os.path.getsize(os.path.join(d, '2', f))
                    for f in files_under(os.path.join(d, '2')))
    fill(disk, step_size // 2)
    state = on_mesh(host_state(3, BIG), mesh)
    with pytest.raises(checkpoint_lib.CheckpointError) as e:
      checkpoint_lib.save(manager, state, {'step': 3}, check_space=False)
      assert async_save, 'a synchronous save raises at once'
      checkpoint_lib.wait_until_finished(manager)
    message = str(e.value)
    assert message.startswith(
        f'The checkpoint of step 3 could not be written to {d}: the disk is '
        'full'), message
    assert 'steps [1, 2]) are intact' in message
    cause, chain = e.value.__cause__, []
    while cause is not None:
      chain.append(cause)
      cause = cause.__cause__ or cause.__context__
    assert any(getattr(c, 'errno', None) == errno.ENOSPC or
               'RESOURCE_EXHAUSTED' in str(c) for c in chain), chain
    checkpoint_lib.close(manager)
    resume_after_freeing_space(disk, d, mesh, state)
  on_small_disk(request, tmp_path, '8m', body)
