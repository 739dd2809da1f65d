"""Mutation check of the method tests: do one-line bugs in a method make its fast tests fail?

    python bench/mutants.py                        # every method, every mutant (2 mutants at a time)
    python bench/mutants.py --methods diffrect     # one method
    python bench/mutants.py --list                 # the mutants, without running anything
    python bench/mutants.py --methods diffcl --only 3 7 --jobs 1

Each mutant is a one-line bug kept in this file: an exact, unique piece of one source line (``old``) and what it
becomes (``new``), with the rule it breaks (``why``).  For every mutant the repository's tracked files are copied
(hard links, the mutated file written anew) to a temporary folder, the mutant is applied there, and the method's
fast tests (:data:`FAST_TESTS`) run in a child process with that copy first on ``PYTHONPATH``.  A mutant is
*caught* when the tests fail (or time out); a mutant whose ``old`` text is not found exactly once is reported
as *stale*, never as caught.  The unmutated copy runs first: a method whose tests fail without a mutant is
reported and skipped.

Prints a Markdown table (caught / total per method, then one line per mutant) and writes it to
``bench/results/mutants-<method>.md`` when ``--methods`` names one method (so that each method's table can be
rerun on its own), else to ``bench/results/mutants.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


from bench.mutant import Mutant  # noqa: E402

# The fast tests that must catch each method's mutants (pytest arguments, relative to the repository root).
_SHARED_TESTS = "tests/backend/test_behaviour_shared.py"  # the scoring / review path every method's views go through
FAST_TESTS: dict[str, list[str]] = {  # value checks first: with -x a caught mutant stops at its first failure
    "diffrect": ["tests/backend/test_behaviour_diffrect.py", _SHARED_TESTS, "tests/backend/test_methods_diffrect.py",
                 "tests/backend/test_methods_diffrect_nets.py", "-m", "not slow"],
    "diffcl": ["tests/backend/test_behaviour_diffcl.py", _SHARED_TESTS, "tests/backend/test_methods_diffcl.py",
               "tests/backend/test_methods_diffcl_mamba.py", "-m", "not slow"],
    "genericssl": ["tests/backend/test_behaviour_genericssl.py", _SHARED_TESTS,
                   "tests/backend/test_methods_genericssl.py", "-m", "not slow"],
}

# ---- DiffRect mutants ------------------------------------------------------------------------------------------
# (kept together; each names the rule of the paper / official code it breaks)

_DR = "backend/methods/diffrect/method.py"
_DR_CONFIG = "backend/methods/diffrect/config.py"
DIFFRECT: list[Mutant] = [
    Mutant(_DR, "rect.encode(torch.cat([ys_u, yw_l]), images", "rect.encode(torch.cat([yw_u, yw_l]), images",
           "S2W condition = its own target (eq. 5/8: the strong pseudo label conditions S2W)"),
    Mutant(_DR, "rect.encode(torch.cat([ys_u, yw_l]), images", "rect.encode(torch.cat([ys_u, y_l]), images",
           "W2G condition = the ground truth (eq. 10: the weak pseudo label conditions W2G)"),
    Mutant(_DR, "t_labels, t_tau = torch.cat([yw_u, y_l]), tau", "t_labels, t_tau = torch.cat([yw_u, yw_l]), tau",
           "W2G target = the weak label (eq. 10-11: the ground truth is W2G's target)"),
    Mutant(_DR, "t_labels = torch.cat([t_labels, yw_u])", "t_labels = torch.cat([t_labels, ys_u])",
           "rectification conditioned on the strong pseudo label (eq. 12: on z_w)"),
    Mutant(_DR, "return (prob * passing).argmax(1), passing.any(1)", "return prob.argmax(1), passing.any(1)",
           "confidence mask off: unconfident pixels keep their arg-max (published: background)"),
    Mutant(_DR, 'return confident if self.config.conf_rule == "fixmatch" else None', "return confident",
           "official rule: unconfident pixels left out of the losses (published: kept, as background)"),
    Mutant(_DR, "+ c.lambda_rect * loss_rect", "+ 0.0 * loss_rect", "L_Rect x 0 (eq. 13-14)"),
    Mutant(_DR, "return c.consistency * sigmoid_rampup(step, c.consistency_rampup)",
           "return 0.0 * sigmoid_rampup(step, c.consistency_rampup)", "consistency weight 0"),
    Mutant(_DR, "xs_u = strong_perturb(xw_u,", "xs_u = xw_u if True else strong_perturb(xw_u,",
           "strong view = the unperturbed (weak) slice"),
    Mutant(_DR, "y_l = warp_label(y_l, grid[:bl])", "y_l = y_l",
           "weak perturbation: the label is not warped with its image"),
    Mutant(_DR, "xw = warp_image(torch.cat([x_l, x_u]), grid)", "xw = torch.cat([x_l, x_u])",
           "weak perturbation off for the images"),
    Mutant(_DR, "loss_semi = self.ce_dice(ls_u, yw_u, mask_u)", "loss_semi = self.ce_dice(ls_u, ys_u, mask_u)",
           "L_Semi^Seg: the strong view supervised by its own prediction (FixMatch: the weak view's)"),
    Mutant(_DR, "tau_u = calibration_guidance(ys_u, yw_u,", "tau_u = calibration_guidance(yw_u, yw_u,",
           "tau_u = Dice(y_w, y_w) = 1 (eq. 6: Dice(y_s, y_w))"),
    Mutant(_DR, "images = torch.cat([xs_u, xw_l])", "images = torch.cat([xw_u, xw_l])",
           "S2W labels encoded with the weak image (published: the strong view's)"),
    Mutant(_DR, "y_r, conf_r = confident_labels(torch.softmax(logits_r, dim=1), c.conf_thresh, c.conf_rule)",
           "conf_r, y_r = torch.softmax(logits_r, dim=1).max(dim=1)",
           "rectified pseudo label without the confidence rule"),
    Mutant(_DR, "rectify = step >= c.rect_start", "rectify = step > c.rect_start",
           "rectification starts a step after rect_start"),
    Mutant(_DR_CONFIG, '= ("consistency_rampup", "rect_start")', '= ("consistency_rampup",)',
           "--steps does not rescale the rectification start"),
    Mutant(_DR_CONFIG, 'predict_view: str = "weak"', 'predict_view: str = "rectified"',
           "predict() / validation use the rectification model (paper: the segmentation net)"),
    Mutant(_DR, 'batch = [x, self._strong_view(x)] if', "batch = [x, x] if",
           "review: the strong view of the unperturbed slice"),
    Mutant(_DR, 'z_w, skips = rect.encode(out["weak"], x,', 'z_w, skips = rect.encode(out["strong"], x,',
           "review: rectified view conditioned on the strong view (eq. 12: on the weak one)"),
    Mutant("backend/methods/diffrect/model.py", "return self.decoder(feature.to(z_cond.dtype), skips, emb)",
           "return self.decoder(z_cond, skips, emb)",
           "rectification decodes the condition instead of the sampled latent (eq. 12)"),
    Mutant("backend/methods/diffrect/model.py", "return x0 if clamp is None else x0.clamp(-clamp, clamp)", "return x0",
           "no latent clamp to [-1, 1] while sampling (published clip_denoised)"),
    Mutant(_DR, "+ c.lambda_decoder * (loss_dec_l + w_cons * loss_dec_u))",
           "+ 0.0 * (loss_dec_l + w_cons * loss_dec_u))",
           "the decoder's supervision (W2G: ground truth, S2W: weak labels) does not reach the gradients"),
    Mutant(_DR, "diff_loss = (c.lambda_lat_u * w_cons * loss_lat_u", "diff_loss = (c.lambda_lat_u * loss_lat_u",
           "L_Lat-U not consistency-weighted (published: lambda_1 = the consistency weight)"),
    Mutant("backend/methods/diffrect/dropout.py", 'if name in ENCODER_LEVELS and conv_name == "conv_0" else 0.0',
           "if name in ENCODER_LEVELS else 0.0",
           "segmentation U-Net: dropout after both convs of a level (SSL4MIS: one, encoder only)"),
    Mutant(_DR, "loss_lat_u = latent_loss(r[:bu], z_target[:bu])", "loss_lat_u = latent_loss(r[:bu], z_target[bu:])",
           "L_Lat-U compares S2W's output with W2G's target (eq. 9)"),
]

# ---- end of DiffRect mutants -----------------------------------------------------------------------------------


# ---- Diff-CL mutants -------------------------------------------------------------------------------------------
# (kept together; each names the rule of the paper / official code it breaks)

_DCL = "backend/methods/diffcl/method.py"
_DCL_CONFIG = "backend/methods/diffcl/config.py"
DIFFCL: list[Mutant] = [
    Mutant(_DCL, "        x_l, y_l, x_u = self._augment(x_l, y_l, x_u)", "        x_l, y_l, x_u = x_l, y_l, x_u",
           "training batches are not flipped/rotated (Sec. 5.1)"),
    Mutant(_DCL, "        x_l, y_l = random_rot_flip(x_l, y_l)", "        (x_l,), y_l = random_rot_flip(x_l), y_l",
           "the label does not move with its flipped/rotated image"),
    Mutant(_DCL, "        (x_u,) = random_rot_flip(x_u)", "        (x_u,) = (x_u,)",
           "unlabeled images are not augmented"),
    Mutant(_DCL, "ks = torch.randint(0, 4, (b,)) if square", "ks = torch.randint(0, 1, (b,)) if square",
           "augmentation flips but never rotates"),
    Mutant(_DCL, "cps_d = self._dice_ce(logits_d[n_l:], y_hat[n_l:], c.lambda1)",
           "cps_d = self._dice_ce(logits_d[n_l:], y_tilde[n_l:], c.lambda1)",
           "L_p^d (eq. 6): DS taught by its own pseudo labels instead of CS's"),
    Mutant(_DCL, "cps_c = self._dice_ce(logits_c[n_l:], y_tilde[n_l:], c.lambda2)",
           "cps_c = self._dice_ce(logits_c[n_l:], y_hat[n_l:], c.lambda2)",
           "L_p^c (eq. 7): CS taught by its own pseudo labels instead of DS's"),
    Mutant(_DCL, "y_hat[n_l:], c.lambda1)", "y_hat[n_l:], c.lambda2)",
           "eq. 6 weighs its CE with lambda_2 instead of lambda_1"),
    Mutant(_DCL, "sup_c = self._dice_ce(logits_c[:n_l], y_l, c.beta2 * lam)",
           "sup_c = self._dice_ce(logits_c[:n_l], y_l, c.beta2)",
           "eq. 19's CE weight beta_2 without the Gaussian warm-up lambda(t) (Table 2)"),
    Mutant(_DCL, "(cps_c + c.eta * loss_cl)}", "(cps_c + c.eta * loss_cl.detach())}",
           "L_cl (eq. 22) does not reach CS and the projection head"),
    Mutant(_DCL, '"cs": sup_c + c.mu2 * (cps_c + c.eta * loss_cl)}', '"cs": sup_c + c.mu2 * cps_c + c.eta * loss_cl}',
           "eq. 17: mu_2 weighs L_p^c only, not L_u^c = L_p^c + eta L_cl"),
    Mutant(_DCL, "torch.cat([y_l, y_hat[n_l:]])", "torch.cat([y_hat[:n_l], y_hat[n_l:]])",
           "Y_0^l = y^l (eq. 5): DS conditioned on CS's labels for labeled images"),
    Mutant(_DCL, "        return q_sample(self.ddpm, y0, t), t", "        return y0, t",
           "DS is fed the clean label, not Y_t (eq. 5)"),
    Mutant(_DCL, "y_tilde = logits_d.detach().max(1).indices", "y_tilde = logits_c.detach().max(1).indices",
           "DS's pseudo labels taken from CS's output"),
    Mutant(_DCL, "        correct = ds_labels == labels", "        correct = labels == labels",
           "memory bank takes every labeled voxel, not only those DS predicts correctly (Sec. 4.3)"),
    Mutant(_DCL, "self._update_bank(feats_d[:n_l], y_tilde[:n_l], y_l)",
           "self._update_bank(feats_c[:n_l], y_tilde[:n_l], y_l)",
           "memory bank filled with CS features instead of DS's"),
    Mutant(_DCL, "loss_cl = self._contrastive(feats_c[n_l:])", "loss_cl = self._contrastive(feats_c[:n_l])",
           "L_cl candidates from labeled instead of unlabeled CS features"),
    Mutant(_DCL, 'self.backward_and_step(losses["cs"], self.opt_cs)',
           'self.backward_and_step(losses["sup_cs"], self.opt_cs)', "CS trained on its supervised loss only (eq. 17)"),
    Mutant(_DCL, "        lam = self.warmup(step)", "        lam = self.warmup(self.config.max_steps)",
           "lambda(t) taken at the run's end at every step"),
    Mutant(_DCL, "self.ds(patch, y_t, t)[0]", "self.ds(torch.zeros_like(patch), y_t, t)[0]",
           "the ds review view is not conditioned on the image"),
    Mutant(_DCL, "y_T = torch.randn(shape, generator=generator,", "y_T = torch.zeros(shape,",
           "the ds review view does not start from noise"),
    Mutant(_DCL_CONFIG, "_LA = _strides((80, 112, 112), (4, 18, 18))", "_LA = _strides((80, 112, 112), (18, 18, 18))",
           "LA sliding-window z stride 18 instead of 4 (Sec. 5.1)"),
    Mutant(_DCL_CONFIG, '"intensity_window": (-120.0, 240.0)', '"intensity_window": None',
           "Pancreas without its CT window [-120, 240] HU (Sec. 5.1)"),
    Mutant("backend/methods/diffcl/nets.py", "for level, block in self.hfm.items():",
           "for level, block in list(self.hfm.items())[-1:]:",
           "HFM at the bottleneck only"),
    Mutant("backend/methods/diffcl/contrast.py", "(torch.logaddexp(s_pos, neg_lse) - s_pos)", "(neg_lse - s_pos)",
           "eq. 14's denominator without the positive pair"),
    Mutant("backend/methods/diffcl/contrast.py", "(-score).topk(k).indices", "score.topk(2 * k).indices[k:]",
           "eq. 13: negatives are the next most similar, not the least similar"),
    Mutant("backend/methods/diffcl/mamba.py", "torch.fft.ifftn(torch.fft.ifftshift(spectrum, dim=dims), dim=dims)",
           "torch.fft.ifftn(spectrum, dim=dims)", "eq. 10: the centred spectrum is not shifted back before iFFT"),
]

# ---- end of Diff-CL mutants ------------------------------------------------------------------------------------


# ---- A&D (GenericSSL) mutants ----------------------------------------------------------------------------------
# (kept together; each names the rule of the paper / official code it breaks)

GENERICSSL: list[Mutant] = [
    Mutant("backend/methods/genericssl/method.py",
           "ema_transfer(net.decoder_theta, net.decoder_xi, net.decoder_psi, c.ema_w)",
           "ema_transfer(net.decoder_theta, net.decoder_xi, net.decoder_xi, c.ema_w)",
           "EMA transfer: theta follows (xi + xi) / 2 instead of (xi + psi) / 2 (sec. 3.3)"),
    Mutant("backend/methods/genericssl/method.py",
           'x_u, _ = self._augment(unlabeled["image"])',
           'x_u = unlabeled["image"]',
           "SVDA skipped on the unlabeled batch (sec. 3.2)"),
    Mutant("backend/methods/genericssl/method.py",
           'x_l, y_l = self._augment(labeled["image"], labeled["label"].long())',
           'x_l, y_l = self._augment(labeled["image"])[0], labeled["label"].long()',
           "SVDA moves the labeled image but not its label"),
    Mutant("backend/methods/genericssl/method.py",
           "y_t = q_sample(self.ddpm, y0, t)",
           "y_t = y0",
           "noisy label of eq. 1 replaced by the clean label"),
    Mutant("backend/methods/genericssl/method.py",
           "p_l_xi = net.denoise(x_l, y_t, t)",
           "p_l_xi = net.denoise(x_u, y_t, t)",
           "L_deno (eq. 2): D(xi) denoises the label on the unlabeled image"),
    Mutant("backend/methods/genericssl/method.py",
           "dice_xi = hard_dice(p_l_xi.detach(), y_l, absent=c.drs_absent_dice)",
           "dice_xi = hard_dice(net.psi(x_l).detach(), y_l, absent=c.drs_absent_dice)",
           "DRS (eq. 3) measures D(psi)'s Dice instead of D(xi)'s"),
    Mutant("backend/methods/genericssl/method.py",
           "loss_diff = self._loss(p_l_psi, y_l, weights)",
           "loss_diff = self._loss(p_l_psi, y_l)",
           "L_diff (eq. 6) without the DRS class weights"),
    Mutant("backend/methods/genericssl/method.py",
           "x0_u = self.ddim_x0(x_u)",
           "x0_u = self.ddim_x0(x_l)",
           "domain-unbiased map (eq. 7) sampled on the labeled batch"),
    Mutant("backend/methods/genericssl/method.py",
           "p_u_psi = net.decoder_psi([f.detach() for f in feats_u])",
           "p_u_psi = net.decoder_theta([f.detach() for f in feats_u])",
           "class-unbiased map of eq. 7 from D(theta) instead of D(psi)"),
    Mutant("backend/methods/genericssl/method.py",
           "loss_u = self._loss(p_u_theta, pseudo)",
           "loss_u = self._loss(p_u_theta, y_l)",
           "L_u (eq. 8) supervised by the labeled batch's label instead of the RS pseudo label"),
    Mutant("backend/methods/genericssl/method.py",
           "p_u_theta = net.decoder_theta(feats_u)",
           "p_u_theta = net.decoder_theta([f.detach() for f in feats_u])",
           "L_u does not reach the shared encoder (Algorithm 1 trains E and D(theta) on it)"),
    Mutant("backend/methods/genericssl/method.py",
           "loss_last = mu * loss_u if split else",
           "loss_last = loss_u if split else",
           "eq. 9: L_u without its weight mu(t)"),
    Mutant("backend/methods/genericssl/method.py",
           "mu = self.mu_at(step)",
           "mu = self.config.mu",
           "no Gaussian ramp-up of mu (eq. 9)"),
    Mutant("backend/methods/genericssl/method.py",
           "return gaussian_warmup(step, c.rampup_steps, c.mu)",
           "return gaussian_warmup(step, c.max_steps, c.mu)",
           "ramp-up over the whole run, ignoring rampup_steps (M&Ms ramps over 100 of 300 epochs)"),
    Mutant("backend/methods/genericssl/config.py",
           "_MMS = _OfficialRun(iterations=440 // 4, rampup_epochs=100)",
           "_MMS = _OfficialRun(iterations=440 // 4)",
           "M&Ms preset without the published -cr 100 ramp-up"),
    Mutant("backend/methods/genericssl/config.py",
           "return (self.epochs + 1) * self.iterations",
           "return self.epochs * self.iterations",
           "paper presets one epoch shorter than the published runs (range(max_epoch + 1))"),
    Mutant("backend/methods/genericssl/config.py",
           'run_length_fields: ClassVar[tuple[str, ...]] = ("rampup_steps",)',
           "run_length_fields: ClassVar[tuple[str, ...]] = ()",
           "--steps does not shorten the ramp-up with the run"),
    Mutant("backend/methods/genericssl/config.py",
           "lambda_ce: float = 1.0",
           "lambda_ce: float = 0.5",
           "loss scale: CE halved against the published CE + Dice"),
    Mutant("backend/methods/genericssl/config.py",
           "drs_absent_dice: float = 0.5",
           "drs_absent_dice: float = 1.0",
           "DRS: a class absent from prediction and label scores 1 instead of the published 1/2"),
    Mutant("backend/methods/genericssl/losses.py",
           "return lambda_ce * ce + lambda_dice * per_class.mean()",
           "return lambda_ce * ce",
           "L_DiceCE without its Dice term"),
    Mutant("backend/methods/genericssl/losses.py",
           "per_class = per_class * (w if include_background else w[1:])",
           "per_class = per_class * (w if include_background else w[:-1])",
           "eq. 6: Dice terms weighted by the wrong classes' DRS weights"),
    Mutant("backend/methods/genericssl/losses.py",
           "learn = delta.clamp_min(0) * log_ratio",
           "learn = delta.clamp_max(0) * log_ratio",
           "DRS eq. 3: 'learned' accumulates the drops instead of the gains"),
    Mutant("backend/methods/genericssl/losses.py",
           "self.weights = w_lambda * difficulty.pow(self.alpha) * self.num_classes",
           "self.weights = w_lambda * difficulty * self.num_classes",
           "DRS eq. 5: difficulty without the exponent alpha"),
    Mutant("backend/methods/genericssl/rs.py",
           "return gaussian_smooth(F.gumbel_softmax(x0.float(), tau=tau, hard=False, dim=1), kernel_size, sigma)",
           "return F.gumbel_softmax(x0.float(), tau=tau, hard=False, dim=1)",
           "RS (eq. 7) without the Gaussian smoothing of the Gumbel-softmax"),
    Mutant("backend/methods/genericssl/rs.py",
           "return domain_unbiased_map(x0, tau, kernel_size, sigma), torch.softmax(logits_psi.float(), dim=1)",
           "return domain_unbiased_map(x0, tau, kernel_size, sigma), logits_psi.float()",
           "RS (eq. 7): D(psi) logits summed without their softmax"),
    Mutant("backend/methods/genericssl/method.py",
           '"combined": domain + klass}',
           '"combined": domain}',
           "review view 'combined' ignores the class-unbiased map"),
    Mutant("backend/methods/genericssl/method.py",
           'return {"diffusion": domain,',
           'return {"diffusion": klass,',
           "review view 'diffusion' shows D(psi) instead of the DDIM map"),
    Mutant("backend/methods/genericssl/config.py",
           'review_mode: str = "train"',
           'review_mode: str = "eval"',
           "review views not made the way the training targets are (eval-mode networks)"),
    Mutant("backend/methods/genericssl/method.py",
           "m.track_running_stats = False  # batch statistics",
           "m.track_running_stats = True  # batch statistics",
           "review views update the networks' running statistics"),
    Mutant("backend/methods/genericssl/method.py",
           'lambda b: {"theta": torch.softmax(self.net.theta(b).float(), dim=1)}',
           'lambda b: {"theta": torch.softmax(self.net.psi(b).float(), dim=1)}',
           "inference through D(psi) instead of D(theta) (sec. 3.3)"),
]

# ---- end of A&D mutants ----------------------------------------------------------------------------------------


# ---- the three bugs quoted in issue 23 (kept: each must stay caught) --------------------------------------------
DIFFRECT.append(Mutant(_DR, "prob = torch.softmax(logits, dim=1)", "prob = torch.softmax(logits, dim=0)",
                       "ce_dice: Dice of a softmax over the batch, not the classes (issue 23)"))
GENERICSSL.append(Mutant("backend/methods/genericssl/method.py", "p_l_psi = net.psi(x_l)", "p_l_psi = net.psi(x_u)",
                         "L_diff (eq. 6) fed the unlabeled batch instead of the labeled one (issue 23)"))
DIFFCL.append(Mutant("backend/review/queue.py", "min(values) if values else 2.0", "max(values) if values else 2.0",
                     "review queue sorted by the best method's score, not the worst (issue 23)"))


LISTED: dict[str, list[Mutant]] = {"diffrect": DIFFRECT, "diffcl": DIFFCL, "genericssl": GENERICSSL}


def source(method: str, mutant: Mutant) -> str:
    """Which set a mutant comes from: ``listed`` (this file), ``issue 23`` (the three bugs the issue quotes) or
    ``paper`` (:mod:`bench.mutants_paper`, written from the papers by someone who had not read the tests)."""
    from bench.mutants_paper import PAPER

    if mutant in PAPER.get(method, []):
        return "paper"
    return "issue 23" if mutant.why.endswith("(issue 23)") else "listed"


def _all_mutants() -> dict[str, list[Mutant]]:
    """The listed mutants of each method, then the paper-derived ones (:mod:`bench.mutants_paper`), numbered on."""
    from bench.mutants_paper import PAPER

    return {m: [*LISTED[m], *PAPER.get(m, [])] for m in LISTED}


MUTANTS: dict[str, list[Mutant]] = _all_mutants()


@dataclasses.dataclass
class Outcome:
    method: str
    index: int  # 1-based within the method; 0 = the unmutated baseline
    status: str  # caught | missed | stale | timeout | passed | failed (baseline)
    seconds: float
    detail: str = ""


def tracked_files(root: Path) -> list[str]:
    """Every file git tracks, plus untracked files it does not ignore (work in progress counts too)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=root, capture_output=True,
                         text=True, check=True).stdout
    return [line for line in out.splitlines() if line and (root / line).is_file()]


def make_copy(root: Path, files: list[str], dest: Path) -> None:
    """Hard-link ``files`` of ``root`` into ``dest`` (a mutated file is unlinked and written anew)."""
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(root / rel, target)
        except OSError:
            shutil.copy2(root / rel, target)


def apply(mutant: Mutant, tree: Path) -> str | None:
    """Apply ``mutant`` in ``tree``; return None, or why it cannot be applied (stale)."""
    path = tree / mutant.file
    if not path.is_file():
        return f"no file {mutant.file}"
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        return f"'{mutant.old}' occurs {count} times in {mutant.file}"
    if "\n" in mutant.old or "\n" in mutant.new:
        return "a mutant changes one line"
    path.unlink()  # break the hard link: the source tree stays untouched
    path.write_text(text.replace(mutant.old, mutant.new))
    return None


def run_tests(method: str, tree: Path, timeout: float) -> tuple[str, float, str]:
    """Run ``method``'s fast tests in ``tree``: ``(passed|failed|timeout, seconds, last line)``."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
           *FAST_TESTS[method]]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start, f"over {timeout:.0f} s"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    last = lines[-1] if lines else proc.stderr.strip().splitlines()[-1:] or [""]
    return ("passed" if proc.returncode == 0 else "failed"), time.perf_counter() - start, \
        (last if isinstance(last, str) else last[0])


def check(method: str, index: int, mutant: Mutant | None, files: list[str], work: Path,
          timeout: float) -> Outcome:
    """Copy the tree, apply ``mutant`` (None: the baseline), run the tests, classify."""
    tree = Path(tempfile.mkdtemp(prefix=f"{method}-{index}-", dir=work))
    try:
        make_copy(ROOT, files, tree)
        if mutant is not None:
            problem = apply(mutant, tree)
            if problem:
                return Outcome(method, index, "stale", 0.0, problem)
        result, seconds, last = run_tests(method, tree, timeout)
        if mutant is None:
            return Outcome(method, 0, result, seconds, last)
        status = {"failed": "caught", "timeout": "timeout", "passed": "missed"}[result]
        return Outcome(method, index, status, seconds, last)
    finally:
        shutil.rmtree(tree, ignore_errors=True)


def report(outcomes: list[Outcome], methods: list[str]) -> str:
    from bench.common import machine_lines

    lines = ["# Mutation check of the method tests", "", *machine_lines("cpu"),
             "- a mutant is caught when the method's fast tests fail (or time out) with it applied",
             "- set: listed (bench/mutants.py), issue 23 (the three bugs the issue quotes), paper "
             "(bench/mutants_paper.py, written from the papers by a helper that had not read the tests)",
             "- fast tests: the method's FAST_TESTS on one thread (OMP_NUM_THREADS=1), run beside the mutants", "",
             "| method | mutants | caught | missed | stale | caught per set | fast tests (baseline s) |",
             "|---|---|---|---|---|---|---|"]
    for method in methods:
        rows = [o for o in outcomes if o.method == method and o.index > 0]
        base = next((o for o in outcomes if o.method == method and o.index == 0), None)
        caught = sum(o.status in ("caught", "timeout") for o in rows)
        missed = sum(o.status == "missed" for o in rows)
        stale = sum(o.status == "stale" for o in rows)
        base_s = f"{base.seconds:.0f} ({base.status})" if base else "-"
        sets = {}
        for o in rows:
            got = sets.setdefault(source(method, MUTANTS[method][o.index - 1]), [0, 0])
            got[0] += o.status in ("caught", "timeout")
            got[1] += 1
        per_set = ", ".join(f"{name} {a}/{b}" for name, (a, b) in sets.items())
        lines.append(f"| {method} | {len(MUTANTS[method])} | {caught} | {missed} | {stale} | {per_set} | {base_s} |")
    lines += ["", "| method | # | set | result | s | mutant (file: why) |", "|---|---|---|---|---|---|"]
    for o in sorted(outcomes, key=lambda o: (methods.index(o.method), o.index)):
        if o.index == 0:
            continue
        m = MUTANTS[o.method][o.index - 1]
        note = f" ({o.detail})" if o.status in ("stale", "missed") and o.detail else ""
        lines.append(f"| {o.method} | {o.index} | {source(o.method, m)} | {o.status} | {o.seconds:.0f} | "
                     f"`{m.file}`: {m.why}{note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=list(MUTANTS), default=list(MUTANTS))
    parser.add_argument("--only", nargs="+", type=int, help="1-based mutant numbers (with one method)")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once (each test run 1 thread)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per test run")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--no-write", action="store_true",
                        help="do not write bench/results/mutants-<method>.md (one method) or mutants.md (several)")
    parser.add_argument("--extra", type=Path, metavar="FILE.py",
                        help="also run the mutants of a file that defines EXTRA = {method: [Mutant, ...]} "
                             "(numbered after the kept ones; for trying bugs before they are kept here)")
    args = parser.parse_args(argv)
    if args.extra:
        import runpy

        for method, extra in runpy.run_path(str(args.extra))["EXTRA"].items():
            MUTANTS[method] = [*MUTANTS[method], *extra]

    if args.list:
        for method in args.methods:
            for i, m in enumerate(MUTANTS[method], 1):
                print(f"{method} {i:2d} {m.file}: {m.why}\n      {m.old!r} -> {m.new!r}")
        return 0
    files = tracked_files(ROOT)
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="semiseg-mutants-") as tmp:
        work = Path(tmp)
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            bases = {m: pool.submit(check, m, 0, None, files, work, args.timeout) for m in args.methods}
            for method in args.methods:
                base = bases[method].result()
                outcomes.append(base)
                print(f"{method}: baseline {base.status} in {base.seconds:.0f} s ({base.detail})", flush=True)
            jobs = []
            for method in args.methods:
                if outcomes[[o.method for o in outcomes].index(method)].status != "passed":
                    print(f"{method}: its tests fail without a mutant; skipped", flush=True)
                    continue
                for i, mutant in enumerate(MUTANTS[method], 1):
                    if args.only and i not in args.only:
                        continue
                    jobs.append(pool.submit(check, method, i, mutant, files, work, args.timeout))
            for job in jobs:
                o = job.result()
                outcomes.append(o)
                m = MUTANTS[o.method][o.index - 1]
                print(f"{o.method} {o.index:2d} {o.status:7s} {o.seconds:5.0f} s  {m.why}", flush=True)
    text = report(outcomes, args.methods)
    print(text)
    if not args.no_write and not args.only:
        from bench.common import write_result

        name = f"mutants-{args.methods[0]}.md" if len(args.methods) == 1 else "mutants.md"
        print(f"written to {write_result(name, text)}")
    missed = [o for o in outcomes if o.status in ("missed", "stale")]
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
