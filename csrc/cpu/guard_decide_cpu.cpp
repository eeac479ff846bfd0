// gradguard::guard_decide on the CPU: the whole decision of a guarded step (the specification is
// gradguard/reference/decide.py; the scalar math is csrc/guard_decide_math.h, shared with CUDA).
//
// A host-latency op: n is the number of gradient tensors (tens to a few thousand), so it is
// plain loops over raw pointers, no OpenMP and no ATen op besides allocating the six outputs
// (each ATen op costs microseconds of dispatch, the whole point of the fused op). Every argument
// is checked before anything is written, so a bad call leaves the guard's state as it was.
#include <ATen/ATen.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "cpu_empty.h"
#include "cpu_isa.h"
#include "guard_decide_args.h"
#include "guard_decide_math.h"

#if GG_CPU_X86
#include <immintrin.h>
#endif

namespace gradguard {
namespace {

using decide::OptTensor;
using decide::kWhere;
using decide::Outputs;

// The per-tensor loop below for its common call (p = 2, no index, every array unit-stride, the
// guard's per-layer state given), four tensors a step with AVX2: at 1,000 tensors the scalar loop
// took 5.8-6.2 us, a quarter of the op (15 cycles a tensor: a square root, NaN-aware maxima and
// branches). The same IEEE operations on the same operands as the scalar loop (a correctly
// rounded square root and products, the float rounding of round_to, max_nan's blends), so the
// same values. Where both operands of a product are NaN, x86 returns the first, and the compiler
// orders each loop's operands its own way: the caller takes this loop only with a non-NaN loss
// scale factor, so that a NaN loss scale gives the same NaN bits either way (amax and acc are
// both NaN only in hand-made inputs). Returns how many tensors it did; the scalar loop does the
// rest, and the caller adds up the totals and the largest amax of the ones it did.
#if GG_CPU_X86
#pragma GCC push_options
GG_TARGET_AVX2
namespace isa_avx2 {

// max_nan(old, cand) per lane: old if NaN, else cand if NaN, else the larger (old on ties).
inline __m256d max_nan4(__m256d old, __m256d cand) {
  __m256d r = _mm256_blendv_pd(old, cand, _mm256_cmp_pd(cand, old, _CMP_GT_OQ));
  r = _mm256_blendv_pd(r, cand, _mm256_cmp_pd(cand, cand, _CMP_UNORD_Q));
  return _mm256_blendv_pd(r, old, _mm256_cmp_pd(old, old, _CMP_UNORD_Q));
}

template <bool kDouble>
int64_t per_tensor_l2(int64_t n, const double* acc, const int64_t* nanc, const int64_t* infc, const double* amax,
                      double inv_s, void* norms_out, void* amax_out, int64_t* lnf, double* lmn) {
  const __m256d inv = _mm256_set1_pd(inv_s);
  const __m256d inf = _mm256_set1_pd(decide::inf());
  const __m256d qnan = _mm256_set1_pd(decide::nan());
  const __m256i zero = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const __m256i nc = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(nanc + i));
    const __m256i ic = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(infc + i));
    const __m256d a = _mm256_loadu_pd(amax + i);
    // tensor_norm: NaN where a NaN was counted, else inf where an Inf was, else amax * sqrt(acc).
    __m256d raw = _mm256_mul_pd(a, _mm256_sqrt_pd(_mm256_loadu_pd(acc + i)));
    raw = _mm256_blendv_pd(raw, inf, _mm256_castsi256_pd(_mm256_cmpgt_epi64(ic, zero)));
    raw = _mm256_blendv_pd(raw, qnan, _mm256_castsi256_pd(_mm256_cmpgt_epi64(nc, zero)));
    __m256d norm = _mm256_mul_pd(raw, inv);
    __m256d am = _mm256_mul_pd(a, inv);
    if constexpr (kDouble) {
      _mm256_storeu_pd(static_cast<double*>(norms_out) + i, norm);
      _mm256_storeu_pd(static_cast<double*>(amax_out) + i, am);
    } else {
      const __m128 nf = _mm256_cvtpd_ps(norm);  // round_to: the float the result holds
      _mm_storeu_ps(static_cast<float*>(norms_out) + i, nf);
      _mm_storeu_ps(static_cast<float*>(amax_out) + i, _mm256_cvtpd_ps(am));
      norm = _mm256_cvtps_pd(nf);
    }
    const __m256i bad = _mm256_cmpgt_epi64(_mm256_add_epi64(nc, ic), zero);  // all ones where bad
    __m256i* lnf_i = reinterpret_cast<__m256i*>(lnf + i);
    _mm256_storeu_si256(lnf_i, _mm256_sub_epi64(_mm256_loadu_si256(lnf_i), bad));
    const __m256d cand = _mm256_andnot_pd(_mm256_castsi256_pd(bad), norm);  // bad ? 0.0 : norm
    _mm256_storeu_pd(lmn + i, max_nan4(_mm256_loadu_pd(lmn + i), cand));
  }
  return i;
}

}  // namespace isa_avx2
#pragma GCC pop_options
#endif

Outputs guard_decide_cpu(const at::Tensor& acc, const at::Tensor& nan_count, const at::Tensor& inf_count,
                         const at::Tensor& amax, const OptTensor& index, const OptTensor& max_norm,
                         const OptTensor& loss_scale, const OptTensor& scaler_found, const OptTensor& counters,
                         const OptTensor& layer_nonfinite, const OptTensor& layer_max_norm,
                         const OptTensor& spike_state, const OptTensor& history, double norm_type,
                         std::optional<double> max_norm_value, c10::string_view mode, c10::string_view spike,
                         at::ArrayRef<double> spike_args, bool double_out) {
  decide::check_guard_decide_args(acc, nan_count, inf_count, amax, index, max_norm, loss_scale, scaler_found, counters,
                          layer_nonfinite, layer_max_norm, spike_state, history, norm_type, mode, spike, spike_args);
  const int64_t n = acc.size(0);
  const double* acc_p = acc.const_data_ptr<double>();
  const int64_t* nan_p = nan_count.const_data_ptr<int64_t>();
  const int64_t* inf_p = inf_count.const_data_ptr<int64_t>();
  const double* amax_p = amax.const_data_ptr<double>();
  const int64_t sa = acc.stride(0), sn = nan_count.stride(0), si = inf_count.stride(0), sm = amax.stride(0);

  const int64_t* idx_p = index ? index->const_data_ptr<int64_t>() : nullptr;
  const int64_t sx = index ? index->stride(0) : 0;
  const int64_t layers = layer_nonfinite ? layer_nonfinite->size(0) : 0;
  if (idx_p != nullptr) {
    for (const auto i : c10::irange(n)) {
      const int64_t j = idx_p[i * sx];
      // IndexError, as the reference's index_add_ raises.
      TORCH_CHECK_INDEX(j >= 0 && j < layers, kWhere, ": `index`[", i, "] = ", j, " is outside the ", layers,
                  " entries of `layer_nonfinite`");
    }
  }

  const bool amp = loss_scale.has_value() || scaler_found.has_value();
  const decide::Config cfg = decide::make_guard_decide_config(amp, max_norm.has_value(), norm_type, max_norm_value, mode,
                                                      spike, spike_args, double_out);
  decide::Inputs in{};
  in.has_max_norm = max_norm.has_value();
  in.max_norm = in.has_max_norm ? decide::read_one_host(*max_norm, "max_norm") : 0.0;
  in.has_loss_scale = loss_scale.has_value();
  in.loss_scale = in.has_loss_scale ? decide::read_one_host(*loss_scale, "loss_scale") : 1.0;
  in.has_scaler_found = scaler_found.has_value();
  in.scaler_found = in.has_scaler_found ? decide::read_one_host(*scaler_found, "scaler_found") : 0.0;

  const auto out_dtype = double_out ? at::kDouble : at::kFloat;
  // Every element of each output is written below (cpu_empty.h).
  at::Tensor norms = cpu_empty({n}, out_dtype);
  at::Tensor amax_out = cpu_empty({n}, out_dtype);
  at::Tensor scalars = cpu_empty({9}, at::kDouble);
  at::Tensor found_inf = cpu_empty({}, at::kFloat);
  at::Tensor multiplier = cpu_empty({}, cfg.basis_double ? at::kDouble : at::kFloat);
  at::Tensor grad_scale = cpu_empty({}, at::kFloat);
  at::Tensor pre_scale = cpu_empty({}, at::kFloat);

  // Per tensor: the norms and the totals.
  const double inv = decide::inverse_scale(in.has_loss_scale, in.loss_scale);
  const double p = cfg.p;
  int64_t* lnf_p = layer_nonfinite ? layer_nonfinite->mutable_data_ptr<int64_t>() : nullptr;
  double* lmn_p = layer_max_norm ? layer_max_norm->mutable_data_ptr<double>() : nullptr;
  const int64_t s_lnf = layer_nonfinite ? layer_nonfinite->stride(0) : 0;
  const int64_t s_lmn = layer_max_norm ? layer_max_norm->stride(0) : 0;
  double* norms_d = double_out ? norms.mutable_data_ptr<double>() : nullptr;
  float* norms_f = double_out ? nullptr : norms.mutable_data_ptr<float>();
  double* amax_d = double_out ? amax_out.mutable_data_ptr<double>() : nullptr;
  float* amax_f = double_out ? nullptr : amax_out.mutable_data_ptr<float>();
  int64_t nan_total = 0, inf_total = 0;
  double m = -decide::inf();
  int64_t done = 0;
#if GG_CPU_X86
  if (cpu_has_avx2() && p == 2.0 && !std::isnan(inv) && idx_p == nullptr && lnf_p != nullptr && sa == 1 && sn == 1 &&
      si == 1 && sm == 1 && s_lnf == 1 && s_lmn == 1) {
    done = double_out
               ? isa_avx2::per_tensor_l2<true>(n, acc_p, nan_p, inf_p, amax_p, inv, norms_d, amax_d, lnf_p, lmn_p)
               : isa_avx2::per_tensor_l2<false>(n, acc_p, nan_p, inf_p, amax_p, inv, norms_f, amax_f, lnf_p, lmn_p);
    for (const auto i : c10::irange(done)) {  // the totals and the largest amax of those tensors
      nan_total += nan_p[i];
      inf_total += inf_p[i];
      m = decide::max_nan(m, amax_p[i]);
    }
  }
#endif
  for (int64_t i = done; i < n; ++i) {
    const int64_t nc = nan_p[i * sn], ic = inf_p[i * si];
    const double a = amax_p[i * sm];
    nan_total += nc;
    inf_total += ic;
    m = decide::max_nan(m, a);
    const double norm = decide::round_to(decide::mul(decide::tensor_norm(acc_p[i * sa], a, nc, ic, p), inv), double_out);
    const double am = decide::round_to(decide::mul(a, inv), double_out);
    if (double_out) {
      norms_d[i] = norm;
      amax_d[i] = am;
    } else {
      norms_f[i] = static_cast<float>(norm);
      amax_f[i] = static_cast<float>(am);
    }
    if (lnf_p != nullptr) {
      const bool bad = (nc + ic) > 0;
      const int64_t j = idx_p != nullptr ? idx_p[i * sx] : i;
      lnf_p[j * s_lnf] += bad ? 1 : 0;
      lmn_p[j * s_lmn] = decide::max_nan(lmn_p[j * s_lmn], bad ? 0.0 : norm);
    }
  }
  double sum = 0.0;
  if (!std::isinf(p)) {
    for (const auto i : c10::irange(n)) sum += decide::total_term(acc_p[i * sa], amax_p[i * sm], m, p);
  }
  in.nan_total = nan_total;
  in.inf_total = inf_total;
  in.finite_total = decide::finite_total(n, m, sum, p);

  // The spike policy's limit from its state before this step.
  double* sp = spike_state && cfg.spike != decide::kNone ? spike_state->mutable_data_ptr<double>() : nullptr;
  const int64_t ss = sp != nullptr ? spike_state->stride(0) : 0;
  if (cfg.spike == decide::kZScore) {
    in.spike_raw_limit = decide::zscore_raw_limit(sp[0], sp[ss], cfg.spike_arg0);
    in.spike_count = sp[2 * ss];
  } else if (cfg.spike == decide::kPercentile) {
    const int64_t window = static_cast<int64_t>(cfg.spike_arg1);
    // Reused between calls: no allocation on the hot path once the window size was seen.
    thread_local std::vector<double> values;
    values.clear();
    for (const auto k : c10::irange(window)) {
      const double v = sp[(1 + k) * ss];
      if (!decide::isnan_(v)) values.push_back(v);
    }
    const int64_t valid = static_cast<int64_t>(values.size());
    double v_below = decide::nan(), v_above = decide::nan(), weight = 0.0;
    if (valid > 0) {
      const decide::QuantileRanks r = decide::quantile_ranks(cfg.spike_arg0, valid);
      std::nth_element(values.begin(), values.begin() + r.below, values.end());
      v_below = values[r.below];
      // After nth_element everything past `below` is >= it: the next rank is their minimum.
      v_above = r.above == r.below ? v_below : *std::min_element(values.begin() + r.below + 1, values.end());
      weight = r.weight;
    }
    in.spike_raw_limit = decide::quantile_value(valid, v_below, v_above, weight);
    in.spike_count = sp[0];
  }

  const decide::Decision d = decide::decide(cfg, in);
  decide::StateRefs refs{sp, ss, nullptr, 0, nullptr, 0, 0, 0};
  if (counters) {
    refs.counters = counters->mutable_data_ptr<int64_t>();
    refs.s_counters = counters->stride(0);
  }
  if (history) {
    refs.history = history->mutable_data_ptr<double>();
    refs.s_hist0 = history->stride(0);
    refs.s_hist1 = history->stride(1);
    refs.hist_rows = history->size(0);
  }
  decide::record(cfg, d, refs,
                 {scalars.mutable_data_ptr<double>(), found_inf.mutable_data_ptr<float>(),
                  multiplier.mutable_data_ptr(), grad_scale.mutable_data_ptr<float>(),
                  pre_scale.mutable_data_ptr<float>()});
  return {norms, amax_out, scalars, found_inf, multiplier, grad_scale, pre_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradguard, CPU, m) { m.impl("guard_decide", &guard_decide_cpu); }

}  // namespace gradguard
