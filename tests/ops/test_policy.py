"""The backend policy: what ``auto`` resolves to on each backend, resolved once and described in
one line."""

import jax.numpy as jnp
import pytest

from cellrep.errors import BadValue
from cellrep.ops import cpu
from cellrep.ops import policy as policy_lib
from cellrep.ops.policy import fast_bfloat16, resolve, resolve_conv_impl, resolve_predict_dtype


def test_auto_is_im2col_or_winograd_on_cpu_and_xla_elsewhere():
  assert resolve_conv_impl("auto", "cpu") == resolve_conv_impl("auto", "cpu", batch=32) == "im2col"
  assert resolve_conv_impl("auto", "cpu", batch=128) == "winograd"  # large batches train faster
  assert resolve_conv_impl("im2col", "cpu", batch=256) == "im2col"
  assert resolve_conv_impl("auto", "cpu", inference=True) == "winograd"
  for backend in ("gpu", "tpu"):
    assert resolve_conv_impl("auto", backend) == resolve_conv_impl("auto", backend, True) == "xla"
    assert resolve_conv_impl("auto", backend, batch=256) == "xla"
  assert resolve_conv_impl("xla", "cpu", inference=True) == "xla"
  # bfloat16: im2col on a CPU (Winograd's rounded transforms lose accuracy), XLA elsewhere.
  assert resolve_conv_impl("auto", "cpu", True, dtype=jnp.bfloat16) == "im2col"
  assert resolve_conv_impl("auto", "cpu", batch=256, dtype="bfloat16") == "im2col"
  assert resolve_conv_impl("auto", "gpu", True, dtype=jnp.bfloat16) == "xla"
  assert resolve_conv_impl("winograd", "cpu", True, dtype=jnp.bfloat16) == "winograd"
  with pytest.raises(ValueError, match="unknown conv"):
    resolve_conv_impl("fft")


def test_fast_bfloat16_by_backend_and_cpu_flags(monkeypatch):
  assert fast_bfloat16("gpu") and fast_bfloat16("tpu")
  monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
  assert not fast_bfloat16("cpu")
  monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
  assert fast_bfloat16("cpu")


def test_resolve_predict_dtype(monkeypatch):
  assert resolve_predict_dtype("auto", "float32", "gpu") == "bfloat16"
  monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx512f"}))
  assert resolve_predict_dtype("auto", jnp.float32, "cpu") == "float32"
  assert resolve_predict_dtype("auto", jnp.bfloat16, "cpu") == "bfloat16"  # the model's own
  monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
  assert resolve_predict_dtype("auto", jnp.float32, "cpu") == "bfloat16"
  assert resolve_predict_dtype("float32", jnp.float32, "cpu") == "float32"
  with pytest.raises(BadValue, match="unknown predict dtype"):
    resolve_predict_dtype("float16")


def test_cpu_policy(monkeypatch):
  monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2"}))
  monkeypatch.setattr(cpu, "host_memory_bytes", lambda: 10 * 2**30)
  p = resolve(platform_name="cpu", batch=64)
  assert (p.conv_impl, p.dtype, p.strategy, p.memory_budget) == ("im2col", "float32", "vmap",
                                                                   3 * 2**30)
  assert (p.predict_conv_impl, p.predict_dtype) == ("winograd", "float32")
  assert (p.predict_strategy, p.predict_map_batch) == ("map", policy_lib.CPU_PREDICT_MAP_BATCH)
  assert not p.donate_single_member
  assert resolve(platform_name="cpu", batch=128).conv_impl == "winograd"
  # Explicit choices are kept; an explicit vmap is never chunked.
  p = resolve(platform_name="cpu", strategy="vmap", predict_strategy="loop", conv_impl="xla")
  assert (p.strategy, p.memory_budget, p.predict_strategy) == ("vmap", None, "loop")
  assert p.conv_impl == p.predict_conv_impl == "xla"
  line = resolve(platform_name="cpu").describe()
  assert "\n" not in line and "im2col" in line and "winograd" in line and "cpu" in line


def test_accelerator_policy():
  p = resolve(platform_name="gpu", batch=128)
  assert (p.conv_impl, p.predict_conv_impl, p.predict_dtype) == ("xla", "xla", "bfloat16")
  assert (p.strategy, p.memory_budget, p.predict_strategy) == ("vmap", None, "vmap")
  assert p.donate_single_member and p.dtype == "float32"  # training keeps the model's dtype


def test_bad_requests_name_their_field():
  for kwargs, field in [({"strategy": "pmap"}, "strategy"), ({"conv_impl": "fft"}, "conv_impl"),
                        ({"dtype": "float16"}, "dtype"), ({"predict_dtype": "fp8"}, "predict_dtype")]:
    with pytest.raises(BadValue) as e:
      resolve(**kwargs)
    assert e.value.field == field


def test_models_take_the_policy_they_have_fields_for():
  from cellrep import models

  net = models.build({"name": "resnet18"}, num_classes=3, width=0.125)
  p = resolve(platform_name="cpu", batch=8, predict_dtype="bfloat16")
  assert p.train_model(net).conv_impl == "im2col"
  predicting = p.predict_model(net)
  assert predicting.conv_impl == "im2col" and predicting.dtype == jnp.bfloat16
  assert net.conv_impl == "auto"  # the model itself is untouched

  class NoFields:
    pass

  plain = NoFields()
  assert p.train_model(plain) is plain and p.predict_model(plain) is plain
