"""Diff-CL's high-frequency Mamba module: selective-scan backends, high-pass filter, the HFM block."""
from __future__ import annotations

import math

import pytest
import torch

from backend.methods.diffcl import mamba
from backend.methods.diffcl.mamba import (HighFrequencyMamba, SpaceMamba, high_pass_filter, kernel_available,
                                kernel_unavailable_reason, scan_order, selective_scan, selective_scan_ref,
                                selective_scan_torch)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: no CUDA device here")


def _scan_inputs(b=2, d=5, n=4, length=29, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype).requires_grad_(True)

    u, delta, z = r(b, d, length), r(b, d, length, scale=0.5), r(b, d, length)
    A = (-(torch.rand(d, n, generator=g, dtype=torch.float64) * 1.5 + 0.05)).to(device, dtype).requires_grad_(True)
    B, C = r(b, n, length, scale=0.5), r(b, n, length, scale=0.5)
    D, bias = r(d), r(d, scale=0.2)
    cotangent = torch.randn(b, d, length, generator=g, dtype=torch.float64).to(device, dtype) * 0.2
    return (u, delta, A, B, C, D, z, bias), cotangent


def _run(fn, inputs, cotangent, **kw):
    u, delta, A, B, C, D, z, bias = inputs
    y = fn(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, **kw)
    grads = torch.autograd.grad((y * cotangent).sum(), inputs)
    return y, grads


@pytest.mark.parametrize("chunk", [None, 1, 4, 7, 29, 64])
def test_chunked_scan_matches_sequential_reference(chunk):
    inputs, cot = _scan_inputs(seed=3)
    y_ref, g_ref = _run(selective_scan_ref, inputs, cot)
    y, g = _run(selective_scan_torch, inputs, cot, chunk_size=chunk)
    assert y.dtype == torch.float32 and y.shape == (2, 5, 29)
    assert (y - y_ref).abs().max().item() < 1e-5
    for name, a, b in zip("u delta A B C D z bias".split(), g, g_ref):
        assert (a - b).abs().max().item() < 1e-5, name


def test_chunked_scan_is_exact_in_float64_and_stable_for_strong_decay():
    inputs, cot = _scan_inputs(b=1, d=3, n=2, length=50, seed=1, dtype=torch.float64)
    y_ref, _ = _run(selective_scan_ref, inputs, cot)
    y, _ = _run(selective_scan_torch, inputs, cot, chunk_size=8)
    assert (y - y_ref).abs().max().item() < 1e-12
    # delta * A of -200 per step: exp(-S) of a cumsum shortcut would overflow float32; the chunked scan must not.
    u, delta, A, B, C, D, z, bias = (t.detach().float() for t in inputs)
    y = selective_scan_torch(u, delta + 100.0, A * 0 - 2.0, B, C, D=D, delta_softplus=True, chunk_size=16)
    y_ref = selective_scan_ref(u, delta + 100.0, A * 0 - 2.0, B, C, D=D, delta_softplus=True)
    assert torch.isfinite(y).all()
    assert torch.allclose(y, y_ref, atol=1e-5)


def test_selective_scan_auto_uses_torch_on_cpu_and_rejects_unknown_backend():
    inputs, _ = _scan_inputs()
    u, delta, A, B, C, D, z, bias = (t.detach() for t in inputs)
    y = selective_scan(u, delta, A, B, C, D, z, bias, True, backend="auto")
    assert torch.allclose(y, selective_scan_torch(u, delta, A, B, C, D, z, bias, True))
    with pytest.raises(ValueError):
        selective_scan(u, delta, A, B, C, backend="triton")
    assert not kernel_available("cpu")


@CUDA
def test_kernel_backend_matches_torch_backend():
    if not kernel_available("cuda"):
        pytest.skip(f"mamba-ssm CUDA kernel unavailable: {kernel_unavailable_reason()}")
    inputs, cot = _scan_inputs(b=2, d=16, n=8, length=216, device="cuda")
    y_t, g_t = _run(lambda *a, **k: selective_scan(*a, backend="torch", **k), inputs, cot)
    y_k, g_k = _run(lambda *a, **k: selective_scan(*a, backend="cuda", **k), inputs, cot)
    torch.testing.assert_close(y_k, y_t, rtol=1e-3, atol=1e-4)
    for a, b in zip(g_k, g_t):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_scan_orders_cover_every_token_once():
    spatial = (2, 3, 4)
    for name in mamba.SCAN_DIRECTIONS:
        order = scan_order(name, spatial)
        assert sorted(order.tolist()) == list(range(24))
    # inter-slice order: consecutive tokens are the same (y, x) position in consecutive z slices
    order = scan_order("slice", spatial)
    assert order[:2].tolist() == [0, 12] and order[2].item() == 1


def _grid(n=32):
    z, y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float32),) * 3, indexing="ij")
    return z, y, x


def test_high_pass_filter_removes_constant_and_low_frequency_keeps_high_frequency():
    z, y, x = _grid(32)
    constant = torch.full((32, 32, 32), 3.0)
    low = torch.sin(2 * math.pi * 2 * z / 32) + torch.cos(2 * math.pi * 1 * x / 32)  # 1/8 Nyquist and below
    high = torch.cos(2 * math.pi * 14 * x / 32)                                         # 0.875 Nyquist
    batch = torch.stack([constant, low, high, low + high + constant])[:, None]          # [4, 1, 32, 32, 32]
    out = high_pass_filter(batch, threshold=0.8)
    assert out.dtype == torch.float32 and out.shape == batch.shape
    assert out[0].abs().max() < 1e-4
    assert out[1].abs().max() < 1e-4
    assert torch.allclose(out[2], high[None], atol=1e-4)
    assert torch.allclose(out[3], high[None], atol=1e-4)  # linear: only the high part of the mixture survives
    # a lower threshold keeps a mid frequency that 0.8 removes
    mid = torch.cos(2 * math.pi * 8 * y / 32)[None, None]                                # 0.5 Nyquist
    assert high_pass_filter(mid, 0.8).abs().max() < 1e-4
    assert torch.allclose(high_pass_filter(mid, 0.3), mid, atol=1e-4)


@CUDA
def test_high_pass_filter_runs_in_float32_under_autocast():
    x = torch.randn(2, 4, 6, 6, 6, device="cuda").half()
    with torch.autocast("cuda", dtype=torch.float16):
        out = high_pass_filter(x, 0.5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, high_pass_filter(x.float(), 0.5))


def test_hfm_block_shapes_gradients_and_backend_independent_state_dict():
    torch.manual_seed(0)
    block = HighFrequencyMamba(16, hf_threshold=0.5, d_state=4, expand=2, scan_backend="torch")
    f = torch.randn(2, 16, 3, 4, 5, requires_grad=True)
    out = block(f)
    assert out.shape == f.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert f.grad is not None and f.grad.abs().sum() > 0
    assert all(p.grad is not None for p in block.parameters())
    names = set(block.state_dict())
    assert {"mamba.paths.forward_scan.A_log", "mamba.paths.backward_scan.A_log",
            "mamba.paths.slice_scan.A_log"} <= names
    other = HighFrequencyMamba(16, hf_threshold=0.5, d_state=4, expand=2, scan_backend="auto")
    assert set(other.state_dict()) == names
    other.load_state_dict(block.state_dict())
    with torch.no_grad():
        assert torch.allclose(other(f), block(f), atol=1e-6)


def test_space_mamba_is_sensitive_to_tokens_far_away_in_every_scan_order():
    """The SSM is global: changing the last token changes the first output (through the backward scan)."""
    torch.manual_seed(0)
    sm = SpaceMamba(8, d_state=4, scan_backend="torch")
    tokens = torch.randn(1, 2 * 3 * 4, 8)
    changed = tokens.clone()
    changed[0, -1] += 1.0
    with torch.no_grad():
        a, b = sm(tokens, (2, 3, 4)), sm(changed, (2, 3, 4))
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-6


@CUDA
def test_hfm_on_cuda_with_autocast_and_both_backends():
    torch.manual_seed(0)
    block = HighFrequencyMamba(32, hf_threshold=0.6, d_state=8, scan_backend="torch").cuda()
    f = torch.randn(2, 32, 5, 6, 6, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = block(f)
    out.float().mean().backward()
    assert torch.isfinite(out.float()).all() and torch.isfinite(f.grad).all()
    if kernel_available("cuda"):
        block.mamba.scan_backend = "cuda"
        with torch.no_grad():
            ref = HighFrequencyMamba(32, 0.6, d_state=8, scan_backend="torch").cuda()
            ref.load_state_dict(block.state_dict())
            torch.testing.assert_close(block(f), ref(f), rtol=1e-3, atol=1e-3)
