r"""Writes a pre-resized copy of a dataset: the paper's own trick (§2).

The paper stored its images at 256x256 ("rescale the shorter side to 256,
take the central 256x256", PAPER.md data section). Here every image of
the configured dataset (imagenet2012, demo or folder; train and validation)
is decoded, its shorter side resized to config.data.resize_size and the
central square cropped (preprocess.decode_and_resize, as evaluation does),
then stored as a JPEG in TFRecord shards with its label, in the dataset's own
order. Decoding a 256x256 JPEG is several times cheaper than decoding an
ImageNet original (docs/BENCHMARKS_input.md). Undecodable records are left
out and counted. Point training at the copy with
--config.data.prepared_dir=DIR (same splits, labels and class count).

  python -m alexnet_jax.prepare --config=configs/alexnet.py --out=DIR \
      [--quality=95] [--shard_size=1024]

The stored pixels are rounded to 8 bits and JPEG-compressed once more
(quality 95 by default): a small loss (mean |diff| ~1-2 on 0-255), the price
of the cheaper decode.
"""

import json
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np
import tensorflow as tf

from alexnet_jax import input_pipeline as ip
from alexnet_jax import preprocess as pp
from alexnet_jax import startup


def _example(image, label):
  return tf.train.Example(features=tf.train.Features(feature={
      'image': tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
      'label': tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
  })).SerializeToString()


def prepare(config, out_dir, quality=95, shard_size=1024):
  """Writes DIR/<split>-NNNNN.tfrecord and DIR/prepared.json; returns the
  metadata (shard names and counts per split, skipped records)."""
  d = config.data
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.prepared_dir = ''  # Read the dataset itself.
  tf.io.gfile.makedirs(out_dir)
  meta = {'resize_size': d.resize_size, 'quality': quality,
          'source': d.dataset, 'splits': {}, 'skipped': {}}
  for split in ('train', 'eval'):
    source = ip.get_source(config, split, 0, 1)
    meta['num_classes'] = source.num_classes

    def encode(x, label):
      image = pp.decode_and_resize(x, d.resize_size, d.resize_antialias)
      image = tf.cast(tf.round(image), tf.uint8)
      return tf.io.encode_jpeg(image, quality=quality), label
    ds = source.records(None, 0).map(
        encode, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
    files, writer, count, total = [], None, 0, 0
    for image, label in ds.as_numpy_iterator():
      if writer is None or count == shard_size:
        if writer is not None:
          writer.close()
          files[-1][1] = count
        files.append([f'{split}-{len(files):05d}.tfrecord', 0])
        writer = tf.io.TFRecordWriter(os.path.join(out_dir, files[-1][0]))
        count = 0
      writer.write(_example(image, int(label)))
      count += 1
      total += 1
    if writer is not None:
      writer.close()
      files[-1][1] = count
    meta['splits'][split] = files
    meta['skipped'][split] = source.num_examples - total
    if meta['skipped'][split]:
      logging.warning('%s: skipped %d undecodable record(s).', split,
                      meta['skipped'][split])
  with tf.io.gfile.GFile(os.path.join(out_dir, ip.PREPARED_META), 'w') as f:
    json.dump(meta, f, indent=1)
  return meta


def main(argv):
  del argv
  startup.quiet_libraries(verbose=logging.get_verbosity() >= 1)
  startup.hide_gpus_from_tensorflow()
  f = flags.FLAGS
  meta = prepare(f.config, f.out, f.quality, f.shard_size)
  counts = {k: int(np.sum([c for _, c in v]))
            for k, v in meta['splits'].items()}
  logging.info('Wrote %s: %s', f.out, counts)
  print(f'--config.data.prepared_dir={f.out}')


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'Config file.')
  flags.DEFINE_string('out', None, 'Output directory.')
  flags.DEFINE_integer('quality', 95, 'JPEG quality of the stored copies.')
  flags.DEFINE_integer('shard_size', 1024, 'Images per TFRecord shard.')
  flags.mark_flags_as_required(['config', 'out'])
  app.run(main)
