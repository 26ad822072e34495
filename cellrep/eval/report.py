"""A static HTML report: headings, paragraphs, tables and matplotlib figures as PNGs.

Every task writes its report the same way::

  report = Report(workdir / "report", title="Classification")
  report.heading("Per-class metrics")
  report.table(df)
  report.figure(fig, "confusion")   # saved as confusion.png, closed
  report.write()                    # index.html, written atomically

Figures are saved when added; ``write`` renames a temporary file into
``index.html`` so a reader never sees half a page.
"""

from __future__ import annotations

import html
import os
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from cellrep import distributed  # noqa: E402
from cellrep.files import temporary, write_text  # noqa: E402

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; }
img { max-width: 100%; margin: 0.5em 0; }
.kv td:first-child { text-align: left; font-weight: 600; }
"""


def save_figure(fig, path: pathlib.Path, dpi: int = 110) -> None:
  """Saves `fig` to `path` (atomically) and closes it."""
  if not distributed.is_writer():
    plt.close(fig)
    return
  tmp = temporary(path)
  fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
  plt.close(fig)
  os.replace(tmp, path)


class Report:

  def __init__(self, directory, title: str):
    self.dir = pathlib.Path(directory)  # made by the first figure or `write`: no empty report
    self.title = title
    self._parts: list[str] = []

  def heading(self, text: str, level: int = 2) -> None:
    self._parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

  def paragraph(self, text: str) -> None:
    self._parts.append(f"<p>{html.escape(text)}</p>")

  def key_values(self, items: dict) -> None:
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
                   for k, v in items.items())
    self._parts.append(f'<table class="kv">{rows}</table>')

  def table(self, df: pd.DataFrame, float_format: str = "{:.3f}") -> None:
    self._parts.append(df.to_html(float_format=float_format.format, border=0, na_rep=""))

  def figure(self, fig, name: str, caption: str | None = None) -> None:
    file = f"{name}.png"
    if distributed.is_writer():
      self.dir.mkdir(parents=True, exist_ok=True)
    save_figure(fig, self.dir / file)
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    self._parts.append(f'<figure><img src="{file}" alt="{html.escape(name)}">{cap}</figure>')

  def write(self) -> pathlib.Path:
    body = "\n".join(self._parts)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}"
            f"</title><style>{_STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>\n"
            f"{body}\n</body></html>\n")
    out = self.dir / "index.html"
    if distributed.is_writer():
      self.dir.mkdir(parents=True, exist_ok=True)
    write_text(out, page)
    return out


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)
