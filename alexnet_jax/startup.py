"""What the command-line entry points (launch.py, evaluate.py, sweep.py,
report.py and the `python -m` tools) do to the process before any work;
importing a library module never does any of it.

- `set_xla_flags()`, before JAX starts: the XLA:CPU options of xla_cpu.py,
  only for a run that will be on the CPU (`expected_platform`): a GPU or TPU
  run never depends on XLA:CPU's flag names. (TensorFlow's C++ INFO lines
  stay off too.)
- `hide_gpus_from_tensorflow()`: TensorFlow runs only the input pipeline;
  left alone it would take a GPU's memory that JAX needs.
- `quiet_libraries(verbose)`: the console tells the run's story (identity,
  progress, evaluations, warnings that matter, errors). Other libraries'
  INFO lines (orbax's save internals, JAX's backend probing, tfds's builder
  notes) and their known harmless warnings are dropped unless `verbose`
  (the entry points' `--verbosity=1`, absl's own flag).
- `initialize_distributed(mode, ...)`: jax.distributed on a cluster, found
  the way jax itself finds one (`cluster_environment`).
- `check_platform()`, once JAX runs: a GPU or TPU on the machine that JAX
  does not use is said loudly, with the install line that fixes it.
"""

import glob
import importlib.metadata
import logging
import os
import socket
import warnings
import zlib

from alexnet_jax import xla_cpu

# This project's files: their records always pass.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OUR_FOLDERS = ('alexnet_jax', 'configs', 'benchmarks')


def _ours(path: str) -> bool:
  """Whether `path` is one of this project's files: the entry scripts and
  the folders above, not a virtualenv or anything else inside the checkout."""
  parts = os.path.relpath(os.path.abspath(path), _REPO).split(os.sep)
  return parts[0] != '..' and (len(parts) == 1 or parts[0] in _OUR_FOLDERS)

# Warnings other libraries repeat that say nothing about the run.
HARMLESS_WARNINGS = (
    # tfds, at each use of the demo's own builder config.
    'Using custom data configuration',
    # orbax: a checkpoint saved without an evaluation has no metrics, by
    # design (best_fn is set so that those with one are ranked).
    'did not provide metrics',
)

# Device files of accelerators, and the jax packages that drive them.
GPU_DEVICES = '/dev/nvidia[0-9]*'
TPU_DEVICES = ('/dev/accel[0-9]*', '/dev/vfio/[0-9]*')
ACCELERATOR_PACKAGES = ('jax-cuda12-plugin', 'jax-cuda13-plugin',
                        'jax-rocm6-plugin', 'jax-rocm7-plugin', 'libtpu')
# How many processes of the run share this host (set by
# initialize_distributed; a user may set it): each sizes its input
# pipeline's parallelism to its share of the host's cores.
PROCESSES_ON_HOST = 'ALEXNET_JAX_PROCESSES_ON_HOST'
DISTRIBUTED_MODES = ('auto', 'on', 'off')


def _log():
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  return absl_logging


# ------------------------------------------------------------ the platform
def accelerator_devices():
  """{'gpu': [...], 'tpu': [...]} device files found on this machine."""
  return {'gpu': sorted(glob.glob(GPU_DEVICES)),
          'tpu': sorted(f for p in TPU_DEVICES for f in glob.glob(p))}


def _installed(package: str) -> bool:
  try:
    importlib.metadata.distribution(package)
    return True
  except importlib.metadata.PackageNotFoundError:
    return False


def expected_platform(environ=None, devices=None, installed=_installed) -> str:
  """'cpu' or 'accelerator': where JAX will run, told before it starts (its
  flags must be set before). JAX_PLATFORMS decides if set; otherwise JAX
  takes an accelerator when its jax plugin is installed and the machine
  has the device."""
  environ = os.environ if environ is None else environ
  platforms = environ.get('JAX_PLATFORMS') or environ.get('JAX_PLATFORM_NAME')
  if platforms:
    return 'cpu' if platforms.split(',')[0].strip() == 'cpu' else 'accelerator'
  devices = accelerator_devices() if devices is None else devices
  plugin = any(installed(p) for p in ACCELERATOR_PACKAGES)
  return 'accelerator' if plugin and (devices['gpu'] or devices['tpu']) else (
      'cpu')


def set_xla_flags(**options) -> bool:
  """The XLA:CPU options (xla_cpu.set_flags(**options)) if the run will be
  on the CPU; call it before anything imports JAX. Also keeps TensorFlow's
  C++ INFO lines off the console (TF_CPP_MIN_LOG_LEVEL=1 unless set).
  Returns whether the options were set."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  if expected_platform() != 'cpu':
    return False
  xla_cpu.set_flags(**options)
  return True


def install_line(kind: str) -> str:
  """The pip command that installs JAX for `kind` ('cuda12', 'cuda13' or
  'tpu') at the version installed now (requirements.txt's)."""
  version = importlib.metadata.version('jax')
  return f'pip install -r requirements.txt "jax[{kind}]=={version}"'


def check_platform():
  """Says loudly when the machine has a GPU or TPU that JAX does not use
  (JAX runs on the CPU: the accelerator build is not installed)."""
  import jax  # pylint: disable=g-import-not-at-top
  platform = jax.default_backend()
  devices = accelerator_devices()
  if platform == 'cpu' and (devices['gpu'] or devices['tpu']):
    kind = 'gpu' if devices['gpu'] else 'tpu'
    fix = (f'{install_line("cuda12")} (CUDA 12 drivers) or '
           f'{install_line("cuda13")} (CUDA 13)' if kind == 'gpu' else
           install_line('tpu'))
    _log().warning(
        '\n%s\nThis machine has a %s (%s) but JAX runs on the CPU: the %s '
        'build of jax is not installed. Install it with\n  %s\nor, to run on '
        'the CPU on purpose, set JAX_PLATFORMS=cpu.\n%s', '!' * 78,
        kind.upper(), ', '.join(devices[kind][:4]), kind.upper(), fix,
        '!' * 78)
  elif platform == 'cpu' and not xla_cpu.flags_set():
    _log().warning('JAX runs on the CPU without the XLA:CPU options of '
                   'alexnet_jax/xla_cpu.py (JAX_PLATFORMS or an accelerator '
                   'plugin said otherwise): slower, same numbers.')


def hide_gpus_from_tensorflow():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')


# ------------------------------------------------------------- the console
class LibraryChatter(logging.Filter):
  """Drops other libraries' records below WARNING and their harmless
  warnings; this project's records and every error pass."""

  def filter(self, record):
    if record.levelno >= logging.ERROR or _ours(record.pathname):
      return True
    if record.levelno >= logging.WARNING:
      message = record.getMessage()
      return not any(w in message for w in HARMLESS_WARNINGS)
    return False


def quiet_libraries(verbose: bool = False):
  """Installs LibraryChatter on absl's handler (which every Python logger
  reaches), unless `verbose`."""
  handler = _log().get_absl_handler()
  for f in list(handler.filters):
    if isinstance(f, LibraryChatter):
      handler.removeFilter(f)
  if not verbose:
    handler.addFilter(LibraryChatter())


# --------------------------------------------------------------- clusters
def cluster_environment(environ=None):
  """The cluster environment jax.distributed.initialize() would detect here
  (one of jax's ClusterEnv classes: SLURM job steps, Open MPI, Cloud TPU,
  GKE, Kubernetes), or None. jax has no public call for this: this reads
  the list jax.distributed itself walks (jax/_src/clusters, jax 0.10.2),
  in its order, opt-in methods (mpi4py) excepted."""
  from jax._src import clusters  # pylint: disable=g-import-not-at-top
  saved = None
  if environ is not None:  # Tests: detect in a given environment.
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(environ)
  try:
    for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
      if env.opt_in_only_method:
        continue
      with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # Kubernetes without its package.
        try:
          if env.is_env_present():
            return env
        except Exception:  # pylint: disable=broad-except
          continue
    return None
  finally:
    if saved is not None:
      os.environ.clear()
      os.environ.update(saved)


def cluster_problem(environ=None):
  """What stops jax from detecting a cluster that the environment says is
  there (a message naming the fix), or None."""
  e = os.environ if environ is None else environ
  tasks = int(e.get('SLURM_NTASKS', '1') or 1)
  if 'SLURM_JOB_ID' in e and 'SLURM_STEP_NODELIST' not in e and tasks > 1:
    return (f'This is SLURM job {e["SLURM_JOB_ID"]} with {tasks} tasks, but '
            'not inside a job step: jax.distributed reads the variables srun '
            'sets (SLURM_STEP_NODELIST, SLURM_PROCID, ...). Start every task '
            'with srun: `srun python launch.py ...` in the sbatch script.')
  if 'OMPI_COMM_WORLD_SIZE' in e and 'OMPI_MCA_orte_hnp_uri' not in e and (
      int(e['OMPI_COMM_WORLD_SIZE']) > 1):
    return ('Open MPI started this process without OMPI_MCA_orte_hnp_uri, '
            'which jax.distributed needs to find the coordinator (Open MPI 5 '
            'no longer sets it): pass --coordinator_address=<host of rank '
            '0>:<port> --num_processes=$OMPI_COMM_WORLD_SIZE '
            '--process_id=$OMPI_COMM_WORLD_RANK.')
  return None


def tasks_on_this_node(environ=None):
  """How many of the run's processes the scheduler put on this host, from
  SLURM's or Open MPI's variables; None if they do not say."""
  e = os.environ if environ is None else environ
  if 'OMPI_COMM_WORLD_LOCAL_SIZE' in e:
    return int(e['OMPI_COMM_WORLD_LOCAL_SIZE'])
  spec = e.get('SLURM_STEP_TASKS_PER_NODE') or e.get('SLURM_TASKS_PER_NODE')
  if spec:  # e.g. '8(x2),4': two nodes with 8 tasks, then one with 4.
    counts = []
    for part in spec.split(','):
      n, _, times = part.partition('(x')
      counts += [int(n)] * (int(times.rstrip(')')) if times else 1)
    node = int(e.get('SLURM_NODEID', '0'))
    return counts[node] if node < len(counts) else None
  return None


def local_gpu_ids(environ=None, devices=None):
  """The GPU indices this process may use: CUDA_VISIBLE_DEVICES's entries,
  else one per /dev/nvidiaN."""
  e = os.environ if environ is None else environ
  visible = e.get('CUDA_VISIBLE_DEVICES')
  if visible is not None:
    return list(range(len([v for v in visible.split(',') if v.strip()])))
  devices = accelerator_devices() if devices is None else devices
  return list(range(len(devices['gpu'])))


def define_distributed_flags():
  """The entry points' flags for initialize_distributed; returns a function
  that starts it from their values (call it in main)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  mode = flags.DEFINE_enum(
      'distributed', 'auto', DISTRIBUTED_MODES,
      'jax.distributed: auto (when jax detects a cluster: a SLURM job step, '
      'Open MPI, a Cloud TPU slice, GKE, Kubernetes), on, or off.')
  coordinator = flags.DEFINE_string(
      'coordinator_address', None, 'host:port of process 0: with '
      '--num_processes and --process_id, starts jax.distributed without '
      'detection.')
  num_processes = flags.DEFINE_integer(
      'num_processes', None, 'Number of processes in the run.')
  process_id = flags.DEFINE_integer(
      'process_id', None, 'This process\'s index in [0, num_processes).')
  heartbeat = flags.DEFINE_integer(
      'heartbeat_timeout_seconds', 100, 'jax.distributed: a process that '
      'stops answering for this long ends every other process.')

  def start():
    return initialize_distributed(mode.value, coordinator.value,
                                  num_processes.value, process_id.value,
                                  heartbeat.value)

  return start


def initialize_distributed(mode: str = 'auto', coordinator_address=None,
                           num_processes=None, process_id=None,
                           heartbeat_timeout_seconds: int = 100):
  """Starts jax.distributed when this is one process of several.

  mode 'auto': when jax's own cluster detection finds a cluster (with more
  than one process, where that can be read without asking a server);
  'on': always (an error naming the fix when nothing says how); 'off':
  never (an error if the explicit flags are given too). Explicit
  coordinator_address, num_processes and process_id win over detection.
  One process per host on a GPU cluster (SLURM or Open MPI with one task
  per node) uses all the host's GPUs instead of jax's one per task. Logs
  which path ran and what it found; returns a short description.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if mode not in DISTRIBUTED_MODES:
    raise ValueError(f'--distributed={mode!r}: use one of {DISTRIBUTED_MODES}.')
  given = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in given) and None in given:
    raise ValueError('Give all of --coordinator_address, --num_processes and '
                     '--process_id, or none of them.')
  explicit = None not in given
  if explicit and mode == 'off':
    raise ValueError('--distributed=off contradicts --coordinator_address, '
                     '--num_processes and --process_id: drop one or the '
                     'other.')
  env = None
  if not explicit:
    if mode == 'off':
      _log().info('jax.distributed: off (--distributed=off): one process.')
      return 'off'
    env = cluster_environment()
    problem = None if env else cluster_problem()
    if problem:
      raise RuntimeError(problem)
    if env is None and mode == 'on':
      raise RuntimeError(
          '--distributed=on, but jax finds no cluster here (a SLURM job step, '
          'Open MPI, a Cloud TPU slice, GKE or Kubernetes): give '
          '--coordinator_address=<host of process 0>:<port> '
          '--num_processes=N --process_id=i on every process.')
    if env is None or (mode == 'auto' and env.name in ('slurm', 'ompi') and
                       env.get_process_count() == 1):
      _log().info('jax.distributed: not started (--distributed=%s): %s.', mode,
                  'no cluster environment detected' if env is None else
                  f'{env.__name__} with one process')
      return 'single process'
  local_ids = None
  gpus = local_gpu_ids()
  if tasks_on_this_node() == 1 and len(gpus) > 1:
    local_ids = gpus  # One process per host: all its GPUs, not just one.
  # Cross-process collectives on the CPU (tests, debugging) go through gloo;
  # GPUs and TPUs ignore this.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
      coordinator_address, num_processes, process_id,
      local_device_ids=local_ids,
      heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  on_host = processes_on_this_host()
  os.environ.setdefault(PROCESSES_ON_HOST, str(on_host))
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  how = 'explicit flags' if explicit else f'detected {env.__name__}'
  _log().info(
      'jax.distributed started (%s): process %d of %d, coordinator %s, '
      '%d local device(s) %s, %d process(es) on this host; a process that '
      'stops answering for %d s ends the others.', how, jax.process_index(),
      jax.process_count(), distributed.global_state.coordinator_address,
      jax.local_device_count(), [d.id for d in jax.local_devices()], on_host,
      heartbeat_timeout_seconds)
  return how


def processes_on_this_host() -> int:
  """How many of the run's processes share this host (all processes must
  call it: it gathers every process's host name)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return 1
  mine = zlib.crc32(socket.gethostname().encode()) & 0x7fffffff
  hosts = np.asarray(multihost_utils.process_allgather(
      np.array([mine], np.int32)))
  return int((hosts.reshape(-1) == mine).sum())
