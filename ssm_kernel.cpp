// Selective scan forward and backward, and causal depthwise conv + SiLU, for CPU; built and
// called by ssm.py (see its docstring for the scan's definition and shapes). Also, for
// inference, the U-Net's LayerNorm over channels + LeakyReLU (models.ChannelLayerNorm), which
// as PyTorch passes reads and writes a long sequence six times where this reads it twice, and
// Mamba's projections (ssm.project_compiled), and, for training, the multi-scale
// discriminator's grouped convolutions (ssm.conv1d_compiled). The scan includes delta's bias
// and softplus and the silu(z) gate, which as separate PyTorch passes cost 40 % as much as the
// recurrence.
//
// Layout of the work: a task is handed to an OpenMP thread and walks through time in blocks of
// K steps (K is also the interval at which the forward stores states for the backward). In the
// forward a task is one SIMD vector of channels of one batch item (8 float32 channels in an
// AVX2 register, 16 in an AVX-512 one), each lane one channel. In the backward a task is a group
// of channels, which inside a block it takes one by one, so that the block's rows of B and C
// and of their gradients stay in cache while every channel of the group reads them; there the
// N states of a channel are the lanes (N = 16: two AVX2 registers or one AVX-512 register).
// Both from the same plain C++ (no intrinsics).
//
// Precision: float32 inputs are computed in float32 throughout, except sums over time of
// gradients (dA, dD), which are kept per block in float32 and added up in float64. The decay
// exp(dt * A) is never formed: the update is written h += expm1(dt * A) * h + dt * B * u, with
// expm1 accurate to float32's relative precision. Over a slow decay (dt * A = -1e-5, say) what
// matters is the distance 1 - exp(dt * A), which a float32 exp would round to two digits;
// expm1 keeps it to seven, and outputs and gradients then stay within 3e-6 of the float64
// reference over 48,000 steps (tests/test_ssm.py allows 1e-5). float64 inputs are computed in
// float64 throughout.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// The largest state size the kernel takes (ssm.py checks it): per-channel states live in
// fixed-size arrays so that, with N a compile-time 16, the compiler keeps them in registers.
constexpr int64_t kMaxN = 64;

// 2^k for integral k in the exponent range of T, from its bits.
inline float pow2(float k) {
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return scale;
}
inline double pow2(double k) {
  // through int32: AVX2 has no vector conversion from double to int64
  const int64_t bits = static_cast<int64_t>(static_cast<int32_t>(k) + 1023) << 52;
  double scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return scale;
}

// q(r) with expm1(r) = r + r^2 q(r) for |r| <= ln2 / 2. float: degree 4, fitted for the least
// relative error of expm1 (1.7e-8, under float32's rounding); double: Taylor to degree 12
// (~2e-16).
inline float expm1_core_q(float r) {
  float q = 0.00138825225f;
  q = q * r + 0.00836651400f;
  q = q * r + 0.0416672006f;
  q = q * r + 0.166665435f;
  return q * r + 0.49999997f;
}
inline double expm1_core_q(double r) {
  double q = 1.0 / 479001600;
  q = q * r + 1.0 / 39916800;
  q = q * r + 1.0 / 3628800;
  q = q * r + 1.0 / 362880;
  q = q * r + 1.0 / 40320;
  q = q * r + 1.0 / 5040;
  q = q * r + 1.0 / 720;
  q = q * r + 1.0 / 120;
  q = q * r + 1.0 / 24;
  q = q * r + 1.0 / 6;
  return q * r + 0.5;
}

template <typename T>
struct ExpConstants;
template <>
struct ExpConstants<float> {
  // the range where 2^k is a normal number; 1.5 * 2^23 rounds to nearest when added and
  // subtracted (round() does not vectorise)
  static constexpr float lo = -87.0f, hi = 88.0f, round = 12582912.0f;
  static constexpr float log2e = 1.44269504f, ln2 = 0.693147182f;
  // r = x - k ln2 with ln2 rounded to float: off by |k| 1.9e-9, a relative error of exp below
  // 2.5e-7 for any normal result and below 1e-8 for |x| < 3 (float32 rounds at 6e-8), one FMA
  // where ln2 split in two parts takes two
  static float reduce(float x, float k) { return x - k * ln2; }
};
template <>
struct ExpConstants<double> {
  static constexpr double lo = -708.0, hi = 709.0, round = 6755399441055744.0;
  static constexpr double log2e = 1.4426950408889634, ln2_hi = 0.6931471803691238,
                          ln2_lo = 1.9082149292705877e-10;
  // ln 2 split in a part exact in k * ln2_hi and the rest
  static double reduce(double x, double k) { return (x - k * ln2_hi) - k * ln2_lo; }
};

// x = k ln2 + r: *scale = 2^k and *em1 = expm1(r). Plain arithmetic, so that it vectorises.
// kClamp: first clamp x to [lo, hi]; without it x must lie there already (the callers check,
// since the clamp costs a quarter of the time: g++ turns it into compares and blends).
template <typename T, bool kClamp>
inline void exp_parts(T x, T* scale, T* em1) {
  using E = ExpConstants<T>;
  if constexpr (kClamp) {
    // ternaries on values, not std::min / std::max (which return references and end up as
    // branches); g++ makes them vector selects only with -fno-trapping-math (ssm.py passes it)
    x = x < E::lo ? E::lo : x;
    x = x > E::hi ? E::hi : x;
  }
  const T k = (x * E::log2e + E::round) - E::round;
  const T r = E::reduce(x, k);
  *em1 = r + r * r * expm1_core_q(r);
  *scale = pow2(k);
}

// expm1(x) = 2^k expm1(r) + (2^k - 1): keeps the relative precision of T for small |x| and
// its absolute precision near -1.
template <typename T, bool kClamp>
inline T expm1_simd(T x) {
  T scale, em1;
  exp_parts<T, kClamp>(x, &scale, &em1);
  return scale * em1 + (scale - T(1));
}

// exp(x) = 2^k expm1(r) + 2^k, with T's relative precision everywhere (clamped).
template <typename T>
inline T exp_simd(T x) {
  T scale, em1;
  exp_parts<T, true>(x, &scale, &em1);
  return scale * em1 + scale;
}

// log(1 + e) for 0 <= e <= 1, as 2 atanh(s), s = e / (2 + e) <= 1/3: the odd series to s^15
// in float (relative error < 1e-8) and to s^35 in double (< 1e-17), accurate for tiny e too,
// where log(1 + e) would round 1 + e.
template <typename T>
inline T log1p_unit(T e) {
  constexpr int kTerms = sizeof(T) == sizeof(float) ? 7 : 17;
  const T s = e / (T(2) + e), s2 = s * s;
  T p = T(1) / (2 * kTerms + 1);
  for (int i = kTerms - 1; i >= 1; --i) p = p * s2 + T(1) / (2 * i + 1);
  return T(2) * (s + s * s2 * p);
}

// softplus(x) = max(x, 0) + log(1 + exp(-|x|)), as torch.nn.functional.softplus (whose
// threshold 20 changes it by < 2e-9 relative). Its derivative sigmoid(x) is -expm1(-softplus).
template <typename T>
inline T softplus_simd(T x) {
  const T ax = x < T(0) ? -x : x;
  return (x > T(0) ? x : T(0)) + log1p_unit(exp_simd(-ax));
}

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + exp_simd(-x));
}

// silu(z) and its derivative sigmoid(z) (1 + z (1 - sigmoid(z)))
template <typename T>
inline T silu(T z) {
  return z * sigmoid(z);
}
template <typename T>
inline T silu_grad(T z) {
  const T sg = sigmoid(z);
  return sg * (T(1) + z * (T(1) - sg));
}

// Whether every x in [x0, x1] (in either order) can skip expm1_simd's clamp.
template <typename T>
inline bool in_exp_range(T x0, T x1) {
  using E = ExpConstants<T>;
  return std::min(x0, x1) >= E::lo && std::max(x0, x1) <= E::hi;
}

// p[0] + ... + p[N-1]. For 16 floats as a tree of 4-lane vector adds (GCC's vector
// extension, which any x86-64 target has); a reduction clause without -ffast-math, or a plain
// loop, sums in order: 16 dependent adds.
template <typename T, int NS>
inline T sum_states(const T* __restrict p, int64_t N) {
  if constexpr (NS == 16 && sizeof(T) == sizeof(float)) {
    typedef float f4 __attribute__((vector_size(16)));
    f4 q[4];
    std::memcpy(q, p, sizeof q);
    const f4 s = (q[0] + q[1]) + (q[2] + q[3]);
    return (s[0] + s[2]) + (s[1] + s[3]);
  } else {
    T sum = 0;
    for (int64_t n = 0; n < (NS > 0 ? NS : N); ++n) sum += p[n];
    return sum;
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

// The scan's inputs. dt_t = softplus(delta_t + bias) if softplus else delta_t + bias; the
// output is (C . h_t + D u_t) * silu(z_t), without the factor when z is null.
template <typename T>
struct Scan {
  // B, C: [b,N,L] in the forward, which reads them a row at a time, [b,L,N] in the backward,
  // whose lanes are the states
  const T *u, *delta, *A, *B, *C, *D;  // [b,d,L] [b,d,L] [d,N] B C [d]
  const T *bias, *z;                   // [d] and [b,d,L], or null
  const T* h0;                         // [b,d,N] initial state, or null for zeros
  int64_t nb, nd, L, N, K;             // batch, channels, length, states, block length
  int64_t G;                           // backward: channel groups per batch item (tasks nb * G)
  int softplus;
  int64_t n_blocks() const { return (L + K - 1) / K; }
  int64_t d_begin(int64_t g) const { return g * nd / G; }
  // dt[j] for the steps [t0, t1) of row bd (= b * nd + d)
  void step_sizes(int64_t bd, int64_t t0, int64_t t1, T* __restrict dt) const {
    const T* __restrict x = delta + bd * L;
    const T b = bias != nullptr ? bias[bd % nd] : T(0);
    if (softplus) {
#pragma omp simd
      for (int64_t t = t0; t < t1; ++t) dt[t - t0] = softplus_simd(x[t] + b);
    } else {
#pragma omp simd
      for (int64_t t = t0; t < t1; ++t) dt[t - t0] = x[t] + b;
    }
  }
};

// One step of one channel: h += expm1(dt A) h + dt u B; returns C . h. m gets expm1(dt A)
// (the backward keeps it). NS > 0 fixes the state count at compile time.
template <typename T, int NS, bool kClamp>
inline T step_states(int64_t N, const T* __restrict a, T dt, T x, const T* __restrict Bt,
                     const T* __restrict Ct, T* __restrict h, T* __restrict m) {
  alignas(64) T p[kMaxN];
#pragma omp simd
  for (int64_t n = 0; n < (NS > 0 ? NS : N); ++n) {
    const T mn = expm1_simd<T, kClamp>(dt * a[n]);
    const T hn = h[n] + (mn * h[n] + x * Bt[n]);
    h[n] = hn;
    p[n] = hn * Ct[n];
    m[n] = mn;
  }
  return sum_states<T, NS>(p, N);
}

// a_lo, a_hi: the channel's smallest and largest A, to tell whether dt * A needs the clamp.
template <typename T, int NS>
inline T step(int64_t N, const T* a, T a_lo, T a_hi, T dt, T x, const T* Bt, const T* Ct, T* h,
              T* m) {
  if (in_exp_range(dt * a_lo, dt * a_hi))
    return step_states<T, NS, false>(N, a, dt, x, Bt, Ct, h, m);
  return step_states<T, NS, true>(N, a, dt, x, Bt, Ct, h, m);
}

template <typename T>
inline void a_range(const T* a, int64_t N, T* a_lo, T* a_hi) {
  *a_lo = *std::min_element(a, a + N);
  *a_hi = *std::max_element(a, a + N);
}

// The width of a SIMD register in bytes, and in values of T (the forward's channels side by
// side, the projection's steps per vector).
#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#else
constexpr int kVectorBytes = 32;
#endif
template <typename T>
constexpr int kLanes = kVectorBytes / int(sizeof(T));

// States [n0, n0 + P) of W channels through n_steps steps, adding each step's C . h to yT.
// h, aT: [N, W] the vector's states and A; dtT, xT, yT: [n_steps, W] dt, dt * u and the output;
// B, C: state n at step j is B[n * L + j]. A state goes through all the steps before the next
// one starts, so its vector stays in a register; P of them at a time, so that their recurrences
// (two dependent operations a step) overlap.
template <typename T, int P, int W, bool kClamp>
void lane_states(int64_t L, int64_t n0, int64_t n_steps, const T* __restrict aT,
                 const T* __restrict dtT, const T* __restrict xT, const T* __restrict B,
                 const T* __restrict C, T* __restrict h, T* __restrict yT) {
  alignas(64) T hn[P][W], an[P][W];
  std::copy(h + n0 * W, h + (n0 + P) * W, &hn[0][0]);
  std::copy(aT + n0 * W, aT + (n0 + P) * W, &an[0][0]);
  for (int64_t j = 0; j < n_steps; ++j) {
    const T* __restrict dt = dtT + j * W;
    const T* __restrict x = xT + j * W;
    T* __restrict y = yT + j * W;
    T bn[P], cn[P];
    for (int p = 0; p < P; ++p) {
      bn[p] = B[(n0 + p) * L + j];
      cn[p] = C[(n0 + p) * L + j];
    }
#pragma omp simd
    for (int w = 0; w < W; ++w) {
      T sum = 0;
      for (int p = 0; p < P; ++p) {
        const T m = expm1_simd<T, kClamp>(dt[w] * an[p][w]);
        const T v = hn[p][w] + (m * hn[p][w] + x[w] * bn[p]);
        hn[p][w] = v;
        sum += v * cn[p];
      }
      y[w] += sum;
    }
  }
  std::copy(&hn[0][0], &hn[0][0] + P * W, h + n0 * W);
}

// Forward of W channels from d0 (those below nd) of batch item b, block by block. hs (if not
// null) gets each channel's state at the start of every block: [b, d, n_blocks, N].
//
// Here the SIMD lanes are channels, not states (as in the backward): C . h is then a sum of
// vectors, not across one, and with P = 2 states at a time the step loop is near the FMA
// units' throughput (with the one-constant exp reduction: 29 cycles a channel and step against
// 40 with states as lanes, d 512, L 3,000, one thread). The price is a transpose of dt and
// dt * u into step-major [K, W] blocks and of y back.
template <typename T, int NS>
void forward_lanes(const Scan<T>& s, int64_t b, int64_t d0, T* out, T* hs, T* last) {
  constexpr int W = kLanes<T>, P = 2;
  const int64_t N = NS > 0 ? NS : s.N, L = s.L, K = s.K, nblk = s.n_blocks();
  const int64_t nw = std::min<int64_t>(W, s.nd - d0);
  // lanes past nw have A = 0, dt = 0 and u = 0: their states stay 0
  std::vector<T> h(N * W, T(0)), aT(N * W, T(0)), row(K), dtT(K * W), xT(K * W), yT(K * W);
  for (int64_t w = 0; w < nw; ++w)
    for (int64_t n = 0; n < N; ++n) {
      aT[n * W + w] = s.A[(d0 + w) * N + n];
      if (s.h0 != nullptr) h[n * W + w] = s.h0[(b * s.nd + d0 + w) * N + n];
    }
  const T a_lo = *std::min_element(aT.begin(), aT.end());
  const T a_hi = *std::max_element(aT.begin(), aT.end());
  const T* __restrict B = s.B + b * N * L;
  const T* __restrict C = s.C + b * N * L;
  for (int64_t c = 0; c < nblk; ++c) {
    const int64_t t0 = c * K, t1 = std::min(L, t0 + K), n_steps = t1 - t0;
    T dt_lo = 0, dt_hi = 0;
    std::fill(dtT.begin(), dtT.end(), T(0));
    std::fill(xT.begin(), xT.end(), T(0));
    std::fill(yT.begin(), yT.end(), T(0));
    for (int64_t w = 0; w < nw; ++w) {
      const int64_t bd = b * s.nd + d0 + w;
      const T* __restrict u = s.u + bd * L + t0;
      s.step_sizes(bd, t0, t1, row.data());
#pragma omp simd reduction(min : dt_lo) reduction(max : dt_hi)
      for (int64_t j = 0; j < n_steps; ++j) {
        dt_lo = row[j] < dt_lo ? row[j] : dt_lo;
        dt_hi = row[j] > dt_hi ? row[j] : dt_hi;
      }
      for (int64_t j = 0; j < n_steps; ++j) {
        dtT[j * W + w] = row[j];
        xT[j * W + w] = row[j] * u[j];
      }
      if (hs != nullptr)
        for (int64_t n = 0; n < N; ++n) hs[(bd * nblk + c) * N + n] = h[n * W + w];
    }
    // dt * A over the block lies between the products of the ranges' ends
    const bool in_range =
        in_exp_range(dt_lo * a_lo, dt_hi * a_hi) && in_exp_range(dt_lo * a_hi, dt_hi * a_lo);
    int64_t n = 0;
    for (; n + P <= N; n += P)
      if (in_range)
        lane_states<T, P, W, false>(L, n, n_steps, aT.data(), dtT.data(), xT.data(), B + t0,
                                    C + t0, h.data(), yT.data());
      else
        lane_states<T, P, W, true>(L, n, n_steps, aT.data(), dtT.data(), xT.data(), B + t0,
                                   C + t0, h.data(), yT.data());
    for (; n < N; ++n)
      lane_states<T, 1, W, true>(L, n, n_steps, aT.data(), dtT.data(), xT.data(), B + t0,
                                 C + t0, h.data(), yT.data());
    for (int64_t w = 0; w < nw; ++w) {
      const int64_t bd = b * s.nd + d0 + w;
      const T* __restrict u = s.u + bd * L;
      const T Dv = s.D[d0 + w];
      T* __restrict o = out + bd * L;
      for (int64_t t = t0; t < t1; ++t) o[t] = yT[(t - t0) * W + w] + Dv * u[t];
      if (s.z != nullptr) {
        const T* __restrict z = s.z + bd * L;
#pragma omp simd
        for (int64_t t = t0; t < t1; ++t) o[t] *= silu(z[t]);
      }
    }
  }
  for (int64_t w = 0; w < nw; ++w)
    for (int64_t n = 0; n < N; ++n) last[(b * s.nd + d0 + w) * N + n] = h[n * W + w];
}

// Gradients a task accumulates. gB, gC: this task's own [L, N] partial sums over its channels.
template <typename T>
struct Grads {
  const T* gout;    // [b,d,L]
  const T* glast;   // [b,d,N] gradient of the last state, or null
  T *gu, *gdelta;   // [b,d,L] (the bias's gradient is gdelta summed by the caller)
  T* gz;            // [b,d,L] when the scan has z
  double *gA, *gD;  // [b,d,N] [b,d]: per batch item, summed over it by the caller
  T *gB, *gC;       // [b,G,L,N]
  T* gh0;           // [b,d,N] gradient of the initial state, or null
};

// Backward of one channel over one block [t0, t1): recomputes the block's states from its
// stored first state, then runs the adjoint back through it. gh: the state's adjoint (in: at
// the block's end; out: at its start); gA_block: this block's dA sums, added to.
// Per-block scratch of backward_block: states and expm1(dt A) [K, N]; dt and the gradient of
// the ungated output [K].
template <typename T>
struct BlockWork {
  std::vector<T> h, m, dt, gy;
  BlockWork(int64_t K, int64_t N) : h(K * N), m(K * N), dt(K), gy(K) {}
};

template <typename T, int NS>
void backward_block(const Scan<T>& s, const Grads<T>& g, int64_t bd, int64_t t0, int64_t t1,
                    const T* hstart, T* __restrict gh, T* __restrict gA_block, double* gDsum,
                    BlockWork<T>& w, T* __restrict gB, T* __restrict gC) {
  const int64_t N = NS > 0 ? NS : s.N, L = s.L, b = bd / s.nd, d = bd % s.nd;
  const T* __restrict a = s.A + d * N;
  const T* __restrict u = s.u + bd * L;
  const T* __restrict go = g.gout + bd * L;
  const T* __restrict B = s.B + b * L * N;
  const T* __restrict C = s.C + b * L * N;
  T* __restrict hbuf = w.h.data();
  T* __restrict mbuf = w.m.data();
  T* __restrict dt = w.dt.data();
  T* __restrict gys = w.gy.data();
  const T Dv = s.D[d];
  alignas(64) T h[kMaxN];
  std::copy(hstart, hstart + N, h);
  T a_lo, a_hi;
  a_range(a, N, &a_lo, &a_hi);
  s.step_sizes(bd, t0, t1, dt);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t j = t - t0;
    const T y = step<T, NS>(N, a, a_lo, a_hi, dt[j], dt[j] * u[t], B + t * N, C + t * N, h,
                            mbuf + j * N);
    std::copy(h, h + N, hbuf + j * N);
    gys[j] = y + Dv * u[t];  // the ungated output, until the gate's gradients are out
  }
  if (s.z != nullptr) {
    const T* __restrict z = s.z + bd * L;
    T* __restrict gz = g.gz + bd * L;
#pragma omp simd
    for (int64_t t = t0; t < t1; ++t) {
      gz[t] = go[t] * gys[t - t0] * silu_grad(z[t]);
      gys[t - t0] = go[t] * silu(z[t]);
    }
  } else {
    std::copy(go + t0, go + t1, gys);
  }
  double gD = 0.0;
  for (int64_t t = t1 - 1; t >= t0; --t) {
    const int64_t j = t - t0;
    const T gy = gys[j], uv = u[t], dtv = dt[j], x = dtv * uv;
    const T* __restrict hprev = j > 0 ? hbuf + (j - 1) * N : hstart;
    const T* __restrict hj = hbuf + j * N;
    const T* __restrict mj = mbuf + j * N;
    const T* __restrict Bt = B + t * N;
    const T* __restrict Ct = C + t * N;
    T* __restrict gBt = gB + j * N;
    T* __restrict gCt = gC + j * N;
    alignas(64) T pA[kMaxN], pB[kMaxN];  // the terms of d loss / d dt and of d loss / d (dt u)
    gD += static_cast<double>(gy) * uv;
#pragma omp simd
    for (int64_t n = 0; n < (NS > 0 ? NS : N); ++n) {
      const T gn = gh[n] + gy * Ct[n];  // d loss / d h_t
      const T ge = gn + gn * mj[n];     // times exp(dt A) = 1 + expm1(dt A)
      const T q = ge * hprev[n];        // d loss / d (dt A), over dt or A
      gCt[n] += gy * hj[n];
      gBt[n] += gn * x;
      gA_block[n] += dtv * q;
      pA[n] = a[n] * q;
      pB[n] = gn * Bt[n];
      gh[n] = ge;
    }
    const T sA = sum_states<T, NS>(pA, N), sB = sum_states<T, NS>(pB, N);
    g.gu[bd * L + t] = gy * Dv + dtv * sB;
    g.gdelta[bd * L + t] = sA + uv * sB;  // d loss / d dt, until the softplus below
  }
  if (s.softplus) {
    T* __restrict gdelta = g.gdelta + bd * L;
#pragma omp simd
    for (int64_t t = t0; t < t1; ++t) gdelta[t] *= -expm1_simd<T, true>(-dt[t - t0]);
  }
  *gDsum += gD;
}

// Backward of one task, blocks in reverse and, inside a block, every channel of the group.
template <typename T, int NS>
void backward_task(const Scan<T>& s, const Grads<T>& g, int64_t task, const T* hs) {
  const int64_t N = NS > 0 ? NS : s.N, L = s.L, K = s.K, nblk = s.n_blocks();
  const int64_t b = task / s.G, grp = task % s.G;
  const int64_t d0 = s.d_begin(grp), d1 = s.d_begin(grp + 1), nch = d1 - d0;
  std::vector<T> gh(nch * N, T(0)), gA_block(N);
  BlockWork<T> work(K, N);
  std::vector<double> gA(nch * N, 0.0), gD(nch, 0.0);
  if (g.glast != nullptr)
    for (int64_t d = d0; d < d1; ++d)
      for (int64_t n = 0; n < N; ++n)
        gh[(d - d0) * N + n] = g.glast[(b * s.nd + d) * N + n];
  T* gB = g.gB + task * L * N;
  T* gC = g.gC + task * L * N;
  for (int64_t c = nblk - 1; c >= 0; --c) {
    const int64_t t0 = c * K, t1 = std::min(L, t0 + K);
    std::fill(gB + t0 * N, gB + t1 * N, T(0));
    std::fill(gC + t0 * N, gC + t1 * N, T(0));
    for (int64_t d = d0; d < d1; ++d) {
      const int64_t bd = b * s.nd + d;
      std::fill(gA_block.begin(), gA_block.end(), T(0));
      backward_block<T, NS>(s, g, bd, t0, t1, hs + (bd * nblk + c) * N, &gh[(d - d0) * N],
                            gA_block.data(), &gD[d - d0], work, gB + t0 * N, gC + t0 * N);
      for (int64_t n = 0; n < N; ++n) gA[(d - d0) * N + n] += gA_block[n];
    }
  }
  for (int64_t d = d0; d < d1; ++d) {
    const int64_t bd = b * s.nd + d;
    std::copy(&gA[(d - d0) * N], &gA[(d - d0 + 1) * N], g.gA + bd * N);
    g.gD[bd] = gD[d - d0];
    if (g.gh0 != nullptr) std::copy(&gh[(d - d0) * N], &gh[(d - d0 + 1) * N], g.gh0 + bd * N);
  }
}

// One task per W channels of a batch item (the forward needs no per-group sums, so its tasks
// need not follow the backward's groups).
template <typename T>
void forward(const Scan<T>& s, T* out, T* hs, T* last, int n_threads) {
  constexpr int W = kLanes<T>;
  const int64_t n_vectors = (s.nd + W - 1) / W;
  parallel_for(s.nb * n_vectors, n_threads, [&](int64_t task) {
    const int64_t b = task / n_vectors, d0 = task % n_vectors * W;
    if (s.N == 16)
      forward_lanes<T, 16>(s, b, d0, out, hs, last);
    else
      forward_lanes<T, 0>(s, b, d0, out, hs, last);
  });
}

template <typename T>
void backward(const Scan<T>& s, const Grads<T>& g, const T* hs, int n_threads) {
  parallel_for(s.nb * s.G, n_threads, [&](int64_t task) {
    if (s.N == 16)
      backward_task<T, 16>(s, g, task, hs);
    else
      backward_task<T, 0>(s, g, task, hs);
  });
}

// Causal depthwise conv (kernel K) followed by SiLU, one task per row of [b, d, L], in T; in
// front of each row either the row's K-1 previous inputs (prev [b, d, K-1], a stream going on)
// or, without prev, K-1 zeros. The backward recomputes the pre-activation instead of storing
// it.
template <typename T>
void conv_pre(const T* x, const T* prev, const T* w, T bias, int64_t L, int64_t K,
              T* __restrict xp, T* __restrict pre) {
  // xp: the row with what comes before it in front; one loop over time per tap, so each
  // vectorises
  if (prev != nullptr)
    std::copy(prev, prev + K - 1, xp);
  else
    std::fill(xp, xp + K - 1, T(0));
  std::copy(x, x + L, xp + K - 1);
  std::fill(pre, pre + L, bias);
  for (int64_t k = 0; k < K; ++k) {
    const T wk = w[k];
#pragma omp simd
    for (int64_t t = 0; t < L; ++t) pre[t] += wk * xp[t + k];
  }
}

template <typename T>
void conv_silu_forward(const T* x, const T* prev, const T* w, const T* bias, int64_t nb,
                       int64_t nd, int64_t L, int64_t K, T* out, int n_threads) {
  parallel_for(nb * nd, n_threads, [&](int64_t bd) {
    const int64_t d = bd % nd;
    std::vector<T> xbuf(L + K - 1), pbuf(L);
    T* __restrict pre = pbuf.data();
    conv_pre(x + bd * L, prev != nullptr ? prev + bd * (K - 1) : nullptr, w + d * K, bias[d], L,
             K, xbuf.data(), pre);
    T* __restrict o = out + bd * L;
#pragma omp simd
    for (int64_t t = 0; t < L; ++t) o[t] = pre[t] * sigmoid(pre[t]);
  });
}

template <typename T>
void conv_silu_backward(const T* x, const T* prev, const T* w, const T* bias, const T* gout,
                        int64_t nb, int64_t nd, int64_t L, int64_t K, T* gx, T* gprev,
                        double* gw, double* gb, int n_threads) {
  parallel_for(nb * nd, n_threads, [&](int64_t bd) {
    const int64_t d = bd % nd;
    // gp: d out / d pre-activation with K-1 zeros behind
    std::vector<T> xbuf(L + K - 1), pbuf(L), gbuf(L + K - 1, T(0));
    T* __restrict xp = xbuf.data();
    T* __restrict pre = pbuf.data();
    T* __restrict gp = gbuf.data();
    conv_pre(x + bd * L, prev != nullptr ? prev + bd * (K - 1) : nullptr, w + d * K, bias[d], L,
             K, xp, pre);
    const T* __restrict go = gout + bd * L;
    double gbias = 0.0;
#pragma omp simd reduction(+ : gbias)
    for (int64_t t = 0; t < L; ++t) {
      const T sg = sigmoid(pre[t]);
      gp[t] = go[t] * sg * (T(1) + pre[t] * (T(1) - sg));
      gbias += gp[t];
    }
    gb[bd] = gbias;
    T* __restrict acc = gx + bd * L;
    std::fill(acc, acc + L, T(0));
    for (int64_t k = 0; k < K; ++k) {
      const T wk = w[d * K + k];
      double gwk = 0.0;
      // x[s] feeds outputs s .. s+K-1 through taps K-1 .. 0
#pragma omp simd reduction(+ : gwk)
      for (int64_t t = 0; t < L; ++t) {
        gwk += gp[t] * xp[t + k];
        acc[t] += wk * gp[t + K - 1 - k];
      }
      gw[bd * K + k] = gwk;
    }
    // prev[i] feeds outputs 0 .. i through taps i .. 0
    if (gprev != nullptr)
      for (int64_t i = 0; i < K - 1; ++i) {
        T sum = 0;
        for (int64_t k = 0; k <= i; ++k) sum += w[d * K + k] * gp[i - k];
        gprev[bd * (K - 1) + i] = sum;
      }
  });
}

// LayerNorm over the channels of x [nb, C, L] (biased variance, as nn.LayerNorm), affine,
// then LeakyReLU with the given slope (slope 1: none). A task is a tile of steps of one batch
// item, sized so that its C rows fill about 256 KB: they stay in cache for the three passes
// (mean, variance, output), and each row is long enough for the prefetcher. Every pass runs
// along time, the contiguous axis, so it vectorises.
template <typename T>
void channel_norm_forward(const T* x, const T* w, const T* bias, int64_t nb, int64_t C,
                          int64_t L, T eps, T slope, T* out, int n_threads) {
  const int64_t tile = std::max<int64_t>(256, (int64_t(1) << 18) / int64_t(sizeof(T)) / C);
  const int64_t tiles = (L + tile - 1) / tile;
  parallel_for(nb * tiles, n_threads, [&](int64_t task) {
    const int64_t b = task / tiles, t0 = task % tiles * tile;
    const int64_t n = std::min(tile, L - t0);
    std::vector<T> mean_buf(n, T(0)), rstd_buf(n, T(0));
    T* __restrict mean = mean_buf.data();
    T* __restrict rstd = rstd_buf.data();
    const T* xb = x + b * C * L + t0;
    for (int64_t c = 0; c < C; ++c) {
      const T* __restrict xc = xb + c * L;
#pragma omp simd
      for (int64_t t = 0; t < n; ++t) mean[t] += xc[t];
    }
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) mean[t] /= T(C);
    for (int64_t c = 0; c < C; ++c) {
      const T* __restrict xc = xb + c * L;
#pragma omp simd
      for (int64_t t = 0; t < n; ++t) rstd[t] += (xc[t] - mean[t]) * (xc[t] - mean[t]);
    }
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) rstd[t] = T(1) / std::sqrt(rstd[t] / T(C) + eps);
    for (int64_t c = 0; c < C; ++c) {
      const T* __restrict xc = xb + c * L;
      T* __restrict oc = out + b * C * L + c * L + t0;
      const T wc = w[c], bc = bias[c];
#pragma omp simd
      for (int64_t t = 0; t < n; ++t) {
        const T v = (xc[t] - mean[t]) * rstd[t] * wc + bc;
        // arithmetic, not v < 0 ? v * slope : v, which g++ does not vectorise here
        oc[t] = std::max(v, T(0)) + slope * std::min(v, T(0));
      }
    }
  });
}

// GCC's vector extension: a SIMD register of T (kVectorBytes wide), for sums that must stay in
// registers, which g++ does not do for the elements of a local array.
template <typename T>
struct Vector {
  typedef T type __attribute__((vector_size(kVectorBytes)));
};

// out[b] = w @ x[b] for w [M, K] and x [nb, K, L]: Mamba's projections in inference, on the
// U-Net's channels-first layout. A task is a stretch of steps of one batch item. For each tile
// of 2 vectors of steps, x's columns are first packed k by k into one contiguous panel; then
// for each block of kRows output rows the kRows x 2 sums stay in registers while k runs (12 of
// AVX2's 16), each x vector loaded once for kRows FMAs.
template <typename T>
void project_forward(const T* w, const T* x, int64_t nb, int64_t M, int64_t K, int64_t L,
                     T* out, int n_threads) {
  using V = typename Vector<T>::type;
  constexpr int64_t kWidth = kLanes<T>, kSteps = 2 * kWidth;
  constexpr int64_t kRows = 6, kTask = 1024;
  const int64_t tiles = (L + kTask - 1) / kTask, blocks = (M + kRows - 1) / kRows;
  // w by blocks of kRows rows, k-major inside a block, zero past M
  std::vector<T> wt(blocks * K * kRows, T(0));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) wt[(m / kRows * K + k) * kRows + m % kRows] = w[m * K + k];
  parallel_for(nb * tiles, n_threads, [&](int64_t task) {
    const int64_t b = task / tiles, t0 = task % tiles * kTask, t1 = std::min(L, t0 + kTask);
    const T* xb = x + b * K * L;
    T* ob = out + b * M * L;
    std::vector<T> panel(K * kSteps);  // x[:, t : t + kSteps], zero past L
    for (int64_t t = t0; t < t1; t += kSteps) {
      const int64_t n = std::min(kSteps, t1 - t);
      for (int64_t k = 0; k < K; ++k) {
        std::copy(xb + k * L + t, xb + k * L + t + n, panel.begin() + k * kSteps);
        std::fill(panel.begin() + k * kSteps + n, panel.begin() + (k + 1) * kSteps, T(0));
      }
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const T* __restrict wb = wt.data() + blk * K * kRows;
        const T* __restrict xp = panel.data();
        V acc[kRows][2] = {};
        for (int64_t k = 0; k < K; ++k) {
          V x0, x1;
          std::memcpy(&x0, xp + k * kSteps, sizeof(V));
          std::memcpy(&x1, xp + k * kSteps + kWidth, sizeof(V));
#pragma GCC unroll 8
          for (int64_t r = 0; r < kRows; ++r) {
            acc[r][0] += wb[k * kRows + r] * x0;
            acc[r][1] += wb[k * kRows + r] * x1;
          }
        }
        alignas(64) T sums[kSteps];
        for (int64_t r = 0; r < std::min(kRows, M - blk * kRows); ++r) {
          std::memcpy(sums, &acc[r][0], sizeof(V));
          std::memcpy(sums + kWidth, &acc[r][1], sizeof(V));
          std::copy(sums, sums + n, ob + (blk * kRows + r) * L + t);
        }
      }
    }
  });
}

// Grouped conv1d (the multi-scale discriminator's 41-tap grouped layers) for training: forward,
// input gradient and weight gradient. Per group it has few channels (8 to 64 in, 16 to 64 out)
// and 41 taps, shapes on which PyTorch's CPU convolutions ran at 30-80 GFLOP/s against ~140
// for a matrix product, and an im2col matrix would be 41 times the input.
//
// All three are one stride-1 correlation, out[o, t] = sum_c sum_m w[o, c, m] in[c, t + m], over
// a polyphase input: with stride S, tap j = r + S m reads phase r of the padded input at t + m,
// so the (channel, phase) pairs are the correlation's input rows and ceil(K / S) its taps. The
// input gradient is the same correlation of the output gradient with the taps reversed, its
// output rows (channel, phase) pairs that are then interleaved back; the weight gradient is its
// sums over time. All three are computed by Winograd (below), with half the products. Time is
// the SIMD lanes: kRows output rows x kCols vectors of steps of sums stay in registers while
// (c, m) runs. 6 x 2 is BLIS's AVX2 shape: 12 sums, and 2 loads + 6 broadcasts per 12 FMAs;
// with 4 x 3 g++ loaded x again for every FMA, and the tile ran at half the rate.
template <typename T>
struct Correlation {
  static constexpr int64_t kRows = 6, kCols = 2, kTile = kCols * kLanes<T>;
};

// sums[r][i] = sum_c sum_m wb[(c M + m) kRows + r] in[c ld + m + i]: one microtile of kRows
// rows x kTile steps of the correlation; in holds C rows of ld values.
template <typename T>
inline void correlate_tile(const T* __restrict wb, const T* __restrict in, int64_t C, int64_t M,
                           int64_t ld, T (&sums)[Correlation<T>::kRows][Correlation<T>::kTile]) {
  using V = typename Vector<T>::type;
  constexpr int64_t R = Correlation<T>::kRows, Q = Correlation<T>::kCols, W = kLanes<T>;
  V acc[R][Q] = {};
  for (int64_t c = 0; c < C; ++c) {
    const T* row = in + c * ld;
    for (int64_t m = 0; m < M; ++m) {
      const T* wm = wb + (c * M + m) * R;
      V x[Q];
#pragma GCC unroll 4
      for (int64_t q = 0; q < Q; ++q) std::memcpy(&x[q], row + m + q * W, sizeof(V));
#pragma GCC unroll 8
      for (int64_t r = 0; r < R; ++r) {
#pragma GCC unroll 4
        for (int64_t q = 0; q < Q; ++q) acc[r][q] += wm[r] * x[q];
      }
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t q = 0; q < Q; ++q) std::memcpy(&sums[r][q * W], &acc[r][q], sizeof(V));
}

// The stride-1 correlation of one group over one stretch of steps, rows [0, O) for t in
// [0, n), handed kTile steps of one row at a time to store(o, t, count, sums); packed holds
// the weights as [ceil(O / kRows), C, M, kRows] (a row block's kRows weights of one (c, m) side
// by side, zero past O, in the order the microkernel reads them), panel C rows of ld values,
// ld >= n rounded up to kTile, + M - 1.
template <typename T, typename Store>
void correlate(const T* packed, const T* panel, int64_t O, int64_t C, int64_t M, int64_t ld,
               int64_t n, Store store) {
  constexpr int64_t R = Correlation<T>::kRows, tile = Correlation<T>::kTile;
  alignas(64) T sums[R][tile];
  for (int64_t blk = 0; blk * R < O; ++blk) {
    const T* wb = packed + blk * C * M * R;
    for (int64_t t = 0; t < n; t += tile) {
      correlate_tile<T>(wb, panel + t, C, M, ld, sums);
      for (int64_t r = 0; r < std::min(R, O - blk * R); ++r)
        store(blk * R + r, t, std::min(tile, n - t), sums[r]);
    }
  }
}

// The shapes of one grouped conv1d: x [nb, G Ci, L] -> out [nb, G Co, Lout], w [G Co, Ci, K],
// stride S, zero padding P on both sides.
struct GroupedConv {
  int64_t nb, G, Ci, Co, L, K, S, P, Lout;
  int64_t taps() const { return (K + S - 1) / S; }  // per phase
};

// row[q] = xc[S (t0 + q) + r - P] for q in [0, n), zero outside [0, L): phase r of a padded
// input row, from step t0 on.
template <typename T>
void pack_phase(const T* xc, int64_t L, int64_t S, int64_t P, int64_t r, int64_t t0, int64_t n,
                T* row) {
  for (int64_t q = 0; q < n; ++q) {
    const int64_t i = S * (t0 + q) + r - P;
    row[q] = i >= 0 && i < L ? xc[i] : T(0);
  }
}

// Winograd F(4, 4) (ssm.winograd_matrices builds it; row-major A^T [4, 7], G [7, 4], B^T [7, 7]):
// 4 outputs of a 4-tap correlation from 7 inputs, y = A^T ((G w) * (B^T d)), 7 products where
// a direct correlation takes 16. A correlation with M taps is ceil(M / 4) chunks of 4, and
// chunk q of tile i reads the inputs of tile i + q: so with every input tile transformed once,
// each of the 7 points is a correlation over tiles with ceil(M / 4) taps, which the microkernel
// above computes. The 41-tap layers then take 1.75 * 11 = 19.25 products an output per input
// row at stride 1 (against 41), 21 at strides 2 and 4 (polyphase: 2 x 6 and 4 x 3 chunks).
struct Winograd {
  static constexpr int64_t m = 4, r = 4, n = 7;
  const double *a_t, *g, *b_t;
  explicit Winograd(const double* w) : a_t(w), g(w + m * n), b_t(w + m * n + n * r) {}
};

// Outputs of one task of the forward and of the input gradient: 64 Winograd tiles.
constexpr int64_t kConvSteps = 256;

// The Winograd transforms in T, and the input transform of one row: point p of tile i (inputs
// m i .. m i + n - 1 of row) to out[p point_stride + i] for i < tiles; row and phases (scratch)
// hold m (tiles + 1) values.
template <typename T>
struct WinogradTransforms {
  static constexpr int64_t m = Winograd::m, n = Winograd::n;
  T bt[n][n], at[m][n];
  explicit WinogradTransforms(const Winograd& wg) {
    for (int64_t p = 0; p < n; ++p)
      for (int64_t j = 0; j < n; ++j) bt[p][j] = T(wg.b_t[p * n + j]);
    for (int64_t k = 0; k < m; ++k)
      for (int64_t p = 0; p < n; ++p) at[k][p] = T(wg.a_t[k * n + p]);
  }
  void input_tiles(const T* row, int64_t tiles, T* out, int64_t point_stride,
                   T* phases) const {
    // phases[k][i] = row[m i + k]: input j of tile i is phases[j % m][i + j / m], so that
    // tiles side by side are contiguous
    for (int64_t i = 0; i <= tiles; ++i)
      for (int64_t k = 0; k < m; ++k) phases[k * (tiles + 1) + i] = row[m * i + k];
    const T* __restrict ph = phases;
    T* __restrict o = out;
#pragma omp simd
    for (int64_t i = 0; i < tiles; ++i) {
      T d[n];
      for (int64_t j = 0; j < n; ++j) d[j] = ph[(j % m) * (tiles + 1) + i + j / m];
      for (int64_t p = 0; p < n; ++p) {
        T sum = 0;
        for (int64_t j = 0; j < n; ++j) sum += bt[p][j] * d[j];
        o[p * point_stride + i] = sum;
      }
    }
  }
};

// The stride-1 correlation out[o, t] = sum_c sum_m weight(g, o, c, m) in[c, t + m] of every
// batch item and group over steps [0, steps), for the forward and the input gradient, O x C x M
// taps per group, by Winograd (above); a task, one stretch of kConvSteps steps of one (b, g),
// has fill_row(b, g, c, t0, n, row) pack input row c from step t0 on (n values, zero past the
// input) and store(b, g, o, t0, len, values) write len steps of output row o from t0 on.
template <typename T, typename Taps, typename FillRow, typename Store>
void correlate_groups(const GroupedConv& s, int64_t O, int64_t C, int64_t steps, Taps taps,
                      FillRow fill_row, Store store, const Winograd& wg, int n_threads) {
  constexpr int64_t m = Winograd::m, r = Winograd::r, n = Winograd::n;
  constexpr int64_t tile = Correlation<T>::kTile;
  const int64_t M = s.taps(), Q = (M + r - 1) / r;
  // packed[g][p]: point p of group g's taps, G w of each chunk (in float64), as correlate takes
  // them. Kept from call to call (per calling thread) so that its pages, up to 20 MB, are not
  // faulted in anew each time.
  constexpr int64_t R = Correlation<T>::kRows;
  const int64_t blocks = (O + R - 1) / R, point_size = blocks * C * Q * R;
  static thread_local std::vector<T> packed_store;
  packed_store.resize(s.G * n * point_size);
  T* const packed = packed_store.data();  // the calling thread's, which the workers write
  parallel_for(s.G, n_threads, [&](int64_t g) {
    // wt[i][q][k]: tap q r + i of row k of a block (zero past M and O), so that G w of a whole
    // block is 4 contiguous multiply-adds
    std::vector<double> row(Q * r), wt(r * Q * R);
    for (int64_t blk = 0; blk < blocks; ++blk)
      for (int64_t c = 0; c < C; ++c) {
        std::fill(wt.begin(), wt.end(), 0.0);
        for (int64_t k = 0; k < R && blk * R + k < O; ++k) {
          std::fill(row.begin(), row.end(), 0.0);
          taps(g, blk * R + k, c, row.data());  // tap m of row o, column c
          for (int64_t j = 0; j < Q * r; ++j) wt[(j % r * Q + j / r) * R + k] = row[j];
        }
        for (int64_t p = 0; p < n; ++p) {
          const double* gp = wg.g + p * r;
          T* __restrict out = packed + (g * n + p) * point_size + (blk * C + c) * Q * R;
          const double* __restrict w = wt.data();
          for (int64_t e = 0; e < Q * R; ++e)
            out[e] = T(gp[0] * w[e] + gp[1] * w[Q * R + e] + gp[2] * w[2 * Q * R + e] +
                       gp[3] * w[3 * Q * R + e]);
        }
      }
  });
  const int64_t stretches = (steps + kConvSteps - 1) / kConvSteps;
  const WinogradTransforms<T> tf(wg);
  parallel_for(s.nb * s.G * stretches, n_threads, [&](int64_t task) {
    const int64_t b = task / (s.G * stretches), g = task / stretches % s.G;
    const int64_t t0 = task % stretches * kConvSteps, len = std::min(kConvSteps, steps - t0);
    const int64_t tiles = (len + m - 1) / m;
    const int64_t ld = (tiles + tile - 1) / tile * tile + Q - 1;  // what the last microtile reads
    // v[p][c][i]: point p of input tile i (inputs m i .. m i + n - 1 of the stretch) of row c
    std::vector<T> v(n * C * ld), row(m * (ld + 1)), phases(m * (ld + 1));
    std::vector<T> sums(n * O * tiles), y(m * tiles);
    for (int64_t c = 0; c < C; ++c) {
      fill_row(b, g, c, t0, m * (ld + 1), row.data());
      tf.input_tiles(row.data(), ld, v.data() + c * ld, C * ld, phases.data());
    }
    for (int64_t p = 0; p < n; ++p)
      correlate<T>(packed + (g * n + p) * point_size, v.data() + p * C * ld, O, C, Q, ld, tiles,
                   [&](int64_t o, int64_t i, int64_t count, const T* part) {
                     std::copy(part, part + count, sums.data() + (p * O + o) * tiles + i);
                   });
    for (int64_t o = 0; o < O; ++o) {
      const T* __restrict so = sums.data() + o * tiles;
      T* __restrict yo = y.data();
#pragma omp simd
      for (int64_t i = 0; i < tiles; ++i) {
        T d[n];
        for (int64_t p = 0; p < n; ++p) d[p] = so[p * O * tiles + i];
        for (int64_t k = 0; k < m; ++k) {
          T sum = 0;
          for (int64_t p = 0; p < n; ++p) sum += tf.at[k][p] * d[p];
          yo[m * i + k] = sum;
        }
      }
      store(b, g, o, t0, len, y.data());
    }
  });
}

template <typename T>
void grouped_conv_forward(const GroupedConv& s, const T* x, const T* w, const T* bias, T* out,
                          const Winograd& wg, int n_threads) {
  // input row c = (channel c / S, phase c % S): x[c / S, S (t0 + q) + c % S - P]
  correlate_groups<T>(
      s, s.Co, s.Ci * s.S, s.Lout,
      [&](int64_t g, int64_t o, int64_t c, double* taps) {  // w[o, c / S, c % S + S m]
        const T* wc = w + ((g * s.Co + o) * s.Ci + c / s.S) * s.K;
        for (int64_t m = 0, j = c % s.S; j < s.K; ++m, j += s.S) taps[m] = double(wc[j]);
      },
      [&](int64_t b, int64_t g, int64_t c, int64_t t0, int64_t n, T* row) {
        pack_phase(x + ((b * s.G + g) * s.Ci + c / s.S) * s.L, s.L, s.S, s.P, c % s.S, t0, n,
                   row);
      },
      [&](int64_t b, int64_t g, int64_t o, int64_t t, int64_t len, const T* sums) {
        const T bo = bias ? bias[g * s.Co + o] : T(0);
        T* ob = out + ((b * s.G + g) * s.Co + o) * s.Lout + t;
        for (int64_t i = 0; i < len; ++i) ob[i] = sums[i] + bo;
      },
      wg, n_threads);
}

// gx[c, S q + r - P] = sum_o sum_m w[o, c, r + S m] gout[o, q - m]: the correlation of gout,
// padded by M - 1 zeros in front, with the taps reversed; output rows (c, r).
template <typename T>
void grouped_conv_backward_input(const GroupedConv& s, const T* gout, const T* w, T* gx,
                                 const Winograd& wg, int n_threads) {
  const int64_t M = s.taps();
  // phase steps q covering x: S q + r - P in [0, L)
  const int64_t Lq = (s.L + s.P + s.S - 1) / s.S;
  correlate_groups<T>(
      s, s.Ci * s.S, s.Co, Lq,
      [&](int64_t g, int64_t c, int64_t o, double* taps) {  // w[o, c / S, c % S + S (M - 1 - m)]
        const T* wc = w + ((g * s.Co + o) * s.Ci + c / s.S) * s.K;
        for (int64_t m = 0, j = c % s.S; j < s.K; ++m, j += s.S) taps[M - 1 - m] = double(wc[j]);
      },
      [&](int64_t b, int64_t g, int64_t o, int64_t q0, int64_t n, T* row) {
        // gout[o, q0 + i - (M - 1)], zero outside gout
        pack_phase(gout + ((b * s.G + g) * s.Co + o) * s.Lout, s.Lout, 1, M - 1, 0, q0, n, row);
      },
      [&](int64_t b, int64_t g, int64_t row, int64_t q, int64_t len, const T* sums) {
        const int64_t c = row / s.S, r = row % s.S;
        T* gxc = gx + ((b * s.G + g) * s.Ci + c) * s.L;
        for (int64_t i = 0; i < len; ++i) {
          const int64_t at = s.S * (q + i) + r - s.P;
          if (at >= 0 && at < s.L) gxc[at] = sums[i];
        }
      },
      wg, n_threads);
}

// gw[o, c, r + S m] = sum_b sum_t gout[b, o, t] x[b, c, S (t + m) + r - P]: for each input row
// (c, r) and tap m, a sum over time of a gout row times a shifted polyphase row, by Winograd as
// the forward: from y = A^T ((G w) * (B^T d)), chunk q of the taps gets G^T of the sum over
// tiles i of (A gout_i) * (B^T d_(i + q)), so for each of the 7 points a sum over tiles of a
// transformed gout row times a transformed input row shifted by q. Output channels are the
// lanes: kRows (row, chunk) pairs (input broadcast) x kCols vectors of output channels (gout,
// packed tile-major) of sums stay in registers over a stretch of kWeightSteps steps, then are
// added up in float64. (Chunks as lanes would round 3, 6 or 11 up to 16; output channels come
// in multiples of 16.) A task is one such block of output channels of one group; it packs and
// transforms gout and the polyphase input for each stretch.
constexpr int64_t kWeightSteps = 512;

template <typename T>
void grouped_conv_backward_weight(const GroupedConv& s, const T* x, const T* gout, T* gw,
                                  const Winograd& wg, int n_threads) {
  using V = typename Vector<T>::type;
  constexpr int64_t R = Correlation<T>::kRows, Qv = Correlation<T>::kCols, W = kLanes<T>;
  constexpr int64_t m = Winograd::m, r = Winograd::r, n = Winograd::n;
  constexpr int64_t block = Qv * W;  // output channels per task
  constexpr int64_t max_tiles = kWeightSteps / m;
  const int64_t M = s.taps(), Q = (M + r - 1) / r, Cp = s.Ci * s.S, pairs = Cp * Q;
  const int64_t ld = max_tiles + Q - 1;  // input tiles a stretch reads
  const int64_t blocks = (s.Co + block - 1) / block;
  const WinogradTransforms<T> tf(wg);
  parallel_for(s.G * blocks, n_threads, [&](int64_t task) {
    const int64_t g = task / blocks, o0 = task % blocks * block;
    const int64_t rows = std::min(block, s.Co - o0);
    std::vector<double> sums(n * (pairs + R) * block, 0.0);  // [point][(c, q)][o]
    std::vector<T> row(m * (ld + 1)), phases(m * (ld + 1)), v(n * Cp * ld);
    std::vector<T> graw(kWeightSteps * block);
    std::vector<T> gt(n * max_tiles * block);
    alignas(64) T part[R][block];
    for (int64_t b = 0; b < s.nb; ++b) {
      for (int64_t t0 = 0; t0 < s.Lout; t0 += kWeightSteps) {
        const int64_t len = std::min(kWeightSteps, s.Lout - t0), tiles = (len + m - 1) / m;
        const int64_t ldv = tiles + Q - 1;
        // graw[t][o] = gout[b, o0 + o, t0 + t], zero past the rows and past the stretch
        std::fill(graw.begin(), graw.begin() + tiles * m * block, T(0));
        for (int64_t o = 0; o < rows; ++o) {
          const T* go = gout + ((b * s.G + g) * s.Co + o0 + o) * s.Lout + t0;
          for (int64_t t = 0; t < len; ++t) graw[t * block + o] = go[t];
        }
        // gt[p][i][o] = sum_k A^T[k][p] graw[m i + k][o]
        for (int64_t p = 0; p < n; ++p)
          for (int64_t i = 0; i < tiles; ++i) {
            T* __restrict dst = gt.data() + (p * max_tiles + i) * block;
            const T* __restrict src = graw.data() + m * i * block;
#pragma omp simd
            for (int64_t o = 0; o < block; ++o) {
              T sum = 0;
              for (int64_t k = 0; k < m; ++k) sum += tf.at[k][p] * src[k * block + o];
              dst[o] = sum;
            }
          }
        for (int64_t c = 0; c < Cp; ++c) {
          pack_phase(x + ((b * s.G + g) * s.Ci + c / s.S) * s.L, s.L, s.S, s.P, c % s.S, t0,
                     m * (ldv + 1), row.data());
          tf.input_tiles(row.data(), ldv, v.data() + c * ldv, Cp * ldv, phases.data());
        }
        // pairs (c, q) in blocks of R; a block's pairs may run into the next row, whose
        // transformed tiles follow at ldv
        for (int64_t p = 0; p < n; ++p) {
          const T* vp = v.data() + p * Cp * ldv;
          const T* __restrict gr = gt.data() + p * max_tiles * block;
          double* sp = sums.data() + p * (pairs + R) * block;
          for (int64_t p0 = 0; p0 < pairs; p0 += R) {
            const T* __restrict at[R];
            for (int64_t i = 0; i < R; ++i) {
              const int64_t pair = std::min(p0 + i, pairs - 1);
              at[i] = vp + pair / Q * ldv + pair % Q;
            }
            V acc[R][Qv] = {};
            for (int64_t t = 0; t < tiles; ++t) {
              V gv[Qv];
#pragma GCC unroll 4
              for (int64_t q = 0; q < Qv; ++q)
                std::memcpy(&gv[q], gr + t * block + q * W, sizeof(V));
#pragma GCC unroll 8
              for (int64_t i = 0; i < R; ++i) {
#pragma GCC unroll 4
                for (int64_t q = 0; q < Qv; ++q) acc[i][q] += at[i][t] * gv[q];
              }
            }
            for (int64_t i = 0; i < R; ++i)
              for (int64_t q = 0; q < Qv; ++q)
                std::memcpy(&part[i][q * W], &acc[i][q], sizeof(V));
            for (int64_t i = 0; i < R; ++i)
              for (int64_t o = 0; o < block; ++o) sp[(p0 + i) * block + o] += part[i][o];
          }
        }
      }
    }
    // tap j = c_phase + S (r q + i) of row (c, phase): sum_p G[p][i] sums[p][(c S + phase) Q + q]
    for (int64_t o = 0; o < rows; ++o)
      for (int64_t c = 0; c < s.Ci; ++c)
        for (int64_t j = 0; j < s.K; ++j) {
          const int64_t mm = j / s.S, pair = (c * s.S + j % s.S) * Q + mm / r;
          double sum = 0;
          for (int64_t p = 0; p < n; ++p)
            sum += wg.g[p * r + mm % r] * sums[(p * (pairs + R) + pair) * block + o];
          gw[((g * s.Co + o0 + o) * s.Ci + c) * s.K + j] = T(sum);
        }
  });
}

}  // namespace

#define SCAN_API(T, SUFFIX)                                                                  \
  extern "C" void scan_fwd_##SUFFIX(const T* u, const T* delta, const T* A, const T* B,    \
                                     const T* C, const T* D, const T* bias, const T* z,     \
                                     const T* h0, int64_t nb, int64_t nd, int64_t L,        \
                                     int64_t N, int64_t K, int64_t G, int softplus, T* out, \
                                     T* hs, T* last, int n_threads) {                       \
    forward(Scan<T>{u, delta, A, B, C, D, bias, z, h0, nb, nd, L, N, K, G, softplus}, out,  \
            hs, last, n_threads);                                                           \
  }                                                                                         \
  extern "C" void scan_bwd_##SUFFIX(                                                        \
      const T* u, const T* delta, const T* A, const T* B, const T* C, const T* D,           \
      const T* bias, const T* z, int64_t nb, int64_t nd, int64_t L, int64_t N, int64_t K,   \
      int64_t G, int softplus, const T* hs, const T* gout, const T* glast, T* gu,           \
      T* gdelta, T* gz, double* gA, double* gD, T* gB, T* gC, T* gh0, int n_threads) {      \
    backward(Scan<T>{u, delta, A, B, C, D, bias, z, nullptr, nb, nd, L, N, K, G, softplus}, \
             Grads<T>{gout, glast, gu, gdelta, gz, gA, gD, gB, gC, gh0}, hs, n_threads);    \
  }

#define CONV_API(T, SUFFIX)                                                                  \
  extern "C" void conv_fwd_##SUFFIX(const T* x, const T* prev, const T* w, const T* bias,  \
                                     int64_t nb, int64_t nd, int64_t L, int64_t K, T* out,  \
                                     int n_threads) {                                       \
    conv_silu_forward(x, prev, w, bias, nb, nd, L, K, out, n_threads);                      \
  }                                                                                         \
  extern "C" void conv_bwd_##SUFFIX(const T* x, const T* prev, const T* w, const T* bias,   \
                                     const T* gout, int64_t nb, int64_t nd, int64_t L,      \
                                     int64_t K, T* gx, T* gprev, double* gw, double* gb,    \
                                     int n_threads) {                                       \
    conv_silu_backward(x, prev, w, bias, gout, nb, nd, L, K, gx, gprev, gw, gb, n_threads); \
  }

#define NORM_API(T, SUFFIX)                                                                  \
  extern "C" void norm_fwd_##SUFFIX(const T* x, const T* w, const T* bias, int64_t nb,      \
                                     int64_t C, int64_t L, double eps, double slope, T* out, \
                                     int n_threads) {                                       \
    channel_norm_forward(x, w, bias, nb, C, L, T(eps), T(slope), out, n_threads);           \
  }

#define PROJECT_API(T, SUFFIX)                                                               \
  extern "C" void project_fwd_##SUFFIX(const T* w, const T* x, int64_t nb, int64_t M,        \
                                        int64_t K, int64_t L, T* out, int n_threads) {       \
    project_forward(w, x, nb, M, K, L, out, n_threads);                                       \
  }

#define GROUPED_CONV_API(T, SUFFIX)                                                          \
  extern "C" void grouped_conv_fwd_##SUFFIX(                                                \
      const T* x, const T* w, const T* bias, int64_t nb, int64_t G, int64_t Ci, int64_t Co, \
      int64_t L, int64_t K, int64_t S, int64_t P, int64_t Lout, const double* winograd,     \
      T* out, int n_threads) {                                                              \
    grouped_conv_forward(GroupedConv{nb, G, Ci, Co, L, K, S, P, Lout}, x, w, bias, out,     \
                         Winograd(winograd), n_threads);                                    \
  }                                                                                         \
  extern "C" void grouped_conv_bwd_input_##SUFFIX(                                          \
      const T* gout, const T* w, int64_t nb, int64_t G, int64_t Ci, int64_t Co, int64_t L,  \
      int64_t K, int64_t S, int64_t P, int64_t Lout, const double* winograd, T* gx,         \
      int n_threads) {                                                                      \
    grouped_conv_backward_input(GroupedConv{nb, G, Ci, Co, L, K, S, P, Lout}, gout, w, gx,  \
                                Winograd(winograd), n_threads);                             \
  }                                                                                         \
  extern "C" void grouped_conv_bwd_weight_##SUFFIX(                                         \
      const T* x, const T* gout, int64_t nb, int64_t G, int64_t Ci, int64_t Co, int64_t L,  \
      int64_t K, int64_t S, int64_t P, int64_t Lout, const double* winograd, T* gw,         \
      int n_threads) {                                                                      \
    grouped_conv_backward_weight(GroupedConv{nb, G, Ci, Co, L, K, S, P, Lout}, x, gout, gw, \
                                 Winograd(winograd), n_threads);                            \
  }

SCAN_API(float, f32)
SCAN_API(double, f64)
CONV_API(float, f32)
CONV_API(double, f64)
NORM_API(float, f32)
NORM_API(double, f64)
PROJECT_API(float, f32)
PROJECT_API(double, f64)
GROUPED_CONV_API(float, f32)
GROUPED_CONV_API(double, f64)
