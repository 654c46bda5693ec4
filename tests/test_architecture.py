"""The shape of the code: the report stage runs without torch, and the README's Python example
runs as written on the embedded default, in memory (docs/api.md shows the same example)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
API_DOCS = README.parent / "docs" / "api.md"


@pytest.mark.slow
def test_the_report_stage_imports_no_torch():
    code = ("import advdetect.report.document, sys; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    subprocess.run([sys.executable, "-c", code], check=True)


def python_example(path: Path, heading: str) -> str:
    return re.search(rf"^{heading}\n.*?```python\n(.*?)```", path.read_text(), re.S | re.M).group(1)


def test_the_docs_python_example_is_the_readmes():
    assert python_example(API_DOCS, "# Python API") == python_example(README, "## Python quick start")


@pytest.mark.slow
def test_the_readme_python_example_runs_on_an_in_memory_model(tmp_path, monkeypatch, capsys):
    example = python_example(README, "## Python quick start")
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"clean accuracy 0\.9\d\d; verdict: None", out)
    assert re.search(r"fgsm eps=0.2: confounding_gradient AUROC 0\.\d{3}", out)
    results = json.loads((tmp_path / "reports" / "python-api" / "results.json").read_text())
    assert results["model"]["spec"] == "in-memory:advdetect.sources.embedded.SmallCNN"
    assert results["data"]["spec"] == "tensors" and results["data"]["n"] == 200
    assert {r["detector"] for r in results["results"]} == {"confounding_gradient", "msp"}
