"""Strong photometric augmentation for a second view (MACRL's strong branch), PIL only.

The MoCo v2 / BYOL recipe, every draw from the sample's generator (reproducible like crops and
masks): colour jitter (brightness, contrast, saturation 0.4, hue 0.1, in random order) with
p = 0.8, grayscale with p = 0.2, Gaussian blur with p = 0.5 and sigma uniform in [0.1, 2.0] px
for 224 px images, scaled with the image size (BYOL sizes the kernel at 10% of the image).

All random numbers are drawn whatever the image mode, so a grayscale and an RGB version of a
dataset see the same sequence of choices (saturation, hue and grayscale are no-ops on "L").
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.4, 0.4, 0.4, 0.1
P_JITTER, P_GRAY, P_BLUR = 0.8, 0.2, 0.5
BLUR_SIGMA_224 = (0.1, 2.0)


def adjust_hue(img: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue by `shift` of a full turn (in [-0.5, 0.5]); RGB only."""
    if img.mode != "RGB" or shift == 0:
        return img
    hsv = np.array(img.convert("HSV"))  # [H, W, 3] uint8, hue in 0..255
    hsv[..., 0] = (hsv[..., 0].astype(np.int16) + round(shift * 255)) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def color_jitter(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """torchvision's ColorJitter(0.4, 0.4, 0.4, 0.1): factors uniform around 1, random order."""
    factors = [rng.uniform(1 - BRIGHTNESS, 1 + BRIGHTNESS),
               rng.uniform(1 - CONTRAST, 1 + CONTRAST),
               rng.uniform(1 - SATURATION, 1 + SATURATION),
               rng.uniform(-HUE, HUE)]
    for op in rng.permutation(4):
        f = factors[op]
        if op == 0:
            img = ImageEnhance.Brightness(img).enhance(f)
        elif op == 1:
            img = ImageEnhance.Contrast(img).enhance(f)  # blends with the mean grey level
        elif op == 2 and img.mode == "RGB":
            img = ImageEnhance.Color(img).enhance(f)
        elif op == 3:
            img = adjust_hue(img, f)
    return img


def strong_augment(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Colour jitter (p 0.8), grayscale (p 0.2), Gaussian blur (p 0.5) of an "L"/"RGB" image
    that is already cropped and resized; returns an image of the same size and mode."""
    if rng.random() < P_JITTER:
        img = color_jitter(img, rng)
    if rng.random() < P_GRAY and img.mode == "RGB":
        img = img.convert("L").convert("RGB")
    if rng.random() < P_BLUR:
        scale = max(img.size) / 224
        sigma = rng.uniform(*BLUR_SIGMA_224) * scale
        img = img.filter(ImageFilter.GaussianBlur(radius=sigma))
    return img


class RandAugment:
    """timm's RandAugment for a config string such as "rand-m9-mstd0.5-inc1" (MAE's fine-tuning
    recipe), made reproducible: timm draws from Python's and numpy's global generators, which
    are seeded from the sample's generator before each image. Grayscale images are augmented as
    RGB and converted back (timm's fill colours are RGB)."""

    def __init__(self, config_str: str, img_size: int, mean: Sequence[float]) -> None:
        from PIL.Image import Resampling
        from timm.data.auto_augment import rand_augment_transform

        rgb_mean = list(mean) * 3 if len(mean) == 1 else list(mean)
        hparams = {"translate_const": int(img_size * 0.45),  # timm's create_transform values
                   "img_mean": tuple(min(255, round(255 * m)) for m in rgb_mean),
                   "interpolation": Resampling.BICUBIC}
        self.config_str = config_str
        self.transform = rand_augment_transform(config_str, hparams)
        for op in self.transform.ops:
            if op.name.startswith("Posterize"):
                op.aug_fn = posterize_at_least_1_bit

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        seed = int(rng.integers(2**32))
        random.seed(seed)
        np.random.seed(seed)
        if img.mode == "L":
            return self.transform(img.convert("RGB")).convert("L")
        return self.transform(img)


def posterize_at_least_1_bit(img: Image.Image, bits: int, **_: object) -> Image.Image:
    """timm's posterize for Pillow >= 10: at the top magnitudes timm asks for 0 bits, which
    old Pillow turned into a black image and Pillow 10+ refuses; 1 bit is the nearest."""
    return img if bits >= 8 else ImageOps.posterize(img, max(1, int(bits)))
