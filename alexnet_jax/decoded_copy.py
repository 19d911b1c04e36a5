"""The decoded copy: a dataset stored as raw uint8 pixels, read at memory
speed.

The pre-resized JPEG copy (prepare.py) leaves the host one JPEG decode per
image; this copy stores the same resize_size x resize_size central squares
decoded, so the host only copies bytes, and the random crop, flip, PCA
lighting and mean subtraction run on the accelerator (device_augment.py).
The price is size: 196,612 bytes an image at 256 (ImageNet's training set:
about 252 GB), which wants the page cache or a fast local disk.

Format (written by `python -m alexnet_jax.prepare --config=...
--decoded_dir=DIR`):
DIR/prepared.json ("format": "decoded", resize_size, num_classes, each
split's shards and record counts) and DIR/<split>-NNNNN.bin shards of
fixed-length records, a little-endian int32 label then the image's r*r*3
bytes (row-major RGB). Record i of a shard sits at byte i * record_bytes, so
the reader memory-maps the shards (numpy.memmap) and takes any record
directly: each epoch's order is a full permutation, a function of (seed,
process, epoch), and a restart at any step reads nothing it does not use.
Each process reads its contiguous share of the records (as the other
sources). Memory-mapping needs local files: the copy lives on a local disk,
whole on each host (the run also reads the split's size and classes, and the
statistics, from every shard).
"""

import json
import os
from typing import List, Sequence, Tuple

import numpy as np

FORMAT = 'decoded'
META = 'prepared.json'  # Of either copy (input_pipeline.PREPARED_META).


def record_dtype(resize_size: int) -> np.dtype:
  return np.dtype([('label', '<i4'), ('image', 'u1',
                                      (resize_size, resize_size, 3))])


def size_bytes(num_images: int, resize_size: int) -> int:
  return num_images * record_dtype(resize_size).itemsize


def check_resize_size(directory: str, meta, resize_size: int):
  """An error unless the copy (either kind) in `directory`, whose
  prepared.json says `meta`, holds resize_size-pixel images."""
  if meta['resize_size'] != resize_size:
    raise ValueError(
        f'{directory!r} holds {meta["resize_size"]}-pixel images but '
        f'config.data.resize_size={resize_size}; prepare it again.')


def check_local(directory: str):
  """An error unless `directory` is local (a bucket cannot be memory-mapped)."""
  if '://' in directory:
    raise ValueError(
        f'The decoded copy {directory!r} must be on a local disk: it is read '
        'by memory-mapping its shards at memory speed. Copy it to each '
        'host\'s local disk (e.g. gcloud storage cp -r) and point '
        '--config.data.prepared_dir there.')


class Writer:
  """Appends a split's records to shards of `shard_size` records."""

  def __init__(self, directory: str, split: str, resize_size: int,
               shard_size: int = 4096):
    check_local(directory)
    os.makedirs(directory, exist_ok=True)
    self.directory, self.split, self.shard_size = directory, split, shard_size
    self.record = np.zeros((), record_dtype(resize_size))
    self.files: List[List] = []  # [[name, count]]
    self._file = None

  def add(self, image: np.ndarray, label: int):
    if self._file is None or self.files[-1][1] == self.shard_size:
      self._close_shard()
      self.files.append([f'{self.split}-{len(self.files):05d}.bin', 0])
      self._file = open(os.path.join(self.directory, self.files[-1][0]), 'wb')
    self.record['label'] = label
    self.record['image'] = image
    self._file.write(self.record.tobytes())
    self.files[-1][1] += 1

  def _close_shard(self):
    if self._file is not None:
      self._file.close()
      self._file = None

  def close(self) -> List[List]:
    self._close_shard()
    return self.files


class Reader:
  """One split of a decoded copy: this process's share of its records."""

  def __init__(self, directory: str, split: str, process_index: int,
               process_count: int, resize_size: int, meta=None):
    """`meta`: the copy's prepared.json, if already read."""
    check_local(directory)
    if meta is None:
      with open(os.path.join(directory, META)) as f:
        meta = json.load(f)
    check_resize_size(directory, meta, resize_size)
    self.directory, self.num_classes = directory, meta['num_classes']
    self.resize_size = resize_size
    dtype = record_dtype(resize_size)
    names = [name for name, _ in meta['splits'][split]]
    counts = [count for _, count in meta['splits'][split]]
    self.counts = np.asarray(counts, np.int64)
    self.ends = np.cumsum(self.counts)
    self.total_examples = int(self.ends[-1]) if counts else 0
    base, extra = divmod(self.total_examples, process_count)
    self.lo = process_index * base + min(process_index, extra)
    self.num_examples = base + (process_index < extra)
    self.shards = []
    for name, count in zip(names, counts):
      path = os.path.join(directory, name)
      size = os.path.getsize(path) if os.path.exists(path) else -1
      if size != count * dtype.itemsize:
        raise ValueError(
            f'The decoded copy\'s shard {path} holds '
            f'{"nothing" if size < 0 else f"{size:,} bytes"}, not {count:,} '
            f'records of {dtype.itemsize:,} bytes: it is missing, truncated or '
            'corrupt. Write the copy again (python -m alexnet_jax.prepare '
            f'--config=... --decoded_dir={directory}).')
      self.shards.append(np.memmap(path, dtype=dtype, mode='r',
                                   shape=(count,)))

  def epoch_order(self, seed: Sequence[int]) -> np.ndarray:
    """This process's record indices (0..num_examples) in the order of the
    epoch keyed by `seed`, e.g. (run seed, process, epoch)."""
    return np.random.default_rng(list(seed)).permutation(self.num_examples)

  def read(self, indices: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, r, r, 3), labels int32 (n,)) of this process's
    records `indices`, in that order."""
    where = np.asarray(indices, np.int64) + self.lo
    shard = np.searchsorted(self.ends, where, side='right')
    r = self.resize_size
    images = np.empty((len(where), r, r, 3), np.uint8)
    labels = np.empty((len(where),), np.int32)
    for s in np.unique(shard):
      pick = np.flatnonzero(shard == s)
      start = self.ends[s] - self.counts[s]
      records = self.shards[s][where[pick] - start]
      images[pick] = records['image']
      labels[pick] = records['label']
    bad = (labels < 0) | (labels >= self.num_classes)
    if bad.any():
      raise ValueError(
          f'The decoded copy in {self.directory} holds label '
          f'{labels[bad][0]} (of {self.num_classes} classes): it is corrupt. '
          'Write the copy again (python -m alexnet_jax.prepare ... '
          f'--decoded_dir={self.directory}).')
    return images, labels
