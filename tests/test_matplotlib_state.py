"""Importing advdetect never changes the user's matplotlib state (a notebook's inline backend
stays), and neither does drawing a report figure."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import advdetect

SCRIPT = """
import importlib, json, sys
import matplotlib
backend, params = matplotlib.get_backend(), dict(matplotlib.rcParams)
import advdetect
for name in sys.argv[1:]:
    importlib.import_module(name)
imported = (matplotlib.get_backend(), dict(matplotlib.rcParams) == params)
from advdetect.report.figures import render
png = render((1.0, 1.0), lambda fig: fig.subplots().set_title("$ not math $"))
print(json.dumps({"before": backend, "imported": imported, "drawn": [matplotlib.get_backend(),
                  dict(matplotlib.rcParams) == params], "pyplot": "matplotlib.pyplot" in sys.modules, "png": len(png)}))
"""


def modules_importing_matplotlib() -> list[str]:
    root = Path(advdetect.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if re.search(r"^\s*(import|from) matplotlib\b", path.read_text(encoding="utf-8"), re.MULTILINE):
            found.append(".".join(("advdetect", *path.relative_to(root).with_suffix("").parts)))
    return found


@pytest.mark.slow
def test_importing_and_drawing_leave_the_matplotlib_backend_and_rcparams_alone():
    modules = modules_importing_matplotlib()
    assert "advdetect.report.figures" in modules
    out = subprocess.run([sys.executable, "-c", SCRIPT, *modules], capture_output=True, text=True, check=True,
                         env={**os.environ, "MPLBACKEND": "svg"}).stdout  # a backend no notebook would set by chance
    state = json.loads(out.strip().splitlines()[-1])
    assert state["before"] == "svg"
    assert state["imported"] == ["svg", True]
    assert state["drawn"] == ["svg", True]
    assert not state["pyplot"] and state["png"] > 100
