"""``report.html``: the report's view (see :func:`advdetect.report.document.report_view`) through a
Jinja2 template with autoescape, self-contained (its figures inline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from advdetect.run.storage import write_bytes


def write_html(path: Path, view: dict[str, Any]) -> None:
    env = Environment(loader=PackageLoader("advdetect.report", "templates"),
                      autoescape=select_autoescape(["html", "j2"]))
    write_bytes(path, env.get_template("report.html.j2").render(**view).encode())
