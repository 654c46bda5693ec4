"""The shape of the code: the report stage runs without torch, and the README's Python example
runs as written on the embedded default, in memory."""

import json
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_report_stage_imports_no_torch():
    code = "import advdetect.report.document, sys; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_readme_python_example_runs_on_an_in_memory_model(tmp_path, monkeypatch, capsys):
    example = re.search(r"## Python API.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"clean accuracy 0\.9\d\d; verdict: None", out)
    assert re.search(r"fgsm eps=0.2: confounding_gradient AUROC 0\.\d{3}", out)
    results = json.loads((tmp_path / "reports" / "python-api" / "results.json").read_text())
    assert results["model"]["spec"] == "in-memory:advdetect.sources.embedded.SmallCNN" and results["data"]["spec"] == "tensors"
    assert results["data"]["n"] == 200 and {r["detector"] for r in results["results"]} == {"confounding_gradient", "msp"}
