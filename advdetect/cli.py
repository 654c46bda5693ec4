"""Command line: ``advdetect audit``, and the stages rerun alone (``detect``, ``report``)."""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, NoReturn, TypeVar

from advdetect.errors import ExitCode, Terminated, UsageError
from advdetect.models import Dataset, ThreatModel

log = logging.getLogger("advdetect")
T = TypeVar("T")


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error said in one line instead of the whole usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.USAGE_ERROR, f"advdetect: error: {message} (see '{self.prog} --help')\n")


def _checked(parse: Callable[[str], T], what: str, valid: Callable[[T], bool], rule: str) -> Callable[[str], T]:
    """An argparse type: ``parse`` the text (a usage error naming ``what`` was expected), then
    require ``valid`` (a usage error saying ``rule``)."""
    def convert(text: str) -> T:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {text}")
        return value

    return convert


_positive_int = _checked(int, "a whole number", lambda v: v >= 1, "must be at least 1")
_seed = _checked(int, "a whole number", lambda v: 0 <= v < 2**32, f"must be from 0 to {2**32 - 1}")
_fraction = _checked(float, "a number", lambda v: 0.0 < v < 1.0, "must lie strictly between 0 and 1")
_floats = _checked(lambda text: tuple(float(v) for v in text.split(",")), "comma-separated numbers",
                   lambda values: all(math.isfinite(v) for v in values), "expected finite numbers")


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
    parser.add_argument("--seed", type=_seed, default=0, help="seed for sampling, attacks and splits (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--batch-size", type=_positive_int, default=128, help="batch size for attacks and features")
    parser.add_argument("--fit-fraction", type=_fraction, default=0.2,
                        help="share of the correctly classified inputs whose (clean, adversarial) pairs calibrate the detectors; the rest test them (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="run folder to create (default: reports/<timestamp>)")
    parser.add_argument("--cache-dir", type=Path,
                        help="where adversarial inputs are cached between runs (default: <user cache>/advdetect/attacks)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the attack cache")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="advdetect", description="Adversarial-robustness audits: attack, detect, report.")
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


def audit_options(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from advdetect.preflight import build_options

    def names(text: str | None) -> list[str] | None:
        return [n.strip() for n in text.split(",") if n.strip()] if text else None

    return build_options(getattr(args, "suite", None) or _ood_suite(), attacks=names(getattr(args, "attacks", None)),
                         model=args.model, weights=args.weights, dataset=args.dataset, threat_model=args.threat_model,
                         model_dir=args.model_dir, mean=args.mean, std=args.std, data=args.data, n=args.n,
                         image_size=args.image_size, seed=args.seed, device=args.device, batch_size=args.batch_size,
                         fit_fraction=args.fit_fraction, detectors=names(args.detectors),
                         n_reference=args.n_reference, noisy_negatives=args.noisy_negatives,
                         cache_dir=args.cache_dir, cache=not args.no_cache)


def _ood_suite():  # type: ignore[no-untyped-def]
    from advdetect.suite import Suite

    return Suite("ood", "advdetect ood", "", ())


def cmd_audit(args: argparse.Namespace) -> int:
    from advdetect.pipeline import run_audit

    started = time.perf_counter()
    run_dir, document = run_audit(audit_options(args), args.out)
    print_summary(document)
    print(f"\nwrote {run_dir}/report.html, report.pdf and results.json in {time.perf_counter() - started:.1f} s")
    return ExitCode.OK


def cmd_ood(args: argparse.Namespace) -> int:
    from advdetect.ood import BUILTIN_SETS, set_name
    from advdetect.pipeline import run_audit

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
    return ExitCode.OK


def cmd_check(args: argparse.Namespace) -> int:
    from advdetect.checks import FAILED, closing_line, evaluate, junit_xml, plan_checks
    from advdetect.pipeline import run_audit
    from advdetect.rundir import check_writable_file, write_manifest
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
    if args.junitxml:
        check_writable_file(args.junitxml, "--junitxml")
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
        try:
            write_bytes(args.junitxml, junit_xml(options.suite.name, outcomes, seconds))
        except OSError as exc:
            raise UsageError(f"cannot write --junitxml {args.junitxml}: {exc.strerror or exc}") from None
    return ExitCode.CHECK_FAILED if failed else ExitCode.OK


def cmd_history(args: argparse.Namespace) -> int:
    from advdetect.history import list_runs
    from advdetect.rundir import is_held

    if not args.root.is_dir():
        raise UsageError(f"output root {args.root} not found")
    runs = list_runs(args.root)
    if not runs:
        print(f"no audit runs under {args.root}")
        return ExitCode.OK
    header = ["run", "started", "status", "suite", "model", "data", "n", "clean acc", "verdict"]
    table = []
    for run in runs:
        m = run.manifest
        verdict = m.get("verdict")
        status = m.get("status", "?")
        if status == "running" and not is_held(run.path):
            status = "killed"  # marked running, but no process holds it
        table.append([run.path.name, m.get("started_at", "?"), status, m.get("suite", "?"),
                      str(m.get("model_spec", "?")), str(m.get("data_spec", "?")), str(m.get("n", "?")),
                      f"{m['clean_accuracy']:.3f}" if "clean_accuracy" in m else "?",
                      f"{verdict['passed']} passed, {verdict['failed']} failed" if verdict else "-"])
    _print_table(header, table)
    return ExitCode.OK


def cmd_compare(args: argparse.Namespace) -> int:
    from advdetect.history import compare
    from advdetect.rundir import read_results

    documents = []
    for run in (args.run_a, args.run_b):
        if not (run / "results.json").is_file():
            raise UsageError(f"{run} has no results.json; give two finished audit run folders")
        documents.append(read_results(run / "results.json"))
    differences = compare(*documents)
    table = [[d.cell, d.detector or "-", d.protocol or "-", d.metric, f"{d.before:.3f}", f"{d.after:.3f}", f"{d.delta:+.3f}",
              "REGRESSION" if d.regression else ""] for d in differences]
    _print_table(["cell", "detector", "protocol", "metric", "A", "B", "B - A", ""], table)
    regressions = sum(d.regression for d in differences)
    print(f"\n{len(differences)} metrics compared, {regressions} regression(s) of {args.run_b} against {args.run_a}")
    return ExitCode.CHECK_FAILED if regressions else ExitCode.OK


def cmd_detect(args: argparse.Namespace) -> int:
    from advdetect.pipeline import rerun_detection

    print_summary(rerun_detection(args.run_dir))
    return ExitCode.OK


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from advdetect.benchmark import METHODS, bench_models, main as bench_main

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name, valid in ((models, bench_models()), (methods, METHODS)):
        unknown = [n for n in name if n not in valid]
        if unknown:
            raise UsageError(f"unknown {', '.join(unknown)}; valid: {', '.join(valid)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    return bench_main(models, args.batch, args.repeats, methods, args.memory, args.json)


def cmd_report(args: argparse.Namespace) -> int:
    from advdetect.pipeline import rewrite_report

    print_summary(rewrite_report(args.run_dir))
    return ExitCode.OK


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
    """Run one command; returns its :class:`~advdetect.errors.ExitCode`."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already said in one line
        return exc.code if isinstance(exc.code, int) else ExitCode.USAGE_ERROR
    logging.basicConfig(level=logging.WARNING, format="advdetect: %(message)s")
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    previous = _on_sigterm(_terminate)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"advdetect: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE_ERROR
    except Terminated:
        print("advdetect: terminated", file=sys.stderr)
        return ExitCode.TERMINATED
    except KeyboardInterrupt:
        print("advdetect: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except Exception as exc:
        return _internal_error(args, exc)
    finally:
        _on_sigterm(previous)


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def _on_sigterm(handler: Any) -> Any:
    """Install a SIGTERM handler; returns the previous one (None off the main thread, where none can be set)."""
    if handler is None:
        return None
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


def _internal_error(args: argparse.Namespace, exc: Exception) -> int:
    """An unexpected error: one line on stderr that points to the saved traceback."""
    from advdetect.pipeline import fallback_error_log, save_traceback
    from advdetect.rundir import RUN_JSON

    path = getattr(exc, "error_log", None)
    run_dir = getattr(args, "run_dir", None)
    if path is None and run_dir is not None and (run_dir / RUN_JSON).is_file():
        try:
            path = save_traceback(run_dir, exc)
        except OSError:
            path = None
    path = path or fallback_error_log(exc)
    text = str(exc).strip().splitlines()
    where = f"the traceback is in {path}" if path else "no traceback could be saved"
    print(f"advdetect: internal error: {type(exc).__name__}{': ' + text[0] if text else ''} ({where}; please "
          f"report it)", file=sys.stderr)
    if path is None:
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__)
    return ExitCode.INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
