"""Selective scan and the Mamba (v1) mixer, CPU first.

Parameter names, shapes and initialisation follow state-spaces/mamba (Apache-2.0),
`mamba_ssm.modules.mamba_simple.Mamba`, so state_dicts load into either with strict=True.

All scan implementations share one signature and shape convention (those of mamba_ssm's
`selective_scan_fn`):
    u, delta, z: [B, D, L]; A: [D, N]; B, C: [B, N, L]; D, delta_bias: [D];
    initial_state: [B, D, N] or None; returns y [B, D, L], or (y, last_state [B, D, N]) with
    return_last_state,
with, per batch b and channel d (state size N):
    dt_t = softplus(delta_t + delta_bias) if delta_softplus else delta_t + delta_bias
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t,   h_{-1} = initial_state (default 0)
    y_t = C_t . h_t + D * u_t,   then y_t *= silu(z_t) when z is given;   last_state = h_{L-1}.
So a sequence scanned in pieces, each starting from the last state of the one before, gives
the same y as one scan of the whole.

Implementations, top to bottom: `selective_scan_ref` (the oracle), the plain PyTorch loop
("torch"), the compiled CPU kernel ("compiled"), mamba_ssm's CUDA kernel ("cuda"), then the one
entry point `selective_scan(..., impl=...)` and `Mamba`.

The compiled kernel is C++ (ssm_kernel.cpp) built with g++ on first use (a few seconds: no
torch headers; called through ctypes), not numba: the scan spends most of its time in
exp(dt * A), 16 per step, and numba (no SVML here) calls libm's exp lane by lane, while the
kernel's own exp vectorises (over channels in the forward, over the 16 states in the
backward). float32 inputs are computed in float32 (the kernel's comment says why that stays
within 1e-5 of float64 over 48,000 steps); the forward stores the state every _CHUNK steps
and the backward recomputes each chunk. The kernel also has Mamba's causal depthwise conv +
SiLU, because oneDNN's depthwise conv backward costs as much as the whole scan, and, for other
modules, the inference-only LayerNorm and projections and the discriminators' grouped conv
(`conv1d_compiled`), which share its build.
"""

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F


def selective_scan_ref(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    initial_state=None,
    return_last_state=False,
):
    """The scan as an obvious sequential loop: the oracle for every other implementation.

    Args and Returns: as `selective_scan` (computed in the dtype of u).
    """
    dt = _step_sizes(delta, delta_bias, delta_softplus)
    h = _start_state(u, A, initial_state)
    ys = []
    # unbind, not indexing: each indexed step would cost a full-size gradient in backward
    steps = zip(dt.unbind(-1), B.unbind(-1), C.unbind(-1), u.unbind(-1))
    for dt_t, B_t, C_t, u_t in steps:
        h = torch.exp(dt_t[..., None] * A) * h + (dt_t * u_t)[..., None] * B_t[:, None]
        ys.append((h * C_t[:, None]).sum(-1))
    y = _skip_and_gate(torch.stack(ys, dim=-1), u, D, z)
    return (y, h) if return_last_state else y


def _step_sizes(delta, delta_bias, delta_softplus):
    # dt [B, D, L]: delta + delta_bias, through softplus when asked (the compiled kernel does
    # this inside the scan)
    dt = delta if delta_bias is None else delta + delta_bias[:, None]
    return F.softplus(dt) if delta_softplus else dt


def _skip_and_gate(y, u, D, z):
    # y [B, D, L] of the recurrence -> (y + D * u) * silu(z), each part when given
    if D is not None:
        y = y + D[:, None] * u
    return y if z is None else y * F.silu(z)


def _start_state(u, A, initial_state):
    # h_{-1} [B, D, N] in the dtype of u: the given state, else zeros
    shape = (u.shape[0], u.shape[1], A.shape[1])
    if initial_state is None:
        return u.new_zeros(shape)
    if tuple(initial_state.shape) != shape:
        raise ValueError(
            f"initial_state must be [B, D, N] = {list(shape)}, got {list(initial_state.shape)}"
        )
    return initial_state.to(u.dtype)


def _selective_scan_torch(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    initial_state=None,
    return_last_state=False,
):
    # The exponentials and inputs for all steps are computed at once so the time loop holds
    # only the recurrence. Steps are unbound and outputs collected in a list: indexing a step
    # or writing into slices of a growing tensor would make the backward O(L^2).
    dt = _step_sizes(delta, delta_bias, delta_softplus).transpose(1, 2)  # [B, L, D]
    dA = torch.exp(dt[..., None] * A)  # [B, L, D, N]
    dBu = (dt * u.transpose(1, 2))[..., None] * B.transpose(1, 2)[:, :, None, :]
    Ct = C.transpose(1, 2)  # [B, L, N]
    h = _start_state(u, A, initial_state)
    ys = []
    for dA_t, dBu_t, C_t in zip(dA.unbind(1), dBu.unbind(1), Ct.unbind(1)):
        h = dA_t * h + dBu_t
        ys.append(torch.matmul(h, C_t[:, :, None]))
    y = _skip_and_gate(torch.cat(ys, dim=-1), u, D, z)  # [B, D, L]
    return (y, h) if return_last_state else y


_KERNEL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ssm_kernel.cpp")
_BUILD_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build", "ssm")
# -fno-trapping-math: without it g++ keeps the clamps in ssm_kernel.cpp's exp as branches and
# vectorises nothing (the kernel does not use floating-point exceptions)
_BASE_FLAGS = ["-O3", "-fno-trapping-math", "-fopenmp", "-std=c++17", "-shared", "-fPIC"]
# Steps per block: the forward stores each channel's state at the start of every block and the
# backward recomputes a block from it, so the forward keeps [B, D, L / K, N] instead of the whole
# [B, D, L, N] history; a block's rows of B, C and their gradients (K x N each) stay in cache.
_CHUNK = 128
# Backward tasks per call: each batch item's channels are split into this many groups over the
# batch (at least one group per item), so that small batches still use every thread; each group
# sums its own dB and dC (a [L, N] buffer per group), so the result does not depend on the
# thread count. (The forward's task is one SIMD vector of channels, chosen by the kernel.)
_TASKS = 8
# The kernel keeps a channel's states in fixed-size arrays of this many (ssm_kernel.cpp kMaxN).
_MAX_STATE = 64
_kernel = None
_kernel_error = None


@functools.lru_cache(maxsize=None)
def _cpu_id():
    # What a -march=native build depends on: a library built on a machine with AVX-512 dies
    # with SIGILL on one without, so the instruction sets are part of the cache key.
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _arch_flag_choices():
    # -march=native first; if the compiler rejects it, AVX2 + FMA where the CPU has them, then
    # the compiler's generic target.
    choices = [["-march=native"]]
    if {"avx2", "fma"} <= set(_cpu_id().split()):
        choices.append(["-mavx2", "-mfma"])
    return choices + [[]]


def _build_kernel(compiler, arch_flags):
    # -> (path of the built library, None) or (None, the compiler's error message with the path
    # of the log file that holds its whole output)
    with open(_KERNEL_PATH) as f:
        source = f.read()
    flags = _BASE_FLAGS + arch_flags
    key_text = "\n".join([source, " ".join(flags), _cpu_id()])
    key = hashlib.sha1(key_text.encode()).hexdigest()[:16]
    lib_path = os.path.join(_BUILD_DIR, f"scan_{key}.so")
    if os.path.exists(lib_path):
        return lib_path, None
    os.makedirs(_BUILD_DIR, exist_ok=True)
    # a per-process output name, renamed when done: concurrent first uses do not clash
    tmp = f"{lib_path}.{os.getpid()}.tmp"
    cmd = [compiler, *flags, _KERNEL_PATH, "-o", tmp]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        log_path = os.path.join(_BUILD_DIR, f"scan_{key}.log")
        with open(log_path, "w") as f:
            f.write(" ".join(cmd) + "\n\n" + result.stdout + result.stderr)
        lines = result.stderr.splitlines() or ["no output"]
        first = next((line for line in lines if "error" in line), lines[0])
        return None, f"{first.strip()} (whole output in {log_path})"
    os.replace(tmp, lib_path)
    return lib_path, None


def _load_kernel():
    # Built on first use (about two seconds with g++) from ssm_kernel.cpp into build/ next to
    # this file, cached under a hash of the source, the flags and the CPU.
    global _kernel, _kernel_error
    if _kernel is not None:
        return _kernel
    if _kernel_error is not None:
        raise RuntimeError(_kernel_error)
    try:
        compiler = shutil.which("g++") or shutil.which("c++")
        if compiler is None:
            raise RuntimeError("no C++ compiler (g++ or c++) on PATH")
        errors = []
        for arch_flags in _arch_flag_choices():
            lib_path, error = _build_kernel(compiler, arch_flags)
            if lib_path is not None:
                break
            errors.append(f"{' '.join(arch_flags) or 'generic'}: {error}")
        else:
            raise RuntimeError(f"{compiler} failed: " + "; ".join(errors))
        lib = ctypes.CDLL(lib_path)
    except (OSError, RuntimeError) as e:
        _kernel_error = f"compiled scan kernel unavailable ({e}); use impl='torch'"
        raise RuntimeError(_kernel_error) from e
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suffix in ("f32", "f64"):
        getattr(lib, f"scan_fwd_{suffix}").argtypes = (
            [p] * 9 + [i64] * 6 + [i32] + [p] * 3 + [i32]
        )
        getattr(lib, f"scan_bwd_{suffix}").argtypes = (
            [p] * 8 + [i64] * 6 + [i32] + [p] * 11 + [i32]
        )
        getattr(lib, f"conv_fwd_{suffix}").argtypes = [p] * 4 + [i64] * 4 + [p, i32]
        getattr(lib, f"conv_bwd_{suffix}").argtypes = (
            [p] * 5 + [i64] * 4 + [p] * 4 + [i32]
        )
        getattr(lib, f"norm_fwd_{suffix}").argtypes = (
            [p] * 3 + [i64] * 3 + [ctypes.c_double] * 2 + [p, i32]
        )
        getattr(lib, f"project_fwd_{suffix}").argtypes = [p] * 2 + [i64] * 4 + [p, i32]
        getattr(lib, f"grouped_conv_fwd_{suffix}").argtypes = [p] * 3 + [i64] * 9 + [p] * 2 + [i32]
        for part in ("input", "weight"):
            getattr(lib, f"grouped_conv_bwd_{part}_{suffix}").argtypes = (
                [p] * 2 + [i64] * 9 + [p] * 2 + [i32]
            )
    _kernel = lib
    return lib


def compiled_kernel_available() -> bool:
    """Whether the compiled CPU kernel builds and loads here (built on the first call)."""
    try:
        _load_kernel()
        return True
    except RuntimeError:
        return False


def _kernel_function(name, dtype):
    # the compiled kernel's `name` for float32 or float64 tensors, e.g. scan_fwd_f32
    suffix = "f32" if dtype == torch.float32 else "f64"
    return getattr(_load_kernel(), f"{name}_{suffix}")


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def _groups(nb, nd):
    # channel groups per batch item, see _TASKS
    return min(nd, max(1, -(-_TASKS // nb)))


class _CompiledScan(torch.autograd.Function):
    # (y, last_state) = the scan with its bias, softplus and gate, on contiguous CPU tensors of
    # one dtype; u, delta: [B, D, L]; A: [D, N]; B, C: [B, N, L]; D: [D]; z: [B, D, L] or None;
    # delta_bias: [D] or None; h0: [B, D, N] or None (zeros). The backward, whose SIMD lanes
    # are the states, takes B and C time-major ([B, L, N]: one row per step), made only there.

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, softplus):
        nb, nd, length = u.shape
        n_state = A.shape[1]
        out = torch.empty_like(u)
        last = u.new_empty(nb, nd, n_state)
        hs = None
        ctx.chunk, ctx.softplus = _CHUNK, softplus
        if any(ctx.needs_input_grad):
            hs = u.new_empty(nb, nd, -(-length // ctx.chunk), n_state)
        _kernel_function("scan_fwd", u.dtype)(
            *map(_ptr, (u, delta, A, B, C, D, delta_bias, z, h0)),
            nb,
            nd,
            length,
            n_state,
            ctx.chunk,
            _groups(nb, nd),
            int(softplus),
            *map(_ptr, (out, hs, last)),
            torch.get_num_threads(),
        )
        # the backward reads the initial state from hs (the first stored state)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, hs)
        return out, last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout, glast):
        u, delta, A, B, C, D, z, delta_bias, hs = ctx.saved_tensors
        B, C = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()
        nb, nd, length = u.shape
        n_state = A.shape[1]
        groups = _groups(nb, nd)
        gout, glast = gout.contiguous(), glast.contiguous()
        gu, gdelta = torch.empty_like(u), torch.empty_like(u)
        gz = torch.empty_like(z) if z is not None else None
        gh0 = torch.empty_like(glast) if ctx.needs_input_grad[8] else None
        gA = u.new_empty(nb, nd, n_state, dtype=torch.float64)
        gD = u.new_empty(nb, nd, dtype=torch.float64)
        gB = u.new_empty(nb, groups, length, n_state)
        gC = u.new_empty(nb, groups, length, n_state)
        _kernel_function("scan_bwd", u.dtype)(
            *map(_ptr, (u, delta, A, B, C, D, delta_bias, z)),
            nb,
            nd,
            length,
            n_state,
            ctx.chunk,
            groups,
            int(ctx.softplus),
            *map(_ptr, (hs, gout, glast, gu, gdelta, gz, gA, gD, gB, gC, gh0)),
            torch.get_num_threads(),
        )
        gbias = gdelta.sum((0, 2)) if delta_bias is not None else None
        return (
            gu,
            gdelta,
            gA.sum(0).to(u.dtype),
            gB.sum(1).transpose(1, 2),
            gC.sum(1).transpose(1, 2),
            gD.sum(0).to(u.dtype),
            gz,
            gbias,
            gh0,
            None,
        )


def _selective_scan_compiled(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    initial_state=None,
    return_last_state=False,
):
    if u.device.type != "cpu":
        raise ValueError(
            f"impl='compiled' runs on CPU, got {u.device}: use impl='cuda'"
        )
    if u.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"impl='compiled' needs float32 or float64, got {u.dtype}")
    if A.shape[1] > _MAX_STATE:
        raise ValueError(
            f"impl='compiled' takes at most {_MAX_STATE} states, got {A.shape[1]}: "
            "use impl='torch'"
        )
    if D is None:
        D = u.new_zeros(u.shape[1])
    if initial_state is not None:
        initial_state = _start_state(u, A, initial_state).contiguous()

    def prepare(t):
        return None if t is None else t.to(u.dtype).contiguous()

    # The kernel does everything: bias, softplus, recurrence, skip and gate (in PyTorch the
    # elementwise passes took 40 % as long as the recurrence).
    y, last_state = _CompiledScan.apply(
        u.contiguous(),
        prepare(delta),
        prepare(A),
        prepare(B),
        prepare(C),
        prepare(D),
        prepare(z),
        prepare(delta_bias),
        initial_state,
        delta_softplus,
    )
    return (y, last_state) if return_last_state else y


class _CompiledConvSiLU(torch.autograd.Function):
    # silu(causal depthwise conv1d(x)) on contiguous CPU tensors of one dtype;
    # x: [B, D, L]; weight: [D, K]; bias: [D]; prev: [B, D, K-1], the inputs before x, or None
    # for zeros. Same result as nn.Conv1d(D, D, K, groups=D) on [prev, x] (or on x with
    # padding=K-1, cut to the first L outputs), then SiLU.

    @staticmethod
    def forward(ctx, x, weight, bias, prev):
        out = torch.empty_like(x)
        _kernel_function("conv_fwd", x.dtype)(
            _ptr(x),
            _ptr(prev),
            _ptr(weight),
            _ptr(bias),
            *x.shape,
            weight.shape[1],
            _ptr(out),
            torch.get_num_threads(),
        )
        ctx.save_for_backward(x, weight, bias, prev)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout):
        x, weight, bias, prev = ctx.saved_tensors
        gout = gout.contiguous()
        gx = torch.empty_like(x)
        gprev = torch.empty_like(prev) if ctx.needs_input_grad[3] else None
        gw = x.new_empty(x.shape[0], *weight.shape, dtype=torch.float64)
        gb = x.new_empty(x.shape[:2], dtype=torch.float64)
        _kernel_function("conv_bwd", x.dtype)(
            _ptr(x),
            _ptr(prev),
            _ptr(weight),
            _ptr(bias),
            _ptr(gout),
            *x.shape,
            weight.shape[1],
            _ptr(gx),
            _ptr(gprev),
            _ptr(gw),
            _ptr(gb),
            torch.get_num_threads(),
        )
        return gx, gw.sum(0).to(x.dtype), gb.sum(0).to(x.dtype), gprev


def _conv_silu_compiled(x, weight, bias, prev=None):
    # x: [B, D, L]; weight: [D, 1, K] (nn.Conv1d's); bias: [D] or None; prev: [B, D, K-1] or
    # None (see _CompiledConvSiLU)
    if bias is None:
        bias = x.new_zeros(x.shape[1])
    return _CompiledConvSiLU.apply(
        x.contiguous(),
        weight.to(x.dtype).reshape(weight.shape[0], -1).contiguous(),
        bias.to(x.dtype).contiguous(),
        None if prev is None else prev.to(x.dtype).contiguous(),
    )


@functools.lru_cache(maxsize=None)
def _cuda_import_error():
    # a failed import is retried on every call, so remember the outcome
    try:
        import causal_conv1d  # noqa: F401
        import mamba_ssm.ops.selective_scan_interface  # noqa: F401
    except ImportError as e:
        return f"mamba_ssm or causal_conv1d does not import ({e})"
    return None


def _cuda_kernels_error(x):
    # None when mamba_ssm's scan and causal_conv1d can run on x, else the reason they cannot
    if not x.is_cuda:
        return f"tensors are on {x.device}, not a GPU"
    return _cuda_import_error()


def _selective_scan_cuda(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    initial_state=None,
    return_last_state=False,
):
    if initial_state is not None:
        raise ValueError(
            "impl='cuda' (mamba_ssm's selective_scan_fn) takes no initial_state: "
            "use impl='torch' on the GPU to continue a scan"
        )
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
    )


_fallback_reported = False


def _resolve_impl(impl, x):
    # "auto" -> the fastest implementation that runs here; says once on stderr if that is
    # the PyTorch loop.
    global _fallback_reported
    if impl not in IMPLS:
        raise ValueError(f"unknown scan impl {impl!r}, use one of {IMPLS}")
    if impl == "cuda" and _cuda_kernels_error(x) is not None:
        raise ValueError(f"impl='cuda' cannot run: {_cuda_kernels_error(x)}")
    if impl != "auto":
        return impl
    reason = _cuda_kernels_error(x)
    if reason is None:
        return "cuda"
    if x.device.type == "cpu":
        try:
            _load_kernel()
            return "compiled"
        except RuntimeError as e:
            reason = str(e)
    else:
        reason += "; the compiled kernel is CPU-only"
    if not _fallback_reported:
        print(f"ssm: falling back to impl='torch': {reason}", file=sys.stderr)
        _fallback_reported = True
    return "torch"


_IMPLS = {
    "ref": selective_scan_ref,
    "torch": _selective_scan_torch,
    "compiled": _selective_scan_compiled,
    "cuda": _selective_scan_cuda,
}
# What `impl` (and the scripts' --scan_impl) may be: "auto" or one of the implementations.
IMPLS = ("auto", *_IMPLS)


def selective_scan(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    impl="auto",
    initial_state=None,
    return_last_state=False,
):
    """Selective state-space scan (mamba_ssm's `selective_scan_fn` semantics).

    Args:
        u: input [B, D, L].
        delta: step sizes before bias/softplus [B, D, L].
        A: state matrix (negative for stability) [D, N].
        B, C: input and output projections [B, N, L].
        D: skip weight [D] or None.
        z: gate [B, D, L] or None; the output is multiplied by silu(z).
        delta_bias: [D] or None, added to delta.
        delta_softplus: apply softplus to delta + delta_bias.
        impl: "auto" (cuda kernels on GPU when mamba_ssm imports, else the compiled CPU kernel,
            else "torch" with one note on stderr), "ref", "torch", "compiled" or "cuda".
        initial_state: the state h_{-1} [B, D, N] the scan starts from, or None for zeros
            (not with impl "cuda"); gradients flow into it.
        return_last_state: also return the state after the last step.
    Returns:
        y [B, D, L] in the dtype of u; with return_last_state, (y, last_state [B, D, N]).
    """
    impl = _resolve_impl(impl, u)
    return _IMPLS[impl](
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        delta_softplus,
        initial_state,
        return_last_state,
    )


def _project(weight, x):
    # weight [C_out, C_in] @ x [B, C_in, L] -> [B, C_out, L]. bmm on the expanded weight writes
    # this layout directly; matmul computes the transpose and copies (30-40% slower with
    # backward, measured).
    return torch.bmm(weight.expand(x.shape[0], -1, -1), x)


def project_compiled(weight, x):
    """weight [C_out, C_in] @ x [B, C_in, L] -> [B, C_out, L] with the compiled kernel; forward
    only (no autograd), CPU float32 or float64. Mamba.mix uses it for inference: on the
    mixer's shapes (one side of 1-1024 channels against thousands of steps) torch.bmm's
    threading is uneven, up to no gain from a second thread on the small ones, and inside the
    generator it ran slower than alone (bench/bench_project.py compares the two; the generator
    ran 1.17x faster with this). Its reference is `_project`, which training keeps."""
    (nb, c_in, length), (c_out, w_in) = x.shape, weight.shape
    if w_in != c_in:
        raise ValueError(f"weight takes {w_in} channels, x has {c_in}")
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the compiled projection takes CPU float32 or float64, got {x.dtype}")
    x = x.contiguous()
    weight = weight.to(x.dtype).contiguous()  # named: lives until the kernel returns
    out = x.new_empty(nb, c_out, length)
    _kernel_function("project_fwd", x.dtype)(
        _ptr(weight), _ptr(x), nb, c_out, c_in, length, _ptr(out), torch.get_num_threads()
    )
    return out


def channel_norm_compiled(x, weight, bias, eps, negative_slope=None):
    """LayerNorm over dim 1 of x [B, C, L] (affine), then LeakyReLU when negative_slope is
    given, in one pass of the compiled kernel; forward only (no autograd), CPU float32 or
    float64. models.ChannelLayerNorm uses it for inference; its PyTorch forward is the
    reference."""
    x = x.contiguous()
    # named, so that converted copies live until the kernel returns
    weight = weight.to(x.dtype).contiguous()
    bias = bias.to(x.dtype).contiguous()
    out = torch.empty_like(x)
    _kernel_function("norm_fwd", x.dtype)(
        _ptr(x),
        _ptr(weight),
        _ptr(bias),
        *x.shape,
        eps,
        1.0 if negative_slope is None else negative_slope,
        _ptr(out),
        torch.get_num_threads(),
    )
    return out


def _engine_will_use(node) -> bool:
    # Whether the running backward pass uses the gradient that flows into node (an input's
    # grad_fn or AccumulateGrad): backward(inputs=...) skips the rest of the graph.
    if node is None:
        return False
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError:  # autograd.grad cannot tell for a leaf: compute it
        return True


def winograd_matrices(outputs, taps, points):
    """Toom-Cook: (A^T [m, n], G [n, r], B^T [n, n]) in float64 of the m outputs of an r-tap
    correlation from n = m + r - 1 inputs, y = A^T ((G w) * (B^T d)), for the n - 1 points and
    infinity."""
    # A convolution is s = V^-1 ((V_r w) * (V_m h)) with V_k the Vandermonde rows (p^0 .. p^k-1)
    # at the points (and (0 .. 0 1) at infinity); the correlation is its transpose in h.
    n = outputs + taps - 1

    def vandermonde(columns):
        rows = [[p**j for j in range(columns)] for p in points] + [[0] * (columns - 1) + [1]]
        return torch.tensor(rows, dtype=torch.float64)

    return vandermonde(outputs).T, vandermonde(taps), torch.linalg.inv(vandermonde(n)).T


# The grouped conv's forward and gradients run as Winograd F(4, 4) (ssm_kernel.cpp); its
# matrices, flattened, for the kernel. In float32 on the discriminator's layers they err by
# 1-5e-6 of the largest value, 2-17x a direct convolution (tests/test_ssm.py); the other
# sets of 6 points tried, 0, +-1 with two of +-2, +-1/2, did no better.
_GROUPED_WINOGRAD = torch.cat(
    [t.flatten() for t in winograd_matrices(4, 4, [0, 1, -1, 0.5, -0.5, 2])]
)


class _CompiledGroupedConv(torch.autograd.Function):
    # F.conv1d(x, weight, bias, stride, padding, groups=groups) on contiguous CPU tensors of one
    # dtype; x: [B, C_in, L]; weight: [C_out, C_in / groups, K]; bias: [C_out]. The backward
    # computes only the gradients this backward pass will use: train_step's two passes over
    # the discriminators want the input's gradient in the first and the weights' in the second.

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, groups):
        (nb, c_in, length), (c_out, _, taps) = x.shape, weight.shape
        shape = (nb, groups, c_in // groups, c_out // groups, length, taps, stride, padding)
        out_length = (length + 2 * padding - taps) // stride + 1
        out = x.new_empty(nb, c_out, out_length)
        _kernel_function("grouped_conv_fwd", x.dtype)(
            _ptr(x), _ptr(weight), _ptr(bias), *shape, out_length, _ptr(_GROUPED_WINOGRAD),
            _ptr(out), torch.get_num_threads(),
        )
        ctx.shape = (*shape, out_length)
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout):
        x, weight = ctx.saved_tensors
        gout = gout.contiguous()
        used = [_engine_will_use(node) for node, _ in ctx.next_functions[:3]]
        gx = gw = gb = None
        threads = torch.get_num_threads()
        if used[0]:
            gx = torch.empty_like(x)
            _kernel_function("grouped_conv_bwd_input", x.dtype)(
                _ptr(gout), _ptr(weight), *ctx.shape, _ptr(_GROUPED_WINOGRAD), _ptr(gx), threads
            )
        if used[1]:
            gw = torch.empty_like(weight)
            _kernel_function("grouped_conv_bwd_weight", x.dtype)(
                _ptr(x), _ptr(gout), *ctx.shape, _ptr(_GROUPED_WINOGRAD), _ptr(gw), threads
            )
        if used[2]:
            gb = gout.sum((0, 2))
        return gx, gw, gb, None, None, None


def conv1d_compiled(x, weight, bias, stride: int, padding: int, groups: int):
    """F.conv1d(x, weight, bias, stride, padding, groups=groups) with the compiled kernel,
    forward and backward, on CPU float32 or float64; x: [B, C_in, L]. The multi-scale
    discriminator's grouped 41-tap layers use it in training, where PyTorch's convolutions
    ran at a third to two thirds of the rate of a matrix product (bench/bench_conv.py compares
    the two); its forward and gradients are Winograd F(4, 4) (_GROUPED_WINOGRAD), with half
    the products. F.conv1d is its reference."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the compiled conv takes CPU float32 or float64, got {x.dtype}")
    c_out, w_in, _ = weight.shape
    if x.shape[1] != w_in * groups or c_out % groups:
        raise ValueError(
            f"weight {tuple(weight.shape)} with {groups} groups does not fit {x.shape[1]} channels"
        )
    if bias is None:
        bias = x.new_zeros(c_out)
    return _CompiledGroupedConv.apply(
        x.contiguous(),
        weight.to(x.dtype).contiguous(),
        bias.to(x.dtype).contiguous(),
        stride,
        padding,
        groups,
    )


class Mamba(nn.Module):
    """Mamba (v1) mixer with mamba_ssm's parameter names, shapes and initialisation.

    Args:
        d_model: model width.
        d_state: SSM state size N.
        d_conv: causal depthwise conv kernel size.
        expand: d_inner = expand * d_model.
        dt_rank: rank of the dt projection; "auto" is ceil(d_model / 16).
        dt_min, dt_max: range of the initial step sizes (log-uniform).
        dt_init_floor: lower bound of the initial step sizes.
        conv_bias: bias in the depthwise conv.
        bias: bias in in_proj and out_proj.
        impl: scan implementation, see `selective_scan`.
    """

    def __init__(
        self,
        d_model,
        d_state=16,
        d_conv=4,
        expand=2,
        dt_rank="auto",
        dt_min=0.001,
        dt_max=0.1,
        dt_init_floor=1e-4,
        conv_bias=True,
        bias=False,
        impl="auto",
    ):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.impl = impl
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(
            self.d_inner,
            self.d_inner,
            d_conv,
            groups=self.d_inner,
            padding=d_conv - 1,
            bias=conv_bias,
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(
            torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min))
            + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        with torch.no_grad():
            # inverse of softplus: dt + log(1 - exp(-dt))
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def forward(self, x):
        """x: [B, L, d_model] (mamba_ssm's layout) -> [B, L, d_model]."""
        return self.mix(x.transpose(1, 2))[0].transpose(1, 2)

    def forward_stream(self, x, state=None):
        """Mamba over the next steps of a stream, carrying the state from call to call.

        Calls on consecutive pieces of a sequence, each given the state the one before
        returned, give what one pass over the whole sequence gives.

        Args:
            x: [B, d_model, L] (channels first, as mix), the steps after those of the earlier
                calls.
            state: None at the start of the stream, else what the previous call returned.
        Returns:
            (y [B, d_model, L], state): the state is (the causal conv's last d_conv - 1
            inputs [B, d_inner, d_conv - 1], the scan state [B, d_inner, d_state] or None
            before the first step).
        """
        if state is None:
            state = (x.new_zeros(x.shape[0], self.d_inner, self.d_conv - 1), None)
        if x.shape[-1] == 0:
            return x, state
        return self.mix(x, state)

    def mix(self, x, state=None):
        """The mixer on channels-first x [B, d_model, L], the U-Net's layout: every tensor keeps
        time innermost, the scan's layout, so nothing is transposed or copied between the
        projections, the conv and the scan (and the conv's gradients stay contiguous: oneDNN's
        depthwise conv backward is several times slower on strided ones).

        Returns (y [B, d_model, L], the state after x), from the stream state given (see
        forward_stream), or (y, None) without one.
        """
        impl = _resolve_impl(self.impl, x)
        compiled = impl == "compiled" and not torch.is_grad_enabled()
        project = project_compiled if compiled else _project
        xz = project(self.in_proj.weight, x)  # [B, 2*d_inner, L]
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias[:, None]
        u, z = xz.chunk(2, dim=1)  # [B, d_inner, L] each
        # the previous inputs stand in for the conv's zero padding
        prev = state[0] if state is not None else None
        if prev is not None:
            conv_state = (
                u if u.shape[-1] >= self.d_conv - 1 else torch.cat([prev, u], dim=-1)
            )[..., -(self.d_conv - 1) :].clone()
        if impl == "compiled":
            u = _conv_silu_compiled(u, self.conv1d.weight, self.conv1d.bias, prev)
        elif impl == "cuda":
            from causal_conv1d import causal_conv1d_fn

            w = self.conv1d.weight.squeeze(1)
            if prev is None:
                u = causal_conv1d_fn(u, w, self.conv1d.bias, activation="silu")
            else:
                u = causal_conv1d_fn(
                    torch.cat([prev, u], dim=-1), w, self.conv1d.bias, activation="silu"
                )[..., self.d_conv - 1 :]
        else:
            # left padding (or the previous inputs) only, the same as conv1d's padding
            # d_conv-1 cut to the first L outputs, without the cut's zero-filled gradient
            u_in = F.pad(u, (self.d_conv - 1, 0)) if prev is None else torch.cat([prev, u], -1)
            u = F.silu(
                F.conv1d(u_in, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner)
            )  # [B, d_inner, L]
        x_dbl = project(self.x_proj.weight, u)  # [B, dt_rank + 2N, L]
        dt, Bm, Cm = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=1)
        delta = project(self.dt_proj.weight, dt)  # [B, d_inner, L]
        resumed = state is not None and state[1] is not None
        y = selective_scan(
            u,
            delta,
            -torch.exp(self.A_log),
            Bm,
            Cm,
            self.D,
            z=z,
            delta_bias=self.dt_proj.bias,
            delta_softplus=True,
            # mamba_ssm's scan takes no initial state: a stream goes on with the PyTorch loop
            impl="torch" if resumed and impl == "cuda" else impl,
            initial_state=state[1] if resumed else None,
            return_last_state=state is not None,
        )  # [B, d_inner, L], or with the last scan state [B, d_inner, N]
        if state is not None:
            y, scan_state = y
        y = project(self.out_proj.weight, y)  # [B, d_model, L]
        if self.out_proj.bias is not None:
            y = y + self.out_proj.bias[:, None]
        return y, (conv_state, scan_state) if state is not None else None
