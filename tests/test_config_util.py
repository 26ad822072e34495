"""Config helpers: one comma-list parser, library errors mapped to the config keys that set them."""

import pytest

from cellrep import config_util
from cellrep.errors import BadValue, ConfigError


def test_comma_list():
  assert config_util.comma_list(" a, b,,c ") == ["a", "b", "c"]
  assert config_util.comma_list("") == [] and config_util.comma_list(None) == []
  assert config_util.comma_list("-1, 0,2", float) == [-1.0, 0.0, 2.0]
  with pytest.raises(BadValue, match="sizes: '1,x'") as e:
    config_util.comma_list("1,x", int, field="sizes")
  assert e.value.field == "sizes" and isinstance(e.value, ValueError)


def test_config_keys_maps_fields_to_keys():
  with pytest.raises(ConfigError, match=r"^config\.augment\.blur_ksize: is 2 \(expected odd\)$"):
    with config_util.config_keys("augment"):
      raise BadValue("blur_ksize", "is 2", "odd")
  with pytest.raises(ConfigError, match=r"^config\.simulate\.lambda_b: none"):
    with config_util.config_keys("simulate", **{"lambda": "simulate.lambda_b"}):
      raise BadValue("lambda", "none")
  with pytest.raises(ConfigError, match=r"^config\.confidence\.thresholds: x"):
    with config_util.config_keys():
      raise BadValue("confidence.thresholds", "x")
  with pytest.raises(KeyError):  # other errors pass through
    with config_util.config_keys("augment"):
      raise KeyError("k")
