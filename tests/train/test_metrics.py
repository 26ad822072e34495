import math

import pytest

from cellrep.train.metrics import MetricWriter, read_metrics


def test_jsonl_tensorboard_and_resume_drops_later_records(tmp_path):
  w = MetricWriter(tmp_path)
  for step in range(1, 6):
    w.write(step, {"train/loss": 1.0 / step, "train/cells": 3})
  w.write(6, {"train/loss": float("nan")})
  w.close()
  records = read_metrics(tmp_path)
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  assert math.isclose(records[1]["train/loss"], 0.5) and records[-1]["train/loss"] == "nan"
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  # Resuming from a checkpoint at step 3: what the interrupted run wrote after it goes.
  w = MetricWriter(tmp_path, resume_step=3)
  w.write(4, {"train/loss": 0.2})
  w.close()
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
  assert read_metrics(tmp_path)[-1]["train/loss"] == 0.2


def test_a_rerun_of_a_finished_run_keeps_one_evaluation(tmp_path):
  for _ in range(2):  # the run, then the same command again (resumes at its last step)
    w = MetricWriter(tmp_path, tensorboard=False, resume_step=4 if _ else None)
    if not _:
      w.write(4, {"train/loss": 0.5})
    w.write(4, {"eval/recall": 0.9})
    w.close()
  assert read_metrics(tmp_path) == [{"step": 4, "train/loss": 0.5}, {"step": 4, "eval/recall": 0.9}]


def _read_events(path):
  """(Event protos, ok) of an event file, read with tensorboardX's own protocol buffers and CRC."""
  import struct

  from tensorboardX.crc32c import crc32c
  from tensorboardX.proto.event_pb2 import Event

  def masked(data):
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

  data, events, at = path.read_bytes(), [], 0
  while at < len(data):
    header = data[at:at + 8]
    (n,) = struct.unpack("<Q", header)
    assert struct.unpack("<I", data[at + 8:at + 12])[0] == masked(header)
    body = data[at + 12:at + 12 + n]
    assert struct.unpack("<I", data[at + 12 + n:at + 16 + n])[0] == masked(body)
    events.append(Event.FromString(body))
    at += 16 + n
  return events


def test_tensorboard_events_read_back_with_tensorboardx_protos(tmp_path):
  pytest.importorskip("tensorboardX")
  w = MetricWriter(tmp_path)
  w.write(7, {"train/loss": 0.25, "train/cells": 3, "train/bad": float("nan"), "note": "x"})
  w.write(2**40, {"train/loss": -1.5})
  w.close()
  w = MetricWriter(tmp_path, resume_step=5)
  w.close()
  first, second = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  events = _read_events(first)
  assert events[0].file_version == "brain.Event:2"
  assert [(e.step, [(v.tag, v.simple_value) for v in e.summary.value]) for e in events[1:]] == [
      (7, [("train/loss", 0.25), ("train/cells", 3.0)]), (2**40, [("train/loss", -1.5)])]
  assert events[1].wall_time > 1e9
  purge = _read_events(second)[1]
  assert purge.step == 6 and purge.session_log.status == purge.session_log.START
