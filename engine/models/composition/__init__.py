"""Composition branch (SPEC §3.5, beyond the paper): which parts an image holds, how much of
each, where, and how alike they look — scored against the good training images.

Input: the structural branch's frozen patch features, ``(B, h*w, D)`` in row-major grid order
with their grid ``(h, w)`` (:class:`engine.models.structural.PatchFeatures`), so the branch adds
no backbone pass. Fitted on ``train/good`` only; every fitted value is a buffer.

Pipeline per image:

1. project each patch feature on the top ``pca_dim`` principal directions of training patches;
2. assign it to the nearest of K k-means centroids (hard index) and give it soft weights
   ``softmax(-d² / (temperature * m))`` over the K components;
3. describe the image by the descriptor ``parts`` (``CompositionConfig.part_sizes``):

   - ``area`` (K): each component's share of the image (soft weights);
   - ``blobs`` (K): per component, the number of 8-connected blobs of at least ``min_blob``
     cells of its hard mask (labelled by :func:`ops.label_components`);
   - ``blob_size`` (2K): per component, its two largest blobs' areas (fractions of the grid);
   - ``grid`` (K·G²): per cell of a G x G grid, each component's share of the cell;
   - ``appearance`` (K·q): per component, the mean of its pixels' coordinates along the q main
     directions of that component's own variation on the training set (which variant);
   - ``spread`` (K·q): their standard deviation within the image (do the parts of one kind
     look alike: one colour, one finish, one size);

4. ``image_score``: every descriptor dimension is standardised by its training mean and std;
   per part, the squared Mahalanobis distance under a Ledoit-Wolf covariance of the training
   descriptors, divided by the part's size; the image score is the square root of their sum;
5. ``cell_map`` (B, G, G): per grid cell, the Mahalanobis distance of the cell's K-component
   histogram to that cell's training histograms (Ledoit-Wolf, not standardised): "this cell
   holds an unusual mix of parts". It localises coarsely and carries only the ``grid`` kind of
   evidence; counts, sizes and appearance relations reach only the image score.

Typical use::

    model = CompositionModel(CompositionConfig(), feature_dim=D, grid=(h, w))
    model.fit(train_features, (h, w))  # (N, h*w, D) features of the N train/good images
    image_score, cell_map = model(features, (h, w))  # (B,), (B, G, G)
"""

from engine.models.composition.model import PARTS, CompositionConfig, CompositionModel

__all__ = ["PARTS", "CompositionConfig", "CompositionModel"]
