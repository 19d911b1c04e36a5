"""Built-in demo data: small, learnable ILSVRC2012-format archives.

Nobody can download ImageNet automatically, so the project generates archives in
ImageNet's own layout and builds them with tfds's real `imagenet2012` builder
code (archive reading, CMYK and PNG fix-ups), so the demo and the tests take the
path real ImageNet takes:

  <manual_dir>/ILSVRC2012_img_train.tar   one <wnid>.tar per class, each holding
                                          <wnid>_<n>.JPEG files
  <manual_dir>/ILSVRC2012_img_val.tar     ILSVRC2012_val_%08d.JPEG files
  <manual_dir>/demo_validation_labels.txt one wnid per line, in sorted file
                                          name order (the role of ImageNet's
                                          devkit ground truth)

Classes are real synset ids. A class is a kind of shape or pattern (disc,
square, stripes, ...) drawn with random colours, position, scale, rotation and
background, so a network has to learn shape and texture, not a colour.

The awkward cases real ImageNet has are included: a CMYK JPEG and a PNG stored
as .JPEG under file names from tfds's own fix-up lists (so its fixes run),
grayscale images, very small and very large images, and one corrupt file
(tfds stores bytes as they are, so it reaches the input pipeline, which must
skip and count it).

  python -m alexnet_jax.demo_data --out /tmp/demo --num_classes 10
"""

import dataclasses
import io
import json
import os
import tarfile

from absl import app
from absl import flags
from absl import logging
from etils import epath
import numpy as np
from PIL import Image
from PIL import ImageDraw
import tensorflow_datasets as tfds
from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as imagenet_lib

TRAIN_TAR = 'ILSVRC2012_img_train.tar'
VAL_TAR = 'ILSVRC2012_img_val.tar'
VAL_LABELS = 'demo_validation_labels.txt'
SPEC = 'demo_spec.json'

PATTERNS = ('disc', 'square', 'triangle', 'ring', 'cross', 'hstripes',
            'vstripes', 'checker', 'dots', 'diagonal')


@dataclasses.dataclass(frozen=True)
class DemoSpec:
  """What the generator writes; its name keys the built tfds dataset."""
  num_classes: int = 10
  train_per_class: int = 260
  val_per_class: int = 50
  min_size: int = 60  # Shorter/longer image sides are drawn in [min, max].
  max_size: int = 160
  seed: int = 0

  @property
  def name(self):
    return (f'k{self.num_classes}_n{self.train_per_class}_v{self.val_per_class}'
            f'_s{self.min_size}-{self.max_size}_seed{self.seed}')


def class_wnids(num_classes):
  """Real synset ids: those in tfds's PNG/CMYK fix-up lists first, so every
  fix-up has a class to live in, then the rest of labels.txt in order."""
  fixups = [f.split('_')[0] for f in imagenet_lib.PNG_IMAGES +
            imagenet_lib.CMYK_IMAGES]
  with open(imagenet_lib.imagenet_common.label_names_file()) as f:
    all_wnids = f.read().split()
  ordered = list(dict.fromkeys(fixups + all_wnids))
  if not 2 <= num_classes <= len(all_wnids):
    raise ValueError(f'num_classes must be in [2, {len(all_wnids)}], got '
                     f'{num_classes}.')
  return sorted(ordered[:num_classes])


def _colours(rng):
  """A foreground and background colour with a clear luminance difference."""
  while True:
    fg, bg = rng.integers(0, 256, size=(2, 3))
    if abs(fg.mean() - bg.mean()) > 60 or np.abs(fg - bg).max() > 140:
      return tuple(int(c) for c in fg), tuple(int(c) for c in bg)


def draw_pattern(kind, size, rng):
  """A (h, w) RGB PIL image of pattern `kind` with random nuisance factors."""
  w, h = size
  fg, bg = _colours(rng)
  img = Image.new('RGB', (w, h), bg)
  d = ImageDraw.Draw(img)
  s = min(w, h)
  # Objects sit in the central part, so 224/256 crops keep most of them.
  r = s * rng.uniform(0.22, 0.38)
  cx = w / 2 + rng.uniform(-0.12, 0.12) * w
  cy = h / 2 + rng.uniform(-0.12, 0.12) * h
  lw = max(2, int(r * rng.uniform(0.25, 0.4)))
  period = max(4, int(s * rng.uniform(0.1, 0.2)))
  if kind == 'disc':
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
  elif kind == 'square':
    a = rng.uniform(0, np.pi / 2)
    pts = [(cx + r * np.cos(a + k * np.pi / 2), cy + r * np.sin(a + k * np.pi / 2))
           for k in range(4)]
    d.polygon(pts, fill=fg)
  elif kind == 'triangle':
    a = rng.uniform(0, 2 * np.pi)
    pts = [(cx + r * np.cos(a + k * 2 * np.pi / 3),
            cy + r * np.sin(a + k * 2 * np.pi / 3)) for k in range(3)]
    d.polygon(pts, fill=fg)
  elif kind == 'ring':
    d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=lw)
  elif kind == 'cross':
    d.rectangle([cx - r, cy - lw / 2, cx + r, cy + lw / 2], fill=fg)
    d.rectangle([cx - lw / 2, cy - r, cx + lw / 2, cy + r], fill=fg)
  elif kind == 'hstripes':
    for y in range(int(rng.integers(period)), h, period):
      d.rectangle([0, y, w, y + period // 2 - 1], fill=fg)
  elif kind == 'vstripes':
    for x in range(int(rng.integers(period)), w, period):
      d.rectangle([x, 0, x + period // 2 - 1, h], fill=fg)
  elif kind == 'checker':
    for y in range(0, h, period):
      for x in range(0, w, period):
        if (x // period + y // period) % 2:
          d.rectangle([x, y, x + period - 1, y + period - 1], fill=fg)
  elif kind == 'dots':
    rad = max(1, period // 4)
    for y in range(period // 2, h, period):
      for x in range(period // 2, w, period):
        d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=fg)
  elif kind == 'diagonal':
    sign = 1 if rng.random() < 0.5 else -1
    for o in range(-h - w, w + h, period):
      d.line([(o, 0), (o + sign * h, h)] if sign > 0 else
             [(o, 0), (o - h, h)], fill=fg, width=max(1, period // 2))
  else:
    raise ValueError(kind)
  # Mild pixel noise so JPEG sizes and textures vary like photographs.
  arr = np.asarray(img, np.int16) + rng.integers(-12, 13, (h, w, 1))
  return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _jpeg(img, quality=90, **kw):
  buf = io.BytesIO()
  img.save(buf, 'JPEG', quality=quality, **kw)
  return buf.getvalue()


def _random_size(spec, rng):
  a, b = rng.integers(spec.min_size, spec.max_size + 1, size=2)
  return int(a), int(b)  # Varied aspect ratios, either orientation.


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _image_bytes(spec, rng, label):
  img = draw_pattern(PATTERNS[label % len(PATTERNS)], _random_size(spec, rng),
                     rng)
  if rng.random() < 0.05:
    img = img.convert('L')  # Grayscale JPEGs, as in ImageNet.
  return _jpeg(img)


def generate(manual_dir, spec=DemoSpec()):
  """Writes the demo archives and ground truth into `manual_dir`."""
  if spec.num_classes > len(PATTERNS):
    raise ValueError(f'The demo draws {len(PATTERNS)} kinds of pattern; '
                     f'num_classes={spec.num_classes} would repeat them.')
  os.makedirs(manual_dir, exist_ok=True)
  rng = np.random.default_rng(spec.seed)
  wnids = class_wnids(spec.num_classes)
  # The special files are named as in tfds's fix-up lists.
  # class_wnids puts the fix-up lists' synsets first: both have a class.
  special = {}
  png = imagenet_lib.PNG_IMAGES[0]
  cmyk = next(f for f in imagenet_lib.CMYK_IMAGES if f[:9] in wnids)
  img = draw_pattern(PATTERNS[wnids.index(cmyk[:9])], (120, 90), rng)
  special[cmyk] = _jpeg(img.convert('CMYK'))
  buf = io.BytesIO()
  draw_pattern(PATTERNS[wnids.index(png[:9])], (100, 140), rng).save(
      buf, 'PNG')
  special[png] = buf.getvalue()
  w0 = wnids[0]
  special[f'{w0}_900001.JPEG'] = _jpeg(
      draw_pattern(PATTERNS[0], (9, 7), rng))  # Very small.
  special[f'{w0}_900002.JPEG'] = _jpeg(
      draw_pattern(PATTERNS[0], (1800, 1400), rng))  # Very large.
  good = _jpeg(draw_pattern(PATTERNS[1], (80, 80), rng))
  # Corrupt: a JPEG start-of-image marker, then garbage bytes.
  special[f'{wnids[1]}_900003.JPEG'] = good[:2] + rng.bytes(len(good) - 2)

  with tarfile.open(os.path.join(manual_dir, TRAIN_TAR), 'w') as train:
    for label, wnid in enumerate(wnids):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as t:
        for n in range(spec.train_per_class):
          _add(t, f'{wnid}_{n + 1}.JPEG', _image_bytes(spec, rng, label))
        for name, data in special.items():
          if name.startswith(wnid):
            _add(t, name, data)
      _add(train, f'{wnid}.tar', inner.getvalue())

  labels = rng.permutation(np.repeat(np.arange(spec.num_classes),
                                     spec.val_per_class))
  with tarfile.open(os.path.join(manual_dir, VAL_TAR), 'w') as val:
    for i, label in enumerate(labels):
      _add(val, f'ILSVRC2012_val_{i + 1:08d}.JPEG',
           _image_bytes(spec, rng, label))
  with open(os.path.join(manual_dir, VAL_LABELS), 'w') as f:
    f.write('\n'.join(wnids[l] for l in labels) + '\n')
  with open(os.path.join(manual_dir, SPEC), 'w') as f:
    json.dump(dataclasses.asdict(spec) | {'wnids': wnids}, f)


class DemoImagenet2012(tfds.builder_cls('imagenet2012')):
  """tfds's imagenet2012 builder on the demo archives.

  Everything that reads the archives (`_generate_examples`, the CMYK/PNG
  `_fix_image`) is the real builder's. Two things differ: the class list is
  the demo's (labels 0..K-1) and the validation labels come from the ground
  truth shipped beside the archives, not from tfds's bundled ImageNet labels.
  """
  VERSION = tfds.core.Version('5.1.0')  # >= 3.0.0: the fix-ups run.
  SUPPORTED_VERSIONS = []
  # tfds reads README/CITATIONS from the defining package; this one's.
  pkg_dir_path = epath.Path(__file__).parent

  def __init__(self, *, spec=DemoSpec(), **kwargs):
    self.spec = spec
    super().__init__(config=tfds.core.BuilderConfig(name=spec.name), **kwargs)

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(
                names=class_wnids(self.spec.num_classes)),
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://image-net.org/',
    )

  def _split_generators(self, dl_manager):
    manual_dir = dl_manager.manual_dir
    with open(os.path.join(manual_dir, VAL_LABELS)) as f:
      labels = f.read().split()
    with tarfile.open(os.path.join(manual_dir, VAL_TAR)) as tar:
      names = sorted(tar.getnames())
    splits = []
    imagenet_lib._add_split_if_exists(  # pylint: disable=protected-access
        splits, tfds.Split.TRAIN, os.path.join(manual_dir, TRAIN_TAR),
        dl_manager)
    imagenet_lib._add_split_if_exists(  # pylint: disable=protected-access
        splits, tfds.Split.VALIDATION, os.path.join(manual_dir, VAL_TAR),
        dl_manager, validation_labels=dict(zip(names, labels)))
    return splits


def prepare_demo(data_dir, spec=None, build=True, **spec_kwargs):
  """Generates (once) and builds the demo; returns the prepared tfds builder.

  The archives go to `<data_dir>/demo_manual/<spec.name>`, the tfds files to
  `<data_dir>/demo_imagenet2012/<spec.name>/...`. build=False: the builder,
  prepared or not (nothing generated or built).
  """
  spec = spec or DemoSpec(**spec_kwargs)
  manual_dir = os.path.join(data_dir, 'demo_manual', spec.name)
  if not build:
    return DemoImagenet2012(spec=spec, data_dir=data_dir)
  if not os.path.exists(os.path.join(manual_dir, SPEC)):
    logging.info('Generating demo archives in %s', manual_dir)
    generate(manual_dir, spec)
  builder = DemoImagenet2012(spec=spec, data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def main(argv):
  del argv
  f = flags.FLAGS
  b = prepare_demo(f.out, num_classes=f.num_classes,
                   train_per_class=f.train_per_class,
                   val_per_class=f.val_per_class)
  print(b.info.splits)


if __name__ == '__main__':
  # Flags only when run as a program, so importing never clashes.
  flags.DEFINE_string('out', None, 'Data dir for the demo.')
  flags.DEFINE_integer('num_classes', DemoSpec.num_classes, 'Classes.')
  flags.DEFINE_integer('train_per_class', DemoSpec.train_per_class,
                       'Training images per class.')
  flags.DEFINE_integer('val_per_class', DemoSpec.val_per_class,
                       'Validation images per class.')
  flags.mark_flag_as_required('out')
  app.run(main)
