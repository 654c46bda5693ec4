"""Command line: ``advdetect audit``, and the stages rerun alone (``detect``, ``report``)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import datetime
from pathlib import Path

from advdetect.errors import UsageError
from advdetect.models import Dataset, ThreatModel

log = logging.getLogger("advdetect")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_audit_arguments(parser: argparse.ArgumentParser, *, suite: bool = True) -> None:
    """What to audit and how: shared by ``audit``, ``check`` and ``ood``."""
    if suite:
        parser.add_argument("suite", nargs="?", default="default",
                            help="a suite TOML file, or the name of a built-in suite (default: %(default)s)")
    parser.add_argument("--model", default="default",
                        help="default, robustbench:NAME, file.py:Callable, package.module:Callable or a TorchScript "
                             "file.pt (default: the embedded MNIST CNN)")
    parser.add_argument("--weights", help="state_dict for a file.py:Callable or package.module:Callable model")
    parser.add_argument("--dataset", choices=[d.value for d in Dataset], default="cifar10",
                        help="robustbench:NAME's dataset (default: %(default)s)")
    parser.add_argument("--threat-model", choices=[t.value for t in ThreatModel], default="Linf",
                        help="robustbench:NAME's threat model (default: %(default)s)")
    parser.add_argument("--model-dir", default="./models",
                        help="robustbench checkpoints, as <dir>/<dataset>/<threat_model>/<NAME>.pt (default: %(default)s)")
    parser.add_argument("--mean", type=_floats, help="comma-separated per-channel mean the model expects inputs normalized by")
    parser.add_argument("--std", type=_floats, help="comma-separated per-channel std, with --mean")
    parser.add_argument("--data", default="default",
                        help="default, folder:DIR, cifar10:ROOT, cifar100:ROOT, mnist:ROOT, svhn:ROOT or npz:FILE "
                             "(default: the embedded MNIST test split)")
    parser.add_argument("--image-size", type=_positive_int, help="resize images to this square size")
    parser.add_argument("--n", type=_positive_int, default=256,
                        help="inputs to audit, a seeded class-stratified sample (default: %(default)s)")
    if suite:
        parser.add_argument("--attacks", help="comma-separated attack ids: run only these attacks of the suite")
    parser.add_argument("--detectors",
                        help="comma-separated detector names, registered or the suite's [detector.NAME] variants "
                             "(default: all registered, then the suite's variants)")
    parser.add_argument("--n-reference", type=_positive_int, default=256,
                        help="clean reference inputs, drawn from the data beside the audited ones, that detectors "
                             "fit class statistics and one-class models on (default: %(default)s)")
    parser.add_argument("--noisy-negatives", action="store_true",
                        help="control: add Gaussian-noise copies of the clean inputs, as far in L2 as their "
                             "adversarial examples, to the negatives")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling, attacks and splits (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--batch-size", type=_positive_int, default=128, help="batch size for attacks and features")
    parser.add_argument("--fit-fraction", type=float, default=0.2,
                        help="share of the correctly classified inputs whose (clean, adversarial) pairs calibrate the detectors; the rest test them (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="run folder to create (default: reports/<timestamp>)")
    parser.add_argument("--cache-dir", type=Path,
                        help="where adversarial inputs are cached between runs (default: <user cache>/advdetect/attacks)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the attack cache")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="advdetect", description="Adversarial-robustness audits: attack, detect, report.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the summary")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    audit = commands.add_parser("audit", help="attack, detect and report in one run",
                                description="Run an audit suite against a model and data; write results.json, report.html "
                                            "and report.pdf into a new run folder.")
    add_audit_arguments(audit)
    audit.set_defaults(func=cmd_audit)

    check = commands.add_parser("check", help="run an audit and check the suite's thresholds, pytest-style",
                                description="Run the audit (reusing cached attack work) and check the suite's "
                                            "[thresholds]: exit 0 when every check passes, 1 when any fails, 2 on "
                                            "a usage or input error.")
    add_audit_arguments(check)
    check.add_argument("--junitxml", type=Path, help="also write the checks as JUnit XML, for CI systems")
    check.set_defaults(func=cmd_check)

    ood = commands.add_parser("ood", help="out-of-distribution detection: clean inputs against OOD sets",
                              description="Score the audited clean inputs against out-of-distribution sets with the "
                                          "same detectors, protocols, metrics and report as an audit; each set takes "
                                          "the place of an attack cell.")
    add_audit_arguments(ood, suite=False)
    ood.add_argument("--sets", default="uniform,corrupted,photos,digits",
                     help="comma-separated OOD sets: uniform, corrupted, photos, digits, or data specs such as "
                          "npz:FILE (default: %(default)s)")
    ood.set_defaults(func=cmd_ood)

    history = commands.add_parser("history", help="list the audit runs under an output root")
    history.add_argument("root", type=Path, nargs="?", default=Path("reports"), help="output root (default: %(default)s)")
    history.set_defaults(func=cmd_history)

    compare = commands.add_parser("compare", help="the differences between two runs, regressions flagged",
                                  description="Compare two runs' results cell by cell; exit 1 when RUN_B regresses "
                                              "on RUN_A beyond the 95% intervals.")
    compare.add_argument("run_a", type=Path)
    compare.add_argument("run_b", type=Path)
    compare.set_defaults(func=cmd_compare)

    detect = commands.add_parser("detect", help="rerun detection and the report on an audit's run folder")
    detect.add_argument("run_dir", type=Path)
    detect.set_defaults(func=cmd_detect)

    bench = commands.add_parser("bench", help="time the gradient features against the per-sample loop and vmap",
                                description="Time, in one run, the per-sample loop, torch.func vmap, the batched "
                                            "features and one batched forward+backward pass, as ratios.")
    bench.add_argument("--models", default="default,resnet18", help="comma-separated: default, resnet18 (default: %(default)s)")
    bench.add_argument("--batch", type=_positive_int, default=64, help="inputs per measurement (default: %(default)s)")
    bench.add_argument("--repeats", type=_positive_int, default=3, help="timed runs per method, median kept (default: %(default)s)")
    bench.add_argument("--methods", default="loop,vmap,batched,forward_backward", help="comma-separated subset (default: all)")
    bench.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    bench.add_argument("--memory", action="store_true", help="also measure peak memory over 1000 inputs per chunk size")
    bench.add_argument("--json", action="store_true", help="print JSON for machines")
    bench.set_defaults(func=cmd_bench)

    report = commands.add_parser("report", help="rewrite results.json, report.html and report.pdf of a run folder")
    report.add_argument("run_dir", type=Path)
    report.set_defaults(func=cmd_report)
    return parser


def _new_run_dir(out: Path | None) -> Path:
    if out is not None:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UsageError(f"output folder {out} already exists and is not empty; choose another --out")
        return out
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, counter = Path("reports") / stamp, 2
    while candidate.exists():
        candidate, counter = Path("reports") / f"{stamp}-{counter}", counter + 1
    return candidate


def audit_options(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from advdetect.audit import AuditOptions
    from advdetect.cache import default_cache_dir
    from advdetect.models import ModelOptions
    from advdetect.suite import Suite, load_suite

    suite = load_suite(args.suite) if hasattr(args, "suite") else Suite("ood", "advdetect ood", "", ())
    if getattr(args, "attacks", None):
        suite = suite.select([a.strip() for a in args.attacks.split(",") if a.strip()])
    model_options = ModelOptions(weights=args.weights, dataset=Dataset(args.dataset),
                                 threat_model=ThreatModel(args.threat_model), model_dir=args.model_dir,
                                 mean=args.mean, std=args.std)
    return AuditOptions(suite=suite, model=args.model, model_options=model_options, data=args.data, n=args.n,
                        image_size=args.image_size, seed=args.seed, device=args.device, batch_size=args.batch_size,
                        fit_fraction=args.fit_fraction,
                        detectors=tuple(d.strip() for d in args.detectors.split(",") if d.strip()) if args.detectors else None,
                        n_reference=args.n_reference, noisy_negatives=args.noisy_negatives,
                        cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir()))


def run_audit(options, out: Path | None, ood_specs: list[str] | None = None) -> tuple[Path, dict]:  # type: ignore[no-untyped-def]
    """Every stage of an audit into a new run folder; raises KeyboardInterrupt after saying where it stopped.
    With ``ood_specs``, out-of-distribution sets take the place of the suite's attack cells."""
    from advdetect.audit import POSITION, attack_stage, prepare, start_run, update_run
    from advdetect.detection import detect_stage
    from advdetect.history import now, write_manifest
    from advdetect.ood import ood_inputs, ood_stage, set_name
    from advdetect.report import write_report

    run_dir = _new_run_dir(out)
    loaded, sample, device = prepare(options)
    for spec in ood_specs or ():  # fail on a bad set before any output
        ood_inputs(spec, sample.x[:2], options.seed)
    cells = options.suite.cells()
    log.info("auditing %s on %s (%d inputs) with %s, device %s", options.model, options.data, len(sample.y),
             f"{len(ood_specs)} out-of-distribution sets" if ood_specs else
             f"suite {options.suite.name}: {len(cells)} attack cells", device)
    POSITION.stage, POSITION.cell = "load", None
    try:
        info = start_run(run_dir, options, loaded, sample, device)
        log.info("clean accuracy %.3f; run folder %s", info.clean_accuracy, run_dir)
        if ood_specs:
            update_run(run_dir, suite={"name": "ood", "source": "advdetect ood", "specs": ood_specs,
                                       "ood_sets": [set_name(s) for s in ood_specs],
                                       "document": {"description": "out-of-distribution sets", "attack": []}})
            POSITION.stage = "ood"
            records = ood_stage(run_dir, ood_specs, options.seed)
        else:
            POSITION.stage = "attack"
            records = attack_stage(run_dir, loaded.module, cells)
        POSITION.stage, POSITION.cell = "detect", None
        detect_stage(run_dir, loaded.module, records)
        POSITION.stage, POSITION.cell = "report", None
        document = write_report(run_dir)
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        if (run_dir / "run.json").is_file():
            write_manifest(run_dir, status="interrupted" if interrupted else "failed", ended_at=now(),
                           stopped_in=POSITION.describe())
        if interrupted:
            log.error("interrupted during %s; finished attack cells are cached, so the same command resumes "
                      "from them; partial outputs are in %s", POSITION.describe(), run_dir)
        raise
    write_manifest(run_dir, status="complete", ended_at=now(), timings=document["timings"])
    return run_dir, document


def cmd_audit(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    run_dir, document = run_audit(audit_options(args), args.out)
    print_summary(document)
    print(f"\nwrote {run_dir}/report.html, report.pdf and results.json in {time.perf_counter() - started:.1f} s")
    return 0


def cmd_ood(args: argparse.Namespace) -> int:
    from advdetect.ood import BUILTIN_SETS, set_name

    started = time.perf_counter()
    options = audit_options(args)
    specs = [s.strip() for s in args.sets.split(",") if s.strip()]
    names = [set_name(s) for s in specs]
    if not specs or len(set(names)) != len(names):
        raise UsageError(f"--sets needs distinct out-of-distribution sets; got {args.sets!r}")
    for spec in specs:
        if spec not in BUILTIN_SETS and ":" not in spec:
            raise UsageError(f"unknown out-of-distribution set {spec!r}; give one of {', '.join(BUILTIN_SETS)} "
                             f"or a data spec such as npz:FILE or folder:DIR")
    run_dir, document = run_audit(options, args.out, ood_specs=specs)
    print_summary(document)
    print(f"\nwrote {run_dir}/report.html, report.pdf and results.json in {time.perf_counter() - started:.1f} s")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from advdetect.checks import FAILED, closing_line, evaluate, junit_xml, plan_checks
    from advdetect.history import write_manifest
    from advdetect.storage import write_bytes

    started = time.perf_counter()
    options = audit_options(args)
    checks = plan_checks(options.suite)
    if not checks:
        raise UsageError(f"suite {options.suite.name!r} has no thresholds to check; add a [thresholds] table "
                         f"with min_auroc and/or max_attack_success_rate")
    missing = sorted({c.detector for c in checks if c.detector and c.detector not in options.detector_names()})
    if missing:
        raise UsageError(f"the thresholds check detector(s) {', '.join(missing)}, which --detectors does not run")
    run_dir, document = run_audit(options, args.out)
    outcomes = [evaluate(check, document) for check in checks]
    seconds = time.perf_counter() - started
    for outcome in outcomes:
        print(outcome.line)
    print(closing_line(outcomes, seconds))
    failed = sum(o.status == FAILED for o in outcomes)
    write_manifest(run_dir, verdict={"passed": sum(o.status == "PASSED" for o in outcomes), "failed": failed,
                                     "skipped": sum(o.status == "SKIPPED" for o in outcomes)})
    if args.junitxml:
        write_bytes(args.junitxml, junit_xml(options.suite.name, outcomes, seconds))
    return 1 if failed else 0


def cmd_history(args: argparse.Namespace) -> int:
    from advdetect.history import list_runs

    if not args.root.is_dir():
        raise UsageError(f"output root {args.root} not found")
    runs = list_runs(args.root)
    if not runs:
        print(f"no audit runs under {args.root}")
        return 0
    header = ["run", "started", "status", "suite", "model", "data", "n", "clean acc", "verdict"]
    table = []
    for run in runs:
        m = run.manifest
        verdict = m.get("verdict")
        table.append([run.path.name, m.get("started_at", "?"), m.get("status", "?"), m.get("suite", "?"),
                      m.get("model_spec", "?"), m.get("data_spec", "?"), str(m.get("n", "?")),
                      f"{m['clean_accuracy']:.3f}" if "clean_accuracy" in m else "?",
                      f"{verdict['passed']} passed, {verdict['failed']} failed" if verdict else "-"])
    _print_table(header, table)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from advdetect.history import compare
    from advdetect.storage import read_json

    documents = []
    for run in (args.run_a, args.run_b):
        if not (run / "results.json").is_file():
            raise UsageError(f"{run} has no results.json; give two finished audit run folders")
        documents.append(read_json(run / "results.json"))
    differences = compare(*documents)
    table = [[d.cell, d.detector or "-", d.protocol or "-", d.metric, f"{d.before:.3f}", f"{d.after:.3f}", f"{d.delta:+.3f}",
              "REGRESSION" if d.regression else ""] for d in differences]
    _print_table(["cell", "detector", "protocol", "metric", "A", "B", "B - A", ""], table)
    regressions = sum(d.regression for d in differences)
    print(f"\n{len(differences)} metrics compared, {regressions} regression(s) of {args.run_b} against {args.run_a}")
    return 1 if regressions else 0


def cmd_detect(args: argparse.Namespace) -> int:
    from advdetect.audit import read_attack_records, read_run, reload_model
    from advdetect.detection import detect_stage
    from advdetect.report import write_report

    model = reload_model(read_run(args.run_dir))
    detect_stage(args.run_dir, model, read_attack_records(args.run_dir))
    print_summary(write_report(args.run_dir))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from advdetect.benchmark import METHODS, _models, main as bench_main

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name, valid in ((models, _models()), (methods, METHODS)):
        unknown = [n for n in name if n not in valid]
        if unknown:
            raise UsageError(f"unknown {', '.join(unknown)}; valid: {', '.join(valid)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    return bench_main(models, args.batch, args.repeats, methods, args.memory, args.json)


def cmd_report(args: argparse.Namespace) -> int:
    from advdetect.report import write_report

    print_summary(write_report(args.run_dir))
    return 0


def print_summary(document: dict) -> None:
    from advdetect.report import summary_table

    print(f"clean accuracy {document['clean_accuracy']:.3f} on {document['data']['n']} inputs of {document['data']['spec']}")
    print("AUROC per detector, protocol seen (* best of the row); every protocol is in the report and results.json")
    _print_table(*summary_table(document))


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="advdetect: %(message)s")
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"advdetect: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("advdetect: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
