"""``advdetect bench``: the cost of the confounding-gradient features against its references.

For each model, in one run: the per-sample loop (one backward pass per input), ``torch.func``
``vmap(grad)``, the batched closed forms of :func:`confounding_gradient_features`, and the
floor they aim at, one batched forward and backward pass of the same loss. Reported as
seconds and as ratios to that floor, with the largest relative deviation from the loop.

``advdetect bench --adaptive``: the cost of one step of the adaptive attack (Orthogonal PGD
through each detector's differentiable score) against one PGD step, on the embedded default.
"""

from __future__ import annotations

import copy
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from advdetect.signatures.features import (eval_with_all_grads, confounding_gradient_features, confounding_loss,
                                per_sample_loop_features)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet18(nn.Module):
    """The CIFAR-10 ResNet-18 (3x3 stem, no max-pool) of the robustness literature; 11.2M parameters."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_Block(cin, cout, stride), _Block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def vmap_features(model: nn.Module, inputs: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p: dict, x: torch.Tensor) -> torch.Tensor:
        return confounding_loss(functional_call(model, (p, buffers), (x.unsqueeze(0),))).sum()

    model.eval()
    rows = []
    for start in range(0, len(inputs), batch_size):
        per_sample = vmap(grad(loss), in_dims=(None, 0))(params, inputs[start : start + batch_size])
        rows.append(torch.stack([per_sample[k].flatten(1).double().pow(2).sum(1) for k in params], dim=1))
    return torch.cat(rows)


def batched_backward(model: nn.Module, inputs: torch.Tensor, batch_size: int = 64) -> None:
    """The floor: one forward and backward pass of the summed loss (all weight gradients, summed)."""
    with eval_with_all_grads(model) as params:
        for start in range(0, len(inputs), batch_size):
            torch.autograd.grad(confounding_loss(model(inputs[start : start + batch_size])).sum(), params)


METHODS: dict[str, Callable[..., Any]] = {
    "loop": per_sample_loop_features,
    "vmap": vmap_features,
    "batched": confounding_gradient_features,
    "forward_backward": batched_backward,
}


def bench_models() -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]]:
    from advdetect.sources.embedded import SmallCNN, TRAINING

    return {"default": (lambda: SmallCNN(TRAINING["width"]), (1, 28, 28)), "resnet18": (CifarResNet18, (3, 32, 32))}


def time_methods(model: nn.Module, inputs: torch.Tensor, methods: list[str], repeats: int) -> dict[str, float]:
    """Median seconds of each method over ``repeats`` runs, after one warm-up run each."""
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    for method in methods:
        METHODS[method](model, inputs)
    for _ in range(repeats):  # interleaved, so drift in machine load hits every method alike
        for method in methods:
            start = time.perf_counter()
            METHODS[method](model, inputs)
            seconds[method].append(time.perf_counter() - start)
    return {m: statistics.median(v) for m, v in seconds.items()}


def run_benchmark(models: list[str], batch: int, repeats: int, methods: list[str]) -> dict[str, Any]:
    report: dict[str, Any] = {"threads": torch.get_num_threads(), "batch": batch, "repeats": repeats,
                              "torch": torch.__version__, "models": {}}
    for name in models:
        factory, shape = bench_models()[name]
        torch.manual_seed(0)
        model = factory().eval()
        inputs = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(0))
        seconds = time_methods(model, inputs, methods, repeats)
        floor = seconds.get("forward_backward")
        # float32 rounding differs between methods; both are judged against the float64 loop
        truth = per_sample_loop_features(copy.deepcopy(model).double(), inputs.double())

        def deviation(values: torch.Tensor) -> float:
            return float(((values - truth).abs() / truth.abs().clamp_min(1e-300)).max())

        report["models"][name] = {
            "parameter_tensors": len(list(model.parameters())),
            "seconds": seconds,
            "ratio_to_forward_backward": {m: s / floor for m, s in seconds.items()} if floor else {},
            "speedup_over_loop": {m: seconds["loop"] / s for m, s in seconds.items()} if "loop" in seconds else {},
            "max_relative_error_float32": {"batched": deviation(confounding_gradient_features(model, inputs)),
                                           "loop": deviation(per_sample_loop_features(model, inputs))},
        }
    return report


_MEASURE_PEAK = """
import json, torch
from advdetect.cli.bench import CifarResNet18
from advdetect.signatures.features import confounding_gradient_features as features

def status(field):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))

torch.manual_seed(0)
model, inputs = CifarResNet18().eval(), torch.rand({n}, 3, 32, 32)
features(model, inputs[:2])
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as handle:  # reset the peak to the current size
    handle.write("5")
features(model, inputs, batch_size={chunk})
print(json.dumps((status("VmHWM") - base) / 1024))
"""


def peak_memory(n: int, chunk: int) -> dict[str, float]:
    """Peak resident memory growth (MiB) of the features of ``n`` CIFAR-sized inputs in chunks of
    ``chunk``, in a fresh process. Linux only: it reads the process's own peak (VmHWM), since
    ``ru_maxrss`` carries the parent's peak over fork and exec."""
    out = subprocess.run([sys.executable, "-c", _MEASURE_PEAK.format(n=n, chunk=chunk)], capture_output=True,
                         text=True, check=True)
    return {"inputs": n, "chunk": chunk, "peak_growth_mib": round(float(out.stdout.strip()), 1)}


def format_report(report: dict[str, Any]) -> str:
    lines = [f"confounding-gradient features: batch {report['batch']}, {report['threads']} threads, "
             f"median of {report['repeats']} (torch {report['torch']})"]
    for name, r in report["models"].items():
        errors = r["max_relative_error_float32"]
        lines.append(f"\n{name} ({r['parameter_tensors']} parameter tensors); largest relative error in float32 "
                     f"against the float64 loop: batched {errors['batched']:.1e}, loop {errors['loop']:.1e}")
        lines.append(f"  {'method':<18}{'seconds':>9}{'x fwd+bwd':>11}{'speedup vs loop':>17}")
        for method, seconds in r["seconds"].items():
            ratio = r["ratio_to_forward_backward"].get(method)
            speedup = r["speedup_over_loop"].get(method)
            lines.append(f"  {method:<18}{seconds:>9.3f}{'' if ratio is None else f'{ratio:>10.2f}x'}"
                         f"{'' if speedup is None else f'{speedup:>16.2f}x'}")
    if report.get("memory"):
        lines.append("\npeak memory growth of the features, CIFAR ResNet-18:")
        for m in report["memory"]:
            lines.append(f"  {m['inputs']} inputs in chunks of {m['chunk']:>4}: {m['peak_growth_mib']:8.1f} MiB")
    return "\n".join(lines)


def main(models: list[str], batch: int, repeats: int, methods: list[str], memory: bool, as_json: bool) -> int:
    report = run_benchmark(models, batch, repeats, methods)
    if memory:
        report["memory"] = [peak_memory(1000, chunk) for chunk in (16, 64, 256)]
    print(json.dumps(report, indent=2) if as_json else format_report(report))
    return 0


def adaptive_step_costs(detectors: list[str], batch: int, steps: int, repeats: int) -> dict[str, Any]:
    """Seconds per step of the adaptive attack (selective, as the adaptive stage runs it by default)
    against each detector (fitted on FGSM examples of the
    embedded default's test split) and of torchattacks' PGD, on ``batch`` test inputs; median of
    ``repeats``, interleaved; each detector's ratio to the PGD step."""
    import torchattacks

    from advdetect.attacks.orthogonal_pgd import OrthogonalPGD
    from advdetect.detectors import build_detector
    from advdetect.sources.embedded import default_model, test_split

    model = default_model().eval()
    x, y = test_split()
    reference, reference_y, fit_x, fit_y, x, y = x[:256], y[:256], x[256:320], y[256:320], x[320 : 320 + batch], \
        y[320 : 320 + batch]
    fitted = {}
    for name in detectors:
        detector = build_detector(name).prepare(model, reference, reference_y)
        adversarial = torchattacks.FGSM(model, eps=0.1)(fit_x, fit_y)
        if detector.uses_adversarial:
            detector.fit(detector.signatures(model, fit_x), detector.signatures(model, adversarial))
        else:
            detector.fit(detector.signatures(model, reference))
        fitted[name] = detector
    attacks: dict[str, Callable[[], Any]] = {
        "pgd": lambda: torchattacks.PGD(model, eps=0.1, alpha=0.01, steps=steps)(x, y)}
    for name, detector in fitted.items():
        # the adaptive stage's default method, with the threshold at 5% false positives on clean inputs
        threshold = float(np.quantile(detector.score_samples(detector.signatures(model, reference)), 0.95))
        attacks[name] = lambda d=detector, t=threshold: OrthogonalPGD(
            model, eps=0.1, alpha=0.01, steps=steps, method="selective", threshold=t,
            score=lambda inputs: d.torch_scores(model, inputs))(x, y)
    seconds: dict[str, list[float]] = {name: [] for name in attacks}
    for _ in range(repeats):
        for name, run in attacks.items():
            start = time.perf_counter()
            run()
            seconds[name].append((time.perf_counter() - start) / steps)
    per_step = {name: statistics.median(values) for name, values in seconds.items()}
    return {"batch": len(x), "steps": steps, "repeats": repeats, "threads": torch.get_num_threads(),
            "seconds_per_step": per_step, "ratio_to_pgd_step": {n: s / per_step["pgd"] for n, s in per_step.items()},
            "gradient": {name: detector.gradient_kind for name, detector in fitted.items()}}


def format_adaptive(report: dict[str, Any]) -> str:
    lines = [f"adaptive attack step on the embedded default: batch {report['batch']}, {report['steps']} steps, "
             f"median of {report['repeats']}, {report['threads']} threads",
             f"  {'attack':<32}{'s/step':>9}{'x PGD step':>12}  gradient"]
    for name, seconds in report["seconds_per_step"].items():
        label = "PGD (no detector)" if name == "pgd" else f"adaptive vs {name}"
        lines.append(f"  {label:<32}{seconds:>9.4f}{report['ratio_to_pgd_step'][name]:>11.2f}x  "
                     f"{report['gradient'].get(name, '')}")
    return "\n".join(lines)


__all__ = ["CifarResNet18", "adaptive_step_costs", "main", "peak_memory", "run_benchmark", "vmap_features"]
