"""Composition branch (SPEC §3.5, beyond the paper): which parts an image holds, how much of
each, where, and how alike they are — scored against the good training images.

Input: the structural branch's frozen patch features, ``(B, h*w, D)`` in row-major grid order
with their grid ``(h, w)`` (:class:`engine.models.structural.PatchFeatures`), so by default the
branch adds no backbone pass (``CompositionConfig.image_size`` can give it one of its own).
Fitted on ``train/good`` only; every fitted value is a buffer.

Per image:

1. each patch feature is projected on the top ``pca_dim`` principal directions of training
   patches and assigned to the nearest of K k-means centroids (hard index), with soft weights
   ``softmax(-d² / (temperature * m))`` over the K components;
2. the descriptor parts (sizes in ``CompositionConfig.part_sizes``; q = ``appearance_dim``):

   - ``area`` (K): each component's share of the image (soft weights);
   - ``pairs`` (K(K-1)/2): ``sqrt(area_k * area_l)``, large only where both components are
     present (variants that must not be mixed; a Gaussian on the areas cannot see this);
   - ``blobs`` (K): per component, the number of 8-connected blobs of at least ``min_blob``
     cells of its hard mask (:func:`ops.label_components`);
   - ``blob_size`` (2K): per component, its two largest blobs' areas (fractions of the grid);
   - ``grid`` (K·G²): per cell of a G x G grid, each component's share of the cell;
   - ``appearance`` (K·q): per component, the mean of its patches' coordinates along the q main
     directions of that component's own variation on the training set (which variant it is);
   - ``spread`` (K·q): their standard deviation over the component's patches in the image;
   - ``blob_spread`` (K·q): their standard deviation over the component's blobs, each blob's
     mean weighing one (do the parts of one kind share one colour, one finish, one size);

3. ``image_score`` (B,): every descriptor dimension standardised by its training mean and std
   (floored); per covariance group of ``parts``, the squared Mahalanobis distance under the
   group's Ledoit-Wolf covariance of the training descriptors, divided by the group's size; the
   score is the square root of the sum over groups (about sqrt(number of groups) on typical good
   images);
4. ``cell_map`` (B, G, G): per grid cell, ``sqrt(d² / K)`` with d the Mahalanobis distance of
   the cell's K-component histogram to that cell's training histograms (Ledoit-Wolf, variance
   floor one patch): "this cell holds an unusual mix of parts", about 1 on good cells. It
   carries only the where-evidence of the ``grid`` kind; counts, sizes and relations reach only
   the image score;
5. ``placement`` (B, h, w): where the descriptor's distance lies. The squared distance
   ``uᵀPu`` splits over the descriptor's dimensions as ``u_i (P u)_i``; summed per component
   (a ``pairs`` dimension half to each of its two), the positive parts as fractions of d² and
   divided by the component's area (evidence per pixel: the background weighs little) are
   painted on the components' soft weights, summed over the members and divided by the
   image's maximum. A part of an unusual finish is marked on its own pixels; a count change
   shows on every component whose area moved, the complementary background included.
   ``FusionConfig.placement_power`` gates the composition evidence by it.

Typical use::

    model = CompositionModel(CompositionConfig(), feature_dim=D, grid=(h, w))
    model.fit(train_features, (h, w))  # (N, h*w, D) features of the N train/good images
    # (B,), (B, G, G), (B, h, w), and the soft component weights (B, K, h, w)
    image_score, cell_map, placement, weights = model(features, (h, w))

With ``CompositionConfig.fine_parts`` the components are also drawn at stride 4 from two raw
backbone levels (:mod:`engine.models.composition.fine`); with ``CompositionConfig.windows`` the
soft component areas of every window of the grid are compared with the training images' at the
same place (:mod:`engine.models.composition.windows`), one distance per window size. The image
score is then the largest of the distances, each standardised on the validation good images; a
window size takes part only if it tells those images from rearranged copies of them
(``CompositionConfig.window_check``). With ``CompositionConfig.absence_sigma``
the model's ``absence`` map, applied to those component weights, also says
where a part is missing: each component's blurred soft weight against the training images' at
the same place (:mod:`engine.models.composition.absence`), marked in the fused map by
``FusionConfig.absence_weight``.
"""

from engine.models.composition.config import MIN_TRAINING_IMAGES, PARTS, CompositionConfig
from engine.models.composition.model import CompositionModel

__all__ = ["MIN_TRAINING_IMAGES", "PARTS", "CompositionConfig", "CompositionModel"]
