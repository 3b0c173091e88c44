"""Tests for ssm.py: every scan impl against the sequential reference, the hand-written
backward under gradcheck, long float32 scans, and the Mamba mixer's mamba_ssm parameters.
"""

import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import ssm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# mamba_ssm.Mamba(d_model=32) v1 (d_inner 64, dt_rank 2, d_state 16, d_conv 4), written out
# because mamba_ssm cannot be installed here.
MAMBA_SSM_PARAMS_D32 = {
    "A_log": (64, 16),
    "D": (64,),
    "in_proj.weight": (128, 32),
    "conv1d.weight": (64, 1, 4),
    "conv1d.bias": (64,),
    "x_proj.weight": (34, 64),
    "dt_proj.weight": (64, 2),
    "dt_proj.bias": (64,),
    "out_proj.weight": (32, 64),
}


def scan_inputs(b, d, length, dtype=torch.float64, seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    return {
        "u": torch.randn(b, d, length, generator=g, dtype=dtype),
        "delta": torch.randn(b, d, length, generator=g, dtype=dtype) - 1.0,
        "A": -torch.exp(torch.randn(d, n, generator=g, dtype=dtype)),
        "B": torch.randn(b, n, length, generator=g, dtype=dtype),
        "C": torch.randn(b, n, length, generator=g, dtype=dtype),
        "D": torch.randn(d, generator=g, dtype=dtype),
        "z": torch.randn(b, d, length, generator=g, dtype=dtype),
        "delta_bias": torch.randn(d, generator=g, dtype=dtype) * 0.5,
    }


def run_scan(inputs, impl, options, seed=1):
    """Output and gradients of all given tensors for a random output gradient."""
    kwargs = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    for name in ("D", "z", "delta_bias"):
        if name not in options:
            kwargs.pop(name)
    if "delta_softplus" not in options:
        # keep dt positive without softplus
        kwargs["delta"] = kwargs["delta"].detach().exp().requires_grad_(True)
    y = ssm.selective_scan(
        **kwargs, delta_softplus="delta_softplus" in options, impl=impl
    )
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    grads = torch.autograd.grad(y, list(kwargs.values()), gy)
    return y, dict(zip(kwargs, grads))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


OPTIONS = [
    (),
    ("D",),
    ("D", "z"),
    ("delta_bias", "delta_softplus"),
    ("D", "z", "delta_bias", "delta_softplus"),
]


@pytest.mark.parametrize("impl", ["torch", "compiled"])
@pytest.mark.parametrize("length", [1, 2, 3, 17, 64])
@pytest.mark.parametrize("options", OPTIONS)
def test_impl_matches_reference(impl, length, options):
    inputs = scan_inputs(2, 3, length)
    y_ref, g_ref = run_scan(inputs, "ref", options)
    y, g = run_scan(inputs, impl, options)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    assert g.keys() == g_ref.keys()
    for name in g:
        torch.testing.assert_close(
            g[name], g_ref[name], rtol=1e-10, atol=1e-12, msg=name
        )


@pytest.mark.parametrize("chunk, batch", [(1, 2), (5, 2), (128, 2), (128, 9)])
def test_compiled_chunked_backward_matches_reference(monkeypatch, chunk, batch):
    # lengths that end inside, at and past a chunk of stored states; one or several channel
    # groups per batch item
    monkeypatch.setattr(ssm, "_CHUNK", chunk)
    inputs = scan_inputs(batch, 11, 133, n=5)
    options = OPTIONS[-1]
    y_ref, g_ref = run_scan(inputs, "ref", options)
    y, g = run_scan(inputs, "compiled", options)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    for name in g:
        torch.testing.assert_close(
            g[name], g_ref[name], rtol=1e-10, atol=1e-12, msg=name
        )


def test_compiled_forward_without_grad():
    inputs = scan_inputs(2, 3, 40)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    with torch.no_grad():
        y = ssm.selective_scan(*args[:7], args[7], True, impl="compiled")
    torch.testing.assert_close(
        y, ssm.selective_scan_ref(*args, True), rtol=1e-10, atol=1e-12
    )


def test_compiled_gradcheck(monkeypatch):
    monkeypatch.setattr(ssm, "_CHUNK", 4)
    inputs = scan_inputs(2, 3, 10)
    g = torch.Generator().manual_seed(3)
    args = (
        inputs["u"],
        inputs["delta"].exp(),
        inputs["A"],
        inputs["B"],
        inputs["C"],
        inputs["D"],
        inputs["z"],
        inputs["delta_bias"],
        torch.randn(2, 3, 16, generator=g, dtype=torch.float64),
    )
    args = [a.requires_grad_(True) for a in args]
    for softplus in (False, True):
        assert torch.autograd.gradcheck(
            lambda *a: ssm._CompiledScan.apply(*a, softplus), args
        )


@pytest.mark.parametrize("impl", ["ref", "torch", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_split_scan_carries_state(impl, dtype):
    # two calls, the second starting from the first's last state, equal one call over the
    # whole sequence (float64 reference): outputs, last state, and the gradients of every
    # input, the loss reading both the outputs and the last state
    length, cut = 150, 61
    inputs = scan_inputs(2, 3, length)
    names = ["u", "delta", "B", "C", "z"]  # the per-step inputs; A, D, delta_bias are shared
    leaves = {k: v.to(dtype).requires_grad_(True) for k, v in inputs.items()}
    first = {k: leaves[k][..., :cut] for k in names}
    second = {k: leaves[k][..., cut:] for k in names}
    shared = {k: leaves[k] for k in ("A", "D", "delta_bias")}
    opts = {"delta_softplus": True, "impl": impl, "return_last_state": True}
    y1, h1 = ssm.selective_scan(**first, **shared, **opts)
    y2, h2 = ssm.selective_scan(**second, **shared, initial_state=h1, **opts)
    y = torch.cat([y1, y2], dim=-1)

    ref_leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y_ref, h_ref = ssm.selective_scan(
        **ref_leaves, delta_softplus=True, impl="ref", return_last_state=True
    )
    g = torch.Generator().manual_seed(4)
    gy = torch.randn(y_ref.shape, generator=g, dtype=torch.float64)
    gh = torch.randn(h_ref.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(
        (y.double() * gy).sum() + (h2.double() * gh).sum(), list(leaves.values())
    )
    grads_ref = torch.autograd.grad(
        (y_ref * gy).sum() + (h_ref * gh).sum(), list(ref_leaves.values())
    )
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert y.dtype == h2.dtype == dtype and h2.shape == (2, 3, 16)
    assert rel_err(y, y_ref) <= tol
    assert rel_err(h2, h_ref) <= tol
    for name, grad, grad_ref in zip(leaves, grads, grads_ref):
        assert rel_err(grad, grad_ref) <= tol, name


@pytest.mark.parametrize("impl", ["ref", "torch", "compiled", "cuda"])
def test_initial_state_shape_and_cuda_are_checked(impl):
    inputs = scan_inputs(1, 2, 8)
    args = (inputs["u"], inputs["delta"].exp(), inputs["A"], inputs["B"], inputs["C"])
    state = torch.zeros(1, 2, 15, dtype=torch.float64)
    match = "initial_state" if impl != "cuda" else "impl='torch'"
    with pytest.raises(ValueError, match=match):
        # the cuda scan is called directly: resolving impl='cuda' fails first on a CPU
        ssm._IMPLS[impl](*args, initial_state=state)


@pytest.mark.parametrize("dt_max", [10.0, 1e-3])
def test_compiled_float32_long_scan(dt_max):
    # dt spans 1e-4..10 (slow and instant decay), or only slow decays whose float32 rounding
    # would add up over thousands of steps, over 48,000 steps; the float64 kernel is the
    # oracle here because the reference loop takes ~15 s at this length (the float64 kernel
    # matches the reference in the tests above and in bench/bench_scan.py)
    b, d, length = 1, 3, 48_000
    inputs = scan_inputs(b, d, length)
    g = torch.Generator().manual_seed(2)
    log_dt = torch.empty(b, d, length, dtype=torch.float64)
    inputs["delta"] = log_dt.uniform_(math.log(1e-4), math.log(dt_max), generator=g)
    options = ("D", "z")
    y64, g64 = run_scan(inputs, "compiled", options)
    y32, g32 = run_scan({k: v.float() for k, v in inputs.items()}, "compiled", options)
    assert y32.dtype == torch.float32
    assert torch.isfinite(y32).all()
    assert rel_err(y32, y64) <= 1e-5
    for name in g64:
        assert torch.isfinite(g32[name]).all(), name
        assert rel_err(g32[name], g64[name]) <= 1e-5, name
    y_ref = ssm.selective_scan_ref(
        inputs["u"][:, :1],
        inputs["delta"][:, :1].exp(),
        inputs["A"][:1],
        inputs["B"],
        inputs["C"],
        inputs["D"][:1],
        inputs["z"][:, :1],
    )
    assert rel_err(y32[:, :1], y_ref) <= 1e-5


def test_compiled_is_first_order_only():
    inputs = scan_inputs(1, 2, 8)
    u = inputs["u"].requires_grad_(True)
    y = ssm.selective_scan(
        u, inputs["delta"].exp(), inputs["A"], inputs["B"], inputs["C"], impl="compiled"
    )
    (gu,) = torch.autograd.grad(y.square().sum(), u, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        gu.sum().backward()


def test_bad_impl_and_dtype():
    inputs = scan_inputs(1, 2, 8)
    args = (inputs["u"], inputs["delta"].exp(), inputs["A"], inputs["B"], inputs["C"])
    with pytest.raises(ValueError, match="'fast'"):
        ssm.selective_scan(*args, impl="fast")
    with pytest.raises(ValueError, match="float16"):
        ssm.selective_scan(*(a.half() for a in args), impl="compiled")


def test_failed_build_is_reported(monkeypatch, capsys, tmp_path):
    bad_source = tmp_path / "ssm_kernel.cpp"
    bad_source.write_text("this is not C++")
    monkeypatch.setattr(ssm, "_KERNEL_PATH", str(bad_source))
    monkeypatch.setattr(ssm, "_BUILD_DIR", str(tmp_path / "build"))
    monkeypatch.setattr(ssm, "_kernel", None)
    monkeypatch.setattr(ssm, "_kernel_error", None)
    monkeypatch.setattr(ssm, "_fallback_reported", False)
    inputs = scan_inputs(1, 2, 8)
    args = (inputs["u"], inputs["delta"].exp(), inputs["A"], inputs["B"], inputs["C"])
    with pytest.raises(RuntimeError, match="impl='torch'") as failure:
        ssm.selective_scan(*args, impl="compiled")
    # every build tried (-march=native first) keeps the compiler's whole output in a log
    # file that the message names
    logs = re.findall(r"whole output in (\S+\.log)", str(failure.value))
    assert len(logs) == len(ssm._arch_flag_choices())
    assert all("this is not C++" in open(log).read() for log in logs)
    y = ssm.selective_scan(*args, impl="auto")
    ssm.selective_scan(*args, impl="auto")
    torch.testing.assert_close(y, ssm.selective_scan_ref(*args))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "impl='torch'" in lines[0]


def test_mamba_parameters_match_mamba_ssm():
    torch.manual_seed(0)
    m = ssm.Mamba(32)
    shapes = {name: tuple(p.shape) for name, p in m.named_parameters()}
    assert shapes == MAMBA_SSM_PARAMS_D32
    assert m.A_log._no_weight_decay and m.D._no_weight_decay
    torch.testing.assert_close(
        m.A_log, torch.log(torch.arange(1, 17.0)).expand(64, 16), rtol=0, atol=0
    )
    torch.testing.assert_close(m.D, torch.ones(64), rtol=0, atol=0)
    assert m.dt_proj.weight.abs().max() <= 2**-0.5
    dt = torch.nn.functional.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert m.conv1d.padding == (3,) and m.conv1d.groups == 64


def test_mamba_state_dict_round_trip():
    torch.manual_seed(0)
    a, b = ssm.Mamba(32), ssm.Mamba(32, impl="torch")
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 50, 32)
    torch.testing.assert_close(b(x), a(x))


def test_mamba_compiled_matches_torch():
    torch.manual_seed(0)
    m = ssm.Mamba(16, impl="compiled")
    # trained-looking step sizes and decays, not just the initial ones
    with torch.no_grad():
        m.dt_proj.bias.normal_(-2.0, 2.0)
        m.A_log.add_(torch.randn_like(m.A_log))
    x = torch.randn(2, 300, 16, requires_grad=True)
    y = m(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *m.parameters()])
    m.impl = "torch"
    y_t = m(x)
    grads_t = torch.autograd.grad(y_t.square().sum(), [x, *m.parameters()])
    assert y.shape == x.shape
    assert rel_err(y, y_t) <= 1e-5
    for name, g, g_t in zip(["x", *dict(m.named_parameters())], grads, grads_t):
        assert rel_err(g, g_t) <= 1e-5, name


@pytest.mark.parametrize(
    "batch, c_out, c_in, length",
    # rows not a multiple of the kernel's 6, steps shorter than one tile of 16, a tail within
    # a tile and across the 1,024-step tasks, a single input channel
    [(1, 7, 3, 5), (2, 34, 64, 1500), (1, 128, 1, 2049), (3, 1, 20, 37)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_projection_matches_float64_product(batch, c_out, c_in, length, dtype):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(c_out, c_in, generator=g, dtype=torch.float64)
    x = torch.randn(batch, c_in, length, generator=g, dtype=torch.float64)
    expected = torch.einsum("oi,bil->bol", weight, x)
    out = ssm.project_compiled(weight.to(dtype), x.to(dtype))
    assert out.dtype == dtype and out.shape == (batch, c_out, length)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(out, expected) <= tol
    # a strided x (a slice of a wider tensor, as the mixer's chunks are) gives the same
    wide = torch.cat([x, x], dim=1).to(dtype)
    torch.testing.assert_close(ssm.project_compiled(weight.to(dtype), wide[:, c_in:]), out)
    with pytest.raises(ValueError, match="channels"):
        ssm.project_compiled(weight.to(dtype), wide)
    with pytest.raises(ValueError, match="float32 or float64"):
        ssm.project_compiled(weight.half(), x.half())


def test_mamba_without_gradients_projects_with_the_compiled_kernel(monkeypatch):
    torch.manual_seed(0)
    m = ssm.Mamba(16, impl="compiled")
    x = torch.randn(2, 16, 300)
    y_grad, _ = m.mix(x)  # with gradients: torch.bmm, the reference
    calls = []

    def counted(weight, inputs):
        calls.append(tuple(weight.shape))
        return ssm._project(weight, inputs)

    monkeypatch.setattr(ssm, "project_compiled", counted)
    with torch.no_grad():
        m.mix(x)
    assert calls == [(64, 16), (33, 32), (32, 1), (16, 32)]  # in, x, dt and out projections
    monkeypatch.undo()
    with torch.no_grad():
        y, _ = m.mix(x)
    assert rel_err(y, y_grad) <= 1e-5


@pytest.mark.parametrize(
    "batch, c_in, c_out, length, taps, stride, groups",
    [
        (4, 128, 256, 300, 41, 2, 16),  # the discriminator's layers, shorter
        (2, 256, 512, 203, 41, 4, 16),
        (1, 64, 64, 75, 41, 1, 4),
        # rows not a multiple of the kernel's 6, taps not a multiple of the stride, an output
        # over several tasks (256 steps each; 512 for the weight gradient), a signal shorter
        # than the kernel, one channel per group
        (2, 12, 20, 1600, 7, 3, 4),
        (3, 5, 5, 9, 41, 4, 5),
        (1, 3, 6, 1, 3, 1, 1),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_grouped_conv_matches_float64_conv1d(
    batch, c_in, c_out, length, taps, stride, groups, dtype
):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c_in, length, generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, c_in // groups, taps, generator=g, dtype=torch.float64)
    bias = torch.randn(c_out, generator=g, dtype=torch.float64)
    args = (stride, (taps - 1) // 2, groups)
    inputs = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
    expected = F.conv1d(inputs[0], inputs[1], inputs[2], args[0], args[1], 1, args[2])
    gout = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, inputs, gout)
    inputs = [t.to(dtype).requires_grad_(True) for t in (x, weight, bias)]
    out = ssm.conv1d_compiled(*inputs, *args)
    grads = torch.autograd.grad(out, inputs, gout.to(dtype))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert out.dtype == dtype and out.shape == expected.shape
    assert rel_err(out, expected) <= tol
    for name, grad, expected_grad in zip(("x", "weight", "bias"), grads, expected_grads):
        assert rel_err(grad, expected_grad) <= tol, name


@pytest.mark.parametrize("c_in, c_out, stride", [(128, 128, 2), (512, 1024, 4), (1024, 1024, 1)])
def test_compiled_grouped_conv_float32_error_is_within_25x_f_conv1d(c_in, c_out, stride):
    # The discriminator's grouped 41-tap layers in float32 against float64: the forward and
    # both gradients are Winograd, whose transforms add rounding (measured 1-5e-6 of the
    # largest value, 2-17x a direct float32 convolution's error); bounded relative to the
    # largest value, and against PyTorch's direct float32 convolution.
    g = torch.Generator().manual_seed(0)
    groups = 4 if c_in == 128 else 16
    x = torch.randn(2, c_in, 400, generator=g, dtype=torch.float64)
    weight = torch.randn(c_out, c_in // groups, 41, generator=g, dtype=torch.float64)
    weight /= (c_in // groups * 41) ** 0.5
    args = (stride, 20, 1, groups)
    gout = torch.randn(2, c_out, (400 - 1) // stride + 1, generator=g, dtype=torch.float64)

    def output_and_grads(conv, dtype):
        inputs = [t.to(dtype).requires_grad_(True) for t in (x, weight)]
        out = conv(*inputs)
        return [out, *torch.autograd.grad(out, inputs, gout.to(dtype))]

    exact = output_and_grads(lambda x, w: F.conv1d(x, w, None, *args), torch.float64)
    direct = output_and_grads(lambda x, w: F.conv1d(x, w, None, *args), torch.float32)
    ours = output_and_grads(
        lambda x, w: ssm.conv1d_compiled(x, w, None, stride, 20, groups), torch.float32
    )
    for name, got, reference, expected in zip(("out", "x", "weight"), ours, direct, exact):
        error = (got.double() - expected).abs().max()
        assert error / expected.abs().max() < 1e-5, name
        assert error < 25 * (reference.double() - expected).abs().max(), name


def test_compiled_grouped_conv_computes_only_the_gradients_a_pass_uses(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 50, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    out = ssm.conv1d_compiled(x, weight, bias, 2, 2, 4)
    loss = out.square().sum()
    called = []
    kernel_function = ssm._kernel_function
    monkeypatch.setattr(
        ssm,
        "_kernel_function",
        lambda name, dtype: called.append(name) or kernel_function(name, dtype),
    )
    # as train_step's two passes: the input's gradient, then the weights'
    (gx,) = torch.autograd.grad(loss, [x], retain_graph=True)
    assert called == ["grouped_conv_bwd_input"]
    loss.backward(inputs=[weight, bias])
    assert called == ["grouped_conv_bwd_input", "grouped_conv_bwd_weight"] and x.grad is None
    expected = torch.autograd.grad(
        F.conv1d(x, weight, bias, 2, 2, 1, 4).square().sum(), [x, weight, bias]
    )
    for grad, expected_grad in zip((gx, weight.grad, bias.grad), expected):
        torch.testing.assert_close(grad, expected_grad)


def test_compiled_grouped_conv_rejects_what_it_cannot_compute():
    x = torch.randn(1, 8, 20)
    with pytest.raises(ValueError, match="does not fit 8 channels"):
        ssm.conv1d_compiled(x, torch.randn(8, 4, 5), None, 1, 2, 4)
    with pytest.raises(ValueError, match="float32 or float64"):
        ssm.conv1d_compiled(x.half(), torch.randn(8, 2, 5).half(), None, 1, 2, 4)


@pytest.mark.parametrize("with_prev", [False, True])
def test_compiled_conv_gradcheck(with_prev):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, generator=g, dtype=torch.float64)
    weight = torch.randn(3, 4, generator=g, dtype=torch.float64)
    bias = torch.randn(3, generator=g, dtype=torch.float64)
    prev = torch.randn(2, 3, 3, generator=g, dtype=torch.float64) if with_prev else None
    args = [a.requires_grad_(True) for a in (x, weight, bias, prev) if a is not None]
    if not with_prev:
        args.append(None)
    assert torch.autograd.gradcheck(ssm._CompiledConvSiLU.apply, args)
    # the same function as conv1d over [prev, x] (zeros without prev), then SiLU
    front = prev if with_prev else torch.zeros(2, 3, 3, dtype=torch.float64)
    expected = F.silu(F.conv1d(torch.cat([front, x], -1), weight[:, None], bias, groups=3))
    torch.testing.assert_close(ssm._CompiledConvSiLU.apply(*args), expected)


@pytest.mark.parametrize("length", [1, 5, 200])
def test_mamba_impls_match_reference_float64(length):
    torch.manual_seed(0)
    m = ssm.Mamba(8, impl="ref").double()
    with torch.no_grad():
        m.dt_proj.bias.normal_(-2.0, 2.0)
    x = torch.randn(2, length, 8, dtype=torch.float64, requires_grad=True)
    y_ref = m(x)
    g_ref = torch.autograd.grad(y_ref.square().sum(), [x, *m.parameters()])
    for impl in ("torch", "compiled"):
        m.impl = impl
        y = m(x)
        grads = torch.autograd.grad(y.square().sum(), [x, *m.parameters()])
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
        for name, g, g_r in zip(["x", *dict(m.named_parameters())], grads, g_ref):
            torch.testing.assert_close(
                g, g_r, rtol=1e-9, atol=1e-11, msg=f"{impl} {name}"
            )


def test_import_builds_nothing():
    # the kernel is built on first use, and importing ssm loads no compiler or JIT
    code = (
        "import sys, ssm; assert ssm._kernel is None; "
        "assert not {'numba', 'torch.utils.cpp_extension'} & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
