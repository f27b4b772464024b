"""Image and video loading, aspect-preserving resize, normalisation and patchify into merge-block order."""

import math
from dataclasses import dataclass
from typing import BinaryIO, Callable

import torch
import torch.nn.functional as F
from PIL import Image


class MediaError(Exception):
    """A sample's image or video is missing or cannot be decoded; the sample is skipped."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def load_image(path: str | BinaryIO) -> Image.Image:
    """Open and fully decode ``path`` (a file name, or a file object such as a tar member's bytes)
    as RGB, raising MediaError(missing_image / corrupt_image)."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError:
        raise MediaError("missing_image", f"image not found: {path}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        name = getattr(path, "name", path)  # file objects name their source (tar shard:member)
        raise MediaError("corrupt_image", f"cannot decode image {name}: {e}") from None


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Height and width, multiples of ``factor``, closest to the input aspect ratio within
    [min_pixels, max_pixels] (the Qwen2-VL rule)."""
    if max(height, width) / min(height, width) > 200:
        raise MediaError("bad_aspect", f"aspect ratio {height}x{width} exceeds 200")
    # a side may round to 0: the min_pixels branch then sizes it, as in HF (a max(factor, .) here
    # would skip that branch and give tiny images another size than HF's)
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return max(factor, h), max(factor, w)


def to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 [3, H, W]."""
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(img.height, img.width, 3).permute(2, 0, 1)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [0, 1]."""
    return to_uint8(img).float() / 255.0


def patchify(frames_TCHW: torch.Tensor, patch: int, temporal_patch: int, merge: int,
             channels_last: bool = False):
    """Cut frames into flattened patches in merge-block order.

    Returns patches [n, C * tp * p * p] (features ordered C, tp, p, p, or tp, p, p, C with
    channels_last as SigLIP2 flattens them) and coords [n, 3] with each patch's (t, h, w) grid
    position. The m x m patches of each merge block are consecutive, ordered
    (t, h_block, w_block, h_in_block, w_in_block), as the Qwen2-VL processor orders them; with
    m = 1 that is plain row-major order, SigLIP2's.
    """
    T, C, H, W = frames_TCHW.shape
    gt, gh, gw = T // temporal_patch, H // patch, W // patch
    x = frames_TCHW.reshape(gt, temporal_patch, C, gh // merge, merge, patch, gw // merge, merge, patch)
    if channels_last:  # gt tp C bh m p bw m p -> gt bh bw m m tp p p C
        x = x.permute(0, 3, 6, 4, 7, 1, 5, 8, 2)
    else:  # gt tp C bh m p bw m p -> gt bh bw m m C tp p p
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
    channels_last: bool = False
    """Flatten each patch as (tp, p, p, C) (SigLIP2) instead of (C, tp, p, p) (Qwen2-VL)."""
    positions_fn: Callable | None = None
    """positions_fn(doc) -> [position_dims, n] position ids of a document (M-RoPE), computed when
    the document is built; None = 0..n-1."""
    position_dims: int = 1
    video_layout: Callable | None = None
    """video_layout(tokenizer, video) -> the token ids of a video's placeholders, when a model lays
    them out other than ``<image_start> <video_pad> * n <image_end>`` (Qwen3-VL: one block per
    temporal patch, each after its timestamp)."""

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_area(self) -> int:
        return self.spatial_merge_size ** 2


class ImageProcessor:
    """PIL image (or video frames) -> (patches [n, D], coords [n, 3]) for one model's
    patch/merge/normalisation."""

    def __init__(self, spec: VisionInputSpec, min_pixels: int, max_pixels: int):
        self.patch_size, self.merge_size = spec.patch_size, spec.spatial_merge_size
        self.temporal_patch_size = spec.temporal_patch_size
        self.channels_last = spec.channels_last
        self.video_layout = spec.video_layout
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.mean = torch.tensor(spec.image_mean).view(3, 1, 1)
        self.std = torch.tensor(spec.image_std).view(3, 1, 1)

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = self._target_size(img.height, img.width)
        if (h, w) != (img.height, img.width):
            img = img.resize((w, h), Image.Resampling.BICUBIC)
        pixels = (to_tensor(img) - self.mean) / self.std
        # a still image fills every frame of a temporal patch
        frames = pixels[None].expand(self.temporal_patch_size, -1, -1, -1)
        return patchify(frames, self.patch_size, self.temporal_patch_size, self.merge_size,
                        self.channels_last)

    def video(self, frames_TCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 frames [T, 3, H, W] -> patches of consecutive frame groups (temporal patches)."""
        T, _, H, W = frames_TCHW.shape
        h, w = self._target_size(H, W)
        if (h, w) != (H, W):
            # antialiased bicubic on uint8: what HF's video processor (torchvision) computes; it
            # differs from PIL's resize of still images by 1 grey level at some pixels
            frames_TCHW = F.interpolate(frames_TCHW, size=(h, w), mode="bicubic", antialias=True,
                                        align_corners=False)
        # an incomplete last temporal patch repeats the last frame
        pad = -T % self.temporal_patch_size
        frames_TCHW = torch.cat([frames_TCHW, frames_TCHW[-1:].expand(pad, -1, -1, -1)])
        pixels = (frames_TCHW.float() / 255.0 - self.mean) / self.std
        return patchify(pixels, self.patch_size, self.temporal_patch_size, self.merge_size,
                        self.channels_last)

    def _target_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.patch_size * self.merge_size, self.min_pixels,
                            self.max_pixels)


@dataclass(frozen=True)
class SquareImageInput:
    """One encoder's input in a multi-encoder model: every image padded to a square with the
    encoder's mean colour and resized to ``image_size`` x ``image_size``, then normalised."""

    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @property
    def numel(self) -> int:
        return 3 * self.image_size ** 2


@dataclass(frozen=True)
class MultiEncoderInputSpec(VisionInputSpec):
    """The data pipeline's view of a model that reads each image through several encoders, each at
    its own fixed square size (Cambrian), and gives the decoder a fixed grid of ``tokens_per_image``
    image tokens per image.

    Each image is one visual item of ``tokens_per_image`` rows of ``patch_dim`` values, one row per
    image token (merge 1), so the packer, image_token_index and the N x L slot layout work as for
    any image. The rows hold the image's encoder inputs: every encoder's normalised
    [3, size, size] image flattened, concatenated in encoder order and zero-padded to fill them
    (``split_encoder_images`` reads them back). A slot of L = k x tokens_per_image rows holds k
    images.
    """

    encoder_inputs: tuple[SquareImageInput, ...] = ()
    grid_hw: tuple[int, int] = (1, 1)
    """(rows, columns) of image tokens per image."""

    @property
    def tokens_per_image(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    @property
    def pixels_per_image(self) -> int:
        return sum(e.numel for e in self.encoder_inputs)

    @property
    def patch_dim(self) -> int:
        return -(-self.pixels_per_image // self.tokens_per_image)


def expand_to_square(img: Image.Image, fill: tuple[float, float, float]) -> Image.Image:
    """``img`` centred on a square canvas of its longer side, filled with ``fill`` (0-1 RGB)."""
    side = max(img.width, img.height)
    if img.width == img.height:
        return img
    canvas = Image.new("RGB", (side, side), tuple(int(c * 255) for c in fill))
    canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return canvas


class MultiEncoderImageProcessor(ImageProcessor):
    """PIL image -> (rows [tokens_per_image, patch_dim], coords [tokens_per_image, 3]) for a
    MultiEncoderInputSpec: each encoder's square image, laid out as that spec describes. Videos
    are refused (skipped and counted)."""

    def __init__(self, spec: MultiEncoderInputSpec, min_pixels: int, max_pixels: int):
        super().__init__(spec, min_pixels, max_pixels)
        self.spec = spec

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        flat = []
        for enc in self.spec.encoder_inputs:
            square = expand_to_square(img, enc.image_mean)
            if square.size != (enc.image_size, enc.image_size):
                square = square.resize((enc.image_size, enc.image_size), Image.Resampling.BICUBIC)
            mean, std = torch.tensor(enc.image_mean).view(3, 1, 1), torch.tensor(enc.image_std).view(3, 1, 1)
            flat.append(((to_tensor(square) - mean) / std).flatten())
        rows, cols = self.spec.grid_hw
        values = torch.zeros(rows * cols * self.spec.patch_dim)
        values[:self.spec.pixels_per_image] = torch.cat(flat)
        h, w = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        coords = torch.stack([torch.zeros_like(h), h, w], dim=-1).reshape(-1, 3)
        return values.view(rows * cols, -1), coords

    def video(self, frames_TCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise MediaError("unsupported_video", "this model's encoders take still images only")


def split_encoder_images(rows_NLD: torch.Tensor, spec: MultiEncoderInputSpec) -> list[torch.Tensor]:
    """The inverse of MultiEncoderImageProcessor on a batch of slots [N, L, D] (L a multiple of
    tokens_per_image): each encoder's images [N * L / tokens_per_image, 3, size, size], image-slot
    major. Shape arithmetic only (no host sync)."""
    flat_ID = rows_NLD.reshape(-1, spec.tokens_per_image * rows_NLD.shape[-1])
    images, start = [], 0
    for enc in spec.encoder_inputs:
        images.append(flat_ID[:, start:start + enc.numel].view(-1, 3, enc.image_size, enc.image_size))
        start += enc.numel
    return images


def build_image_processor(spec: VisionInputSpec, min_pixels: int, max_pixels: int) -> ImageProcessor:
    """The processor a model's input spec asks for."""
    if isinstance(spec, MultiEncoderInputSpec):
        return MultiEncoderImageProcessor(spec, min_pixels, max_pixels)
    return ImageProcessor(spec, min_pixels, max_pixels)
