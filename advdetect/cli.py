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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="advdetect", description="Adversarial-robustness audits: attack, detect, report.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the summary")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    audit = commands.add_parser("audit", help="attack, detect and report in one run",
                                description="Run an audit suite against a model and data; write results.json, report.html "
                                            "and report.pdf into a new run folder.")
    audit.add_argument("suite", nargs="?", default="default",
                       help="a suite TOML file, or the name of a built-in suite (default: %(default)s)")
    audit.add_argument("--model", default="default",
                       help="default, robustbench:NAME, file.py:Callable, package.module:Callable or a TorchScript "
                            "file.pt (default: the embedded MNIST CNN)")
    audit.add_argument("--weights", help="state_dict for a file.py:Callable or package.module:Callable model")
    audit.add_argument("--dataset", choices=[d.value for d in Dataset], default="cifar10",
                       help="robustbench:NAME's dataset (default: %(default)s)")
    audit.add_argument("--threat-model", choices=[t.value for t in ThreatModel], default="Linf",
                       help="robustbench:NAME's threat model (default: %(default)s)")
    audit.add_argument("--model-dir", default="./models",
                       help="robustbench checkpoints, as <dir>/<dataset>/<threat_model>/<NAME>.pt (default: %(default)s)")
    audit.add_argument("--mean", type=_floats, help="comma-separated per-channel mean the model expects inputs normalized by")
    audit.add_argument("--std", type=_floats, help="comma-separated per-channel std, with --mean")
    audit.add_argument("--data", default="default",
                       help="default, folder:DIR, cifar10:ROOT, cifar100:ROOT, mnist:ROOT, svhn:ROOT or npz:FILE "
                            "(default: the embedded MNIST test split)")
    audit.add_argument("--image-size", type=_positive_int, help="resize images to this square size")
    audit.add_argument("--n", type=_positive_int, default=256,
                       help="inputs to audit, a seeded class-stratified sample (default: %(default)s)")
    audit.add_argument("--attacks", help="comma-separated attack ids: run only these attacks of the suite")
    audit.add_argument("--detectors", default="confounding_gradient,msp",
                       help="comma-separated detector names (default: %(default)s)")
    audit.add_argument("--seed", type=int, default=0, help="seed for sampling, attacks and splits (default: %(default)s)")
    audit.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N (default: %(default)s)")
    audit.add_argument("--batch-size", type=_positive_int, default=128, help="batch size for attacks and features")
    audit.add_argument("--fit-fraction", type=float, default=0.1,
                       help="share of fooled source inputs that fit the detector (default: %(default)s)")
    audit.add_argument("--out", type=Path, help="run folder to create (default: reports/<timestamp>)")
    audit.add_argument("--cache-dir", type=Path,
                       help="where adversarial inputs are cached between runs (default: <user cache>/advdetect/attacks)")
    audit.add_argument("--no-cache", action="store_true", help="neither read nor write the attack cache")
    audit.set_defaults(func=cmd_audit)

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


def cmd_audit(args: argparse.Namespace) -> int:
    from advdetect.audit import AuditOptions, attack_stage, detect_stage, prepare, start_run
    from advdetect.cache import default_cache_dir
    from advdetect.models import ModelOptions
    from advdetect.report import write_report
    from advdetect.suite import load_suite

    suite = load_suite(args.suite)
    if args.attacks:
        suite = suite.select([a.strip() for a in args.attacks.split(",") if a.strip()])
    model_options = ModelOptions(weights=args.weights, dataset=Dataset(args.dataset),
                                 threat_model=ThreatModel(args.threat_model), model_dir=args.model_dir,
                                 mean=args.mean, std=args.std)
    options = AuditOptions(suite=suite, model=args.model, model_options=model_options, data=args.data, n=args.n,
                           image_size=args.image_size,
                           seed=args.seed, device=args.device, batch_size=args.batch_size,
                           fit_fraction=args.fit_fraction,
                           detectors=tuple(d.strip() for d in args.detectors.split(",") if d.strip()),
                           cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir()))
    run_dir = _new_run_dir(args.out)
    started = time.perf_counter()
    loaded, sample, device = prepare(options)
    cells = suite.cells()
    log.info("auditing %s on %s (%d inputs) with suite %s: %d attack cells, device %s",
             options.model, options.data, len(sample.y), suite.name, len(cells), device)
    stage = "load"
    try:
        info = start_run(run_dir, options, loaded, sample, device)
        log.info("clean accuracy %.3f; run folder %s", info.clean_accuracy, run_dir)
        stage = "attack"
        records = attack_stage(run_dir, loaded.module, cells)
        stage = "detect"
        detect_stage(run_dir, loaded.module, records)
        stage = "report"
        document = write_report(run_dir)
    except KeyboardInterrupt:
        log.error("interrupted during the %s stage; finished files are in %s", stage, run_dir)
        return 130
    print_summary(document)
    print(f"\nwrote {run_dir}/report.html, report.pdf and results.json in {time.perf_counter() - started:.1f} s")
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from advdetect.audit import detect_stage, read_attack_records, read_run, reload_model
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
    detectors = list(dict.fromkeys(r["detector"] for r in document["results"]))
    header = ["attack", "strength", "success", *[f"AUROC {d}" for d in detectors]]
    lines = []
    for attack in document["attacks"]:
        aurocs = {r["detector"]: r["auroc"] for r in document["results"]
                  if r["attack"] == attack["attack"] and r["strength"] == attack["strength"]}
        success = attack["attack_success_rate"]
        lines.append([attack["attack"], f"{attack['strength_name']}={attack['strength']:g}",
                      "n/a" if success is None else f"{100 * success:.1f}%",
                      *["-" if aurocs.get(d) is None else f"{aurocs[d]:.3f}" for d in detectors]])
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    print(f"clean accuracy {document['clean_accuracy']:.3f} on {document['data']['n']} inputs of {document['data']['spec']}")
    for row in [header, *lines]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)))


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
