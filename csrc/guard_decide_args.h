// Argument checks and configuration of gradguard::guard_decide, shared by the CPU and the CUDA
// bindings (two modules: neither can call into the other's object files). The checks are those
// of gradguard._ops._check_decide_args, in the same words, plus what the reference kernel raises
// on (a percentile q outside [0, 1] or an empty window).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/irange.h>

#include <cmath>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>

#include "guard_decide_math.h"

namespace gradguard {
namespace decide {

using OptTensor = std::optional<at::Tensor>;
using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline constexpr const char* kWhere = "gradguard.guard_decide";

// The Python spellings the fake kernel's messages use (torch.float64, (3,)), so both kernels
// report a bad argument in the same words.
inline std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return "torch.float64";
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline std::string py_shape(at::IntArrayRef s) {
  std::ostringstream o;
  o << "(";
  for (const auto i : c10::irange(s.size())) o << (i ? ", " : "") << s[i];
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

inline bool kernel_float(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// The value of a checked one-element tensor in host memory.
inline double read_one_host(const at::Tensor& t, const char* name) {
  const void* p = t.const_data_ptr();
  switch (t.scalar_type()) {
    case at::kDouble: return *static_cast<const double*>(p);
    case at::kFloat: return *static_cast<const float*>(p);
    case at::kHalf: return static_cast<float>(*static_cast<const at::Half*>(p));
    case at::kBFloat16: return static_cast<float>(*static_cast<const at::BFloat16*>(p));
    default: TORCH_CHECK(false, kWhere, ": `", name, "` has dtype ", t.scalar_type(), ", not float16, bfloat16, float32 or float64");
  }
}

// Every check raises before the kernel writes anything.
inline void check_guard_decide_args(const at::Tensor& acc, const at::Tensor& nan_count, const at::Tensor& inf_count,
                             const at::Tensor& amax, const OptTensor& index, const OptTensor& max_norm,
                             const OptTensor& loss_scale, const OptTensor& scaler_found, const OptTensor& counters,
                             const OptTensor& layer_nonfinite, const OptTensor& layer_max_norm,
                             const OptTensor& spike_state, const OptTensor& history, double norm_type,
                             c10::string_view mode, c10::string_view spike, at::ArrayRef<double> spike_args) {
  const int64_t n = acc.dim() == 1 ? acc.size(0) : -1;
  const std::pair<const char*, const at::Tensor*> per_tensor[] = {
      {"acc", &acc}, {"nan_count", &nan_count}, {"inf_count", &inf_count}, {"amax", &amax}};
  const at::ScalarType per_tensor_dtype[] = {at::kDouble, at::kLong, at::kLong, at::kDouble};
  for (const auto k : c10::irange(4)) {
    const at::Tensor& t = *per_tensor[k].second;
    TORCH_CHECK(t.dim() == 1 && t.size(0) == n && t.scalar_type() == per_tensor_dtype[k], kWhere, ": `",
                per_tensor[k].first, "` must be a ", py_dtype(per_tensor_dtype[k]),
                " tensor of shape [n] like `acc`, got ", py_dtype(t.scalar_type()), " ", py_shape(t.sizes()));
  }
  const at::Device dev = acc.device();
  const std::pair<const char*, const at::Tensor*> named[] = {
      {"nan_count", &nan_count}, {"inf_count", &inf_count}, {"amax", &amax},
      {"index", index ? &*index : nullptr}, {"max_norm", max_norm ? &*max_norm : nullptr},
      {"loss_scale", loss_scale ? &*loss_scale : nullptr}, {"scaler_found", scaler_found ? &*scaler_found : nullptr},
      {"counters", counters ? &*counters : nullptr},
      {"layer_nonfinite", layer_nonfinite ? &*layer_nonfinite : nullptr},
      {"layer_max_norm", layer_max_norm ? &*layer_max_norm : nullptr},
      {"spike_state", spike_state ? &*spike_state : nullptr}, {"history", history ? &*history : nullptr}};
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t == nullptr || t->device() == dev, kWhere, ": `", name, "` is on ", t->device(), " but `acc` is on ",
                dev, "; every tensor must be on one device");
  }
  const std::pair<const char*, const OptTensor*> scalars[] = {
      {"max_norm", &max_norm}, {"loss_scale", &loss_scale}, {"scaler_found", &scaler_found}};
  for (const auto& [name, t] : scalars) {
    TORCH_CHECK(!t->has_value() || ((*t)->numel() == 1 && (*t)->is_floating_point()), kWhere, ": `", name,
                "` must be a one-element floating-point tensor");
    // (The reference reads any floating dtype through .double(); the kernels read these four.)
    TORCH_CHECK(!t->has_value() || kernel_float((*t)->scalar_type()), kWhere, ": `", name, "` has dtype ",
                py_dtype((*t)->scalar_type()), "; the compiled kernels take float16, bfloat16, float32 or float64");
  }
  TORCH_CHECK(!counters || (counters->scalar_type() == at::kLong && counters->dim() == 1 && counters->size(0) == 5),
              kWhere, ": `counters` must be an int64 tensor of shape [5]");
  TORCH_CHECK(layer_nonfinite.has_value() == layer_max_norm.has_value(), kWhere,
              ": `layer_nonfinite` and `layer_max_norm` go together");
  if (layer_nonfinite) {
    TORCH_CHECK(layer_nonfinite->scalar_type() == at::kLong && layer_nonfinite->dim() == 1 &&
                    layer_max_norm->scalar_type() == at::kDouble && layer_max_norm->sizes() == layer_nonfinite->sizes(),
                kWhere, ": `layer_nonfinite` (int64 [P]) and `layer_max_norm` (float64 [P]) disagree");
    TORCH_CHECK(index || layer_nonfinite->size(0) == n, kWhere, ": without `index`, `layer_nonfinite` must have n = ",
                n, " entries");
  }
  if (index) {
    TORCH_CHECK(index->scalar_type() == at::kLong && index->dim() == 1 && index->size(0) == n, kWhere,
                ": `index` must be an int64 tensor of shape [n] = [", n, "]");
    TORCH_CHECK(layer_nonfinite.has_value(), kWhere, ": `index` needs `layer_nonfinite`");
  }
  TORCH_CHECK(!history || (history->scalar_type() == at::kDouble && history->dim() == 2 && history->size(1) == 3 &&
                           history->size(0) >= 1),
              kWhere, ": `history` must be a float64 tensor of shape [H, 3], H >= 1");
  TORCH_CHECK(!history || counters, kWhere, ": `history` needs `counters`");
  TORCH_CHECK(norm_type > 0, kWhere, ": `norm_type` must be > 0 or inf, got ", norm_type);
  TORCH_CHECK(mode == "skip" || mode == "zero" || mode == "raise" || mode == "ignore", kWhere,
              ": `nonfinite` must be one of ('skip', 'zero', 'raise', 'ignore')");
  TORCH_CHECK(spike == "none" || spike == "zscore" || spike == "percentile", kWhere,
              ": `spike` must be one of ('none', 'zscore', 'percentile')");
  if (spike != "none") {
    const std::string s(spike.data(), spike.size());
    TORCH_CHECK(spike_args.size() == 3 && spike_state && spike_state->scalar_type() == at::kDouble, kWhere,
                ": spike '", s, "' needs 3 `spike_args` and a float64 `spike_state`");
    if (spike == "percentile") {
      TORCH_CHECK(spike_args[0] >= 0 && spike_args[0] <= 1, kWhere,
                  ": spike 'percentile' needs `spike_args`[0] (q) in [0, 1], got ", spike_args[0]);
      // Bounded above so that the cast below is defined (1e20 made a negative shape): 2^40 ring
      // entries are 8 TB. gradguard/_ops.py checks the same for the reference and fake kernels.
      TORCH_CHECK(spike_args[1] >= 1 && spike_args[1] <= 1099511627776.0, kWhere,
                  ": spike 'percentile' needs `spike_args`[1] (window) >= 1 and <= 2^40, got ", spike_args[1]);
    }
    const int64_t size = spike == "zscore" ? 3 : 1 + static_cast<int64_t>(spike_args[1]);
    TORCH_CHECK(spike_state->dim() == 1 && spike_state->size(0) == size, kWhere, ": `spike_state` of '", s,
                "' must have shape [", size, "]");
  }
}

// The Config of the shared math from the op's non-tensor arguments.
inline Config make_guard_decide_config(bool amp, bool has_max_norm, double norm_type,
                                        std::optional<double> max_norm_value, c10::string_view mode,
                                        c10::string_view spike, at::ArrayRef<double> spike_args, bool double_out) {
  Config c{};
  c.p = norm_type;
  c.mode = amp ? kSkip
               : (mode == "skip" ? kSkip
                                 : mode == "zero" ? kZero : mode == "raise" ? kRaise : kIgnore);
  c.spike = spike == "zscore" ? kZScore : spike == "percentile" ? kPercentile : kNone;
  c.out_double = double_out;
  c.basis_double = double_out || c.mode == kZero;
  c.has_max_norm_value = max_norm_value.has_value();
  c.max_norm_value = max_norm_value.value_or(0.0);
  c.clipping = has_max_norm || c.has_max_norm_value || c.spike != kNone;
  if (c.spike != kNone) {
    c.spike_arg0 = spike_args[0];
    c.spike_arg1 = c.spike == kPercentile ? static_cast<double>(static_cast<int64_t>(spike_args[1]))
                                                  : spike_args[1];
    c.spike_arg2 = spike_args[2];
  }
  return c;
}

}  // namespace decide
}  // namespace gradguard
