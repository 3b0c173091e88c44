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

The compiled kernel is C++ built with g++ on first use (about a second: no torch headers; called
through ctypes), not numba: the scan spends most of its time in exp(dt * A), 16 per step, and
numba (no SVML here) calls libm's exp lane by lane, while the C++ exp below vectorises over the
16 states. Measured here (forward, float32, d_inner 512, L 3,000, one thread): numba 80 ms,
C++ 22 ms. The state is carried in float64 (float32 inputs are still accurate to ~1e-7 after
48,000 slowly decaying steps); the forward stores it every _CHUNK steps and the backward
recomputes each chunk. The kernel also has Mamba's causal depthwise conv + SiLU, because
oneDNN's depthwise conv backward costs as much as the whole scan.
"""

import ctypes
import functools
import hashlib
import math
import os
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
    dt = delta if delta_bias is None else delta + delta_bias[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    h = _start_state(u, A, initial_state)
    ys = []
    # unbind, not indexing: each indexed step would cost a full-size gradient in backward
    steps = zip(dt.unbind(-1), B.unbind(-1), C.unbind(-1), u.unbind(-1))
    for dt_t, B_t, C_t, u_t in steps:
        h = torch.exp(dt_t[..., None] * A) * h + (dt_t * u_t)[..., None] * B_t[:, None]
        ys.append((h * C_t[:, None]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return (y, h) if return_last_state else y


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
    dt = delta if delta_bias is None else delta + delta_bias[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    dt = dt.transpose(1, 2)  # [B, L, D]
    dA = torch.exp(dt[..., None] * A)  # [B, L, D, N]
    dBu = (dt * u.transpose(1, 2))[..., None] * B.transpose(1, 2)[:, :, None, :]
    Ct = C.transpose(1, 2)  # [B, L, N]
    h = _start_state(u, A, initial_state)
    ys = []
    for dA_t, dBu_t, C_t in zip(dA.unbind(1), dBu.unbind(1), Ct.unbind(1)):
        h = dA_t * h + dBu_t
        ys.append(torch.matmul(h, C_t[:, :, None]))
    y = torch.cat(ys, dim=-1)  # [B, D, L]
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return (y, h) if return_last_state else y


_KERNEL_SOURCE = r"""
// Selective scan forward and backward, and causal depthwise conv + SiLU, for CPU. One task is
// one channel (forward) or one group of channels of one batch item (backward); tasks are handed
// out to OpenMP threads. The state is held in float64 whatever the input dtype: float32 states
// drift over tens of thousands of slowly decaying steps. The 16 states are the SIMD lanes.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// exp(x) as 2^k * p(r), |r| <= ln2/2, degree-12 Taylor (relative error ~2e-16). Written in plain
// arithmetic so that the compiler vectorises it; libm's exp would be called lane by lane.
inline double exp_simd(double x) {
  x = std::min(std::max(x, -708.0), 709.0);
  // round to nearest with the 1.5 * 2^52 trick: round() does not vectorise
  double k = (x * 1.4426950408889634 + 6755399441055744.0) - 6755399441055744.0;
  double r = x - k * 0.6931471803691238 - k * 1.9082149292705877e-10;
  double p = 1.0 / 479001600;
  p = p * r + 1.0 / 39916800;
  p = p * r + 1.0 / 3628800;
  p = p * r + 1.0 / 362880;
  p = p * r + 1.0 / 40320;
  p = p * r + 1.0 / 5040;
  p = p * r + 1.0 / 720;
  p = p * r + 1.0 / 120;
  p = p * r + 1.0 / 24;
  p = p * r + 1.0 / 6;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  int64_t bits = static_cast<int64_t>(k + 1023.0) << 52;
  double scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// expm1(x) in float32 the same way, with 2^k * expm1(r) + (2^k - 1) so that small |x| keeps
// its relative precision; degree-7 Taylor (relative error ~2e-8).
inline float expm1_simd(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  float k = (x * 1.44269504f + 12582912.0f) - 12582912.0f;
  float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float q = 1.0f / 5040;
  q = q * r + 1.0f / 720;
  q = q * r + 1.0f / 120;
  q = q * r + 1.0f / 24;
  q = q * r + 1.0f / 6;
  q = q * r + 0.5f;
  const float em1 = r + r * r * q;
  int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return scale * em1 + (scale - 1.0f);
}

// e[n] = exp(dt * A[n]), the decays of one step. For float32 inputs it is 1 + expm1 with expm1
// in float32, which has twice the SIMD lanes of float64: over a long, slow decay what matters is
// the distance from 1, and expm1 keeps its relative error at float32's ~1e-7 (a float32 exp
// would not). m is scratch space of N floats.
template <typename T>
inline void decays(T dt, const T* __restrict A, int64_t N, double* __restrict e,
                   float* __restrict m) {
  if constexpr (sizeof(T) == sizeof(float)) {
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) m[n] = expm1_simd(dt * A[n]);
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) e[n] = 1.0 + static_cast<double>(m[n]);
  } else {
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) e[n] = exp_simd(dt * A[n]);
  }
}

// OpenMP, not std::thread: the library links libgomp.so.1, which resolves to the copy PyTorch
// already loaded, so the kernel runs on PyTorch's own worker threads. Threads of our own would
// compete with PyTorch's, which spin for a while after each parallel op.
template <typename F>
void parallel_for(int64_t n_tasks, int n_threads, F fn) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads)
  for (int64_t i = 0; i < n_tasks; ++i) fn(i);
}

template <typename T>
struct Scan {
  const T *u, *dt, *A, *B, *C, *D;  // [b,d,L] [b,d,L] [d,N] [b,L,N] [b,L,N] [d]
  const T* h0;                      // [b,d,N] initial state, or null for zeros
  int64_t nb, nd, L, N, K;          // batch, channels, length, states, checkpoint interval
  int64_t n_chunks() const { return (L + K - 1) / K; }
};

// NS > 0 fixes the state size at compile time (full vectorisation); NS == 0 reads it at run time.
template <typename T, int NS>
void forward_channel(const Scan<T>& s, int64_t bd, T* out, double* hs, T* last) {
  const int64_t N = NS > 0 ? NS : s.N, L = s.L, b = bd / s.nd, d = bd % s.nd;
  std::vector<double> hv(N, 0.0), ev(N);
  if (s.h0 != nullptr) std::copy(s.h0 + bd * N, s.h0 + (bd + 1) * N, hv.begin());
  std::vector<float> mv(N);
  double* __restrict h = hv.data();
  double* __restrict e = ev.data();
  const T* __restrict A = s.A + d * N;
  const T* __restrict u = s.u + bd * L;
  const T* __restrict dt = s.dt + bd * L;
  const T* __restrict B = s.B + b * L * N;
  const T* __restrict C = s.C + b * L * N;
  const double Dv = s.D[d];
  for (int64_t t = 0; t < L; ++t) {
    if (hs != nullptr && t % s.K == 0) std::copy(h, h + N, hs + (bd * s.n_chunks() + t / s.K) * N);
    const double x = static_cast<double>(dt[t]) * u[t];
    decays(dt[t], A, N, e, mv.data());
    double y = 0.0;
#pragma omp simd reduction(+ : y)
    for (int64_t n = 0; n < N; ++n) {
      h[n] = e[n] * h[n] + x * B[t * N + n];
      y += h[n] * C[t * N + n];
    }
    out[bd * L + t] = static_cast<T>(y + Dv * u[t]);
  }
  std::copy(h, h + N, last + bd * N);
}

// Channels [d0, d1) of batch item b. gB, gC are this task's own [L, N] partial sums. glast
// (the last state's gradient) and gh0 (the initial state's) may be null.
template <typename T, int NS>
void backward_group(const Scan<T>& s, int64_t b, int64_t d0, int64_t d1, const double* hs,
                    const T* gout, const T* glast, T* gu, T* gdt, double* gA, double* gD,
                    T* gB, T* gC, T* gh0) {
  const int64_t N = NS > 0 ? NS : s.N, L = s.L, K = s.K;
  std::vector<double> buf(2 * K * N + 5 * N);
  double* __restrict hbuf = buf.data();  // states of the current chunk [K, N]
  double* __restrict ebuf = hbuf + K * N;  // exp(dt * A) of the current chunk [K, N]
  double* __restrict h0 = ebuf + K * N;  // state before the chunk
  double* __restrict gh = h0 + N;  // adjoint of the state
  double* __restrict a = gh + N;
  double* __restrict gAacc = a + N;
  double* __restrict h = gAacc + N;
  std::vector<float> m(N);
  const T* __restrict B = s.B + b * L * N;
  const T* __restrict C = s.C + b * L * N;
  std::fill(gB, gB + L * N, T(0));
  std::fill(gC, gC + L * N, T(0));
  for (int64_t d = d0; d < d1; ++d) {
    const int64_t bd = b * s.nd + d;
    const T* __restrict u = s.u + bd * L;
    const T* __restrict dt = s.dt + bd * L;
    const T* __restrict go = gout + bd * L;
    const double Dv = s.D[d];
    for (int64_t n = 0; n < N; ++n) {
      a[n] = s.A[d * N + n];
      gh[n] = glast != nullptr ? static_cast<double>(glast[bd * N + n]) : 0.0;
      gAacc[n] = 0.0;
    }
    double gDacc = 0.0;
    for (int64_t c = s.n_chunks() - 1; c >= 0; --c) {
      const int64_t t0 = c * K, len = std::min(K, L - t0);
      std::copy(hs + (bd * s.n_chunks() + c) * N, hs + (bd * s.n_chunks() + c + 1) * N, h0);
      std::copy(h0, h0 + N, h);
      for (int64_t j = 0; j < len; ++j) {
        const int64_t t = t0 + j;
        const double x = static_cast<double>(dt[t]) * u[t];
        double* __restrict e = ebuf + j * N;
        decays(dt[t], s.A + d * N, N, e, m.data());
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) {
          h[n] = e[n] * h[n] + x * B[t * N + n];
          hbuf[j * N + n] = h[n];
        }
      }
      for (int64_t j = len - 1; j >= 0; --j) {
        const int64_t t = t0 + j;
        const double gy = go[t], uv = u[t], dtv = dt[t];
        const double* __restrict hprev = j > 0 ? hbuf + (j - 1) * N : h0;
        double sA = 0.0, sB = 0.0;
        gDacc += gy * uv;
#pragma omp simd reduction(+ : sA, sB)
        for (int64_t n = 0; n < N; ++n) {
          const double g = gh[n] + gy * C[t * N + n];
          const double e = ebuf[j * N + n];
          const double q = g * e * hprev[n];
          gC[t * N + n] += static_cast<T>(gy * hbuf[j * N + n]);
          gB[t * N + n] += static_cast<T>(g * dtv * uv);
          gAacc[n] += dtv * q;
          sA += a[n] * q;
          sB += g * B[t * N + n];
          gh[n] = g * e;
        }
        gu[bd * L + t] = static_cast<T>(gy * Dv + dtv * sB);
        gdt[bd * L + t] = static_cast<T>(sA + uv * sB);
      }
    }
    for (int64_t n = 0; n < N; ++n) gA[bd * N + n] = gAacc[n];
    if (gh0 != nullptr)
      for (int64_t n = 0; n < N; ++n) gh0[bd * N + n] = static_cast<T>(gh[n]);
    gD[bd] = gDacc;
  }
}

template <typename T>
void forward(const Scan<T>& s, T* out, double* hs, T* last, int n_threads) {
  parallel_for(s.nb * s.nd, n_threads, [&](int64_t bd) {
    if (s.N == 16)
      forward_channel<T, 16>(s, bd, out, hs, last);
    else
      forward_channel<T, 0>(s, bd, out, hs, last);
  });
}

template <typename T>
void backward(const Scan<T>& s, int64_t G, const double* hs, const T* gout, const T* glast,
              T* gu, T* gdt, double* gA, double* gD, T* gB, T* gC, T* gh0, int n_threads) {
  parallel_for(s.nb * G, n_threads, [&](int64_t task) {
    const int64_t b = task / G, g = task % G;
    const int64_t d0 = g * s.nd / G, d1 = (g + 1) * s.nd / G;
    T* gBp = gB + task * s.L * s.N;
    T* gCp = gC + task * s.L * s.N;
    if (s.N == 16)
      backward_group<T, 16>(s, b, d0, d1, hs, gout, glast, gu, gdt, gA, gD, gBp, gCp, gh0);
    else
      backward_group<T, 0>(s, b, d0, d1, hs, gout, glast, gu, gdt, gA, gD, gBp, gCp, gh0);
  });
}

// Causal depthwise conv (kernel K, left zero padding K-1) followed by SiLU, one task per row
// of [b, d, L]; the backward recomputes the pre-activation instead of storing it.
inline double sigmoid(double x) { return 1.0 / (1.0 + exp_simd(-x)); }

template <typename T>
void conv_silu_forward(const T* x, const T* w, const T* bias, int64_t nb, int64_t nd,
                       int64_t L, int64_t K, T* out, int n_threads) {
  parallel_for(nb * nd, n_threads, [&](int64_t bd) {
    const int64_t d = bd % nd;
    // xp: the row with K-1 zeros in front; one loop over time per tap, so each vectorises
    std::vector<double> xbuf(L + K - 1, 0.0), pbuf(L, static_cast<double>(bias[d]));
    double* __restrict xp = xbuf.data();
    double* __restrict pre = pbuf.data();
    for (int64_t t = 0; t < L; ++t) xp[K - 1 + t] = x[bd * L + t];
    for (int64_t k = 0; k < K; ++k) {
      const double wk = w[d * K + k];
#pragma omp simd
      for (int64_t t = 0; t < L; ++t) pre[t] += wk * xp[t + k];
    }
    T* __restrict o = out + bd * L;
#pragma omp simd
    for (int64_t t = 0; t < L; ++t) o[t] = static_cast<T>(pre[t] * sigmoid(pre[t]));
  });
}

template <typename T>
void conv_silu_backward(const T* x, const T* w, const T* bias, const T* gout, int64_t nb,
                        int64_t nd, int64_t L, int64_t K, T* gx, double* gw, double* gb,
                        int n_threads) {
  parallel_for(nb * nd, n_threads, [&](int64_t bd) {
    const int64_t d = bd % nd;
    // xp: the row with K-1 zeros in front; gp: d out / d pre-activation with K-1 zeros behind
    std::vector<double> xbuf(L + K - 1, 0.0), gbuf(L + K - 1, 0.0);
    std::vector<double> pbuf(L, static_cast<double>(bias[d])), abuf(L, 0.0);
    double* __restrict xp = xbuf.data();
    double* __restrict gp = gbuf.data();
    double* __restrict pre = pbuf.data();
    double* __restrict acc = abuf.data();
    for (int64_t t = 0; t < L; ++t) xp[K - 1 + t] = x[bd * L + t];
    for (int64_t k = 0; k < K; ++k) {
      const double wk = w[d * K + k];
#pragma omp simd
      for (int64_t t = 0; t < L; ++t) pre[t] += wk * xp[t + k];
    }
    const T* __restrict go = gout + bd * L;
    double gbias = 0.0;
#pragma omp simd reduction(+ : gbias)
    for (int64_t t = 0; t < L; ++t) {
      const double sg = sigmoid(pre[t]);
      gp[t] = go[t] * sg * (1.0 + pre[t] * (1.0 - sg));
      gbias += gp[t];
    }
    gb[bd] = gbias;
    for (int64_t k = 0; k < K; ++k) {
      const double wk = w[d * K + k];
      double gwk = 0.0;
      // x[s] feeds outputs s .. s+K-1 through taps K-1 .. 0
#pragma omp simd reduction(+ : gwk)
      for (int64_t t = 0; t < L; ++t) {
        gwk += gp[t] * xp[t + k];
        acc[t] += wk * gp[t + K - 1 - k];
      }
      gw[bd * K + k] = gwk;
    }
    T* __restrict g = gx + bd * L;
#pragma omp simd
    for (int64_t t = 0; t < L; ++t) g[t] = static_cast<T>(acc[t]);
  });
}

}  // namespace

#define SCAN_API(T, SUFFIX)                                                                     \
  extern "C" void scan_fwd_##SUFFIX(const T* u, const T* dt, const T* A, const T* B,          \
                                     const T* C, const T* D, const T* h0, int64_t nb,          \
                                     int64_t nd, int64_t L, int64_t N, int64_t K, T* out,      \
                                     double* hs, T* last, int n_threads) {                     \
    forward(Scan<T>{u, dt, A, B, C, D, h0, nb, nd, L, N, K}, out, hs, last, n_threads);        \
  }                                                                                            \
  extern "C" void scan_bwd_##SUFFIX(const T* u, const T* dt, const T* A, const T* B,          \
                                     const T* C, const T* D, int64_t nb, int64_t nd,           \
                                     int64_t L, int64_t N, int64_t K, int64_t G,               \
                                     const double* hs, const T* gout, const T* glast, T* gu,   \
                                     T* gdt, double* gA, double* gD, T* gB, T* gC, T* gh0,     \
                                     int n_threads) {                                          \
    backward(Scan<T>{u, dt, A, B, C, D, nullptr, nb, nd, L, N, K}, G, hs, gout, glast, gu,     \
             gdt, gA, gD, gB, gC, gh0, n_threads);                                             \
  }

#define CONV_API(T, SUFFIX)                                                                     \
  extern "C" void conv_fwd_##SUFFIX(const T* x, const T* w, const T* bias, int64_t nb,         \
                                     int64_t nd, int64_t L, int64_t K, T* out, int n_threads) { \
    conv_silu_forward(x, w, bias, nb, nd, L, K, out, n_threads);                               \
  }                                                                                            \
  extern "C" void conv_bwd_##SUFFIX(const T* x, const T* w, const T* bias, const T* gout,      \
                                     int64_t nb, int64_t nd, int64_t L, int64_t K, T* gx,      \
                                     double* gw, double* gb, int n_threads) {                  \
    conv_silu_backward(x, w, bias, gout, nb, nd, L, K, gx, gw, gb, n_threads);                 \
  }

SCAN_API(float, f32)
SCAN_API(double, f64)
CONV_API(float, f32)
CONV_API(double, f64)
"""

# Steps between stored states: the backward recomputes each chunk from its first state, so the
# forward keeps [B, D, L / K, N] float64 instead of the whole [B, D, L, N] history.
_CHUNK = 128
# Backward tasks per call: each batch item's channels are split into this many groups over the
# batch (at least one), each group summing its own dB and dC (a [L, N] buffer per group), so
# that small batches still use every thread and the result does not depend on the thread count.
_TASKS = 8
_kernel = None
_kernel_error = None


def _load_kernel():
    # Built on first use (about a second with g++) into build/ next to this file, keyed by a
    # hash of source and flags; -march=native is fine because it is built where it runs.
    global _kernel, _kernel_error
    if _kernel is not None:
        return _kernel
    if _kernel_error is not None:
        raise RuntimeError(_kernel_error)
    flags = ["-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC"]
    key = hashlib.sha1((_KERNEL_SOURCE + " ".join(flags)).encode()).hexdigest()[:12]
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build", "ssm")
    lib_path = os.path.join(folder, f"scan_{key}.so")
    try:
        if not os.path.exists(lib_path):
            compiler = shutil.which("g++") or shutil.which("c++")
            if compiler is None:
                raise RuntimeError("no C++ compiler (g++ or c++) on PATH")
            os.makedirs(folder, exist_ok=True)
            # per-process source and output names: concurrent first uses do not clash
            src = f"{lib_path}.{os.getpid()}.cpp"
            tmp = f"{lib_path}.{os.getpid()}.tmp"
            with open(src, "w") as f:
                f.write(_KERNEL_SOURCE)
            result = subprocess.run(
                [compiler, *flags, src, "-o", tmp], capture_output=True, text=True
            )
            os.remove(src)
            if result.returncode != 0:
                lines = result.stderr.splitlines() or ["no output"]
                first = next((line for line in lines if "error" in line), lines[0])
                raise RuntimeError(f"{compiler} failed: {first.strip()}")
            os.replace(tmp, lib_path)
        lib = ctypes.CDLL(lib_path)
    except (OSError, RuntimeError) as e:
        _kernel_error = f"compiled scan kernel unavailable ({e}); use impl='torch'"
        raise RuntimeError(_kernel_error) from e
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suffix in ("f32", "f64"):
        getattr(lib, f"scan_fwd_{suffix}").argtypes = [p] * 7 + [i64] * 5 + [p] * 3 + [i32]
        getattr(lib, f"scan_bwd_{suffix}").argtypes = (
            [p] * 6 + [i64] * 6 + [p] * 10 + [i32]
        )
        getattr(lib, f"conv_fwd_{suffix}").argtypes = [p] * 3 + [i64] * 4 + [p, i32]
        getattr(lib, f"conv_bwd_{suffix}").argtypes = (
            [p] * 4 + [i64] * 4 + [p] * 3 + [i32]
        )
    _kernel = lib
    return lib


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


class _CompiledScan(torch.autograd.Function):
    # (y, last_state) = scan(u, dt, A, B, C, h0) + D * u on contiguous CPU tensors of one dtype;
    # u, dt: [B, D, L]; A: [D, N]; B, C: [B, L, N] (time-major: one row per step); D: [D];
    # h0: [B, D, N] or None (zeros).

    @staticmethod
    def forward(ctx, u, dt, A, B, C, D, h0):
        lib = _load_kernel()
        nb, nd, length = u.shape
        n_state = A.shape[1]
        suffix = "f32" if u.dtype == torch.float32 else "f64"
        out = torch.empty_like(u)
        last = u.new_empty(nb, nd, n_state)
        hs = None
        if any(ctx.needs_input_grad):
            n_chunks = -(-length // _CHUNK)
            hs = u.new_empty(nb, nd, n_chunks, n_state, dtype=torch.float64)
        getattr(lib, f"scan_fwd_{suffix}")(
            *map(_ptr, (u, dt, A, B, C, D, h0)),
            nb,
            nd,
            length,
            n_state,
            _CHUNK,
            *map(_ptr, (out, hs, last)),
            torch.get_num_threads(),
        )
        # the backward reads the initial state from hs (the first stored state)
        ctx.save_for_backward(u, dt, A, B, C, D, hs)
        return out, last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout, glast):
        u, dt, A, B, C, D, hs = ctx.saved_tensors
        lib = _load_kernel()
        nb, nd, length = u.shape
        n_state = A.shape[1]
        groups = min(nd, max(1, -(-_TASKS // nb)))
        suffix = "f32" if u.dtype == torch.float32 else "f64"
        gout, glast = gout.contiguous(), glast.contiguous()
        gu, gdt = torch.empty_like(u), torch.empty_like(u)
        gh0 = torch.empty_like(glast) if ctx.needs_input_grad[6] else None
        gA = u.new_empty(nb, nd, n_state, dtype=torch.float64)
        gD = u.new_empty(nb, nd, dtype=torch.float64)
        gB = u.new_empty(nb, groups, length, n_state)
        gC = u.new_empty(nb, groups, length, n_state)
        getattr(lib, f"scan_bwd_{suffix}")(
            *map(_ptr, (u, dt, A, B, C, D)),
            nb,
            nd,
            length,
            n_state,
            _CHUNK,
            groups,
            *map(_ptr, (hs, gout, glast, gu, gdt, gA, gD, gB, gC, gh0)),
            torch.get_num_threads(),
        )
        return (
            gu,
            gdt,
            gA.sum(0).to(u.dtype),
            gB.sum(1),
            gC.sum(1),
            gD.sum(0).to(u.dtype),
            gh0,
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
    # Bias, softplus and gate stay in PyTorch (cheap elementwise passes with autograd); the
    # kernel does the recurrence and the skip.
    dt = delta if delta_bias is None else delta + delta_bias[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    if D is None:
        D = u.new_zeros(u.shape[1])
    if initial_state is not None:
        initial_state = _start_state(u, A, initial_state).contiguous()
    y, last_state = _CompiledScan.apply(
        u.contiguous(),
        dt.to(u.dtype).contiguous(),
        A.to(u.dtype).contiguous(),
        B.to(u.dtype).transpose(1, 2).contiguous(),
        C.to(u.dtype).transpose(1, 2).contiguous(),
        D.to(u.dtype).contiguous(),
        initial_state,
    )
    if z is not None:
        y = y * F.silu(z)
    return (y, last_state) if return_last_state else y


class _CompiledConvSiLU(torch.autograd.Function):
    # silu(causal depthwise conv1d(x)) on contiguous CPU tensors of one dtype;
    # x: [B, D, L]; weight: [D, K]; bias: [D]. Same result as nn.Conv1d(D, D, K, groups=D,
    # padding=K-1) cut to the first L outputs, then SiLU.

    @staticmethod
    def forward(ctx, x, weight, bias):
        lib = _load_kernel()
        suffix = "f32" if x.dtype == torch.float32 else "f64"
        out = torch.empty_like(x)
        getattr(lib, f"conv_fwd_{suffix}")(
            _ptr(x),
            _ptr(weight),
            _ptr(bias),
            *x.shape,
            weight.shape[1],
            _ptr(out),
            torch.get_num_threads(),
        )
        ctx.save_for_backward(x, weight, bias)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout):
        x, weight, bias = ctx.saved_tensors
        lib = _load_kernel()
        suffix = "f32" if x.dtype == torch.float32 else "f64"
        gout = gout.contiguous()
        gx = torch.empty_like(x)
        gw = x.new_empty(x.shape[0], *weight.shape, dtype=torch.float64)
        gb = x.new_empty(x.shape[:2], dtype=torch.float64)
        getattr(lib, f"conv_bwd_{suffix}")(
            _ptr(x),
            _ptr(weight),
            _ptr(bias),
            _ptr(gout),
            *x.shape,
            weight.shape[1],
            _ptr(gx),
            _ptr(gw),
            _ptr(gb),
            torch.get_num_threads(),
        )
        return gx, gw.sum(0).to(x.dtype), gb.sum(0).to(x.dtype)


def _conv_silu_compiled(x, weight, bias):
    # x: [B, D, L]; weight: [D, 1, K] (nn.Conv1d's); bias: [D] or None
    if bias is None:
        bias = x.new_zeros(x.shape[1])
    return _CompiledConvSiLU.apply(
        x.contiguous(),
        weight.to(x.dtype).reshape(weight.shape[0], -1).contiguous(),
        bias.to(x.dtype).contiguous(),
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
    if impl not in ("auto", "ref", "torch", "compiled", "cuda"):
        raise ValueError(f"unknown scan impl {impl!r}")
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
        # x: [B, L, d_model]
        return self._mix(x, None)[0]

    def forward_stream(self, x, state=None):
        """Mamba over the next steps of a stream, carrying the state from call to call.

        Calls on consecutive pieces of a sequence, each given the state the one before
        returned, give what one forward() over the whole sequence gives.

        Args:
            x: [B, L, d_model], the steps after those of the earlier calls.
            state: None at the start of the stream, else what the previous call returned.
        Returns:
            (y [B, L, d_model], state): the state is (the causal conv's last d_conv - 1
            inputs [B, d_inner, d_conv - 1], the scan state [B, d_inner, d_state] or None
            before the first step).
        """
        if state is None:
            state = (x.new_zeros(x.shape[0], self.d_inner, self.d_conv - 1), None)
        if x.shape[1] == 0:
            return x, state
        return self._mix(x, state)

    def _mix(self, x, state):
        # forward(x), from a stream state (conv inputs, scan state) when one is given;
        # returns (y [B, L, d_model], the state after x, or None without one)
        impl = _resolve_impl(self.impl, x)
        # Projections are written as W @ [B, C, L] so that every tensor keeps time innermost,
        # the scan's layout: no transposed copies, and contiguous gradients for the conv
        # (oneDNN's depthwise conv backward is several times slower on strided gradients).
        xz = _project(self.in_proj.weight, x.transpose(1, 2))  # [B, 2*d_inner, L]
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias[:, None]
        u, z = xz.chunk(2, dim=1)  # [B, d_inner, L] each
        if state is not None:
            # the previous inputs stand in for the conv's zero padding, whose outputs go
            u = torch.cat([state[0], u], dim=-1)  # [B, d_inner, d_conv - 1 + L]
            conv_state = u[..., u.shape[-1] - (self.d_conv - 1) :].clone()
        if impl == "cuda":
            from causal_conv1d import causal_conv1d_fn

            w = self.conv1d.weight.squeeze(1)
            u = causal_conv1d_fn(u, w, self.conv1d.bias, activation="silu")
        elif impl == "compiled":
            u = _conv_silu_compiled(u, self.conv1d.weight, self.conv1d.bias)
        else:
            # left padding only, the same as conv1d's padding d_conv-1 cut to the first L
            # outputs, without the cut's zero-filled gradient
            u_pad = F.pad(u, (self.d_conv - 1, 0))
            u = F.silu(
                F.conv1d(
                    u_pad, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner
                )
            )  # [B, d_inner, L]
        if state is not None:
            u = u[..., self.d_conv - 1 :]
        x_dbl = _project(self.x_proj.weight, u)  # [B, dt_rank + 2N, L]
        dt, Bm, Cm = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=1)
        delta = _project(self.dt_proj.weight, dt)  # [B, d_inner, L]
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
            impl=impl,
            initial_state=None if state is None else state[1],
            return_last_state=state is not None,
        )  # [B, d_inner, L], or with the last scan state [B, d_inner, N]
        if state is None:
            return self.out_proj(y.transpose(1, 2)), None  # [B, L, d_model]
        y, scan_state = y
        return self.out_proj(y.transpose(1, 2)), (conv_state, scan_state)
