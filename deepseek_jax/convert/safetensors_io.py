"""Lazy safetensors reading (and writing) with numpy + ml_dtypes, no torch.

`safetensors.numpy` knows neither BF16 nor F8_E4M3, the dtypes DeepSeek's checkpoints use, so we
read the format directly: 8 bytes little-endian header length, a JSON header mapping each name to
{dtype, shape, data_offsets}, then the raw bytes. Tensors are `np.memmap` views, read one at a time.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
    'BF16': np.dtype(ml_dtypes.bfloat16), 'F8_E4M3': np.dtype(ml_dtypes.float8_e4m3fn),
    'F8_E5M2': np.dtype(ml_dtypes.float8_e5m2), 'I64': np.dtype(np.int64),
    'I32': np.dtype(np.int32), 'I16': np.dtype(np.int16), 'I8': np.dtype(np.int8),
    'U8': np.dtype(np.uint8), 'BOOL': np.dtype(np.bool_),
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
_MAX_HEADER = 100 << 20  # the format's own limit on the JSON header


class SafetensorsFile:
  """One .safetensors file: names, shapes and dtypes from the header; data on demand."""

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    with open(self.path, 'rb') as f:
      (header_len,) = struct.unpack('<Q', f.read(8))
      if header_len > _MAX_HEADER:
        raise ValueError(f'{self.path}: header length {header_len} is not a safetensors header')
      header = json.loads(f.read(header_len))
    header.pop('__metadata__', None)
    self._data_start = 8 + header_len
    self._entries = header
    for name, entry in header.items():
      if entry['dtype'] not in DTYPES:
        raise ValueError(f'{self.path}: tensor {name!r} has unsupported dtype {entry["dtype"]}')

  def keys(self) -> list[str]:
    return list(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name]['shape'])

  def dtype(self, name: str) -> np.dtype:
    return DTYPES[self._entries[name]['dtype']]

  def get(self, name: str) -> np.ndarray:
    """A read-only memmap view of one tensor (nothing is read until it is used)."""
    entry = self._entries[name]
    begin, end = entry['data_offsets']
    dtype, shape = DTYPES[entry['dtype']], tuple(entry['shape'])
    if end - begin != dtype.itemsize * int(np.prod(shape)):
      raise ValueError(f'{self.path}: tensor {name!r} has {end - begin} bytes, expected '
                       f'{dtype.itemsize * int(np.prod(shape))} for {entry["dtype"]} {list(shape)}')
    if end == begin:
      return np.zeros(shape, dtype)
    return np.memmap(self.path, dtype=dtype, mode='r', offset=self._data_start + begin,
                     shape=shape)


class Checkpoint:
  """A checkpoint directory: one `model.safetensors`, or shards listed by the index file."""

  def __init__(self, directory: str | os.PathLike):
    directory = pathlib.Path(directory)
    index = directory / INDEX_FILE
    if index.exists():
      weight_map = json.loads(index.read_text())['weight_map']
      files = sorted(set(weight_map.values()))
    elif (directory / SINGLE_FILE).exists():
      files = [SINGLE_FILE]
    else:
      raise FileNotFoundError(f'{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found')
    self._where: dict[str, SafetensorsFile] = {}
    for file_name in files:
      if not (directory / file_name).is_file():
        raise FileNotFoundError(f'{index}: lists shard {file_name}, which is not in {directory}')
      shard = SafetensorsFile(directory / file_name)
      for name in shard.keys():
        if name in self._where:
          raise ValueError(f'tensor {name!r} appears in both {self._where[name].path.name} '
                           f'and {file_name}')
        self._where[name] = shard

  def names(self) -> set[str]:
    return set(self._where)

  def file_of(self, name: str) -> str:
    return self._where[name].path.name

  def shape(self, name: str) -> tuple[int, ...]:
    return self._where[name].shape(name)

  def dtype(self, name: str) -> np.dtype:
    return self._where[name].dtype(name)

  def get(self, name: str) -> np.ndarray:
    return self._where[name].get(name)


def write_file(path: str | os.PathLike, tensors: dict[str, np.ndarray],
               metadata: dict[str, str] | None = None) -> None:
  """Writes numpy arrays (ml_dtypes included) as one .safetensors file."""
  header, offset = {}, 0
  arrays = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
  for name, value in arrays.items():
    if value.dtype not in DTYPE_NAMES:
      raise ValueError(f'tensor {name!r}: dtype {value.dtype} has no safetensors name')
    header[name] = {'dtype': DTYPE_NAMES[value.dtype], 'shape': list(value.shape),
                    'data_offsets': [offset, offset + value.nbytes]}
    offset += value.nbytes
  if metadata:
    header['__metadata__'] = metadata
  encoded = json.dumps(header, separators=(',', ':')).encode()
  encoded += b' ' * (-len(encoded) % 8)  # keep the data 8-byte aligned, as the reference writer
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(encoded)))
    f.write(encoded)
    for value in arrays.values():
      f.write(value.reshape(-1).view(np.uint8).data)  # the array's own bytes, not a copy
