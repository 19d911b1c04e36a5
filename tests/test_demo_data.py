"""The demo archives go through tfds's real imagenet2012 builder code."""
import json
import os
import tarfile

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as imagenet_lib

from alexnet_jax import demo_data
from tests.data_fixtures import demo_dir, SPEC  # pylint: disable=unused-import


def _records(data_dir, split):
  b = demo_data.DemoImagenet2012(spec=SPEC, data_dir=data_dir)
  ds = b.as_dataset(split, decoders={'image': tfds.decode.SkipDecoding()})
  return b, {r['file_name'].decode(): r for r in ds.as_numpy_iterator()}


def test_archives_have_imagenet_layout(demo_dir):
  manual = os.path.join(demo_dir, 'demo_manual', SPEC.name)
  wnids = demo_data.class_wnids(SPEC.num_classes)
  with open(imagenet_lib.imagenet_common.label_names_file()) as f:
    assert set(wnids) <= set(f.read().split())  # Real synset ids.
  with tarfile.open(os.path.join(manual, demo_data.TRAIN_TAR)) as t:
    assert sorted(t.getnames()) == [w + '.tar' for w in wnids]
  with tarfile.open(os.path.join(manual, demo_data.VAL_TAR)) as t:
    names = sorted(t.getnames())
  assert names[0] == 'ILSVRC2012_val_00000001.JPEG'
  assert len(names) == SPEC.num_classes * SPEC.val_per_class


def test_fixups_ran_and_awkward_cases(demo_dir):
  b, recs = _records(demo_dir, 'train')
  cmyk = [n for n in recs if n in imagenet_lib.CMYK_IMAGES]
  png = [n for n in recs if n in imagenet_lib.PNG_IMAGES]
  assert len(cmyk) == 1 and len(png) == 1
  for n in cmyk + png:  # tfds re-encoded both as RGB JPEG.
    data = recs[n]['image']
    assert tf.io.is_jpeg(data)
    assert tf.image.extract_jpeg_shape(data, output_type=tf.int32)[2] == 3
  shapes = {n: tuple(tf.image.extract_jpeg_shape(r['image']).numpy())
            for n, r in recs.items() if tf.io.is_jpeg(r['image']) and
            not n.endswith('900003.JPEG')}
  assert any(s[2] == 1 for s in shapes.values())  # Grayscale.
  assert min(min(s[:2]) for s in shapes.values()) < 16  # Very small.
  assert max(max(s[:2]) for s in shapes.values()) > 1000  # Very large.
  aspect = [s[1] / s[0] for s in shapes.values()]
  assert min(aspect) < 0.8 and max(aspect) > 1.25
  corrupt = [n for n in recs if n.endswith('900003.JPEG')]
  assert len(corrupt) == 1
  assert b.info.features['label'].num_classes == SPEC.num_classes


def test_validation_labels_from_demo_ground_truth(demo_dir):
  manual = os.path.join(demo_dir, 'demo_manual', SPEC.name)
  with open(os.path.join(manual, demo_data.VAL_LABELS)) as f:
    truth = f.read().split()
  b, recs = _records(demo_dir, 'validation')
  names = b.info.features['label'].names
  for i, n in enumerate(sorted(recs)):
    assert names[recs[n]['label']] == truth[i]


def test_classes_vary_within_class():
  rng = np.random.default_rng(0)
  a = [np.asarray(demo_data.draw_pattern('disc', (64, 64), rng), np.float32)
       for _ in range(8)]
  means = np.array([x.mean((0, 1)) for x in a])
  assert means.std(0).min() > 10  # Not a constant colour per class.


def test_spec_is_recorded(demo_dir):
  manual = os.path.join(demo_dir, 'demo_manual', SPEC.name)
  with open(os.path.join(manual, demo_data.SPEC)) as f:
    assert json.load(f)['num_classes'] == SPEC.num_classes
