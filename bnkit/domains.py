"""Domains inside one stream: images told apart by their own pixel statistics, as a
stream that mixes cameras, weather or corruptions needs (each domain then normalised
with the BN statistics of its own images, as `tta(..., "robust")` does).

Each image is described, per channel, by three scale-free numbers: its mean in units of
the first batch's pixel standard deviation, the log of its variance, and the log of the
energy of its differences between neighbouring pixels (blur lowers it, noise raises
it). An image joins the nearest domain when the mean squared difference of these
numbers is at most `NEW_DOMAIN`, else it starts a new one (up to `MAX_DOMAINS`); each
domain's centre is the mean of its images'. On the corruption benchmark one corruption
stays one domain, or splits where its images differ (frost's textures, contrast on
light and dark digits), and the 15 corruptions mixed fall into about 12.
"""

from __future__ import annotations

import numpy as np

NEW_DOMAIN = 0.5
"""Mean squared feature difference beyond which an image starts a new domain: above the
99th percentile of an image's distance to its own corruption's centre for 13 of the 15
corruptions at severity 5 (frost 0.57, defocus blur 0.50), below most distances
between two corruptions' centres (benchmarks/README.md)."""
MAX_DOMAINS = 16
MIN_IMAGES = 64
"""A domain's own statistics are used once it holds this many images; before, the whole
stream's."""


class Domains:
    """Assigns each image of a stream's batches to a domain."""

    def __init__(self, channels_first: bool) -> None:
        self._channels_first = channels_first
        self._scale: np.ndarray | None = None  # per channel: the first batch's pixel std
        self._centres: list[np.ndarray] = []
        self.counts: list[int] = []
        """images per domain so far."""

    def assign(self, x: np.ndarray) -> np.ndarray | None:
        """Each image's domain index; None when `x` is not a batch of images (N, H, W, C)
        or (N, C, H, W) of at least 2 by 2 pixels: such a stream is one domain."""
        if x.ndim != 4:
            return None
        images = x if self._channels_first else np.moveaxis(x, -1, 1)
        if images.shape[2] < 2 or images.shape[3] < 2:
            return None
        features = self._features(images)
        ids = np.empty(len(features), dtype=int)
        if not self._centres:  # the first image starts the first domain
            self._new(features[0])
        centres = np.array(self._centres)
        distance = ((features[:, None, :] - centres[None]) ** 2).mean(axis=2)
        nearest = distance.argmin(axis=1)
        near = distance[np.arange(len(features)), nearest] <= NEW_DOMAIN
        full = len(self._centres) >= MAX_DOMAINS
        for i in range(len(features)):  # the few images far from every domain, in turn
            if near[i] or full:
                ids[i] = nearest[i]
                continue
            d = ((np.array(self._centres) - features[i]) ** 2).mean(axis=1)
            if d.min() <= NEW_DOMAIN or len(self._centres) >= MAX_DOMAINS:
                ids[i] = int(d.argmin())
            else:
                ids[i] = self._new(features[i])
        for d in np.unique(ids):
            members = features[ids == d]
            self.counts[d] += len(members)
            self._centres[d] = self._centres[d] + (
                (members - self._centres[d]).sum(axis=0) / self.counts[d]
            )
        return ids

    def _new(self, feature: np.ndarray) -> int:
        self._centres.append(feature.copy())
        self.counts.append(0)
        return len(self._centres) - 1

    def _features(self, images: np.ndarray) -> np.ndarray:
        """Per image (N, C, H, W): per channel its scaled mean, log variance and log edge
        energy, reduced over contiguous pixels (channels-last images copied once)."""
        x = np.ascontiguousarray(images, dtype=np.float32)
        n, c = x.shape[:2]
        flat = x.reshape(n, c, -1)
        if self._scale is None:
            self._scale = x.var(axis=(0, 2, 3), dtype=np.float64) + 1e-12
        eps = self._scale * 1e-3  # a flat image's log stays finite
        mean = flat.mean(axis=-1, dtype=np.float64)
        spread = np.log(_variance(flat, mean) + eps)
        edges = np.log(_step_variance(x, 2) + _step_variance(x, 3) + eps)
        return np.concatenate([mean / np.sqrt(self._scale), spread, edges], axis=1)


def _variance(values: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """The variance along the last axis of float32 values whose float64 `mean` is
    known, summed in float64 without a float64 copy of them (a quarter less time than
    NumPy's `var` with a float64 dtype)."""
    centred = values - mean[..., None].astype(np.float32)
    np.square(centred, out=centred)
    return centred.sum(axis=-1, dtype=np.float64) / values.shape[-1]


def _step_variance(x: np.ndarray, axis: int) -> np.ndarray:
    """The variance of the differences between neighbouring pixels along `axis` (2: rows,
    3: columns) of (N, C, H, W) float32 images, per image and channel: the mean square
    of the differences less their squared mean, which telescopes to the last row (or
    column) less the first. In float64 sums; never below 0."""
    steps = np.diff(x, axis=axis)
    count = steps[0, 0].size
    ends = np.take(x, [-1], axis=axis) - np.take(x, [0], axis=axis)
    mean = ends.reshape(len(x), x.shape[1], -1).sum(axis=-1, dtype=np.float64) / count
    np.square(steps, out=steps)
    mean_square = steps.reshape(len(x), x.shape[1], -1).sum(axis=-1, dtype=np.float64) / count
    return np.maximum(mean_square - mean * mean, 0.0)
