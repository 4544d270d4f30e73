"""Training-time augmentation on uint8 batches: every geometric change as one OpenCV warp.

Flip, rotation, zoom and translation compose into a single affine map per image, applied once
with bilinear sampling and mirrored borders (`cv2.warpAffine` releases the GIL and takes about
0.2 ms per 224 px image on one core, against about 3.5 ms for the equivalent stack of Keras
preprocessing layers in `tf.data`; on a 2-core machine that CPU time comes straight out of the
training step). One warp also means one interpolation, not one per layer.

The ranges follow the Keras layers of the same names: `RandomFlip("horizontal")`,
`RandomRotation(0.1)` (up to 36 degrees either way), `RandomZoom(0.15)` (up to 15 % in or
out, aspect kept), `RandomTranslation(0.1, 0.1)` and `RandomContrast(0.2)`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

ROTATION = 0.1  # fraction of a full turn
ZOOM = 0.15
TRANSLATION = 0.1  # fraction of the side
CONTRAST = 0.2


def batch_rng(seed: int, epoch: int, step: int) -> np.random.Generator:
    """Random numbers for batch `step` of epoch `epoch`: a pure function of the three, so the
    same run draws the same augmentations on any device and in any thread, and each epoch new ones."""
    return np.random.default_rng([int(seed), int(epoch), int(step)])


def augment_batch(images: np.ndarray, augment: Sequence[str], rng: np.random.Generator) -> np.ndarray:
    """A new uint8 batch `(n, h, w, 3)` with the named augmentations drawn per image."""
    import cv2

    out = np.empty_like(images)
    height, width = images.shape[1:3]
    for i, image in enumerate(images):
        matrix = random_affine(width, height, augment, rng)
        if matrix is None:
            out[i] = image
        else:
            out[i] = cv2.warpAffine(image, matrix[:2], (width, height),
                                    flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                    borderMode=cv2.BORDER_REFLECT_101)
        if "contrast" in augment:
            out[i] = _contrast(out[i], rng.uniform(1 - CONTRAST, 1 + CONTRAST))
    return out


@dataclasses.dataclass(frozen=True)
class AugmentedView:
    """View `index` of every image: the augmentations `augment` drawn from the image's content hash
    and the index alone, so an image's view is the same in every run, epoch and process, and what
    the backbone makes of it can be cached (`tlcore.backbones.features.activation_cache`)."""

    augment: tuple[str, ...]
    index: int

    @property
    def key(self) -> str:
        """The view's name in cache keys: the index and the augmentations, in a fixed order."""
        return f"view{self.index}-" + "-".join(sorted(self.augment))

    def apply(self, images: np.ndarray, shas: Sequence[str]) -> np.ndarray:
        """This view of each uint8 image of `images`, whose contents are `shas`."""
        return np.concatenate([augment_batch(image[None], self.augment,
                                             np.random.default_rng([self.index, int(sha[:16], 16)]))
                               for image, sha in zip(images, shas)])


def random_affine(width: int, height: int, augment: Sequence[str], rng: np.random.Generator) -> np.ndarray | None:
    """The 3x3 map from output to input pixel coordinates, or None when nothing geometric applies."""
    center = np.array([(width - 1) / 2, (height - 1) / 2])
    steps = []  # applied to output coordinates in this order
    if "translate" in augment:
        shift = rng.uniform(-TRANSLATION, TRANSLATION, 2) * (width, height)
        steps.append(_shift(-shift))
    if "zoom" in augment:
        zoom = 1 + rng.uniform(-ZOOM, ZOOM)  # above 1 samples a larger area: zoomed out
        steps.append(_about(center, np.diag([zoom, zoom, 1.0])))
    if "rotate" in augment:
        angle = rng.uniform(-ROTATION, ROTATION) * 2 * np.pi
        cos, sin = np.cos(angle), np.sin(angle)
        steps.append(_about(center, np.array([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1.0]])))
    if "flip" in augment and rng.random() < 0.5:
        steps.append(np.array([[-1.0, 0, width - 1], [0, 1, 0], [0, 0, 1]]))
    if not steps:
        return None
    matrix = np.eye(3)
    for step in steps:
        matrix = step @ matrix
    return matrix


def _shift(offset) -> np.ndarray:
    return np.array([[1.0, 0, offset[0]], [0, 1, offset[1]], [0, 0, 1]])


def _about(center, linear: np.ndarray) -> np.ndarray:
    return _shift(center) @ linear @ _shift(-center)


def _contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Scale each channel's distance from its mean by `factor`, as `keras.layers.RandomContrast`.

    The map is affine in each channel's uint8 value, so it is a 256-entry lookup table per
    channel: `cv2.LUT` applies it without the float copies of the image (about 30x faster at
    224 px) and releases the GIL, so parallel pipeline calls scale with cores.
    """
    import cv2

    mean = np.array(cv2.mean(image)[:3], np.float32)
    values = np.arange(256, dtype=np.float32)[:, None]
    table = np.clip((values - mean) * np.float32(factor) + mean, 0, 255).round().astype(np.uint8)
    return cv2.LUT(image, table.reshape(256, 1, 3))
