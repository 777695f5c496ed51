"""The 15 ImageNet-C corruptions (Hendrycks and Dietterich, ICLR 2019) at severities 1-5 on
the embedded digits, from the `imagecorruptions-imaug` package (the maintained fork of the
authors' code), cached like the pretrained model: `glass_blur` costs about 0.12 s per
32x32 image, the others at most a few milliseconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bnkit.errors import BnkitError

CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
    "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
    "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip
SLOW = ("glass_blur", "frost")
"""the two that take more than a few milliseconds per image."""
SEVERITIES = (1, 2, 3, 4, 5)
CACHE_VERSION = 2
"""2: impulse_noise and glass_blur drawn from the seed (version 1 drew them unseeded)."""
SEEDED = ("impulse_noise", "glass_blur")
"""the corruptions that take a `seed` of their own (they ignore NumPy's global one)."""


def corrupt(x: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """`x` (N, H, W, 3) in [0, 1], corrupted: float32 in [0, 1], a function of the images,
    the severity and the seed (the same bytes in any process: `impulse_noise` and
    `glass_blur`, which ignore NumPy's global generator, get a seed per image drawn from
    `seed`).

    Examples:
        >>> x = np.full((2, 32, 32, 3), 0.5, "float32")
        >>> bool(corrupt(x, "gaussian_noise", 5).std() > 0.1)
        True
    """
    if name not in CORRUPTIONS:
        raise BnkitError(f"unknown corruption {name!r}: use one of {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise BnkitError(f"severity must be 1 to 5, got {severity}")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise BnkitError(f"corruptions take (N, H, W, 3) RGB images, got shape {x.shape}")
    from imagecorruptions import corrupt as apply

    state = np.random.get_state()  # the package draws from NumPy's global generator
    np.random.seed(seed)
    try:
        pixels = (np.clip(x, 0.0, 1.0) * 255).round().astype(np.uint8)
        out = [
            np.asarray(
                apply(img, corruption_name=name, severity=severity, **_seeded(name, seed, i))
            )
            for i, img in enumerate(pixels)
        ]
    finally:
        np.random.set_state(state)
    return (np.stack(out).astype(np.float32) / 255.0).reshape(x.shape)


def _seeded(name: str, seed: int, index: int) -> dict[str, int]:
    """The seed argument of the corruptions that take one, for image `index`."""
    if name not in SEEDED:
        return {}
    return {"seed": int(np.random.SeedSequence([seed, index]).generate_state(1)[0])}


def corrupted_digits(
    name: str,
    severity: int = 5,
    *,
    domain: str = "source",
    seed: int = 0,
    cache: Path | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The validation and test images of `digits(domain)` corrupted (`x` (N, 32, 32, 3)
    in [0, 1], `y`), computed once and cached as an `.npz` in bnkit's cache directory."""
    from bnkit.data import digits
    from bnkit.files import atomic_path
    from bnkit.pretrain import cache_dir

    folder = (cache if cache is not None else cache_dir()) / "corruptions"
    path = folder / f"digits-v{CACHE_VERSION}-{domain}-seed{seed}-{name}-{severity}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as f:
            return f["x"], f["y"]
    d = digits(domain, seed=seed)
    x = np.concatenate([d.val[0], d.test[0]])
    y = np.concatenate([d.val[1], d.test[1]])
    xc = corrupt(x, name, severity, seed)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.savez(f, x=xc, y=y)
    return xc, y
