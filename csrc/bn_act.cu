// fusedres._C: CUDA kernels for the four BatchNorm + residual + ReLU stage functions and the three
// per-channel ones (BatchNorm's vector arithmetic between the stages).
// The contract (arguments, maths, dtypes, layouts) is fusedres/ops/torch_backend.py.
//
// This file: the host side (argument checks, launch plans, flag dispatch to template
// instances) and the Python bindings. The kernels, their tiling and what they assume are in
// bn_act_kernels.cuh, included below: one translation unit.

#include <torch/extension.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#ifdef FUSEDRES_HOST_EMULATION  // the tests' CPU build: the same source, run by host_emulation.h
#include "host_emulation.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs cuSPARSE headers

// What the launcher needs from the device; host_emulation.h has the CPU stand-ins.
namespace platform {

constexpr c10::DeviceType kDeviceType = c10::kCUDA;
using DeviceGuard = c10::cuda::CUDAGuard;
inline c10::DeviceIndex current_device() { return c10::cuda::current_device(); }

// (resident blocks per SM of kernel with `block` threads, SMs of the current device).
template <class Kernel>
std::pair<int, int> resident_blocks_and_sms(Kernel kernel, int block) {
  int per_sm = 0, sms = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, block, 0));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, current_device()));
  return {per_sm, sms};
}

// kernel<<<grid, block>>>(args...) on the current stream.
template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, const A&... args) {
  kernel<<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace platform
#endif

#include "bn_act_kernels.cuh"

namespace {

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

// Channels a thread takes at most in channels_last (VEC there) for a backward kernel whose flags
// (ResKind, ResGrad, RSUM) make it hold a second set of per-channel values: a BatchNorm'd
// residual's, or the residual gradient's coefficients, or the residual sum's mean. At 8 channels
// a thread (16 bytes of fp16/bf16) ptxas spilled up to 488 bytes a thread under kMinBlocks' 128
// registers (CUDA 13.0, sm_90; the downsample blocks' backward); at 4 (8-byte accesses) they fit.
constexpr int kNarrowVec = 4;
constexpr bool narrow_apply(int rk, int rg) { return rk == kBnRes || rg == kResGradAffine; }
constexpr bool narrow_reduce(int rk, bool rsum) { return rk == kBnRes && rsum; }
template <int VEC, bool CL, bool NARROW>
constexpr int kVecOf = NARROW && CL && VEC > kNarrowVec ? kNarrowVec : VEC;

// Layout, vector width and block shape for y and a's pointers (all aligned for 16-byte
// accesses; per-channel ones are read VEC at a time in channels_last); ``narrow``: at most
// kNarrowVec channels a thread in channels_last (kVecOf).
Plan make_plan(const at::Tensor& y, const Args& a, bool narrow = false) {
  Plan p;
  const int64_t N = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  p.cl = layout_of(y) == at::MemoryFormat::ChannelsLast;
  int full = 16 / static_cast<int>(y.element_size());
  if (narrow && p.cl) full = std::min(full, kNarrowVec);
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
int choose_splits(Kernel k, const Plan& p) {
  const auto [per_sm, sms] = platform::resident_blocks_and_sms(k, p.block);
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
  const int splits = choose_splits(k, p);
  at::Tensor ws;
  if constexpr (!std::is_void_v<Acc>) {
    ws = at::empty({splits, p.g.C, int64_t{sizeof(Acc) / sizeof(float)}},
                   at::TensorOptions().dtype(at::kFloat).device(platform::kDeviceType,
                                                                platform::current_device()));
    a.ws = ws.data_ptr();
  }
  a.g = p.g;
  platform::launch(k, dim3(p.tiles, splits), dim3(p.block), a);
  if constexpr (!std::is_void_v<Acc>) {
    const int threads = static_cast<int>(std::min<int64_t>(kThreads, ceil_div(splits, 32) * 32));
    platform::launch(&finalize_kernel<Acc>, dim3(p.g.C), dim3(threads),
                     static_cast<const Acc*>(a.ws), splits, p.g.C, outs);
  }
}

// ------------------------------------------------------------------ host: argument checks
using OptTensor = std::optional<at::Tensor>;

// y: the call's activation, or for the per-channel functions (which have none) their (C,) mean.
void check_device(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& y) {
  TORCH_CHECK(t.device().type() == platform::kDeviceType, fn, ": expected ", name, " to be a ",
              c10::DeviceTypeName(platform::kDeviceType), " tensor, got ", t.device());
  TORCH_CHECK(t.device() == y.device(), fn, ": expected ", name, " on ", y.device(), " (like ",
              y.dim() == 1 ? "mean" : "y", "), got ", t.device());
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

// Pointer to a contiguous fp32 (C,) tensor, or (rows, C) for rows > 0; null when absent. C is
// y's channels, or the size of y when y is itself a (C,) vector.
const float* channel(const char* fn, const char* name, const OptTensor& t, const at::Tensor& y,
                     int64_t rows = 0) {
  if (!t) return nullptr;
  check_device(fn, name, *t, y);
  TORCH_CHECK(t->scalar_type() == at::kFloat, fn, ": ", name, " must be float32, got ",
              t->scalar_type());
  const int64_t C = y.dim() == 1 ? y.size(0) : y.size(1);
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
  const platform::DeviceGuard guard(y.device());
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
  const platform::DeviceGuard guard(y.device());
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
  const platform::DeviceGuard guard(y.device());
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
  // whether the kernel with_flags picks below is narrowed: the plan's vector width must be its VEC
  bool narrow = false;
  with_flags<true>(relu, rk,
                   [&](auto, auto r) { narrow = narrow_reduce(VALUE(r), res_mean.has_value()); });
  const Plan p = make_plan(y, a, narrow);
  Kernel k = nullptr;
  with_layout(y.scalar_type(), p.vec, p.cl, [&](auto tt, auto v, auto cl) {
    with_flags<true>(relu, rk, [&](auto re, auto r) {
      with_bool(res_mean.has_value(), [&](auto rsum) {
        if constexpr (!(VALUE(re) && VALUE(r) == kNoRes && VALUE(rsum)))  // res_mean => residual
          k = &backward_reduce_kernel<typename decltype(tt)::type,
                                      kVecOf<VALUE(v), VALUE(cl), narrow_reduce(VALUE(r), VALUE(rsum))>,
                                      VALUE(cl), VALUE(re), VALUE(r), VALUE(rsum)>;
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
  const platform::DeviceGuard guard(y.device());
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
  bool narrow = false;  // as in backward_reduce
  with_flags<true>(relu, rk, [&](auto, auto r) { narrow = narrow_apply(VALUE(r), rg); });
  const Plan p = make_plan(y, a, narrow);
  Kernel k = nullptr;
  with_layout(y.scalar_type(), p.vec, p.cl, [&](auto tt, auto v, auto cl) {
    with_flags<true>(relu, rk, [&](auto re, auto r) {
      with_int<3>(rg, [&](auto g) {
        if constexpr (!(VALUE(re) && VALUE(r) == kNoRes && VALUE(g) != kNoResGrad))
          k = &backward_apply_kernel<typename decltype(tt)::type,
                                     kVecOf<VALUE(v), VALUE(cl), narrow_apply(VALUE(r), VALUE(g))>,
                                     VALUE(cl), VALUE(re), VALUE(r), VALUE(g)>;
      });
    });
  });
  run(k, p, a);
  return {dy, dres};
}

// ------------------------------------------------------------------ host: per-channel functions
// A weight, bias or running statistic as the per-channel kernels take it: fp32 and contiguous
// (C,), the tensor itself when it is so already, else a copy.
OptTensor float_vector(const char* fn, const char* name, const OptTensor& t, const at::Tensor& mean) {
  if (!t) return t;
  check_device(fn, name, *t, mean);
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), fn, ": ", name,
              " must be a floating-point tensor, got ", t->scalar_type());
  TORCH_CHECK(t->numel() == mean.numel(), fn, ": ", name, " has ", t->numel(),
              " elements, expected one per channel (", mean.numel(), ")");
  return t->reshape({-1}).to(at::kFloat).contiguous();
}

// The number of channels C of the (C,) vector mean, checked; and the device guard's device.
int vector_channels(const char* fn, const at::Tensor& mean) {
  // first: channel() takes C from a 1-D mean only (of another, size(1), which a 0-D one has not)
  TORCH_CHECK(mean.dim() == 1, fn, ": expected mean to be a (C,) vector, got shape ", mean.sizes());
  channel(fn, "mean", mean, mean);
  TORCH_CHECK(mean.numel() <= INT32_MAX, fn, ": too many channels (", mean.numel(), ")");
  return static_cast<int>(mean.numel());
}

template <class... P, class... A>
void launch_per_channel(void (*kernel)(P...), int C, const A&... args) {
  if (C > 0) platform::launch(kernel, dim3(ceil_div(C, kThreads)), dim3(kThreads), args...);
}

std::tuple<at::Tensor, at::Tensor> affine(const at::Tensor& mean, const at::Tensor& invstd,
                                          const OptTensor& weight, const OptTensor& bias) {
  constexpr const char* fn = "fusedres.affine";
  const int C = vector_channels(fn, mean);
  channel(fn, "invstd", invstd, mean);
  const OptTensor w = float_vector(fn, "weight", weight, mean);
  const OptTensor b = float_vector(fn, "bias", bias, mean);
  const platform::DeviceGuard guard(mean.device());
  auto scale = at::empty_like(mean), shift = at::empty_like(mean);
  launch_per_channel(&affine_kernel, C, mean.data_ptr<float>(), invstd.data_ptr<float>(), fptr(w),
                     fptr(b), fptr(scale), fptr(shift), C);
  return {scale, shift};
}

at::Tensor finish_batch_stats(const at::Tensor& mean, const at::Tensor& var,
                              const OptTensor& running_mean, const OptTensor& running_var,
                              double momentum, double eps, int64_t count) {
  constexpr const char* fn = "fusedres.finish_batch_stats";
  const int C = vector_channels(fn, mean);
  channel(fn, "var", var, mean);
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), fn,
              ": running_mean and running_var must be given together");
  TORCH_CHECK(!running_mean || count > 1, fn,
              ": the running variance is unbiased with count values per channel, needs count > 1, got ",
              count);
  const OptTensor updated[2] = {float_vector(fn, "running_mean", running_mean, mean),
                                float_vector(fn, "running_var", running_var, mean)};
  const platform::DeviceGuard guard(mean.device());
  auto invstd = at::empty_like(mean);
  const float bessel = running_mean ? static_cast<float>(double(count) / double(count - 1)) : 1.f;
  launch_per_channel(&finish_batch_stats_kernel, C, mean.data_ptr<float>(), var.data_ptr<float>(),
                     fptr(invstd), fptr(updated[0]), fptr(updated[1]), C,
                     static_cast<float>(momentum), static_cast<float>(eps), bessel);
  const OptTensor* given[2] = {&running_mean, &running_var};
  for (int i = 0; i < 2; ++i)  // updated a float32 copy: write it back
    if (*given[i] && updated[i]->data_ptr() != (*given[i])->data_ptr())
      (*given[i])->copy_(updated[i]->view((*given[i])->sizes()));
  return invstd;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_coefficients(
    const at::Tensor& sum_dz, const at::Tensor& sum_dz_yc, const at::Tensor& group_sum_dz,
    const at::Tensor& group_sum_dz_yc, const at::Tensor& mean, const at::Tensor& invstd,
    const OptTensor& weight, const OptTensor& bias, int64_t count, bool batch_stats) {
  constexpr const char* fn = "fusedres.backward_coefficients";
  const int C = vector_channels(fn, mean);
  const float* sums[4] = {channel(fn, "sum_dz", sum_dz, mean),
                          channel(fn, "sum_dz_yc", sum_dz_yc, mean),
                          channel(fn, "group_sum_dz", group_sum_dz, mean),
                          channel(fn, "group_sum_dz_yc", group_sum_dz_yc, mean)};
  channel(fn, "invstd", invstd, mean);
  TORCH_CHECK(!batch_stats || count > 0, fn, ": batch statistics need count > 0, got ", count);
  const OptTensor w = float_vector(fn, "weight", weight, mean);
  const OptTensor b = float_vector(fn, "bias", bias, mean);
  const platform::DeviceGuard guard(mean.device());
  auto coef = at::empty({4, mean.size(0)}, mean.options());
  auto shift = at::empty_like(mean), dweight = at::empty_like(mean), dbias = at::empty_like(mean);
  launch_per_channel(&backward_coefficients_kernel, C, sums[0], sums[1], sums[2], sums[3],
                     mean.data_ptr<float>(), invstd.data_ptr<float>(), fptr(w), fptr(b), fptr(coef),
                     fptr(shift), fptr(dweight), fptr(dbias), C,
                     batch_stats ? static_cast<float>(-1.0 / double(count)) : 0.f, batch_stats);
  return {coef, shift, dweight, dbias};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() =
      "fusedres CUDA backend: the BatchNorm-apply + residual + ReLU stage kernels and BatchNorm's "
      "per-channel arithmetic, with the same "
      "functions, arguments and results as fusedres.ops.torch_backend. CUDA tensors, storage "
      "fp32/fp16/bf16 in NCHW or channels_last, per-channel vectors contiguous fp32.";
  // The torch these bindings were compiled against. torch's C++ ABI changes between releases:
  // a build for another torch may import and then misread every tensor, so
  // fusedres/_extension.py refuses one whose release differs.
  m.attr("torch_version") = std::to_string(TORCH_VERSION_MAJOR) + "." +
                            std::to_string(TORCH_VERSION_MINOR) + "." +
                            std::to_string(TORCH_VERSION_PATCH);
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
  m.def("affine", &affine, py::arg("mean"), py::arg("invstd"), py::arg("weight"), py::arg("bias"),
        "affine(mean, invstd, weight, bias) -> (scale, shift), fp32 (C,): bn(y) = y * scale + "
        "shift; weight and bias optional, any float dtype.");
  m.def("finish_batch_stats", &finish_batch_stats, py::arg("mean"), py::arg("var"),
        py::arg("running_mean"), py::arg("running_var"), py::arg("momentum"), py::arg("eps"),
        py::arg("count"),
        "finish_batch_stats(mean, var, running_mean, running_var, momentum, eps, count) -> invstd "
        "= 1 / sqrt(var + eps); the running statistics (optional, any float dtype) updated in "
        "place as eager's BatchNorm does, r = momentum * stat + (1 - momentum) * r in fp32, "
        "rounded once to r's dtype; stat = mean and var * count / (count - 1).");
  m.def("backward_coefficients", &backward_coefficients, py::arg("sum_dz"), py::arg("sum_dz_yc"),
        py::arg("group_sum_dz"), py::arg("group_sum_dz_yc"), py::arg("mean"), py::arg("invstd"),
        py::arg("weight"), py::arg("bias"), py::arg("count"), py::arg("batch_stats"),
        "backward_coefficients(sum_dz, sum_dz_yc, group_sum_dz, group_sum_dz_yc, mean, invstd, "
        "weight, bias, count, batch_stats) -> (coef (4, C), shift, dweight, dbias), fp32: what "
        "backward_apply takes, and BatchNorm's parameter gradients, from backward_reduce's sums.");
}
