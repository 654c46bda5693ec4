"""results.json and run.json: declared once (advdetect.run.records), validated when read back by
pydantic from those declarations, and described by JSON Schemas generated from them that ship
with the package and hold for what an audit writes."""

import copy
import json
import math
from dataclasses import fields

import pytest

from advdetect.cli.commands import main
from advdetect.run.records import AttackRecord, ResultRow, Results, RunInfo, validator
from advdetect.run.schemas import FOLDER, SCHEMAS, generate, stale

SUITE = """
[thresholds]
detector = "msp"
min_auroc = 0.5
max_attack_success_rate = 0.95

[[attack]]
name = "fgsm"
eps = [0.1, 0.3]
"""

ROW = {"attack": "fgsm", "strength_name": "eps", "strength": 0.1, "detector": "msp", "protocol": "seen",
       "n_clean": 10, "n_adv": 8, "n_fit": 4, "attack_success_rate": 0.5, "auroc": 0.75}


def test_the_shipped_schemas_are_the_ones_the_records_generate():
    assert set(SCHEMAS) == {"results.schema.json", "run.schema.json"}
    for name, record in SCHEMAS.items():
        assert json.loads((FOLDER / name).read_text()) == generate(record), "run python -m advdetect.run.schemas"
    assert stale() == []
    shipped = json.loads((FOLDER / "results.schema.json").read_text())
    assert shipped["required"] == [f.name for f in fields(Results)]  # every field of results.json, none optional
    assert shipped["$defs"]["ResultRow"]["properties"]["auroc"]["anyOf"] == [{"type": "number"}, {"type": "null"}]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"strength": "0.1"}, "the field 'strength' is '0.1', not float"),
        ({"n_clean": True}, "the field 'n_clean' is True, not int"),
        ({"n_fit": 4.0}, "the field 'n_fit' is 4.0, not int"),
        ({"auroc": math.nan}, "the field 'auroc' is nan, not float | None"),
        ({"detector_params": []}, "the field 'detector_params' is [], not dict[str, Any]"),
        ({"protocol": None}, "the field 'protocol' is None, not str"),
    ],
)
def test_a_record_read_back_names_its_first_bad_field_in_one_line(change, message):
    with pytest.raises(ValueError) as error:
        ResultRow.from_dict({**ROW, **change})
    assert str(error.value) == message
    with pytest.raises(ValueError, match="^the field 'detector' is missing$"):
        ResultRow.from_dict({k: v for k, v in ROW.items() if k != "detector"})
    with pytest.raises(ValueError, match="^expected a JSON object, found list$"):
        ResultRow.from_dict([ROW])


def test_a_record_keeps_its_values_as_read_and_ignores_keys_of_newer_versions():
    row = ResultRow.from_dict({**ROW, "strength": 1, "written_by_a_newer_version": [1, 2]})
    assert row.strength == 1 and isinstance(row.strength, int)  # results.json writes it back as it was
    assert row.reason is None and row.detector_params == {}
    with pytest.raises(ValueError, match="lies outside its interval"):  # the record's own check still runs
        ResultRow.from_dict({**ROW, "auroc_ci_low": 0.8, "auroc_ci_high": 0.9})


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    root = tmp_path_factory.mktemp("schemas")
    (root / "tiny.toml").write_text(SUITE)
    assert main(["-q", "audit", str(root / "tiny.toml"), "--n", "60", "--detectors", "msp",
                 "--out", str(root / "run")]) == 0
    return root / "run"


def _validate(name, document):
    """``document`` checked against the shipped schema (with jsonschema where it is installed, else
    by the records' own validator, which the first test holds equal to the schema)."""
    try:
        import jsonschema
    except ImportError:
        validator(SCHEMAS[name]).validate_python(document)
        return
    jsonschema.Draft202012Validator(json.loads((FOLDER / name).read_text())).validate(document)


@pytest.mark.slow
def test_an_audits_results_and_run_json_hold_to_their_schemas(audited):
    results = json.loads((audited / "results.json").read_text())
    assert list(results) == [f.name for f in fields(Results)]  # the declaration is the document
    assert results["verdict"]["checks"] and results["gradient_masking"] is not None  # every part is exercised
    _validate("results.schema.json", results)
    _validate("run.schema.json", json.loads((audited / "run.json").read_text()))
    for record in results["attacks"]:
        AttackRecord.from_dict(record)
    RunInfo.from_dict(json.loads((audited / "run.json").read_text()))

    damaged = copy.deepcopy(results)
    damaged["attacks"][0]["strength"] = "0.1"
    with pytest.raises(Exception, match="0.1"):
        _validate("results.schema.json", damaged)
    damaged = copy.deepcopy(results)
    damaged["verdict"]["checks"][0]["status"] = "PASS"
    with pytest.raises(Exception, match="PASS"):
        _validate("results.schema.json", damaged)
