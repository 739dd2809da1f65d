"""A&D (GenericSSL): the method (one training step, the review views, inference); the paper, its equations and every deviation are in :mod:`backend.methods.genericssl`."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from backend.methods.base import Method, argmax_uint8
from backend.methods.schedules import gaussian_warmup
from backend.methods.layers.diffusion import ddim_sample, make_schedulers, q_sample, sample_timesteps, to_signed
from backend.methods.genericssl.diffvnet import DiffVNet, ema_transfer
from backend.methods.genericssl.losses import DifficultyWeights, dice_ce, hard_dice
from backend.methods.genericssl.rs import rs_pseudo_label, rs_terms
from backend.methods.genericssl.svda import SVDAParams, svda
from backend.methods.genericssl.config import GenericSSLConfig, PRESETS


class GenericSSL(Method):
    """A&D (Aggregating & Decoupling) on a Diff-VNet; see the module docstring."""

    name = "genericssl"
    dims = 3
    config_class = GenericSSLConfig
    presets = PRESETS
    views = ("diffusion", "difficulty", "combined")
    primary_view = "combined"

    def __init__(self, config: GenericSSLConfig, device: torch.device | str = "cpu"):
        if config.rampup_steps is None:  # configs of runs made before it was a run-length field: the whole run
            config.rampup_steps = config.max_steps
        super().__init__(config, device)
        c = config
        self.net = self.to_device(DiffVNet(
            c.in_channels, c.num_classes, c.features, c.norm, c.time_embed_dim, c.emb_dim,
            c.encoder_dropout, c.decoder_dropout,
        ))
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=c.lr, momentum=c.momentum,
                                         weight_decay=c.weight_decay, nesterov=c.nesterov)
        self.ddpm, self.ddim = make_schedulers(c.diffusion_steps, c.beta_schedule)
        if c.review_mode not in ("train", "eval"):
            raise ValueError(f"unknown review_mode '{c.review_mode}' (train, eval)")
        self.drs = DifficultyWeights(c.num_classes, c.drs_tau, c.drs_alpha, c.drs_mode, device=self.device)
        self.svda_params = SVDAParams(c.n_aug, c.aug_prob, c.rotation_deg, tuple(c.scale_range),
                                      tuple(c.blur_sigma), tuple(c.brightness_range), tuple(c.contrast_range),
                                      tuple(c.gamma_range))

    # ---- contract --------------------------------------------------------------------------------------------
    def modules(self) -> dict[str, torch.nn.Module]:
        return {"diffvnet": self.net}

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    def extra_state(self) -> dict[str, Any]:
        return {"drs": self.drs.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "drs" in state:
            self.drs.load_state_dict(state["drs"])

    def mu_at(self, step: int) -> float:
        """mu(t) of eq. 9: ``mu * exp(-5 (1 - t / L)^2)``, the Gaussian ramp-up."""
        c = self.config
        return gaussian_warmup(step, c.rampup_steps, c.mu)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The base contract's (CUDA autocast) plus, opt-in (``cpu_amp``), bfloat16 on CPUs with native bf16:
        the CPU counterpart of the published code's mixed-precision training."""
        c = self.config
        if self.device.type == "cpu":
            return torch.bfloat16 if c.amp and c.cpu_amp and _cpu_bf16_supported() else None
        return super().amp_dtype

    # ---- pieces of the iteration -----------------------------------------------------------------------------
    def _augment(self, image: torch.Tensor, label: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.config.svda:
            return image, label
        return svda(image, label, self.svda_params)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
              ) -> torch.Tensor:
        c = self.config
        return dice_ce(logits, target, weights, c.lambda_dice, c.lambda_ce, c.dice_include_background)

    def _partial_backward(self, loss: torch.Tensor) -> None:
        """Backward of a part of eq. 9 (through the grad scaler when fp16 autocasting); the step comes later."""
        if self.amp_dtype == torch.float16:
            if self._scaler is None:
                self._scaler = torch.amp.GradScaler(self.device.type)
            self._scaler.scale(loss).backward()
        else:
            loss.backward()

    def sampling_autocast(self) -> contextlib.AbstractContextManager:
        """Autocast for the gradient-free DDIM loop: the method's CUDA autocast is already active around it; on a
        CPU with native bfloat16 (oneDNN), bf16 autocast when ``amp`` and ``cpu_bf16_sampling`` are on.  The
        published code samples under fp16 autocast; the map only feeds the Gumbel-softmax of eq. 7."""
        c = self.config
        if self.device.type == "cpu" and c.amp and c.cpu_bf16_sampling and _cpu_bf16_supported():
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def ddim_x0(self, image: torch.Tensor) -> torch.Tensor:
        """The domain-unbiased map ``p^{u;xi}``: DDIM from pure noise with ``D(xi)`` predicting x0 (clamped to
        [-1, 1] each step, as the published sampler's ``clip_denoised``), ``[B, K, ...]`` float32."""
        c, net = self.config, self.net
        with self.sampling_autocast():
            context = net.diffusion_context(image)  # step-invariant: computed once for all DDIM steps

            def predict_x0(y_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                x0 = net.denoise_from_context(context, y_t, t).float()
                return x0.clamp(-1.0, 1.0) if c.clip_x0 else x0

            x_T = torch.randn((image.shape[0], c.num_classes, *image.shape[2:]), device=image.device)
            return ddim_sample(self.ddim, predict_x0, x_T, c.ddim_steps)

    def pseudo_label(self, x0: torch.Tensor, logits_psi: torch.Tensor) -> torch.Tensor:
        """The RS pseudo label of eq. 7 (``[B, 1, ...]`` int64)."""
        c = self.config
        return rs_pseudo_label(x0, logits_psi, c.gumbel_tau, c.smooth_kernel, c.smooth_sigma)

    # ---- training --------------------------------------------------------------------------------------------
    def train_step(self, labeled: dict[str, torch.Tensor], unlabeled: dict[str, torch.Tensor],
                   step: int) -> dict[str, float]:
        c, net = self.config, self.net
        ema_transfer(net.decoder_theta, net.decoder_xi, net.decoder_psi, c.ema_w)
        self.optimizer.zero_grad(set_to_none=True)

        x_l, y_l = self._augment(labeled["image"], labeled["label"].long())
        x_u, _ = self._augment(unlabeled["image"])

        # labeled flows: denoising (eq. 1-2) and difficulty-aware (eq. 3-6)
        split = c.split_backward
        with self.autocast():
            y0 = to_signed(F.one_hot(y_l[:, 0], c.num_classes).movedim(-1, 1).float())
            t = sample_timesteps(self.ddpm, y0.shape[0], y0.device)
            y_t = q_sample(self.ddpm, y0, t)
            p_l_xi = net.denoise(x_l, y_t, t)
            loss_deno = self._loss(p_l_xi, y_l)
            dice_xi = hard_dice(p_l_xi.detach(), y_l, absent=c.drs_absent_dice)
            weights = self.drs.update(dice_xi)
        if split:
            self._partial_backward(loss_deno)
            del p_l_xi
        with self.autocast():
            p_l_psi = net.psi(x_l)
            loss_diff = self._loss(p_l_psi, y_l, weights)
        if split:
            self._partial_backward(loss_diff)
            del p_l_psi

        # unlabeled flow: pseudo labels (eq. 7) and D(theta) (eq. 8)
        mu = self.mu_at(step)
        with self.autocast():
            x0_u = self.ddim_x0(x_u)
            feats_u = net.encode_image(x_u)
            with torch.no_grad():
                p_u_psi = net.decoder_psi([f.detach() for f in feats_u])
                pseudo = self.pseudo_label(x0_u, p_u_psi)
            p_u_theta = net.decoder_theta(feats_u)
            loss_u = self._loss(p_u_theta, pseudo)
            loss_last = mu * loss_u if split else loss_deno + loss_diff + mu * loss_u
        self.backward_and_step(loss_last, self.optimizer)

        out = {
            "loss": float(loss_deno.detach() + loss_diff.detach() + mu * loss_u.detach()),
            "loss_deno": float(loss_deno.detach()),
            "loss_diff": float(loss_diff.detach()),
            "loss_u": float(loss_u.detach()),
            "mu": mu,
        }
        for k, (w, d) in enumerate(zip(weights.tolist(), dice_xi.tolist())):
            out[f"drs_w_{k}"] = w
            out[f"dice_xi_{k}"] = d
        return out

    # ---- inference -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        was_training = self.net.training
        self.net.eval()
        try:
            yield
        finally:
            self.net.train(was_training)

    @contextlib.contextmanager
    def _as_training_targets(self) -> Iterator[None]:
        """The networks as they are when the training targets are made: train mode (dropout on, norms on the
        batch's statistics) without touching the running statistics, which inference and checkpoints keep."""
        norms = [m for m in self.net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        tracked = [m.track_running_stats for m in norms]
        was_training = self.net.training
        self.net.train()
        for m in norms:
            m.track_running_stats = False  # batch statistics, running ones neither used nor updated
        try:
            yield
        finally:
            for m, t in zip(norms, tracked):
                m.track_running_stats = t
            self.net.train(was_training)

    def _review_maps(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """The terms of eq. 7 as they enter the pseudo label: ``Smooth(GumbelSoftmax(p^{u;xi}))`` (the DDIM map of
        ``D(xi)``), ``Softmax(p^{u;psi})`` and their sum (one Gumbel draw for both views)."""
        c = self.config
        domain, klass = rs_terms(self.ddim_x0(batch), self.net.psi(batch), c.gumbel_tau, c.smooth_kernel,
                                 c.smooth_sigma)
        return {"diffusion": domain, "difficulty": klass, "combined": domain + klass}

    def pseudo_labels(self, volume: torch.Tensor) -> dict[str, np.ndarray]:
        """The three views of one volume, computed the way the training targets are (``review_mode`` "train"):
        ``diffusion`` (domain-unbiased), ``difficulty`` (class-unbiased) and ``combined`` (the RS pseudo label of
        eq. 7), each map blended across sliding windows before its argmax."""
        mode = self._as_training_targets() if self.config.review_mode == "train" else self._evaluating()
        with mode, torch.inference_mode():
            maps = self.infer_volume(volume, self._review_maps)
        return {view: argmax_uint8(maps[view]) for view in self.views}

    def primary_probabilities(self, volume: torch.Tensor) -> torch.Tensor:
        """Half the RS sum of eq. 7 (both terms are distributions over the classes, so half their sum is one;
        its arg-max is the ``combined`` view), made as :meth:`pseudo_labels` makes it."""
        context = self._as_training_targets() if self.config.review_mode == "train" else self._evaluating()
        with context, torch.inference_mode():
            return 0.5 * self.infer_volume(volume, lambda batch: {"c": self._review_maps(batch)["combined"]})["c"]

    def predict(self, volume: torch.Tensor) -> np.ndarray:
        """``D(theta)`` on the shared encoder: the paper's inference path (not the ``combined`` view).  Over
        ``patch_size`` windows: one pass over a whole volume was measured to change the prediction (Dice of the
        shipped checkpoint on the sample cases 0.72-0.82 -> 0.48-0.69; the network learned the zero-padding of its
        training patch's borders), so the window stays the training patch."""
        with self._evaluating(), torch.inference_mode():
            maps = self.infer_volume(volume, lambda b: {"theta": torch.softmax(self.net.theta(b).float(), dim=1)})
        return argmax_uint8(maps["theta"])

    def window_batch(self) -> int:
        """One window per network call on CPU (measured: as fast as 4 and half the peak memory, see
        bench/results/speed-cpu-2core.md); ``config.sw_batch_size`` elsewhere."""
        return 1 if self.device.type == "cpu" else self.config.sw_batch_size


def _cpu_bf16_supported() -> bool:
    """Whether oneDNN runs bfloat16 natively here (AVX512-BF16 / AMX); emulated bf16 would be slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
