"""DiffRect: Latent Diffusion Label Rectification for semi-supervised segmentation (Liu et al., MICCAI 2024).

A 2D segmentation U-Net trained FixMatch-style, plus a rectification model (``backend.nets.diffrect_model``) that
learns, in the latent space of coloured label maps, how coarse pseudo labels turn into finer ones and then into
ground truth, and hands the segmentation net rectified pseudo labels.  One training step (:meth:`train_step`):

1. Perturbations (``backend.nets.diffrect_aug``), batched on the device: weak = random flip + rotation of every
   slice (labels warped alike); strong = random contrast / sharpness / brightness / blur of the unlabeled weak
   views.
2. Segmentation net on ``[weak labeled, weak unlabeled, strong unlabeled]`` in one forward pass.  Hard pseudo
   labels of every view by the published confidence rule (:func:`confident_labels`: a class passes where
   ``(p - p_min) / p_max > conf_thresh``; pixels where none passes become background and stay in the losses).
   ``L_sup^Seg = CE + Dice`` on labeled slices; ``L_semi^Seg = CE + Dice`` of the strong view against the weak
   view's pseudo label (FixMatch [27]).
3. LCC (eq. 4-6): hard labels are coloured (SCS) and embedded by B_sem with the calibration guidance
   ``tau_u = Dice(y_s, y_w)`` (unlabeled) and ``tau_l = Dice(y_w, y_l)`` (labeled).  S2W labels are embedded with
   the strong view's image features, W2G labels with the weak view's (as published).
4. LFR (eq. 7-11): the target latent (``z_w`` of unlabeled slices, ``z_l`` of labeled ones) is diffused to a random
   t (cosine schedule, x0 prediction) and denoised conditioned on the coarser latent (``z_s`` resp. ``z_w``):
   strong-to-weak (S2W, ``L_Lat-U``) and weak-to-ground-truth (W2G, ``L_Lat-L``) transports.
5. Rectification (eq. 12, 14): from step ``rect_start`` on, the rectified pseudo label ``y_r`` of each unlabeled
   slice is sampled (DDIM from noise, conditioned on ``z_w``, every x0 prediction clamped to [-1, 1]), decoded and
   put through the confidence rule; ``L_Rect = CE + Dice`` of the segmentation net's weak prediction against it.
6. The total loss of eq. 13 (plus the decoder's supervision): the segmentation part is back-propagated before
   the rectification graph is built (they share no parameter: the same gradients as one backward of the sum, at a
   lower peak memory), then one SGD step over both networks.

Inference (:meth:`predict`, validation, benchmarks, export) is the segmentation net on the unperturbed slice, the
paper's and the published code's inference path, at no extra cost; the rectification model serves training and
the review views only.

Where the paper is silent the published implementation's choices are used (named config values):
T = 10 steps, x0 prediction, 2 DDIM steps for rectification with x0 predictions clamped to [-1, 1]
(``latent_clamp``), rectification from step 1000, SGD lr 0.01, momentum 0.9, weight decay 1e-4, poly decay, 30k
steps, batch 3 + 3, 256 x 256 slices, consistency weight 0.1 with a sigmoid ramp-up over the whole run, the
confidence rule above with threshold 0.8 (``conf_rule="official"``; ``"fixmatch"`` = arg-max and unconfident
pixels left out of the losses), lambda_1 = the consistency weight, lambda_2 = 1, the SSL4MIS U-Net's dropout
(0.05 / 0.1 / 0.2 / 0.3 / 0.5 on the encoder's five levels, none in the decoder; ``seg_dropout``), an image encoder
whose multi-scale features are added to B_sem's stages, and the decoder ("Upsample" of eq. 12, a U-Net decoder on
B_sem's skips) trained with CE + Dice on the labeled ground truth (W2G) and on the weak pseudo labels (S2W,
consistency-weighted).  ``train --steps`` rescales ``consistency_rampup`` and ``rect_start`` with the run length
(:attr:`DiffRectConfig.run_length_fields`).

Every remaining difference from the published code (``train_diffrect_ACDC.py``, ``networks/unet_de.py``) or the
paper, and why:

* Optimisation: the rectification loss is part of the one total loss of eq. 13, one SGD step over both networks.
  The published code steps the segmentation net twice per iteration (``L_sup + w L_semi``, then ``L_Rect`` after a
  third forward pass with the updated weights) and the rectification model with its own optimizer, whose learning
  rate it never decays (0.01 throughout); here the poly decay applies to both.  Why: eq. 13 is one loss, and one
  step spares the extra forward pass; the rectification pass reuses the step's weights instead of the just-updated
  ones for the same reason.
* Transports: W2G runs on labeled slices and S2W on unlabeled ones, as eq. 5-11 define them.  The published code
  runs both on the whole batch (W2G on unlabeled slices with the weak label as its own target, S2W on labeled
  slices too).  Why: the paper's equations; half the rectification batch.
* The decoder's S2W target is the segmentation net's weak pseudo label, and ``tau_u = Dice(y_s, y_w)`` compares
  with it (eq. 6).  The published code uses the rectification model's W2G output on the unlabeled slice (after the
  confidence rule) for both, and names the segmentation net's label as the alternative.  Why: W2G is not run on
  unlabeled slices here (above), and eq. 6 names y_w.
* tau is each slice's Dice (eq. 6); the published code embeds the Dice *loss* (1 - Dice) of the whole batch.
  Why: eq. 6.  At review time (no ground truth) rectification is guided by the running mean of tau_l
  (``tau_ema_decay``); the published code has no such use.
* The complementary-label loss of the published FixMatch baseline (``get_comp_loss``) is not used: it is in
  neither paper.  The segmentation net sees the strong view of unlabeled slices only (labeled strong views feed
  only that loss in the published code).
* Perturbations run batched on the device instead of in PIL data-loader workers: rotation is bilinear (PIL:
  nearest), the three enhancements run in one random order per batch (published: per sample), brightness blends
  with the image minimum (intensities are z-scored, not in [0, 1]); see ``backend.nets.diffrect_aug``.
* The consistency ramp-up is the continuous ``sigmoid_rampup(step, consistency_rampup)``; the published
  ``sigmoid_rampup(iter // 150, 200)`` is the same curve as a 150-step staircase.  Why: it rescales with
  ``--steps``.  Rectification starts at step ``rect_start`` (published: after it, one step later).
* The colouring of eq. 4 uses maximally separated colours for any number of classes (published: fixed colours for
  2-4 classes, black plus primaries, a smallest distance of 1 for 4 classes where sqrt(2) is possible).  Why: the
  paper asks for colours as far apart as possible.
* The denoiser fuses the noisy latent and the condition with a 1x1 conv and ends on a 1x1 conv (published: the
  condition is added to the first skip, the output is BN + LeakyReLU); why: conditioning by concatenation,
  section 3.1, and an unbounded x0 output.  The image encoder takes no tau (published: the tau embedding is added
  in it too), so one pass serves every label map of a slice (speed).  BatchNorm of the image encoder sees the
  strong unlabeled, weak labeled and weak unlabeled slices in one batch (published: separate passes).
* The latent clamp to [-1, 1] at sampling is kept as published although B_sem's latents are not bounded (about
  13% of the entries of z_w exceed 1 in magnitude after 150 tiny-preset steps); ``latent_clamp=None`` turns it off.
* The segmentation net is MONAI's ``BasicUNet`` with the SSL4MIS levels, channels and dropout; its output conv is
  1x1 (SSL4MIS: 3x3).  Dropout keeps ``p`` to a multiple of 1/65536 (``backend.nets.diffrect_dropout``).
* Validation and checkpoints are the engine's (``val_every``; the published script validates every 200 steps and
  keeps the best).

Finding (README): at small budgets the rectified view is close to the weak view and does not depend on the
sampled latent.  The decoder sees the conditioning label's B_sem skips, which carry the image encoder's features
and the weak label, and learns to segment from them alone.  Tiny preset, 150 steps on 12 real slices, a held-out
slab of 8: decoding a zero latent, N(0, 1) noise or the latent of an all-background label instead of the sampled
latent changes 0.01-0.03% of the pixels (10x that noise: 0.2%; the logits move by 0.05% for a zero latent),
while replacing the skips by those of an all-background label moves the logits by 11% (held-out Dice 0.903 ->
0.882) and zero skips leave Dice 0.30 whatever the latent.  The published architecture has the same skips.

Speed (CPU): both networks run channels-last (oneDNN NHWC), dropout draws 16 random bits per element instead of a
Bernoulli variate (``backend.nets.diffrect_dropout``), inference uses copies with BatchNorm folded into the
convolutions, and MONAI's U-Net skips its (here always empty) odd-size padding.

Review views (:meth:`pseudo_labels`): ``weak`` = the segmentation net on the unperturbed slice (the paper's
inference output, what :meth:`predict` returns), ``strong`` = the segmentation net on a deterministic strong
perturbation of the slice (every enhancement at its largest training factor, then the largest training blur),
``rectified`` = the LFR output conditioned on the weak prediction, with the running mean of tau_l as guidance and
seeded noise (reproducible).  ``config.predict_view`` can make :meth:`predict` return another view.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from backend.methods.base import BaseConfig, Method
from backend.methods.rampups import sigmoid_rampup
from backend.nets.diffrect_aug import strong_perturb, warp_image, warp_label, weak_grid
from backend.nets.diffrect_dropout import ssl4mis_dropout
from backend.nets.diffrect_fuse import fused_for_inference
from backend.nets.diffrect_lcc import GUIDANCE_CHOICES, calibration_guidance
from backend.nets.diffrect_lfr import latent_loss
from backend.nets.diffusion import ddim_timesteps
from backend.nets.diffrect_model import Rectifier
from backend.nets.diffusion import make_schedulers, q_sample, sample_timesteps
from backend.nets.unet2d import UNET2D_FEATURES, unet2d


def _labels(maps: torch.Tensor) -> np.ndarray:
    """A ``[1, Z, Y, X]`` map of hard labels (see ``_predictor``) as uint8 ``[Z, Y, X]``."""
    return maps[0].round().to(torch.uint8).cpu().numpy()


LATENT_FACTOR = 64  # B_sem down-samples 16x and the denoiser 4x more: slices are padded to a multiple of 64


CONF_RULES = ("official", "fixmatch")


def confident_labels(prob: torch.Tensor, thresh: float, rule: str = "official"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard pseudo labels ``[B, H, W]`` of class probabilities ``[B, K, H, W]`` and where they are confident.

    ``official`` (the published code): a class passes where ``(p_k - min_j p_j) / max_j p_j > thresh``; the label
    is the most probable passing class, and background (0) where no class passes; such pixels stay in the
    losses (as background).  ``fixmatch``: the label is the arg-max, confident where ``max_k p_k >= thresh``;
    the losses leave unconfident pixels out (FixMatch [27])."""
    if rule == "official":
        low, high = prob.amin(1, keepdim=True), prob.amax(1, keepdim=True)
        passing = (prob - low) / high > thresh
        return (prob * passing).argmax(1), passing.any(1)
    if rule == "fixmatch":
        conf, labels = prob.max(1)
        return labels, conf >= thresh
    raise ValueError(f"unknown confidence rule '{rule}' (choices: {', '.join(CONF_RULES)})")


def pad_to_multiple(x: torch.Tensor, k: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad ``[B, C, H, W]`` (centred, as MONAI's ``DivisiblePad``) so H and W divide by ``k``; returns the
    padded batch and the (y, x) offset of the original inside it."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % k, (-w) % k
    if ph == 0 and pw == 0:
        return x, (0, 0)
    top, left = ph // 2, pw // 2
    return F.pad(x, (left, pw - left, top, ph - top)), (top, left)


@dataclasses.dataclass
class DiffRectConfig(BaseConfig):
    """DiffRect's defaults: the paper's ACDC setting, and the published code where the paper is silent."""

    patch_size: tuple[int, ...] = (256, 256)
    batch_labeled: int = 3
    batch_unlabeled: int = 3
    max_steps: int = 30000
    sw_batch_size: int = 4  # 16 slices per inference batch
    # segmentation U-Net (backend.nets.unet2d)
    seg_features: tuple[int, ...] = UNET2D_FEATURES
    seg_dropout: tuple[float, ...] | float = (0.05, 0.1, 0.2, 0.3, 0.5)  # per encoder level, none in the decoder
    # semi-supervised segmentation losses (FixMatch, eq. 13's L_Semi^Seg)
    conf_thresh: float = 0.8
    conf_rule: str = "official"  # official | fixmatch (see confident_labels)
    consistency: float = 0.1
    consistency_rampup: float = 30000.0  # published: sigmoid_rampup(step // 150, 200), i.e. over 30k steps
    # weak perturbation
    weak_flip_p: float = 0.5
    weak_rotate_p: float = 0.5
    weak_max_angle: float = 359.0
    # strong perturbation
    strong_enhance_p: float = 0.5
    strong_enhance_max: float = 0.1
    strong_blur_p: float = 0.5
    strong_blur_sigma_max: float = 1.0
    # LCC: B_sem and the image encoder (4 stages + latent), calibration guidance
    bsem_channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    bsem_dropout: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)
    emb_dim: int = 128  # sinusoidal embedding width (tau and t)
    emb_hidden: int = 512  # width of the embedding MLP's output
    guidance: str = "dice"  # dice | jaccard | both | fixed | random | none (Tables 4-5)
    guidance_scale: float = 999.0  # tau in [0, 1] is embedded as a timestep tau * 999 (published)
    tau_ema_decay: float = 0.99  # running mean of tau_l, the guidance of rectification at review time
    # LFR: latent DDPM and denoiser
    diffusion_steps: int = 10
    schedule: str = "cosine"
    sample_steps: int = 2
    sample_eta: float = 0.0  # 0: deterministic DDIM (published); 1: stochastic DDPM-like steps (eq. 12)
    latent_clamp: float | None = 1.0  # x0 predictions clamped to [-1, 1] while sampling (published); None: off
    denoiser_channels: tuple[int, ...] = (384, 512)
    # loss weights (eq. 13)
    lambda_lat_u: float = 1.0  # lambda_1, times the consistency weight (published)
    lambda_lat_l: float = 1.0  # lambda_2
    lambda_rect: float = 1.0
    lambda_decoder: float = 1.0  # the decoder's CE + Dice (W2G: ground truth; S2W: weak labels, x consistency)
    rect_start: int = 1000
    predict_view: str = "weak"  # weak | strong | rectified: the segmentation net (weak) is the paper's output

    # schedules counted in steps that belong to the run length: rescaled by ``with_steps`` (``train --steps``)
    run_length_fields: ClassVar[tuple[str, ...]] = ("consistency_rampup", "rect_start")


class DiffRect(Method):
    """DiffRect (2D): FixMatch segmentation U-Net + LCC + LFR label rectification."""

    name = "diffrect"
    dims = 2
    config_class = DiffRectConfig
    views = ("weak", "strong", "rectified")
    primary_view = "weak"
    presets = {
        # tests: seconds on 2 CPU cores; rectification from step 10
        "tiny": dict(patch_size=(64, 64), batch_labeled=2, batch_unlabeled=2, max_steps=200,
                     seg_features=(8, 16, 16, 32, 32, 8), seg_dropout=0.0,
                     bsem_channels=(8, 8, 16, 16, 32), bsem_dropout=(0.0, 0.0, 0.0, 0.0, 0.0),
                     denoiser_channels=(48, 64), emb_dim=32, emb_hidden=64, rect_start=10,
                     consistency_rampup=100.0, checkpoint_every=50, val_every=100),
        # a CPU demo in minutes: 128 x 128, half-width networks
        "quick": dict(patch_size=(128, 128), batch_labeled=3, batch_unlabeled=3, max_steps=1000,
                      seg_features=(8, 16, 32, 64, 128, 8), bsem_channels=(8, 16, 32, 64, 128),
                      denoiser_channels=(192, 256), emb_dim=64, emb_hidden=256, rect_start=200,
                      consistency_rampup=1000.0, checkpoint_every=200, val_every=250),
        # the paper's ACDC setting (num_classes is set from the project by the engine)
        "acdc": dict(num_classes=4, patch_size=(256, 256), batch_labeled=3, batch_unlabeled=3, max_steps=30000,
                     lr=0.01, rect_start=1000, consistency_rampup=30000.0, checkpoint_every=1000,
                     val_every=1000, hold_out_from=None),
    }

    def __init__(self, config: DiffRectConfig, device: torch.device | str = "cpu"):
        super().__init__(config, device)
        from monai.losses import DiceLoss

        c = config
        if c.guidance not in GUIDANCE_CHOICES:
            raise ValueError(f"guidance must be one of {GUIDANCE_CHOICES} (got '{c.guidance}')")
        if any(int(p) % LATENT_FACTOR for p in c.patch_size):
            raise ValueError(f"DiffRect's patch size must divide by {LATENT_FACTOR} (got {tuple(c.patch_size)})")
        if c.conf_rule not in CONF_RULES:
            raise ValueError(f"conf_rule must be one of {CONF_RULES} (got '{c.conf_rule}')")
        if c.predict_view not in self.views:
            raise ValueError(f"predict_view must be one of {self.views} (got '{c.predict_view}')")
        seg = ssl4mis_dropout(unet2d(c.in_channels, c.num_classes, features=tuple(c.seg_features), dropout=0.0),
                              c.seg_dropout)
        for module in seg.modules():  # slices are multiples of 64: MONAI's odd-size padding would only copy
            if hasattr(module, "is_pad"):
                module.is_pad = False
        self.seg = self._place(seg)
        self.rect = self._place(Rectifier(
            c.num_classes, c.in_channels, bsem_channels=tuple(c.bsem_channels), bsem_dropout=tuple(c.bsem_dropout),
            denoiser_channels=tuple(c.denoiser_channels), emb_dim=c.emb_dim, emb_hidden=c.emb_hidden,
            guidance_scale=c.guidance_scale, use_guidance=c.guidance != "none"))
        # one SGD over both networks: the same update as the published two optimizers with equal settings
        params = list(self.seg.parameters()) + list(self.rect.parameters())
        self.optimizer = torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                                         nesterov=c.nesterov)
        # precomputed once: the schedule (eq. 1 / 7) on the device and the reverse-process timesteps
        self.ddpm, _ = make_schedulers(c.diffusion_steps, c.schedule)
        self.ddpm.alphas_cumprod = self.ddpm.alphas_cumprod.to(self.device)
        self.alphas_cumprod = self.ddpm.alphas_cumprod
        self.timesteps = ddim_timesteps(c.diffusion_steps, c.sample_steps)
        self._fused: tuple[torch.nn.Module, Rectifier] | None = None  # see _inference_nets
        # V-Net Dice over the whole batch, background included (the published DiceLoss)
        self.dice = DiceLoss(include_background=True, squared_pred=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)

    def _place(self, module: torch.nn.Module) -> torch.nn.Module:
        """:meth:`to_device`, and channels-last on CPU too: oneDNN's NHWC convolutions, batch norm and pooling
        run 1.2-1.7x faster than NCHW on CPU (measured: a 10-slice 256 x 256 U-Net pass 1.55 s -> 0.89 s)."""
        module = self.to_device(module)
        if self.device.type == "cpu" and self.config.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    # ---- contract ------------------------------------------------------------------------------------------
    def modules(self) -> dict[str, torch.nn.Module]:
        return {"seg": self.seg, "rect": self.rect}

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    # ---- losses --------------------------------------------------------------------------------------------
    def ce_dice(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``CE + Dice`` of logits ``[B, K, H, W]`` against hard labels ``[B, H, W]``; with ``mask`` (bool
        ``[B, H, W]``), masked-out pixels add nothing (CE averaged over all pixels, as FixMatch)."""
        logits = logits.float()
        ce = F.cross_entropy(logits, target, reduction="none")
        prob = torch.softmax(logits, dim=1)
        onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(prob.dtype)
        if mask is not None:
            m = mask.to(prob.dtype)
            ce = ce * m
            prob = prob * m[:, None]
            onehot = onehot * m[:, None]
        return ce.mean() + self.dice(prob, onehot)

    def _loss_mask(self, confident: torch.Tensor) -> torch.Tensor | None:
        """The pixels a pseudo-label loss counts: the confident ones (``fixmatch``), or all (``official``: the
        unconfident ones are background there)."""
        return confident if self.config.conf_rule == "fixmatch" else None

    def consistency_weight(self, step: int) -> float:
        c = self.config
        return c.consistency * sigmoid_rampup(step, c.consistency_rampup)

    # ---- training ------------------------------------------------------------------------------------------
    def train_step(self, labeled: dict[str, torch.Tensor], unlabeled: dict[str, torch.Tensor],
                   step: int) -> dict[str, float]:
        """One step of eq. 13.  The total loss splits into a part of the segmentation net (``L_Sup + w L_Semi +
        L_Rect``) and a part of the rectification model (``lambda_1 w L_Lat-U + lambda_2 L_Lat-L`` + decoder
        supervision) that share no parameter, so each is back-propagated as soon as it is complete (the
        segmentation graph is freed before the rectification graph is built: lower peak memory) and one SGD
        step follows: the same update as one backward of the sum."""
        c = self.config
        self.train()
        self._fused = None  # the inference copies go stale with this step
        x_l = labeled["image"].to(self.device, torch.float32)
        y_l = labeled["label"].to(self.device)
        y_l = (y_l[:, 0] if y_l.dim() == 4 else y_l).long()
        x_u = unlabeled["image"].to(self.device, torch.float32)
        bl, bu = x_l.shape[0], x_u.shape[0]
        h, w = x_l.shape[-2:]
        rectify = step >= c.rect_start

        # 1. perturbations: one weak warp for all slices (labels alike), strong photometric on unlabeled weak
        with torch.no_grad():
            grid = weak_grid(bl + bu, h, w, self.device, flip_p=c.weak_flip_p, rotate_p=c.weak_rotate_p,
                             max_angle=c.weak_max_angle)
            xw = warp_image(torch.cat([x_l, x_u]), grid)
            y_l = warp_label(y_l, grid[:bl])
            xw_l, xw_u = xw[:bl], xw[bl:]
            xs_u = strong_perturb(xw_u, enhance_p=c.strong_enhance_p, enhance_max=c.strong_enhance_max,
                                  blur_p=c.strong_blur_p, blur_sigma_max=c.strong_blur_sigma_max)

        self.optimizer.zero_grad(set_to_none=True)
        # 2. segmentation net, weak and strong views in one pass; L_Sup and L_Semi (FixMatch)
        with self.autocast():
            logits = self.seg(torch.cat([xw_l, xw_u, xs_u])).float()
        lw_l, lw_u, ls_u = logits.split([bl, bu, bu])
        w_cons = self.consistency_weight(step)
        loss_sup = self.ce_dice(lw_l, y_l)
        with torch.no_grad():  # hard pseudo labels of every view by the confidence rule (published: all of them)
            labels, confident = confident_labels(torch.softmax(logits, dim=1), c.conf_thresh, c.conf_rule)
            yw_l, yw_u, ys_u = labels.split([bl, bu, bu])
            confident_u = confident[bl:bl + bu]
            mask_u = self._loss_mask(confident_u)
        loss_semi = self.ce_dice(ls_u, yw_u, mask_u)

        # 3. LCC inputs.  Samples are ordered [unlabeled, labeled]: conditions [y_s, y_w], targets [y_w, y_l],
        #    so the S2W (unlabeled) and W2G (labeled) transports share every pass.  S2W encodes its labels with
        #    the strong view, W2G with the weak view, rectification with the unlabeled weak view (published).
        rect = self.rect
        n = bu + bl
        with torch.no_grad():
            tau_u = calibration_guidance(ys_u, yw_u, c.num_classes, c.guidance)  # eq. 6
            tau_l = calibration_guidance(yw_l, y_l, c.num_classes, c.guidance)
            rect.update_tau_ema(tau_l, c.tau_ema_decay)
            tau = torch.cat([tau_u, tau_l])
            images = torch.cat([xs_u, xw_l])
            all_images = torch.cat([images, xw_u]) if rectify else images
        with self.autocast():
            all_feats = rect.image_encoder(all_images)  # one pass serves conditions, targets and rectification
        feats = [f[:n] for f in all_feats]

        # 4. target latents z_w (u), z_l (l) (not trained through: detached, as published) and, from rect_start,
        #    the rectified pseudo labels y_r of unlabeled slices (eq. 12), conditioned on z_w with tau_rect
        with torch.no_grad(), self.autocast():
            t_labels, t_tau = torch.cat([yw_u, y_l]), tau
            if rectify:
                tau_rect = tau_l.mean().expand(bu)  # the expected quality of weak labels, as the published code
                t_labels = torch.cat([t_labels, yw_u])
                t_tau = torch.cat([tau, tau_rect])
            t_emb = rect.embed_tau(t_tau)
            z_all, t_skips = rect.encode(t_labels, all_images, [f.detach() for f in all_feats], t_emb)
            z_target = z_all[:n].float()
            loss_rect = torch.zeros((), device=self.device)
            if rectify:
                logits_r = rect.rectify(z_all[n:], [s[n:] for s in t_skips], None if t_emb is None else t_emb[n:],
                                        self.alphas_cumprod, self.timesteps, c.sample_eta,
                                        clamp=c.latent_clamp).float()
                y_r, conf_r = confident_labels(torch.softmax(logits_r, dim=1), c.conf_thresh, c.conf_rule)
        if rectify:
            loss_rect = self.ce_dice(lw_u, y_r, self._loss_mask(conf_r))  # eq. 14

        seg_loss = loss_sup + w_cons * loss_semi + c.lambda_rect * loss_rect
        self._backward(seg_loss)

        # 5. LFR: S2W and W2G transports (eq. 7-11) and the decoder's supervision
        with self.autocast():
            emb = rect.embed_tau(tau)
            z_cond, skips = rect.encode(torch.cat([ys_u, yw_l]), images, feats, emb)  # eq. 5: z_s (u), z_w (l)
            t = sample_timesteps(self.ddpm, n, self.device)
            r = rect.denoiser(q_sample(self.ddpm, z_target, t), t, z_cond)  # eq. 7 noising, eq. 8 / 10 denoising
            dec = rect.decoder(r, skips, emb).float()
        loss_lat_u = latent_loss(r[:bu], z_target[:bu])  # eq. 9
        loss_lat_l = latent_loss(r[bu:], z_target[bu:])  # eq. 11
        loss_dec_l = self.ce_dice(dec[bu:], y_l)
        loss_dec_u = self.ce_dice(dec[:bu], yw_u, mask_u)
        diff_loss = (c.lambda_lat_u * w_cons * loss_lat_u + c.lambda_lat_l * loss_lat_l
                     + c.lambda_decoder * (loss_dec_l + w_cons * loss_dec_u))
        self.backward_and_step(diff_loss, self.optimizer)

        out = {
            "loss": seg_loss.detach() + diff_loss.detach(), "loss_sup": loss_sup, "loss_semi": loss_semi,
            "loss_rect": loss_rect, "loss_lat_u": loss_lat_u, "loss_lat_l": loss_lat_l, "loss_dec_l": loss_dec_l,
            "loss_dec_u": loss_dec_u, "tau_l": tau_l.mean(), "tau_u": tau_u.mean(),
            "confident": confident_u.float().mean(),
        }
        values = torch.stack([v.detach().float() for v in out.values()]).tolist()  # one host sync
        result = dict(zip(out.keys(), values))
        result["consistency_weight"] = w_cons
        return result

    def _backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` through the same grad scaler :meth:`backward_and_step` uses (fp16 autocast)."""
        if self.amp_dtype == torch.float16:
            if self._scaler is None:
                self._scaler = torch.amp.GradScaler(self.device.type)
            loss = self._scaler.scale(loss)
        loss.backward()

    # ---- review ---------------------------------------------------------------------------------------------
    def _strong_view(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        return strong_perturb(x, enhance_max=c.strong_enhance_max, blur_sigma_max=c.strong_blur_sigma_max,
                              deterministic=True)

    def _inference_nets(self) -> tuple[torch.nn.Module, Rectifier]:
        """Eval copies of both networks with BatchNorm folded into the convolutions (same function, faster);
        rebuilt after any training step or state load."""
        if self._fused is None:
            self._fused = (fused_for_inference(self.seg), fused_for_inference(self.rect))
        return self._fused

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._fused = None

    def _predictor(self, views: tuple[str, ...], generator: torch.Generator | None):
        seg, rect = self._inference_nets()

        def predict(x: torch.Tensor) -> dict[str, torch.Tensor]:
            # hard labels as one-channel maps: 2D inference stacks slices without blending, so this is exact and
            # spares the K-channel probability maps (and their arg-max over the whole volume)
            x = x.as_tensor() if hasattr(x, "as_tensor") else x  # MONAI MetaTensor -> plain tensor (speed)
            h, w = x.shape[-2:]
            x, (top, left) = pad_to_multiple(x, LATENT_FACTOR)
            b = x.shape[0]
            batch = [x, self._strong_view(x)] if "strong" in views else [x]
            labels = seg(torch.cat(batch)).argmax(1)
            out = {"weak": labels[:b], "strong": labels[b:]}
            if "rectified" in views:
                emb = rect.embed_tau(rect.inference_tau(b, x.device))
                z_w, skips = rect.encode(out["weak"], x, rect.image_encoder(x), emb)
                out["rectified"] = rect.rectify(z_w, skips, emb, self.alphas_cumprod, self.timesteps,
                                                self.config.sample_eta, generator, self.config.latent_clamp).argmax(1)
            return {k: v[:, None, top:top + h, left:left + w].float() for k, v in out.items() if k in views}

        return predict

    def _generator(self) -> torch.Generator:
        """Seeded noise for the reverse process, so a review of the same volume gives the same labels."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.config.seed)
        return gen

    @torch.no_grad()
    def pseudo_labels(self, volume: torch.Tensor) -> dict[str, np.ndarray]:
        self.eval()
        maps = self.infer_volume(volume, self._predictor(self.views, self._generator()))
        return {view: _labels(maps[view]) for view in self.views}

    @torch.no_grad()
    def predict(self, volume: torch.Tensor) -> np.ndarray:
        self.eval()
        view = self.config.predict_view
        maps = self.infer_volume(volume, self._predictor((view,), self._generator()))
        return _labels(maps[view])

    def extra_state(self) -> dict[str, Any]:
        return {}  # tau_ema and the colour table are buffers of the rectification model


METHOD = DiffRect
