"""DiffRect: the method (one training step, the review views, inference); the paper, its equations and every deviation are in :mod:`backend.methods.diffrect`."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from backend.methods.base import Method
from backend.methods.schedules import sigmoid_rampup
from backend.methods.diffrect.aug import strong_perturb, warp_image, warp_label, weak_grid
from backend.methods.diffrect.dropout import ssl4mis_dropout
from backend.methods.diffrect.fuse import fused_for_inference
from backend.methods.diffrect.lcc import GUIDANCE_CHOICES, calibration_guidance
from backend.methods.diffrect.lfr import latent_loss
from backend.methods.layers.diffusion import ddim_timesteps
from backend.methods.diffrect.model import Rectifier
from backend.methods.layers.diffusion import make_schedulers, q_sample, sample_timesteps
from backend.methods.layers.unet2d import unet2d
from backend.methods.diffrect.config import CONF_RULES, DiffRectConfig


LATENT_FACTOR = 64  # B_sem down-samples 16x and the denoiser 4x more: slices are padded to a multiple of 64




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


def _labels(maps: torch.Tensor) -> np.ndarray:
    """A ``[1, Z, Y, X]`` map of hard labels (see ``_predictor``) as uint8 ``[Z, Y, X]``."""
    return maps[0].round().to(torch.uint8).cpu().numpy()


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
        """``(segmentation net, rectification model)`` for inference: an eval copy of the segmentation net with
        BatchNorm folded into its convolutions (same function, faster; rebuilt after any training step or state
        load) and the rectification model itself (the callers put it in eval mode).  Only the segmentation net
        is copied: ``predict`` and the probabilities use it alone, and a folded copy of the 18.4 M-parameter
        rectification model would cost 74 MB and its copy time in every job for the ``rectified`` view only."""
        if self._fused is None:
            self._fused = (fused_for_inference(self.seg), self.rect)
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

    def window_batch(self) -> int:
        """Slices per network call / 4: 4 slices on CPU (measured on a 10x256x256 volume, acdc networks: the same
        CPU time as all 10 at once, peak RSS 1.11-1.12 -> 0.83-0.84 GiB), ``4 * config.sw_batch_size`` elsewhere."""
        return 1 if self.device.type == "cpu" else self.config.sw_batch_size

    def _generator(self) -> torch.Generator:
        """Seeded noise for the reverse process, so a review of the same volume gives the same labels."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.config.seed)
        return gen

    @torch.inference_mode()
    def pseudo_labels(self, volume: torch.Tensor) -> dict[str, np.ndarray]:
        self.eval()
        maps = self.infer_volume(volume, self._predictor(self.views, self._generator()))
        return {view: _labels(maps[view]) for view in self.views}

    @torch.inference_mode()
    def primary_probabilities(self, volume: torch.Tensor) -> torch.Tensor:
        """The segmentation net's softmax per slice (its arg-max is the ``weak`` view)."""
        self.eval()
        seg = self._inference_nets()[0]

        def softmax_of(batch: torch.Tensor) -> dict[str, torch.Tensor]:
            plain = batch.as_tensor() if hasattr(batch, "as_tensor") else batch
            rows, cols = plain.shape[-2:]
            padded, (y0, x0) = pad_to_multiple(plain, LATENT_FACTOR)
            return {"p": torch.softmax(seg(padded).float(), dim=1)[..., y0:y0 + rows, x0:x0 + cols]}

        return self.infer_volume(volume, softmax_of)["p"]

    @torch.inference_mode()
    def predict(self, volume: torch.Tensor) -> np.ndarray:
        self.eval()
        view = self.config.predict_view
        maps = self.infer_volume(volume, self._predictor((view,), self._generator()))
        return _labels(maps[view])

    def extra_state(self) -> dict[str, Any]:
        return {}  # tau_ema and the colour table are buffers of the rectification model
