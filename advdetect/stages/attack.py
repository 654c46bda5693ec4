"""Stage 1, attack: every cell's adversarial inputs, from the inputs the model classifies correctly,
written into the run folder (see :mod:`advdetect.run.folder`); from the attack cache when an earlier
audit already computed them."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from advdetect.attacks import get_attack
from advdetect.attacks.cache import AttackCache, tensor_sha256
from advdetect.stages.distributed import current_world
from advdetect.errors import UsageError
from advdetect.signatures.inference import batched_logits
from advdetect.signatures.passes import PassCounter
from advdetect.attacks.masking import masking_symptoms, suspected
from advdetect.progress import Progress, no_progress, progress
from advdetect.run.records import AttackRecord, derive_seed
from advdetect.run.robustness import robust_accuracy, threat_model
from advdetect.run.folder import cell_files, cell_paths, read_run, record_files, sample_arrays, update_run
from advdetect.run.storage import save_arrays, write_json
from advdetect.run.records import AttackCell

log = logging.getLogger(__name__)


class SeededRNG:
    """Fork torch's and NumPy's global RNGs for one cell: torchattacks' APGD, Square and
    AutoAttack reseed the global RNG, which must not leak into the next cell."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.seed, self.devices = seed, [device] if device.type == "cuda" else []

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=self.devices)
        self._fork.__enter__()
        self._numpy_state = np.random.get_state()
        torch.manual_seed(self.seed)
        np.random.seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        np.random.set_state(self._numpy_state)
        self._fork.__exit__(*exc)


def resolved_params(cell: AttackCell, *, num_classes: int, seed: int) -> dict:
    """The cell's constructor parameters, with the class count and seed filled in where the attack takes them."""
    entry = get_attack(cell.attack_name)
    params = cell.constructor_params()
    if "n_classes" in entry.keywords and "n_classes" not in params:
        params["n_classes"] = num_classes
    if "seed" in entry.keywords and "seed" not in params:
        params["seed"] = seed
    return params


def attack_cell(model: nn.Module, cell: AttackCell, x: torch.Tensor, y: torch.Tensor, *,
                num_classes: int, seed: int, batch_size: int) -> tuple[torch.Tensor, dict]:
    """Attack ``x`` (inputs the model classifies correctly) at one strength; returns the
    adversarial inputs on the CPU and the constructor parameters actually used."""
    entry = get_attack(cell.attack_name)
    params = resolved_params(cell, num_classes=num_classes, seed=seed)
    device = next(model.parameters()).device
    try:
        attack = entry.build(model, **params)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"attack {cell.key}: {exc}") from None
    world = current_world()
    bar = progress(total=len(world.chunks(len(x), batch_size)), desc=cell.key, unit="batch", leave=False)

    def attack_chunk(index: int, rows: slice) -> torch.Tensor:
        # seeded by the chunk, not by the process: the same rows get the same randomness on any number of ranks
        with SeededRNG(derive_seed(seed, "chunk", index), device):
            adversarial = attack(x[rows].to(device), y[rows].to(device)).detach().cpu().float()
        bar.update()
        return adversarial

    adversarial = world.map_chunks(len(x), batch_size, attack_chunk)
    bar.close()
    adversarial = torch.zeros_like(x) if adversarial is None else adversarial
    if adversarial.shape != x.shape or not torch.isfinite(adversarial).all():
        raise UsageError(f"attack {cell.key} returned inputs of another shape or non-finite values; the model's "
                         f"gradients may be NaN on some inputs")
    return adversarial, params


def attack_stage(run_dir: Path, model: nn.Module, cells: list[AttackCell],
                 on_progress: Progress = no_progress) -> list[AttackRecord]:
    """Stage 1: every cell's adversarial inputs, from the inputs the model classifies correctly."""
    info = read_run(run_dir)
    sample = sample_arrays(run_dir)
    correct = np.flatnonzero(sample["pred"] == sample["y"])
    x, y = torch.from_numpy(sample["x"][correct]), torch.from_numpy(sample["y"][correct])
    cache = AttackCache(Path(info.cache_dir)) if info.cache_dir else None
    inputs_sha256 = tensor_sha256(x, y)
    # what the model computes and what its gradients look like, robust to float noise between runs
    fingerprint = cache.fingerprint(model, x, y) if cache else None
    device = next(model.parameters()).device
    world = current_world()
    started, records, hits = time.perf_counter(), [], 0
    for done, cell in enumerate(progress(cells, desc="attack", unit="cell")):
        on_progress("attack", cell.key, done, len(cells))
        cell_started = time.perf_counter()
        seed = derive_seed(info.seed, "attack", cell.key)
        params = resolved_params(cell, num_classes=info.model["num_classes"], seed=seed)
        key = (cache.key(model=info.model["sha256"], inputs=inputs_sha256, attack=cell.attack_name,
                         implementation="{0.__module__}.{0.__qualname__}".format(get_attack(cell.attack_name).factory),
                         params=params, seed=seed, seeding="per-chunk", batch_size=info.batch_size,
                         device=device.type, fingerprint=fingerprint) if cache else "")
        # rank 0's cache decides for every rank, so that all of them attack, or none
        adversarial = world.from_main(cache.load(key, x, budget=cache.budget(cell.attack_name, params))
                                      if cache and world.is_main else None)
        with PassCounter(model) as attack_passes:  # each rank counts the chunks it attacks
            if adversarial is None:
                adversarial, params = attack_cell(model, cell, x, y, num_classes=info.model["num_classes"],
                                                  seed=seed, batch_size=info.batch_size)
                if cache and world.is_main:
                    cache.store(key, adversarial)
            else:
                hits += 1
        forward, backward = summed_over_ranks(attack_passes.forward, attack_passes.backward)
        with PassCounter(model) as predict_passes:  # every rank classifies every input: counted once
            pred = adversarial_predictions(model, cell, adversarial, info.batch_size, info.model["num_classes"])
        fooled = (pred != y).numpy()
        record = cell_record(cell, params, seed, x, adversarial, fooled, round(time.perf_counter() - cell_started, 3),
                             n_total=len(sample["y"]), forward_passes=forward + predict_passes.forward,
                             backward_passes=backward + predict_passes.backward)
        record_path, arrays_path = cell_paths(run_dir, cell.slug)
        save_arrays(arrays_path, source_index=correct, x_adv=adversarial.numpy(), pred=pred.numpy(), fooled=fooled)
        write_json(record_path, record.to_dict())
        record_files(run_dir, cell_files(cell.slug))
        records.append(record)
    if world.is_main:
        write_json(run_dir / MASKING_JSON, check_masking(model, cells, x, y, info.seed, info.batch_size))
        record_files(run_dir, {MASKING_JSON: ["sample.npz"]})
    update_run(run_dir, ("attack", time.perf_counter() - started), attack_cache_hits=hits if cache else None)
    if cache:
        log.info("%d of %d attack cells came from the cache in %s", hits, len(cells), cache.root)
    return records


def summed_over_ranks(*counts: int) -> tuple[int, ...]:
    """``counts`` summed over the audit's processes (each counts the chunks it computed): the same numbers
    for any number of processes. A collective call: every rank makes it."""
    world = current_world()
    gathered = world.map_chunks(world.size, 1, lambda index, rows: np.array([counts], dtype=np.int64))
    return tuple(int(total) for total in gathered.sum(axis=0))


#: Correctly classified inputs the gradient-masking checks run on, and their budget when the suite
#: has no Linf attack with an ``eps`` axis.
MASKING_INPUTS = 32
MASKING_DEFAULT_EPS = 8 / 255
MASKING_JSON = "masking.json"


def check_masking(model: nn.Module, cells: list[AttackCell], x: torch.Tensor, y: torch.Tensor, seed: int,
                  batch_size: int) -> dict:
    """The gradient-masking symptoms (:mod:`advdetect.attacks.masking`) on the first :data:`MASKING_INPUTS`
    correctly classified inputs, at the median Linf ``eps`` of the suite's cells."""
    budgets = sorted(c.strength for c in cells if c.strength_name == "eps" and 0 < c.strength <= 1
                     and threat_model(c.attack_name, c.constructor_params()) == "Linf")
    eps = budgets[len(budgets) // 2] if budgets else MASKING_DEFAULT_EPS
    started = time.perf_counter()
    symptoms = masking_symptoms(model, x[:MASKING_INPUTS], y[:MASKING_INPUTS], eps=eps,
                                seed=derive_seed(seed, "masking"), batch_size=batch_size) if len(x) else []
    for symptom in suspected(symptoms):
        log.warning("gradient masking suspected: %s", symptom.detail)
    return {"eps": eps, "n_inputs": min(len(x), MASKING_INPUTS), "seconds": round(time.perf_counter() - started, 3),
            "symptoms": [symptom.to_dict() for symptom in symptoms]}


def adversarial_predictions(model: nn.Module, cell: AttackCell, adversarial: torch.Tensor, batch_size: int,
                            num_classes: int) -> torch.Tensor:
    """The model's classes for a cell's adversarial inputs (none for none); refused when its logits
    are not finite, since whether the attack fooled it cannot then be told."""
    logits = batched_logits(model, adversarial, batch_size, num_classes=num_classes)
    if not torch.isfinite(logits).all():
        raise UsageError(f"the model returns NaN or infinite logits on adversarial inputs of {cell.key}; "
                         f"whether the attack fooled it cannot be told")
    return logits.argmax(dim=1)


def cell_record(cell: AttackCell, params: dict, seed: int, x: torch.Tensor, adversarial: torch.Tensor,
                fooled: np.ndarray, seconds: float, *, n_total: int, forward_passes: int | None = None,
                backward_passes: int | None = None) -> AttackRecord:
    """What one cell's attack did: success rate, robust accuracy over all ``n_total`` audited inputs,
    and the size of its successful perturbations; what it cost: ``seconds`` and the model passes made."""
    robust, low, high = robust_accuracy(n_total, len(x), int(fooled.sum()))
    delta = (adversarial - x).flatten(1)[torch.from_numpy(fooled)]
    linf, l2 = delta.abs().amax(dim=1).double(), delta.norm(dim=1).double()

    def stat(values: torch.Tensor, how: str) -> float | None:
        return float(getattr(values, how)()) if len(values) else None

    return AttackRecord(
        key=cell.key, slug=cell.slug, attack=cell.attack, attack_name=cell.attack_name,
        strength_name=cell.strength_name, strength=cell.strength, params=params, seed=seed,
        n_attacked=len(x), n_fooled=int(fooled.sum()), attack_success_rate=float(fooled.mean()) if len(x) else None,
        mean_linf=stat(linf, "mean"), max_linf=stat(linf, "max"), mean_l2=stat(l2, "mean"), max_l2=stat(l2, "max"),
        seconds=seconds, robust_accuracy=robust, robust_accuracy_ci_low=low, robust_accuracy_ci_high=high,
        forward_passes=forward_passes, backward_passes=backward_passes,
    )
