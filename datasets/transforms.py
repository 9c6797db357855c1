"""Per-sample CLIP preprocessing without the normalisation (that happens inside the model).

Matches open_clip's eval transform (and so the anchor suite): resize the shortest side to the model's
input size with its interpolation (bicubic for CLIP; CIFAR's 32x32 become 224x224), centre crop,
to a [0, 1] tensor. Applied per image inside the DataLoader, so no up-sampled data set is held in memory.
"""
import numpy as np
from PIL import Image
from torchvision import transforms as T

# Pillow's convert("RGB") clips these at 255 (a 16-bit image would come out almost white).
_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

_INTERPOLATION = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
                  "nearest": T.InterpolationMode.NEAREST}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (L, RGBA, P, CMYK, ...) to RGB, alpha dropped as open_clip's ``_convert_to_rgb`` does;
    16-bit images are first scaled to 8 bits (x / 257, rounded)."""
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")


def clip_image_transform(image_size: int, interpolation: str = "bicubic") -> T.Compose:
    return T.Compose([
        T.Lambda(to_rgb),
        T.Resize(image_size, interpolation=_INTERPOLATION[interpolation]),
        T.CenterCrop(image_size),
        T.ToTensor(),
    ])
