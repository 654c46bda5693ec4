import re

import pytest

from advdetect.errors import UsageError
from advdetect.config.suite import Thresholds, builtin_suites, load_suite, parse_suite, suite_from_document

PGD = """
[[attack]]
name = "PGD"
eps = [0.05, 0.1]
alpha = 0.01
steps = 5
"""


def parse(text: str):
    return parse_suite(text, name="t", source="t.toml")


def test_parses_attack_into_cells_with_one_strength_axis():
    suite = parse(PGD)
    (spec,) = suite.attacks
    assert (spec.attack, spec.attack_name, spec.strength_name, spec.strengths) == ("pgd", "pgd", "eps", (0.05, 0.1))
    assert spec.params == {"alpha": 0.01, "steps": 5}
    cells = suite.cells()
    assert [c.key for c in cells] == ["pgd[eps=0.05]", "pgd[eps=0.1]"]
    assert cells[1].constructor_params() == {"alpha": 0.01, "steps": 5, "eps": 0.1}
    assert cells[0].slug == "pgd_eps-0.05"


def test_builtin_suites_ship_with_the_package_and_are_valid():
    assert {"default", "standard"} <= set(builtin_suites())
    for name in ("default", "standard"):
        suite = load_suite(name)
        assert {s.attack_name for s in suite.attacks} == {"fgsm", "bim", "pgd", "cw", "deepfool"}
        assert all(len(s.strengths) >= 3 for s in suite.attacks if s.attack != "cw_confident")
    confident = next(s for s in load_suite("standard").attacks if s.attack == "cw_confident")
    assert (confident.attack_name, confident.strength_name, confident.strengths) == ("cw", "kappa", (5.0, 20.0))


def test_suite_round_trips_through_its_document():
    suite = parse(PGD + '\n[[attack]]\nname = "fgsm"\nid = "fgsm-small"\neps = [0.01, 0.02]\n')
    again = suite_from_document(suite.to_dict(), "t", "t.toml")
    assert again == suite


def test_select_keeps_named_attacks_and_rejects_others():
    suite = load_suite("default")
    assert [s.attack for s in suite.select(["PGD", "fgsm"]).attacks] == ["fgsm", "pgd"]
    with pytest.raises(UsageError, match="nope.*its attacks: fgsm, bim, pgd, cw, deepfool"):
        suite.select(["nope"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[attack]]\nname = "pgdd"\neps = [0.1]', r"unknown attack 'pgdd'; valid attacks: .*\bpgd\b"),
        ('[[attack]]\nname = "pgd"\neps = [0.1]\nepsilon = 3',
         r"unknown keyword\(s\) epsilon; valid: eps, alpha, steps, random_start"),
        ('[[attack]]\nname = "pgd"\neps = 0.1', r"exactly one list-valued keyword .*found none"),
        ('[[attack]]\nname = "pgd"\neps = [0.1]\nsteps = [1, 2]',
         r"exactly one list-valued keyword .*found eps, steps"),
        ('[[attack]]\nname = "pgd"\neps = []', r"non-empty list of finite numbers"),
        ('[[attack]]\nname = "pgd"\neps = ["a"]', r"non-empty list of finite numbers"),
        ('[[attack]]\nname = "pgd"\neps = [0.1, 0.1]', r"repeats a value"),
        ('[[attack]]\neps = [0.1]', r"missing 'name'"),
        ('[[attack]]\nname = "pgd"\neps = [0.1]\n[[attack]]\nname = "pgd"\neps = [0.2]',
         r"appears twice; give each an 'id'"),
        ("description = 'x'", r"no attacks"),
        ("attacks = 3", r"unknown top-level key\(s\) attacks"),
        ("[[attack]\nname = 'pgd'", r"t.toml: malformed TOML: .*line 1"),
    ],
)
def test_invalid_suites_are_one_clear_error(text, message):
    with pytest.raises(UsageError, match=message) as info:
        parse(text)
    assert "\n" not in str(info.value)


def test_missing_suite_file_names_the_builtin_suites(tmp_path):
    with pytest.raises(UsageError,
                       match=r"suite file '.*missing.toml' not found; .* autoattack, default, nightly, standard"):
        load_suite(str(tmp_path / "missing.toml"))


THRESHOLDS = """
[thresholds]
min_auroc = 0.9
max_attack_success_rate = 0.5

[[attack]]
name = "fgsm"
eps = [0.1]

[[attack]]
name = "pgd"
eps = [0.1]
[attack.thresholds]
min_auroc = 0.8
detector = "msp"
"""


def test_thresholds_apply_suite_wide_with_per_attack_overrides():
    suite = parse(THRESHOLDS)
    assert suite.thresholds_for("fgsm") == Thresholds("confounding_gradient", 0.9, 0.5)
    assert suite.thresholds_for("pgd") == Thresholds("msp", 0.8, 0.5)
    assert suite_from_document(suite.to_dict(), "t", "t.toml") == suite
    assert parse(PGD).thresholds.empty


@pytest.mark.parametrize(("text", "message"), [
    ("[thresholds]\nmin_aurocc = 0.9\n" + PGD, r"unknown threshold\(s\) min_aurocc; valid: detector, min_auroc"),
    ("[thresholds]\nmin_auroc = 1.5\n" + PGD, r"thresholds.min_auroc must be a number in \[0, 1\]; got 1.5"),
    (PGD + "[attack.thresholds]\nmax_attack_success_rate = 'x'\n",
     r"attack #1 \(PGD\) thresholds: .*max_attack_success_rate"),
])
def test_invalid_thresholds(text, message):
    with pytest.raises(UsageError, match=message):
        parse(text)


def test_detector_variants_parse_and_round_trip():
    text = PGD + '[detector.cg_softmax]\nbase = "confounding_gradient"\nloss = "softmax_bce"\nlayers = ["head.*"]\n'
    suite = parse_suite(text, "s", "s.toml")
    (variant,) = suite.detectors
    assert (variant.name, variant.base, variant.params) == ("cg_softmax", "confounding_gradient",
                                                            {"loss": "softmax_bce", "layers": ("head.*",)})
    assert suite_from_document(suite.to_dict(), "s", "s.toml") == suite


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ('[detector.msp]\nbase = "msp"\n', "a name of its own"),
        ('[detector.x]\nloss = "softmax_bce"\n', "missing 'base'"),
        ('[detector.x]\nbase = "nope"\n', "unknown detector 'nope'"),
        ('[detector.x]\nbase = "confounding_gradient"\nlos = "softmax_bce"\n',
         "unknown argument(s) los for confounding_gradient"),
        ('[detector.x]\nbase = "confounding_gradient"\nlabel = "zeros"\n', "unknown label 'zeros'"),
    ],
)
def test_invalid_detector_variants(variant, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        parse_suite(PGD + variant, "s", "s.toml")


def test_cell_keys_and_file_names_are_lossless():
    suite = parse_suite('[[attack]]\nname = "fgsm"\neps = [0.3, 0.30000001, 1e+20, 1e-20, 0.1]\n', "s", "s")
    keys, slugs = [c.key for c in suite.cells()], [c.slug for c in suite.cells()]
    assert keys == ["fgsm[eps=0.3]", "fgsm[eps=0.30000001]", "fgsm[eps=1e+20]", "fgsm[eps=1e-20]", "fgsm[eps=0.1]"]
    assert len(set(slugs)) == len(slugs) == 5
