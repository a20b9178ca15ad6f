"""Image augmentation of training batches, on the batch's device (the GPU when training there).

    images = jitter_images(images, brightness=0.2, contrast=0.2, generator=g)   uint8 -> uint8
    pixels = policy.images_to_pixels(images)
    pixels = shift_pixels(pixels, n_cams=2, max_shift=6, generator=g)           either architecture

Photometric jitter works on the uint8 camera frames, before the policy's own preprocessing: it
then means the same for both architectures (VLA: one [-1, 1] encoding; OFT: two per-tower
normalizations of the same image), and its rounding back to uint8 is what a camera with another
exposure would deliver (qvla_ros.sim.perturb's brightness test does the same). The shift works
on the policy's pixels, so `max_shift` is in the policy's pixels whatever the camera size.

Random numbers come from a CPU generator (the training sampler's), so a run and its resume draw
the same sequence on any device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _uniform(n: int, spread: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """n factors uniform in [1 - spread, 1 + spread]."""
    return (1.0 + (torch.rand(n, generator=generator) * 2 - 1) * spread).to(device)


def jitter_images(images: torch.Tensor, brightness: float, contrast: float, generator: torch.Generator
                  ) -> torch.Tensor:
    """uint8 [B, n_cams, H, W, 3] -> the same with every image's contrast scaled about its mean by
    a factor in [1 - contrast, 1 + contrast], then its brightness by one in [1 - brightness,
    1 + brightness] (each camera image its own factors), rounded and clipped to [0, 255].

    Contrast is taken about the image's mean over all pixels and channels (torchvision takes the
    grey mean; for this purpose the same)."""
    if images.dtype != torch.uint8 or images.dim() != 5:
        raise ValueError(f"images must be uint8 [B, n_cams, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    if brightness < 0 or contrast < 0:
        raise ValueError(f"brightness and contrast spreads must be >= 0, got {brightness}, {contrast}")
    if brightness == 0 and contrast == 0:
        return images
    n = images.shape[0] * images.shape[1]
    x = images.reshape(n, -1).float()
    c = _uniform(n, contrast, generator, images.device).unsqueeze(1)
    b = _uniform(n, brightness, generator, images.device).unsqueeze(1)
    mean = x.mean(1, keepdim=True)
    x = ((x - mean) * c + mean) * b
    return x.round_().clamp_(0, 255).to(torch.uint8).reshape(images.shape)


def random_shift(pixels: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translates each image of float [N, C, S, S] by an integer offset in [-max_shift, max_shift]
    (DrQ-style; border pixels repeat). Offsets come from `generator` (CPU) for reproducibility."""
    n, _, s, _ = pixels.shape
    shift = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator).to(pixels.device)
    theta = torch.zeros(n, 2, 3, device=pixels.device, dtype=pixels.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = shift.to(pixels.dtype) * (2.0 / s)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, mode="nearest", padding_mode="border", align_corners=False)


def shift_pixels(pixels: torch.Tensor, batch: int, n_cams: int, max_shift: int, generator: torch.Generator
                 ) -> torch.Tensor:
    """random_shift of each camera image in a policy's pixel batch, whichever layout it has:
    VLA [B * n_cams, 3, S, S] or OFT [B, 6 * n_cams, S, S] (each image's 6 channels together, so
    both towers see the same shift)."""
    if not max_shift:
        return pixels
    s = pixels.shape[-1]
    per_image = pixels.reshape(batch * n_cams, -1, s, s)
    return random_shift(per_image, max_shift, generator).reshape(pixels.shape)
