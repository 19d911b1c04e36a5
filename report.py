r"""Collects a sweep's workdirs (python sweep.py) into a markdown report.

  python report.py --root=/tmp/alexnet_sweep --out=docs/ABLATIONS.md

Writes docs/ABLATIONS.md (a table per variant: final validation top-1/top-5
error, difference vs the baseline next to the paper's claim, parameters,
train time, epochs to 25% training error, conv1 colour specificity per
tower, cross-tower bytes per image; what the report does and does not show)
and its plots in docs/ablations/ (validation error of every variant; ReLU vs
tanh training error). alexnet_jax/report.py does the work.
"""

from absl import app
from absl import flags
from absl import logging

from alexnet_jax import report
from alexnet_jax import startup
from configs import alexnet

_ROOT = flags.DEFINE_string('root', None, 'The --root of python sweep.py.')
_OUT = flags.DEFINE_string('out', 'docs/ABLATIONS.md', 'Markdown file to '
                           'write; plots go to its name, lowercased, as a '
                           'directory (docs/ablations/).')
_PREFACE = flags.DEFINE_string('preface_file', None, 'Optional markdown file '
                               'put above the generated report.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  startup.quiet_libraries(verbose=logging.get_verbosity() >= 1)
  preface = ''
  if _PREFACE.value:
    with open(_PREFACE.value) as f:
      preface = f.read()
  command = f'python report.py --root={_ROOT.value} --out={_OUT.value}'
  if _PREFACE.value:
    command += f' --preface_file={_PREFACE.value}'
  text, _ = report.build_report(_ROOT.value, _OUT.value, command, preface,
                                defaults=alexnet.saved_run_defaults())
  print(text)


if __name__ == '__main__':
  flags.mark_flags_as_required(['root'])
  app.run(main)
