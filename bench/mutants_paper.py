"""Paper-derived one-line bugs (mutants), written from the papers and the method code only.

Issue 23 asked for bugs nobody had listed: these were written after the behaviour tests
(``tests/backend/test_behaviour_*.py``) by a helper that read only the papers (DiffRect, Diff-CL, A&D) and the
method code, never the tests, so they check the tests against the papers' rules rather than against a list the tests
were fitted to.  Each method has its own bugs plus three in the shared scoring / review path.

Same structure as :mod:`bench.mutants`: ``PAPER[method] = [Mutant(file, old, new, why), ...]``;
:data:`bench.mutants.MUTANTS` numbers them after the listed ones.
"""
from __future__ import annotations

from bench.mutant import Mutant

_DR = "backend/methods/diffrect/method.py"
DIFFRECT: list[Mutant] = [
    Mutant(_DR, "passing = (prob - low) / high > thresh", "passing = (prob - low) / high < thresh",
           "official confidence rule inverted: unconfident classes pass"),
    Mutant(_DR, "return labels, conf >= thresh", "return labels, conf <= thresh",
           "FixMatch mask keeps the unconfident pixels (FixMatch: max p >= threshold)"),
    Mutant(_DR, "return ce.mean() + self.dice(prob, onehot)", "return ce.mean()",
           "L_Sup / L_Semi without the Dice term (CE + Dice)"),
    Mutant(_DR, "loss_sup = self.ce_dice(lw_l, y_l)", "loss_sup = self.ce_dice(lw_u, y_l)",
           "L_Sup on the unlabeled slices' logits"),
    Mutant(_DR, "tau_l = calibration_guidance(yw_l, y_l, c.num_classes, c.guidance)",
           "tau_l = calibration_guidance(y_l, y_l, c.num_classes, c.guidance)",
           "tau_l = Dice(y, y) = 1 (eq. 6: Dice of the weak label against the ground truth)"),
    Mutant(_DR, "tau_rect = tau_l.mean().expand(bu)", "tau_rect = tau_u.mean().expand(bu)",
           "rectification guided by the strong-vs-weak tau instead of the weak labels' expected quality"),
    Mutant(_DR, "loss_rect = self.ce_dice(lw_u, y_r, self._loss_mask(conf_r))",
           "loss_rect = self.ce_dice(ls_u, y_r, self._loss_mask(conf_r))",
           "L_Rect (eq. 14) supervises the strong view instead of the weak unlabeled view"),
    Mutant(_DR, "r = rect.denoiser(q_sample(self.ddpm, z_target, t), t, z_cond)",
           "r = rect.denoiser(z_target, t, z_cond)",
           "LFR denoiser fed the clean target latent (eq. 7: q(z_t | z_0) noising)"),
    Mutant(_DR, "loss_dec_l = self.ce_dice(dec[bu:], y_l)", "loss_dec_l = self.ce_dice(dec[bu:], yw_l)",
           "W2G decoder supervised by the weak label instead of the ground truth"),
    Mutant(_DR, "self.timesteps = ddim_timesteps(c.diffusion_steps, c.sample_steps)",
           "self.timesteps = ddim_timesteps(c.diffusion_steps, 1)",
           "reverse process of eq. 12 with one step instead of sample_steps"),
    Mutant("backend/methods/diffrect/aug.py", "out = F.grid_sample(lab.float(), grid.float(), mode=\"nearest\"",
           "out = F.grid_sample(lab.float(), grid.float(), mode=\"bilinear\"",
           "labels warped bilinearly (sec. 3.1: nearest neighbour, labels stay integer classes)"),
    Mutant("backend/methods/diffrect/model.py",
           "ema = torch.where(self.tau_ema < 0, value, decay * self.tau_ema + (1 - decay) * value)",
           "ema = torch.where(self.tau_ema < 0, value, (1 - decay) * self.tau_ema + decay * value)",
           "tau EMA weights swapped: follows the last batch, not the running mean"),
]

_DCL = "backend/methods/diffcl/method.py"
_CT = "backend/methods/diffcl/contrast.py"
DIFFCL: list[Mutant] = [
    Mutant(_DCL, "sup_d = self._dice_ce(logits_d[:n_l], y_l, c.beta1 * lam)",
           "sup_d = self._dice_ce(logits_d[:n_l], y_l, c.beta2 * lam)",
           "eq. 18: DS's supervised CE weighted by beta_2 instead of beta_1"),
    Mutant(_DCL, '"ds": sup_d + c.mu1 * cps_d,', '"ds": sup_d + c.mu2 * cps_d,',
           "eq. 16: L_p^d weighted by mu_2 instead of mu_1"),
    Mutant(_DCL, "return self.dice(logits, target[:, None]) + ce_weight * F.cross_entropy(logits, target)",
           "return ce_weight * F.cross_entropy(logits, target)",
           "eq. 6-9 / 18-21 without the Dice term D(P, Y)"),
    Mutant(_DCL, "y_hat = logits_c.detach().max(1).indices", "y_hat = logits_c.max(1).indices.detach().zero_()",
           "CS pseudo labels all background (step 5: argmax of CS)"),
    Mutant(_DCL, "y0 = to_signed(F.one_hot(labels, self.config.num_classes).movedim(-1, 1).float())",
           "y0 = F.one_hot(labels, self.config.num_classes).movedim(-1, 1).float()",
           "Y_0 (eq. 5) not scaled to [-1, 1] before noising"),
    Mutant(_DCL, "correct & (labels == cls)", "correct & (ds_labels != cls)",
           "memory bank for class k filled with voxels of other classes (Sec. 4.3)"),
    Mutant(_DCL, "return gaussian_warmup(step, c.warmup_fraction * c.max_steps, c.warmup_scale)",
           "return gaussian_warmup(step, c.max_steps, c.warmup_scale)",
           "lambda(t) ramps over the whole run instead of warmup_fraction of it (Sec. 5.1)"),
    Mutant(_DCL, "return from_signed(ddim_sample(self.ddim, predict_x0, y_T, self.config.ddim_steps)).clamp(0.0, 1.0)",
           "return from_signed(ddim_sample(self.ddim, predict_x0, y_T, 1)).clamp(0.0, 1.0)",
           "ds review view sampled with one DDIM step instead of ddim_steps"),
    Mutant(_DCL, "flips = torch.randint(0, 2, (b,))", "flips = torch.randint(0, 1, (b,))",
           "augmentation rotates but never flips (Sec. 5.1: random flip and rotation)"),
    Mutant(_CT, "sim = a @ b.t() / tau", "sim = a @ b.t() * tau",
           "eq. 14: similarities multiplied by the temperature instead of divided"),
    Mutant(_CT, "a = F.normalize(a.float(), dim=1)", "a = a.float()",
           "eq. 14: anchors not L2-normalised (cos similarity)"),
    Mutant(_CT, "return score.topk(k).indices, (-score).topk(k).indices",
           "return (-score).topk(k).indices, score.topk(k).indices",
           "eq. 13: positives and negatives swapped"),
]
_GL = "backend/methods/genericssl/losses.py"
_GR = "backend/methods/genericssl/rs.py"
_GS = "backend/methods/genericssl/svda.py"
_GD = "backend/methods/genericssl/diffvnet.py"
_GC = "backend/methods/genericssl/config.py"
GENERICSSL: list[Mutant] = [
    Mutant(_GL, "unlearn = delta.clamp_max(0) * log_ratio", "unlearn = delta.clamp_min(0) * log_ratio",
           "DRS eq. 3: 'not learned' accumulates the gains, so d_k = 1 for every class"),
    Mutant(_GL, "difficulty = (du + self.eps) / (dl + self.eps)", "difficulty = (dl + self.eps) / (du + self.eps)",
           "DRS eq. 4: difficulty inverted (learned / not learned)"),
    Mutant(_GL, "self.reverse.mul_(m).add_((1 - m) * (1.0 - dice))", "self.reverse.mul_(m).add_((1 - m) * dice)",
           "DRS eq. 5: w_lambda accumulates lambda instead of 1 - lambda (easy classes weighted up)"),
    Mutant(_GL, "self.last_dice = dice", "self.last_dice = self.last_dice",
           "DRS: Delta always against the first iteration's Dice, not the previous one"),
    Mutant(_GL, "empty = torch.where(predicted, torch.zeros_like(dice), torch.full_like(dice, absent))",
           "empty = torch.where(predicted, torch.full_like(dice, absent), torch.zeros_like(dice))",
           "hard Dice: a falsely predicted class scores 1/2 and an absent one 0 (published: the reverse)"),
    Mutant(_GL, "per_class = dice_fn(logits, target).flatten()", "per_class = dice_fn(-logits, target).flatten()",
           "L_DiceCE: Dice of the negated logits (the least likely class)"),
    Mutant(_GR, "return rs_scores(x0, logits_psi, tau, kernel_size, sigma).argmax(dim=1, keepdim=True)",
           "return rs_scores(x0, logits_psi, tau, kernel_size, sigma).argmin(dim=1, keepdim=True)",
           "RS pseudo label (eq. 7) takes the arg-min of the summed scores"),
    Mutant(_GR, "return gaussian_smooth(F.gumbel_softmax(x0.float(), tau=tau, hard=False, dim=1), kernel_size, sigma)",
           "return gaussian_smooth(F.gumbel_softmax(x0.float(), tau=tau, hard=True, dim=1), kernel_size, sigma)",
           "RS (eq. 7): hard Gumbel one-hot instead of the soft re-parameterisation"),
    Mutant(_GS, "theta[:, 2, 2] = scale", "theta[:, 2, 2] = 1.0",
           "SVDA scaling not applied along depth (published: isotropic scaling of all three axes)"),
    Mutant(_GS, "grid, mode=\"nearest\", padding_mode=\"zeros\",", "grid, mode=\"bilinear\", padding_mode=\"zeros\",",
           "SVDA: labels resampled bilinearly (mixed class values at borders; published: nearest)"),
    Mutant(_GD, "torch._foreach_lerp_(thetas, means, 1.0 - w_ema)", "torch._foreach_lerp_(thetas, means, w_ema)",
           "EMA transfer (sec. 3.3): theta takes 0.99 of (xi + psi) / 2 instead of keeping 0.99 of itself"),
    Mutant(_GC, "ema_w: float = 0.99", "ema_w: float = 0.9",
           "EMA weight w_ema 0.9 instead of the paper's 0.99 (sec. 3.3)"),
    Mutant(_GC, "drs_alpha: float = 0.2  # 1/5", "drs_alpha: float = 2.0  # 1/5",
           "DRS exponent alpha = 2 instead of 1/5 (eq. 5)"),
]

# ---- shared scoring / review path (each assigned to one method's list) ------------------------------------------
_MET = "backend/engine/metrics.py"
_INF = "backend/engine/inference.py"
_Q = "backend/review/queue.py"
_V = "backend/review/views.py"
DIFFRECT += [
    Mutant(_MET, "dice = compute_dice(p, r, include_background=False, ignore_empty=False, num_classes=num_classes)",
           "dice = compute_dice(p, r, include_background=True, ignore_empty=False, num_classes=num_classes)",
           "metrics: background counted as a class (scores are per foreground class)"),
    Mutant(_Q, 'return (bool(row["labeled"]), min(values) if values else 2.0, row["case"])',
           'return (bool(row["labeled"]), -max(values) if values else 2.0, row["case"])',
           "review queue sorted most-agreeing first (the most doubtful case must lead)"),
    Mutant(_INF, 'checkpoint: str = "best") -> tuple[Method, str, dict[str, Any]]:',
           'checkpoint: str = "last") -> tuple[Method, str, dict[str, Any]]:',
           "inference loads the last checkpoint by default instead of the best by validation"),
]
DIFFCL += [
    Mutant(_V, "return np.argmax(counts, axis=0).astype(np.uint8)",
           "return (num_classes - 1 - np.argmax(counts[::-1], axis=0)).astype(np.uint8)",
           "majority vote: ties go to the higher class (background must win ties)"),
    Mutant(_MET, "worst = float(dice.min()) if worst is None else min(worst, float(dice.min()))",
           "worst = float(dice.max()) if worst is None else max(worst, float(dice.max()))",
           "agreement_worst is the best pair/class agreement, not the worst"),
    Mutant(_V, "out |= array != arrays[0]", "out &= array != arrays[0]",
           "disagreement map empty: |= must mark voxels where ANY view differs"),
]
GENERICSSL += [
    Mutant(_V, "return int(np.argmax(profile))", "return int(np.argmin(profile))",
           "worst slice = the slice with the least disagreement"),
    Mutant(_Q, "out[method] = best[method] if best.get(method) in runs else runs[-1]", "out[method] = runs[-1]",
           "review shows the newest run's pseudo labels even when a better run has them"),
    Mutant(_MET,
           'pairs[f"{a}|{b}"] = {"per_class": per_class, "mean": round(float(dice.mean()), 6) if dice.size else 1.0}',
           'pairs[f"{a}|{b}"] = {"per_class": per_class, "mean": round(float(dice[0]), 6) if dice.size else 1.0}',
           "pair agreement mean taken from the first foreground class only"),
]

PAPER: dict[str, list[Mutant]] = {"diffrect": DIFFRECT, "diffcl": DIFFCL, "genericssl": GENERICSSL}
