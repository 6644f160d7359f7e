// Device side of fusedres._C: the kernels of the four BatchNorm + residual + ReLU stages and
// their helpers. Included by bn_act.cu only (host checks, launch and bindings), so the extension
// stays one translation unit; the anonymous namespace is that unit's.
//
// Kernels (storage fp32/fp16/bf16, all arithmetic in fp32, 64-bit element offsets):
//   stats_partial_kernel    per-channel Welford (count, mean, M2) of y over one slice of
//                           (N, H, W); one partial per (slice, channel) into a workspace.
//   backward_reduce_kernel  recomputes dz = grad_out * (z > 0) from y (+ residual) and sums
//                           dz, dz * (y - mean), dz * (residual - res_mean); partials as above.
//   finalize_kernel         merges one channel's partials in a fixed order (deterministic, no
//                           float atomics; Chan's formula for the statistics).
//   act_forward_kernel      out = act(y * scale + shift + r), r = 0 | res | res * rs + rb.
//   backward_apply_kernel   mask recompute, dy = dz * c0 + (y - c3) * c1 + c2 and d_residual
//                           (dz, or the same form with res_coef) in one pass.
// and BatchNorm's per-channel arithmetic between the stages, one thread per channel, fp32 vectors
// (the host converts weight, bias and running statistics of other dtypes):
//   affine_kernel                 (scale, shift) with bn(y) = y * scale + shift.
//   finish_batch_stats_kernel     invstd of the batch variance; running statistics updated in place
//   backward_coefficients_kernel  backward_apply's coef, shift, dweight and dbias from the sums.
// Flags (relu, residual kind, residual-gradient kind, residual sum) are template parameters.
//
// Tiling. The activation is seen as (outer, units, inner) vectors of VEC elements:
//   channels_last: outer = N*H*W rows, units = C / VEC channel groups, inner = 1;
//   NCHW:          outer = N,          units = C (one channel each),  inner = H*W / VEC.
// A thread owns ONE unit (its per-channel parameters sit in registers, its reduction
// accumulators belong to fixed channels) and grid-strides over (outer, inner), kUnroll vectors
// per trip, without divisions in the loop. VEC = 16 bytes / element size (at most 4 channels
// for the channels_last backward variants bn_act.cu narrows) when the vectorised extent (C, or
// H*W) is a multiple of it and every pointer is aligned, else 1. Grid x covers
// the units `tpr` per block, grid y splits (outer, inner) so that blocks fill whole waves.
//
// Assumes: y contiguous NCHW or channels_last; residual and grad_out of y's shape and memory
// format; per-channel vectors contiguous fp32 (C,), coef / res_coef (4, C). Mixed storage
// dtypes are upcast to fp32 on the host (exact) and the results rounded once to their dtype.

#pragma once

#include <cstdint>
#include <type_traits>

namespace {


constexpr int kThreads = 256;
constexpr int kUnroll = 2;     // vectors in flight per thread and loop trip
// Resident blocks per SM the main kernels allow (<= 128 registers). The backward variants that
// hold a second set of per-channel values take fewer channels a thread in channels_last instead
// (bn_act.cu's kNarrowVec), which ptxas otherwise spilled to local memory.
constexpr int kMinBlocks = 2;
enum ResKind : int { kNoRes, kIdRes, kBnRes };
enum ResGrad : int { kNoResGrad, kResGradDz, kResGradAffine };

struct Geom {
  int64_t outer, inner;  // see the tiling above; inner counts vectors
  int units, tpr, C;     // tpr: threads per block along units
};

// Everything a kernel may read; unused pointers are null.
struct Args {
  const void *y, *res, *grad;
  void *out, *out_res;  // act_forward: out; backward_apply: dy, d_residual
  const float *scale, *shift, *res_scale, *res_shift, *mean, *res_mean;
  const float *coef, *res_coef;  // (4, C)
  void* ws;                      // (splits, C) partials of a reduction
  Geom g;
};

// ------------------------------------------------------------------ device helpers
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <int VEC, typename T>
__device__ __forceinline__ void store_vec(void* p, int64_t i, const float (&x)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int l = 0; l < VEC; ++l) pk.v[l] = static_cast<T>(x[l]);
  *reinterpret_cast<Pack<T, VEC>*>(static_cast<T*>(p) + i) = pk;
}

// Per-lane values of a per-channel vector for unit u: VEC channels (channels_last) or one.
template <int VEC, bool CL>
__device__ __forceinline__ void load_channel(const float* __restrict__ p, int u, float (&x)[VEC]) {
  if constexpr (CL) {
    const Pack<float, VEC> pk = reinterpret_cast<const Pack<float, VEC>*>(p)[u];
#pragma unroll
    for (int l = 0; l < VEC; ++l) x[l] = pk.v[l];
  } else {
    const float s = __ldg(p + u);
#pragma unroll
    for (int l = 0; l < VEC; ++l) x[l] = s;
  }
}

// The thread's place in the tiling: unit u, row r of the block's rpb rows.
struct ThreadPos {
  int t, r, rpb, u;
  bool active;
  __device__ explicit ThreadPos(const Geom& g)
      : t(threadIdx.x % g.tpr), r(threadIdx.x / g.tpr), rpb(blockDim.x / g.tpr),
        u(blockIdx.x * g.tpr + t), active(u < g.units) {}
};

// Walks the vectors of unit th.u that this thread owns, kUnroll per trip: body(off, cnt) gets
// their element offsets, the first cnt valid. Vector k of the unit is (n, p) = divmod(k, inner);
// k strides by gridDim.y * rpb and (n, p) follow it without division.
template <int VEC, class Body>
__device__ __forceinline__ void for_each_vector(const Geom& g, const ThreadPos& th, Body&& body) {
  const int64_t k0 = int64_t{blockIdx.y} * th.rpb + th.r, stride = int64_t{gridDim.y} * th.rpb;
  const int64_t sq = stride / g.inner, sr = stride % g.inner;
  int64_t n = k0 / g.inner, p = k0 % g.inner;
  while (n < g.outer) {
    int64_t off[kUnroll];
    int cnt = 0;
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      off[j] = ((n * g.units + th.u) * g.inner + p) * VEC;
      cnt += n < g.outer;
      n += sq;
      p += sr;
      if (p >= g.inner) {
        p -= g.inner;
        ++n;
      }
    }
    body(off, cnt);
  }
}

// The kUnroll vectors of one trip, kept in storage precision until used.
template <typename T, int VEC>
struct Tile {
  Pack<T, VEC> v[kUnroll];
  __device__ __forceinline__ Tile(const void* p, const int64_t (&off)[kUnroll], int cnt) {
#pragma unroll
    for (int j = 0; j < kUnroll; ++j)
      if (j < cnt) v[j] = *reinterpret_cast<const Pack<T, VEC>*>(static_cast<const T*>(p) + off[j]);
  }
  __device__ __forceinline__ void get(int j, float (&x)[VEC]) const {
#pragma unroll
    for (int l = 0; l < VEC; ++l) x[l] = static_cast<float>(v[j].v[l]);
  }
};

// Walks this thread's vectors with y, and residual / grad_out if asked, loaded (every load of
// a trip before any use) and converted to fp32: body(offset, y, residual, grad_out).
template <typename T, int VEC, bool kRes, bool kGrad, class Body>
__device__ __forceinline__ void for_each_input(const Args& a, const ThreadPos& th, Body&& body) {
  for_each_vector<VEC>(a.g, th, [&](const int64_t (&off)[kUnroll], int valid) {
    const Tile<T, VEC> ty(a.y, off, valid), tr(a.res, off, kRes ? valid : 0),
        tg(a.grad, off, kGrad ? valid : 0);
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      if (j >= valid) break;
      float y[VEC], r[VEC], g[VEC];
      ty.get(j, y);
      if constexpr (kRes) tr.get(j, r);
      if constexpr (kGrad) tg.get(j, g);
      body(off[j], y, r, g);
    }
  });
}

// The unit's pre-activation parameters: z = y * scale + shift + r, and
// dz = grad_out * (z > 0) with relu (NaN-propagating like torch), else grad_out.
template <int VEC, bool CL, int RK>
struct PreAct {
  float s[VEC], b[VEC], rs[VEC], rb[VEC];
  __device__ PreAct(const Args& a, int u) {
    load_channel<VEC, CL>(a.scale, u, s);
    load_channel<VEC, CL>(a.shift, u, b);
    if constexpr (RK == kBnRes) {
      load_channel<VEC, CL>(a.res_scale, u, rs);
      load_channel<VEC, CL>(a.res_shift, u, rb);
    }
  }
  __device__ __forceinline__ void z(const float (&y)[VEC], const float (&r)[VEC],
                                    float (&z)[VEC]) const {
#pragma unroll
    for (int l = 0; l < VEC; ++l) {
      z[l] = fmaf(y[l], s[l], b[l]);
      if constexpr (RK == kIdRes) z[l] += r[l];
      if constexpr (RK == kBnRes) z[l] += fmaf(r[l], rs[l], rb[l]);
    }
  }
  template <bool RELU>
  __device__ __forceinline__ void dz(const float (&g)[VEC], const float (&y)[VEC],
                                     const float (&r)[VEC], float (&dz)[VEC]) const {
    if constexpr (RELU) z(y, r, dz);
#pragma unroll
    for (int l = 0; l < VEC; ++l) dz[l] = RELU ? g[l] * (dz[l] > 0.f ? 1.f : 0.f) : g[l];
  }
};

// The unit's columns of a (4, C) coefficient tensor: (dz, x) -> dz * c0 + (x - c3) * c1 + c2.
template <int VEC, bool CL>
struct Coef {
  float c[4][VEC];
  __device__ Coef(const float* p, int C, int u) {
    if (p == nullptr) return;  // unused
#pragma unroll
    for (int i = 0; i < 4; ++i) load_channel<VEC, CL>(p + int64_t{i} * C, u, c[i]);
  }
  __device__ __forceinline__ void operator()(const float (&dz)[VEC], const float (&x)[VEC],
                                             float (&o)[VEC]) const {
#pragma unroll
    for (int l = 0; l < VEC; ++l)
      o[l] = fmaf(dz[l], c[0][l], fmaf(x[l] - c[3][l], c[1][l], c[2][l]));
  }
};

// Reduction accumulators: trivially constructible (they live in shared memory), zero = empty.
struct Welford {
  float n, mean, m2;
  __device__ void merge(const Welford& o) {  // Chan et al.
    if (o.n == 0.f) return;
    if (n == 0.f) {
      *this = o;
      return;
    }
    const float tot = n + o.n, d = o.mean - mean, w = o.n / tot;
    mean = fmaf(d, w, mean);
    m2 += o.m2 + d * d * n * w;
    n = tot;
  }
  __device__ void finish(int c, float* const* out) const {
    out[0][c] = mean;
    out[1][c] = m2 / n;
  }
};

struct Sums {
  float v[3];
  __device__ void merge(const Sums& o) {
#pragma unroll
    for (int i = 0; i < 3; ++i) v[i] += o.v[i];
  }
  __device__ void finish(int c, float* const* out) const {
#pragma unroll
    for (int i = 0; i < 3; ++i)
      if (out[i] != nullptr) out[i][c] = v[i];
  }
};

struct Outs {
  float* p[3];
};

// Pairwise tree over the rpb rows of a block (fixed order); row 0 ends with the result in acc.
template <int L, class Acc>
__device__ void block_reduce(Acc (&acc)[L], Acc* sh, int t, int r, int tpr, int rpb) {
#pragma unroll
  for (int l = 0; l < L; ++l) sh[(r * tpr + t) * L + l] = acc[l];
  for (int s = 1; s < rpb; s <<= 1) {
    __syncthreads();
    if ((r & (2 * s - 1)) == 0 && r + s < rpb) {
#pragma unroll
      for (int l = 0; l < L; ++l) {
        acc[l].merge(sh[((r + s) * tpr + t) * L + l]);
        sh[(r * tpr + t) * L + l] = acc[l];
      }
    }
  }
}

// Channels per unit: VEC in channels_last, 1 in NCHW (all lanes of a vector share it).
template <int VEC, bool CL>
constexpr int kChannels = CL ? VEC : 1;

// Block-reduces the threads' per-channel accumulators; row 0 writes one partial per channel
// of the block's units to ws[blockIdx.y][channel].
template <int L, class Acc>
__device__ void store_partials(Acc (&acc)[L], const ThreadPos& th, const Geom& g, void* ws) {
  __shared__ Acc sh[kThreads * L];
  block_reduce<L>(acc, sh, th.t, th.r, g.tpr, th.rpb);
  if (th.r == 0 && th.active) {
    Acc* row = static_cast<Acc*>(ws) + int64_t{blockIdx.y} * g.C + int64_t{th.u} * L;
#pragma unroll
    for (int l = 0; l < L; ++l) row[l] = acc[l];
  }
}

// ------------------------------------------------------------------ kernels
template <typename T, int VEC, bool CL>
__global__ void __launch_bounds__(kThreads, kMinBlocks) stats_partial_kernel(const Args a) {
  const ThreadPos th(a.g);
  int cnt = 0;
  float mean[VEC] = {}, m2[VEC] = {};
  if (th.active) {
    for_each_input<T, VEC, false, false>(a, th, [&](int64_t, const auto& x, const auto&,
                                                    const auto&) {
      const float rc = __frcp_rn(static_cast<float>(++cnt));
#pragma unroll
      for (int l = 0; l < VEC; ++l) {
        const float d = x[l] - mean[l];
        mean[l] = fmaf(d, rc, mean[l]);
        m2[l] = fmaf(d, x[l] - mean[l], m2[l]);
      }
    });
  }
  Welford acc[kChannels<VEC, CL>] = {};
#pragma unroll
  for (int l = 0; l < VEC; ++l)
    acc[CL ? l : 0].merge(Welford{static_cast<float>(cnt), mean[l], m2[l]});
  store_partials(acc, th, a.g, a.ws);
}

// RSUM: also sum dz * (residual - res_mean).
template <typename T, int VEC, bool CL, bool RELU, int RK, bool RSUM>
__global__ void __launch_bounds__(kThreads, kMinBlocks) backward_reduce_kernel(const Args a) {
  const ThreadPos th(a.g);
  Sums acc[kChannels<VEC, CL>] = {};
  if (th.active) {
    const PreAct<VEC, CL, RK> pre(a, th.u);
    float m[VEC], rm[VEC];
    load_channel<VEC, CL>(a.mean, th.u, m);
    if constexpr (RSUM) load_channel<VEC, CL>(a.res_mean, th.u, rm);
    constexpr bool kRes = (RELU && RK != kNoRes) || RSUM;
    for_each_input<T, VEC, kRes, true>(a, th, [&](int64_t, const auto& y, const auto& r,
                                                  const auto& g) {
      float dz[VEC];
      pre.template dz<RELU>(g, y, r, dz);
#pragma unroll
      for (int l = 0; l < VEC; ++l) {
        Sums& s = acc[CL ? l : 0];
        s.v[0] += dz[l];
        s.v[1] = fmaf(dz[l], y[l] - m[l], s.v[1]);
        if constexpr (RSUM) s.v[2] = fmaf(dz[l], r[l] - rm[l], s.v[2]);
      }
    });
  }
  store_partials(acc, th, a.g, a.ws);
}

// One block per channel: merges the `splits` partials of channel blockIdx.x.
template <class Acc>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const Acc* __restrict__ ws, int splits, int C, Outs outs) {
  const int c = blockIdx.x;
  Acc acc[1] = {};
  for (int s = threadIdx.x; s < splits; s += blockDim.x) acc[0].merge(ws[int64_t{s} * C + c]);
  __shared__ Acc sh[kThreads];
  block_reduce<1>(acc, sh, 0, threadIdx.x, 1, blockDim.x);
  if (threadIdx.x == 0) acc[0].finish(c, outs.p);
}

template <typename T, int VEC, bool CL, bool RELU, int RK>
__global__ void __launch_bounds__(kThreads, kMinBlocks) act_forward_kernel(const Args a) {
  const ThreadPos th(a.g);
  if (!th.active) return;
  const PreAct<VEC, CL, RK> pre(a, th.u);
  for_each_input<T, VEC, RK != kNoRes, false>(a, th, [&](int64_t off, const auto& y,
                                                         const auto& r, const auto&) {
    float z[VEC];
    pre.z(y, r, z);
#pragma unroll
    for (int l = 0; l < VEC; ++l)
      if (RELU && z[l] < 0.f) z[l] = 0.f;  // keeps NaN, like clamp_min
    store_vec<VEC, T>(a.out, off, z);
  });
}

// RG (ResGrad): what d_residual is.
template <typename T, int VEC, bool CL, bool RELU, int RK, int RG>
__global__ void __launch_bounds__(kThreads, kMinBlocks) backward_apply_kernel(const Args a) {
  const ThreadPos th(a.g);
  if (!th.active) return;
  const PreAct<VEC, CL, RK> pre(a, th.u);
  const Coef<VEC, CL> cy(a.coef, a.g.C, th.u);
  const Coef<VEC, CL> cr(RG == kResGradAffine ? a.res_coef : nullptr, a.g.C, th.u);
  constexpr bool kRes = (RELU && RK != kNoRes) || RG == kResGradAffine;
  for_each_input<T, VEC, kRes, true>(a, th, [&](int64_t off, const auto& y, const auto& r,
                                                const auto& g) {
    float dz[VEC], o[VEC];
    pre.template dz<RELU>(g, y, r, dz);
    cy(dz, y, o);
    store_vec<VEC, T>(a.out, off, o);
    if constexpr (RG == kResGradDz) store_vec<VEC, T>(a.out_res, off, dz);
    if constexpr (RG == kResGradAffine) {
      cr(dz, r, o);
      store_vec<VEC, T>(a.out_res, off, o);
    }
  });
}

// ------------------------------------------------------------------ per-channel kernels
// The maths of torch_backend.py's affine, finish_batch_stats and backward_coefficients; weight and
// bias null when absent.
__device__ __forceinline__ void affine_of(const float* __restrict__ weight, const float* __restrict__ bias,
                                          int c, float mean, float invstd, float& scale, float& shift) {
  scale = weight ? invstd * weight[c] : invstd;
  shift = bias ? bias[c] - mean * scale : -(mean * scale);
}

// Eager BatchNorm's update of a running statistic toward the batch's (ATen's batch_norm), fp32:
// an infinite one stays infinite, where a lerp, running + momentum * (stat - running), is NaN.
__device__ __forceinline__ float updated_running(float running, float stat, float momentum) {
  return momentum * stat + (1.f - momentum) * running;
}

__global__ void __launch_bounds__(kThreads)
    affine_kernel(const float* __restrict__ mean, const float* __restrict__ invstd,
                  const float* __restrict__ weight, const float* __restrict__ bias,
                  float* __restrict__ scale, float* __restrict__ shift, int C) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c < C) affine_of(weight, bias, c, mean[c], invstd[c], scale[c], shift[c]);
}

// running_mean and running_var: null, or both updated; bessel = count / (count - 1).
__global__ void __launch_bounds__(kThreads)
    finish_batch_stats_kernel(const float* __restrict__ mean, const float* __restrict__ var,
                              float* __restrict__ invstd, float* __restrict__ running_mean,
                              float* __restrict__ running_var, int C, float momentum, float eps,
                              float bessel) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  invstd[c] = 1.f / sqrtf(var[c] + eps);  // IEEE division and square root, as torch's rsqrt rounds
  if (running_mean) {
    running_mean[c] = updated_running(running_mean[c], mean[c], momentum);
    running_var[c] = updated_running(running_var[c], var[c] * bessel, momentum);
  }
}

// coef (4, C); neg_inv_count = -1 / (values per channel over the group).
__global__ void __launch_bounds__(kThreads) backward_coefficients_kernel(
    const float* __restrict__ sum_dz, const float* __restrict__ sum_dz_yc,
    const float* __restrict__ group_sum_dz, const float* __restrict__ group_sum_dz_yc,
    const float* __restrict__ mean, const float* __restrict__ invstd,
    const float* __restrict__ weight, const float* __restrict__ bias, float* __restrict__ coef,
    float* __restrict__ shift, float* __restrict__ dweight, float* __restrict__ dbias, int C,
    float neg_inv_count, bool batch_stats) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const float m = mean[c], is = invstd[c];
  float scale;
  affine_of(weight, bias, c, m, is, scale, shift[c]);
  const float per_value = scale * neg_inv_count;
  coef[c] = scale;
  coef[C + c] = batch_stats ? group_sum_dz_yc[c] * (is * is) * per_value : 0.f;
  coef[2 * C + c] = batch_stats ? group_sum_dz[c] * per_value : 0.f;
  coef[3 * C + c] = batch_stats ? m : 0.f;
  dweight[c] = sum_dz_yc[c] * is;
  dbias[c] = sum_dz[c];
}

}  // namespace
