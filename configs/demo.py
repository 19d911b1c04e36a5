r"""The demo: generated data and a small AlexNet, end to end on a laptop CPU.

  python launch.py --config=configs/demo.py --workdir=/tmp/alexnet_demo

The same as `--config=configs/alexnet.py:demo` (what it is: `demo` in
configs/alexnet.py); variants combine as there, e.g.
`--config=configs/demo.py:no_lrn`.
"""

from configs import alexnet


def get_config(variant: str = ''):
  return alexnet.get_config(','.join(['demo'] + variant.split(',')))
