// The scalar math of gradguard::guard_decide, shared by the CPU and the CUDA kernel so that the
// two cannot drift apart. gradguard/reference/decide.py is the specification: every function
// here mirrors one step of it, in float64, with a value rounded to its result dtype (float32 and
// back, `round_to`) exactly where the reference calls `_round`.
//
// Arithmetic goes through mul/add/sub/div: on the device they are the _rn intrinsics, which nvcc
// never contracts into an FMA (it does contract a plain `a + w * b` by default), so the device
// rounds each step as the reference's separate tensor ops do; on the host, no_contract does the
// same. Where torch itself rounds once (lerp), fma_ says so.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define GG_HD __host__ __device__ __forceinline__
#else
#define GG_HD inline
#endif

namespace gradguard {
namespace decide {

enum Mode : int { kSkip = 0, kZero = 1, kRaise = 2, kIgnore = 3 };
enum Spike : int { kNone = 0, kZScore = 1, kPercentile = 2 };

// A host target with FMA (aarch64 always, x86 built with -mfma) lets gcc contract a * b + c into
// one rounding (its default -ffp-contract=fast; on aarch64 it did, 13 times in this file's
// callers): the empty asm makes a product opaque, so it is rounded on its own, as the reference's
// separate tensor ops round it.
inline double no_contract(double x) {
#if defined(__FP_FAST_FMA) && defined(__aarch64__)
  __asm__("" : "+w"(x));
#elif defined(__FP_FAST_FMA) && defined(__x86_64__)
  __asm__("" : "+x"(x));
#endif
  return x;
}

GG_HD double mul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return no_contract(a * b);
#endif
}
GG_HD double add(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
GG_HD double sub(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
GG_HD double div(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

GG_HD double inf() { return std::numeric_limits<double>::infinity(); }
GG_HD double nan() { return std::numeric_limits<double>::quiet_NaN(); }
GG_HD bool isnan_(double x) { return x != x; }
GG_HD bool isinf_(double x) { return x == inf() || x == -inf(); }

// torch.minimum / torch.maximum / torch.max: a NaN operand gives NaN.
GG_HD double min_nan(double a, double b) { return isnan_(a) ? a : (isnan_(b) ? b : (b < a ? b : a)); }
GG_HD double max_nan(double a, double b) { return isnan_(a) ? a : (isnan_(b) ? b : (b > a ? b : a)); }

// The value a result of dtype float32 (or float64 when `as_double`) holds: `_round`.
GG_HD double round_to(double x, bool as_double) { return as_double ? x : static_cast<double>(static_cast<float>(x)); }

// Tensor.pow(e) for a scalar e as torch computes it: exponents 2 and 3 are products, 0.5 a
// square root (the special cases of its pow kernel), anything else pow.
GG_HD double pow_(double x, double e) {
  if (e == 2.0) return mul(x, x);
  if (e == 3.0) return mul(mul(x, x), x);
  if (e == 0.5) return ::sqrt(x);
  return ::pow(x, e);
}

// `_root`: acc^(1/p).
GG_HD double root(double acc, double p) {
  if (isinf_(p) || p == 1.0) return acc;
  if (p == 2.0) return ::sqrt(acc);
  return pow_(acc, div(1.0, p));
}

// `_scaled_root`: scale * acc^(1/p). For p far below 1, acc^(1/p) alone can pass double's range
// where the product does not (2,000 elements of 1e-200 at p = 0.01: 2000^100 is inf, the norm
// 1.3e130): there (scale^p * acc)^(1/p), whose factor scale^p lies within 2^(+-1075 p). acc is
// a sum of terms <= 1, so acc^(1/p) <= acc for p >= 1, and only such p take the second form.
GG_HD double scaled_root(double scale, double acc, double p) {
  const double r = root(acc, p);
  if (isinf_(r) && !isinf_(acc)) return pow_(mul(pow_(scale, p), acc), div(1.0, p));
  return mul(scale, r);
}

// One tensor's norm, NaN/inf marked (norms64 of the reference), before the loss-scale division.
GG_HD double tensor_norm(double acc, double amax, int64_t nan_count, int64_t inf_count, double p) {
  if (nan_count > 0) return nan();
  if (inf_count > 0) return inf();
  return scaled_root(amax, acc, p);
}

// One term of `_total`'s sum: acc rescaled from the tensor's amax to the largest one, m.
GG_HD double total_term(double acc, double amax, double m, double p) {
  const double w = div(amax, m > 0 ? m : 1.0);
  return mul(acc, p == 1.0 ? w : pow_(w, p));
}

// `_total` from the largest amax m and the sum of total_term (n: the number of tensors).
GG_HD double finite_total(int64_t n, double m, double sum, double p) {
  if (n == 0) return 0.0;
  if (isinf_(p)) return m;
  return scaled_root(m, sum, p);
}

// torch.remainder of floats and of integers: the result has the divisor's sign.
GG_HD double remainder_(double a, double b) {
  double r = ::fmod(a, b);
  if (r != 0 && ((b < 0) != (r < 0))) r = add(r, b);
  return r;
}
GG_HD int64_t remainder_(int64_t a, int64_t b) {
  int64_t r = a % b;
  if (r != 0 && ((b < 0) != (r < 0))) r += b;
  return r;
}

// a * b + c rounded once: torch's lerp is an FMA on every path (the CPU's vectorized kernel
// calls fmadd; its scalar kernel, built with FMA enabled, and nvcc contract the expression).
GG_HD double fma_(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// torch.lerp(a, b, w) as torch computes it: w * (b - a) + a for |w| < 0.5, else
// (w - 1) * (b - a) + b, each one FMA ((w - 1) is exactly -(1 - w)). Separate roundings differed
// from torch.nanquantile by 1 ulp for 39 of 3,000 random windows.
GG_HD double lerp_(double a, double b, double w) {
  const double d = sub(b, a);
  return (w < 0 ? -w : w) < 0.5 ? fma_(w, d, a) : fma_(sub(w, 1.0), d, b);
}

// torch.nanquantile(window, q) (linear): the ranks of the two values it interpolates, among the
// `valid` non-NaN values sorted ascending, and the weight; valid == 0 gives NaN (see below).
struct QuantileRanks {
  int64_t below;
  int64_t above;
  double weight;
};
GG_HD QuantileRanks quantile_ranks(double q, int64_t valid) {
  double rank = mul(q, static_cast<double>(valid - 1));
  if (rank < 0) rank = 0;
  const int64_t below = static_cast<int64_t>(rank);
  return {below, static_cast<int64_t>(::ceil(rank)), sub(rank, static_cast<double>(below))};
}
GG_HD double quantile_value(int64_t valid, double v_below, double v_above, double weight) {
  return valid == 0 ? nan() : lerp_(v_below, v_above, weight);
}

// ZScore's limit before the warm-up / basis gate: mean + z * std.
GG_HD double zscore_raw_limit(double mean, double var, double z) { return add(mean, mul(z, ::sqrt(var))); }

// The step's configuration: the op's non-tensor arguments, resolved once on the host.
struct Config {
  double p;
  int mode;           // "skip" when a GradScaler is given (amp)
  int spike;
  bool out_double;    // double_out: norms and total in float64
  bool basis_double;  // clip basis, coef and multiplier in float64 ("zero" mode or double_out)
  bool clipping;      // any limit at all: max_norm, max_norm_value or a spike policy
  bool has_max_norm_value;
  double max_norm_value;
  double spike_arg0;  // zscore: z;     percentile: q
  double spike_arg1;  // zscore: alpha; percentile: window
  double spike_arg2;  // warm-up steps
};

// The step's reduced inputs: totals over the tensors and the 0-dim tensors' values.
struct Inputs {
  int64_t nan_total;
  int64_t inf_total;
  double finite_total;
  bool has_max_norm;
  double max_norm;
  bool has_loss_scale;
  double loss_scale;
  bool has_scaler_found;
  double scaler_found;
  double spike_raw_limit;  // zscore_raw_limit, or quantile_value of the window
  double spike_count;      // the policy's count of absorbed steps (its state[2] or state[0])
};

struct Decision {
  double total;        // total_norm as the result dtype holds it, divided by the loss scale
  double basis;        // the clip basis (float64 finite-only norm in "zero" mode)
  double spike_limit;  // the policy's limit for this step (inf while warming up or not exceeded)
  double coef;
  double multiplier;
  float grad_scale;
  float pre_scale;  // 1, or the clip coefficient where loss_scale / coef is past float32 (below)
  bool found;
  bool overflow;
  bool bad_scale;  // the loss scale is not positive, is inf, or its inverse overflows
  bool skipped;
  bool clipped;
};

GG_HD double inverse_scale(bool has_loss_scale, double loss_scale) {
  return has_loss_scale ? div(1.0, loss_scale) : 1.0;
}

// The decision: found_inf, total, clip coefficient, skip, multiplier and grad_scale.
GG_HD Decision decide(const Config& c, const Inputs& in) {
  Decision d;
  const double total64 = in.nan_total > 0 ? nan() : (in.inf_total > 0 ? inf() : in.finite_total);
  // The total as reported: unscaled, in the result dtype.
  d.total = round_to(mul(total64, inverse_scale(in.has_loss_scale, in.loss_scale)), c.out_double);
  // A finite norm too large for the result dtype is as bad as an Inf element: judged unscaled
  // (a scaled norm may overflow where the gradients' own does not). A loss scale that is not
  // positive, or whose inverse overflows float32 (a scale backed off to 0, or below ~3e-39), or
  // inf (inf * 0.5 stays inf), would turn the unscaled gradients into Inf/NaN: as bad. float32
  // whatever the multiplier's dtype, as GradScaler's own unscale_ takes the inverse: judged in a
  // float64 multiplier (a model with a float64 parameter), the step was taken and its float32
  // gradients multiplied by the inverse rounded to float32, inf.
  const bool bad_scale = in.has_loss_scale && !(in.loss_scale > 0.0 && !isinf_(in.loss_scale) &&
                                                 !isinf_(round_to(div(1.0, in.loss_scale), false)));
  d.bad_scale = bad_scale;
  d.found = (in.nan_total + in.inf_total) > 0 || isnan_(d.total) || isinf_(d.total) || bad_scale;
  d.overflow = in.has_scaler_found && in.scaler_found > 0;
  d.found = d.found || d.overflow;
  // A device max_norm that is negative or NaN (checked nowhere else: reading it would sync)
  // makes the step non-finite, and it is not a limit: in "zero" mode a coefficient from it would
  // be negative or NaN and would flip or destroy the gradients (a spike policy still clips).
  const bool bad_limit = in.has_max_norm && !(in.max_norm >= 0);
  d.found = d.found || bad_limit;
  const bool finite = !d.found;

  d.basis = c.mode == kZero ? in.finite_total : d.total;

  double limit = inf();
  if (c.has_max_norm_value) limit = min_nan(limit, c.max_norm_value);
  if (in.has_max_norm && !bad_limit) limit = min_nan(limit, in.max_norm);
  d.spike_limit = inf();
  if (c.spike != kNone) {
    // Only a norm above the limit is clipped: a norm on it (e.g. std 0) is left alone.
    const bool active = in.spike_count >= c.spike_arg2 && d.basis > in.spike_raw_limit;
    d.spike_limit = round_to(active ? in.spike_raw_limit : inf(), c.basis_double);
    limit = min_nan(limit, d.spike_limit);
  }
  if (c.clipping) {
    const double q = div(limit, add(d.basis, 1e-6));
    d.coef = round_to(isnan_(q) ? q : (q < 1.0 ? q : 1.0), c.basis_double);
    if (c.mode != kZero && !finite) d.coef = 1.0;
  } else {
    d.coef = 1.0;
  }
  d.skipped = (c.mode == kSkip || c.mode == kRaise) && !finite;
  d.clipped = d.coef < 1.0 && !d.skipped;
  const double ls = in.has_loss_scale ? in.loss_scale : 1.0;
  d.multiplier = round_to(div(d.coef, ls), c.basis_double);
  d.grad_scale = static_cast<float>(div(ls, d.coef));
  d.pre_scale = 1.0f;
  // A fused optimizer divides the gradients by grad_scale, a float32: a GradScaler scale grown to
  // 2^124 (~216k overflow-free steps) over a clip coefficient below 1/16 made it inf, and the
  // kernel zeroed every gradient of a step reported as clipped. There the coefficient is applied
  // first (GradGuard scales the gradients by pre_scale) and the kernel divides by the loss scale
  // alone. (Without a loss scale only max_norm=0 reaches inf: dividing by it zeroes, as asked.)
  if (in.has_loss_scale && isinf_(static_cast<double>(d.grad_scale)) && !isinf_(in.loss_scale)) {
    d.pre_scale = static_cast<float>(d.coef);
    d.grad_scale = static_cast<float>(ls);
  }
  return d;
}

// ZScore's state after a finite step: Welford's update during warm-up (weight 1/(n+1)), an EMA
// after (weight 1 - alpha), of the clipped basis x. A norm whose square or squared deviation from
// the mean passes double's range (float64 gradients, a norm near 1e154 or more) is not absorbed:
// the variance went inf, then NaN (inf - inf) at the next step, and the policy never clipped
// again; and such a first norm, absorbed as the mean, made every later deviation overflow.
GG_HD void zscore_update(double& mean, double& var, double& count, double x, double alpha, double warmup) {
  const bool warm = count < warmup;
  const double w = warm ? div(1.0, add(count, 1.0)) : sub(1.0, alpha);
  const double new_mean = add(mean, mul(w, sub(x, mean)));
  const double term = warm ? mul(sub(x, mean), sub(x, new_mean)) : mul(sub(x, new_mean), sub(x, new_mean));
  const double new_var = add(var, mul(w, sub(term, var)));
  if (isinf_(new_var) || isinf_(mul(x, x))) return;
  var = new_var;
  mean = new_mean;
  count = add(count, 1.0);
}

// Percentile's ring slot for this step's basis: count % window, or -1 where that is no slot
// (the reference's `arange == slot` then matches nothing).
GG_HD int64_t percentile_slot(double count, double window) {
  const double r = remainder_(count, window);
  return (r >= 0 && r < window) ? static_cast<int64_t>(r) : -1;
}

// The streak after this step: reset by a taken step, grown by a skipped one, left as it is by a
// GradScaler overflow (the scaler backs off instead) unless the scale has already backed off too
// far to unscale: a NaN that never goes away keeps the scaler's flag set on every step, and
// without this the streak never grew and max_consecutive_skips never fired.
GG_HD int64_t next_streak(int64_t streak, bool skipped, bool excused) {
  if (excused) return streak;
  return skipped ? streak + 1 : 0;
}

// Where record() writes: the guard's state (null where the op got none) and the four scalar
// outputs. Strides in elements.
struct StateRefs {
  double* spike;
  int64_t s_spike;
  int64_t* counters;
  int64_t s_counters;
  double* history;
  int64_t s_hist0, s_hist1, hist_rows;
};
struct ScalarOuts {
  // [9]: total, coef, found, skipped, overflow, streak, multiplier, clipped, and the history rows
  // written after this step (the step's number less the checkpoint offset; 0 without counters).
  double* scalars;
  float* found_inf;
  void* multiplier;  // double when c.basis_double, else float
  float* grad_scale;
  float* pre_scale;
};

// Everything the step writes after its decision: the spike policy's state (a finite step only),
// the counters and the history row, then the scalar outputs. One copy for the CPU kernel and
// the CUDA kernel's thread 0.
GG_HD void record(const Config& c, const Decision& d, const StateRefs& s, const ScalarOuts& o) {
  double* sp = s.spike;
  const int64_t ss = s.s_spike;
  // A step whose norm is 0 (no gradient at all: a frozen model, a checkpointer's state-creating
  // step) says nothing about the norms either: absorbed, a first 0 with warm-up 1 set the limit
  // to 0 for good (every later step clipped to 0, and the clipped 0 absorbed again).
  const bool absorb = !d.found && d.basis > 0.0;
  if (c.spike == kZScore && absorb) {
    zscore_update(sp[0], sp[ss], sp[2 * ss], min_nan(d.basis, d.spike_limit), c.spike_arg1, c.spike_arg2);
  } else if (c.spike == kPercentile && absorb) {
    const int64_t slot = percentile_slot(sp[0], c.spike_arg1);
    if (slot >= 0) sp[(1 + slot) * ss] = d.basis;
    sp[0] = add(sp[0], 1.0);
  }
  int64_t streak = d.skipped ? 1 : 0;
  int64_t rows = 0;
  if (s.counters != nullptr) {
    int64_t* cn = s.counters;
    const int64_t cs = s.s_counters;
    streak = next_streak(cn[3 * cs], d.skipped, d.overflow && !d.bad_scale);
    if (s.history != nullptr) {
      double* h = s.history + remainder_(cn[4 * cs], s.hist_rows) * s.s_hist0;
      h[0] = d.total;
      h[s.s_hist1] = d.coef;
      h[2 * s.s_hist1] = d.skipped ? 1.0 : 0.0;
    }
    cn[0] += d.skipped ? 1 : 0;
    cn[cs] += d.clipped ? 1 : 0;
    cn[2 * cs] += d.found ? 1 : 0;
    cn[3 * cs] = streak;
    cn[4 * cs] += 1;
    rows = cn[4 * cs];
  }
  double* out = o.scalars;
  out[0] = d.total;
  out[1] = d.coef;
  out[2] = d.found ? 1.0 : 0.0;
  out[3] = d.skipped ? 1.0 : 0.0;
  out[4] = d.overflow ? 1.0 : 0.0;
  out[5] = static_cast<double>(streak);
  out[6] = d.multiplier;
  out[7] = d.clipped ? 1.0 : 0.0;
  out[8] = static_cast<double>(rows);
  *o.found_inf = d.found ? 1.0f : 0.0f;
  if (c.basis_double) {
    *static_cast<double*>(o.multiplier) = d.multiplier;
  } else {
    *static_cast<float*>(o.multiplier) = static_cast<float>(d.multiplier);
  }
  *o.grad_scale = d.grad_scale;
  *o.pre_scale = d.pre_scale;
}

}  // namespace decide
}  // namespace gradguard
