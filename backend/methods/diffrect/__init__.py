"""DiffRect: Latent Diffusion Label Rectification for semi-supervised segmentation (Liu et al., MICCAI 2024).

A 2D segmentation U-Net trained FixMatch-style, plus a rectification model (``backend.methods.diffrect.model``) that
learns, in the latent space of coloured label maps, how coarse pseudo labels turn into finer ones and then into
ground truth, and hands the segmentation net rectified pseudo labels.  One training step (:meth:`train_step`):

1. Perturbations (``backend.methods.diffrect.aug``), batched on the device: weak = random flip + rotation of every
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
  with the image minimum (intensities are z-scored, not in [0, 1]); see ``backend.methods.diffrect.aug``.
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
  1x1 (SSL4MIS: 3x3).  Dropout keeps ``p`` to a multiple of 1/65536 (``backend.methods.diffrect.dropout``).
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
Bernoulli variate (``backend.methods.diffrect.dropout``), inference uses copies with BatchNorm folded into the
convolutions, and MONAI's U-Net skips its (here always empty) odd-size padding.

Review views (:meth:`pseudo_labels`): ``weak`` = the segmentation net on the unperturbed slice (the paper's
inference output, what :meth:`predict` returns), ``strong`` = the segmentation net on a deterministic strong
perturbation of the slice (every enhancement at its largest training factor, then the largest training blur),
``rectified`` = the LFR output conditioned on the weak prediction, with the running mean of tau_l as guidance and
seeded noise (reproducible).  ``config.predict_view`` can make :meth:`predict` return another view.
"""
from backend.methods.diffrect.config import DiffRectConfig
from backend.methods.diffrect.method import DiffRect, confident_labels, pad_to_multiple

METHODS = [DiffRect]

__all__ = ["DiffRect", "DiffRectConfig", "confident_labels", "pad_to_multiple", "METHODS"]
