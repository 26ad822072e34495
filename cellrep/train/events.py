"""TensorBoard scalar events, written directly: the event-file format without TensorBoard's packages.

An event file is a sequence of records: the data's length (uint64, little-endian),
the masked CRC-32C of those 8 bytes (uint32), the data, the masked CRC-32C of the
data. Each record's data is a serialised `tensorflow.Event` protocol buffer; the
few fields a scalar needs are encoded here by hand:

  Event   1 wall_time (double), 2 step (int64), 3 file_version (string),
          5 summary (Summary), 7 session_log (SessionLog)
  Summary 1 value (repeated Value);  Value 1 tag (string), 2 simple_value (float)
  SessionLog 1 status (enum; START = 1)

A SessionLog START at step s tells TensorBoard to discard the events of steps ≥ s
written before it (a run resumed from a checkpoint). Written this way because
tensorboardX, the usual writer, imports PyTorch whenever it is installed: 630 MB of
resident memory and 2 s at start-up of every training run (docs/performance.md).
"""

from __future__ import annotations

import itertools
import os
import pathlib
import socket
import struct
import time

# CRC-32C (Castagnoli), reflected polynomial.
_POLY = 0x82F63B78
_TABLE = []
for _n in range(256):
  _c = _n
  for _ in range(8):
    _c = (_c >> 1) ^ _POLY if _c & 1 else _c >> 1
  _TABLE.append(_c)


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # int64 fields encode negatives as ten bytes
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, wire: int) -> bytes:
  return _varint(number << 3 | wire)


def _bytes_field(number: int, payload: bytes) -> bytes:
  return _field(number, 2) + _varint(len(payload)) + payload


def event(wall_time: float, step: int = 0, *, file_version: str = "", scalars=None,
          session_start: bool = False) -> bytes:
  """A serialised Event: wall_time, step and one of file_version, scalars {tag: value},
  or a SessionLog START."""
  out = _field(1, 1) + struct.pack("<d", wall_time)
  if step:
    out += _field(2, 0) + _varint(int(step))
  if file_version:
    out += _bytes_field(3, file_version.encode())
  if scalars:
    values = b"".join(
        _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", value))
        for tag, value in scalars.items())
    out += _bytes_field(5, values)
  if session_start:
    out += _bytes_field(7, _field(1, 0) + _varint(1))
  return out


def record(data: bytes) -> bytes:
  """One record of an event file around `data`."""
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", masked_crc32c(header)) + data
          + struct.pack("<I", masked_crc32c(data)))


class EventWriter:
  """Scalars to a new `events.out.tfevents.*` file in `directory`, flushed per `write`.

  purge_step: events of this step and later, from earlier files, are to be discarded
  (a run resumed from a checkpoint at purge_step - 1).
  """

  def __init__(self, directory, purge_step: int | None = None):
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = time.time()
    name = f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}"
    for n in itertools.count():  # a new file, even when one was started this second
      self.path = directory / (name if n == 0 else f"{name}.{n}")
      try:
        self._file = self.path.open("xb")
        break
      except FileExistsError:
        continue
    self._file.write(record(event(now, file_version="brain.Event:2")))
    if purge_step is not None:
      self._file.write(record(event(now, purge_step, session_start=True)))
    self._file.flush()

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if scalars:
      self._file.write(record(event(time.time(), step, scalars=scalars)))
      self._file.flush()

  def close(self) -> None:
    self._file.close()
