"""Several processes: two local processes (2 fake CPU devices each, gloo)
started as a SLURM job step and as Open MPI would start them, with no
distributed flags, train in lockstep to the parameters one process with 4
devices reaches on the same (2 data, 2 tower) mesh; only process 0 writes
logs. jax.distributed is started the way jax detects clusters
(alexnet_jax/startup.py); the environments that stop it say how to fix it."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from alexnet_jax import startup
from tests import train_helpers as th


def slurm_env(i, n=2, port=None):
  """What `srun -n 2` on one node gives task i (jax reads the first five)."""
  env = {'SLURM_JOB_ID': '12345', 'SLURM_STEP_NODELIST': 'localhost',
         'SLURM_NTASKS': str(n), 'SLURM_PROCID': str(i),
         'SLURM_LOCALID': str(i), 'SLURM_NODEID': '0',
         'SLURM_STEP_NUM_NODES': '1', 'SLURM_STEP_NUM_TASKS': str(n),
         'SLURM_STEP_TASKS_PER_NODE': str(n), 'SLURM_NODELIST': 'localhost',
         'SLURM_JOB_NODELIST': 'localhost', 'SLURM_TASKS_PER_NODE': str(n)}
  if port:
    env['JAX_COORDINATOR_PORT'] = str(port)  # Not the job id's port.
  return env


def ompi_env(i, n=2, port=None):
  """What `mpirun -np 2` (Open MPI 4) gives rank i on one host."""
  env = {'OMPI_MCA_orte_hnp_uri': '1531576320.0;tcp://127.0.0.1:34911',
         'OMPI_COMM_WORLD_SIZE': str(n), 'OMPI_COMM_WORLD_RANK': str(i),
         'OMPI_COMM_WORLD_LOCAL_RANK': str(i),
         'OMPI_COMM_WORLD_LOCAL_SIZE': str(n)}
  if port:
    env['JAX_COORDINATOR_PORT'] = str(port)
  return env


def launch_flags(data_dir, config, steps):
  """launch.py's flags for the demo config shrunk to th.tiny_config's."""
  tiny = {'data.data_dir': data_dir, 'total_steps': steps,
          'mesh.data_axis_size': 2, 'mesh.tower_axis_size': 2,
          'model.num_classes': config.model.num_classes,
          'model.width_multiplier': config.model.width_multiplier,
          'model.fc_features': config.model.fc_features,
          'batch_size': config.batch_size,
          'schedule.kind': 'constant', 'log_every_steps': 1,
          'eval.every_epochs': 0.0, 'eval.every_steps': 0,
          'checkpoint.every_epochs': 0.0, 'checkpoint.every_steps': 2,
          'data.prefetch': 1, 'data.num_parallel_calls': 2,
          'figures.enabled': False}
  tiny.update({f'data.{k}': v for k, v in th.TINY_DATA.items()
               if k != 'demo_image_size'})
  lo, hi = th.TINY_DATA['demo_image_size']
  return ([f'--config.{k}={v}' for k, v in tiny.items()] +
          [f'--config.data.demo_image_size=({lo},{hi})'])


def launch(workdir, flags, env, num_devices=2):
  return subprocess.Popen(
      [sys.executable, 'launch.py', '--config=configs/alexnet.py:demo',
       f'--workdir={workdir}'] + flags, cwd=th.REPO,
      env={**th.subprocess_env(num_devices), **env}, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)


def finish(procs, timeout=400):
  outs = [p.communicate(timeout=timeout)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


def test_cluster_processes_match_one_process(data_dir, tmp_path):
  overrides = {'data.data_dir': data_dir, 'total_steps': 4,
               'mesh.data_axis_size': 2, 'mesh.tower_axis_size': 2,
               'checkpoint.every_steps': 2, 'eval.every_steps': 0}
  config = th.tiny_config(**overrides)
  flags = launch_flags(data_dir, config, 4)
  single = str(tmp_path / 'single')  # At the same time as the SLURM pair.
  one = th.start(single, overrides, emulate_processes=2, num_devices=4)
  runs = {}
  for name, env in (('slurm', slurm_env), ('ompi', ompi_env)):
    runs[name] = str(tmp_path / name)
    port = th.free_port()
    outs = finish([launch(runs[name], flags, env(i, port=port))
                   for i in range(2)])
    cluster = {'slurm': 'SlurmCluster', 'ompi': 'OmpiCluster'}[name]
    for i, out in enumerate(outs):
      assert (f'jax.distributed started (detected {cluster}): process {i} '
              f'of 2, coordinator localhost:{port}') in out or (
                  f'jax.distributed started (detected {cluster}): process {i} '
                  f'of 2, coordinator 127.0.0.1:{port}') in out, out[-3000:]
      assert '2 process(es) on this host' in out
  finish([one], timeout=300)

  b, _ = th.restore_latest(single, config)
  s = th.read_metrics(single)
  for name, multi in runs.items():
    a, _ = th.restore_latest(multi, config)
    assert int(a.step) == int(b.step) == 4
    th.assert_trees_equal(a.params, b.params, rtol=1e-5, atol=1e-6)
    m = th.read_metrics(multi)
    assert m.keys() == s.keys()
    lines = lambda d: open(os.path.join(d, 'metrics.jsonl')).read().count('\n')
    assert lines(multi) == lines(single)  # Process 1 appended nothing.
    for k in m:
      assert m[k]['loss'] == pytest.approx(s[k]['loss'], rel=1e-5)
    # One writer: one events file, and process 1 logged but wrote nothing.
    events = [f for f in os.listdir(multi) if f.startswith('events.out')]
    assert len(events) == 1


def test_sbatch_without_srun_says_to_use_srun(tmp_path):
  """SLURM's batch step has the job's variables but not a job step's: jax
  would not find the cluster and the processes would train alone."""
  env = slurm_env(0)
  del env['SLURM_STEP_NODELIST']
  proc = launch(str(tmp_path / 'run'), [], env)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode != 0
  assert 'not inside a job step' in out and 'srun python launch.py' in out
  assert not os.path.exists(tmp_path / 'run')  # Stopped before anything.


def test_distributed_on_without_a_cluster_names_the_flags(tmp_path):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('SLURM_', 'OMPI_'))}
  proc = subprocess.Popen(
      [sys.executable, 'launch.py', '--config=configs/alexnet.py:demo',
       f'--workdir={tmp_path / "run"}', '--distributed=on'], cwd=th.REPO,
      env={**env, **th.subprocess_env(1)}, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode != 0
  assert '--coordinator_address=' in out and 'finds no cluster' in out


# ------------------------------------------ detection, without processes
def test_cluster_environment_is_what_jax_detects():
  assert startup.cluster_environment({}) is None
  assert startup.cluster_environment(slurm_env(1)).name == 'slurm'
  assert startup.cluster_environment(ompi_env(1)).name == 'ompi'
  partial = slurm_env(0)
  del partial['SLURM_STEP_NODELIST']
  assert startup.cluster_environment(partial) is None
  assert 'srun' in startup.cluster_problem(partial)
  assert startup.cluster_problem(slurm_env(0)) is None
  one_task = dict(partial, SLURM_NTASKS='1')  # A plain one-process job.
  assert startup.cluster_problem(one_task) is None


def test_tasks_per_node_and_local_gpus():
  assert startup.tasks_on_this_node({}) is None
  assert startup.tasks_on_this_node(ompi_env(0, 4)) == 4
  e = {'SLURM_STEP_TASKS_PER_NODE': '8(x2),1', 'SLURM_NODEID': '1'}
  assert startup.tasks_on_this_node(e) == 8
  assert startup.tasks_on_this_node({**e, 'SLURM_NODEID': '2'}) == 1
  gpus = {'gpu': [f'/dev/nvidia{i}' for i in range(8)], 'tpu': []}
  assert startup.local_gpu_ids({}, gpus) == list(range(8))
  assert startup.local_gpu_ids({'CUDA_VISIBLE_DEVICES': '4,5'}, gpus) == [0, 1]


def test_expected_platform_before_jax_starts():
  gpus = {'gpu': ['/dev/nvidia0'], 'tpu': []}
  none = {'gpu': [], 'tpu': []}
  have = lambda *names: (lambda p: p in names)
  assert startup.expected_platform({}, none, have()) == 'cpu'
  assert startup.expected_platform({}, gpus, have()) == 'cpu'  # No plugin.
  assert startup.expected_platform({}, none, have('libtpu')) == 'cpu'
  assert startup.expected_platform(
      {}, gpus, have('jax-cuda12-plugin')) == 'accelerator'
  assert startup.expected_platform(
      {'JAX_PLATFORMS': 'cpu'}, gpus, have('jax-cuda12-plugin')) == 'cpu'
  assert startup.expected_platform(
      {'JAX_PLATFORMS': 'cuda,cpu'}, none, have()) == 'accelerator'


# ------------------------------------------------ faults of a 2-process run
FAULT_RUN = {'total_steps': 12, 'mesh.data_axis_size': 2,
             'mesh.tower_axis_size': 2, 'checkpoint.every_steps': 2,
             'eval.every_steps': 6}


def start_pair(workdir, data_dir, sleep=0.0, heartbeat=100):
  port = th.free_port()
  return [th.start(workdir, {'data.data_dir': data_dir, **FAULT_RUN},
                   sleep=sleep, cluster_env=slurm_env(i, port=port),
                   heartbeat=heartbeat) for i in range(2)]


def test_preemption_and_a_lost_process_then_resume_exactly(data_dir,
                                                           tmp_path):
  """SIGTERM to one process: both save the same step and exit 0. Then
  SIGKILL to one process: the other stops with a clear error within the
  heartbeat timeout, never hangs. Rerunning both each time resumes from the
  last checkpoint: the end is the uninterrupted run's, bit for bit."""
  whole, broken = str(tmp_path / 'whole'), str(tmp_path / 'broken')
  finish(start_pair(whole, data_dir))  # Uninterrupted.

  procs = start_pair(broken, data_dir, sleep=0.3)
  th.wait_for(lambda: 2 in th.checkpoint_steps(broken), procs[0],
              what='the checkpoint of step 2')
  procs[1].send_signal(signal.SIGTERM)  # One host is preempted.
  outs = finish(procs)
  saved = th.checkpoint_steps(broken)
  assert 'Preempted: checkpoint of step' in outs[0]
  stopped = [int(o.split('Preempted: checkpoint of step ')[1].split(' ')[0])
             for o in outs]
  assert stopped[0] == stopped[1] == max(saved) < FAULT_RUN['total_steps']

  procs = start_pair(broken, data_dir, sleep=0.3, heartbeat=10)
  th.wait_for(lambda: max(th.checkpoint_steps(broken)) > stopped[0],
              procs[0], what='a checkpoint after the preemption')
  procs[1].kill()  # A host is lost.
  t0 = time.time()
  out, _ = procs[0].communicate(timeout=120)
  assert time.time() - t0 < 60, 'the surviving process took too long'
  assert procs[0].returncode != 0
  assert f'Resumed from the checkpoint of step {stopped[0]} ' in out
  # Its next step's collective fails at once: the trainer says what happened.
  assert 'LostProcessError: Training stopped: another process of this run' in (
      out), out[-3000:]
  procs[1].wait()
  assert max(th.checkpoint_steps(broken)) < FAULT_RUN['total_steps']

  outs = finish(start_pair(broken, data_dir))
  assert all('Resumed from the checkpoint of step' in o for o in outs)
  config = th.tiny_config(data_dir, **FAULT_RUN)
  a, a_extra = th.restore_latest(whole, config)
  b, b_extra = th.restore_latest(broken, config)
  assert int(a.step) == int(b.step) == FAULT_RUN['total_steps']
  th.assert_trees_equal(a, b)
  assert a_extra == b_extra
  assert th.read_metrics(whole) == th.read_metrics(broken)
