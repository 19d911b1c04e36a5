"""Workdirs in a bucket, end to end, against a real GCS API on 127.0.0.1
(fake-gcs-server, tests/gcs_emulator.py): the demo trains into gs://, is
killed with SIGKILL, resumes with the same command and logs exactly the
uninterrupted run's numbers; evaluate.py and report.py read it back from the
bucket; paths no installed layer can serve fail at start."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from alexnet_jax import paths
from tests import train_helpers as th
from tests.gcs_emulator import gcs  # noqa: F401  pylint: disable=unused-import


def sweep_command(root, data_dir, steps):
  """sweep.py's baseline (the demo) shrunk to the tiny config, into root."""
  config = th.tiny_config(data_dir)
  flags = {'data.data_dir': data_dir, 'total_steps': steps,
           'model.num_classes': config.model.num_classes,
           'model.width_multiplier': config.model.width_multiplier,
           'model.fc_features': config.model.fc_features,
           'batch_size': config.batch_size, 'mesh.data_axis_size': 1,
           'eval.every_epochs': 0.0, 'eval.every_steps': 4,
           'checkpoint.every_epochs': 0.0, 'checkpoint.every_steps': 2,
           'log_every_steps': 1, 'data.prefetch': 1,
           'data.num_parallel_calls': 2, 'figures.enabled': False}
  flags.update({f'data.{k}': v for k, v in th.TINY_DATA.items()
                if k != 'demo_image_size'})
  lo, hi = th.TINY_DATA['demo_image_size']
  return ([sys.executable, 'sweep.py', f'--root={root}',
           '--variants=baseline',
           f'--config.data.demo_image_size=({lo},{hi})'] +
          [f'--config.{k}={v}' for k, v in flags.items()])


def run(cmd, env, timeout=600):
  proc = subprocess.run(cmd, cwd=th.REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  return proc.stdout + proc.stderr


def test_a_run_in_a_bucket_is_killed_resumed_evaluated_and_reported(
    gcs, data_dir, tmp_path):
  env = gcs.subprocess_env(th.subprocess_env(2))
  steps = 16
  local = str(tmp_path / 'local')
  run(sweep_command(local, data_dir, steps), env)  # Uninterrupted.

  root = gcs.url('sweeps/a')
  cmd = sweep_command(root, data_dir, steps)
  proc = subprocess.Popen(cmd, cwd=th.REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  # A step is finished when orbax writes its commit_success.txt (items have
  # one of their own, earlier, inside the step).
  finished = re.compile(r'.*/checkpoints/\d+/commit_success\.txt')
  committed = lambda: [n for n in gcs.objects('sweeps/a/baseline/checkpoints/')
                       if finished.fullmatch(n)]
  th.wait_for(lambda: committed(), proc, timeout=300,
              what='a checkpoint in the bucket')
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not any(f'/checkpoints/{steps}/' in n for n in committed()), (
      'killed too late')
  out = run(cmd, env)  # The same command resumes.
  assert 'Resumed from the checkpoint of step' in out, out[-3000:]

  want = th.read_metrics(os.path.join(local, 'baseline'))
  got = th.metrics_of_text(
      gcs.read('sweeps/a/baseline/metrics.jsonl').decode())
  assert got == want
  assert not os.path.exists(os.path.join(th.REPO, 'gs:'))

  workdir = f'{root}/baseline'
  out = run([sys.executable, 'evaluate.py', f'--workdir={workdir}',
             '--crops=center'], env)
  assert f'{workdir}/eval_results.json' in out
  results = json.loads(gcs.read('sweeps/a/baseline/eval_results.json'))
  assert results['members'][0]['step'] == steps
  assert results['members'][0]['workdir'] == workdir
  last_val = want[('val', steps)]
  assert results['members'][0]['center']['top1_error'] == pytest.approx(
      last_val['top1_error'])

  report = gcs.url('report/ABLATIONS.md')
  run([sys.executable, 'report.py', f'--root={root}', f'--out={report}'], env)
  text = gcs.read('report/ABLATIONS.md').decode()
  row = [l for l in text.splitlines() if l.startswith('| baseline')]
  assert len(row) == 1  # The run's final validation error, read back:
  assert f'| {100 * last_val["top1_error"]:.1f} / ' in row[0]
  assert {'report/ablations/val_error.png',
          'report/ablations/relu_vs_tanh.png'} <= set(gcs.objects('report/'))


def test_unservable_paths_fail_at_start_and_write_nothing(tmp_path):
  for path, fix in (('s3://bucket/run', 's3:// is not supported'),
                    ('gs:/bucket/run', 'write gs://<bucket>/<path>'),
                    ('hdfs://namenode/run', 'Mount the storage')):
    with pytest.raises(ValueError, match=fix):
      paths.check(path, '--workdir')
  proc = subprocess.run(
      [sys.executable, os.path.join(th.REPO, 'launch.py'),
       f'--config={os.path.join(th.REPO, "configs", "alexnet.py")}:demo',
       '--workdir=gs:/bucket/run'], cwd=tmp_path,
      env={**th.subprocess_env(1), 'PYTHONPATH': th.REPO},
      capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and 'write gs://<bucket>/<path>' in proc.stderr
  assert not os.listdir(tmp_path)  # No folder named after the URL.
