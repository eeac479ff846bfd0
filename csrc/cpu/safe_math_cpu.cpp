// CPU kernels of the safe math ops (gradguard/_safe_math_ops.py has the schemas and semantics):
// clamp and math in one pass over memory, forward and backward, any layout, float16/bfloat16
// (computed in float, as torch does), float32, float64.
//
// Values must equal the eager composites bit for bit (torch.log(torch.clamp(x, min=eps)) etc.).
// torch's CPU log/exp/sqrt are MKL VML (float32/64) or Sleef (float16/bfloat16) routines that
// this library cannot call directly, and a different log (glibc, Sleef) differs from them in
// the last bit for ~10% of inputs. So the transcendental step is torch's own kernel, called on
// cache-sized blocks of the output, with passes over the block while it is in cache that keep
// the elements beyond the bound away from it and write math(bound) for them
// (clamped_math_kernel, safe_math_fixup.inc). Main memory sees one read of the input and one
// write of the output, as with the bare op; the backward kernels are plain fused loops (one read
// of each operand, one write).
//
// Layouts come from TensorIterator (broadcasting, views, 0-d, empty); the arithmetic row
// kernels (safe_math_loops.inc) are compiled for the default ISA and for avx2+fma and picked at
// run time, as in grad_stats_cpu.cpp, and so are the block passes (safe_math_fixup.inc), except
// where AVX2 intrinsics serve them (simd_avx2.h: float16/bfloat16, which gcc leaves scalar, and
// the counting overwrite of float32/float64).
//
// Refused with an error: dtypes other than float16/bfloat16/float32/float64 (the Python API
// promotes integers first), operands of different dtypes (but for safe_div's float16/bfloat16
// input by a 0-dim float32 divisor, torch.div by a number), an `out` of another dtype, and
// outputs that partially overlap an input.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/ExpandUtils.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorIterator.h>
#include <ATen/native/Resize.h>
#include <torch/library.h>

#include "cpu_isa.h"
#include "kernel_dtypes.h"
#include "safe_math_args.h"
#include "simd_avx2.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

namespace gradguard {
namespace {

using namespace safe_math_args;  // NOLINT: the shared argument rules

namespace isa_default {
#include "safe_math_fixup.inc"
#include "safe_math_loops.inc"
}  // namespace isa_default

#pragma GCC push_options
GG_TARGET_AVX2
namespace isa_avx2 {
#include "safe_math_fixup.inc"
#include "safe_math_loops.inc"
}  // namespace isa_avx2
#pragma GCC pop_options

const bool kHasAvx2 = cpu_has_avx2();

// The passes around torch's math over contiguous blocks (safe_math_fixup.inc), in the widest ISA
// copy this CPU runs, or the AVX2 loops of simd_avx2.h (float16/bfloat16; float32/float64 for
// Overwrite, which gcc's vectorized loop does not count well). Both return how
// many elements of x were beyond the bound (NaN never is).
// - Replace: dst = x beyond the bound ? value : x (value = the bound: the clamp).
// - Overwrite: dst = value where x is beyond the bound, dst untouched elsewhere.
enum class Pass { Replace, Overwrite };

template <Pass kPass, typename T>
int64_t block_pass(T* dst, const T* x, int64_t n, T bound, T value, bool is_min) {
#if GG_CPU_X86
  if constexpr (kIs16Bit<T>) {
    if (kHasAvx2) {
      constexpr bool kHalf = std::is_same_v<T, at::Half>;
      auto* d = reinterpret_cast<uint16_t*>(dst);
      const auto* xb = reinterpret_cast<const uint16_t*>(x);
      const uint16_t* src = kPass == Pass::Overwrite ? d : xb;
      const float b = static_cast<float>(bound);
      return is_min ? simd16::select_beyond<kHalf, true>(d, src, xb, n, b, value.x)
                    : simd16::select_beyond<kHalf, false>(d, src, xb, n, b, value.x);
    }
  }
  if constexpr (kPass == Pass::Overwrite && !kIs16Bit<T>) {
    if (kHasAvx2) {
      return is_min ? simdf::overwrite_beyond<true>(dst, x, n, bound, value)
                    : simdf::overwrite_beyond<false>(dst, x, n, bound, value);
    }
  }
#endif
#define GG_BLOCK_PASS(isa)                                                    \
  return kPass == Pass::Replace ? isa::replace_beyond_bound(dst, x, n, bound, value, is_min) \
                                : isa::overwrite_beyond_bound(dst, x, n, bound, value, is_min)
  if (kHasAvx2) GG_BLOCK_PASS(isa_avx2);
  GG_BLOCK_PASS(isa_default);
#undef GG_BLOCK_PASS
}

// Picks the ISA copy and the contiguous or strided instantiation of a row kernel.
#define GG_ROW(kernel, T, contig, ...)                                   \
  do {                                                                   \
    if (kHasAvx2) {                                                      \
      if (contig) isa_avx2::kernel<T, true>(__VA_ARGS__);                \
      else isa_avx2::kernel<T, false>(__VA_ARGS__);                      \
    } else {                                                             \
      if (contig) isa_default::kernel<T, true>(__VA_ARGS__);             \
      else isa_default::kernel<T, false>(__VA_ARGS__);                   \
    }                                                                    \
  } while (0)

// 256 KB blocks: the input block and its result stay in a core's L2 (1-2 MB) between torch's
// math kernel and our pass over the same block, and the per-block cost of calling torch's kernel
// (a few us) stays near 2% of the block's time.
constexpr int64_t kBlockBytes = int64_t(256) << 10;
// A contiguous row shorter than this is staged with its neighbours rather than handed to
// torch's kernel alone (a view of short rows would otherwise make one call per row).
constexpr int64_t kMinDirectRow = 4096;

enum class Math { Log, Exp, Sqrt };

void apply_math(Math math, void* dst, void* src, int64_t n, at::ScalarType dtype) {
  // Runs inside TensorIterator's parallel region, so torch's kernel stays on this thread.
  const auto opts = at::TensorOptions().dtype(dtype).device(at::kCPU);
  at::Tensor in = at::from_blob(src, {n}, opts);
  at::Tensor out = dst == src ? in : at::from_blob(dst, {n}, opts);
  switch (math) {
    case Math::Log: at::log_out(out, in); break;
    case Math::Exp: at::exp_out(out, in); break;
    case Math::Sqrt: at::sqrt_out(out, in); break;
  }
}

// Calls f(p, len, k) for the pieces of rows covering linear indices [begin, end) of a 2-D loop
// block (n0 elements per row): p are the operand pointers at the piece's start, k its offset
// from `begin`.
template <typename F>
void for_each_piece(char** data, const int64_t* strides, int ntensors, int64_t n0, int64_t begin, int64_t end, F&& f) {
  char* p[4];
  for (int64_t idx = begin; idx < end;) {
    const int64_t row = idx / n0, col = idx % n0;
    const int64_t len = std::min(n0 - col, end - idx);
    for (int t = 0; t < ntensors; ++t) p[t] = data[t] + row * strides[ntensors + t] + col * strides[t];
    f(p, len, idx - begin);
    idx += len;
  }
}

std::vector<char>& thread_buffer() {
  static thread_local std::vector<char> buf;
  return buf;
}

// The staged loop, for views and short rows: per block, stage(p, s, len, dst) writes the math's
// input into a thread-local buffer (p: operand pointers, s: their byte strides along the row),
// torch's math runs on it while it is in cache, and epilogue(p, s, len, src) consumes the result.
// Operand 0 is the output; when `result_is_output` and the block lies in one contiguous output
// row, the math writes that row directly and there is no epilogue.
template <typename T, typename Stage, typename Epilogue>
void staged_loop(char** data, const int64_t* strides, int64_t n0, int64_t n1, int nt, at::ScalarType dtype, Math math,
                 bool result_is_output, Stage stage, Epilogue epilogue) {
  auto& storage = thread_buffer();
  constexpr int64_t kBlock = kBlockBytes / sizeof(T);
  storage.resize(kBlockBytes);
  T* buf = reinterpret_cast<T*>(storage.data());
  const int64_t total = n0 * n1;
  for (int64_t b = 0; b < total; b += kBlock) {
    const int64_t e = std::min(total, b + kBlock);
    char* row_out = nullptr;
    for_each_piece(data, strides, nt, n0, b, e, [&](char** p, int64_t len, int64_t k) {
      if (k == 0) row_out = p[0];
      stage(p, strides, len, buf + k);
    });
    const bool one_row = b / n0 == (e - 1) / n0;
    if (result_is_output && one_row && strides[0] == static_cast<int64_t>(sizeof(T))) {
      apply_math(math, row_out, buf, e - b, dtype);
      continue;
    }
    apply_math(math, buf, buf, e - b, dtype);
    for_each_piece(data, strides, nt, n0, b, e,
                   [&](char** p, int64_t len, int64_t k) { epilogue(p, strides, len, buf + k); });
  }
}

// The plain loop over rows for kernels with no transcendental step.
template <typename F>
void rows_for_each(at::TensorIteratorBase& iter, F&& row) {
  const int nt = iter.ntensors();
  iter.for_each([&](char** data, const int64_t* strides, int64_t n0, int64_t n1) {
    char* p[5];
    for (int64_t j = 0; j < n1; ++j) {
      for (int t = 0; t < nt; ++t) p[t] = data[t] + j * strides[nt + t];
      row(p, strides, n0);
    }
  });
}

template <typename T>
inline int64_t elems(int64_t byte_stride) {
  return byte_stride / static_cast<int64_t>(sizeof(T));
}

template <typename T>
inline bool contiguous(const int64_t* strides, int n) {
  for (int t = 0; t < n; ++t) {
    if (strides[t] != static_cast<int64_t>(sizeof(T))) return false;
  }
  return true;
}

at::TensorIterator unary_iter(const at::Tensor& out, const at::Tensor& in) {
  return at::TensorIteratorConfig().add_output(out).add_const_input(in).check_all_same_dtype(true).build();
}

// ---- forward: log, exp, sqrt -------------------------------------------------------------------

// out = math(clamp(x)). Long contiguous rows take the direct path, block by block: torch's
// kernel computes math(x) from the input straight into the output, exactly as torch.log does
// (or, where many elements are beyond the bound, from the input with stand-ins for them), and a
// pass over the block while it is in cache writes math(bound) over those elements, the value the
// composite gives them (the same kernel on the same rounded bound). See safe_math_fixup.inc.
// Other rows are staged: clamped into a buffer, math applied there, copied out.
void clamped_math_kernel(const at::Tensor& out, const at::Tensor& input, Math math, double bound, bool is_min) {
  auto iter = unary_iter(out, input);
  const auto dtype = input.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gradguard_safe_unary_cpu", [&] {
    // Rounded to the dtype first, as torch.clamp does with its scalar bound.
    const scalar_t lim = static_cast<scalar_t>(bound);
    scalar_t lim_value = lim;
    apply_math(math, &lim_value, &lim_value, 1, dtype);
    constexpr int64_t kElem = sizeof(scalar_t);
    constexpr int64_t kBlock = kBlockBytes / kElem;
    // A value torch's math computes fast: log(1), sqrt(1), exp(0).
    const scalar_t stand_in = static_cast<scalar_t>(is_min ? 1.0 : 0.0);
    iter.for_each([&](char** data, const int64_t* strides, int64_t n0, int64_t n1) {
      // In place (out is the input) the last pass would compare math(x) against the bound: staged.
      const bool in_place = data[0] == data[1];
      if (strides[0] == kElem && strides[1] == kElem && n0 >= kMinDirectRow && !in_place) {
        bool many_beyond = false;
        for (int64_t j = 0; j < n1; ++j) {
          auto* o = reinterpret_cast<scalar_t*>(data[0] + j * strides[2]);
          auto* x = reinterpret_cast<scalar_t*>(data[1] + j * strides[3]);
          for (int64_t b = 0; b < n0; b += kBlock) {
            const int64_t len = std::min(kBlock, n0 - b);
            // See safe_math_fixup.inc: torch's math on the input itself unless the last block
            // had many elements beyond the bound.
            int64_t beyond;
            if (!many_beyond) {
              apply_math(math, o + b, x + b, len, dtype);
              beyond = block_pass<Pass::Overwrite>(o + b, x + b, len, lim, lim_value, is_min);
            } else {
              beyond = block_pass<Pass::Replace>(o + b, x + b, len, lim, stand_in, is_min);
              apply_math(math, o + b, o + b, len, dtype);
              if (beyond > 0) block_pass<Pass::Overwrite>(o + b, x + b, len, lim, lim_value, is_min);
            }
            many_beyond = beyond * 32 > len;
          }
        }
        return;
      }
      staged_loop<scalar_t>(
          data, strides, n0, n1, 2, dtype, math, /*result_is_output=*/true,
          [&](char** p, const int64_t* s, int64_t len, scalar_t* dst) {
            const auto* x = reinterpret_cast<const scalar_t*>(p[1]);
            const int64_t sx = elems<scalar_t>(s[1]);
            if (sx == 1) block_pass<Pass::Replace>(dst, x, len, lim, lim, is_min);  // the clamp
            else if (is_min) GG_ROW(clamp_min_row, scalar_t, false, dst, x, sx, len, lim);
            else GG_ROW(clamp_max_row, scalar_t, false, dst, x, sx, len, lim);
          },
          [&](char** p, const int64_t* s, int64_t len, const scalar_t* src) {
            const int64_t so = elems<scalar_t>(s[0]);
            GG_ROW(copy_row, scalar_t, so == 1, reinterpret_cast<scalar_t*>(p[0]), so, src, len);
          });
    });
  });
}

at::Tensor safe_log_cpu(const at::Tensor& input, double eps, bool straight_through) {
  check_float(input, "safe_log", "input");
  check_param(eps, "safe_log", "eps", true);
  check_bound_fits(eps, input.scalar_type(), "safe_log", "eps", true);
  check_on_kernel_device({{&input, "input"}}, "safe_log", at::kCPU);
  at::Tensor out = at::empty_like(input);
  clamped_math_kernel(out, input, Math::Log, eps, true);
  return out;
}

void safe_log_out_cpu(const at::Tensor& input, double eps, bool straight_through, at::Tensor& out) {
  check_float(input, "safe_log", "input");
  check_param(eps, "safe_log", "eps", true);
  check_bound_fits(eps, input.scalar_type(), "safe_log", "eps", true);
  const auto device = check_on_kernel_device({{&input, "input"}}, "safe_log", at::kCPU);
  prepare_out(out, input, input.sizes(), "safe_log", device, {input});
  write_out(out, {input}, [&](const at::Tensor& o) { clamped_math_kernel(o, input, Math::Log, eps, true); });
}

at::Tensor safe_exp_cpu(const at::Tensor& input, double max, bool straight_through) {
  check_float(input, "safe_exp", "input");
  check_param(max, "safe_exp", "max", false);
  check_bound_fits(max, input.scalar_type(), "safe_exp", "max", false);
  check_on_kernel_device({{&input, "input"}}, "safe_exp", at::kCPU);
  at::Tensor out = at::empty_like(input);
  clamped_math_kernel(out, input, Math::Exp, max, false);
  return out;
}

void safe_exp_out_cpu(const at::Tensor& input, double max, bool straight_through, at::Tensor& out) {
  check_float(input, "safe_exp", "input");
  check_param(max, "safe_exp", "max", false);
  check_bound_fits(max, input.scalar_type(), "safe_exp", "max", false);
  const auto device = check_on_kernel_device({{&input, "input"}}, "safe_exp", at::kCPU);
  prepare_out(out, input, input.sizes(), "safe_exp", device, {input});
  write_out(out, {input}, [&](const at::Tensor& o) { clamped_math_kernel(o, input, Math::Exp, max, false); });
}

at::Tensor safe_sqrt_cpu(const at::Tensor& input, double eps) {
  check_float(input, "safe_sqrt", "input");
  check_param(eps, "safe_sqrt", "eps", true);
  check_bound_fits(eps, input.scalar_type(), "safe_sqrt", "eps", true);
  check_on_kernel_device({{&input, "input"}}, "safe_sqrt", at::kCPU);
  at::Tensor out = at::empty_like(input);
  clamped_math_kernel(out, input, Math::Sqrt, 0.0, true);
  return out;
}

void safe_sqrt_out_cpu(const at::Tensor& input, double eps, at::Tensor& out) {
  check_float(input, "safe_sqrt", "input");
  check_param(eps, "safe_sqrt", "eps", true);
  check_bound_fits(eps, input.scalar_type(), "safe_sqrt", "eps", true);
  const auto device = check_on_kernel_device({{&input, "input"}}, "safe_sqrt", at::kCPU);
  prepare_out(out, input, input.sizes(), "safe_sqrt", device, {input});
  write_out(out, {input}, [&](const at::Tensor& o) { clamped_math_kernel(o, input, Math::Sqrt, 0.0, true); });
}

// ---- backward: log, exp, sqrt ------------------------------------------------------------------

at::Tensor safe_log_backward_cpu(const at::Tensor& grad, const at::Tensor& input, double eps, bool straight_through) {
  check_float(grad, "safe_log_backward", "grad");
  check_backward_operand(input, grad, "safe_log_backward", "input");
  check_on_kernel_device({{&grad, "grad"}, {&input, "input"}}, "safe_log_backward", at::kCPU);
  check_backward_eps(eps, "safe_log_backward");
  at::Tensor out = at::empty_like(input);
  auto iter = at::TensorIteratorConfig().add_output(out).add_const_input(grad).add_const_input(input).build();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "gradguard_safe_log_backward_cpu", [&] {
    const scalar_t e = static_cast<scalar_t>(eps);
    rows_for_each(iter, [&](char** p, const int64_t* s, int64_t n) {
      GG_ROW(log_backward_row, scalar_t, contiguous<scalar_t>(s, 3), reinterpret_cast<scalar_t*>(p[0]),
             elems<scalar_t>(s[0]), reinterpret_cast<const scalar_t*>(p[1]), elems<scalar_t>(s[1]),
             reinterpret_cast<const scalar_t*>(p[2]), elems<scalar_t>(s[2]), n, e, straight_through);
    });
  });
  return out;
}

at::Tensor safe_exp_backward_cpu(const at::Tensor& grad, const at::Tensor& result, const at::Tensor& input, double max,
                                 bool straight_through) {
  check_float(grad, "safe_exp_backward", "grad");
  check_backward_operand(result, grad, "safe_exp_backward", "result");
  check_backward_operand(input, grad, "safe_exp_backward", "input");
  check_on_kernel_device({{&grad, "grad"}, {&result, "result"}, {&input, "input"}}, "safe_exp_backward", at::kCPU);
  at::Tensor out = at::empty_like(input);
  auto iter = at::TensorIteratorConfig()
                  .add_output(out)
                  .add_const_input(grad)
                  .add_const_input(result)
                  .add_const_input(input)
                  .build();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "gradguard_safe_exp_backward_cpu", [&] {
    const scalar_t m = static_cast<scalar_t>(max);
    rows_for_each(iter, [&](char** p, const int64_t* s, int64_t n) {
      GG_ROW(exp_backward_row, scalar_t, contiguous<scalar_t>(s, 4), reinterpret_cast<scalar_t*>(p[0]),
             elems<scalar_t>(s[0]), reinterpret_cast<const scalar_t*>(p[1]), elems<scalar_t>(s[1]),
             reinterpret_cast<const scalar_t*>(p[2]), elems<scalar_t>(s[2]), reinterpret_cast<const scalar_t*>(p[3]),
             elems<scalar_t>(s[3]), n, m, straight_through);
    });
  });
  return out;
}

at::Tensor safe_sqrt_backward_cpu(const at::Tensor& grad, const at::Tensor& input, double eps) {
  check_float(grad, "safe_sqrt_backward", "grad");
  check_backward_operand(input, grad, "safe_sqrt_backward", "input");
  check_on_kernel_device({{&grad, "grad"}, {&input, "input"}}, "safe_sqrt_backward", at::kCPU);
  check_backward_eps(eps, "safe_sqrt_backward");
  at::Tensor out = at::empty_like(input);
  auto iter = at::TensorIteratorConfig().add_output(out).add_const_input(grad).add_const_input(input).build();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "gradguard_safe_sqrt_bwd_cpu", [&] {
    const scalar_t e = static_cast<scalar_t>(eps);
    const scalar_t zero = static_cast<scalar_t>(0);
    // The forward's values are recomputed (same clamp, same torch sqrt) rather than saved.
    iter.for_each([&](char** data, const int64_t* strides, int64_t n0, int64_t n1) {
      staged_loop<scalar_t>(
          data, strides, n0, n1, 3, grad.scalar_type(), Math::Sqrt, /*result_is_output=*/false,
          [&](char** p, const int64_t* s, int64_t len, scalar_t* dst) {
            const int64_t sx = elems<scalar_t>(s[2]);
            const auto* x = reinterpret_cast<const scalar_t*>(p[2]);
            if (sx == 1) block_pass<Pass::Replace>(dst, x, len, zero, zero, true);  // the clamp
            else GG_ROW(clamp_min_row, scalar_t, false, dst, x, sx, len, zero);
          },
          [&](char** p, const int64_t* s, int64_t len, const scalar_t* root) {
            GG_ROW(sqrt_backward_row, scalar_t, contiguous<scalar_t>(s, 3), reinterpret_cast<scalar_t*>(p[0]),
                   elems<scalar_t>(s[0]), reinterpret_cast<const scalar_t*>(p[1]), elems<scalar_t>(s[1]),
                   reinterpret_cast<const scalar_t*>(p[2]), elems<scalar_t>(s[2]), root, len, e);
          });
    });
  });
  return out;
}

// ---- div ---------------------------------------------------------------------------------------

// Rows whose float16/bfloat16 operands simd16's division loops take: every operand contiguous,
// but those in `broadcast` (a bit per operand: the divisor, and the backward's incoming gradient)
// may also have stride 0.
template <typename T>
inline bool simd16_div_row(const int64_t* s, int n, unsigned broadcast) {
  if constexpr (!kIs16Bit<T>) {
    return false;
  } else {
    if (!kHasAvx2) return false;
    for (int t = 0; t < n; ++t) {
      if (s[t] != static_cast<int64_t>(sizeof(T)) && !(s[t] == 0 && (broadcast >> t & 1u))) return false;
    }
    return true;
  }
}

void div_kernel(const at::Tensor& out, const at::Tensor& input, const at::Tensor& other, double eps, double fill) {
  auto iter = at::TensorIteratorConfig().add_output(out).add_const_input(input).add_const_input(other).build();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "gradguard_safe_div_cpu", [&] {
    const scalar_t e = static_cast<scalar_t>(eps), f = static_cast<scalar_t>(fill);
    rows_for_each(iter, [&](char** p, const int64_t* s, int64_t n) {
#if GG_CPU_X86
      if (simd16_div_row<scalar_t>(s, 3, 0b100u)) {
        constexpr bool kHalf = std::is_same_v<scalar_t, at::Half>;
        auto* o = reinterpret_cast<uint16_t*>(p[0]);
        const auto* a = reinterpret_cast<const uint16_t*>(p[1]);
        const auto* b = reinterpret_cast<const uint16_t*>(p[2]);
        const float ef = static_cast<float>(e), ff = static_cast<float>(f);
        if (s[2] == 0) simd16::div_tensors<kHalf, false>(o, a, nullptr, simd16::to_float<kHalf>(b[0]), n, ef, ff);
        else simd16::div_tensors<kHalf, true>(o, a, b, 0.0f, n, ef, ff);
        return;
      }
#endif
      GG_ROW(div_row, scalar_t, contiguous<scalar_t>(s, 3), reinterpret_cast<scalar_t*>(p[0]), elems<scalar_t>(s[0]),
             reinterpret_cast<const scalar_t*>(p[1]), elems<scalar_t>(s[1]), reinterpret_cast<const scalar_t*>(p[2]),
             elems<scalar_t>(s[2]), n, e, f);
    });
  });
}

// A float16/bfloat16 input by a 0-dim float32 divisor (divides_by_float32: torch.div by a number),
// in one pass: each element widened, divided in float32, rounded once. The divisor is read here
// (a CPU tensor: no sync), and the guard is one decision for the whole tensor.
void div_by_float32_kernel(const at::Tensor& out, const at::Tensor& input, const at::Tensor& other, double eps,
                           double fill) {
  auto iter = unary_iter(out, input);
  const float b = other.item<float>();
  const bool guard = std::abs(b) <= static_cast<float>(eps);
  AT_DISPATCH_REDUCED_FLOATING_TYPES(input.scalar_type(), "gradguard_safe_div_by_float32_cpu", [&] {
    // Through float, as the float32 division's fill was before its result was rounded.
    const scalar_t f = static_cast<scalar_t>(static_cast<float>(fill));
    rows_for_each(iter, [&](char** p, const int64_t* s, int64_t n) {
      const bool contig = contiguous<scalar_t>(s, 2);
#if GG_CPU_X86
      if (kHasAvx2 && contig) {
        simd16::div_tensors<std::is_same_v<scalar_t, at::Half>, false>(
            reinterpret_cast<uint16_t*>(p[0]), reinterpret_cast<const uint16_t*>(p[1]), nullptr, b, n,
            static_cast<float>(eps), static_cast<float>(f));
        return;
      }
#endif
      GG_ROW(div_by_float_row, scalar_t, contig, reinterpret_cast<scalar_t*>(p[0]), elems<scalar_t>(s[0]),
             reinterpret_cast<const scalar_t*>(p[1]), elems<scalar_t>(s[1]), n, b, guard, f);
    });
  });
}

void any_div_kernel(const at::Tensor& out, const at::Tensor& input, const at::Tensor& other, double eps, double fill) {
  if (input.scalar_type() != other.scalar_type()) div_by_float32_kernel(out, input, other, eps, fill);
  else div_kernel(out, input, other, eps, fill);
}

at::Tensor safe_div_cpu(const at::Tensor& input, const at::Tensor& other, double eps, double fill) {
  check_div_args(input, other, eps, "safe_div", at::kCPU, /*float32_divisor=*/true);
  check_bound_fits(fill, input.scalar_type(), "safe_div", "fill", false);
  at::Tensor out = empty_broadcast(input, other);
  any_div_kernel(out, input, other, eps, fill);
  return out;
}

void safe_div_out_cpu(const at::Tensor& input, const at::Tensor& other, double eps, double fill, at::Tensor& out) {
  check_div_args(input, other, eps, "safe_div", at::kCPU, /*float32_divisor=*/true);
  check_bound_fits(fill, input.scalar_type(), "safe_div", "fill", false);
  prepare_out(out, input, at::infer_size(input.sizes(), other.sizes()), "safe_div", div_device(input, other),
              {input, other});
  write_out(out, {input, other}, [&](const at::Tensor& o) { any_div_kernel(o, input, other, eps, fill); });
}

// Both gradients at the broadcast shape, in one pass; autograd reduces them to each operand's
// shape (sum_to_size), exactly as it does for torch.div.
std::tuple<at::Tensor, at::Tensor> safe_div_backward_cpu(const at::Tensor& grad, const at::Tensor& input,
                                                         const at::Tensor& other, double eps) {
  check_div_args(input, other, eps, "safe_div_backward", at::kCPU);
  check_device(grad, div_device(input, other), "safe_div_backward", "grad", false);
  check_same_dtype(grad, input, "safe_div_backward", "grad", "input");
  const auto shape = at::infer_size(input.sizes(), other.sizes());
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(shape), "gradguard.safe_div_backward: `grad` has shape ", grad.sizes(),
              " but input and other broadcast to ", at::IntArrayRef(shape));
  at::Tensor grad_input = empty_broadcast(input, other);
  at::Tensor grad_other = empty_broadcast(input, other);
  auto iter = at::TensorIteratorConfig()
                  .add_output(grad_input)
                  .add_output(grad_other)
                  .add_const_input(grad)
                  .add_const_input(input)
                  .add_const_input(other)
                  .build();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "gradguard_safe_div_backward_cpu", [&] {
    const scalar_t e = static_cast<scalar_t>(eps);
    rows_for_each(iter, [&](char** p, const int64_t* s, int64_t n) {
#if GG_CPU_X86
      if (simd16_div_row<scalar_t>(s, 5, 0b10100u)) {
        constexpr bool kHalf = std::is_same_v<scalar_t, at::Half>;
        auto* ga = reinterpret_cast<uint16_t*>(p[0]);
        auto* gb = reinterpret_cast<uint16_t*>(p[1]);
        const auto* g = reinterpret_cast<const uint16_t*>(p[2]);
        const auto* a = reinterpret_cast<const uint16_t*>(p[3]);
        const auto* b = reinterpret_cast<const uint16_t*>(p[4]);
        const float ef = static_cast<float>(e);
        if (s[2] == 0 && s[4] == 0) simd16::div_backward_tensors<kHalf, false, false>(ga, gb, g, a, b, n, ef);
        else if (s[2] == 0) simd16::div_backward_tensors<kHalf, false, true>(ga, gb, g, a, b, n, ef);
        else if (s[4] == 0) simd16::div_backward_tensors<kHalf, true, false>(ga, gb, g, a, b, n, ef);
        else simd16::div_backward_tensors<kHalf, true, true>(ga, gb, g, a, b, n, ef);
        return;
      }
#endif
      GG_ROW(div_backward_row, scalar_t, contiguous<scalar_t>(s, 5), reinterpret_cast<scalar_t*>(p[0]),
             elems<scalar_t>(s[0]), reinterpret_cast<scalar_t*>(p[1]), elems<scalar_t>(s[1]),
             reinterpret_cast<const scalar_t*>(p[2]), elems<scalar_t>(s[2]), reinterpret_cast<const scalar_t*>(p[3]),
             elems<scalar_t>(s[3]), reinterpret_cast<const scalar_t*>(p[4]), elems<scalar_t>(s[4]), n, e);
    });
  });
  return {grad_input, grad_other};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradguard, CPU, m) {
  m.impl("safe_log", &safe_log_cpu);
  m.impl("safe_log.out", &safe_log_out_cpu);
  m.impl("safe_log_backward", &safe_log_backward_cpu);
  m.impl("safe_exp", &safe_exp_cpu);
  m.impl("safe_exp.out", &safe_exp_out_cpu);
  m.impl("safe_exp_backward", &safe_exp_backward_cpu);
  m.impl("safe_sqrt", &safe_sqrt_cpu);
  m.impl("safe_sqrt.out", &safe_sqrt_out_cpu);
  m.impl("safe_sqrt_backward", &safe_sqrt_backward_cpu);
  m.impl("safe_div", &safe_div_cpu);
  m.impl("safe_div.out", &safe_div_out_cpu);
  m.impl("safe_div_backward", &safe_div_backward_cpu);
}

}  // namespace gradguard
