"""The composition branch's settings (see the package docstring for what each part measures)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FUSED_MAPS", "MIN_TRAINING_IMAGES", "PARTS", "CompositionConfig"]

FUSED_MAPS = ("gated", "gated_after_blur", "image")
WINDOW_SCALES = ("tail", "mad")
MIN_TRAINING_IMAGES = 2  # a covariance of the training descriptors needs two of them
# the descriptor parts a config may name (see the package docstring)
PARTS = ("area", "pairs", "blobs", "blob_size", "blob_spread", "grid", "appearance", "spread")
# the parts measured along each component's appearance directions, (K, q) each
APPEARANCE_PARTS = ("appearance", "spread", "blob_spread")


def positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"CompositionConfig.{name} must be a positive int, got {value!r}")


def number_in(
    name: str, value: object, low: float, high: float, *, open_low: bool, open_high: bool
) -> None:
    """ValueError unless ``value`` is a real number (not a bool) in the interval; NaN is not."""
    inside = (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and (low < value if open_low else low <= value)
        and (value < high if open_high else value <= high)
    )
    if not inside:
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise ValueError(f"CompositionConfig.{name} must be in {interval}, got {value!r}")


@dataclass(frozen=True)
class CompositionConfig:
    """Composition branch settings (see the package docstring for what each part measures).

    ``enabled``: whether a build fits the branch and fuses its map (the ``paper`` preset keeps
    the paper's two branches).
    ``fused_map``: what the branch contributes to fusion. Its evidence is about the whole
    image (counts, mixes, relations), so its map is the image score at every pixel; ``"gated"``
    places that score where the other branches see the anomaly
    (:func:`engine.calibrate.gated_composition`, with ``gate_power``) before the blur, which
    spreads the narrow gated peak and keeps only about half of the evidence in the image score,
    a share that varies from image to image; ``"gated_after_blur"`` adds it at the peak of the
    other branches' blurred map after the blur, so the image score rises by exactly the
    evidence (logical subset +0.018 / +0.007 and structural -0.009 / -0.006 on two seeds, mean
    unchanged, docs/ACCURACY.md: an option, not the default); ``"image"`` adds it to every pixel.
    docs/ACCURACY.md: a score on every pixel lifts the whole of an anomalous image and cuts
    AU-sPRO@0.05 by a third; gated, the fused map beats every single branch on both image
    AUROC and AU-sPRO. The per-cell map (``forward``'s second output) localises too coarsely to
    fuse (ablation 7, measured while its cells were mislabelled: a layout slip fixed
    2026-12-06); the placement map (the third) can widen the gate
    (``FusionConfig.placement_power``).
    ``image_size``: the side of the images the branch's patch features come from; None: the
    memory bank's (``StructuralConfig.image_size``), so one backbone pass serves both. Another
    size costs a second pass of the same backbone, on the bank's input resized with antialias
    (:func:`engine.models.structural.resize_input`): a finer bank helps small defects, while
    the components and blobs are measured on the grid they were tuned on (docs/ACCURACY.md,
    ablations 11 and 12).
    ``n_components``: K, k-means components of the patch features.
    ``temperature``: soft assignment for every part but the blob ones: a patch's weight for
    component k is softmax_k(-d²_k / (temperature * m)), d_k its distance to centroid k and m
    the median squared distance of training patches to their nearest centroid; 0 = one-hot.
    ``pca_dim``: the features are projected on their top ``pca_dim`` principal directions
    (fitted on train patches) before k-means and assignment.
    ``appearance_dim``: q, per component the top directions of its own pixels' variation in
    that projection; ``appearance`` / ``spread`` / ``blob_spread`` are measured along them.
    ``grid``: G, the ``grid`` part and the cell map use G x G cells.
    ``parts``: the image score's covariance groups: each entry is one or more part names of
    ``PARTS`` joined by ``+``, modelled by one joint Ledoit-Wolf covariance; groups are
    independent and each adds its squared distance divided by its size.
    ``min_blob``: blobs smaller than this many grid cells are neither counted nor compared.
    ``label_iterations``: connected-component steps (12 labels any mask up to 64 x 64 exactly).
    ``variance_floor``: added to the diagonal of every standardised descriptor covariance, so
    no direction has less variance than this (unit = a typical dimension's variance). With few
    training images some directions never vary; without a floor their precision is huge and one
    small change scores millions (a 1e-6 floor on 8 images gave fused maps of 8e6).
    ``scale_floor``: a descriptor dimension's scale is at least this fraction of its part's
    median scale, so dimensions constant on the training set stay finite. Neither floor is
    sensitive: variance floors 0.03 to 1.0 and a scale floor of 0.3 moved the fused mean image
    AUROC by at most 0.003 on the one seed screened (docs/ACCURACY.md, ablation 46).
    ``unseen_scale`` (0: off): a dimension of the ``appearance``, ``spread`` or ``blob_spread``
    parts whose training std is below that floor (it never varied, e.g. a component that never
    formed two blobs) takes at least this fraction of its component's patch spread along that
    direction as its scale. The part's median scale comes from other components and other
    magnitudes: on splicing_connectors such a dimension put a good image 199 of those scales
    out when its component split in two, further than any anomaly. With 1 (the patch spread
    itself) the fused mean image AUROC rose by +0.006 over five seeds, no seed lower
    (splicing_connectors +0.019 / +0.041 / +0.060 on three of them; docs/ACCURACY.md,
    ablation 45).
    ``fit_patches``: patches sampled (seeded) from the training images for the PCA and k-means.
    ``kmeans_iterations`` / ``kmeans_restarts`` / ``seed``: k-means settings.
    ``fine_parts``: also draw the components at the backbone's stride 4 and score the blob
    counts and lengths there (:mod:`engine.models.composition.fine`); the image score is then
    the larger of the two distances, each standardised by its median and MAD over the
    validation good images (:meth:`CompositionModel.calibrate_groups`). Parts a few pixels
    apart merge on the 8-px grid and separate at stride 4; the branch alone gained in 8 of 10
    builds, but the fused map lost 0.006 over two seeds of five categories, so it is off by
    default (docs/ACCURACY.md ablation 19).
    ``windows``: also score the components' areas per window and place
    (:mod:`engine.models.composition.windows`): per entry n, windows of the patch grid's sides
    divided by n, moved by half a window, each compared with the training images' windows at
    the same place; each window size is one more distance, standardised on the validation good
    images like the fine parts'. Empty: off. ``(6, 4)`` gained pushpins 0.026 fused mean image
    AUROC over two seeds, but the five categories only 0.003, so it is off by default
    (docs/ACCURACY.md ablation 20).
    ``window_check``: a window size takes part in the score only if its distance tells
    validation good images from the same images with a region of half a window moved elsewhere
    (:meth:`CompositionModel.rearranged_window_distances`) with an image AUROC of at least this;
    where parts lie anywhere, moving one is no anomaly and the window size only adds noise
    (docs/ACCURACY.md, ablation 20). 0: every window size takes part.
    ``members``: M, how many composition models score each image, the i-th with k-means seed
    ``seed + i`` (its own patch sample and initialisation); the image score is the mean of
    their distances, each in validation MADs above its validation median
    (:meth:`CompositionModel.calibrate_groups`), standardised again by that mean's validation
    median and MAD. One k-means fit decides which patches form "a part", and another seed
    moves one data seed's fused mean by up to 0.010. Over five seeds ``members=5`` raised the
    logical subset by 0.011 and lowered the structural subset by 0.005 (fused mean +0.003,
    within noise; docs/ACCURACY.md, ablation 23); ``members=3``, tested on two new seeds,
    raised the fused mean image AUROC by 0.012 and 0.007 (ablation 44), so the ``cpu`` preset
    fits 3; the default here (and the ``paper`` preset, which has no composition branch) is one
    fit. Not combined with ``fine_parts`` or ``windows``.
    ``placement_area_power``: the placement map (``forward``'s third output) spreads each
    component's share of the distance over its pixels divided by its area in the image to this
    power: 1 paints it as a density (a miscounted small part outweighs a large background
    component), 0 as the share alone, where the largest component takes the evidence
    (docs/ACCURACY.md ablation 47). 0.5 placed screw_bag's extra and missing parts better (its
    AU-sPRO@0.05 +0.008 over four seeds) but the five categories gained only +0.0017 (ablations
    56 and 57), so the default stays 1.
    ``absence_sigma`` (None: off): also map where a part is missing
    (:mod:`engine.models.composition.absence`): each component's soft weight blurred with this
    σ (a share of the patch grid's longer side), against the training images' mean and std at
    each place (the std floored at ``absence_std_floor``); the map is the largest deficit over
    the components. Fused by ``FusionConfig.absence_weight``; the main fit's components only.
    ``window_scale``: how a window size's distance is standardised: ``"tail"`` by the median
    and the 95th-percentile tail of the training images' leave-one-out distances (a heavy tail
    of good images then weighs less), ``"mad"`` by the validation median and MAD like the other
    distances.
    """

    enabled: bool = False
    fused_map: str = "gated"
    gate_power: float = 8.0
    image_size: int | None = None
    n_components: int = 8
    temperature: float = 0.3
    pca_dim: int = 32
    appearance_dim: int = 2
    grid: int = 4
    parts: tuple[str, ...] = ("area+pairs+appearance+spread+blob_spread",)
    min_blob: int = 2
    label_iterations: int = 12
    scale_floor: float = 0.1
    unseen_scale: float = 1.0
    variance_floor: float = 0.1
    fit_patches: int = 50_000
    kmeans_iterations: int = 50
    kmeans_restarts: int = 3
    seed: int = 0
    fine_parts: bool = False
    windows: tuple[int, ...] = ()
    window_check: float = 0.75
    window_scale: str = "tail"
    members: int = 1
    placement_area_power: float = 1.0
    absence_sigma: float | None = None
    absence_std_floor: float = 0.05

    def __post_init__(self) -> None:
        for name in (
            "n_components",
            "pca_dim",
            "appearance_dim",
            "grid",
            "min_blob",
            "label_iterations",
            "fit_patches",
            "kmeans_iterations",
            "kmeans_restarts",
            "members",
        ):
            positive_int(name, getattr(self, name))
        if self.image_size is not None:
            positive_int("image_size", self.image_size)
        if self.n_components < 2:
            raise ValueError(
                f"CompositionConfig.n_components must be >= 2, got {self.n_components}"
            )
        if self.appearance_dim > self.pca_dim:
            raise ValueError(
                f"CompositionConfig.appearance_dim ({self.appearance_dim}) must not exceed "
                f"pca_dim ({self.pca_dim})"
            )
        self._check_parts()
        if not isinstance(self.fine_parts, bool):
            raise ValueError(
                f"CompositionConfig.fine_parts must be a bool, got {self.fine_parts!r}"
            )
        if not isinstance(self.windows, tuple) or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in self.windows
        ):
            raise ValueError(
                f"CompositionConfig.windows must be a tuple of ints >= 2, got {self.windows!r}"
            )
        if self.members > 1 and (self.fine_parts or self.windows):
            raise ValueError(
                f"CompositionConfig.members={self.members} (the cpu preset fits 3) is not "
                "combined with fine_parts or windows: use members=1 with those "
                "(--set composition.members=1)"
            )
        if len(set(self.windows)) != len(self.windows):
            raise ValueError(f"CompositionConfig.windows repeats a size: {self.windows!r}")
        if self.window_scale not in WINDOW_SCALES:
            raise ValueError(
                f"CompositionConfig.window_scale must be one of {WINDOW_SCALES}, "
                f"got {self.window_scale!r}"
            )
        number_in("window_check", self.window_check, 0, 1, open_low=False, open_high=False)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(
                f"CompositionConfig.seed must be a non-negative int, got {self.seed!r}"
            )
        number_in("temperature", self.temperature, 0, 1e3, open_low=False, open_high=True)
        if self.fused_map not in FUSED_MAPS:
            raise ValueError(
                f"CompositionConfig.fused_map must be one of {FUSED_MAPS}, got {self.fused_map!r}"
            )
        number_in("gate_power", self.gate_power, 0, 64, open_low=True, open_high=False)
        number_in("variance_floor", self.variance_floor, 0, 10, open_low=True, open_high=False)
        number_in("scale_floor", self.scale_floor, 0, 1, open_low=True, open_high=False)
        number_in("unseen_scale", self.unseen_scale, 0, 10, open_low=False, open_high=False)
        number_in(
            "placement_area_power", self.placement_area_power, 0, 1, open_low=False, open_high=False
        )
        if self.absence_sigma is not None:
            number_in("absence_sigma", self.absence_sigma, 0, 1, open_low=True, open_high=False)
        number_in("absence_std_floor", self.absence_std_floor, 0, 1, open_low=True, open_high=False)

    def _check_parts(self) -> None:
        if (
            not isinstance(self.parts, tuple)
            or not self.parts
            or not all(isinstance(g, str) for g in self.parts)
        ):
            raise ValueError(
                f"CompositionConfig.parts must be a non-empty tuple of strings, got {self.parts!r}"
            )
        names = self.part_names
        if any(name not in PARTS for name in names) or len(set(names)) != len(names):
            raise ValueError(
                f"CompositionConfig.parts: each entry joins part names with '+', every name "
                f"once, from {PARTS}; got {self.parts!r}"
            )

    @property
    def groups_calibrated(self) -> bool:
        """Whether the image score joins several distances, each standardised on the
        validation good images (fine parts, windows or several members), not one distance."""
        return self.fine_parts or bool(self.windows) or self.members > 1

    def own_pass_size(self, bank_size: int) -> int | None:
        """The input side of the branch's own backbone pass: ``image_size`` when it differs
        from the memory bank's ``bank_size``, else None (the bank's features serve both)."""
        return None if self.image_size in (None, bank_size) else self.image_size

    @property
    def groups(self) -> tuple[tuple[str, ...], ...]:
        """``parts`` split into its covariance groups of part names."""
        return tuple(tuple(group.split("+")) for group in self.parts)

    @property
    def part_names(self) -> tuple[str, ...]:
        """The part names of ``parts`` in descriptor order."""
        return tuple(name for group in self.groups for name in group)

    def part_sizes(self) -> dict[str, int]:
        """Descriptor length of every part in ``PARTS``."""
        k, q = self.n_components, self.appearance_dim
        return {
            "area": k,
            "pairs": k * (k - 1) // 2,
            "blobs": k,
            "blob_size": 2 * k,
            "blob_spread": k * q,
            "grid": k * self.grid**2,
            "appearance": k * q,
            "spread": k * q,
        }
