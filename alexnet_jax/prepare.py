r"""A config's one-time data work, done once before training (not inside
every training process): `python -m alexnet_jax.prepare --config=...`.

  python -m alexnet_jax.prepare --config=configs/alexnet.py \
      --config.data.manual_dir=/data/ILSVRC2012 [--copy_dir=/data/copy] \
      [--decoded_dir=/local/decoded]

1. Builds the dataset: tfds's imagenet2012 from the ILSVRC2012 tars in
   config.data.manual_dir into config.data.data_dir (hours, once; tfds shows
   its progress), or the generated demo data. A multi-process training run
   never builds it: it stops at start naming this command.
2. With --copy_dir, writes the pre-resized copy, the paper's own trick (§2):
   every image's shorter side resized to config.data.resize_size and the
   central square cropped (preprocess.decode_and_resize, as evaluation
   does), stored as a JPEG in TFRecord shards with its label, in the
   dataset's order, train and validation. Decoding a 256x256 JPEG is about
   twice as cheap as an ImageNet original (docs/BENCHMARKS_input.md).
   Undecodable records are left out and counted. The stored pixels are
   rounded to 8 bits and JPEG-compressed once more (quality 95): a small
   loss, the price of the cheaper decode.
   With --decoded_dir, writes the decoded copy (decoded_copy.py): the same
   squares as raw uint8 pixels, nothing to decode, augmented on the
   accelerator; it first prints the size it will take next to the JPEG
   copy's.
3. Computes the training set's mean image and RGB PCA for the data training
   will read (the last copy written, if any) and caches them next to it
   (input_pipeline.training_set_stats), with progress in the log.
4. Prints the training command that uses all of it.

Rerunning is safe: a built dataset is kept, the copy is written again, and
cached statistics are reused while their key matches.
"""

import datetime
import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np
import tensorflow as tf

from alexnet_jax import decoded_copy
from alexnet_jax import input_pipeline as ip
from alexnet_jax import paths
from alexnet_jax import preprocess as pp
from alexnet_jax import startup


def _example(image, label):
  return tf.train.Example(features=tf.train.Features(feature={
      'image': tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
      'label': tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
  })).SerializeToString()


class _JpegShards:
  """The JPEG copy's TFRecord shards of one split (tf.io.gfile: any path)."""

  def __init__(self, directory, split, shard_size):
    self.directory, self.split, self.shard_size = directory, split, shard_size
    self.files, self._writer = [], None

  def add(self, image, label):
    if self._writer is None or self.files[-1][1] == self.shard_size:
      self.close()
      self.files.append([f'{self.split}-{len(self.files):05d}.tfrecord', 0])
      self._writer = tf.io.TFRecordWriter(
          os.path.join(self.directory, self.files[-1][0]))
    self._writer.write(_example(image, int(label)))
    self.files[-1][1] += 1

  def close(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    return self.files


def resized_images(config, source, encode_quality=None):
  """The split's images, shorter side resized and centre-cropped, rounded
  to uint8 (JPEG-encoded at `encode_quality` if given), with their labels;
  undecodable records left out."""
  d = config.data

  def resize(x, label):
    image = pp.decode_and_resize(x, d.resize_size, d.resize_antialias)
    image = tf.cast(tf.round(image), tf.uint8)
    if encode_quality:
      image = tf.io.encode_jpeg(image, quality=encode_quality)
    return image, label
  return source.records(None, 0).map(
      resize, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()


def prepare(config, out_dir, quality=95, shard_size=1024, decoded=False):
  """Writes a copy of the dataset's train and validation splits to out_dir:
  the JPEG copy (DIR/<split>-NNNNN.tfrecord) or, if `decoded`, the decoded
  copy (DIR/<split>-NNNNN.bin, decoded_copy.py), then DIR/prepared.json;
  returns the metadata (format, shard names and counts per split, skipped
  records)."""
  d = config.data
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.prepared_dir = ''  # Read the dataset itself.
  tf.io.gfile.makedirs(out_dir)
  # Rewritten last: a rerun stopped half-way leaves no copy that looks done.
  meta_path = os.path.join(out_dir, ip.PREPARED_META)
  if tf.io.gfile.exists(meta_path):
    tf.io.gfile.remove(meta_path)
  kind = 'decoded copy' if decoded else 'pre-resized copy'
  meta = {'format': decoded_copy.FORMAT if decoded else 'jpeg',
          'resize_size': d.resize_size, 'source': d.dataset, 'splits': {},
          'skipped': {},
          # Which writing this is (the cache of its statistics is keyed by
          # it): a rewrite changes it, a copy to another disk keeps it.
          'written': datetime.datetime.now(
              datetime.timezone.utc).isoformat()}
  if not decoded:
    meta['quality'] = quality
  for split in ('train', 'eval'):
    source = ip.get_source(config, split, 0, 1)
    meta['num_classes'] = source.num_classes
    shards = (decoded_copy.Writer(out_dir, split, d.resize_size, shard_size)
              if decoded else _JpegShards(out_dir, split, shard_size))
    total, last_log = 0, time.time()
    for image, label in resized_images(config, source, None if decoded else
                                       quality).as_numpy_iterator():
      if time.time() - last_log > 30:
        last_log = time.time()
        logging.info('The %s, %s: %s of %s images.', kind, split,
                      f'{total:,}', f'{source.num_examples:,}')
      shards.add(image, label)
      total += 1
    meta['splits'][split] = shards.close()
    meta['skipped'][split] = source.num_examples - total
    if meta['skipped'][split]:
      logging.warning('%s: skipped %d undecodable record(s).', split,
                      meta['skipped'][split])
  paths.write_text(meta_path, json.dumps(meta, indent=1))
  return meta


def _size(n):
  return f'{n / 1e9:,.1f} GB' if n >= 1e9 else f'{n / 1e6:,.1f} MB'


def copy_sizes(config, jpeg_dir='', sample=64, quality=95):
  """(decoded copy bytes, JPEG copy bytes, JPEG copy measured?) for the
  configured dataset: the decoded copy's exact size; the JPEG copy's size
  on disk if `jpeg_dir` holds one, else estimated from `sample` images
  encoded as prepare() would."""
  d = config.data
  splits = {s: ip.get_source(config, s, 0, 1) for s in ('train', 'eval')}
  images = sum(s.total_examples for s in splits.values())
  decoded = decoded_copy.size_bytes(images, d.resize_size)
  if jpeg_dir and tf.io.gfile.exists(os.path.join(jpeg_dir,
                                                  ip.PREPARED_META)):
    return decoded, sum(f.length for f in map(
        tf.io.gfile.stat, tf.io.gfile.glob(os.path.join(jpeg_dir,
                                                        '*.tfrecord')))), True
  sizes = [len(x) for x, _ in resized_images(
      config, splits['train'], quality).take(sample).as_numpy_iterator()]
  return decoded, int(np.mean(sizes) * images) if sizes else 0, False


def training_command(argv, prepared_dir=None) -> str:
  """launch.py with the --config and --config.* flags of this command's
  command line `argv` (each as --flag=value, whether given so or as two
  words), and the copy to train from if one was written (instead of any
  prepared_dir given)."""
  keep, args = [], list(argv[1:])
  while args:
    arg = args.pop(0)
    if not arg.startswith('--config'):
      continue
    if '=' not in arg and args and not args[0].startswith('--'):
      arg = f'{arg}={args.pop(0)}'
    if not (prepared_dir and
            arg.startswith('--config.data.prepared_dir=')):
      keep.append(arg)
  if prepared_dir:
    keep.append(f'--config.data.prepared_dir={prepared_dir}')
  return ' '.join(['python launch.py', *keep, '--workdir=<WORKDIR>'])


def main(argv):
  del argv  # Flags only.
  startup.quiet_libraries(verbose=logging.get_verbosity() >= 1)
  startup.hide_gpus_from_tensorflow()
  f = flags.FLAGS
  config = f.config
  paths.check_config(config)
  paths.check(f.copy_dir, '--copy_dir')  # All before any work.
  if f.decoded_dir:
    decoded_copy.check_local(paths.check(f.decoded_dir, '--decoded_dir'))
  source = ip.get_source(config, 'train', 0, 1)  # Builds the dataset.
  logging.info('Dataset %s: %s training images, %d classes.',
               config.data.dataset, f'{source.total_examples:,}',
               source.num_classes)
  copies = [(d, decoded) for d, decoded in ((f.copy_dir, False),
                                             (f.decoded_dir, True)) if d]
  if f.decoded_dir:
    decoded, jpeg, measured = copy_sizes(config, f.copy_dir or
                                         config.data.get('prepared_dir', ''))
    print(f'The decoded copy will take {_size(decoded)} in {f.decoded_dir} '
          f'(raw {config.data.resize_size}x{config.data.resize_size}x3 '
          'pixels): keep it in the page cache (that much free RAM) or on a '
          'fast local disk (NVMe). The JPEG copy takes '
          f'{"" if measured else "about "}{_size(jpeg)}.', flush=True)
  for directory, decoded in copies:
    meta = prepare(config, directory, f.quality,
                   f.decoded_shard_size if decoded else f.shard_size, decoded)
    counts = {k: int(np.sum([c for _, c in v]))
              for k, v in meta['splits'].items()}
    logging.info('Wrote the %s copy %s: %s.', meta['format'], directory,
                 counts)
  if copies:  # Train from (and take the mean of) the last copy written.
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.data.prepared_dir = copies[-1][0]
  if config.data.mean == 'image' and not config.data.mean_image_path:
    stats = ip.training_set_stats(config, compute_if_missing=True)
    logging.info('Mean image %s (%d images); RGB PCA eigenvectors %s, '
                 'standard deviations %s (the paper\'s are the default; '
                 '--config.data.pca_eigvecs/pca_stddevs to use these).',
                 stats['path'], int(stats['num_images']),
                 np.round(stats['eigvecs'], 4).tolist(),
                 np.round(stats['stddevs'], 3).tolist())
  print('Prepared. Train with:\n  ' + training_command(
      sys.argv, copies[-1][0] if copies else None))


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'Config file.',
                                  lock_config=True)
  flags.DEFINE_string('copy_dir', '', 'Write the pre-resized JPEG copy here.')
  flags.DEFINE_string('decoded_dir', '', 'Write the decoded copy here (a '
                      'local disk: raw pixels, ~196 KB an image at 256).')
  flags.DEFINE_integer('quality', 95, 'JPEG quality of the copy.')
  flags.DEFINE_integer('shard_size', 1024, 'Images per TFRecord shard.')
  flags.DEFINE_integer('decoded_shard_size', 4096,
                       'Images per shard of the decoded copy.')
  flags.mark_flags_as_required(['config'])
  app.run(main)
