// Host-side helpers of GradGuard.step() for long parameter lists (methods of gradguard._C, not
// dispatcher ops: they touch Python objects and autograd metadata, no tensor data).
//
// Why in C++: every Python read of `p.grad` or `g._version` goes through torch's attribute
// getters (a __torch_function__ check, a wrap), ~60 ns each, and a torch.ops call converts its
// tensor list to IValues and back; with 1,000 parameters reading the grads cost ~65 us a step,
// the stats op's call ~90 us and the hygiene tracker's weakref marks ~210 us, more than the whole
// rest of the guard. Here a list crosses into C++ once (~10 ns per tensor), the op is called
// typed, and the rest is plain pointer work. gradguard/_host.py holds the pure-Python versions
// (the extension missing or disabled) with the same behaviour.
#include <Python.h>

#include <ATen/EmptyTensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/version.h>

#include "adam_readonly_grads.h"

#include <algorithm>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <utility>
#include <unordered_map>
#include <vector>

namespace gradguard {
namespace {

// The tensor at list[i], or nullptr (with a TypeError set) when it is not a tensor.
const at::Tensor* tensor_at(PyObject* list, Py_ssize_t i, const char* where) {
  PyObject* item = PyList_GET_ITEM(list, i);
  if (!THPVariable_Check(item)) {
    PyErr_Format(PyExc_TypeError, "gradguard._C.%s: item %zd is %s, not a tensor", where, i, Py_TYPE(item)->tp_name);
    return nullptr;
  }
  return &THPVariable_Unpack(item);
}

bool check_list(PyObject* obj, const char* where) {
  if (PyList_Check(obj)) return true;
  PyErr_Format(PyExc_TypeError, "gradguard._C.%s: expected a list, got %s", where, Py_TYPE(obj)->tp_name);
  return false;
}

using Stats = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// at::Tensor handles that do not own a reference: for tensors that something else (a Python
// object the caller holds) keeps alive while the handles are used.
class BorrowedTensors {
 public:
  explicit BorrowedTensors(Py_ssize_t n) { ts_.reserve(static_cast<size_t>(n)); }
  BorrowedTensors(const BorrowedTensors&) = delete;
  BorrowedTensors& operator=(const BorrowedTensors&) = delete;
  ~BorrowedTensors() {
    for (auto& t : ts_) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
  }
  void push_back(const at::Tensor& t) { ts_.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(t)); }
  const std::vector<at::Tensor>& get() const { return ts_; }

 private:
  std::vector<at::Tensor> ts_;
};

// Holds off Python's cyclic garbage collector for a scope. Any allocation of a Python object can
// start a collection, and a collection runs arbitrary Python (finalizers, gc.callbacks, weakref
// callbacks) that could empty a list this code is indexing or set p.grad = None under a reference
// it holds. With the collector paused, nothing but this code runs until the scope ends.
class GcPaused {
 public:
  GcPaused() : was_enabled_(PyGC_Disable()) {}
  GcPaused(const GcPaused&) = delete;
  GcPaused& operator=(const GcPaused&) = delete;
  ~GcPaused() {
    if (was_enabled_) PyGC_Enable();
  }

 private:
  int was_enabled_;
};

// gradguard::multi_tensor_stats over `ts` through the dispatcher, as torch.ops would call it (same
// kernels, errors and profiler record), with the GIL released while it runs (a 124M-parameter
// list reads for ~10 ms).
Stats call_stats(const std::vector<at::Tensor>& ts, double norm_type) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("gradguard::multi_tensor_stats", "")
                             .typed<Stats(at::TensorList, double)>();
  pybind11::gil_scoped_release no_gil;
  return op.call(ts, norm_type);
}

// Puts `parts` into result[first ..]; on a failed wrap releases `result` (unset tuple and list
// items are NULL, which their dealloc skips) and returns nullptr.
PyObject* wrap_into(std::initializer_list<const at::Tensor*> parts, PyObject* result, Py_ssize_t first) {
  for (const at::Tensor* part : parts) {
    PyObject* t = THPVariable_Wrap(*part);
    if (t == nullptr) {
      Py_DECREF(result);
      return nullptr;
    }
    PyTuple_SET_ITEM(result, first++, t);
  }
  return result;
}

PyObject* wrap_stats_into(const Stats& out, PyObject* result, Py_ssize_t first) {
  return wrap_into({&std::get<0>(out), &std::get<1>(out), &std::get<2>(out), &std::get<3>(out)}, result, first);
}

// same_params(groups, flat) -> bool: whether the optimizer's param_groups (any iterable of
// mappings), their "params" lists (or tuples) one after another, hold exactly the objects of
// `flat`, in order (identity, not equality). GradGuard's parameter plan is rebuilt when this
// fails: a parameter swapped inside an existing param_groups list keeps the list's id and
// length, and a stale plan would check the old parameter's gradient while the optimizer steps
// the new one. One call for what took three Python expressions and this compare (the lists, a
// key of their ids, the compare: 9-10 us at 1,000 parameters at the start of a step, 2026-12-07).
// A group without "params" (KeyError) or that is no mapping (TypeError) is no match: the caller
// then rebuilds the plan, which reads the groups as torch does and says what is wrong.
PyObject* same_params(PyObject*, PyObject* args) {
  static PyObject* const kParams = PyUnicode_InternFromString("params");
  PyObject* groups_in = nullptr;
  PyObject* flat = nullptr;
  if (!PyArg_ParseTuple(args, "OO", &groups_in, &flat) || !check_list(flat, "same_params")) return nullptr;
  if (kParams == nullptr) return PyErr_NoMemory();
  // A list or tuple as it is; any other iterable (a UserList, a generator) copied into a list.
  PyObject* groups = PySequence_Fast(groups_in, "gradguard._C.same_params: the parameter groups must be iterable");
  if (groups == nullptr) return nullptr;
  Py_ssize_t k = 0;
  bool same = true;
  for (Py_ssize_t j = 0; same && j < PySequence_Fast_GET_SIZE(groups); ++j) {
    // The group and its list are held while in use: a lookup may run Python code (a dict
    // subclass's __getitem__ or __missing__, or the __eq__ of a key whose hash equals that of
    // "params"), which may change the groups, the group or `flat`; sizes are read again after.
    PyObject* group = PySequence_Fast_ITEMS(groups)[j];
    Py_INCREF(group);
    PyObject* l = nullptr;
    if (PyDict_CheckExact(group)) {
      l = PyDict_GetItemWithError(group, kParams);
      Py_XINCREF(l);
    } else {
      l = PyObject_GetItem(group, kParams);
    }
    Py_DECREF(group);
    if (l == nullptr) {
      if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_KeyError) && !PyErr_ExceptionMatches(PyExc_TypeError)) {
        Py_DECREF(groups);
        return nullptr;
      }
      PyErr_Clear();
      same = false;
      break;
    }
    // No Python code runs from here to the end of the compare.
    same = PyList_Check(l) || PyTuple_Check(l);
    if (same) {
      const Py_ssize_t m = PySequence_Fast_GET_SIZE(l);
      const Py_ssize_t n = PyList_GET_SIZE(flat);
      PyObject** items = PySequence_Fast_ITEMS(l);
      PyObject** want = PySequence_Fast_ITEMS(flat);
      same = m <= n - k;
      for (Py_ssize_t i = 0; same && i < m; ++i) same = items[i] == want[k + i];
      k += m;
    }
    Py_DECREF(l);
  }
  Py_DECREF(groups);
  if (same && k == PyList_GET_SIZE(flat)) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

// grad_stats_of(params: list[Tensor], norm_type: float) -> (grads, acc, nan_count, inf_count,
// amax), or None when a parameter has no gradient (the caller's general path handles those).
// `grads` is the list of the parameters' .grad as autograd holds them: the caller passes only
// plain Tensor/Parameter objects (a subclass may override .grad through __torch_function__, which
// this does not consult).
PyObject* grad_stats_of(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* params = nullptr;
  double norm_type = 2.0;
  if (!PyArg_ParseTuple(args, "Od", &params, &norm_type) || !check_list(params, "grad_stats_of")) return nullptr;
  // Paused until every gradient is in the returned list: the loops below index `params` and hold
  // references into the parameters' autograd metadata (GcPaused says why).
  std::optional<GcPaused> no_gc(std::in_place);
  const Py_ssize_t n = PyList_GET_SIZE(params);
  PyObject* result = PyTuple_New(5);
  PyObject* list = PyList_New(n);
  if (result == nullptr || list == nullptr) {
    Py_XDECREF(result);
    Py_XDECREF(list);
    return nullptr;
  }
  PyTuple_SET_ITEM(result, 0, list);  // unset list and tuple items are NULL, which their dealloc skips
  // Each parameter's gradient sits at the end of a chain of dependent loads (the parameter's
  // Python object, its TensorImpl, its AutogradMeta, the gradient's TensorImpl, the gradient's
  // Python object), cold after an optimizer step over many tensors. Taken one link at a time
  // over the whole list, the loads of one pass are independent and the core overlaps their
  // misses; one tensor at a time, each waited for the last. links[i] holds chain i's current link,
  // replaced pass by pass (the parameter's TensorImpl, its AutogradMeta, its gradient), and the
  // last loop wraps the gradient the chain ends at.
  std::vector<const void*> links(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor* p = tensor_at(params, i, "grad_stats_of");
    if (p == nullptr) {
      Py_DECREF(result);
      return nullptr;
    }
    links[i] = p->unsafeGetTensorImpl();
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    links[i] = static_cast<const c10::TensorImpl*>(links[i])->autograd_meta();
    if (links[i] != nullptr) __builtin_prefetch(links[i]);
  }
  // The gradient itself, as TensorImpl::grad() reads it (no AutogradMeta: no gradient). Nothing
  // but this code runs until the last loop (the collector is paused), so the addresses stay valid.
  for (Py_ssize_t i = 0; i < n; ++i) {
    const auto* meta = static_cast<const c10::AutogradMetaInterface*>(links[i]);
    const at::Tensor* g = meta == nullptr ? nullptr : &meta->grad();
    links[i] = g;
    if (g != nullptr && g->defined()) __builtin_prefetch(g->unsafeGetTensorImpl()->pyobj_slot());
  }
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 11)
  // The gradients' Python objects. (The slot's load_pyobj() is in torch 2.11 and 2.13, not in
  // 2.6; older releases skip this pass, which only prefetches.)
  for (Py_ssize_t i = 0; i < n; ++i) {
    const auto* g = static_cast<const at::Tensor*>(links[i]);
    if (g == nullptr || !g->defined()) continue;
    PyObject* obj = g->unsafeGetTensorImpl()->pyobj_slot()->load_pyobj();
    if (obj != nullptr) __builtin_prefetch(obj, 1);
  }
#endif
  // The grads go into the returned list, and the op gets borrowed handles: each list item's
  // Python object holds its tensor, so the handles stay valid while the op runs without the GIL,
  // and the handles bump and drop no reference count (a gradient that had no Python object yet
  // gets one reference, kept by its new object). Counts are atomic read-modify-writes: each holds
  // back the loads after it until its own cache line is in, which serialized the misses of
  // consecutive tensors.
  BorrowedTensors grads(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    const auto* g = static_cast<const at::Tensor*>(links[i]);
    if (g == nullptr || !g->defined()) {
      Py_DECREF(result);
      Py_RETURN_NONE;
    }
    PyObject* wrapped = THPVariable_Wrap(*g);
    if (wrapped == nullptr) {
      Py_DECREF(result);
      return nullptr;
    }
    PyList_SET_ITEM(list, i, wrapped);
    grads.push_back(THPVariable_Unpack(wrapped));
  }
  no_gc.reset();
  Stats out;
  try {
    out = call_stats(grads.get(), norm_type);
  } catch (...) {
    Py_DECREF(result);
    throw;
  }
  return wrap_stats_into(out, result, 1);
  END_HANDLE_TH_ERRORS
}

// The tensors of `seq` when they are the plain common case of grad_stats/all_finite: a list or
// tuple of at least one plain tensor (torch.Tensor or Parameter, not a subclass), strided and not
// nested, float16/bfloat16/float32/float64, not requiring grad, all of one device and dtype. Otherwise
// false, and those take the Python path (as_tensor_list, the grouping, the distributed plan),
// which costs 40-110 us on a 52-tensor list, much of it cold after the read.
bool plain_list(PyObject* seq, std::vector<at::Tensor>& ts) {
  if (!PyList_Check(seq) && !PyTuple_Check(seq)) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  if (n == 0) return false;
  PyObject** items = PySequence_Fast_ITEMS(seq);
  ts.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!THPVariable_CheckExact(items[i])) return false;
    const at::Tensor& t = THPVariable_Unpack(items[i]);
    const auto dtype = t.scalar_type();
    const bool floating = dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble;
    // A nested tensor's layout is strided too: the Python path refuses it by name.
    if (!floating || t.layout() != at::kStrided || t.requires_grad() || t.is_nested()) return false;
    if (i > 0 && (dtype != ts[0].scalar_type() || t.device() != ts[0].device())) return false;
    ts.push_back(t);
  }
  return true;
}

using DecideOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using OptT = std::optional<at::Tensor>;
using DecideSig = DecideOut(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&,
                            const OptT&, const OptT&, const OptT&, const OptT&, const OptT&, const OptT&, const OptT&,
                            const OptT&, double, std::optional<double>, c10::string_view, c10::string_view,
                            at::ArrayRef<double>, bool);

// gradguard::guard_decide, typed (the dispatcher's own kernels, errors and profiler record).
const c10::TypedOperatorHandle<DecideSig>& guard_decide_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("gradguard::guard_decide", "").typed<DecideSig>();
  return op;
}

// The whole of grad_stats from the op's results, as gradguard.stats.finalize computes it
// (guard_decide without state or limit, then scalars[0] in the result dtype), with the ops called
// typed from here: each op called from Python parses its arguments there first, and with the
// caches cold (right after a large read) the three cost ~190 us on top of the read, 2026-12-05.
PyObject* finalize_stats(const Stats& raw, double norm_type, bool double_out) {
  at::Tensor parts[6];
  {
    pybind11::gil_scoped_release no_gil;
    const OptT none;
    const DecideOut d =
        guard_decide_op().call(std::get<0>(raw), std::get<1>(raw), std::get<2>(raw), std::get<3>(raw), none, none,
                               none, none, none, none, none, none, none, norm_type, std::nullopt, "ignore", "none",
                               {}, double_out);
    parts[0] = std::get<0>(d);
    parts[1] = std::get<1>(raw);
    parts[2] = std::get<2>(raw);
    parts[3] = std::get<1>(d);
    const at::Tensor& scalars = std::get<2>(d);
    const auto total_dtype = double_out ? at::kDouble : at::kFloat;
    if (scalars.device().is_cpu()) {
      // The same value as select + to (one rounding of the float64 total), without two more
      // dispatches: ~40 us with cold caches.
      parts[4] = at::detail::empty_cpu({}, total_dtype, std::nullopt, std::nullopt, std::nullopt, std::nullopt);
      const double total = scalars.const_data_ptr<double>()[0];
      if (double_out) {
        *parts[4].mutable_data_ptr<double>() = total;
      } else {
        *parts[4].mutable_data_ptr<float>() = static_cast<float>(total);
      }
    } else {
      parts[4] = scalars.select(0, 0).to(total_dtype);
    }
    parts[5] = std::get<3>(d);
  }
  PyObject* result = PyTuple_New(6);
  return result == nullptr ? nullptr
                           : wrap_into({&parts[0], &parts[1], &parts[2], &parts[3], &parts[4], &parts[5]}, result, 0);
}

// guard_decide(acc, nan_count, inf_count, amax, index, max_norm, loss_scale, scaler_found,
// counters, layer_nonfinite, layer_max_norm, spike_state, history, norm_type, max_norm_value,
// mode, spike, spike_args, double_out) -> the op's seven outputs, or None when a tensor argument
// is not a plain torch.Tensor (a subclass may handle the op itself: the caller then calls it
// through torch.ops). GradGuard's one call per step: through torch.ops the 19 arguments are
// matched against the schema and boxed, then unboxed for the kernel: ~4 us of a 6.5 us call at
// 52 tensors (the kernel's own time under the profiler: 2.6 us).
PyObject* guard_decide(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* t[13];
  double norm_type = 2.0;
  PyObject* max_norm_obj = nullptr;
  PyObject* spike_args_obj = nullptr;
  const char* mode = nullptr;
  const char* spike = nullptr;
  PyObject* double_out = nullptr;
  if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOOdOssOO!", &t[0], &t[1], &t[2], &t[3], &t[4], &t[5], &t[6], &t[7], &t[8],
                        &t[9], &t[10], &t[11], &t[12], &norm_type, &max_norm_obj, &mode, &spike, &spike_args_obj,
                        &PyBool_Type, &double_out)) {
    return nullptr;
  }
  for (int k = 0; k < 13; ++k) {
    if (k < 4 ? !THPVariable_CheckExact(t[k]) : (t[k] != Py_None && !THPVariable_CheckExact(t[k]))) Py_RETURN_NONE;
  }
  OptT opt[9];
  for (int k = 4; k < 13; ++k) {
    if (t[k] != Py_None) opt[k - 4] = THPVariable_Unpack(t[k]);
  }
  std::optional<double> max_norm_value;
  if (max_norm_obj != Py_None) {
    const double v = PyFloat_AsDouble(max_norm_obj);
    if (v == -1.0 && PyErr_Occurred()) return nullptr;
    max_norm_value = v;
  }
  // A snapshot: an item's __float__ could edit the list while it is read.
  PyObject* items = PySequence_Tuple(spike_args_obj);
  if (items == nullptr) return nullptr;
  std::vector<double> spike_args(static_cast<size_t>(PyTuple_GET_SIZE(items)));
  for (size_t k = 0; k < spike_args.size(); ++k) {
    spike_args[k] = PyFloat_AsDouble(PyTuple_GET_ITEM(items, k));
    if (spike_args[k] == -1.0 && PyErr_Occurred()) {
      Py_DECREF(items);
      return nullptr;
    }
  }
  Py_DECREF(items);
  const DecideOut d = guard_decide_op().call(
      THPVariable_Unpack(t[0]), THPVariable_Unpack(t[1]), THPVariable_Unpack(t[2]), THPVariable_Unpack(t[3]), opt[0],
      opt[1], opt[2], opt[3], opt[4], opt[5], opt[6], opt[7], opt[8], norm_type, max_norm_value, mode, spike,
      spike_args, double_out == Py_True);
  PyObject* result = PyTuple_New(7);
  return result == nullptr ? nullptr
                           : wrap_into({&std::get<0>(d), &std::get<1>(d), &std::get<2>(d), &std::get<3>(d),
                                        &std::get<4>(d), &std::get<5>(d), &std::get<6>(d)},
                                       result, 0);
  END_HANDLE_TH_ERRORS
}

// plain_stats(tensors: list | tuple, norm_type: float) -> (acc, nan_count, inf_count, amax) of
// multi_tensor_stats (all_finite's read); plain_grad_stats(tensors, norm_type) -> (norms,
// nan_count, inf_count, amax, total_norm, found_inf), grad_stats whole. Either is None unless the
// list is plain (plain_list).
PyObject* plain_call(PyObject* args, bool whole) {
  HANDLE_TH_ERRORS
  PyObject* seq = nullptr;
  double norm_type = 2.0;
  if (!PyArg_ParseTuple(args, "Od", &seq, &norm_type)) return nullptr;
  std::vector<at::Tensor> ts;
  if (!plain_list(seq, ts)) Py_RETURN_NONE;
  const Stats raw = call_stats(ts, norm_type);
  if (whole) return finalize_stats(raw, norm_type, ts[0].scalar_type() == at::kDouble);
  PyObject* result = PyTuple_New(4);
  return result == nullptr ? nullptr : wrap_stats_into(raw, result, 0);
  END_HANDLE_TH_ERRORS
}

PyObject* plain_stats(PyObject*, PyObject* args) { return plain_call(args, false); }

PyObject* plain_grad_stats(PyObject*, PyObject* args) { return plain_call(args, true); }

// The hygiene tracker's memory of the gradients at the end of the last step (gradguard/hygiene.py
// says what it is for): every gradient's TensorImpl address and version, and weak references to
// the first and the last one (the anchors). A weak reference keeps its TensorImpl's address from
// being reused by a new tensor (the storage is still freed with the tensor), so for the anchors
// address equality is identity. The others are not held: holding 1,000 would move the freeing
// of 1,000 TensorImpls, which zero_grad() would have done, into the next step (~65 us measured).
// A freed gradient's address can be reused by a new one, so for them a match means "the same
// tensor, or a new one at a freed address"; the anchors make that harmless: a clear with
// set_to_none replaces the anchors too, which are then missing. Only a loop that cleared some
// gradients but not the anchors' could see a new one taken for an old one, and its anchors'
// parameters did accumulate over two steps.
using Anchor = c10::weak_intrusive_ptr<c10::TensorImpl>;
struct Marks {
  std::vector<std::pair<const c10::TensorImpl*, int64_t>> all;
  std::optional<Anchor> first, last;
};

constexpr const char* kCapsule = "gradguard.ClearMarks";

Marks* marks_of(PyObject* capsule) { return static_cast<Marks*>(PyCapsule_GetPointer(capsule, kCapsule)); }

void free_marks(PyObject* capsule) { delete marks_of(capsule); }

PyObject* clear_marks_new(PyObject*, PyObject*) {
  HANDLE_TH_ERRORS
  auto* marks = new Marks();
  PyObject* capsule = PyCapsule_New(marks, kCapsule, free_marks);
  if (capsule == nullptr) delete marks;
  return capsule;
  END_HANDLE_TH_ERRORS
}

bool unpack_args(PyObject* args, const char* where, Marks** marks, PyObject** grads) {
  PyObject* capsule = nullptr;
  if (!PyArg_ParseTuple(args, "OO", &capsule, grads)) return false;
  *marks = marks_of(capsule);
  return *marks != nullptr && check_list(*grads, where);
}

// clear_marks_set(marks, grads): remembers every gradient (None entries skipped) and its version.
PyObject* clear_marks_set(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  Marks* marks = nullptr;
  PyObject* grads = nullptr;
  if (!unpack_args(args, "clear_marks_set", &marks, &grads)) return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(grads);
  Marks fresh;
  fresh.all.reserve(n);
  const at::Tensor* first = nullptr;
  const at::Tensor* last = nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (PyList_GET_ITEM(grads, i) == Py_None) continue;
    const at::Tensor* g = tensor_at(grads, i, "clear_marks_set");
    if (g == nullptr) return nullptr;
    fresh.all.emplace_back(g->unsafeGetTensorImpl(), g->_version());
    first = first == nullptr ? g : first;
    last = g;
  }
  if (first != nullptr) {
    fresh.first.emplace(first->getIntrusivePtr());
    fresh.last.emplace(last->getIntrusivePtr());
  }
  std::swap(*marks, fresh);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// clear_marks_unchanged(marks, grads) -> bool: True when there are marks and grads, both anchors
// are among the grads, and every grad is a remembered one whose version moved by at most one (one
// backward accumulated into it, nothing cleared it). Grads usually come in the marked order, and
// after a clear with set_to_none the first one is already new: the order is checked first, the
// first stray grad looked up by a scan (not found: done), and only a list that really is
// reordered builds a map for the rest.
PyObject* clear_marks_unchanged(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  Marks* marks = nullptr;
  PyObject* grads = nullptr;
  if (!unpack_args(args, "clear_marks_unchanged", &marks, &grads)) return nullptr;
  const auto& all = marks->all;
  const Py_ssize_t n = PyList_GET_SIZE(grads);
  if (all.empty() || n == 0) Py_RETURN_FALSE;
  // An anchor that was freed cannot be among the live grads: the usual step after zero_grad()
  // (set_to_none) answers here, without the scan below of 16 bytes a parameter (cold, as the
  // inner step ran since: 5-6 us at 1,000 parameters).
  if (marks->first->expired() || marks->last->expired()) Py_RETURN_FALSE;
  const c10::TensorImpl* first = marks->first->_unsafe_get_target();
  const c10::TensorImpl* last = marks->last->_unsafe_get_target();
  bool seen_first = false, seen_last = false;
  std::unordered_map<const c10::TensorImpl*, int64_t> by_impl;
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor* g = tensor_at(grads, i, "clear_marks_unchanged");
    if (g == nullptr) return nullptr;
    const c10::TensorImpl* impl = g->unsafeGetTensorImpl();
    int64_t version = 0;
    if (static_cast<size_t>(i) < all.size() && all[i].first == impl) {
      version = all[i].second;
    } else if (by_impl.empty()) {
      const auto it = std::find_if(all.begin(), all.end(), [&](const auto& m) { return m.first == impl; });
      if (it == all.end()) Py_RETURN_FALSE;
      version = it->second;
      by_impl.insert(all.begin(), all.end());
    } else {
      const auto it = by_impl.find(impl);
      if (it == by_impl.end()) Py_RETURN_FALSE;
      version = it->second;
    }
    if (g->_version() - version > 1) Py_RETURN_FALSE;
    seen_first = seen_first || impl == first;
    seen_last = seen_last || impl == last;
  }
  if (seen_first && seen_last) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
  END_HANDLE_TH_ERRORS
}

// The tensors of the Python list `obj` (TypeError naming `what` if it is not one).
bool list_tensors(PyObject* obj, const char* what, std::vector<at::Tensor>& out) {
  if (!PyList_Check(obj)) {
    PyErr_Format(PyExc_TypeError, "gradguard._C.fused_adam_readonly_grads: %s must be a list, got %s", what,
                 Py_TYPE(obj)->tp_name);
    return false;
  }
  const Py_ssize_t n = PyList_GET_SIZE(obj);
  out.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor* t = tensor_at(obj, i, "fused_adam_readonly_grads");
    if (t == nullptr) return false;
    out.push_back(*t);
  }
  return true;
}

// fused_adam_readonly_grads(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2,
// weight_decay, eps, maximize, decoupled, grad_scale, found_inf) -> bool:
// gradguard::fused_adam_readonly_grads_ called typed (torch.ops converted its five lists to
// IValues: ~270 us at 1,000 parameters, 645 against 376 us for the whole call), GIL
// released; False, having touched nothing, when the kernel cannot take the lists (the caller then
// runs PyTorch's kernel; no exception on that path).
PyObject* fused_adam_readonly_grads(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *lists[5], *scale = nullptr, *found = nullptr;
  double lr = 0, beta1 = 0, beta2 = 0, wd = 0, eps = 0;
  int maximize = 0, decoupled = 0;
  if (!PyArg_ParseTuple(args, "OOOOOdddddppOO", &lists[0], &lists[1], &lists[2], &lists[3], &lists[4], &lr, &beta1,
                        &beta2, &wd, &eps, &maximize, &decoupled, &scale, &found)) {
    return nullptr;
  }
  static const char* names[5] = {"params", "grads", "exp_avgs", "exp_avg_sqs", "state_steps"};
  std::vector<at::Tensor> ts[5];
  for (int k = 0; k < 5; ++k) {
    if (!list_tensors(lists[k], names[k], ts[k])) return nullptr;
  }
  if (!THPVariable_Check(scale) || (found != Py_None && !THPVariable_Check(found))) {
    PyErr_SetString(PyExc_TypeError, "gradguard._C.fused_adam_readonly_grads: grad_scale must be a tensor and "
                                     "found_inf a tensor or None");
    return nullptr;
  }
  std::optional<at::Tensor> found_t;
  if (found != Py_None) found_t = THPVariable_Unpack(found);
  const at::Tensor& scale_t = THPVariable_Unpack(scale);
  if (!fused_adam_readonly_grads_refusal(ts[0], ts[1], ts[2], ts[3], ts[4], scale_t, found_t).empty()) {
    Py_RETURN_FALSE;
  }
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("gradguard::fused_adam_readonly_grads_", "")
                             .typed<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                         double, double, double, double, double, bool, bool, const at::Tensor&,
                                         const std::optional<at::Tensor>&)>();
  {
    pybind11::gil_scoped_release no_gil;
    op.call(ts[0], ts[1], ts[2], ts[3], ts[4], lr, beta1, beta2, wd, eps, maximize != 0, decoupled != 0, scale_t,
            found_t);
  }
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef kMethods[] = {
    {"fused_adam_readonly_grads", fused_adam_readonly_grads, METH_VARARGS,
     "fused_adam_readonly_grads(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, beta1, beta2, weight_decay, "
     "eps, maximize, decoupled, grad_scale, found_inf) -> gradguard::fused_adam_readonly_grads_ called typed: "
     "True, or False (nothing touched) where the kernel cannot take the lists"},
    {"same_params", same_params, METH_VARARGS,
     "same_params(groups, flat) -> whether the groups' params lists, one after another, hold exactly the objects of "
     "flat"},
    {"grad_stats_of", grad_stats_of, METH_VARARGS,
     "grad_stats_of(params, norm_type) -> (grads, acc, nan_count, inf_count, amax) of multi_tensor_stats, or None"},
    {"guard_decide", guard_decide, METH_VARARGS,
     "guard_decide(<gradguard::guard_decide's 19 arguments>) -> its 7 outputs, or None unless the tensors are plain"},
    {"plain_grad_stats", plain_grad_stats, METH_VARARGS,
     "plain_grad_stats(tensors, norm_type) -> (norms, nan_count, inf_count, amax, total_norm, found_inf) of "
     "grad_stats for a plain one-device, one-dtype list, or None"},
    {"plain_stats", plain_stats, METH_VARARGS,
     "plain_stats(tensors, norm_type) -> (acc, nan_count, inf_count, amax) of multi_tensor_stats for a plain "
     "one-device, one-dtype list, or None"},
    {"clear_marks_new", clear_marks_new, METH_NOARGS, "clear_marks_new() -> an empty set of gradient marks"},
    {"clear_marks_set", clear_marks_set, METH_VARARGS, "clear_marks_set(marks, grads): remember grads and versions"},
    {"clear_marks_unchanged", clear_marks_unchanged, METH_VARARGS,
     "clear_marks_unchanged(marks, grads) -> whether every grad is a marked one, its version moved by <= 1"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace
}  // namespace gradguard

// Read by csrc/gradguard.cpp's module init (the CPU module only: GRADGUARD_HOST_HELPERS).
PyMethodDef* gradguard_host_methods() { return gradguard::kMethods; }
