// gradguard::fused_adam_readonly_grads_: PyTorch's CPU fused Adam/AdamW step (aten::_fused_adam_ /
// _fused_adamw_ handed grad_scale) with one difference: the gradients are divided by grad_scale as
// they are read and are never written back.
//
// Why: a guard that clips (or unscales) hands the fused step grad_scale = loss_scale / clip_coef,
// and PyTorch's kernel then stores every divided gradient back to .grad: a write pass over the
// gradients that costs 0.14-0.20x of the whole step on the GPT-2-small list (README, "Guarded
// optimizer step"). Without it a clipping guarded step costs the bare step plus one read.
//
// The arithmetic is PyTorch's, operation for operation, so that parameters and state are
// bit-identical to the step PyTorch would have taken (NaN payloads included). Read from the torch
// 2.13 wheel's code (the AVX2 copy: the wheel registers no AVX-512 one for this kernel), it is,
// per element, in float32 (float64 for float64; float16/bfloat16 are widened to float32, and the
// update uses the moments before they are rounded back) (g = grad / grad_scale, w = 1 - beta1,
// fma = one rounding):
//   maximize: g = -g;  weight decay: Adam g = fma(p, wd, g), AdamW p = p * fma(-lr, wd, 1) (in double)
//   m = |w| < 0.5 ? fma(w, g - m, m) : fma(w - 1, g - m, g)           (exp_avg.lerp_(g, w))
//   v = fma(g, (1 - beta2) * g, v * beta2)  in the vector body,
//   v = fma(v, beta2, ((1 - beta2) * g) * g) in the last numel % L elements (its scalar tail,
//       L = 8 float32 / 4 float64 / 16 float16 or bfloat16 lanes: gcc contracted the two
//       differently)
//   p = p + (-step_size * m) / (sqrt(v) / sqrt(bias_correction2) + eps)   (the tail: p - (...))
// Such details change between torch releases and builds, so this kernel is never trusted on
// reading alone: gradguard/fused_adam.py runs it against PyTorch's kernel on a probe of every
// configuration before its first use and keeps PyTorch's kernel (with its write-back) where
// they differ in a single bit. No FMA contraction here beyond the explicit ones (fp-contract=off).
// Refused (the caller keeps PyTorch's kernel): amsgrad, other dtypes, tensors that do not share
// one dense layout with their parameter; CPUs without AVX2+FMA.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "adam_readonly_grads.h"
#include "cpu_isa.h"

#if GG_CPU_X86
#include <immintrin.h>
#endif

namespace gradguard {
namespace {

struct AdamConsts {
  double lr, beta1, beta2, weight_decay, eps, grad_scale, step;
  bool maximize, decoupled;
};

template <typename T>
struct Coeffs {
  T step_size, bc2_sqrt, w, w_minus_1, b2, c2, eps, gs, wd, decay;
  bool small, has_wd, decoupled, maximize;
};

enum WeightDecay { kNoDecay, kAdamDecay, kAdamWDecay };

#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
GG_TARGET_AVX2

#if GG_CPU_X86
// The AVX2 operations for one dtype, so that one loop serves float32 (8 lanes) and float64 (4).
struct F32x8 {
  using T = float;  // storage
  using C = float;  // arithmetic
  using V = __m256;
  static constexpr int kLanes = 8;
  static V load(const T* x) { return _mm256_loadu_ps(x); }
  static void store(T* x, V a) { _mm256_storeu_ps(x, a); }
  static V set1(T a) { return _mm256_set1_ps(a); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V sqrt(V a) { return _mm256_sqrt_ps(a); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V neg(V a) { return _mm256_xor_ps(a, _mm256_set1_ps(-0.0f)); }
};

struct F64x4 {
  using T = double;
  using C = double;
  using V = __m256d;
  static constexpr int kLanes = 4;
  static V load(const T* x) { return _mm256_loadu_pd(x); }
  static void store(T* x, V a) { _mm256_storeu_pd(x, a); }
  static V set1(T a) { return _mm256_set1_pd(a); }
  static V add(V a, V b) { return _mm256_add_pd(a, b); }
  static V sub(V a, V b) { return _mm256_sub_pd(a, b); }
  static V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  static V div(V a, V b) { return _mm256_div_pd(a, b); }
  static V sqrt(V a) { return _mm256_sqrt_pd(a); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static V neg(V a) { return _mm256_xor_pd(a, _mm256_set1_pd(-0.0)); }
};

// float16/bfloat16 storage, float32 arithmetic (PyTorch's opmath), 8 elements at a time. PyTorch
// converts 16 at a time; the arithmetic is per element, so only where its body ends matters (the
// caller's tail_from). Conversions as PyTorch's AVX2 ones (ATen/cpu/vec/vec256/vec256_16bit_float.h):
// exact widening; narrowing rounds to nearest even, a bfloat16 NaN becomes 0xffff.
struct BF16x8 : F32x8 {
  using T = c10::BFloat16;
  static V load(const T* x) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static void store(T* x, V a) {
    const __m256i bits = _mm256_castps_si256(a);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)), bits), 16);
    r = _mm256_blendv_epi8(_mm256_set1_epi32(0xffff), r, _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_ORD_Q)));
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(x), packed);
  }
};

struct F16x8 : F32x8 {
  using T = c10::Half;
  static V load(const T* x) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))); }
  static void store(T* x, V a) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(x), _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

// PyTorch's vector body over [lo, hi), a whole number of lanes. Every operation rounds as
// written; fma rounds once. The branches are template arguments, out of the loop.
template <typename S, WeightDecay kWd, bool kSmall, bool kMaximize>
void adam_body(typename S::T* __restrict p, const typename S::T* __restrict g_in, typename S::T* __restrict m,
               typename S::T* __restrict v, int64_t lo, int64_t hi, const Coeffs<typename S::C>& k) {
  using V = typename S::V;
  const V gs = S::set1(k.gs), wd = S::set1(k.wd), decay = S::set1(k.decay), w = S::set1(k.w),
          wm1 = S::set1(k.w_minus_1), b2 = S::set1(k.b2), c2 = S::set1(k.c2), neg_ss = S::set1(-k.step_size),
          bc2 = S::set1(k.bc2_sqrt), eps = S::set1(k.eps);
  for (int64_t i = lo; i < hi; i += S::kLanes) {
    V g = S::div(S::load(g_in + i), gs);
    if constexpr (kMaximize) g = S::neg(g);  // gcc made PyTorch's g * -1 a sign flip (a NaN's too)
    V pi = S::load(p + i);
    if constexpr (kWd == kAdamWDecay) pi = S::mul(pi, decay);
    if constexpr (kWd == kAdamDecay) g = S::fma(pi, wd, g);
    const V mo = S::load(m + i);
    const V d = S::sub(g, mo);
    V mi;
    if constexpr (kSmall) {
      mi = S::fma(w, d, mo);
    } else {
      mi = S::fma(wm1, d, g);
    }
    const V vi = S::fma(g, S::mul(c2, g), S::mul(S::load(v + i), b2));
    S::store(m + i, mi);
    S::store(v + i, vi);
    // p + (-step_size * m) / denom, in PyTorch's operand order (the same value as p - ..., and
    // the same NaN where one is made).
    S::store(p + i, S::add(pi, S::div(S::mul(neg_ss, mi), S::add(S::div(S::sqrt(vi), bc2), eps))));
  }
}
#endif

// PyTorch's scalar tail over [lo, hi) (fewer elements than a vector's lanes): the same, except
// that gcc contracted the second moment the other way round there. T: storage, C: arithmetic.
template <typename T, typename C>
void adam_tail(T* p, const T* g_in, T* m, T* v, int64_t lo, int64_t hi, const Coeffs<C>& k) {
  for (int64_t i = lo; i < hi; ++i) {
    C g = static_cast<C>(g_in[i]) / k.gs;
    if (k.maximize) g = -g;
    C pi = static_cast<C>(p[i]);
    if (k.has_wd) {
      if (k.decoupled) {
        pi = pi * k.decay;
      } else {
        g = std::fma(pi, k.wd, g);
      }
    }
    const C mo = static_cast<C>(m[i]);
    const C d = g - mo;
    const C mi = k.small ? std::fma(k.w, d, mo) : std::fma(k.w_minus_1, d, g);
    const C vi = std::fma(static_cast<C>(v[i]), k.b2, (k.c2 * g) * g);
    m[i] = static_cast<T>(mi);
    v[i] = static_cast<T>(vi);
    // The update from the moments before they were rounded to T, as PyTorch's.
    p[i] = static_cast<T>(pi - (k.step_size * mi) / (std::sqrt(vi) / k.bc2_sqrt + k.eps));
  }
}

#pragma GCC pop_options

template <typename S, WeightDecay kWd, bool kSmall>
void adam_body(typename S::T* p, const typename S::T* g, typename S::T* m, typename S::T* v, int64_t lo, int64_t hi,
               const Coeffs<typename S::C>& k) {
  if (k.maximize) {
    adam_body<S, kWd, kSmall, true>(p, g, m, v, lo, hi, k);
  } else {
    adam_body<S, kWd, kSmall, false>(p, g, m, v, lo, hi, k);
  }
}

template <typename S, WeightDecay kWd>
void adam_body(typename S::T* p, const typename S::T* g, typename S::T* m, typename S::T* v, int64_t lo, int64_t hi,
               const Coeffs<typename S::C>& k) {
  if (k.small) {
    adam_body<S, kWd, true>(p, g, m, v, lo, hi, k);
  } else {
    adam_body<S, kWd, false>(p, g, m, v, lo, hi, k);
  }
}

// PyTorch's arithmetic type for storage type T (at::opmath_type): float for float16/bfloat16.
template <typename T>
using Opmath = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
void adam_body_any(T* p, const T* g, T* m, T* v, int64_t lo, int64_t hi, const Coeffs<Opmath<T>>& k) {
#if GG_CPU_X86
  using S = std::conditional_t<
      std::is_same_v<T, float>, F32x8,
      std::conditional_t<std::is_same_v<T, double>, F64x4,
                         std::conditional_t<std::is_same_v<T, c10::BFloat16>, BF16x8, F16x8>>>;
  if (!k.has_wd) {
    adam_body<S, kNoDecay>(p, g, m, v, lo, hi, k);
  } else if (k.decoupled) {
    adam_body<S, kAdamWDecay>(p, g, m, v, lo, hi, k);
  } else {
    adam_body<S, kAdamDecay>(p, g, m, v, lo, hi, k);
  }
#else
  TORCH_CHECK(false, "gradguard.fused_adam_readonly_grads_: x86-64 only");
#endif
}

// Elements [begin, end) of one tensor; `tail_from`: the first element of PyTorch's scalar tail.
template <typename T>
void adam_range(T* p, const T* g, T* m, T* v, int64_t begin, int64_t end, int64_t tail_from, const AdamConsts& c) {
  using C = Opmath<T>;
  const double bc1 = 1 - std::pow(c.beta1, c.step);
  const double bc2 = 1 - std::pow(c.beta2, c.step);
  Coeffs<C> k;
  k.step_size = static_cast<C>(c.lr / bc1);
  k.bc2_sqrt = static_cast<C>(std::sqrt(bc2));
  k.w = static_cast<C>(1 - c.beta1);
  k.w_minus_1 = k.w - C(1);
  k.small = (k.w < C(0) ? -k.w : k.w) < C(0.5);
  k.b2 = static_cast<C>(c.beta2);
  k.c2 = static_cast<C>(1 - c.beta2);
  k.eps = static_cast<C>(c.eps);
  k.gs = static_cast<C>(static_cast<float>(c.grad_scale));  // PyTorch's grad_scale is a float32 tensor
  k.has_wd = c.weight_decay != 0.f;
  k.wd = static_cast<C>(c.weight_decay);
  // One rounding, as gcc contracted PyTorch's `1 - lr * weight_decay` (its kernel file is built
  // with FMA): with two, float64 decays differed for ~1 lr value in 40,000.
  k.decay = static_cast<C>(std::fma(-c.lr, c.weight_decay, 1.0));
  k.decoupled = c.decoupled;
  k.maximize = c.maximize;
  const int64_t split = std::min(std::max(tail_from, begin), end);
  adam_body_any<T>(p, g, m, v, begin, split, k);
  adam_tail<T, C>(p, g, m, v, split, end, k);
}

}  // namespace

// Why the kernel cannot take these lists ("" when it can): every condition PyTorch's kernel
// needs to pair elements by memory offset (a parameter and its grad, moments: one dense,
// non-overlapping layout with the same strides, e.g. all contiguous or all channels_last).
std::string fused_adam_readonly_grads_refusal(at::TensorList params, at::TensorList grads, at::TensorList ms,
                                              at::TensorList vs, at::TensorList steps, const at::Tensor& grad_scale,
                                              const std::optional<at::Tensor>& found_inf) {
  if (!cpu_has_avx2()) return "needs an x86-64 CPU with AVX2 and FMA";
  const size_t n = params.size();
  if (grads.size() != n || ms.size() != n || vs.size() != n || steps.size() != n) {
    return "params, grads, exp_avgs, exp_avg_sqs and state_steps must have the same length";
  }
  if (!grad_scale.device().is_cpu() || grad_scale.scalar_type() != at::kFloat || grad_scale.numel() != 1) {
    return "grad_scale must be a one-element float32 CPU tensor";
  }
  if (found_inf.has_value() &&
      (!found_inf->device().is_cpu() || found_inf->scalar_type() != at::kFloat || found_inf->numel() != 1)) {
    return "found_inf must be a one-element float32 CPU tensor";
  }
  if (n == 0) return "";
  const auto dtype = params[0].scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble && dtype != at::kHalf && dtype != at::kBFloat16) {
    return "float32, float64, float16 or bfloat16 parameters only";
  }
  for (const auto i : c10::irange(n)) {
    const at::Tensor& p = params[i];
    // Contiguous tensors (the common case, a cached flag) pair by offset whatever their shapes;
    // any other dense layout must be the parameter's own, stride for stride.
    const bool contiguous = p.is_contiguous();
    if (!p.device().is_cpu() || p.scalar_type() != dtype || !(contiguous || p.is_non_overlapping_and_dense())) {
      return "every parameter must be a dense CPU tensor of the first one's dtype (tensor " + std::to_string(i) + ")";
    }
    for (const at::Tensor* t : {&grads[i], &ms[i], &vs[i]}) {
      if (!t->device().is_cpu() || t->scalar_type() != dtype || t->numel() != p.numel() ||
          !(contiguous ? t->is_contiguous() : t->strides() == p.strides())) {
        return "tensor " + std::to_string(i) +
               " of grads/exp_avgs/exp_avg_sqs differs from its parameter in device, dtype, size or layout";
      }
    }
    if (steps[i].numel() != 1) return "every state step must have one element (tensor " + std::to_string(i) + ")";
    // Their version cannot be bumped outside inference mode: PyTorch's kernel says what it says.
    if (p.is_inference() || ms[i].is_inference() || vs[i].is_inference()) {
      return "inference tensors (tensor " + std::to_string(i) + ")";
    }
  }
  return "";
}

namespace {

void fused_adam_readonly_grads_cpu(at::TensorList params, at::TensorList grads, at::TensorList ms,
                                   at::TensorList vs, at::TensorList steps, double lr,
                                   double beta1, double beta2, double weight_decay, double eps, bool maximize,
                                   bool decoupled, const at::Tensor& grad_scale,
                                   const std::optional<at::Tensor>& found_inf) {
  // Every check before the first write: a refused call has changed nothing (the caller then
  // runs PyTorch's kernel instead).
  const std::string refused =
      fused_adam_readonly_grads_refusal(params, grads, ms, vs, steps, grad_scale, found_inf);
  TORCH_CHECK(refused.empty(), "gradguard.fused_adam_readonly_grads_: ", refused);
  const size_t n = params.size();
  if (n == 0) return;
  const auto dtype = params[0].scalar_type();
  if (found_inf.has_value() && found_inf->item<float>() == 1.0f) return;  // as PyTorch's: the step is skipped
  const double gs = grad_scale.item<float>();
  // The version bump the dispatcher's inplace-or-view step would have made (gradguard/_ops.py
  // registers a fallthrough there: the boxed fallback cost more than the step on small tensors),
  // so that autograd still sees these tensors as modified in place.
  for (const auto i : c10::irange(n)) {
    params[i].unsafeGetTensorImpl()->bump_version();
    ms[i].unsafeGetTensorImpl()->bump_version();
    vs[i].unsafeGetTensorImpl()->bump_version();
  }
  for (const auto i : c10::irange(n)) {
    // As PyTorch's kernel: the step count read as float32, then used in double.
    const AdamConsts c{lr, beta1, beta2, weight_decay, eps, gs, static_cast<double>(steps[i].item<float>()),
                       maximize, decoupled};
    const int64_t numel = params[i].numel();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fused_adam_readonly_grads_", [&] {
      // PyTorch's AVX2 lanes (a 256-bit vector of the storage type: 8 float32, 4 float64, 16
      // float16/bfloat16): the scalar tail is the last numel % lanes elements (its parallel chunks
      // are 64-byte units, whole multiples of the lanes, so only the tensor's end has one).
      constexpr int64_t lanes = 32 / sizeof(scalar_t);
      constexpr int64_t unit = 64 / sizeof(scalar_t);
      // By memory offset, as PyTorch's kernel: the four tensors share one dense layout.
      scalar_t* p = params[i].data_ptr<scalar_t>();
      const scalar_t* g = grads[i].const_data_ptr<scalar_t>();
      scalar_t* m = ms[i].data_ptr<scalar_t>();
      scalar_t* v = vs[i].data_ptr<scalar_t>();
      const int64_t tail_from = numel - numel % lanes;
      at::parallel_for(0, (numel + unit - 1) / unit, 0, [&](int64_t b, int64_t e) {
        adam_range<scalar_t>(p, g, m, v, b * unit, std::min(e * unit, numel), tail_from, c);
      });
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(gradguard, CPU, m) { m.impl("fused_adam_readonly_grads_", &fused_adam_readonly_grads_cpu); }

}  // namespace gradguard
