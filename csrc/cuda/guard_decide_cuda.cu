// gradguard::guard_decide on CUDA: the whole decision of a guarded step in ONE launch of one
// block (the specification is gradguard/reference/decide.py; the scalar math is
// csrc/guard_decide_math.h, the same code the CPU kernel runs).
//
// n is the number of gradient tensors (tens to thousands): one 512-thread block walks them with
// a block-stride loop, reduces the NaN/Inf totals and the largest amax, then the rescaled sum;
// thread 0 decides and writes the counters, spike state, history and the 0-dim outputs. The
// per-tensor outputs and the per-layer updates depend on no decision, so they are written in the
// first walk. The 0-dim inputs (max_norm, loss_scale, scaler_found) are read by the kernel from
// device memory: no host sync, no allocation besides the six outputs, nothing that breaks CUDA
// graph capture. The percentile threshold is found without sorting: each non-NaN window value's
// rank is counted (values below it, plus equal values at lower positions: a stable sort's order).
//
// Each block-wide reduction has a fixed shape, so results are reproducible run to run. A repeated
// index adds up its entries (atomics), as on the CPU; an index outside the layers is a device-side
// assert, as in torch's own index_add_ (the CPU kernel raises an IndexError).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "guard_decide_args.h"
#include "guard_decide_math.h"
#include "kernel_image.h"

namespace gradguard {
namespace cuda {
namespace {

constexpr int kDecideThreads = 512;  // a power of two: the tree reductions halve it

// The per-layer updates are atomic: with an index repeated in one call, two lanes' plain
// read-modify-writes kept one entry's update, where the CPU kernel and the reference add both
// counts and keep the larger norm. GradGuard's indices are distinct, and never contend.
__device__ void atomic_max_nan(double* addr, double v) {
  auto* p = reinterpret_cast<unsigned long long*>(addr);
  unsigned long long old = *p;  // a stale read only costs one more round of the loop
  while (true) {
    const auto want = static_cast<unsigned long long>(
        __double_as_longlong(decide::max_nan(__longlong_as_double(static_cast<long long>(old)), v)));
    if (want == old) return;
    const unsigned long long seen = atomicCAS(p, old, want);
    if (seen == old) return;
    old = seen;
  }
}

enum ScalarKind : int { kAbsent = 0, kF64 = 1, kF32 = 2, kF16 = 3, kBF16 = 4 };

struct ScalarRef {
  const void* ptr;
  int kind;
};

// Everything the kernel touches, by value (a few hundred bytes of kernel arguments).
struct DecideArgs {
  const double* acc;
  const int64_t* nan;
  const int64_t* inf;
  const double* amax;
  const int64_t* index;
  int64_t s_acc, s_nan, s_inf, s_amax, s_index;
  int64_t n;
  ScalarRef max_norm, loss_scale, scaler_found;
  int64_t* counters;
  int64_t s_counters;
  int64_t* layer_nonfinite;
  double* layer_max_norm;
  int64_t s_lnf, s_lmn, layers;
  double* spike;
  int64_t s_spike;
  double* history;
  int64_t s_hist0, s_hist1, hist_rows;
  // outputs (contiguous, fresh)
  void* norms;
  void* amax_out;
  double* scalars;
  float* found_inf;
  void* multiplier;
  float* grad_scale;
  float* pre_scale;
  decide::Config cfg;
};

__device__ __forceinline__ double read_scalar(const ScalarRef& r) {
  switch (r.kind) {
    case kF64: return *static_cast<const double*>(r.ptr);
    case kF32: return static_cast<double>(*static_cast<const float*>(r.ptr));
    case kF16: return static_cast<double>(static_cast<float>(*static_cast<const c10::Half*>(r.ptr)));
    case kBF16: return static_cast<double>(static_cast<float>(*static_cast<const c10::BFloat16*>(r.ptr)));
    default: return 0.0;
  }
}

// Tree reductions over the block; every thread gets the result. `sh` holds kDecideThreads values.
template <typename T, typename Op>
__device__ T block_reduce(T v, T* sh, Op op) {
  const int tid = threadIdx.x;
  sh[tid] = v;
  __syncthreads();
#pragma unroll
  for (int s = kDecideThreads / 2; s > 0; s >>= 1) {
    if (tid < s) sh[tid] = op(sh[tid], sh[tid + s]);
    __syncthreads();
  }
  const T r = sh[0];
  __syncthreads();  // sh is reused by the next reduction
  return r;
}

struct SumLL {
  __device__ long long operator()(long long a, long long b) const { return a + b; }
};
struct SumD {
  __device__ double operator()(double a, double b) const { return decide::add(a, b); }
};
struct MaxNaN {
  __device__ double operator()(double a, double b) const { return decide::max_nan(a, b); }
};

__global__ void __launch_bounds__(kDecideThreads) guard_decide_kernel(const DecideArgs a) {
  __shared__ double sh_d[kDecideThreads];
  __shared__ long long sh_l[kDecideThreads];
  __shared__ double quantile_below, quantile_above;
  const int tid = threadIdx.x;
  const decide::Config& c = a.cfg;
  const bool has_loss_scale = a.loss_scale.kind != kAbsent;
  const double loss_scale = has_loss_scale ? read_scalar(a.loss_scale) : 1.0;
  const double inv = decide::inverse_scale(has_loss_scale, loss_scale);

  // 1. Per tensor: norms, amax, the layers' updates; partial totals.
  long long nan_total = 0, inf_total = 0;
  double m = -decide::inf();
  for (int64_t i = tid; i < a.n; i += kDecideThreads) {
    const int64_t nc = a.nan[i * a.s_nan], ic = a.inf[i * a.s_inf];
    const double am = a.amax[i * a.s_amax];
    nan_total += nc;
    inf_total += ic;
    m = decide::max_nan(m, am);
    const double norm =
        decide::round_to(decide::mul(decide::tensor_norm(a.acc[i * a.s_acc], am, nc, ic, c.p), inv), c.out_double);
    const double am_out = decide::round_to(decide::mul(am, inv), c.out_double);
    if (c.out_double) {
      static_cast<double*>(a.norms)[i] = norm;
      static_cast<double*>(a.amax_out)[i] = am_out;
    } else {
      static_cast<float*>(a.norms)[i] = static_cast<float>(norm);
      static_cast<float*>(a.amax_out)[i] = static_cast<float>(am_out);
    }
    if (a.layer_nonfinite != nullptr) {
      const bool bad = (nc + ic) > 0;
      const int64_t j = a.index != nullptr ? a.index[i * a.s_index] : i;
      CUDA_KERNEL_ASSERT(j >= 0 && j < a.layers);
      if (bad) atomicAdd(reinterpret_cast<unsigned long long*>(&a.layer_nonfinite[j * a.s_lnf]), 1ULL);
      atomic_max_nan(&a.layer_max_norm[j * a.s_lmn], bad ? 0.0 : norm);
    }
  }
  long long valid = 0;  // non-NaN percentile window values
  const int64_t window = c.spike == decide::kPercentile ? static_cast<int64_t>(c.spike_arg1) : 0;
  for (int64_t k = tid; k < window; k += kDecideThreads) valid += decide::isnan_(a.spike[(1 + k) * a.s_spike]) ? 0 : 1;
  nan_total = block_reduce(nan_total, sh_l, SumLL());
  inf_total = block_reduce(inf_total, sh_l, SumLL());
  valid = block_reduce(valid, sh_l, SumLL());
  m = block_reduce(m, sh_d, MaxNaN());

  // 2. The rescaled sum of the finite norms.
  double sum = 0.0;
  if (!decide::isinf_(c.p)) {
    for (int64_t i = tid; i < a.n; i += kDecideThreads) {
      sum = decide::add(sum, decide::total_term(a.acc[i * a.s_acc], a.amax[i * a.s_amax], m, c.p));
    }
    sum = block_reduce(sum, sh_d, SumD());
  }

  // 3. Percentile: the two window values nanquantile interpolates, found by their ranks.
  decide::QuantileRanks ranks{0, 0, 0.0};
  if (c.spike == decide::kPercentile && valid > 0) {
    ranks = decide::quantile_ranks(c.spike_arg0, valid);
    for (int64_t k = tid; k < window; k += kDecideThreads) {
      const double v = a.spike[(1 + k) * a.s_spike];
      if (decide::isnan_(v)) continue;
      int64_t rank = 0;
      for (int64_t j = 0; j < window; ++j) {
        const double u = a.spike[(1 + j) * a.s_spike];
        rank += (u < v || (u == v && j < k)) ? 1 : 0;  // NaN compares false: not counted
      }
      // Ranks are distinct, so at most one thread writes each value.
      if (rank == ranks.below) quantile_below = v;
      if (rank == ranks.above) quantile_above = v;
    }
  }
  __syncthreads();
  if (tid != 0) return;

  // 4. Thread 0: the decision and every state update.
  decide::Inputs in{};
  in.nan_total = nan_total;
  in.inf_total = inf_total;
  in.finite_total = decide::finite_total(a.n, m, sum, c.p);
  in.has_max_norm = a.max_norm.kind != kAbsent;
  in.max_norm = in.has_max_norm ? read_scalar(a.max_norm) : 0.0;
  in.has_loss_scale = has_loss_scale;
  in.loss_scale = loss_scale;
  in.has_scaler_found = a.scaler_found.kind != kAbsent;
  in.scaler_found = in.has_scaler_found ? read_scalar(a.scaler_found) : 0.0;
  double* sp = a.spike;
  const int64_t ss = a.s_spike;
  if (c.spike == decide::kZScore) {
    in.spike_raw_limit = decide::zscore_raw_limit(sp[0], sp[ss], c.spike_arg0);
    in.spike_count = sp[2 * ss];
  } else if (c.spike == decide::kPercentile) {
    in.spike_raw_limit = valid > 0 ? decide::quantile_value(valid, quantile_below, quantile_above, ranks.weight)
                                   : decide::nan();
    in.spike_count = sp[0];
  }
  const decide::Decision d = decide::decide(c, in);
  decide::record(c, d, {sp, ss, a.counters, a.s_counters, a.history, a.s_hist0, a.s_hist1, a.hist_rows},
                 {a.scalars, a.found_inf, a.multiplier, a.grad_scale, a.pre_scale});
}

ScalarRef scalar_ref(const std::optional<at::Tensor>& t) {
  if (!t) return {nullptr, kAbsent};
  switch (t->scalar_type()) {
    case at::kDouble: return {t->const_data_ptr(), kF64};
    case at::kFloat: return {t->const_data_ptr(), kF32};
    case at::kHalf: return {t->const_data_ptr(), kF16};
    default: return {t->const_data_ptr(), kBF16};  // the checks admit these four
  }
}

using decide::OptTensor;

decide::Outputs guard_decide_cuda(const at::Tensor& acc, const at::Tensor& nan_count, const at::Tensor& inf_count,
                                  const at::Tensor& amax, const OptTensor& index, const OptTensor& max_norm,
                                  const OptTensor& loss_scale, const OptTensor& scaler_found,
                                  const OptTensor& counters, const OptTensor& layer_nonfinite,
                                  const OptTensor& layer_max_norm, const OptTensor& spike_state,
                                  const OptTensor& history, double norm_type, std::optional<double> max_norm_value,
                                  c10::string_view mode, c10::string_view spike, at::ArrayRef<double> spike_args,
                                  bool double_out) {
  decide::check_guard_decide_args(acc, nan_count, inf_count, amax, index, max_norm, loss_scale, scaler_found,
                                  counters, layer_nonfinite, layer_max_norm, spike_state, history, norm_type, mode,
                                  spike, spike_args);
  const c10::cuda::CUDAGuard guard(acc.device());
  require_kernel_image();
  const bool amp = loss_scale.has_value() || scaler_found.has_value();
  DecideArgs a{};
  a.cfg = decide::make_guard_decide_config(amp, max_norm.has_value(), norm_type, max_norm_value, mode, spike,
                                           spike_args, double_out);
  const int64_t n = acc.size(0);
  const auto opts = acc.options();
  const auto out_dtype = double_out ? at::kDouble : at::kFloat;
  at::Tensor norms = at::empty({n}, opts.dtype(out_dtype));
  at::Tensor amax_out = at::empty({n}, opts.dtype(out_dtype));
  at::Tensor scalars = at::empty({9}, opts.dtype(at::kDouble));
  at::Tensor found_inf = at::empty({}, opts.dtype(at::kFloat));
  at::Tensor multiplier = at::empty({}, opts.dtype(a.cfg.basis_double ? at::kDouble : at::kFloat));
  at::Tensor grad_scale = at::empty({}, opts.dtype(at::kFloat));
  at::Tensor pre_scale = at::empty({}, opts.dtype(at::kFloat));

  a.acc = acc.const_data_ptr<double>();
  a.nan = nan_count.const_data_ptr<int64_t>();
  a.inf = inf_count.const_data_ptr<int64_t>();
  a.amax = amax.const_data_ptr<double>();
  a.s_acc = acc.stride(0);
  a.s_nan = nan_count.stride(0);
  a.s_inf = inf_count.stride(0);
  a.s_amax = amax.stride(0);
  a.n = n;
  if (index) {
    a.index = index->const_data_ptr<int64_t>();
    a.s_index = index->stride(0);
  }
  a.max_norm = scalar_ref(max_norm);
  a.loss_scale = scalar_ref(loss_scale);
  a.scaler_found = scalar_ref(scaler_found);
  if (counters) {
    a.counters = counters->mutable_data_ptr<int64_t>();
    a.s_counters = counters->stride(0);
  }
  if (layer_nonfinite) {
    a.layer_nonfinite = layer_nonfinite->mutable_data_ptr<int64_t>();
    a.layer_max_norm = layer_max_norm->mutable_data_ptr<double>();
    a.s_lnf = layer_nonfinite->stride(0);
    a.s_lmn = layer_max_norm->stride(0);
    a.layers = layer_nonfinite->size(0);
  }
  if (a.cfg.spike != decide::kNone) {
    a.spike = spike_state->mutable_data_ptr<double>();
    a.s_spike = spike_state->stride(0);
  }
  if (history) {
    a.history = history->mutable_data_ptr<double>();
    a.s_hist0 = history->stride(0);
    a.s_hist1 = history->stride(1);
    a.hist_rows = history->size(0);
  }
  a.norms = norms.mutable_data_ptr();
  a.amax_out = amax_out.mutable_data_ptr();
  a.scalars = scalars.mutable_data_ptr<double>();
  a.found_inf = found_inf.mutable_data_ptr<float>();
  a.multiplier = multiplier.mutable_data_ptr();
  a.grad_scale = grad_scale.mutable_data_ptr<float>();
  a.pre_scale = pre_scale.mutable_data_ptr<float>();

  guard_decide_kernel<<<1, kDecideThreads, 0, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {norms, amax_out, scalars, found_inf, multiplier, grad_scale, pre_scale};
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(gradguard, CUDA, m) { m.impl("guard_decide", &cuda::guard_decide_cuda); }

}  // namespace gradguard
