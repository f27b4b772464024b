"""Image loading, aspect-preserving resize, normalisation and patchify into merge-block order."""

import math
from dataclasses import dataclass

import torch
from PIL import Image


class MediaError(Exception):
    """A sample's image or video is missing or cannot be decoded; the sample is skipped."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def load_image(path: str) -> Image.Image:
    """Open and fully decode ``path`` as RGB, raising MediaError(missing_image / corrupt_image)."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError:
        raise MediaError("missing_image", f"image not found: {path}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise MediaError("corrupt_image", f"cannot decode image {path}: {e}") from None


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Height and width, multiples of ``factor``, closest to the input aspect ratio within
    [min_pixels, max_pixels] (the Qwen2-VL rule)."""
    if max(height, width) / min(height, width) > 200:
        raise MediaError("bad_aspect", f"aspect ratio {height}x{width} exceeds 200")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [0, 1]."""
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(img.height, img.width, 3).permute(2, 0, 1).float() / 255.0


def patchify(frames_TCHW: torch.Tensor, patch: int, temporal_patch: int, merge: int):
    """Cut frames into flattened patches in merge-block order.

    Returns patches [n, C * tp * p * p] (features ordered C, tp, p, p) and coords [n, 3] with each
    patch's (t, h, w) grid position. The m x m patches of each merge block are consecutive, ordered
    (t, h_block, w_block, h_in_block, w_in_block), as the Qwen2-VL processor orders them.
    """
    T, C, H, W = frames_TCHW.shape
    gt, gh, gw = T // temporal_patch, H // patch, W // patch
    x = frames_TCHW.reshape(gt, temporal_patch, C, gh // merge, merge, patch, gw // merge, merge, patch)
    # gt tp C bh m p bw m p -> gt bh bw m m C tp p p
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    patches = x.reshape(gt * gh * gw, C * temporal_patch * patch * patch)
    t, h, w = torch.meshgrid(torch.arange(gt), torch.arange(gh), torch.arange(gw), indexing="ij")
    coords = torch.stack([t, h, w], dim=-1)  # gt gh gw 3
    coords = coords.reshape(gt, gh // merge, merge, gw // merge, merge, 3).permute(0, 1, 3, 2, 4, 5)
    return patches, coords.reshape(-1, 3)


@dataclass(frozen=True)
class VisionInputSpec:
    """What the data pipeline must know of a model's vision encoder."""

    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    in_channels: int = 3

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_area(self) -> int:
        return self.spatial_merge_size ** 2


class ImageProcessor:
    """PIL image -> (patches [n, D], coords [n, 3]) for one model's patch/merge/normalisation."""

    def __init__(self, spec: VisionInputSpec, min_pixels: int, max_pixels: int):
        self.patch_size, self.merge_size = spec.patch_size, spec.spatial_merge_size
        self.temporal_patch_size = spec.temporal_patch_size
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.mean = torch.tensor(spec.image_mean).view(3, 1, 1)
        self.std = torch.tensor(spec.image_std).view(3, 1, 1)

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = smart_resize(img.height, img.width, self.patch_size * self.merge_size,
                            self.min_pixels, self.max_pixels)
        if (h, w) != (img.height, img.width):
            img = img.resize((w, h), Image.Resampling.BICUBIC)
        pixels = (to_tensor(img) - self.mean) / self.std
        # a still image fills every frame of a temporal patch
        frames = pixels[None].expand(self.temporal_patch_size, -1, -1, -1)
        return patchify(frames, self.patch_size, self.temporal_patch_size, self.merge_size)
