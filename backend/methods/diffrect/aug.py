"""DiffRect's weak and strong perturbations (section 3.1), batched on tensors on the training device.

* weak: random flips (left-right, up-down) and a random rotation, one affine warp per sample; labels are warped
  with the same grid (nearest neighbour), so image and label stay aligned.
* strong: on top of the weak view, random contrast, sharpness and brightness enhancement and a random Gaussian
  blur (photometric only, so the weak view's pseudo label stays aligned with the strong view).

Probabilities and ranges are the published implementation's: flips with p = 0.5 each, a rotation by an angle in
[0, 359) degrees with p = 0.5 (outside pixels filled with the image's minimum, labels with background); each
enhancement with p = 0.5 and factor ``1 + U(0, 0.1)``; blur with p = 0.5 and sigma ``U(0, 1)`` pixels.  The
published code rotates images with nearest-neighbour resampling (PIL's default); bilinear is used here.
Enhancements follow PIL's definitions (a blend ``base + f (x - base)`` with a degenerate image): contrast with the
image mean, brightness with black (here the image minimum, since intensities are z-scored, not in [0, 1]),
sharpness with PIL's 3x3 SMOOTH filter.  The published code applies them in a random order per sample; here one
random order per batch (with factors this close to 1 the order hardly matters).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# PIL's ImageFilter.SMOOTH kernel, the degenerate image of ImageEnhance.Sharpness
_SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0


def weak_grid(batch: int, height: int, width: int, device: torch.device, *, flip_p: float = 0.5,
              rotate_p: float = 0.5, max_angle: float = 359.0) -> torch.Tensor:
    """Sampling grids ``[B, H, W, 2]`` of random flips and rotations (``F.affine_grid``, ``align_corners=False``:
    flips and quarter turns of square images map pixel centres onto pixel centres exactly)."""
    flip_x = torch.where(torch.rand(batch, device=device) < flip_p, -1.0, 1.0)
    flip_y = torch.where(torch.rand(batch, device=device) < flip_p, -1.0, 1.0)
    angle = torch.floor(torch.rand(batch, device=device) * max_angle) * (math.pi / 180.0)
    angle = torch.where(torch.rand(batch, device=device) < rotate_p, angle, torch.zeros_like(angle))
    cos, sin = torch.cos(angle), torch.sin(angle)
    # rotation in pixel units: normalised coords are scaled by (W/2, H/2), so conjugate with that scaling
    aspect = width / height
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0] = cos * flip_x
    theta[:, 0, 1] = -sin / aspect * flip_y
    theta[:, 1, 0] = sin * aspect * flip_x
    theta[:, 1, 1] = cos * flip_y
    return F.affine_grid(theta, [batch, 1, height, width], align_corners=False)


def warp_image(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear warp of ``[B, C, H, W]`` images; pixels from outside take each image's minimum."""
    fill = image.amin(dim=(1, 2, 3), keepdim=True)
    out = F.grid_sample(image - fill, grid.to(image.dtype), mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out + fill


def warp_label(label: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour warp of integer labels ``[B, H, W]`` or ``[B, 1, H, W]``; outside is background (0)."""
    squeeze = label.dim() == 3
    lab = label[:, None] if squeeze else label
    out = F.grid_sample(lab.float(), grid.float(), mode="nearest", padding_mode="zeros", align_corners=False)
    out = out.round().long()
    return out[:, 0] if squeeze else out


def weak_perturb(image: torch.Tensor, label: torch.Tensor | None = None, **kwargs
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random flip + rotation of a batch; ``label`` (for the first ``len(label)`` images) is warped alike."""
    grid = weak_grid(image.shape[0], image.shape[-2], image.shape[-1], image.device, **kwargs)
    warped = warp_image(image, grid)
    if label is None:
        return warped, None
    return warped, warp_label(label, grid[: label.shape[0]])


def _blend(x: torch.Tensor, base: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return base + factor.view(-1, 1, 1, 1) * (x - base)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    channels = x.shape[1]
    kernel = _SMOOTH.to(x.device, x.dtype).expand(channels, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=channels)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample (``sigma = 0``: unchanged), as two grouped convs."""
    b, c, h, w = x.shape
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    s = sigma.float().clamp(min=1e-3).view(-1, 1)
    kernel = torch.exp(-0.5 * (offsets.view(1, -1) / s) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(x.dtype)  # [B, K]
    kernel = kernel.repeat_interleave(c, dim=0)  # [B*C, K]
    flat = F.pad(x.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel.view(b * c, 1, -1, 1), groups=b * c)
    flat = F.conv2d(flat, kernel.view(b * c, 1, 1, -1), groups=b * c)
    return flat.view(b, c, h, w)


def strong_perturb(image: torch.Tensor, *, enhance_p: float = 0.5, enhance_max: float = 0.1,
                   blur_p: float = 0.5, blur_sigma_max: float = 1.0, deterministic: bool = False) -> torch.Tensor:
    """Photometric strong perturbation of a ``[B, C, H, W]`` batch (of weak views).

    ``deterministic``: every enhancement at its largest factor ``1 + enhance_max`` in the order contrast,
    sharpness, brightness, then a blur with ``blur_sigma_max``: the strongest perturbation of training, used for
    the review's "strong" view."""
    b = image.shape[0]
    dev = image.device
    ops = ["contrast", "sharpness", "brightness"]
    if deterministic:
        factors = {op: torch.full((b,), 1.0 + enhance_max, device=dev) for op in ops}
        sigma = torch.full((b,), blur_sigma_max, device=dev)
    else:
        ops = [ops[i] for i in torch.randperm(3).tolist()]
        factors = {}
        for op in ops:
            on = torch.rand(b, device=dev) < enhance_p
            factors[op] = torch.where(on, 1.0 + torch.rand(b, device=dev) * enhance_max, torch.ones(b, device=dev))
        on = torch.rand(b, device=dev) < blur_p
        sigma = torch.where(on, torch.rand(b, device=dev) * blur_sigma_max, torch.zeros(b, device=dev))
    x = image
    for op in ops:
        f = factors[op].to(x.dtype)
        if op == "contrast":
            x = _blend(x, x.mean(dim=(1, 2, 3), keepdim=True), f)
        elif op == "brightness":
            x = _blend(x, x.amin(dim=(1, 2, 3), keepdim=True), f)
        else:
            x = _blend(x, _smooth(x), f)
    radius = max(1, int(math.ceil(3.0 * blur_sigma_max)))
    if blur_sigma_max > 0:  # sigma = 0 samples get a delta kernel: no host sync to skip them
        x = gaussian_blur(x, sigma, radius)
    return x
