"""Audit suites: TOML files that list attacks, each swept over one strength axis.

```toml
[[attack]]
name = "pgd"            # a registered attack (torchattacks class name), case-insensitive
eps = [0.05, 0.1, 0.2]  # exactly one list-valued keyword: the strength axis
alpha = 0.01            # every other keyword goes to the attack's constructor
steps = 10
```

An optional ``id`` names an attack in results when one suite runs the same attack twice.

Thresholds turn an audit into a test (``advdetect check``)::

    [thresholds]
    detector = "confounding_gradient"   # whose AUROC is checked (default)
    min_auroc = 0.9                     # every attack x strength cell
    max_attack_success_rate = 0.5       # the model's robustness floor, every cell

and an ``[attack.thresholds]`` table after an ``[[attack]]`` overrides them for that attack.

Detector variants (ablations) run beside the registered detectors under a name of their own::

    [detector.cg_softmax]
    base = "confounding_gradient"   # a registered detector
    loss = "softmax_bce"            # any of its constructor arguments

An ``[adaptive]`` table adds the adaptive protocol (:mod:`advdetect.stages.adaptive`): every
detector attacked by an attacker who knows it, beside the oblivious PGD cell of the same budget::

    [adaptive]
    attack = "pgd"          # the suite's PGD (Linf) or PGDL2 attack it compares with; default the first
    eps = 0.1               # one of that attack's strengths; default its middle one
    steps = 100             # default 100; alpha defaults to 2.5 * eps / steps
    method = "selective"    # selective (default), orthogonal or combined (with lam)
    detectors = ["msp"]     # default every detector of the run
    max_inputs = 200        # attack at most this many test inputs (default all)
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from advdetect.attacks import get_attack
from advdetect.detectors import DETECTORS, DetectorVariant, check_params, get_detector
from advdetect.errors import UsageError
from advdetect.run.records import AttackCell

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Scalar = int | float | str | bool
TOP_LEVEL_KEYS = ("description", "thresholds", "attack", "detector", "adaptive")
#: The attacks an adaptive attack can be compared with: same algorithm, same budget.
ADAPTIVE_SOURCES = {"pgd": "Linf", "pgdl2": "L2"}
#: Selective first, the default: with Linf sign steps it evaded every detector tried at least as
#: often as the orthogonal projection (README, "Against an attacker who knows the detector").
ADAPTIVE_METHODS = ("selective", "orthogonal", "combined")
DEFAULT_THRESHOLD_DETECTOR = "confounding_gradient"


@dataclass(frozen=True)
class Thresholds:
    detector: str | None = None
    min_auroc: float | None = None
    max_attack_success_rate: float | None = None
    #: of the adaptive rows: the most attacked inputs that may get past classifier and detector
    max_undetected_success_rate: float | None = None

    def override(self, other: Thresholds) -> Thresholds:
        return Thresholds(*(o if o is not None else s for s, o in zip(
            (self.detector, self.min_auroc, self.max_attack_success_rate, self.max_undetected_success_rate),
            (other.detector, other.min_auroc, other.max_attack_success_rate, other.max_undetected_success_rate))))

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in (("detector", self.detector), ("min_auroc", self.min_auroc),
                                  ("max_attack_success_rate", self.max_attack_success_rate),
                                  ("max_undetected_success_rate", self.max_undetected_success_rate)) if v is not None}

    @property
    def empty(self) -> bool:
        return (self.min_auroc is None and self.max_attack_success_rate is None
                and self.max_undetected_success_rate is None)


def _parse_thresholds(table: object, where: str) -> Thresholds:
    if not isinstance(table, dict):
        raise UsageError(f"{where}: 'thresholds' must be a table")
    valid = ("detector", "min_auroc", "max_attack_success_rate", "max_undetected_success_rate")
    unknown = sorted(set(table) - set(valid))
    if unknown:
        raise UsageError(f"{where}: unknown threshold(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    detector = table.get("detector")
    if detector is not None and not isinstance(detector, str):
        raise UsageError(f"{where}: thresholds.detector must be a detector name")
    values = {}
    for key in valid[1:]:
        value = table.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 <= value <= 1):
            raise UsageError(f"{where}: thresholds.{key} must be a number in [0, 1]; got {value!r}")
        values[key] = None if value is None else float(value)
    return Thresholds(detector, **values)


@dataclass(frozen=True)
class AttackSpec:
    attack: str
    attack_name: str
    strength_name: str
    strengths: tuple[float, ...]
    params: dict[str, Scalar] = field(hash=False)
    thresholds: Thresholds = Thresholds()

    def cells(self) -> list[AttackCell]:
        return [AttackCell(self.attack, self.attack_name, self.strength_name, s, dict(self.params))
                for s in self.strengths]

    def to_dict(self) -> dict[str, Any]:
        doc = {"id": self.attack, "name": self.attack_name, self.strength_name: list(self.strengths), **self.params}
        if not self.thresholds.empty or self.thresholds.detector:
            return {**doc, "thresholds": self.thresholds.to_dict()}
        return doc


@dataclass(frozen=True)
class AdaptiveSpec:
    """The suite's ``[adaptive]`` table: Orthogonal PGD (or another ``method``) against each detector
    at the budget of one cell of the suite's PGD attack ``attack``, which it is compared with."""

    attack: str
    eps: float
    norm: str
    steps: int = 100
    alpha: float | None = None
    method: str = "selective"
    lam: float = 1.0
    detectors: tuple[str, ...] = ()
    max_inputs: int | None = None

    @property
    def step_size(self) -> float:
        return self.alpha if self.alpha is not None else 2.5 * self.eps / self.steps

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"attack": self.attack, "eps": self.eps, "norm": self.norm, "steps": self.steps,
                               "alpha": self.step_size, "method": self.method, "lam": self.lam,
                               "detectors": list(self.detectors)}
        return {**doc, "max_inputs": self.max_inputs} if self.max_inputs is not None else doc


def _parse_adaptive(table: object, specs: list[AttackSpec], where: str) -> AdaptiveSpec:
    if not isinstance(table, dict):
        raise UsageError(f"{where}: 'adaptive' must be a table")
    valid = ("attack", "eps", "norm", "steps", "alpha", "method", "lam", "detectors", "max_inputs")
    unknown = sorted(set(table) - set(valid))
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    sources = [spec for spec in specs if spec.attack_name in ADAPTIVE_SOURCES and spec.strength_name == "eps"]
    attack = table.get("attack", sources[0].attack if sources else None)
    source = next((spec for spec in sources if spec.attack == attack), None)
    if source is None:
        raise UsageError(f"{where}: the adaptive attack is compared with an oblivious PGD of the same budget: "
                         f"{'attack ' + repr(attack) + ' is not' if attack else 'add'} a pgd or pgdl2 attack of "
                         f"this suite with an eps axis")
    eps = table.get("eps", sorted(source.strengths)[len(source.strengths) // 2])
    if eps not in source.strengths:
        raise UsageError(f"{where}: eps {eps!r} is not one of attack {source.attack}'s strengths "
                         f"({', '.join(map(str, source.strengths))})")
    norm = ADAPTIVE_SOURCES[source.attack_name]
    if table.get("norm", norm) != norm:
        raise UsageError(f"{where}: norm {table['norm']!r} differs from attack {source.attack}'s ({norm})")

    def number(key: str, default: Any, *, whole: bool = False, low: float = 0.0) -> Any:
        value = table.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) \
                or not math.isfinite(value) or value <= low:
            raise UsageError(f"{where}: {key} must be {'a whole number' if whole else 'a finite number'} above "
                             f"{low:g}; got {value!r}")
        return value

    method = table.get("method", "selective")
    if method not in ADAPTIVE_METHODS:
        raise UsageError(f"{where}: method must be one of {', '.join(ADAPTIVE_METHODS)}; got {method!r}")
    detectors = table.get("detectors", [])
    if not isinstance(detectors, list) or not all(isinstance(d, str) for d in detectors):
        raise UsageError(f"{where}: detectors must be a list of detector names")
    return AdaptiveSpec(attack=source.attack, eps=float(eps), norm=norm, steps=number("steps", 100, whole=True),
                        alpha=number("alpha", None), method=method, lam=number("lam", 1.0),
                        detectors=tuple(detectors), max_inputs=number("max_inputs", None, whole=True))


@dataclass(frozen=True)
class Suite:
    name: str
    source: str
    description: str
    attacks: tuple[AttackSpec, ...]
    thresholds: Thresholds = Thresholds()
    detectors: tuple[DetectorVariant, ...] = ()
    adaptive: AdaptiveSpec | None = None

    def thresholds_for(self, attack: str) -> Thresholds:
        """Effective thresholds of one attack: the suite's, overridden by the attack's own."""
        spec = next(s for s in self.attacks if s.attack == attack)
        merged = self.thresholds.override(spec.thresholds)
        return merged if merged.detector else Thresholds(DEFAULT_THRESHOLD_DETECTOR, merged.min_auroc,
                                                          merged.max_attack_success_rate)

    def cells(self) -> list[AttackCell]:
        return [cell for spec in self.attacks for cell in spec.cells()]

    def select(self, attack_ids: list[str]) -> Suite:
        """Keep only the named attacks (by id), in the suite's order."""
        known = [spec.attack for spec in self.attacks]
        unknown = [a for a in attack_ids if a.lower() not in known]
        if unknown:
            raise UsageError(
                f"--attacks names {', '.join(unknown)}, not in suite {self.name!r}; its attacks: {', '.join(known)}"
            )
        wanted = {a.lower() for a in attack_ids}
        if self.adaptive and self.adaptive.attack not in wanted:
            raise UsageError(f"--attacks drops {self.adaptive.attack}, the attack suite {self.name!r}'s adaptive "
                             f"protocol is compared with; keep it")
        return Suite(self.name, self.source, self.description, tuple(s for s in self.attacks if s.attack in wanted),
                     self.thresholds, self.detectors, self.adaptive)

    def to_dict(self) -> dict[str, Any]:
        """The suite as a TOML-shaped document; :func:`suite_from_document` reads it back."""
        doc: dict[str, Any] = {"description": self.description, "attack": [spec.to_dict() for spec in self.attacks]}
        if self.thresholds != Thresholds():
            doc["thresholds"] = self.thresholds.to_dict()
        if self.detectors:
            doc["detector"] = {v.name: v.to_dict() for v in self.detectors}
        if self.adaptive:
            doc["adaptive"] = self.adaptive.to_dict()
        return doc


def builtin_suites() -> list[str]:
    folder = resources.files("advdetect.config") / "suites"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_suite(ref: str) -> Suite:
    """Load a suite from a file path, or by name from the suites that ship with advdetect."""
    try:
        ref.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"suite {ref!r} is not a valid UTF-8 file name; rename the file") from None
    path = Path(ref)
    if path.is_file():
        return parse_suite(_read(path), name=path.stem, source=str(path))
    builtin = resources.files("advdetect.config") / "suites" / f"{ref}.toml"
    if "/" not in ref and not ref.endswith(".toml") and builtin.is_file():
        return parse_suite(builtin.read_text(encoding="utf-8"), name=ref, source=f"builtin:{ref}")
    if path.exists():
        raise UsageError(f"suite {ref!r} is not a file; give a TOML suite file or one of: "
                         f"{', '.join(builtin_suites())}")
    raise UsageError(f"suite file {ref!r} not found; give a TOML suite path or one of: {', '.join(builtin_suites())}")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read suite {path}: {exc}") from None


def parse_suite(text: str, name: str, source: str) -> Suite:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{source}: malformed TOML: {exc}") from None
    return suite_from_document(doc, name, source)


def suite_from_document(doc: dict[str, Any], name: str, source: str) -> Suite:
    unknown = sorted(set(doc) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise UsageError(f"{source}: unknown top-level key(s) {', '.join(unknown)}; valid: {', '.join(TOP_LEVEL_KEYS)}")
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise UsageError(f"{source}: 'description' must be a string")
    tables = doc.get("attack")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise UsageError(f"{source}: no attacks; add at least one [[attack]] table "
                         "with a name and one list-valued strength")
    specs = [_parse_attack(table, f"{source}: attack #{i + 1}") for i, table in enumerate(tables)]
    ids = [s.attack for s in specs]
    duplicates = sorted({a for a in ids if ids.count(a) > 1})
    if duplicates:
        raise UsageError(f"{source}: attack {', '.join(duplicates)} appears twice; "
                         "give each an 'id' = \"...\" of its own")
    slugs: dict[str, str] = {}
    for cell in (cell for spec in specs for cell in spec.cells()):
        other = slugs.setdefault(cell.slug.lower(), cell.key)
        if other != cell.key:
            raise UsageError(f"{source}: cells {other} and {cell.key} would share the file name {cell.slug}; "
                             f"give one of the attacks another 'id'")
    thresholds = _parse_thresholds(doc.get("thresholds", {}), f"{source}: [thresholds]")
    variants = doc.get("detector", {})
    if not isinstance(variants, dict) or not all(isinstance(t, dict) for t in variants.values()):
        raise UsageError(f"{source}: detector variants are tables: [detector.NAME] with base = \"...\" and arguments")
    detectors = tuple(_parse_detector(n, t, f"{source}: [detector.{n}]") for n, t in variants.items())
    adaptive = _parse_adaptive(doc["adaptive"], specs, f"{source}: [adaptive]") if "adaptive" in doc else None
    if thresholds.max_undetected_success_rate is not None and adaptive is None or any(
            spec.thresholds.max_undetected_success_rate is not None for spec in specs):
        raise UsageError(f"{source}: max_undetected_success_rate thresholds the adaptive protocol: set it in "
                         f"[thresholds] and add an [adaptive] table")
    gated = thresholds.detector or DEFAULT_THRESHOLD_DETECTOR
    if thresholds.max_undetected_success_rate is not None and adaptive and adaptive.detectors \
            and gated not in adaptive.detectors:
        raise UsageError(f"{source}: max_undetected_success_rate checks {gated}, which [adaptive] detectors leaves out")
    return Suite(name=name, source=source, description=description, attacks=tuple(specs), thresholds=thresholds,
                 detectors=detectors, adaptive=adaptive)


def _parse_detector(name: str, table: dict[str, Any], where: str) -> DetectorVariant:
    if name in DETECTORS or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise UsageError(f"{where}: a variant needs a name of its own (letters, digits, '.', '_', '-'), "
                         f"not a registered detector's")
    table = dict(table)
    base = table.pop("base", None)
    if not isinstance(base, str):
        raise UsageError(f"{where}: missing 'base', the registered detector it varies (one of "
                         f"{', '.join(sorted(DETECTORS))})")
    valid = sorted(get_detector(base)().get_params())
    unknown = [k for k in table if k not in valid]
    if unknown:
        raise UsageError(f"{where}: unknown argument(s) {', '.join(unknown)} for {base}; valid: {', '.join(valid)}")
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
    try:
        check_params(get_detector(base), params)
        get_detector(base)(**params).validate()
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}") from None
    return DetectorVariant(name=name, base=base, params=params)


def _parse_attack(table: dict[str, Any], where: str) -> AttackSpec:
    table = dict(table)
    name = table.pop("name", None)
    if not isinstance(name, str):
        raise UsageError(f"{where}: missing 'name' (a torchattacks attack such as \"pgd\")")
    attack_id = table.pop("id", name)
    if not isinstance(attack_id, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", attack_id):
        raise UsageError(f"{where}: 'id' must be letters, digits, '.', '_' or '-'")
    entry = get_attack(name)
    where = f"{where} ({name})"
    thresholds = _parse_thresholds(table.pop("thresholds", {}), f"{where} thresholds")
    valid = entry.keywords
    unknown = [k for k in table if k not in valid]
    if unknown:
        raise UsageError(f"{where}: unknown keyword(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    axes = [k for k, v in table.items() if isinstance(v, list)]
    if len(axes) != 1:
        found = f"found {', '.join(axes)}" if axes else "found none"
        raise UsageError(f"{where}: give exactly one list-valued keyword as the strength axis ({found})")
    axis = axes[0]
    strengths = table.pop(axis)
    if not strengths or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                                for v in strengths):
        raise UsageError(f"{where}: strength axis {axis!r} must be a non-empty list of finite numbers >= 0; "
                         f"got {strengths!r}")
    if len(set(strengths)) != len(strengths):
        raise UsageError(f"{where}: strength axis {axis!r} repeats a value")
    for key, value in [*table.items(), *((axis, v) for v in strengths)]:
        if not isinstance(value, (int, float, str, bool)):
            raise UsageError(f"{where}: keyword {key!r} must be a number, string or boolean")
        try:
            entry.check_value(key, value)
        except ValueError as exc:
            raise UsageError(f"{where}: {exc}") from None
    return AttackSpec(attack=attack_id.lower(), attack_name=entry.name, strength_name=axis,
                      strengths=tuple(strengths), params=table, thresholds=thresholds)
