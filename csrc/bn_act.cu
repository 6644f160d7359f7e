// fusedres._C: CUDA kernels for the four BatchNorm + residual + ReLU stage functions.
// The contract (arguments, maths, dtypes, layouts) is fusedres/ops/torch_backend.py.
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
// Flags (relu, residual kind, residual-gradient kind, residual sum) are template parameters.
//
// Tiling. The activation is seen as (outer, units, inner) vectors of VEC elements:
//   channels_last: outer = N*H*W rows, units = C / VEC channel groups, inner = 1;
//   NCHW:          outer = N,          units = C (one channel each),  inner = H*W / VEC.
// A thread owns ONE unit (its per-channel parameters sit in registers, its reduction
// accumulators belong to fixed channels) and grid-strides over (outer, inner), kUnroll vectors
// per trip, without divisions in the loop. VEC = 16 bytes / element size when the vectorised
// extent (C, or H*W) is a multiple of it and every pointer is aligned, else 1. Grid x covers
// the units `tpr` per block, grid y splits (outer, inner) so that blocks fill whole waves.
//
// Assumes: y contiguous NCHW or channels_last; residual and grad_out of y's shape and memory
// format; per-channel vectors contiguous fp32 (C,), coef / res_coef (4, C). Mixed storage
// dtypes are upcast to fp32 on the host (exact) and the results rounded once to their dtype.

#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs cuSPARSE headers

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 2;     // vectors in flight per thread and loop trip
// Resident blocks per SM the main kernels allow (<= 128 registers). The heaviest variants
// (channels_last fp16/bf16 backward with a BN residual) then keep some per-channel parameters
// in L1-resident local memory rather than drop to one block per SM.
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

// ------------------------------------------------------------------ host: dispatch and launch
template <class T>
struct TypeTag {
  using type = T;
};
template <int I>
using Int = std::integral_constant<int, I>;
template <bool B>
using Bool = std::integral_constant<bool, B>;
using Kernel = void (*)(Args);
#define VALUE(x) std::decay_t<decltype(x)>::value

// f(Int<m>) for a runtime m in [0, N).
template <int N, class F>
void with_int(int m, F&& f) {
  if constexpr (N > 0) {
    if (m == N - 1) f(Int<N - 1>{});
    else with_int<N - 1>(m, f);
  }
}

template <class F>
void with_bool(bool b, F&& f) {
  if (b) f(Bool<true>{});
  else f(Bool<false>{});
}

// f(TypeTag<T>, Int<VEC>, Bool<CL>) for the storage dtype, vectorisation and layout.
template <class F>
void with_layout(at::ScalarType st, bool vec, bool cl, F&& f) {
  auto go = [&](auto tt) {
    using T = typename decltype(tt)::type;
    with_bool(vec, [&](auto v) {
      with_bool(cl, [&](auto c) { f(tt, Int<VALUE(v) ? 16 / int(sizeof(T)) : 1>{}, c); });
    });
  };
  if (st == at::kFloat) go(TypeTag<float>{});
  else if (st == at::kHalf) go(TypeTag<at::Half>{});
  else go(TypeTag<at::BFloat16>{});
}

// f(Bool<RELU>, Int<RK>). With kMaskOnly the residual's kind only matters for the ReLU mask, so
// without relu only kNoRes is instantiated.
template <bool kMaskOnly, class F>
void with_flags(bool relu, int rk, F&& f) {
  with_bool(relu, [&](auto re) {
    if constexpr (kMaskOnly && !VALUE(re)) f(re, Int<kNoRes>{});
    else with_int<3>(rk, [&](auto k) { f(re, k); });
  });
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

at::MemoryFormat layout_of(const at::Tensor& y) {
  // When both formats hold (H*W == 1 or C == 1) the memory is the same: take the one that
  // vectorises along the longer contiguous extent (C when H*W == 1).
  const bool cl = y.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                  (!y.is_contiguous() || y.size(2) * y.size(3) == 1);
  return cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

struct Plan {
  Geom g;
  bool cl, vec;
  int tiles, block;
};

// Layout, vector width and block shape for y and a's pointers (all aligned for 16-byte
// accesses; per-channel ones are read VEC at a time in channels_last).
Plan make_plan(const at::Tensor& y, const Args& a) {
  Plan p;
  const int64_t N = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  p.cl = layout_of(y) == at::MemoryFormat::ChannelsLast;
  const int full = 16 / static_cast<int>(y.element_size());
  p.vec = (p.cl ? C : HW) % full == 0;
  for (const void* d : std::initializer_list<const void*>{a.y, a.res, a.grad, a.out, a.out_res})
    p.vec &= reinterpret_cast<uintptr_t>(d) % 16 == 0;
  for (const float* c :
       {a.scale, a.shift, a.res_scale, a.res_shift, a.mean, a.res_mean, a.coef, a.res_coef})
    p.vec &= !p.cl || reinterpret_cast<uintptr_t>(c) % (4 * full) == 0;
  const int v = p.vec ? full : 1;
  p.g = Geom{p.cl ? N * HW : N, p.cl ? 1 : HW / v, static_cast<int>(p.cl ? C / v : C), 1,
             static_cast<int>(C)};
  if (p.cl) p.g.tpr = static_cast<int>(ceil_div(p.g.units, ceil_div(p.g.units, kThreads)));
  p.tiles = static_cast<int>(ceil_div(p.g.units, p.g.tpr));
  p.block = p.g.tpr * (kThreads / p.g.tpr);
  return p;
}

// Slices of (outer, inner) per tile of units. Blocks of a grid-stride loop all take about as
// long, so pick the count whose blocks fill whole waves of resident blocks best (and whose
// slices split the rows evenly), preferring fewer slices.
int choose_splits(Kernel k, const Plan& p, int dev) {
  int per_sm = 0, sms = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k, p.block, 0));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int64_t wave = int64_t{sms} * std::max(per_sm, 1);
  const int64_t rows = ceil_div(p.g.outer * p.g.inner, p.block / p.g.tpr);  // thread rows
  const int64_t most = std::min<int64_t>({rows, 65535, std::max<int64_t>(1, 8 * wave / p.tiles)});
  int64_t best = 1;
  double best_fill = 0;
  auto consider = [&](int64_t s) {
    const int64_t blocks = p.tiles * s;
    const double fill = double(blocks) / double(ceil_div(blocks, wave) * wave) *
                        (double(rows) / double(s * ceil_div(rows, s)));
    if (fill > best_fill + 1e-3) {
      best = s;
      best_fill = fill;
    }
  };
  for (int64_t s = 1; s <= std::min<int64_t>(most, 64); ++s) consider(s);
  for (int64_t m = 1; m <= 8; ++m) consider(std::clamp<int64_t>(m * wave / p.tiles, 1, most));
  return static_cast<int>(best);
}

// Launches k over the plan's tiles and choose_splits slices; for a reduction (Acc = Welford or
// Sums) then merges the per-slice partials into outs.
template <class Acc = void>
void run(Kernel k, const Plan& p, Args a, Outs outs = {}) {
  TORCH_INTERNAL_ASSERT(k != nullptr, "fusedres: no kernel for this combination of flags");
  const int dev = c10::cuda::current_device();
  const int splits = choose_splits(k, p, dev);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor ws;
  if constexpr (!std::is_void_v<Acc>) {
    ws = at::empty({splits, p.g.C, int64_t{sizeof(Acc) / sizeof(float)}},
                   at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, dev));
    a.ws = ws.data_ptr();
  }
  a.g = p.g;
  k<<<dim3(p.tiles, splits), p.block, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if constexpr (!std::is_void_v<Acc>) {
    const int threads = static_cast<int>(std::min<int64_t>(kThreads, ceil_div(splits, 32) * 32));
    finalize_kernel<Acc><<<p.g.C, threads, 0, stream>>>(static_cast<const Acc*>(a.ws), splits,
                                                        p.g.C, outs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// ------------------------------------------------------------------ host: argument checks
using OptTensor = std::optional<at::Tensor>;

void check_device(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& y) {
  TORCH_CHECK(t.is_cuda(), fn, ": expected ", name, " to be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == y.device(), fn, ": expected ", name, " on ", y.device(),
              " (like y), got ", t.device());
}

void check_activation(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& y) {
  check_device(fn, name, t, y);
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, fn, ": ", name,
              " must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(t.dim() == 4, fn, ": expected ", name, " to be 4-D (N, C, H, W), got ", t.sizes());
  TORCH_CHECK(t.sizes() == y.sizes(), fn, ": ", name, " has shape ", t.sizes(), ", y ", y.sizes());
  TORCH_CHECK(t.is_contiguous(layout_of(y)), fn, ": ", name,
              " must be contiguous in y's memory format (NCHW or channels_last)");
  TORCH_CHECK(t.size(1) <= INT32_MAX, fn, ": too many channels (", t.size(1), ")");
}

// Pointer to a contiguous fp32 (C,) tensor, or (rows, C) for rows > 0; null when absent.
const float* channel(const char* fn, const char* name, const OptTensor& t, const at::Tensor& y,
                     int64_t rows = 0) {
  if (!t) return nullptr;
  check_device(fn, name, *t, y);
  TORCH_CHECK(t->scalar_type() == at::kFloat, fn, ": ", name, " must be float32, got ",
              t->scalar_type());
  const int64_t C = y.size(1);
  TORCH_CHECK(rows == 0 ? t->dim() == 1 && t->size(0) == C
                        : t->dim() == 2 && t->size(0) == rows && t->size(1) == C,
              fn, ": ", name, " has shape ", t->sizes(), ", expected ",
              rows == 0 ? "(C,)" : "(4, C)", " with C = ", C);
  TORCH_CHECK(t->is_contiguous(), fn, ": ", name, " must be contiguous");
  return t->data_ptr<float>();
}

// Checks y, scale/shift and the residual group and fills their pointers; returns the ResKind.
int check_common(const char* fn, Args& a, const at::Tensor& y, const at::Tensor& scale,
                 const at::Tensor& shift, const OptTensor& residual, const OptTensor& res_scale,
                 const OptTensor& res_shift) {
  check_activation(fn, "y", y, y);
  a.y = y.data_ptr();
  a.scale = channel(fn, "scale", scale, y);
  a.shift = channel(fn, "shift", shift, y);
  TORCH_CHECK(res_scale.has_value() == res_shift.has_value(), fn,
              ": res_scale and res_shift must be given together");
  TORCH_CHECK(residual || !res_scale, fn, ": res_scale given without residual");
  if (residual) check_activation(fn, "residual", *residual, y);
  a.res = residual ? residual->data_ptr() : nullptr;
  a.res_scale = channel(fn, "res_scale", res_scale, y);
  a.res_shift = channel(fn, "res_shift", res_shift, y);
  return !residual ? kNoRes : res_scale ? kBnRes : kIdRes;
}

// Storage dtypes differ: the op reruns on fp32 copies (exact) and rounds its results once.
bool mixed(const at::Tensor& y, const OptTensor& residual, const OptTensor& grad) {
  return (residual && residual->scalar_type() != y.scalar_type()) ||
         (grad && grad->scalar_type() != y.scalar_type());
}

OptTensor to_float(const OptTensor& t) { return t ? OptTensor(t->to(at::kFloat)) : std::nullopt; }

float* fptr(const OptTensor& t) { return t ? t->data_ptr<float>() : nullptr; }

// ------------------------------------------------------------------ host: the four functions
std::tuple<at::Tensor, at::Tensor> channel_stats(const at::Tensor& y) {
  check_activation("fusedres.channel_stats", "y", y, y);
  const c10::cuda::CUDAGuard guard(y.device());
  auto mean = at::empty({y.size(1)}, y.options().dtype(at::kFloat));
  auto var = at::empty_like(mean);
  if (y.numel() == 0) {  // like torch's mean over nothing
    constexpr float nan = std::numeric_limits<float>::quiet_NaN();
    return {mean.fill_(nan), var.fill_(nan)};
  }
  Args a{};
  a.y = y.data_ptr();
  const Plan p = make_plan(y, a);
  Kernel k = nullptr;
  with_layout(y.scalar_type(), p.vec, p.cl, [&](auto tt, auto v, auto cl) {
    k = &stats_partial_kernel<typename decltype(tt)::type, VALUE(v), VALUE(cl)>;
  });
  run<Welford>(k, p, a, Outs{{fptr(mean), fptr(var), nullptr}});
  return {mean, var};
}

at::Tensor act_forward(const at::Tensor& y, const at::Tensor& scale, const at::Tensor& shift,
                       const OptTensor& residual, const OptTensor& res_scale,
                       const OptTensor& res_shift, bool relu) {
  Args a{};
  const int rk =
      check_common("fusedres.act_forward", a, y, scale, shift, residual, res_scale, res_shift);
  const c10::cuda::CUDAGuard guard(y.device());
  if (mixed(y, residual, std::nullopt))
    return act_forward(y.to(at::kFloat), scale, shift, to_float(residual), res_scale, res_shift,
                       relu).to(y.scalar_type());
  auto out = at::empty_like(y);
  if (y.numel() == 0) return out;
  a.out = out.data_ptr();
  const Plan p = make_plan(y, a);
  Kernel k = nullptr;
  with_layout(y.scalar_type(), p.vec, p.cl, [&](auto tt, auto v, auto cl) {
    with_flags<false>(relu, rk, [&](auto re, auto r) {
      k = &act_forward_kernel<typename decltype(tt)::type, VALUE(v), VALUE(cl), VALUE(re),
                              VALUE(r)>;
    });
  });
  run(k, p, a);
  return out;
}

std::tuple<at::Tensor, at::Tensor, OptTensor> backward_reduce(
    const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& scale,
    const at::Tensor& shift, const OptTensor& residual, const OptTensor& res_scale,
    const OptTensor& res_shift, bool relu, const at::Tensor& mean, const OptTensor& res_mean) {
  constexpr const char* fn = "fusedres.backward_reduce";
  Args a{};
  const int rk = check_common(fn, a, y, scale, shift, residual, res_scale, res_shift);
  check_activation(fn, "grad_out", grad_out, y);
  a.grad = grad_out.data_ptr();
  a.mean = channel(fn, "mean", mean, y);
  TORCH_CHECK(residual || !res_mean, fn, ": res_mean given without residual");
  a.res_mean = channel(fn, "res_mean", res_mean, y);
  const c10::cuda::CUDAGuard guard(y.device());
  if (mixed(y, residual, grad_out))
    return backward_reduce(grad_out.to(at::kFloat), y.to(at::kFloat), scale, shift,
                           to_float(residual), res_scale, res_shift, relu, mean, res_mean);
  auto sum_dz = at::empty({y.size(1)}, y.options().dtype(at::kFloat));
  auto sum_dz_yc = at::empty_like(sum_dz);
  OptTensor sum_dz_rc = res_mean ? OptTensor(at::empty_like(sum_dz)) : std::nullopt;
  if (y.numel() == 0) {  // sums over nothing
    for (const OptTensor& t : {OptTensor(sum_dz), OptTensor(sum_dz_yc), sum_dz_rc})
      if (t) t->zero_();
    return {sum_dz, sum_dz_yc, sum_dz_rc};
  }
  const Plan p = make_plan(y, a);
  Kernel k = nullptr;
  with_layout(y.scalar_type(), p.vec, p.cl, [&](auto tt, auto v, auto cl) {
    with_flags<true>(relu, rk, [&](auto re, auto r) {
      with_bool(res_mean.has_value(), [&](auto rsum) {
        if constexpr (!(VALUE(re) && VALUE(r) == kNoRes && VALUE(rsum)))  // res_mean => residual
          k = &backward_reduce_kernel<typename decltype(tt)::type, VALUE(v), VALUE(cl), VALUE(re),
                                      VALUE(r), VALUE(rsum)>;
      });
    });
  });
  run<Sums>(k, p, a, Outs{{fptr(sum_dz), fptr(sum_dz_yc), fptr(sum_dz_rc)}});
  return {sum_dz, sum_dz_yc, sum_dz_rc};
}

std::tuple<at::Tensor, OptTensor> backward_apply(
    const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& scale,
    const at::Tensor& shift, const OptTensor& residual, const OptTensor& res_scale,
    const OptTensor& res_shift, bool relu, const at::Tensor& coef, const OptTensor& res_coef,
    bool want_residual_grad) {
  constexpr const char* fn = "fusedres.backward_apply";
  Args a{};
  const int rk = check_common(fn, a, y, scale, shift, residual, res_scale, res_shift);
  check_activation(fn, "grad_out", grad_out, y);
  a.grad = grad_out.data_ptr();
  a.coef = channel(fn, "coef", coef, y, 4);
  TORCH_CHECK(residual || (!res_coef && !want_residual_grad), fn,
              ": res_coef and want_residual_grad need a residual");
  a.res_coef = channel(fn, "res_coef", res_coef, y, 4);
  const c10::cuda::CUDAGuard guard(y.device());
  if (mixed(y, residual, grad_out)) {
    auto [dy, dres] = backward_apply(grad_out.to(at::kFloat), y.to(at::kFloat), scale, shift,
                                     to_float(residual), res_scale, res_shift, relu, coef,
                                     res_coef, want_residual_grad);
    if (dres) dres = dres->to(residual->scalar_type());
    return {dy.to(y.scalar_type()), dres};
  }
  auto dy = at::empty_like(y);
  OptTensor dres;
  if (want_residual_grad) dres = at::empty_like(*residual);
  if (y.numel() == 0) return {dy, dres};
  a.out = dy.data_ptr();
  a.out_res = dres ? dres->data_ptr() : nullptr;
  const int rg = !want_residual_grad ? kNoResGrad : res_coef ? kResGradAffine : kResGradDz;
  const Plan p = make_plan(y, a);
  Kernel k = nullptr;
  with_layout(y.scalar_type(), p.vec, p.cl, [&](auto tt, auto v, auto cl) {
    with_flags<true>(relu, rk, [&](auto re, auto r) {
      with_int<3>(rg, [&](auto g) {
        if constexpr (!(VALUE(re) && VALUE(r) == kNoRes && VALUE(g) != kNoResGrad))
          k = &backward_apply_kernel<typename decltype(tt)::type, VALUE(v), VALUE(cl), VALUE(re),
                                     VALUE(r), VALUE(g)>;
      });
    });
  });
  run(k, p, a);
  return {dy, dres};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() =
      "fusedres CUDA backend: the BatchNorm-apply + residual + ReLU stage kernels, with the same "
      "functions, arguments and results as fusedres.ops.torch_backend. CUDA tensors, storage "
      "fp32/fp16/bf16 in NCHW or channels_last, per-channel vectors contiguous fp32.";
  m.def("channel_stats", &channel_stats, py::arg("y"),
        "channel_stats(y) -> (mean, var): per-channel mean and biased variance over (N, H, W), "
        "fp32 (C,). Welford partials merged with Chan's formula in a fixed order.");
  m.def("act_forward", &act_forward, py::arg("y"), py::arg("scale"), py::arg("shift"),
        py::arg("residual"), py::arg("res_scale"), py::arg("res_shift"), py::arg("relu"),
        "act_forward(y, scale, shift, residual, res_scale, res_shift, relu) -> out = "
        "act(y * scale + shift + r), r = 0 | residual | residual * res_scale + res_shift; in "
        "y's dtype and memory format.");
  m.def("backward_reduce", &backward_reduce, py::arg("grad_out"), py::arg("y"), py::arg("scale"),
        py::arg("shift"), py::arg("residual"), py::arg("res_scale"), py::arg("res_shift"),
        py::arg("relu"), py::arg("mean"), py::arg("res_mean"),
        "backward_reduce(grad_out, y, scale, shift, residual, res_scale, res_shift, relu, mean, "
        "res_mean) -> (sum dz, sum dz * (y - mean), sum dz * (residual - res_mean) or None), "
        "fp32 (C,); dz = grad_out * (z > 0) with relu (mask recomputed from y), else grad_out.");
  m.def("backward_apply", &backward_apply, py::arg("grad_out"), py::arg("y"), py::arg("scale"),
        py::arg("shift"), py::arg("residual"), py::arg("res_scale"), py::arg("res_shift"),
        py::arg("relu"), py::arg("coef"), py::arg("res_coef"), py::arg("want_residual_grad"),
        "backward_apply(grad_out, y, scale, shift, residual, res_scale, res_shift, relu, coef, "
        "res_coef, want_residual_grad) -> (dy, d_residual or None): dy = dz * coef[0] + "
        "(y - coef[3]) * coef[1] + coef[2] in y's dtype; d_residual = dz, or the same with "
        "residual and res_coef, in residual's dtype. coef, res_coef: (4, C).");
}
