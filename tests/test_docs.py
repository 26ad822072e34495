"""The docs against the code, so they cannot drift.

- Every config file `configs/<job>.py` has `docs/configs/<job>.md`, whose key tables
  (`| key | default | meaning |`) name every key of the config and no other, with
  the config's defaults. A config is loaded as the CLI loads it (`get_config()` of the
  file); `classify.md` documents `cellrep.tasks.classify.default_config()`, the task
  behind configs that have no file of their own name.
- A doc in `EXTENDS` documents a config built on another: its own table lists the keys
  it adds and every key whose value differs from the base config's; the base doc's
  table covers the rest.
- README.md is a manual of at most `MAX_README_LINES` lines that shows `make demo` and
  `make test`; the benchmark tables live in docs/performance.md; every relative link
  of README.md and docs/ points to a file (and heading) that exists.

Key cells list full dotted keys in backticks, comma-separated; `prefix.*` stands for
every key under `prefix`. A row of several keys gives one default for all or one per
key, comma-separated outside backticks. Defaults: `true`/`false`, numbers, `""`,
backticked strings or tuples; `—`, `(required)` or `none` for a placeholder (None).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import math
import pathlib
import re

import pytest
from ml_collections import ConfigDict

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
CONFIG_DOCS = DOCS / "configs"
CONFIGS = REPO / "configs"
MAX_README_LINES = 220
BENCH_MARKERS = ("<!-- bench:begin -->", "<!-- bench:end -->")

# doc -> the doc of the config it is built on (it documents only what it adds or changes).
EXTENDS = {"demo": "classify", "cellsighter": "classify"}
# Docs of a task's default_config(), for tasks that no config file of the same name loads.
TASK_DOCS = {"classify": "cellrep.tasks.classify"}
PLACEHOLDERS = ("—", "-", "(required)", "none")


def config_names() -> list[str]:
  return sorted(p.stem for p in CONFIGS.glob("*.py") if not p.name.startswith("_"))


def doc_names() -> list[str]:
  return sorted(p.stem for p in CONFIG_DOCS.glob("*.md"))


def rel(path: pathlib.Path) -> str:
  return str(path.relative_to(REPO))


def load_config(name: str) -> tuple[dict, str]:
  """The flattened config a doc documents, and where it comes from."""
  path = CONFIGS / f"{name}.py"
  if path.exists():
    spec = importlib.util.spec_from_file_location(f"_docs_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return flatten(module.get_config()), f"{rel(path)} get_config()"
  if name in TASK_DOCS:
    task = importlib.import_module(TASK_DOCS[name])
    return flatten(task.default_config()), f"{TASK_DOCS[name]}.default_config()"
  raise AssertionError(f"{rel(CONFIG_DOCS / f'{name}.md')} documents no config: there is no "
                       f"configs/{name}.py and {name!r} is not in TASK_DOCS of tests/test_docs.py")


def flatten(config, prefix: str = "") -> dict:
  out = {}
  for key, value in config.items():
    if isinstance(value, (ConfigDict, dict)):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


# ---------------------------------------------------------------- parsing the key tables


@dataclasses.dataclass
class Row:
  where: str          # docs/configs/x.md:LINE
  key: str            # a dotted key, or `prefix.*`
  default: str | None


def cells(line: str) -> list[str]:
  """The cells of a table row; `\\|` is a literal bar."""
  inner = line.strip().removeprefix("|").removesuffix("|")
  return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def split_outside_code(text: str) -> list[str]:
  parts, current, in_code = [], "", False
  for ch in text:
    if ch == "`":
      in_code = not in_code
    if ch == "," and not in_code:
      parts.append(current.strip())
      current = ""
    else:
      current += ch
  parts.append(current.strip())
  return parts


def key_rows(path: pathlib.Path) -> list[Row]:
  """Every row of the tables whose header's first cell is `key`."""
  lines = path.read_text().splitlines()
  rows, i = [], 0
  while i < len(lines):
    is_header = (lines[i].lstrip().startswith("|") and i + 1 < len(lines)
                 and re.fullmatch(r"\s*\|[\s:|-]+\|\s*", lines[i + 1]))
    if not is_header:
      i += 1
      continue
    header = [c.lower() for c in cells(lines[i])]
    i += 2
    body_start = i
    while i < len(lines) and lines[i].lstrip().startswith("|"):
      i += 1
    if header[0] != "key":
      continue
    where = f"{rel(path)}:{body_start - 1}"
    assert "default" in header, f"{where}: a key table needs a `default` column, got {header}"
    column = header.index("default")
    for n in range(body_start, i):
      where = f"{rel(path)}:{n + 1}"
      row = cells(lines[n])
      keys = re.findall(r"`([^`]+)`", row[0])
      rest = re.sub(r"`[^`]+`", "", row[0])
      assert keys and not rest.strip(" ,"), (
          f"{where}: key cell {row[0]!r} should list full key names in backticks, comma-separated")
      default = row[column] if column < len(row) else ""
      if len(keys) == 1:
        defaults = [default]
      else:
        defaults = split_outside_code(default)
        if len(defaults) == 1:
          defaults = defaults * len(keys)
        assert len(defaults) == len(keys), (
            f"{where}: {len(keys)} keys but {len(defaults)} defaults in {default!r} "
            "(give one for all, or one per key)")
      rows += [Row(where, k, d) for k, d in zip(keys, defaults)]
  return rows


def matches(text: str, value) -> bool:
  """Whether a doc's default cell states `value`."""
  text = text.strip()
  code = re.fullmatch(r"`([^`]*)`", text)
  if code:
    text = code.group(1)
  if value is None:
    return text.lower() in PLACEHOLDERS
  if text == '""':
    text = ""
  if isinstance(value, bool):
    return text.lower() == str(value).lower()
  if isinstance(value, (int, float)):
    try:
      number = float(text)
    except ValueError:
      return False
    return math.isclose(number, value, rel_tol=1e-9, abs_tol=0.0)
  if isinstance(value, (tuple, list)):
    try:
      parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return False
    return isinstance(parsed, (tuple, list)) and tuple(parsed) == tuple(value)
  return text == str(value)


def documented_keys(name: str, config: dict, source: str) -> tuple[dict, list[str]]:
  """key -> Row for every key the doc's tables cover, and the errors found."""
  path = CONFIG_DOCS / f"{name}.md"
  rows = key_rows(path)
  errors = [] if rows else [f"{rel(path)}: no `| key | default | meaning |` table"]
  covered: dict[str, Row] = {}
  for row in rows:
    if row.key.endswith(".*"):
      prefix = row.key[:-1]
      keys = [k for k in config if k.startswith(prefix)]
      if not keys:
        errors.append(f"{row.where}: `{row.key}` matches no key of {source}")
    elif row.key not in config:
      errors.append(f"{row.where}: `{row.key}` is not a key of {source}")
      continue
    else:
      keys = [row.key]
      if not matches(row.default, config[row.key]):
        errors.append(f"{row.where}: `{row.key}` default is {row.default!r} in the doc, "
                      f"{config[row.key]!r} in {source}")
    for key in keys:
      if key in covered:
        errors.append(f"{row.where}: `{key}` is documented twice (also {covered[key].where})")
      covered[key] = row
  return covered, errors


# ---------------------------------------------------------------- the tests


def test_every_config_file_has_a_doc():
  missing = [f"configs/{n}.py has no docs/configs/{n}.md: write one with a "
             "`| key | default | meaning |` table of its keys (as docs/configs/predict.md)"
             for n in config_names() if not (CONFIG_DOCS / f"{n}.md").exists()]
  assert not missing, "\n".join(missing)


@pytest.mark.parametrize("name", doc_names())
def test_key_table_matches_config(name):
  config, source = load_config(name)
  covered, errors = documented_keys(name, config, source)
  doc = rel(CONFIG_DOCS / f"{name}.md")
  if name in EXTENDS:
    base = EXTENDS[name]
    base_config, base_source = load_config(base)
    base_covered, _ = documented_keys(base, base_config, base_source)  # checked on its own
    for key, value in config.items():
      if key in covered:
        continue
      if key not in base_config:
        errors.append(f"{doc}: `{key}` of {source} is documented neither here nor in "
                      f"docs/configs/{base}.md")
      elif value != base_config[key]:
        errors.append(f"{doc}: `{key}` is {value!r} in {source} but {base_config[key]!r} in "
                      f"{base_source}: list it in {doc}'s table with its value")
      elif key not in base_covered:
        errors.append(f"{doc}: `{key}` of {source} is not documented in docs/configs/{base}.md")
  else:
    errors += [f"{doc}: `{key}` of {source} (default {value!r}) is not documented"
               for key, value in config.items() if key not in covered]
  assert not errors, "\n".join(errors)


def test_readme_is_a_short_manual():
  text = README.read_text()
  lines = text.splitlines()
  assert len(lines) <= MAX_README_LINES, (
      f"README.md has {len(lines)} lines, at most {MAX_README_LINES}: move depth into docs/")
  for command in ("make demo", "make test"):
    assert command in text, f"README.md does not show `{command}`"
  unnamed = [f"configs/{n}.py" for n in config_names() if f"configs/{n}.py" not in text]
  assert not unnamed, f"README.md does not name {unnamed}"


def test_benchmark_tables_live_in_performance_doc():
  readme, performance = README.read_text(), (DOCS / "performance.md").read_text()
  for marker in BENCH_MARKERS:
    assert marker not in readme, (
        f"README.md still holds {marker} (the tables are in docs/performance.md)")
    assert performance.count(marker) == 1, (
        f"docs/performance.md holds {marker} {performance.count(marker)} times, not once")
  assert performance.index(BENCH_MARKERS[0]) < performance.index(BENCH_MARKERS[1]), (
      "docs/performance.md: bench:end comes before bench:begin")


def markdown_files() -> list[pathlib.Path]:
  return [README, *sorted(DOCS.rglob("*.md"))]


def without_code(text: str) -> str:
  text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
  return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: pathlib.Path) -> set[str]:
  """GitHub's heading anchors of a markdown file."""
  found, seen = set(), {}
  for line in re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M).splitlines():
    heading = re.match(r"#{1,6}\s+(.*)", line)
    if not heading:
      continue
    slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
    n = seen.get(slug, 0)
    seen[slug] = n + 1
    found.add(slug if n == 0 else f"{slug}-{n}")
  return found


def test_relative_links_resolve():
  broken = []
  for path in markdown_files():
    text = without_code(path.read_text())
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
      if re.match(r"[a-z][a-z0-9+.-]*:", target):
        continue  # http:, https:, mailto:
      file_part, _, anchor = target.partition("#")
      dest = (path.parent / file_part).resolve() if file_part else path
      if not dest.exists():
        broken.append(f"{rel(path)}: link ({target}) points to a missing {file_part}")
      elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        broken.append(f"{rel(path)}: link ({target}): {rel(dest)} has no heading #{anchor}")
  assert not broken, "\n".join(broken)
