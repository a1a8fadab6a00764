"""The composition branch's last fitting step, on the validation good images: each distance's
scale, which window sizes take part (``CompositionConfig.window_check``) and the absence map's
scale (``CompositionConfig.absence_sigma``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.data.types import Sample
from engine.detector import Detector
from engine.evaluation import INFERENCE_BATCH, frame_batches
from engine.metrics import auroc
from engine.models.composition import CompositionModel

__all__ = ["REARRANGED_COPIES", "calibrate_composition", "needs_calibration"]

REARRANGED_COPIES = 8  # rearranged versions of each validation image per window size


def needs_calibration(composition: CompositionModel | None) -> bool:
    """Whether ``composition`` has a part that :func:`calibrate_composition` fits: several
    distances to standardise, or an absence map."""
    return composition is not None and (composition.n_groups > 1 or composition.absence is not None)


def calibrate_composition(
    detector: Detector, samples: Sequence[Sample], progress: bool, verbose: bool = False
) -> None:
    """Standardise the composition branch's distances (descriptor, window sizes, fine parts) by
    their validation medians and MADs, keep the window sizes that pass their check
    (:meth:`CompositionModel.calibrate_groups`, ``CompositionConfig.window_check``), and
    standardise the absence map by its validation peaks
    (:meth:`engine.models.composition.absence.AbsenceMap.calibrate`), each where the model has
    it."""
    composition = detector.composition
    assert composition is not None
    side = detector.structural_side
    grouped = composition.n_groups > 1
    generator = torch.Generator().manual_seed(composition.config.seed)
    distances, rearranged, peaks = [], [], []
    for _, frames in frame_batches(samples, INFERENCE_BATCH, "composition calibration", progress):
        x = detector.structural_transform.batch(frames.to(detector.device))
        with torch.inference_mode():
            features, grid, fine = side.composition_features(x)
            features = features.float()
            fine = None if fine is None else (fine[0].float(), fine[1].float())
            if composition.absence is not None:
                peaks.append(composition.absence_peaks(features, grid).cpu())
            if not grouped:
                continue
            distances.append(composition.group_distances(features, grid, fine).cpu())
            if composition.windows is not None:
                rearranged.append(
                    composition.rearranged_window_distances(
                        features, grid, REARRANGED_COPIES, generator
                    ).cpu()
                )
    if composition.absence is not None:
        composition.absence.calibrate(torch.cat(peaks))
    if not grouped:
        return
    distances = torch.cat(distances)
    checks = None
    if composition.windows is not None:
        good, moved = distances[:, 1 : 1 + len(composition.config.windows)], torch.cat(rearranged)
        checks = torch.tensor(
            [auroc(good[:, i].numpy(), moved[:, i].numpy()) for i in range(good.shape[1])]
        )
    composition.calibrate_groups(distances, checks)
    if verbose and checks is not None:
        used = composition.group_used[1:].tolist()
        for n, a, u in zip(composition.config.windows, checks.tolist(), used, strict=True):
            print(
                f"composition windows of 1/{n} of the grid: rearranged-layout AUROC {a:.3f} "
                f"on validation -> {'used' if u else 'left out'}"
            )
