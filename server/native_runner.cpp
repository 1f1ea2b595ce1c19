// The native runner: a learned run's `fast` steps (server/runs.py) matched and run in C++ (server/native_runner.py).
//
// A `Plan` is one step compiled once: the record's length and fixed byte segments, where its output handle and its
// tensor handles sit in the record, each tensor input's source (a kept output of the run, or external with the
// learned dtype, sizes, strides and storage offset), the op's other arguments as IValues converted once, and the
// verdict (new bytes). `Ctx.run` runs consecutive records of one run for as long as each matches its step and
// needs nothing the Python path does beyond what is here; the first record it cannot take goes back to Python
// (`CommandExecutor.eager_span`) untouched: no check here has a side effect before the op runs. Every read of the
// record is bounds-checked (its length is compared with the plan's first).
//
// Built as libtorch itself is, with NDEBUG (round 47): torch's headers then leave out their debug-only code, as the
// library they call was built without it (the dispatcher's dispatch-trace guard on every call, debug-only asserts,
// RecordFunction's debug member), and pybind11 leaves out its GIL check on every handle's reference count
// (PyGILState_Check: ~1.5k instructions an op on the encoder's worker). The sanitized build
// (GPUPOOL_NATIVE_RUNNER_SANITIZE, server/native_runner.py) keeps them all: it defines GPUPOOL_RUNNER_CHECKED.
#if !defined(NDEBUG) && !defined(GPUPOOL_RUNNER_CHECKED)
#define NDEBUG 1
#endif
#include <torch/extension.h>
#include <structmember.h>  // T_OBJECT_EX

#include <ATen/CPUGeneratorImpl.h>  // the fused attention: the CPU generator's state
#include <ATen/EmptyTensor.h>
#include <ATen/ScalarOps.h>  // the fused attention: wrapped numbers
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/as_strided_native.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>  // as_view
#include <torch/csrc/jit/python/pybind_utils.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int64_t EXTERNAL = -1;
constexpr int64_t NONE = -2;
constexpr int64_t MAX_DIMS = 64;
constexpr int HANDLE_BITS = 32;

PyObject* S_run;  // "run", interned (set where the module is made)

struct Input {
  int64_t offset = 0;  // of the 8-byte handle in the record
  int64_t src = EXTERNAL;  // >= 0: the run's kept output; EXTERNAL; NONE (a None in a Tensor?[], handle 0)
  at::ScalarType dtype = at::ScalarType::Undefined;
  std::vector<int64_t> sizes, strides;
  int64_t storage_offset = 0;
  // a view argument (compact.VIEW): the tensor above is the one it views; the geometry applied to it, and the
  // storage elements the view spans from the storage's start (`compact.Geometry.last`)
  bool view = false;
  std::vector<int64_t> view_sizes, view_strides;
  int64_t view_offset = 0, view_last = 0;
  // A direct view's TensorImpl kept for the next record (`Shells`): set on the viewed tensor's storage while a run
  // uses it, on an empty storage between runs; with the key set of the tensor it was made on
  mutable at::Tensor shell;
  mutable c10::DispatchKeySet shell_keys;
  mutable int64_t shell_reused = 0;  // records it served after the first (tests: `Trace.kept_views`)
};

// CONST: converted once; the others read from the record: tensor handles, and the numbers an op's verdict keys by
// type only (an optimizer's step sizes), as torch's `toIValue` converts the Python int or float the full decode gives
enum Kind { CONST = 0, TENSOR = 1, TENSORS = 2, OPT_TENSORS = 3, INT = 4, INT_AS_DOUBLE = 5, DOUBLE = 6 };
// a Scalar[] of numbers keyed by type (an optimizer's per-tensor step sizes): the list `toIValue` makes of the
// decoded Python ints or floats (a generic list of Number)
enum ListKind { INTS = 7, DOUBLES = 8 };
// what the op returns: nothing (an in-place `_foreach_` op), one Tensor, or several (a tuple of tensors, or one
// Tensor[]) that `bind_outputs` binds to the record's output handles as `_run_step` does

enum Returns { NOTHING = 0, ONE = 1, SEVERAL = 2 };

struct Arg {
  int kind = CONST;  // a Kind or a ListKind
  int64_t offset = 0;  // INT, INT_AS_DOUBLE, DOUBLE: of the 8-byte number in the record
  std::vector<int64_t> numbers;  // INTS, DOUBLES: their 8-byte numbers' offsets
  c10::IValue value;  // CONST
  py::object pyvalue;  // CONST of a Python run (`Plan::n_pos`): the template's own value; unset: not passed (a default)
  std::vector<Input> inputs;  // TENSOR: one; the lists: their elements
};

struct Plan {
  std::optional<c10::OperatorHandle> op;
  py::object owner, run;  // the step's `OpPlan` and its op's own binding: runs here only while `owner.run is run`
  // `owner.run` read from its slot (`run_slot`): the offset of the slot `run` (a `__slots__` member) of the owner's
  // type, valid while the owner is of that type and the type's attribute cache tag is the one it had (any change
  // to the class, a new `run` descriptor included, gives it another); -1: through getattr
  PyTypeObject* owner_type = nullptr;
  unsigned int owner_tag = 0;
  Py_ssize_t run_offset = -1;
  int64_t size = 0;
  std::vector<std::pair<int64_t, std::string>> fixed;
  int64_t out_offset = -1;  // the first output handle's; -1: the record has none (an in-place op returning nothing)
  std::vector<int64_t> more_outs;  // SEVERAL: the other output handles' offsets
  std::vector<Arg> args;
  int64_t need = 0;
  bool keep = false;  // ONE, NOTHING: the run keeps the output (`Step.keep`)
  std::vector<int64_t> keep_at;  // SEVERAL: the outputs the run keeps, by position
  int returns = ONE;
  // view arguments made without the dispatcher (`view_of`): for every op that returns no argument of its own (an
  // in-place op's `Tensor(a!)`): such an op would bind the view itself to its output handle, and a later record
  // could tell a direct view from the dispatcher's (`detach_` refuses a view that `aten::as_strided` made)
  bool direct_views = true;
  // in the list of plans whose kept views a `Ctx.run` under way used (`Shells`): added once per run, not per record
  bool in_shells = false;
  // a random op (`OpPlan.seeded`): runs only where the context's session owns the device's generator (`Ctx::rng`)
  bool seeded = false;
  // >= 0: `run` is a Python function (a fallback of server/fallbacks.py's FASTER: the same bits as the op, on a
  // fake GPU), called as `_run_step` calls it: the template's first n_pos arguments positionally, the others by
  // keyword, defaults left out; -1: the op itself, through the dispatcher (`call_op`)
  int64_t n_pos = -1;
  // a factory of uninitialized memory (`OpPlan.uninitialized`, ONE only): its output's whole storage is zeroed after
  // the op, as `_run_step` does (`sessions.zero_bytes`), before it is bound: never memory another session freed
  bool zero = false;
  // a value guard (`guards.validate`) that is no more than value ranges of tensor arguments (`guards.index_ranges`:
  // `embedding_dense_backward`'s indices in [0, num_weights)), checked per record before the op (`in_ranges`)
  struct Range {
    size_t arg = 0;  // the schema argument (a TENSOR)
    int64_t low = 0, high = 0;  // its values must lie in [low, high)
  };
  std::vector<Range> ranges;
  // a guard that reads nothing the step does not fix but the devices of pairs of tensor arguments (`guards.fixed_guard`:
  // the attention backward's philox_seed and query, with dropout): each pair's devices must be equal
  std::vector<std::pair<size_t, size_t>> devices;
  // called below the autograd keys (`call_op`): the worker never records autograd history (grad mode is off in
  // it), so each op's Autograd kernel only checks that and redispatches (~0.6k instructions a call, ~2.5k a
  // `_foreach_` op's over its lists). Set where the op's backend keys (the session device's and the CPU's) have a
  // kernel of their own or a composite one (`_compile`): below autograd the dispatcher reaches the same kernel.
  // ADInplaceOrView still runs: version counters (server/graph.py's `_version` checks) and view tracking as before.
  bool below_autograd = false;
  // a Python run whose calls run in C++ where they can (`call_run`): the fused attention's forward (1) and backward (2)
  // (`attn::run`), a fake GPU's `native_dropout` (3) and its backward (4) (`dropout::run`); 0: none
  int in_cpp = 0;
};

inline uint64_t read_u64(const char* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);  // little-endian hosts only (checked at load)
  return v;
}

Input make_input(int64_t offset, int64_t src, py::handle meta) {
  Input in;
  in.offset = offset;
  in.src = src;
  if (src == EXTERNAL) {
    auto m = py::reinterpret_borrow<py::tuple>(meta);
    if (m.size() != 4 || !THPDtype_Check(m[0].ptr())) {
      throw std::invalid_argument("bad meta");
    }
    in.dtype = reinterpret_cast<THPDtype*>(m[0].ptr())->scalar_type;
    for (auto d : m[1]) in.sizes.push_back(d.cast<int64_t>());
    for (auto d : m[2]) in.strides.push_back(d.cast<int64_t>());
    in.storage_offset = m[3].cast<int64_t>();
  }
  return in;
}

// A view argument's geometry (sizes, strides, offset, last) on `in`: the tensor `in` names is the one it views
void set_view(Input& in, py::handle geometry) {
  auto g = py::reinterpret_borrow<py::tuple>(geometry);
  if (g.size() != 4) throw std::invalid_argument("bad view geometry");
  in.view = true;
  for (auto d : g[0]) in.view_sizes.push_back(d.cast<int64_t>());
  for (auto d : g[1]) in.view_strides.push_back(d.cast<int64_t>());
  in.view_offset = g[2].cast<int64_t>();
  in.view_last = g[3].cast<int64_t>();
  if (in.view_sizes.size() != in.view_strides.size() || in.view_sizes.size() > MAX_DIMS || in.view_offset < 0 ||
      in.view_last < 0) {
    throw std::invalid_argument("bad view geometry");
  }
  for (size_t d = 0; d < in.view_sizes.size(); ++d) {
    if (in.view_sizes[d] < 0 || in.view_strides[d] < 0) throw std::invalid_argument("bad view geometry");
  }
}

// args: per schema argument, ("c", value) | ("d",) | ("t", offset, src, meta[, view geometry or None]) |
// ("l", optional, [(offset, src, meta[, view geometry or None])]) (a list element that is a view: compact.VIEWS) |
// ("s", INTS or DOUBLES, [offset]); outs: the output handles' offsets; keep: the positions of the outputs the run keeps
std::shared_ptr<Plan> make_plan(
    const std::string& name, const std::string& overload, int64_t size, py::list fixed, py::list outs,
    py::list args, int64_t need, py::list keep, py::object owner, py::object run, int returns, bool seeded,
    int64_t n_pos, bool zero, py::list ranges, py::list devices, bool below_autograd) {
  auto plan = std::make_shared<Plan>();
  plan->seeded = seeded;
  if (n_pos < -1 || n_pos > static_cast<int64_t>(args.size())) throw std::invalid_argument("positional count");
  plan->n_pos = n_pos;
  if (zero && returns != ONE) throw std::invalid_argument("zeroed outputs of one tensor only");
  plan->zero = zero;
  plan->below_autograd = below_autograd && n_pos < 0;
  if (n_pos >= 0 && !PyCallable_Check(run.ptr())) throw std::invalid_argument("a Python run must be callable");
  plan->op = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str());
  plan->owner = owner;
  {
    PyTypeObject* tp = Py_TYPE(owner.ptr());
    PyObject* d = tp->tp_getattro == PyObject_GenericGetAttr ? _PyType_Lookup(tp, S_run) : nullptr;  // borrowed
    if (d != nullptr && Py_TYPE(d) == &PyMemberDescr_Type && tp->tp_version_tag != 0 &&
        PyType_HasFeature(tp, Py_TPFLAGS_VALID_VERSION_TAG)) {
      const PyMemberDef* m = reinterpret_cast<PyMemberDescrObject*>(d)->d_member;
      if (m->type == T_OBJECT_EX && m->offset > 0) {
        plan->owner_type = tp;
        plan->owner_tag = tp->tp_version_tag;
        plan->run_offset = m->offset;
      }
    }
  }
  plan->run = run;
  for (const auto& r : plan->op->schema().returns()) {
    if (r.alias_info() != nullptr && r.alias_info()->isWrite()) plan->direct_views = false;
  }
  // a Python run's view arguments are the dispatcher's, as `compact.view_of` makes them: what it returns may be one
  if (n_pos >= 0) plan->direct_views = false;
  if (returns != NOTHING && returns != ONE && returns != SEVERAL) throw std::invalid_argument("returns");
  plan->returns = returns;
  // one output handle, several for SEVERAL, or none for an op returning nothing (an in-place `_foreach_` op whose
  // record names no output: `_run_step` then checks no handle and binds nothing)
  const size_t nouts = outs.size();
  if (returns == SEVERAL ? nouts < 1 : returns == ONE ? nouts != 1 : nouts > 1) throw std::invalid_argument("output count");
  const auto& schema = plan->op->schema();
  if (args.size() != schema.arguments().size()) throw std::invalid_argument("argument count");
  plan->size = size;
  for (auto f : fixed) {
    auto t = f.cast<py::tuple>();
    int64_t at = t[0].cast<int64_t>();
    std::string bytes = t[1].cast<std::string>();
    if (at < 0 || at + static_cast<int64_t>(bytes.size()) > size) throw std::invalid_argument("fixed out of range");
    plan->fixed.emplace_back(at, std::move(bytes));
  }
  for (size_t j = 0; j < outs.size(); ++j) {
    const int64_t at = outs[j].cast<int64_t>();
    if (at < 0 || at + 8 > size) throw std::invalid_argument("output out of range");
    if (j == 0) {
      plan->out_offset = at;
    } else {
      plan->more_outs.push_back(at);
    }
  }
  for (auto j : keep) {
    const int64_t at = j.cast<int64_t>();
    if (at < 0 || at >= static_cast<int64_t>(outs.size())) throw std::invalid_argument("kept output out of range");
    plan->keep_at.push_back(at);
  }
  plan->keep = !plan->keep_at.empty();
  for (size_t a = 0; a < args.size(); ++a) {
    auto t = args[a].cast<py::tuple>();
    auto tag = t[0].cast<std::string>();
    const auto& arg = schema.arguments()[a];
    Arg out;
    if (tag == "c") {
      out.kind = CONST;
      out.value = torch::jit::toIValue(t[1], arg.real_type(), arg.N());
      out.pyvalue = t[1];
    } else if (tag == "d") {
      if (n_pos >= 0 && static_cast<int64_t>(a) < n_pos) throw std::invalid_argument("a default passed by position");
      if (!arg.default_value()) throw std::invalid_argument("no default");
      out.kind = CONST;
      out.value = *arg.default_value();
    } else if (tag == "t") {
      out.kind = TENSOR;
      out.inputs.push_back(make_input(t[1].cast<int64_t>(), t[2].cast<int64_t>(), t[3]));
      if (t.size() > 4 && !t[4].is_none()) set_view(out.inputs.back(), t[4]);  // (sizes, strides, offset, last)
    } else if (tag == "n") {  // ("n", offset, kind)
      out.kind = static_cast<Kind>(t[2].cast<int>());
      if (out.kind != INT && out.kind != INT_AS_DOUBLE && out.kind != DOUBLE) throw std::invalid_argument("number");
      out.offset = t[1].cast<int64_t>();
      if (out.offset < 0 || out.offset + 8 > size) throw std::invalid_argument("number out of range");
    } else if (tag == "s") {
      out.kind = t[1].cast<int>();
      if (out.kind != INTS && out.kind != DOUBLES) throw std::invalid_argument("number list");
      for (auto e : t[2]) {
        const int64_t at = e.cast<int64_t>();
        if (at < 0 || at + 8 > size) throw std::invalid_argument("number out of range");
        out.numbers.push_back(at);
      }
    } else if (tag == "l") {
      out.kind = t[1].cast<bool>() ? OPT_TENSORS : TENSORS;
      for (auto e : t[2]) {
        auto el = e.cast<py::tuple>();
        out.inputs.push_back(make_input(el[0].cast<int64_t>(), el[1].cast<int64_t>(), el[2]));
        if (el.size() > 3 && !el[3].is_none()) {
          if (out.inputs.back().src == NONE) throw std::invalid_argument("a view of no tensor");
          set_view(out.inputs.back(), el[3]);
        }
      }
    } else {
      throw std::invalid_argument("bad argument tag");
    }
    for (const auto& in : out.inputs) {
      if (in.offset < 0 || in.offset + 8 > size) throw std::invalid_argument("input out of range");
    }
    // a Python run takes numbers, constants and single tensors (`call_py`)
    if (n_pos >= 0 && (out.kind == TENSORS || out.kind == OPT_TENSORS || out.kind == INTS || out.kind == DOUBLES)) {
      throw std::invalid_argument("an argument a Python run does not take");
    }
    plan->args.push_back(std::move(out));
  }
  for (auto r : ranges) {  // (schema argument, low, high)
    auto t = r.cast<py::tuple>();
    Plan::Range range;
    const int64_t a = t[0].cast<int64_t>();
    range.low = t[1].cast<int64_t>();
    range.high = t[2].cast<int64_t>();
    if (a < 0 || a >= static_cast<int64_t>(plan->args.size()) || plan->args[a].kind != TENSOR) {
      throw std::invalid_argument("a range of no tensor argument");
    }
    range.arg = static_cast<size_t>(a);
    plan->ranges.push_back(range);
  }
  for (auto d : devices) {  // (schema argument, schema argument)
    auto t = d.cast<py::tuple>();
    const int64_t a = t[0].cast<int64_t>(), b = t[1].cast<int64_t>();
    const int64_t nargs = static_cast<int64_t>(plan->args.size());
    if (a < 0 || b < 0 || a >= nargs || b >= nargs || plan->args[a].kind != TENSOR || plan->args[b].kind != TENSOR) {
      throw std::invalid_argument("a device pair of no tensor arguments");
    }
    plan->devices.emplace_back(static_cast<size_t>(a), static_cast<size_t>(b));
  }
  plan->need = need;
  return plan;
}

// `guards._in_range` for each of the plan's ranges (`Plan::ranges`), on the record's arguments as the op will take
// them (`stack`): true when every such tensor has no elements, is a meta tensor (values the guard does not know) or
// has its smallest and largest values in [low, high) -- as `guards.bounds` reads them, the GIL
// released as Python's binding releases it. False for values out of range, and for anything the guard would read
// otherwise than here (a dtype other than an integer one, an error): the record then goes to the Python path, which
// runs the guard itself and raises its error (no side effect was made here).
bool in_ranges(const Plan& p, const torch::jit::Stack& stack) {
  for (const auto& r : p.ranges) {
    if (r.arg >= stack.size() || !stack[r.arg].isTensor()) return false;
    const at::Tensor& t = stack[r.arg].toTensor();
    if (!t.defined()) return false;
    if (t.numel() == 0 || t.device().is_meta()) continue;
    const auto st = t.scalar_type();
    if (st != at::kLong && st != at::kInt && st != at::kShort && st != at::kChar && st != at::kByte) return false;
    int64_t lo = 0, hi = 0;
    try {
      py::gil_scoped_release nogil;
      if (t.device().is_cpu()) {  // a read is free on the CPU (`guards.bounds`)
        auto got = at::aminmax(t);
        lo = std::get<0>(got).item<int64_t>();
        hi = std::get<1>(got).item<int64_t>();
      } else {  // both values in one tensor, read on the host with one copy: each `.item()` is a wait for the stream
        at::Tensor both = at::empty({2}, t.options());
        at::Tensor mn = both.select(0, 0), mx = both.select(0, 1);
        at::aminmax_out(mn, mx, t);
        const at::Tensor host = both.to(at::kCPU).to(at::kLong);
        lo = host.data_ptr<int64_t>()[0];
        hi = host.data_ptr<int64_t>()[1];
      }
    } catch (const std::exception&) {
      return false;
    }
    if (lo < r.low || hi >= r.high) return false;
  }
  return true;
}

// `Plan::devices`: each pair of the record's tensor arguments on one device; false for anything else (a tensor
// missing, or on another device: the Python path runs the guard and raises its error)
bool same_devices(const Plan& p, const torch::jit::Stack& stack) {
  for (const auto& [a, b] : p.devices) {
    if (a >= stack.size() || b >= stack.size() || !stack[a].isTensor() || !stack[b].isTensor()) return false;
    const at::Tensor& x = stack[a].toTensor();
    const at::Tensor& y = stack[b].toTensor();
    if (!x.defined() || !y.defined() || x.device() != y.device()) return false;
  }
  return true;
}

// The keys of a plain dense CPU tensor (the daemon's fake GPU and CPU devices): a tensor with any key beyond these
// (another device, sparse, quantized, a Python subclass, conjugate or negative bits, a zero tensor, ...) has its
// view made by the dispatcher's `as_strided`
const c10::DispatchKeySet PLAIN_CPU({c10::DispatchKey::CPU, c10::DispatchKey::ADInplaceOrView,
                                     c10::DispatchKey::AutogradCPU, c10::DispatchKey::AutocastCPU});

// A view argument's tensor, once `compact.view_of`'s checks passed against `v` as it is now. For a plain dense CPU
// tensor it is made as the CPU kernel of `aten::as_strided` makes it (`at::native::as_strided_tensorimpl`: a
// TensorImpl on the same storage, its geometry set, and the storage bounds checked again by `setStrided`), without
// the dispatcher's autograd and ADInplaceOrView layers (~3.4k instructions a view): the daemon records no autograd
// history (its workers run with grad mode off), so the view's autograd metadata (`_base`, a version counter shared
// with `v`) would go unused. Any other tensor goes through the dispatcher as before.
//
// Where the view must be the dispatcher's (`Plan::direct_views` false: a Python run, an op returning its argument),
// a plain dense CPU tensor's is made as the dispatcher makes it, without the dispatcher: the CPU kernel's
// TensorImpl as above, then what `aten::as_strided`'s ADInplaceOrView kernel does with it, `as_view` with no view
// function (the kernel makes one only for a tensor without `support_as_strided` or under view replay) and the
// creation meta it picks (`_base`, `_is_view`, the shared version counter and `detach_`'s refusal all as there;
// ~3.6k instructions a view through the dispatcher). Only where the layers above it would add nothing: the
// Autograd kernel records history only for a tensor that requires grad under grad mode and a tangent only for one
// with a forward grad, and no thread-local key is included (a Python mode, functionalization) or excludes
// ADInplaceOrView; anything else goes through the dispatcher as before. ("No key included" is none beyond the
// thread's default ones, BackendSelect and ADInplaceOrView, which the local set always includes: until round 46 the
// test was `included_.empty()`, never true, so every such view went through the dispatcher.)
int64_t plain_views = 0;  // views made here for a Python run or an op returning its argument (tests: `plain_views`)
bool views_here(const at::Tensor& v) {
  const auto tls = c10::impl::tls_local_dispatch_key_set();
  if (!(tls.included_ - c10::default_included_set).empty() || tls.excluded_.has(c10::DispatchKey::ADInplaceOrView)) {
    return false;
  }
  if (c10::AutogradState::get_tls_state().get_view_replay_enabled()) return false;
  if (!v.unsafeGetTensorImpl()->support_as_strided()) return false;
  if (at::GradMode::is_enabled() && v.requires_grad()) return false;
  return !v._fw_grad(0).defined();
}

// An empty CPU storage: what a kept view (`Shells`) points at between runs, holding no session's memory
const c10::Storage& no_storage() {
  static const c10::Storage* empty = new c10::Storage(c10::Storage::use_byte_size_t(), 0,
                                                      c10::GetAllocator(c10::DeviceType::CPU), /*resizable=*/false);
  return *empty;
}

// The direct views of a run (`view_of` with `direct`), their TensorImpls kept in their `Input`s from record to record
// and from run to run: a view made per record was ~1.2k instructions (its allocation, `setStrided`'s checks and
// `set_sizes_and_strides`, its destruction after the op; the encoder's records pass 2 views each), and a kept one is
// given the viewed tensor's storage (`set_storage_keep_dtype`) where nothing else holds it: the same TensorImpl as
// `as_strided_tensorimpl` makes, as the op sees it (the geometry set once, the viewed tensor's dtype and key set, its
// storage). It is reused only where this is exact: the kept TensorImpl has no other reference, strong or weak (an op
// that returned it or kept it: it is left to them and a new one is made), its geometry, dtype and key set are the
// ones it would be made with, and its metadata may change (an op that locked it: a new one is made). Between runs it
// holds no memory of a session: when a run ends (`release`, also when it raises), every view it used is pointed at an
// empty storage, or let go where something else holds it. A run's Free records (round 40) may let a handle go while
// a kept view of it still holds its storage: that memory, which the session's accounting already let go, stays held
// until the run ends (round 46's review: the comment here said a run frees none).
at::Tensor kept_view(const at::Tensor& v, const Input& in) {
  at::Tensor& sh = in.shell;
  if (sh.defined() && sh.use_count() == 1 && sh.weak_use_count() == 1 && in.shell_keys == v.key_set()) {
    c10::TensorImpl* impl = sh.unsafeGetTensorImpl();
    if (impl->allow_tensor_metadata_change() && impl->dtype() == v.dtype() &&
        impl->storage_offset() == in.view_offset && impl->sizes() == at::IntArrayRef(in.view_sizes) &&
        impl->strides() == at::IntArrayRef(in.view_strides)) {
      impl->set_storage_keep_dtype(v.storage());
      ++in.shell_reused;
      return sh;
    }
  }
  at::Tensor t = at::native::as_strided_tensorimpl(v, in.view_sizes, in.view_strides, in.view_offset);
  sh = t;
  in.shell_keys = v.key_set();
  return t;
}

at::Tensor view_of(const at::Tensor& v, const Input& in, bool direct) {
  if ((v.key_set().raw_repr() & ~PLAIN_CPU.raw_repr()) == 0 && v.device().is_cpu()) {
    if (direct) return kept_view(v, in);
    if (views_here(v)) {
      at::Tensor t = at::native::as_strided_tensorimpl(v, in.view_sizes, in.view_strides, in.view_offset);
      ++plain_views;
      using torch::autograd::CreationMeta;
      const CreationMeta meta = c10::InferenceMode::is_enabled() ? CreationMeta::INFERENCE_MODE
                                : at::GradMode::is_enabled()     ? CreationMeta::DEFAULT
                                                                 : CreationMeta::NO_GRAD_MODE;
      return torch::autograd::as_view(v, t, true, true, nullptr, nullptr, meta);
    }
  }
  return v.as_strided(in.view_sizes, in.view_strides, in.view_offset);
}

// An external input's dtype, sizes, strides and storage offset those of its plan (`Input`): compared in place,
// element by element (`IntArrayRef`'s `==` was a call of its own for each of the two lists, ~35 instructions each)
inline bool same_meta(const at::Tensor& v, const Input& in) {
  if (v.scalar_type() != in.dtype) return false;
  const c10::IntArrayRef sizes = v.sizes(), strides = v.strides();
  const size_t n = in.sizes.size();
  if (sizes.size() != n || strides.size() != in.strides.size()) return false;
  for (size_t d = 0; d < n; ++d) {
    if (sizes[d] != in.sizes[d]) return false;
  }
  for (size_t d = 0; d < strides.size(); ++d) {
    if (strides[d] != in.strides[d]) return false;
  }
  return v.storage_offset() == in.storage_offset;
}

// An output `bind_new` binds (a plain dense tensor of at most MAX_DIMS dimensions); any other goes through
// `_bind_outputs`
inline bool bindable(const at::Tensor& t) {
  return t.defined() && t.layout() == at::kStrided && !t.is_quantized() && !t.is_nested() && t.dim() <= MAX_DIMS;
}

// `p.owner.run is p.run`: read from the owner's slot where its type is as it was when the plan was made (`Plan`:
// ~10 instructions, not getattr's ~160), else through getattr (which raises where it raises)
bool runs_its_own(const Plan& p) {
  PyObject* o = p.owner.ptr();
  if (p.run_offset > 0 && Py_TYPE(o) == p.owner_type && p.owner_type->tp_version_tag == p.owner_tag) {
    PyObject* r = *reinterpret_cast<PyObject**>(reinterpret_cast<char*>(o) + p.run_offset);  // borrowed
    if (r != nullptr) return r == p.run.ptr();
  }
  PyObject* r = PyObject_GetAttr(o, S_run);
  if (r == nullptr) throw py::error_already_set();
  const bool same = r == p.run.ptr();
  Py_DECREF(r);
  return same;
}

struct Trace {
  std::vector<std::shared_ptr<Plan>> steps;  // null where a step runs in Python
  // a weak reference to the `runs.Trace` it was compiled from (None: no chaining), for `Ctx::follow`: its `next`
  py::object origin = py::none();
};

// pybind11's record of the Trace class (set where the module registers it)
const py::detail::type_info* trace_type = nullptr;

// The Trace `o` holds where it is one (of that exact type: `runs.Trace.native` is None, False or a Trace made by
// `compile_trace`), else null: what `py::isinstance<Trace>` and `cast<const Trace&>` find, without their lookups of
// the C++ type (a hash of its name each, ~500 instructions a `follow`).
const Trace* trace_of(PyObject* o) {
  if (trace_type == nullptr || Py_TYPE(o) != trace_type->type) return nullptr;
  auto vh = reinterpret_cast<py::detail::instance*>(o)->get_value_and_holder(trace_type, false);
  return vh ? vh.value_ptr<Trace>() : nullptr;
}

inline double now() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);  // time.perf_counter's clock
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

// An int's value where it fits in 64 bits (false, no error set, where it does not or `v` is no int). An exact int of
// at most two digits (|v| < 2^60: a handle, a storage's address, a byte count) is read from its digits, as CPython's
// own fast paths read them (3.11's layout: `ob_size` the signed digit count; ~5 instructions, not the ~35 of
// `PyLong_AsLongLongAndOverflow`: a freed handle read three such ints, an output one)
inline bool as_i64(PyObject* v, int64_t* out) {
#if PY_VERSION_HEX < 0x030C0000 && PYLONG_BITS_IN_DIGIT == 30
  if (PyLong_CheckExact(v)) {
    const Py_ssize_t n = Py_SIZE(v);
    const digit* d = reinterpret_cast<PyLongObject*>(v)->ob_digit;
    if (n >= -2 && n <= 2) {
      const int64_t lo = n == 0 ? 0 : static_cast<int64_t>(d[0]);
      const int64_t m = n == 2 || n == -2 ? lo | static_cast<int64_t>(d[1]) << 30 : lo;
      *out = n < 0 ? -m : m;
      return true;
    }
  }
#endif
  int overflow = 0;
  long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
  if (overflow || (x == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return false;
  }
  *out = x;
  return true;
}

// `key in d` for a dict: an empty one (a session's failed handles, nearly always) without hashing the key
inline int contains(PyObject* d, PyObject* key) { return PyDict_GET_SIZE(d) == 0 ? 0 : PyDict_Contains(d, key); }

// The per-op tables' operations with the key's hash given. Their keys are non-negative ints whose value the caller
// knows (a handle, a storage's address: `storage_key`), and CPython hashes such an int as its value modulo 2^61 - 1
// (`long_hash`, on a 64-bit build): through `PyObject_Hash` that is ~45 instructions a call, and an eager op made
// ~10 such calls (its output's check, its inputs' lookups, `bind_new`'s three tables). The dict is the same, with the
// same entries; only who computes the hash differs. `known_hash` is set at load where `PyObject_Hash` agrees with
// `int_hash` on a few values (checked once: a build whose hash differs takes the plain calls); Python 3.13 made the
// known-hash calls private: the plain calls there.
#if PY_VERSION_HEX < 0x030D0000
#define GPUPOOL_KNOWN_HASH 1
#endif
bool known_hash = false;

// (v mod 2^61 - 1 as a Mersenne reduction: v = hi * 2^61 + lo is hi + lo modulo 2^61 - 1, and hi + lo < 2 * (2^61 - 1)
// + 1; a 64-bit `%` by the constant was ~25 instructions, ~3 such hashes an op)
inline Py_hash_t int_hash(uint64_t v) {
  constexpr uint64_t M = (uint64_t{1} << 61) - 1;
  uint64_t r = (v & M) + (v >> 61);
  if (r >= M) r -= M;
  return static_cast<Py_hash_t>(r);
}

// `d.get(key)` (borrowed; nullptr: missing, or the error set) where `key` is an int of value `v`
inline PyObject* get_item(PyObject* d, PyObject* key, uint64_t v) {
#ifdef GPUPOOL_KNOWN_HASH
  if (known_hash) return _PyDict_GetItem_KnownHash(d, key, int_hash(v));
#endif
  (void)v;
  return PyDict_GetItemWithError(d, key);
}

// `key in d` where `key` is an int of value `v`
inline int has_item(PyObject* d, PyObject* key, uint64_t v) {
#ifdef GPUPOOL_KNOWN_HASH
  if (known_hash) return _PyDict_Contains_KnownHash(d, key, int_hash(v));
#endif
  (void)v;
  return PyDict_Contains(d, key);
}

// `d[key] = value` where `key` is an int of value `v`
inline int set_item(PyObject* d, PyObject* key, PyObject* value, uint64_t v) {
#ifdef GPUPOOL_KNOWN_HASH
  if (known_hash) return _PyDict_SetItem_KnownHash(d, key, value, int_hash(v));
#endif
  (void)v;
  return PyDict_SetItem(d, key, value);
}

// `del d[key]` where `key` is an int of value `v`
inline int del_item(PyObject* d, PyObject* key, uint64_t v) {
#ifdef GPUPOOL_KNOWN_HASH
  if (known_hash) return _PyDict_DelItem_KnownHash(d, key, int_hash(v));
#endif
  (void)v;
  return PyDict_DelItem(d, key);
}

// Whether `PyObject_Hash` of ints agrees with `int_hash` (at load; false where it does not, or where unsure)
bool check_known_hash() {
  const uint64_t probes[] = {0, 1, 12345, (uint64_t{1} << 32) | 7, (uint64_t{1} << 61) - 2, (uint64_t{1} << 61) - 1,
                             uint64_t{1} << 61, (uint64_t{0x7fff} << 32) | 0xfffffff0u, ~uint64_t{0}};
  for (const uint64_t v : probes) {
    PyObject* o = PyLong_FromUnsignedLongLong(v);
    if (o == nullptr) {
      PyErr_Clear();
      return false;
    }
    const Py_hash_t h = PyObject_Hash(o);
    Py_DECREF(o);
    if (h == -1) PyErr_Clear();
    if (h != int_hash(v)) return false;
  }
  return true;
}

// A new reference, released at the end of its scope with a plain Py_XDECREF (pybind11's object checks the GIL on
// every reference change, ~50 instructions each; `Ctx.run` holds the GIL throughout, but for the op's call)
struct Own {
  PyObject* p;
  explicit Own(PyObject* o) : p(o) {}
  ~Own() { Py_XDECREF(p); }
  Own(const Own&) = delete;
  Own& operator=(const Own&) = delete;
  void reset(PyObject* o) {  // takes `o`'s reference
    PyObject* old = p;
    p = o;
    Py_XDECREF(old);
  }
};

// `o.<name>` as an int64: false when it is not an int that fits
bool attr_i64(PyObject* o, PyObject* name, int64_t* out) {
  Own v(PyObject_GetAttr(o, name));
  if (v.p == nullptr) throw py::error_already_set();
  return as_i64(v.p, out);
}

// `o.<name> += n`
void add_attr(PyObject* o, PyObject* name, int64_t n) {
  Own v(PyObject_GetAttr(o, name));
  if (v.p == nullptr) throw py::error_already_set();
  Own d(PyLong_FromLongLong(n));
  if (d.p == nullptr) throw py::error_already_set();
  Own w(PyNumber_Add(v.p, d.p));
  if (w.p == nullptr || PyObject_SetAttr(o, name, w.p) < 0) throw py::error_already_set();
}

// The int attributes (`used`, `ops`) of a session or of its device's memory, for one `Ctx.run`: read and written in
// the object's instance dict, which is where Python's own attribute access reads and writes them when the type has
// the generic getattr and setattr and defines no data descriptor (a property, a slot) of that name (~100
// instructions a read and ~150 an add, against ~250 and ~650 through getattr and setattr). An object of any other
// type, a name missing from the dict (Python would read the class's value) or a value that is not an int that fits
// goes through `attr_i64` / `add_attr`. Fetched at each `run`: a dict a callback replaced is never written to.
struct Fields {
  PyObject* o;
  Own dict{nullptr};
  Fields(PyObject* obj, std::initializer_list<PyObject*> names) : o(obj) {
    PyTypeObject* tp = Py_TYPE(o);
    if (tp->tp_getattro != PyObject_GenericGetAttr || tp->tp_setattro != PyObject_GenericSetAttr) return;
    for (PyObject* name : names) {
      PyObject* d = _PyType_Lookup(tp, name);  // borrowed
      if (d != nullptr && Py_TYPE(d)->tp_descr_set != nullptr) return;
    }
    PyObject* d = PyObject_GenericGetDict(o, nullptr);
    if (d == nullptr) {
      PyErr_Clear();  // no instance dict: getattr and setattr say what they say
      return;
    }
    if (!PyDict_CheckExact(d)) {
      Py_DECREF(d);
      return;
    }
    dict.reset(d);
  }
  // `o.<name>` as an int64: false when it is not an int that fits
  bool get(PyObject* name, int64_t* out) {
    if (dict.p != nullptr) {
      PyObject* v = PyDict_GetItemWithError(dict.p, name);  // borrowed
      if (v != nullptr && PyLong_CheckExact(v)) return as_i64(v, out);
      if (v == nullptr && PyErr_Occurred()) throw py::error_already_set();
    }
    return attr_i64(o, name, out);
  }
  // `o.<name> += n`
  void add(PyObject* name, int64_t n) {
    if (dict.p != nullptr) {
      PyObject* v = PyDict_GetItemWithError(dict.p, name);  // borrowed
      int64_t x = 0, sum = 0;
      if (v != nullptr && PyLong_CheckExact(v) && as_i64(v, &x) && !__builtin_add_overflow(x, n, &sum)) {
        Own w(PyLong_FromLongLong(sum));
        if (w.p == nullptr || PyDict_SetItem(dict.p, name, w.p) < 0) throw py::error_already_set();
        return;
      }
      if (v == nullptr && PyErr_Occurred()) throw py::error_already_set();
    }
    add_attr(o, name, n);
  }
};

// The op, as torch's Python binding runs it (`invokeOperatorFromPython`): the GIL released, torch's warnings and
// errors translated as `HANDLE_TH_ERRORS` does. nullptr with the Python error set when it raised.
// `sessions.zero_bytes(t.untyped_storage(), 0, nbytes)`: the same ops (a byte view of the whole storage, zeroed),
// the GIL released as Python's binding releases it. nullptr with the Python error set when it raised.
PyObject* zero_storage(const at::Tensor& t) {
  HANDLE_TH_ERRORS
  {
    py::gil_scoped_release nogil;
    const c10::Storage& st = t.storage();
    at::Tensor bytes = at::empty({0}, at::TensorOptions().dtype(at::kByte).device(st.device()));
    bytes.set_(st, 0, {static_cast<int64_t>(st.nbytes())}, {1});
    bytes.zero_();
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// `release_gil` false (`Ctx::run`'s pinned records: the process's only Python thread) keeps the GIL across the op.
PyObject* call_op(const c10::OperatorHandle& op, torch::jit::Stack& stack, bool below_autograd, bool release_gil) {
  HANDLE_TH_ERRORS
  {
    std::optional<py::gil_scoped_release> nogil;
    if (release_gil) nogil.emplace();
    std::optional<c10::impl::ExcludeDispatchKeyGuard> no_autograd;  // at::AutoDispatchBelowAutograd, where asked
    if (below_autograd) no_autograd.emplace(c10::autograd_dispatch_keyset);
    op.callBoxed(stack);
  }
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

int64_t pinned_records = 0;  // records whose op ran with the GIL kept and its inputs pinned (tests: `pinned`)

// Whether this thread is the interpreter's only one (no other thread state: no other Python thread can be waiting
// for the GIL, nor run Python code while an op runs)
bool only_python_thread() {
  PyThreadState* head = PyInterpreterState_ThreadHead(PyInterpreterState_Get());
  return head != nullptr && PyThreadState_Next(head) == nullptr;
}

// torch's count of a TensorImpl's references (`intrusive_ptr_target::combined_refcount_`, private), for `Pins`:
// reached through the pointer to the member that an explicit instantiation hands out (access is not checked in
// an explicit instantiation's arguments, [temp.spec.general])
using RefcountMember = std::atomic<uint64_t> c10::intrusive_ptr_target::*;
RefcountMember refcount_member();
template <RefcountMember M>
struct RefcountAccess {
  friend RefcountMember refcount_member() { return M; }
};
template struct RefcountAccess<&c10::intrusive_ptr_target::combined_refcount_>;
std::atomic<uint64_t>& combined_refcount(c10::TensorImpl* t) {
  return static_cast<c10::intrusive_ptr_target*>(t)->*refcount_member();
}

// A record's input tensors held by one reference of the runner's own until its op returned, as `held` holds them
// (the kernel's references, the stack's, then never drop the last C++ one), but counted without torch's PyObject
// hooks: an `at::Tensor` copy at 1 -> 2 references calls `incref_pyobject` and its end at 2 -> 1 `decref_pyobject`,
// each a `gil_scoped_acquire` (~250 instructions an input, round 41's `held`). Only where no Python code runs while
// a pin is held (`Ctx::run`'s `pin`: the GIL kept across the op, the process's only Python thread, a word mark): the
// tensor's Python object, held by the session's table, outlives its pin, and nothing reads the count meanwhile.
// The release puts the hooks' state right, as torch's own counting keeps it: the Python object owned by the
// TensorImpl exactly while a C++ reference besides the object's is left (an op that returned its input).
struct Pins {
  struct Pin {
    c10::TensorImpl* t;
    bool owned;  // the TensorImpl owned its Python object when pinned (a C++ reference besides the object's)
  };
  std::vector<Pin> v;
  std::vector<Pin>& home;
  // The pinned TensorImpls by address once a record pins more than `SCAN` (a `_foreach_` op's lists: a parameter's
  // tensors in each of 2-4 lists), for `add`'s test of a tensor pinned twice in one record: open addressing over a
  // power-of-two table kept at most half full (null: an empty slot), emptied by `release`. A scan of the pins was
  // quadratic in them (the encoder's Adam: ~160 inputs a `_foreach_` record, ~13k comparisons).
  static constexpr size_t SCAN = 16;
  std::vector<c10::TensorImpl*> set;
  std::vector<c10::TensorImpl*>& set_home;
  bool set_used = false;
  Pins(std::vector<Pin>& room, std::vector<c10::TensorImpl*>& set_room) : home(room), set_home(set_room) {
    v.swap(home);
    set.swap(set_home);
  }
  ~Pins() {
    release();
    if (v.capacity() > home.capacity()) v.swap(home);
    if (set.capacity() > set_home.capacity()) set.swap(set_home);
  }
  Pins(const Pins&) = delete;
  Pins& operator=(const Pins&) = delete;
  static size_t slot_of(const c10::TensorImpl* t, size_t mask) {
    return static_cast<size_t>((reinterpret_cast<uintptr_t>(t) >> 4) * 0x9E3779B97F4A7C15ull >> 20) & mask;
  }
  // put `t` in the set; false where it was there already
  bool insert(c10::TensorImpl* t) {
    const size_t mask = set.size() - 1;
    for (size_t i = slot_of(t, mask);; i = (i + 1) & mask) {
      if (set[i] == t) return false;
      if (set[i] == nullptr) {
        set[i] = t;
        return true;
      }
    }
  }
  // whether `t` is pinned already, and (false) room in the set for one more
  bool pinned(c10::TensorImpl* t) {
    if (v.size() < SCAN) {
      for (const Pin& p : v) {
        if (p.t == t) return true;
      }
      return false;
    }
    if (!set_used || 2 * (v.size() + 1) > set.size()) {  // (re)built from the pins, at most half full
      size_t n = 64;
      while (n < 4 * (v.size() + 1)) n <<= 1;
      set.assign(n, nullptr);
      for (const Pin& p : v) insert(p.t);
      set_used = true;
    }
    return !insert(t);
  }
  void add(const at::Tensor& t) {
    c10::TensorImpl* impl = t.unsafeGetTensorImpl();
    if (pinned(impl)) return;  // the same tensor twice in one record
    v.push_back({impl, false});  // first: a push_back that throws (bad_alloc) must leave no count behind
    const uint64_t before = combined_refcount(impl).fetch_add(c10::detail::kReferenceCountOne, std::memory_order_relaxed);
    v.back().owned = c10::detail::has_pyobject(before) && c10::detail::refcount(before) >= 2;
  }
  // the GIL held
  void release() noexcept {
    for (const Pin& p : v) {
      std::atomic<uint64_t>& rc = combined_refcount(p.t);
      if (c10::detail::refcount(rc.load(std::memory_order_acquire)) == 1) {
        // the pin is the last reference (never while the Python object lives): let torch's release end it
        c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>::reclaim(p.t);
        continue;
      }
      const uint64_t after = rc.fetch_sub(c10::detail::kReferenceCountOne, std::memory_order_acq_rel) -
                             c10::detail::kReferenceCountOne;
      const bool owned = c10::detail::has_pyobject(after) && c10::detail::refcount(after) >= 2;
      if (owned && !p.owned) {
        p.t->incref_pyobject();
      } else if (!owned && p.owned) {
        p.t->decref_pyobject();
      }
    }
    v.clear();
    if (set_used) {
      std::fill(set.begin(), set.end(), nullptr);
      set_used = false;
    }
  }
};

// A Python run (`Plan::n_pos` >= 0) called as `_run_step` calls `plan.run`: the record's arguments as the Python
// path's decode gives them (the template's constants, its numbers as the record's ints or floats, the tensors)
// positionally, then by keyword, defaults left out; the GIL held (the function's own ops release it). Its values
// go on `stack` as the op's would: a Tensor for ONE, a tuple's for SEVERAL (None where it is not one: `Ctx::run`
// then reports that the op did not return what its schema says). nullptr with the Python error set when it raised.
PyObject* call_py(const Plan& p, const char* buf, torch::jit::Stack& stack) {
  Own pos(PyTuple_New(static_cast<Py_ssize_t>(p.n_pos)));
  if (pos.p == nullptr) return nullptr;
  Own kw(nullptr);
  const auto& params = p.op->schema().arguments();
  for (size_t a = 0; a < p.args.size(); ++a) {
    const Arg& arg = p.args[a];
    PyObject* v = nullptr;
    if (arg.kind == CONST) {
      if (!arg.pyvalue) continue;  // a default: not passed
      v = Py_NewRef(arg.pyvalue.ptr());
    } else if (arg.kind == INT || arg.kind == INT_AS_DOUBLE) {  // the record's int, as `struct` unpacks it
      int64_t x;
      std::memcpy(&x, buf + arg.offset, 8);
      v = PyLong_FromLongLong(x);
    } else if (arg.kind == DOUBLE) {
      double x;
      std::memcpy(&x, buf + arg.offset, 8);
      v = PyFloat_FromDouble(x);
    } else if (arg.kind == TENSOR && stack[a].isTensor()) {
      v = THPVariable_Wrap(stack[a].toTensor());  // the session's own object
    } else if (arg.kind == TENSOR && stack[a].isNone()) {
      v = Py_NewRef(Py_None);
    } else {
      PyErr_SetString(PyExc_RuntimeError, "native runner: an argument a Python run does not take");
      return nullptr;
    }
    if (v == nullptr) return nullptr;
    if (static_cast<int64_t>(a) < p.n_pos) {
      PyTuple_SET_ITEM(pos.p, static_cast<Py_ssize_t>(a), v);  // steals
      continue;
    }
    Own val(v);
    if (kw.p == nullptr) {
      kw.reset(PyDict_New());
      if (kw.p == nullptr) return nullptr;
    }
    if (PyDict_SetItemString(kw.p, params[a].name().c_str(), val.p) < 0) return nullptr;
  }
  stack.clear();
  PyObject* got = PyObject_Call(p.run.ptr(), pos.p, kw.p);
  if (got == nullptr) return nullptr;
  if (p.returns == ONE) {
    stack.emplace_back(THPVariable_Check(got) ? c10::IValue(THPVariable_Unpack(got)) : c10::IValue());
  } else if (p.returns == SEVERAL && PyTuple_Check(got)) {
    for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(got); ++j) {
      PyObject* o = PyTuple_GET_ITEM(got, j);
      stack.emplace_back(THPVariable_Check(o) ? c10::IValue(THPVariable_Unpack(o)) : c10::IValue());
    }
  } else if (p.returns != NOTHING || got != Py_None) {
    stack.emplace_back();
  }
  return got;
}

// The device's generator held for a seeded record (`CommandExecutor._seeded`'s `with dev.rng_lock`): `release`
// is the lock's bound method while it is held; `drop` releases it (also on the way out of a raise).
struct RngHold {
  PyObject* release = nullptr;  // borrowed from the context
  void drop() {
    if (release == nullptr) return;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);  // an error being reported stays the one reported
    PyObject* r = PyObject_CallNoArgs(release);
    if (r == nullptr) PyErr_WriteUnraisable(release);
    Py_XDECREF(r);
    PyErr_Restore(type, value, tb);
    release = nullptr;
  }
  ~RngHold() { drop(); }
};

enum Flags { END = 1, OVER = 2 };

// A writable buffer of at least 4 bytes held for one `Ctx.run` (buf stays nullptr for anything else)
struct Word {
  Py_buffer view{};
  void* buf = nullptr;
  explicit Word(const py::object& o) {
    if (o.is_none() || !PyObject_CheckBuffer(o.ptr())) return;
    if (PyObject_GetBuffer(o.ptr(), &view, PyBUF_WRITABLE) < 0) throw py::error_already_set();
    if (view.len < 4) {
      PyBuffer_Release(&view);
      throw std::invalid_argument("a progress word of fewer than 4 bytes");
    }
    buf = view.buf;
  }
  ~Word() {
    if (buf != nullptr) PyBuffer_Release(&view);
  }
  Word(const Word&) = delete;
  Word& operator=(const Word&) = delete;
};

PyObject* S_used;
PyObject* S_ops;
PyObject* S_next;
PyObject* S_alt;
PyObject* S_quota;
PyObject* S_flops;
PyObject* S_native;

// `o.<name>` read from its `__slots__` member where getattr would read it there: the type's generic getattr, the
// name's class attribute a member descriptor of an object slot (a data descriptor: it wins over anything else), the
// type's attribute cache tag the one it had when the slot was found (any change to the class gives it another).
// Borrowed; null where the slot is empty or the type is another (then getattr: its error, its value). `Plan`'s
// `run_offset` reads `OpPlan.run` so; `Ctx::follow` reads a `runs.Trace`'s `next`, `alt`, `quota`, `flops` and
// `native` so (~100-150 instructions each through getattr, ~5 here).
struct SlotOf {
  PyObject* name;
  PyTypeObject* type = nullptr;
  unsigned int tag = 0;
  Py_ssize_t offset = -1;
  explicit SlotOf(PyObject* n) : name(n) {}
  PyObject* read(PyObject* o) {
    PyTypeObject* tp = Py_TYPE(o);
    if (tp != type || tp->tp_version_tag != tag || !PyType_HasFeature(tp, Py_TPFLAGS_VALID_VERSION_TAG)) find(tp);
    if (offset <= 0) return nullptr;
    return *reinterpret_cast<PyObject**>(reinterpret_cast<char*>(o) + offset);
  }

 private:
  void find(PyTypeObject* tp) {
    type = nullptr;
    offset = -1;
    if (tp->tp_getattro != PyObject_GenericGetAttr) return;
    PyObject* d = _PyType_Lookup(tp, name);  // borrowed; sets the type's valid tag where it can
    if (d == nullptr || Py_TYPE(d) != &PyMemberDescr_Type || tp->tp_version_tag == 0 ||
        !PyType_HasFeature(tp, Py_TPFLAGS_VALID_VERSION_TAG)) {
      return;
    }
    const PyMemberDef* m = reinterpret_cast<PyMemberDescrObject*>(d)->d_member;
    if (m->type != T_OBJECT_EX || m->offset <= 0) return;
    type = tp;
    tag = tp->tp_version_tag;
    offset = m->offset;
  }
};
// `o.<name>` (a new reference; null with the error set): from its slot where `SlotOf` finds it, else getattr
PyObject* slot_attr(SlotOf& slot, PyObject* o) {
  PyObject* v = slot.read(o);
  return v != nullptr ? Py_NewRef(v) : PyObject_GetAttr(o, slot.name);
}
PyObject* S_whole;  // `opargs.WHOLE`

// ==== The fused attention's eager compositions in C++ (rounds 45, 46) ==============================================
// server/attention.py runs `aten::_scaled_dot_product_fused_attention_overrideable` and its backward as Python
// compositions on every device (no kernel of the overrideable backend exists on the daemon's): ~10-40 aten calls a
// call through torch's Python bindings. A learned run's step of either (`Plan::in_cpp`, set by
// native_runner.py `_compile`) runs here the eager calls with dropout that the encoders make: the forward that keeps
// its softmax and mask (`_dropout_forward_saving`) and the backward from them (`_dropout_backward` with
// `_saved_scores`), the same aten ops on the same operands in the same order, so the same bits, the same draws from
// the session's generator and the same generator state after; and (round 46) the calls without dropout that
// eval-mode inference and models without attention dropout make: `forward`'s and `backward`'s kernel paths (a fake
// GPU's CPU flash kernels, a CUDA device's mem-efficient ones; `forward_kernels`, `backward_kernels`). Anything else
// -- the math composition (unequal head sizes, empty tensors, the efficient kernel's constraints or its own refusal),
// float64 without dropout, a bias's gradient, a backward whose philox_seed holds the state alone (a graph's
// forward), another device type, and every input `check_forward` / `check_backward` refuse -- is declined before
// any side effect, and the Python run takes the record (`call_py`): its rules and its error messages stay the only
// ones. A change to the Python compositions (or their checks) must be made here too, and the other way round
// (tests/unit/test_server_attention_native.py compares them).
namespace attn {

int64_t native_calls = 0;  // calls run here (tests: `attention_calls`)

constexpr int64_t CPU_STATE_BYTES = 5056;  // attention.py `_CPU_STATE_BYTES`: the CPU's mt19937 state
constexpr int64_t CUDA_STATE_BYTES = 16;  // a CUDA generator's seed and offset

bool low(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

bool floating(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// attention.py `_dense`: non-overlapping and dense, by (stride, size) pairs in order
bool dense(const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;
  for (int64_t d = 0; d < t.dim(); ++d) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t expected = 1;
  for (const auto& [stride, size] : dims) {
    if (size != 1 && stride != expected) return false;
    expected *= size;
  }
  return true;
}

// the strides `torch.empty_like(ref, device="meta")` gives
std::vector<int64_t> like_strides(const at::Tensor& ref) {
  return at::empty_like(ref, at::TensorOptions().device(at::kMeta)).strides().vec();
}

// attention.py `_like`
at::Tensor like(const at::Tensor& ref, const at::Tensor& t) {
  if (t.sizes() == ref.sizes() && t.strides() == ref.strides() && dense(ref)) return t;
  if (t.strides() == at::IntArrayRef(like_strides(ref))) return t;
  return at::empty_like(ref).copy_(t);
}

// attention.py `_matching_layout`
at::Tensor matching_layout(const at::Tensor& q, const at::Tensor& t) {
  if (t.sizes() == q.sizes()) return like(q, t);
  std::vector<int64_t> order = {0, 1, 2, 3};
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return q.stride(a) > q.stride(b); });
  std::vector<int64_t> strides(4, 0);
  int64_t stride = 1;
  for (auto it = order.rbegin(); it != order.rend(); ++it) {
    strides[*it] = stride;
    stride *= t.size(*it);
  }
  if (t.strides() == at::IntArrayRef(strides)) return t;
  return at::empty_strided(t.sizes(), strides, at::TensorOptions().dtype(t.scalar_type()).device(t.device())).copy_(t);
}

// a Python float where an aten op takes a Tensor (`t.mul_(x)`, `torch.mul(t, x, out=)`): torch's Python argument
// parser makes it a wrapped number (`PythonArgs::tensor_slow`)
at::Tensor wrapped(double x) {
  at::Tensor t = c10::scalar_to_tensor(at::Scalar(x));
  t.unsafeGetTensorImpl()->set_wrapped_number(true);
  return t;
}

// attention.py `_scaled_like`
at::Tensor scaled_like(const at::Tensor& ref, const at::Tensor& t, double factor, bool transposed) {
  const std::vector<int64_t> want = dense(ref) ? ref.strides().vec() : like_strides(ref);
  const at::Tensor seen = transposed ? t.transpose(-2, -1) : t;
  if (seen.sizes() != ref.sizes() || seen.strides() == at::IntArrayRef(want) || t.scalar_type() != ref.scalar_type()) {
    at::Tensor product = at::mul(t, at::Scalar(factor));
    return like(ref, transposed ? product.transpose(-2, -1) : product);
  }
  at::Tensor target = at::empty_like(ref);
  at::Tensor dest = transposed ? target.transpose(-2, -1) : target;
  at::mul_out(dest, t, wrapped(factor));
  return target;
}

// attention.py `_root_scales`
std::pair<double, double> root_scales(int64_t head, std::optional<double> scale) {
  if (!scale) {
    const double root = head ? std::sqrt(1.0 / std::sqrt(static_cast<double>(head))) : 1.0;
    return {root, root};
  }
  const double root = std::sqrt(std::abs(*scale));
  return {*scale < 0 ? 0.0 - root : root, root};
}

// `_dropout_math`'s first steps: low precision in float32, the scales' roots, the query scaled by its own
struct MathInputs {
  at::Tensor q, k, v;
  double q_root, k_root;
};
MathInputs math_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                       std::optional<double> scale) {
  MathInputs m{query, key, value, 0.0, 0.0};
  if (low(query.scalar_type())) {
    m.q = m.q.to(at::kFloat);
    m.k = m.k.to(at::kFloat);
    m.v = m.v.to(at::kFloat);
  }
  std::tie(m.q_root, m.k_root) = root_scales(m.q.size(-1), scale);
  m.q = at::mul(m.q, at::Scalar(m.q_root));
  return m;
}

// attention.py `_operands`: the 3-D operands of a 4-D matmul over the common batch
std::pair<at::Tensor, at::Tensor> operands(const at::Tensor& a, const at::Tensor& b) {
  const int64_t b0 = std::max(a.size(0), b.size(0)), b1 = std::max(a.size(1), b.size(1));
  at::Tensor a3 = a.expand({b0, b1, a.size(2), a.size(3)}).reshape({b0 * b1, a.size(2), a.size(3)});
  at::Tensor b3 = b.expand({b0, b1, b.size(2), b.size(3)}).reshape({b0 * b1, b.size(2), b.size(3)});
  return {std::move(a3), std::move(b3)};
}

// attention.py `_saved_sizes`: (shape, dtype, bytes after the state) of an eager forward's kept softmax and mask
struct Sizes {
  std::vector<int64_t> shape;
  at::ScalarType dtype;
  int64_t n = 0, item = 0, extra = 0;
};
Sizes saved_sizes(const at::Tensor& q, const at::Tensor& k) {
  Sizes s;
  s.dtype = low(q.scalar_type()) ? at::kFloat : q.scalar_type();
  s.shape = {q.size(0), q.size(1), q.size(2), k.size(2)};
  s.n = s.shape[0] * s.shape[1] * s.shape[2] * s.shape[3];
  s.item = static_cast<int64_t>(c10::elementSize(s.dtype));
  s.extra = (s.n * s.item + s.n + 7) / 8 * 8;
  return s;
}

int64_t state_bytes(const at::Device& d) { return d.is_cuda() ? CUDA_STATE_BYTES : CPU_STATE_BYTES; }

// `check_forward`'s rules as a yes, dropout_p aside: true where it passes them and the call is one this code runs
// (non-empty tensors on one CPU or CUDA device, strided); false: the Python run takes the call (and raises)
bool fits_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias,
                 std::optional<double> scale, bool debug) {
  if (!q.defined() || !k.defined() || !v.defined()) return false;
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4) return false;
  const at::ScalarType dtype = q.scalar_type();
  if (!floating(dtype) || k.scalar_type() != dtype || v.scalar_type() != dtype) return false;
  if (k.size(0) != q.size(0) || v.size(0) != q.size(0) || k.size(1) != q.size(1) || v.size(1) != q.size(1)) {
    return false;
  }
  if (k.size(2) != v.size(2) || k.size(3) != q.size(3)) return false;
  if (debug) return false;
  if (scale && !std::isfinite(*scale)) return false;
  const at::Device dev = q.device();
  if (!(dev.is_cpu() || dev.is_cuda()) || k.device() != dev || v.device() != dev) return false;
  for (const at::Tensor* t : {&q, &k, &v}) {
    if (t->layout() != at::kStrided || t->numel() == 0 || t->is_quantized() || t->is_nested() || t->is_conj() ||
        t->is_neg()) {
      return false;
    }
  }
  if (bias.defined()) {
    if (bias.scalar_type() != at::kBool && bias.scalar_type() != dtype) return false;
    if (bias.dim() < 2 || bias.dim() > 4 || bias.device() != dev || bias.layout() != at::kStrided) return false;
    if (bias.numel() == 0 || bias.is_conj() || bias.is_neg()) return false;
    const int64_t scores[4] = {q.size(0), q.size(1), q.size(2), k.size(2)};
    for (int64_t j = 1; j <= bias.dim(); ++j) {
      const int64_t n = bias.size(-j), want = scores[4 - j];
      if (n != 1 && n != want) return false;
    }
  }
  return true;
}

// the dropout composition's calls: dropout_p in (0, 1)
bool fits_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias, double p,
                  std::optional<double> scale, bool debug) {
  return p > 0.0 && p < 1.0 && fits_inputs(q, k, v, bias, scale, debug);
}

// attention.py `_float_bias`: a bool mask as 0 / -inf in `dtype`
at::Tensor float_bias(const at::Tensor& bias, at::ScalarType dtype) {
  if (!bias.defined() || bias.scalar_type() != at::kBool) return bias;
  at::Tensor zeros = at::zeros(bias.sizes(), at::TensorOptions().dtype(dtype).device(bias.device()));
  return zeros.masked_fill_(bias.logical_not(), -std::numeric_limits<double>::infinity());
}

struct Forward {
  at::Tensor out, lse, seed, offset;
  int64_t length = 0, source = 0;
};

// `forward(EAGER, None, ...)` with dropout: `_dropout_forward_saving` (with the generator state on a CPU, without it
// on CUDA, as `forward` asks); nullopt where it is not this code's call
std::optional<Forward> forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                               const at::Tensor& bias, double p, bool causal, bool debug, std::optional<double> scale) {
  if (!fits_forward(query, key, value, bias, p, scale, debug)) return std::nullopt;
  const at::Device dev = query.device();
  const bool cuda = dev.is_cuda();
  at::Tensor state;
  if (!cuda) {  // `torch.get_rng_state()`: the session's stream before the draw (the forward is a seeded op)
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    state = gen.get_state();
    if (state.numel() != CPU_STATE_BYTES) return std::nullopt;
  }
  // `_dropout_math(q, k, v, bias, p, is_causal, scale, None)`
  const at::ScalarType origin = query.scalar_type();
  const auto [q, k, v, q_root, k_root] = math_inputs(query, key, value, scale);
  at::Tensor mask = float_bias(bias, origin);
  if (causal) {
    at::Tensor keep = at::ones({q.size(2), k.size(2)}, at::TensorOptions().dtype(at::kBool).device(dev)).tril();
    at::Tensor c = at::zeros(keep.sizes(), at::TensorOptions().dtype(q.scalar_type()).device(dev))
                       .masked_fill_(keep.logical_not(), -std::numeric_limits<double>::infinity());
    mask = mask.defined() ? at::add(mask, c) : c;
  }
  at::Tensor scores;
  {
    const at::Tensor kt = at::mul(k.transpose(-2, -1), at::Scalar(k_root));
    auto [q3, kt3] = operands(q, kt);
    scores = at::bmm(q3, kt3).view({std::max(q.size(0), kt.size(0)), std::max(q.size(1), kt.size(1)), q.size(2),
                                    kt.size(3)});
  }
  if (mask.defined()) scores = at::add(scores, mask);
  at::Tensor attn = at::_safe_softmax(scores, -1);
  scores = at::Tensor();
  at::Tensor dropped, kept;
  if (cuda) {
    std::tie(dropped, kept) = at::native_dropout(attn, p, true);
  } else {  // `_drop`: fallbacks' `native_dropout`
    const double p1m = 1.0 - p;
    kept = at::empty_like(attn, at::TensorOptions().dtype(at::kBool));
    kept.bernoulli_(p1m, std::nullopt);
    dropped = at::mul(attn, kept.view(at::kByte)).mul_(at::Scalar(1.0 / p1m));
  }
  at::Tensor out;
  {
    auto [d3, v3] = operands(dropped, v);
    out = at::bmm(d3, v3).view({std::max(dropped.size(0), v.size(0)), std::max(dropped.size(1), v.size(1)),
                                dropped.size(2), v.size(3)});
  }
  dropped = at::Tensor();
  out = out.to(origin);
  // the state, the softmax and the mask in one buffer (`_dropout_forward_saving`)
  const Sizes s = saved_sizes(query, key);
  const int64_t head = state_bytes(dev);
  at::Tensor buffer = at::empty({head + s.extra}, at::TensorOptions().dtype(at::kByte).device(dev));
  if (state.defined()) {
    buffer.slice(0, 0, head).copy_(state);
  } else {
    buffer.slice(0, 0, head).zero_();
  }
  const int64_t a_end = head + s.n * s.item;
  buffer.slice(0, head, a_end).view(s.dtype).view(s.shape).copy_(attn);
  buffer.slice(0, a_end, a_end + s.n).view(at::kBool).view(s.shape).copy_(kept);
  if (s.extra > s.n * s.item + s.n) buffer.slice(0, a_end + s.n).zero_();
  Forward f;
  f.lse = at::zeros({query.size(0), query.size(1), query.size(2)}, at::TensorOptions().dtype(at::kFloat).device(dev));
  f.seed = buffer.view(at::kLong).as_strided({}, {}, 0);
  f.offset = at::zeros({}, at::TensorOptions().dtype(at::kLong).device(dev));
  f.out = matching_layout(query, out);
  f.length = query.size(2);
  f.source = key.size(2);
  return f;
}

struct Backward {
  at::Tensor gq, gk, gv, gb;
};

// `check_backward`'s rules of grad_out, out, logsumexp and grad_input_mask as a yes (after `fits_inputs`), with
// each tensor strided on the query's device
bool fits_backward(const at::Tensor& grad, const at::Tensor& query, const at::Tensor& value, const at::Tensor& out,
                   const at::Tensor& logsumexp, const std::vector<bool>& grad_mask) {
  const at::Device dev = query.device();
  const std::vector<int64_t> shape = {query.size(0), query.size(1), query.size(2), value.size(3)};
  for (const at::Tensor* t : {&grad, &out}) {
    if (!t->defined() || t->sizes() != at::IntArrayRef(shape) || t->scalar_type() != query.scalar_type()) return false;
    if (t->device() != dev || t->layout() != at::kStrided || t->is_conj() || t->is_neg()) return false;
  }
  if (!logsumexp.defined() || logsumexp.sizes() != at::IntArrayRef(shape.data(), 3) ||
      logsumexp.scalar_type() != at::kFloat) {
    return false;
  }
  if (logsumexp.device() != dev || logsumexp.layout() != at::kStrided || logsumexp.is_neg()) return false;
  return grad_mask.size() == 4;
}

// `backward(EAGER, None, ...)` with dropout from an eager forward's kept softmax and mask (`_dropout_backward`,
// `_saved_scores` not None), no bias's gradient asked; nullopt where it is not this code's call
std::optional<Backward> backward(const at::Tensor& grad, const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& value, const at::Tensor& bias, const std::vector<bool>& grad_mask,
                                 const at::Tensor& out, const at::Tensor& logsumexp, double p, bool causal,
                                 const at::Tensor& seed, std::optional<double> scale) {
  if (!fits_forward(query, key, value, bias, p, scale, false)) return std::nullopt;
  if (!fits_backward(grad, query, value, out, logsumexp, grad_mask)) return std::nullopt;
  const at::Device dev = query.device();
  if (grad_mask[3] && bias.defined() && at::isFloatingType(bias.scalar_type())) return std::nullopt;  // a bias's grad
  if (!seed.defined() || seed.dim() != 0 || seed.scalar_type() != at::kLong || seed.device() != dev) return std::nullopt;
  // `_saved_scores`
  const Sizes s = saved_sizes(query, key);
  const int64_t head = state_bytes(dev);
  if (seed.storage_offset() != 0 || static_cast<int64_t>(seed.storage().nbytes()) != head + s.extra ||
      head % s.item) {
    return std::nullopt;  // the state alone (a graph's forward): the Python run recomputes
  }
  std::vector<int64_t> strides(4);
  {
    int64_t stride = 1;
    for (int64_t d = 3; d >= 0; --d) {
      strides[d] = stride;
      stride *= std::max<int64_t>(s.shape[d], 1);
    }
  }
  const at::Tensor attn = at::empty({0}, at::TensorOptions().dtype(s.dtype).device(dev))
                              .set_(seed.storage(), head / s.item, s.shape, strides);
  const at::Tensor kept = at::empty({0}, at::TensorOptions().dtype(at::kBool).device(dev))
                              .set_(seed.storage(), head + s.n * s.item, s.shape, strides);
  // `_dropout_math(..., saved)`
  const at::ScalarType origin = query.scalar_type();
  const auto [q, k, v, q_root, k_root] = math_inputs(query, key, value, scale);
  auto [q3, kt3] = operands(q, at::mul(k.transpose(-2, -1), at::Scalar(k_root)));
  const at::Tensor dropped = at::mul(attn, kept.view(at::kByte)).mul_(at::Scalar(1.0 / (1.0 - p)));
  const int64_t b = attn.size(0), h = attn.size(1), length = attn.size(2), source = attn.size(3);
  const at::Tensor dropped3 = dropped.reshape({b * h, length, source});
  const at::Tensor v3 = v.expand({b, h, v.size(2), v.size(3)}).reshape({b * h, v.size(2), v.size(3)});
  // `_dropout_backward`
  const at::Tensor g = low(origin) ? grad.to(at::kFloat) : grad;
  const at::Tensor g3 = g.reshape({b * h, length, v3.size(2)});
  at::Tensor grad_v = at::bmm(dropped3.transpose(1, 2), g3).view({b, h, source, v3.size(2)});
  at::Tensor grad_dropped = at::bmm(g3, v3.transpose(1, 2)).view({b, h, length, source});
  const double factor = 1.0 / (1.0 - p);
  if (dev.is_cuda()) {  // `_drop_backward`
    grad_dropped = at::native_dropout_backward(grad_dropped, kept, factor);
  } else {  // fallbacks' `_native_dropout_backward`: `grad.mul(mask.view(torch.uint8)).mul_(scale)`
    grad_dropped = at::mul(grad_dropped, kept.view(at::kByte)).mul_(wrapped(factor));
  }
  const at::Tensor grad_scores = at::_softmax_backward_data(grad_dropped, attn, -1, attn.scalar_type());
  const at::Tensor s3 = grad_scores.view({b * h, length, source});
  at::Tensor grad_q = at::bmm(s3, kt3.transpose(1, 2)).view({b, h, length, q3.size(2)});
  at::Tensor grad_k = at::bmm(q3.transpose(1, 2), s3).view({b, h, kt3.size(1), source});
  Backward r;
  if (!low(origin)) {
    r.gq = scaled_like(query, grad_q, q_root, false);
    r.gk = scaled_like(key, grad_k, k_root, true);
    r.gv = like(value, grad_v);
  } else {
    grad_q = at::mul(grad_q, at::Scalar(q_root));
    grad_k = at::mul(grad_k, at::Scalar(k_root)).transpose(-2, -1);
    r.gq = like(query, grad_q.to(origin));
    r.gk = like(key, grad_k.to(origin));
    r.gv = like(value, grad_v.to(origin));
  }
  if (bias.defined()) r.gb = at::zeros_like(bias);  // `_bias_grad(bias, None)`
  return r;
}

// ---- no dropout (round 46): the kernels' path of `forward` and `backward` (`kernel` None, dropout_p 0) ----

// attention.py `_kernel_layout`
bool kernel_layout(const at::Tensor& t) { return dense(t) && (t.stride(-1) == 1 || t.size(-1) <= 1); }

// attention.py `_dense_or_copy` (`aten::contiguous`)
at::Tensor dense_or_copy(const at::Tensor& t) { return kernel_layout(t) ? t : t.contiguous(); }

// an optional tensor argument as the Python binding makes it from a tensor or None
std::optional<at::Tensor> opt(const at::Tensor& t) {
  if (!t.defined()) return std::nullopt;
  return t;
}

// attention.py `_four_d`: a mask of 2 or 3 dims as a 4-D view
at::Tensor four_d(at::Tensor bias) {
  while (bias.defined() && bias.dim() < 4) bias = bias.unsqueeze(0);
  return bias;
}

// attention.py `_efficient_ok` (after `_dense_or_copy`); `major`: the CUDA device's compute capability's major
// (`torch.cuda.get_device_capability`, `cuda_major`)
bool efficient_ok(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias, int major) {
  const at::ScalarType dtype = q.scalar_type();
  if (dtype != at::kFloat && dtype != at::kHalf && dtype != at::kBFloat16) return false;
  const int64_t align = dtype == at::kFloat ? 4 : 8;
  if (q.size(-1) % align || v.size(-1) % align) return false;
  if (q.stride(-1) != 1 || k.stride(-1) != 1 || v.stride(-1) != 1 || q.size(2) == 0 || k.size(2) == 0) return false;
  if (bias.defined() && bias.scalar_type() != dtype && bias.scalar_type() != at::kBool) return false;
  return !(major < 5 || (dtype == at::kBFloat16 && major < 8));
}

// attention.py `_cuda_bias`: float, expanded to the scores' shape, its last dim's storage padded to 16 elements
at::Tensor cuda_bias(const at::Tensor& bias, const at::Tensor& q, const at::Tensor& k) {
  const at::Tensor fb = float_bias(bias, q.scalar_type());
  if (!fb.defined()) return fb;
  const std::vector<int64_t> shape = {q.size(0), q.size(1), q.size(2), k.size(2)};
  const int64_t s = shape[3];
  if (s % 16) {
    at::Tensor padded = at::zeros({shape[0], shape[1], shape[2], s + 16 - s % 16}, fb.options());
    padded.slice(-1, 0, s).copy_(fb.expand(shape));
    return padded.slice(-1, 0, s);
  }
  return fb.expand(shape);
}

// A CUDA device's compute capability's major, read once a device through Python (the GIL held); -1 where reading it
// raised (the call is declined)
int cuda_major(const at::Tensor& q) {
  static std::vector<int> majors;  // by device index, 0: not read yet
  if (!q.defined() || !q.is_cuda()) return 0;
  const int index = q.device().index();
  if (index < 0 || index > 1024) return -1;
  if (static_cast<size_t>(index) < majors.size() && majors[index] != 0) return majors[index];
  int major = -1;
  try {
    py::object got = py::module_::import("torch.cuda").attr("get_device_capability")(index);
    major = py::cast<int>(got.cast<py::tuple>()[0]);
  } catch (py::error_already_set&) {
    return -1;  // (the error is dropped with it: the Python run reads it again and raises its own)
  } catch (py::cast_error&) {
    return -1;
  }
  if (major <= 0) return -1;
  if (majors.size() <= static_cast<size_t>(index)) majors.resize(index + 1, 0);
  majors[index] = major;
  return major;
}

// `forward(EAGER, None, ...)` without dropout: a fake GPU's CPU flash kernel, a CUDA device's mem-efficient one;
// nullopt where it is not this code's call (float64, the math composition: empty tensors, unequal head sizes, the
// efficient kernel's constraints or its own refusal) -- nothing it ran is seen (no generator, no session state)
std::optional<Forward> forward_kernels(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                       const at::Tensor& attn_bias, bool causal, bool debug,
                                       std::optional<double> scale, int major) {
  if (!fits_inputs(query, key, value, attn_bias, scale, debug) || query.scalar_type() == at::kDouble) {
    return std::nullopt;  // (float64 without dropout: `check_forward` refuses it)
  }
  const at::Device dev = query.device();
  const at::Tensor q = dense_or_copy(query), k = dense_or_copy(key), v = dense_or_copy(value);
  const at::Tensor bias = four_d(attn_bias);
  const int64_t length = q.size(2), source = k.size(2);
  // `choose_kernel` (q, k, v non-empty: `fits_inputs`)
  at::Tensor out, lse;
  if (dev.is_cpu()) {
    if (v.size(3) != q.size(3)) return std::nullopt;  // the math composition
    const at::Tensor mask = float_bias(bias, q.scalar_type());
    std::tie(out, lse) = at::_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, opt(mask), scale);
  } else {
    if (!efficient_ok(q, k, v, bias, major)) return std::nullopt;  // the math composition
    try {
      auto got = at::_scaled_dot_product_efficient_attention(q, k, v, opt(cuda_bias(bias, q, k)), true, 0.0, causal,
                                                        scale);
      out = std::get<0>(got);
      lse = std::get<1>(got).slice(-1, 0, length);
    } catch (const c10::Error&) {
      return std::nullopt;  // a constraint not checked above: the Python run's math composition on the same GPU
    }
  }
  Forward f;
  f.seed = at::zeros({}, at::TensorOptions().dtype(at::kLong).device(dev));
  f.offset = at::zeros({}, at::TensorOptions().dtype(at::kLong).device(dev));
  f.lse = lse.contiguous();
  f.out = matching_layout(query, out);
  f.length = length;
  f.source = source;
  return f;
}

// `backward(EAGER, None, ...)` without dropout: the CPU flash kernel's backward, the mem-efficient one's; nullopt
// where it is not this code's call (float64, a bias's gradient, the math composition, the kernel's own refusal)
std::optional<Backward> backward_kernels(const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
                                         const at::Tensor& value, const at::Tensor& attn_bias,
                                         const std::vector<bool>& grad_mask, const at::Tensor& out_,
                                         const at::Tensor& logsumexp, bool causal, std::optional<double> scale,
                                         int major) {
  if (!fits_inputs(query, key, value, attn_bias, scale, false) || query.scalar_type() == at::kDouble) {
    return std::nullopt;
  }
  if (!fits_backward(grad_out, query, value, out_, logsumexp, grad_mask)) return std::nullopt;
  if (grad_mask[3] && attn_bias.defined() && at::isFloatingType(attn_bias.scalar_type())) return std::nullopt;
  const at::Device dev = query.device();
  const at::Tensor q = dense_or_copy(query), k = dense_or_copy(key), v = dense_or_copy(value);
  const at::Tensor grad = dense_or_copy(grad_out), out = dense_or_copy(out_);
  const at::Tensor lse = dense_or_copy(logsumexp);
  const at::Tensor bias = four_d(attn_bias);
  // `backward_kernel`
  at::Tensor gq, gk, gv;
  if (dev.is_cpu()) {
    if (v.size(3) != q.size(3)) return std::nullopt;
    const at::Tensor mask = float_bias(bias, q.scalar_type());
    std::tie(gq, gk, gv) =
        at::_scaled_dot_product_flash_attention_for_cpu_backward(grad, q, k, v, out, lse, 0.0, causal, opt(mask),
                                                                 scale);
  } else {
    if (!efficient_ok(q, k, v, bias, major)) return std::nullopt;
    try {
      const int64_t length = q.size(2);
      at::Tensor padded = at::zeros({lse.size(0), lse.size(1), (length + 31) / 32 * 32},
                                    at::TensorOptions().dtype(at::kFloat).device(dev));
      padded.slice(-1, 0, length).copy_(lse);
      const at::Tensor seed = at::zeros({}, at::TensorOptions().dtype(at::kLong).device(dev));
      auto got = at::_scaled_dot_product_efficient_attention_backward(
          grad, q, k, v, cuda_bias(bias, q, k), out, padded, seed, seed, 0.0, {true, true, true, false}, causal, scale);
      gq = std::get<0>(got);
      gk = std::get<1>(got);
      gv = std::get<2>(got);
    } catch (const c10::Error&) {
      return std::nullopt;
    }
  }
  Backward r;
  r.gq = like(query, gq);
  r.gk = like(key, gk);
  r.gv = like(value, gv);
  if (attn_bias.defined()) r.gb = at::zeros_like(attn_bias);  // `_bias_grad(bias, None)`
  return r;
}

// A forward or backward call of either path, by dropout_p (the GIL released; `major`: `cuda_major`'s, read before)
std::optional<Forward> forward_call(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& bias, double p, bool causal, bool debug,
                                    std::optional<double> scale, int major) {
  if (p == 0.0) return forward_kernels(q, k, v, bias, causal, debug, scale, major);
  return forward(q, k, v, bias, p, causal, debug, scale);
}

std::optional<Backward> backward_call(const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& bias, const std::vector<bool>& grad_mask,
                                      const at::Tensor& out, const at::Tensor& lse, double p, bool causal,
                                      const at::Tensor& seed, std::optional<double> scale, int major) {
  if (p == 0.0) return backward_kernels(grad, q, k, v, bias, grad_mask, out, lse, causal, scale, major);
  return backward(grad, q, k, v, bias, grad_mask, out, lse, p, causal, seed, scale);
}

PyObject* wrap_or_none(at::Tensor t) {
  if (!t.defined()) return Py_NewRef(Py_None);
  return THPVariable_Wrap(std::move(t));
}

// A tuple of `items` (new references, each taken; nullptr where making one raised): nullptr with the error set
// where the tuple or any item is missing
PyObject* tuple_of(PyObject* const* items, Py_ssize_t n) {
  Own tuple(PyTuple_New(n));
  bool ok = tuple.p != nullptr;
  for (Py_ssize_t j = 0; j < n; ++j) {
    if (items[j] == nullptr) ok = false;
    if (tuple.p != nullptr && items[j] != nullptr) {
      PyTuple_SET_ITEM(tuple.p, j, items[j]);  // steals
    } else {
      Py_XDECREF(items[j]);
    }
  }
  if (!ok) return nullptr;
  PyObject* got = tuple.p;
  tuple.p = nullptr;
  return got;
}

// the Python run's tuple: (output, logsumexp, None, None, L, S, philox_seed (`written_whole`), philox_offset, None)
PyObject* forward_tuple(Forward&& f) {
  Own seed(THPVariable_Wrap(std::move(f.seed)));
  if (seed.p == nullptr || PyObject_SetAttr(seed.p, S_whole, Py_True) < 0) return nullptr;
  PyObject* items[9] = {THPVariable_Wrap(std::move(f.out)), THPVariable_Wrap(std::move(f.lse)), Py_NewRef(Py_None),
                        Py_NewRef(Py_None), PyLong_FromLongLong(f.length), PyLong_FromLongLong(f.source),
                        Py_NewRef(seed.p), THPVariable_Wrap(std::move(f.offset)), Py_NewRef(Py_None)};
  return tuple_of(items, 9);
}

PyObject* backward_tuple(Backward&& r) {
  PyObject* items[4] = {wrap_or_none(std::move(r.gq)), wrap_or_none(std::move(r.gk)), wrap_or_none(std::move(r.gv)),
                        wrap_or_none(std::move(r.gb))};
  return tuple_of(items, 4);
}

// a stack value as the composition takes it (false: not of the schema's kind, declined)
bool tensor_at(const torch::jit::Stack& st, size_t a, at::Tensor* t, bool optional) {
  if (a >= st.size()) return false;
  if (st[a].isTensor()) {
    *t = st[a].toTensor();
    return t->defined() || optional;
  }
  if (st[a].isNone() && optional) {
    *t = at::Tensor();
    return true;
  }
  return false;
}

bool double_at(const torch::jit::Stack& st, size_t a, double* x) {
  if (a >= st.size() || !st[a].isDouble()) return false;
  *x = st[a].toDouble();
  return true;
}

bool bool_at(const torch::jit::Stack& st, size_t a, bool* x) {
  if (a >= st.size() || !st[a].isBool()) return false;
  *x = st[a].toBool();
  return true;
}

bool scale_at(const torch::jit::Stack& st, size_t a, std::optional<double>* x) {
  if (a >= st.size()) return false;
  if (st[a].isNone()) {
    *x = std::nullopt;
    return true;
  }
  if (!st[a].isDouble()) return false;
  *x = st[a].toDouble();
  return true;
}

// Run a record's call here (`Plan::attention`: 1 the forward, 2 the backward) from the arguments on `stack` (the
// schema's, as `call_op` would take them): its values as `call_py` returns the Python run's (a tuple), or nullptr
// with the Python error set when an aten op raised; `*declined` true (and nothing run) where the Python run takes it.
// (never inlined: bench/daemon_ab.py counts it apart, `call_cpp`)
__attribute__((noinline)) PyObject* run(int which, torch::jit::Stack& st, bool* declined) {
  *declined = true;
  HANDLE_TH_ERRORS
  if (which == 1) {
    at::Tensor q, k, v, bias;
    double p = 0;
    bool causal = false, debug = false;
    std::optional<double> scale;
    if (st.size() != 8 || !tensor_at(st, 0, &q, false) || !tensor_at(st, 1, &k, false) ||
        !tensor_at(st, 2, &v, false) || !tensor_at(st, 3, &bias, true) || !double_at(st, 4, &p) ||
        !bool_at(st, 5, &causal) || !bool_at(st, 6, &debug) || !scale_at(st, 7, &scale)) {
      return nullptr;
    }
    std::optional<Forward> f;
    const int major = p == 0.0 ? cuda_major(q) : 0;
    {
      py::gil_scoped_release nogil;
      f = forward_call(q, k, v, bias, p, causal, debug, scale, major);
    }
    if (!f) return nullptr;
    *declined = false;
    ++native_calls;
    st.clear();
    return forward_tuple(std::move(*f));
  }
  if (which == 2) {
    at::Tensor grad, q, k, v, bias, out, lse, seed;
    double p = 0;
    bool causal = false;
    std::optional<double> scale;
    if (st.size() != 17 || !tensor_at(st, 0, &grad, false) || !tensor_at(st, 1, &q, false) ||
        !tensor_at(st, 2, &k, false) || !tensor_at(st, 3, &v, false) || !tensor_at(st, 4, &bias, true) ||
        !st[5].isBoolList() || !tensor_at(st, 6, &out, false) || !tensor_at(st, 7, &lse, false) ||
        !double_at(st, 12, &p) || !bool_at(st, 13, &causal) || !tensor_at(st, 14, &seed, false) ||
        !scale_at(st, 16, &scale)) {
      return nullptr;
    }
    std::vector<bool> mask;
    for (bool m : st[5].toBoolList()) mask.push_back(m);
    std::optional<Backward> r;
    const int major = p == 0.0 ? cuda_major(q) : 0;
    {
      py::gil_scoped_release nogil;
      r = backward_call(grad, q, k, v, bias, mask, out, lse, p, causal, seed, scale, major);
    }
    if (!r) return nullptr;
    *declined = false;
    ++native_calls;
    st.clear();
    return backward_tuple(std::move(*r));
  }
  return nullptr;
  END_HANDLE_TH_ERRORS
}

}  // namespace attn

// ==== A fake GPU's dropout in C++ (round 45) ======================================================================
// server/fallbacks.py's faster compositions of `native_dropout` and its backward (a fake GPU only: a CUDA device runs
// its own kernel, never a Python run), step for step: a bool mask drawn by `bernoulli_(1 - p)` from the device's
// generator (the runner holds it for the session: `Plan::seeded`), the products by its bytes read as uint8. What the
// composition hands to torch's own kernel (train False, an empty or non-floating input, a mask that is not bool) and
// a p outside [0, 1] are declined: the Python run takes them (`call_py`).
namespace dropout {

int64_t native_calls = 0;  // calls run here (tests: `dropout_calls`)

// `native_dropout(input, p, train)` from the stack: its two tensors pushed there, true; false: declined
bool forward(torch::jit::Stack& st) {
  if (st.size() != 3 || !st[0].isTensor() || !st[1].isDouble()) return false;
  if (!(st[2].isNone() || st[2].isBool()) || (st[2].isBool() && !st[2].toBool())) return false;
  const at::Tensor input = st[0].toTensor();
  const double p = st[1].toDouble();
  if (!input.defined() || !input.device().is_cpu() || !at::isFloatingType(input.scalar_type()) ||
      input.numel() == 0 || !(p >= 0.0 && p <= 1.0)) {
    return false;
  }
  at::Tensor out, mask;
  {
    py::gil_scoped_release nogil;
    const double p1m = 1.0 - p;
    const double scale = p1m == 0 ? 0.0 : 1.0 / p1m;
    mask = at::empty_like(input, at::TensorOptions().dtype(at::kBool));
    mask.bernoulli_(p1m, std::nullopt);
    out = at::mul(input, mask.view(at::kByte)).mul_(at::Scalar(scale));
  }
  st.clear();
  st.emplace_back(std::move(out));
  st.emplace_back(std::move(mask));
  return true;
}

// `native_dropout_backward(grad_output, mask, scale)`: `grad.mul(mask.view(torch.uint8)).mul_(scale)`
bool backward(torch::jit::Stack& st) {
  if (st.size() != 3 || !st[0].isTensor() || !st[1].isTensor() || !st[2].isDouble()) return false;
  const at::Tensor grad = st[0].toTensor(), mask = st[1].toTensor();
  if (!grad.defined() || !mask.defined() || mask.scalar_type() != at::kBool || !grad.device().is_cpu() ||
      !at::isFloatingType(grad.scalar_type())) {
    return false;
  }
  const double scale = st[2].toDouble();
  at::Tensor out;
  {
    py::gil_scoped_release nogil;
    out = at::mul(grad, mask.view(at::kByte)).mul_(attn::wrapped(scale));
  }
  st.clear();
  st.emplace_back(std::move(out));
  return true;
}

// Run a record's `native_dropout` (3) or its backward (4) here: its values on `stack` as `call_op` leaves them, and
// None, or nullptr with the Python error set when an aten op raised; `*declined` true (nothing run) where the Python
// run takes it. (Never inlined: bench/daemon_ab.py counts it apart, `call_cpp`.)
__attribute__((noinline)) PyObject* run(int which, torch::jit::Stack& st, bool* declined) {
  *declined = true;
  HANDLE_TH_ERRORS
  if (which == 3 ? forward(st) : which == 4 ? backward(st) : false) {
    *declined = false;
    ++native_calls;
    Py_RETURN_NONE;
  }
  return nullptr;
  END_HANDLE_TH_ERRORS
}

}  // namespace dropout

// A Python run's record (`Plan::n_pos` >= 0): the fused attention's compositions here where they are this code's
// calls (`attn::run`), else the Python function (`call_py`)
PyObject* call_run(const Plan& p, const char* buf, torch::jit::Stack& stack) {
  if (p.in_cpp != 0) {
    bool declined = true;
    PyObject* got = p.in_cpp <= 2 ? attn::run(p.in_cpp, stack, &declined) : dropout::run(p.in_cpp, stack, &declined);
    if (!declined || got != nullptr || PyErr_Occurred()) return got;
  }
  return call_py(p, buf, stack);
}
// ==== end of the fused attention's compositions ==================================================================

// One int counter of a `Ctx.run` (`s.used`, `s.ops`, `memory.used`), kept here between the run's Python calls: read
// once (`get`, through `Fields`) and added to in C++ (`add`), written back as one `+=` of what was added (`sync`) before
// any session or executor code the run calls (a progress callable, the ledger's count, `bind_outputs`, `over_quota`)
// and when it returns or raises, and read again after it. Python code of this thread thus never sees a value that
// lags the records run (~1.5k instructions a record were the per-record `+=` of the dict's int objects). What the run
// decides with a value is what it decided when it wrote it each time: the same ints, the same order of checks.
struct Counter {
  Fields* f;
  PyObject* name;
  int64_t base = 0;  // the attribute's value as last read, valid while `have`
  bool have = false;
  int64_t delta = 0;  // added here, not yet written
  Counter(Fields* fields, PyObject* n) : f(fields), name(n) {}
  // the value as Python will see it once synced: false when the attribute is not an int that fits
  bool get(int64_t* out) {
    if (!have) {
      if (!f->get(name, &base)) return false;
      have = true;
    }
    return !__builtin_add_overflow(base, delta, out);
  }
  void add(int64_t n) {
    int64_t d = 0;
    if (__builtin_add_overflow(delta, n, &d)) {
      sync();
      f->add(name, n);
      return;
    }
    delta = d;
  }
  // write what was added; the next `get` reads the attribute again (Python code may change it)
  void sync() {
    have = false;
    if (delta == 0) return;
    const int64_t d = delta;
    delta = 0;
    f->add(name, d);
  }
};

// A run's three counters; `sync_all` before Python code, and (the destructor) when the run raises
struct Counts {
  Counter used, mused, ops;
  Counts(Fields& sf, Fields& mf) : used(&sf, S_used), mused(&mf, S_used), ops(&sf, S_ops) {}
  void sync_all() {
    used.sync();
    mused.sync();
    ops.sync();
  }
  ~Counts() {
    if (used.delta == 0 && mused.delta == 0 && ops.delta == 0) return;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);  // the error the run raises stays the one raised
    try {
      sync_all();
    } catch (py::error_already_set& e) {
      e.discard_as_unraisable("gpupool native runner: writing back a session's counters");
    } catch (...) {
    }
    PyErr_Restore(type, value, tb);
  }
  Counts(const Counts&) = delete;
  Counts& operator=(const Counts&) = delete;
};

// The Python ints a context looked its handles up with and bound its outputs under, by value, for the lookups of
// later records: an input's key is then the very object the session's table holds where this context bound the
// handle (the dict's identity test, no `==` of two ints) and no new int is made and freed (~220 instructions of the
// ~440 an input). Only a cache: any int of the handle's value finds the same entry, so an entry that outlived its
// handle (freed, or bound again from Python under another int) still looks up what the table holds now. Direct-mapped
// by the handle's low bits (a session numbers its handles in order): `LIMIT` slots, a handle's int replacing whatever
// held its slot, so a put never allocates (round 38's hash map made a node per output handle and was emptied
// whole when full: ~330 instructions an op). Used under the GIL only (`Ctx.run` holds it but for the op's call).
struct Keys {
  static constexpr size_t LIMIT = 4096;  // a power of two
  struct Slot {
    uint64_t h = 0;
    PyObject* key = nullptr;  // a strong reference, or null
  };
  std::vector<Slot> slots = std::vector<Slot>(LIMIT);
  Keys() = default;
  Keys(const Keys&) = delete;
  Keys& operator=(const Keys&) = delete;
  ~Keys() {
    for (auto& sl : slots) Py_XDECREF(sl.key);
  }
  Slot& slot(uint64_t h) { return slots[h & (LIMIT - 1)]; }
  // the int kept for h (borrowed), or null
  PyObject* find(uint64_t h) const {
    const Slot& sl = slots[h & (LIMIT - 1)];
    return sl.key != nullptr && sl.h == h ? sl.key : nullptr;
  }
  // a new reference to an int of value h: the one kept, or a new one (kept from now on)
  PyObject* get(uint64_t h) {
    Slot& sl = slot(h);
    if (sl.key != nullptr && sl.h == h) return Py_NewRef(sl.key);
    PyObject* k = PyLong_FromUnsignedLongLong(h);
    if (k != nullptr) set(sl, h, k);
    return k;
  }
  // keep `key` (an int of value h; borrowed) as h's
  void put(uint64_t h, PyObject* key) {
    Slot& sl = slot(h);
    if (sl.key == key) return;  // (and so sl.h == h)
    set(sl, h, key);
  }

 private:
  static void set(Slot& sl, uint64_t h, PyObject* key) {
    PyObject* old = sl.key;
    sl.h = h;
    sl.key = Py_NewRef(key);
    Py_XDECREF(old);
  }
};

// A vector of the context's taken for one `Ctx.run` and given back empty, its room kept: a run's argument stack
// and held inputs no longer grow from nothing at each call (~100 instructions an op in reallocations). A run that
// another run's Python code started (none does) takes an empty one of its own.
template <typename T>
struct Reused {
  std::vector<T>& home;
  std::vector<T> v;
  explicit Reused(std::vector<T>& h) : home(h) { v.swap(home); }
  ~Reused() {
    v.clear();  // the GIL held: a tensor's last reference goes as `held.clear()` lets it go
    if (v.capacity() > home.capacity()) v.swap(home);
  }
  Reused(const Reused&) = delete;
  Reused& operator=(const Reused&) = delete;
};

// A session's storage entries (`_storages`' values, `[handles on the storage, its bytes]`) that `free_handles`
// deleted with the last handle on their storage while nothing else referred to them, kept for `bind_new` to fill
// again: a list made per output and freed per free was ~700 instructions an op (the list's allocation as a
// container the cyclic collector tracks, its share of the collections it triggers, its deallocation), and the byte
// count's int is kept where the new storage has the same size (a training step's outputs, step after step). A
// reused entry holds exactly what a new one would, `[1, nbytes]`; no session can tell it from a new one (it held
// two ints only, and nothing referred to it). At most `LIMIT`, under the GIL only (shared by the process's sessions).
struct Entries {
  static constexpr size_t LIMIT = 1024;
  std::vector<PyObject*> free;  // owned references to lists of two ints
  // a new reference to `[1, nbytes]`: a kept entry filled again, or a new list; nullptr with the error set
  PyObject* take(int64_t nbytes) {
    if (free.empty()) {
      Own fresh(PyList_New(2));
      if (fresh.p == nullptr) return nullptr;
      PyObject* one = PyLong_FromLong(1);
      if (one == nullptr) return nullptr;
      PyList_SET_ITEM(fresh.p, 0, one);  // steals
      PyObject* size = PyLong_FromLongLong(nbytes);
      if (size == nullptr) return nullptr;
      PyList_SET_ITEM(fresh.p, 1, size);
      PyObject* out = fresh.p;
      fresh.p = nullptr;
      return out;
    }
    PyObject* e = free.back();
    free.pop_back();
    Own entry(e);
    PyObject* size = PyList_GET_ITEM(e, 1);
    int64_t was = 0;
    if (!(PyLong_CheckExact(size) && as_i64(size, &was) && was == nbytes)) {
      PyObject* fresh = PyLong_FromLongLong(nbytes);
      if (fresh == nullptr) return nullptr;
      PyList_SET_ITEM(e, 1, fresh);  // steals; the old int dropped below
      Py_DECREF(size);
    }
    PyObject* one = PyLong_FromLong(1);
    if (one == nullptr) return nullptr;
    PyObject* count = PyList_GET_ITEM(e, 0);
    PyList_SET_ITEM(e, 0, one);
    Py_DECREF(count);
    entry.p = nullptr;
    return e;
  }
  // keep `entry` (a new reference, taken) where it is a list of two ints that nothing else refers to; else drop it
  void give(PyObject* entry) {
    if (free.size() < LIMIT && Py_REFCNT(entry) == 1 && PyList_CheckExact(entry) && PyList_GET_SIZE(entry) == 2 &&
        PyLong_CheckExact(PyList_GET_ITEM(entry, 0)) && PyLong_CheckExact(PyList_GET_ITEM(entry, 1))) {
      free.push_back(entry);
      return;
    }
    Py_DECREF(entry);
  }
};
Entries entries;

struct Shells {
  Reused<std::shared_ptr<Plan>> used;  // the plans whose views a run used (kept alive until `release`)
  explicit Shells(std::vector<std::shared_ptr<Plan>>& room) : used(room) {}
  ~Shells() { release(); }
  Shells(const Shells&) = delete;
  Shells& operator=(const Shells&) = delete;
  void add(const std::shared_ptr<Plan>& p) {
    if (p->in_shells) return;
    used.v.push_back(p);  // first: where it throws (out of memory), no flag is left set that no `release` clears
    p->in_shells = true;
  }
  void release() noexcept {
    for (const auto& p : used.v) {
      p->in_shells = false;
      for (const Arg& a : p->args) {
        for (const Input& in : a.inputs) {
          at::Tensor& sh = in.shell;
          if (!sh.defined()) continue;
          c10::TensorImpl* impl = sh.unsafeGetTensorImpl();
          if (sh.use_count() == 1 && sh.weak_use_count() == 1 && impl->allow_tensor_metadata_change()) {
            if (impl->storage().unsafeGetStorageImpl() != no_storage().unsafeGetStorageImpl()) {
              impl->set_storage_keep_dtype(no_storage());
            }
          } else {
            sh = at::Tensor();  // held elsewhere (an op returned it): theirs; its storage goes with its last holder
          }
        }
      }
    }
    used.v.clear();
  }
};

// ---- uploads and frees among a run's records (`Ctx::between`) ----
//
// An `Upload` message's fields as `CommandExecutor._upload` reads them, from its bytes (field numbers of
// proto/gpupool/v1/device.proto `Upload` and tensor.proto `TensorMeta`).
struct SmallUpload {
  uint64_t handle = 0;
  bool meta = false;  // `HasField("meta")`
  uint64_t dtype = 0;
  int64_t dims = 0;
  int64_t shape[MAX_DIMS] = {};
  uint64_t offset = 0;
  const unsigned char* data = nullptr;
  uint64_t len = 0;
  bool last = false;
};

bool read_varint(const unsigned char** p, const unsigned char* lim, uint64_t* v);  // (defined below)
inline bool read_size(const unsigned char** p, const unsigned char* lim, uint64_t* v);  // (defined below)

// A key of one byte (fields 1 to 15), the only form the readers of an Upload and its TensorMeta below take: every
// message they take is then one upb takes too (upb refuses a key of more than five bytes, which `read_varint` would
// read), so a command they read may run, and be read again (`slices.FrameCommands`, the front's `plain_uploads`),
// without upb's parse first; anything else is left to upb
inline bool read_key(const unsigned char** p, const unsigned char* lim, uint64_t* key) {
  if (*p >= lim || (**p & 0x80) != 0) return false;
  *key = *(*p)++;
  return true;
}

// A `TensorMeta`'s bytes: dtype (1) at most once, shape (2) and stride (3) packed or not (the values appended, as
// upb appends them), storage_offset (4) at most once, each key of one byte (`read_key`); anything else (another field
// or wire type, a dimension past MAX_DIMS or negative, a truncated varint) false.
bool parse_meta(const unsigned char* p, const unsigned char* end, SmallUpload* u) {
  bool dtype = false, offset = false;
  auto dim = [&](uint64_t v, bool is_shape) {
    if (!is_shape) return true;  // strides: `_upload` reads only the shape
    if (u->dims >= MAX_DIMS || static_cast<int64_t>(v) < 0) return false;
    u->shape[u->dims++] = static_cast<int64_t>(v);
    return true;
  };
  while (p < end) {
    uint64_t key = 0, v = 0;
    if (!read_key(&p, end, &key)) return false;
    if (key == (1 << 3) && !dtype) {
      dtype = true;
      if (!read_varint(&p, end, &u->dtype)) return false;
    } else if (key == (4 << 3) && !offset) {
      offset = true;
      if (!read_varint(&p, end, &v)) return false;
    } else if (key == (2 << 3) || key == (3 << 3)) {
      if (!read_varint(&p, end, &v) || !dim(v, key == (2 << 3))) return false;
    } else if (key == ((2 << 3) | 2) || key == ((3 << 3) | 2)) {
      uint64_t len = 0;  // (`read_size`: upb refuses a length of more than five bytes)
      if (!read_size(&p, end, &len) || len > static_cast<uint64_t>(end - p)) return false;
      const unsigned char* lim = p + len;
      while (p < lim) {
        if (!read_varint(&p, lim, &v) || !dim(v, key == ((2 << 3) | 2))) return false;
      }
    } else {
      return false;
    }
  }
  return true;
}

// An `Upload` message's bytes: handle (1), meta (2), offset (3), data (4), last (5), each at most once, each key of one
// byte (`read_key`); anything else (`bulk_bytes`, another field or wire type, a field twice, a truncated length)
// false: the Python path reads it. Whatever this takes, upb takes, and reads to the same fields.
bool parse_upload(const unsigned char* p, const unsigned char* end, SmallUpload* u) {
  unsigned seen = 0;
  while (p < end) {
    uint64_t key = 0, v = 0;
    if (!read_key(&p, end, &key)) return false;
    const uint64_t field = key >> 3;
    if (field < 1 || field > 5 || (seen & (1u << field))) return false;
    seen |= 1u << field;
    if (key == ((2 << 3) | 2) || key == ((4 << 3) | 2)) {
      uint64_t len = 0;  // (`read_size`: upb refuses a length of more than five bytes)
      if (!read_size(&p, end, &len) || len > static_cast<uint64_t>(end - p)) return false;
      if (field == 2) {
        u->meta = true;
        if (!parse_meta(p, p + len, u)) return false;
      } else {
        u->data = p;
        u->len = len;
      }
      p += len;
    } else if (key == (1 << 3) || key == (3 << 3) || key == (5 << 3)) {
      if (!read_varint(&p, end, &v)) return false;
      if (field == 1) u->handle = v;
      if (field == 3) u->offset = v;
      if (field == 5) u->last = v != 0;
    } else {
      return false;
    }
  }
  return true;
}

// A new CPU tensor of `sizes` and `st` holding exactly `len` bytes from `data` (the caller checked that they are its
// bytes): made as torch's CPU `empty` kernel makes it (`at::detail::empty_cpu`), then filled by one memcpy before
// anyone can see it (`filled`, `Ctx::upload`)
at::Tensor filled_tensor(at::IntArrayRef sizes, at::ScalarType st, const void* data, size_t len) {
  at::Tensor t = at::detail::empty_cpu(sizes, st);
  if (len > 0) std::memcpy(t.data_ptr(), data, len);
  return t;
}

// a `Free` message's handles, and `WorkerSession.free` of them (`free_handles`; defined below)
bool parse_free(const unsigned char* p, const unsigned char* end, std::vector<uint64_t>* out);
bool free_parsed(PyObject* s, const std::vector<uint64_t>& hs, const Keys* cached);
// the tables `WorkerSession.free` reads and changes
struct FreeTables {
  PyObject *tensors, *keys, *storages, *uploads, *poisoned;  // borrowed; exact dicts
  PyObject* pinned;  // borrowed: the session's `pinned` set (null or not a set: none)
};
int unpin(PyObject* s, PyObject* pinned, PyObject* h);  // `s.pins += 1` where `h` is pinned (defined below)
PyObject* pinned_of(PyObject* s);  // `s.pinned` (a new reference), or null (no error) where it is not a set
bool free_loop(PyObject* s, const FreeTables& t, const std::vector<uint64_t>& hs, const Keys* cached, Counts* c,
               int64_t* freed_c, Own& freed);
PyObject* dict_pop(PyObject* d, PyObject* key);  // `d.pop(key, MISSING)` (defined below)
bool is_missing(PyObject* o);  // `o is MISSING`
void sub_attr(PyObject* o, PyObject* name, PyObject* n);  // `o.<name> -= n` (defined below)
PyObject* S_held;  // "held"
PyObject* S_upload;  // "upload"
constexpr int64_t CHUNK_BYTES = 4 << 20;  // `wire.CHUNK_BYTES`: an upload's largest chunk

struct Ctx {
  py::object s, tensors, poisoned, storages, keys, memory, count, bind_outputs, over_quota;
  // seeded records (`CommandExecutor._seeded` with `exclusive_rng`: a session's own worker process): the table of
  // generator owners (`executor._RNG_OWNER`), the device's `rng_lock` (its key) and the lock's bound `acquire` and
  // `release`; all None where sessions share the process (their states are swapped per op: Python's)
  py::object rng_owner = py::none(), rng_lock = py::none(), rng_acquire = py::none(), rng_release = py::none();
  int64_t quota, capacity, max_handles, number, base, flops;
  std::shared_ptr<Keys> handle_keys = std::make_shared<Keys>();  // shared by copies of the context (pybind's init)
  // `run`'s vectors between runs: empty, their room kept (`Reused`)
  std::vector<c10::IValue> stack_room;
  std::vector<at::Tensor> held_room;
  std::vector<Pins::Pin> pin_room;
  std::vector<c10::TensorImpl*> pin_set_room;
  // a session's own worker process (`exclusive_rng`): where it is the only Python thread, a record's op runs with
  // the GIL kept and its inputs pinned (`Pins`)
  bool own_process = false;
  std::vector<uint64_t> hvals_room;
  std::vector<uint64_t> free_room;  // a free's handles (`between`)
  std::vector<std::shared_ptr<Plan>> shell_room;
  // uploads and frees among the records run here (`between`; the context's `between`): the ledger's `transfer`, the
  // session's upload pool and its table of half-uploaded handles, the wire's dtypes by number
  bool between_here = false;
  py::object transfer = py::none(), pool = py::none(), pending = py::none();
  py::object pinned = py::none();  // the session's `pinned` set (None: none): `unpin`
  std::vector<at::ScalarType> dtypes;
  // a `runs.Trace`'s slots as `follow` reads them (`SlotOf`)
  struct TraceSlots {
    SlotOf next{S_next}, alt{S_alt}, quota{S_quota}, flops{S_flops}, native{S_native};
  } trace_slots;

  // Run records[i:] through `trace` from step k on. Returns (i, k, hits, flags, exception or None): the first record
  // not run, the step it is at, the records run, END (the trace ran to its end) | OVER (the time budget passed);
  // an exception is that of record i (the op raised, or the binding / quota check after it), which is not run.
  //
  // A run that ends (END) goes on in the run that followed it the last time (`runs.Trace.next`, `follow`), as the
  // Python path tries that one first (`CommandExecutor.eager_span`): from its first step, with a fresh list of kept
  // outputs, every check as for any step. The switch holds once that run took a record (or its first record
  // raised); where its first step does not take the next record, the result is the first run's END, as without
  // chaining, and the Python path decides. The last element of the result: None, or (the `runs.Trace` now under
  // way, its kept outputs) when the records ran on into other runs.
  py::tuple run(const Trace& first, int64_t k, py::list records, int64_t i, py::list objs, py::object progress,
                double start, double budget, py::object ups) {
    const int64_t n = static_cast<int64_t>(PyList_GET_SIZE(records.ptr()));
    // each command's bytes where it is an upload or a free that may run here (`slices.FrameCommands.between`)
    PyObject* up_list = between_here && PyList_CheckExact(ups.ptr()) && PyList_GET_SIZE(ups.ptr()) == n ? ups.ptr()
                                                                                                       : nullptr;
    const Trace* cur = &first;
    int64_t nsteps = static_cast<int64_t>(cur->steps.size());
    int64_t hits = 0;
    int flags = 0;
    py::object exc = py::none();
    // the run under way when records ran on into another (its `runs.Trace` and native form, kept alive here), and
    // the one before the last switch with the hits at it, for going back to where no record was taken
    py::object py_cur, nat_cur, py_prev, nat_prev;
    py::list objs_prev;
    const Trace* prev = nullptr;
    int64_t switched_at = -1;
    bool alt_tried = false;  // the switch's `alt` run was tried after its `next` run did not take the record
    PyObject* tdict = tensors.ptr();
    PyObject* pdict = poisoned.ptr();
    // `progress`: None, a callable, or the writable buffer of a worker's word mark (`slices.mark_word`): the index
    // of the record about to run stored as a little-endian int32 at its start, as `slices.word_mark` writes it
    Word word(progress);
    Fields sf(s.ptr(), {S_used, S_ops}), mf(memory.ptr(), {S_used});
    Counts c(sf, mf);  // `s.used`, `s.ops`, `memory.used`: synced before Python code, at the return, on a raise
    // the views kept in the plans' inputs, pointed at an empty storage when the run returns or raises (`Shells`);
    // declared before the vectors below, so that it releases them once those let their references go
    Shells shells(shell_room);
    // the op's arguments (the context's vectors, their room kept from run to run: `Reused`)
    Reused<c10::IValue> stack_(stack_room);
    torch::jit::Stack& stack = stack_.v;
    // A second reference to each input tensor, held until the op returned: the kernel's own references (the
    // stack's) then never drop the last C++ one, which hands the tensor's Python object back (`decref_pyobject`)
    // and, the GIL being released around the op, takes the GIL for it (~1k instructions an input)
    Reused<at::Tensor> held_(held_room);
    std::vector<at::Tensor>& held = held_.v;
    // Or, where no Python code can run while the op does (this session's own worker process, the interpreter's
    // only thread, a word mark, an op called as itself: `pin` per record), the op runs with the GIL kept (its
    // release and reacquisition ~410 instructions an op) and its inputs are pinned rather than held (`Pins`)
    Pins pins(pin_room, pin_set_room);
    const bool pin_ok = own_process && word.buf != nullptr;
    Reused<uint64_t> hvals_(hvals_room);
    std::vector<uint64_t>& hvals = hvals_.v;  // a SEVERAL step's output handles (`hkeys`' values), for `several`
    // go on in run `py` (its native form `nat`, the Trace `t`) from its first step, with a fresh list of kept outputs
    auto enter = [&](py::object&& py, py::object&& nat, const Trace* t) {
      cur = t;
      py_cur = std::move(py);
      nat_cur = std::move(nat);
      PyObject* fresh = PyList_New(0);
      if (fresh == nullptr) throw py::error_already_set();
      objs = py::reinterpret_steal<py::list>(fresh);
      nsteps = static_cast<int64_t>(cur->steps.size());
      k = 0;
      flags = 0;
    };
    for (;;) {
      while (i < n && k < nsteps) {
        if (up_list != nullptr && PyList_GET_ITEM(up_list, i) != Py_None) {
          // an upload or a free among the records: run here as `execute` runs it, and the run goes on after it
          if (!between(c, PyList_GET_ITEM(up_list, i), i, word, progress, objs.ptr(), &exc)) break;
          ++i;
          if (now() - start > budget) {
            flags |= OVER;
            break;
          }
          continue;
        }
        const Plan* p = cur->steps[k].get();
        if (p == nullptr) break;
        if (!runs_its_own(*p)) break;  // the op plan runs something else (a guard's replacement, a test's wrapper)
        PyObject* data = PyList_GET_ITEM(records.ptr(), i);
        if (!PyBytes_Check(data)) break;
        const Py_ssize_t len = PyBytes_GET_SIZE(data);
        if (len != p->size) break;  // also an empty record: no plan has size 0
        const char* buf = PyBytes_AS_STRING(data);
        bool ok = true;
        for (const auto& f : p->fixed) {
          if (std::memcmp(buf + f.first, f.second.data(), f.second.size()) != 0) {
            ok = false;
            break;
          }
        }
        if (!ok) break;
        // the output handle: 0 binds nothing (the `self` an in-place op returns; `_run_step` checks no handle then)
        const uint64_t h = p->out_offset >= 0 ? read_u64(buf + p->out_offset) : 0;
        Own hkey(nullptr);
        int in_p = 0;
        if (h != 0) {
          if ((h >> HANDLE_BITS) != static_cast<uint64_t>(number) || h == static_cast<uint64_t>(base)) break;
          hkey.reset(PyLong_FromUnsignedLongLong(h));
          if (hkey.p == nullptr) throw py::error_already_set();
          int in_t = has_item(tdict, hkey.p, h);
          if (in_t != 0) {
            if (in_t < 0) throw py::error_already_set();
            break;  // rebinds a live handle: `_run_step`
          }
          in_p = contains(pdict, hkey.p);
          if (in_p < 0) throw py::error_already_set();
          if (p->more_outs.empty() && !in_p && PyDict_GET_SIZE(tdict) + PyDict_GET_SIZE(pdict) >= max_handles) break;
        }
        // SEVERAL: every output handle as `_run_step` checks them (its own session's, none live, the handle limit);
        // also of one output (a `Tensor[]` of one: `several` binds through the tuple; round 37: it was left null)
        Own hkeys(nullptr);
        hvals.clear();
        if (p->returns == SEVERAL) {
          hvals.push_back(h);
          hkeys.reset(PyTuple_New(static_cast<Py_ssize_t>(1 + p->more_outs.size())));
          if (hkeys.p == nullptr) throw py::error_already_set();
          int64_t fresh = h != 0 && !in_p ? 1 : 0;
          PyObject* k0 = h != 0 ? hkey.p : PyLong_FromLong(0);
          if (k0 == nullptr) throw py::error_already_set();
          if (h != 0) Py_INCREF(k0);
          PyTuple_SET_ITEM(hkeys.p, 0, k0);  // steals
          for (size_t j = 0; j < p->more_outs.size() && ok; ++j) {
            const uint64_t hj = read_u64(buf + p->more_outs[j]);
            hvals.push_back(hj);
            PyObject* kj = PyLong_FromUnsignedLongLong(hj);
            if (kj == nullptr) throw py::error_already_set();
            PyTuple_SET_ITEM(hkeys.p, static_cast<Py_ssize_t>(j + 1), kj);  // steals: the tuple owns it from here
            if (hj != 0) {
              if ((hj >> HANDLE_BITS) != static_cast<uint64_t>(number) || hj == static_cast<uint64_t>(base)) {
                ok = false;
                break;
              }
              int live = has_item(tdict, kj, hj);
              if (live < 0) throw py::error_already_set();
              if (live) {
                ok = false;  // rebinds a live handle: `_run_step`
                break;
              }
              int pj = contains(pdict, kj);
              if (pj < 0) throw py::error_already_set();
              if (!pj) ++fresh;
            }
          }
          if (!ok) break;
          if (fresh && PyDict_GET_SIZE(tdict) + PyDict_GET_SIZE(pdict) + fresh > max_handles) break;
        }
        // inputs
        stack.clear();
        held.clear();
        pins.release();
        const bool pin = pin_ok && p->n_pos < 0 && only_python_thread();
        if (stack.capacity() < p->args.size()) stack.reserve(p->args.size());  // (kept from run to run: `Reused`)
        const Py_ssize_t nobjs = PyList_GET_SIZE(objs.ptr());
        auto tensor_of = [&](const Input& in, at::Tensor* t) -> bool {
          const uint64_t hin = read_u64(buf + in.offset);
          PyObject* key = handle_keys->get(hin);
          if (!key) throw py::error_already_set();
          PyObject* obj = get_item(tdict, key, hin);  // borrowed
          Py_DECREF(key);
          if (obj == nullptr) {
            if (PyErr_Occurred()) throw py::error_already_set();
            return false;  // not live: the Python path resolves it (and raises)
          }
          if (in.src >= 0) {
            if (in.src >= nobjs || PyList_GET_ITEM(objs.ptr(), in.src) != obj) return false;
          }
          if (!THPVariable_Check(obj)) return false;
          const at::Tensor& v = THPVariable_Unpack(obj);
          if (in.src == EXTERNAL && !same_meta(v, in)) return false;
          if (in.view) {  // `compact.view_of`'s checks, against the tensor as it is now; a refusal is Python's to raise
            if (v.layout() != at::kStrided || v.is_quantized() || v.is_nested() || v.is_conj() || v.is_neg()) {
              return false;
            }
            const auto have = static_cast<unsigned __int128>(v.storage().nbytes());
            if (static_cast<unsigned __int128>(in.view_last) * static_cast<unsigned __int128>(v.element_size()) > have) {
              return false;
            }
            if (p->direct_views) shells.add(cur->steps[k]);
            try {
              *t = view_of(v, in, p->direct_views);
            } catch (const std::exception&) {
              return false;
            }
            return true;
          }
          if (pin) {
            pins.add(v);
          } else {
            held.push_back(v);
          }
          *t = v;
          return true;
        };
        for (const auto& a : p->args) {
          if (a.kind == CONST) {
            stack.push_back(a.value);
          } else if (a.kind == INT) {
            int64_t v;
            std::memcpy(&v, buf + a.offset, 8);
            stack.emplace_back(v);
          } else if (a.kind == INT_AS_DOUBLE) {
            int64_t v;
            std::memcpy(&v, buf + a.offset, 8);
            stack.emplace_back(static_cast<double>(v));
          } else if (a.kind == DOUBLE) {
            double v;
            std::memcpy(&v, buf + a.offset, 8);
            stack.emplace_back(v);
          } else if (a.kind == INTS || a.kind == DOUBLES) {
            c10::impl::GenericList list(c10::NumberType::get());
            list.reserve(a.numbers.size());
            for (const int64_t at : a.numbers) {
              if (a.kind == INTS) {
                int64_t v;
                std::memcpy(&v, buf + at, 8);
                list.push_back(v);
              } else {
                double v;
                std::memcpy(&v, buf + at, 8);
                list.push_back(v);
              }
            }
            stack.emplace_back(std::move(list));
          } else if (a.kind == TENSOR) {
            at::Tensor t;
            if (!tensor_of(a.inputs[0], &t)) {
              ok = false;
              break;
            }
            stack.emplace_back(std::move(t));
          } else if (a.kind == TENSORS) {
            c10::List<at::Tensor> list;
            list.reserve(a.inputs.size());
            for (const auto& in : a.inputs) {
              at::Tensor t;
              if (in.src == NONE || !tensor_of(in, &t)) {
                ok = false;
                break;
              }
              list.push_back(std::move(t));
            }
            if (!ok) break;
            stack.emplace_back(std::move(list));
          } else {
            c10::List<std::optional<at::Tensor>> list;
            list.reserve(a.inputs.size());
            for (const auto& in : a.inputs) {
              if (in.src == NONE) {
                if (read_u64(buf + in.offset) != 0) {
                  ok = false;
                  break;
                }
                list.push_back(std::nullopt);
                continue;
              }
              at::Tensor t;
              if (!tensor_of(in, &t)) {
                ok = false;
                break;
              }
              list.push_back(std::move(t));
            }
            if (!ok) break;
            stack.emplace_back(std::move(list));
          }
        }
        if (!ok) break;
        // the quota and the device's capacity (`_run_step`'s order: the handle checks above came first)
        int64_t used_before = 0;
        if (!c.used.get(&used_before)) break;
        if (p->need > 0) {
          int64_t mused = 0;
          if (!c.mused.get(&mused)) break;
          if (used_before + p->need > quota || mused + p->need > capacity) break;  // Python raises it
        }
        // the value guard's ranges (`_run_step` runs it before the quota check: both only refuse here, so the
        // Python path, which runs both again, raises whichever it raises)
        if (!p->ranges.empty() && !in_ranges(*p, stack)) break;
        if (!p->devices.empty() && !same_devices(*p, stack)) break;
        // a random op: the lock taken without waiting (a holder elsewhere: the Python path waits for it), and the
        // device's generator this session's (else the Python path loads the session's state into it first)
        RngHold rng;
        if (p->seeded) {
          if (rng_lock.is_none()) break;
          Own got(PyObject_CallOneArg(rng_acquire.ptr(), Py_False));
          if (got.p == nullptr) throw py::error_already_set();
          if (got.p != Py_True) break;
          rng.release = rng_release.ptr();
          PyObject* ref = PyDict_GetItemWithError(rng_owner.ptr(), rng_lock.ptr());  // borrowed
          if (ref == nullptr && PyErr_Occurred()) throw py::error_already_set();
          if (ref == nullptr || !PyWeakref_CheckRef(ref)) break;
          PyObject* owner = PyWeakref_GetObject(ref);  // borrowed
          if (owner == nullptr) throw py::error_already_set();
          if (owner != s.ptr()) break;
        }
        // From here on the record is run here: the op, the count, the binding, the quota check.
        mark(c, i, word, progress);
        PyObject* ran = p->n_pos >= 0 ? call_run(*p, buf, stack) : call_op(*p->op, stack, p->below_autograd, !pin);
        held.clear();  // the GIL held again: the last C++ reference goes without taking it
        if (pin) {
          pins.release();
          ++pinned_records;
        }
        if (ran == nullptr) {
          exc = fetch();
          break;
        }
        Own result(ran);  // a Python run's values, held until they are bound (their tensors keep their objects)
        rng.drop();
        if (p->returns == SEVERAL) {
          if (!several(c, hkeys.p, hvals, stack, used_before, &exc, p->n_pos >= 0 ? result.p : nullptr)) break;
          ++hits;
          ++k;
          ++i;
          if (k == nsteps) {
            flags |= END;
          } else {
            for (const int64_t j : p->keep_at) {  // `objs.append(get(outputs[j]))`
              PyObject* got = get_item(tdict, PyTuple_GET_ITEM(hkeys.p, j), hvals[static_cast<size_t>(j)]);  // borrowed
              if (got == nullptr && PyErr_Occurred()) throw py::error_already_set();
              if (PyList_Append(objs.ptr(), got != nullptr ? got : Py_None) < 0) throw py::error_already_set();
            }
          }
          if (now() - start > budget) {
            flags |= OVER;
            break;
          }
          continue;
        }
        if (p->returns ? stack.size() != 1 || !stack[0].isTensor() : !stack.empty()) {
          stack.clear();
          PyErr_SetString(PyExc_RuntimeError, "native runner: the op did not return what its schema says");
          exc = fetch();
          break;
        }
        at::Tensor out = p->returns ? std::move(stack[0]).toTensor() : at::Tensor();
        stack.clear();
        c.ops.add(1);
        if (!count.is_none()) {
          c.sync_all();
          count(s);
        }
        if (p->zero && out.defined()) {  // `_run_step`'s order: counted, then zeroed, then bound
          PyObject* z = zero_storage(out);
          if (z == nullptr) {
            exc = fetch();
            break;
          }
          Py_DECREF(z);
        }
        // the result moved into its Python object: a fresh tensor's object is made owning its only reference, so
        // no C++ reference is left behind whose end would drop the object's (torch's `decref_pyobject`, a
        // `gil_scoped_acquire`, ~150 instructions an output); read back through the object below
        Own obj(p->returns ? THPVariable_Wrap(std::move(out)) : Py_NewRef(Py_None));
        if (obj.p == nullptr) throw py::error_already_set();
        try {
          // what `_bind_outputs` bound, for `over_quota`: nothing (None, or handle 0), the output handle (`bind_new`),
          // or the list `_bind_outputs` returned
          py::object bound;
          bool one = false;
          if (!p->returns || h == 0) {
            obj.reset(Py_NewRef(Py_None));  // what the session's table holds for the output handle (`objs` below)
          } else if (Py_TYPE(obj.p) == reinterpret_cast<PyTypeObject*>(THPVariableClass) && !in_p &&
                     bindable(THPVariable_Unpack(obj.p))) {
            bind_new(c, hkey.p, h, THPVariable_Unpack(obj.p), obj.p);
            handle_keys->put(h, hkey.p);  // the table's key for this handle now
            one = true;
          } else {
            c.sync_all();
            bound = bind_outputs(s, py::make_tuple(py::handle(hkey.p)), py::handle(obj.p));
          }
          int64_t after = 0;
          if (!c.used.get(&after)) throw std::overflow_error("session use out of range");
          if (after > quota && after > used_before) {
            if (one || (bound && bound.is_none())) {
              bound = py::make_tuple(py::handle(hkey.p));
            } else if (!bound) {
              bound = py::list();
            }
            c.sync_all();
            over_quota(s, bound);  // raises
          }
        } catch (py::error_already_set& e) {
          e.restore();
          exc = fetch();
          break;
        }
        ++hits;
        ++k;
        ++i;
        if (k == nsteps) {
          flags |= END;
        } else if (p->keep) {
          if (PyList_Append(objs.ptr(), obj.p) < 0) throw py::error_already_set();
        }
        if (now() - start > budget) {
          flags |= OVER;
          break;
        }
      }
      pins.release();  // a record refused after its inputs were pinned: before any code the run calls from here
      if (switched_at >= 0 && hits == switched_at && exc.is_none()) {  // the next run did not take the record
        // the run that followed the one before (`runs.Trace.alt`): a run met at two places of a step (a
        // transformer's layers) is followed by another run at each, and `next` names the last one only
        py::object py_alt, nat_alt;
        const Trace* alt = alt_tried ? nullptr : follow(*prev, &py_alt, &nat_alt, S_alt);
        if (alt != nullptr && !py_alt.is(py_cur)) {
          alt_tried = true;
          enter(std::move(py_alt), std::move(nat_alt), alt);
          continue;
        }
        cur = prev;
        nsteps = k = static_cast<int64_t>(cur->steps.size());
        flags |= END;
        objs = objs_prev;
        py_cur = py_prev;
        nat_cur = nat_prev;
        break;
      }
      if (flags != END || i >= n || !exc.is_none()) break;
      py::object py_next, nat_next;
      const Trace* next = follow(*cur, &py_next, &nat_next, S_next);
      if (next == nullptr) break;
      alt_tried = false;
      prev = cur;
      py_prev = std::move(py_cur);
      nat_prev = std::move(nat_cur);
      objs_prev = std::move(objs);
      switched_at = hits;
      enter(std::move(py_next), std::move(nat_next), next);
    }
    c.sync_all();
    py::object chained = py::none();
    if (py_cur) chained = py::make_tuple(py_cur, objs);
    return py::make_tuple(i, k, hits, flags, exc, chained);
  }

  // The run that followed `t` the last time it ran to its end (`runs.Trace.next`; with `which` S_alt, the one that
  // followed it the time before, `runs.Trace.alt`), where `Ctx.run` may go on in it: still alive, learned under this
  // context's quota and compute bound (`_native_candidates`' test), compiled, and its first step one that runs here.
  // Sets its `runs.Trace` and its native form and returns the latter's Trace; null where it does not go on.
  const Trace* follow(const Trace& t, py::object* py_next, py::object* nat_next, PyObject* which) {
    if (t.origin.is_none()) return nullptr;
    PyObject* o = PyWeakref_GetObject(t.origin.ptr());  // borrowed; None once the trace is gone
    if (o == nullptr) throw py::error_already_set();
    if (o == Py_None) return nullptr;
    Own next_of(slot_attr(which == S_alt ? trace_slots.alt : trace_slots.next, o));
    if (next_of.p == nullptr) throw py::error_already_set();
    // `next_of()`: a weak reference's referent (or None) read as its call returns it; anything else called
    Own c(PyWeakref_CheckRefExact(next_of.p) ? Py_NewRef(PyWeakref_GetObject(next_of.p))
                                             : PyObject_CallNoArgs(next_of.p));
    if (c.p == nullptr) throw py::error_already_set();
    if (c.p == Py_None) return nullptr;
    int64_t q = 0, f = 0;
    {
      Own qv(slot_attr(trace_slots.quota, c.p));
      if (qv.p == nullptr) throw py::error_already_set();
      if (!as_i64(qv.p, &q) || q != quota) return nullptr;
      Own fv(slot_attr(trace_slots.flops, c.p));
      if (fv.p == nullptr) throw py::error_already_set();
      if (!as_i64(fv.p, &f) || f != flops) return nullptr;
    }
    Own nat(slot_attr(trace_slots.native, c.p));
    if (nat.p == nullptr) throw py::error_already_set();
    const Trace* tn = trace_of(nat.p);
    if (tn == nullptr) return nullptr;  // not compiled yet (the Python path compiles it), or none runs
    if (tn->steps.empty() || tn->steps[0] == nullptr) return nullptr;
    *py_next = py::reinterpret_steal<py::object>(c.p);
    c.p = nullptr;
    *nat_next = py::reinterpret_steal<py::object>(nat.p);
    nat.p = nullptr;
    return tn;
  }

  // The rest of a SEVERAL step after its op ran: the count, `bind_outputs` of its values (a tuple's tensors, or a
  // Tensor[]'s: `_slots` flattens either; an undefined tensor is None), the quota, the kept outputs. False with
  // `exc` set when binding or the quota raised (the record failed after its op, as on the Python path).
  // `got`: a Python run's result (`call_py`), whose values are taken as it returned them where it is a tuple: its
  // tensors, None, and any other value (the attention forward's ints, which `_bind_outputs` makes tensors of); null
  // for the op's own values on `stack`.
  // `hvals`: the handles of `hkeys` as the record holds them (one a key).
  bool several(Counts& c, PyObject* hkeys, const std::vector<uint64_t>& hvals, torch::jit::Stack& stack,
               int64_t used_before, py::object* exc, PyObject* got = nullptr) {
    // each value's tensor, read through its Python object (`values` holds them; an undefined tensor for any other
    // value): no C++ reference to an output is kept beside its object, whose end would drop the object's reference
    // (torch's `decref_pyobject`, a `gil_scoped_acquire`, ~150 instructions an output)
    c10::SmallVector<const at::Tensor*, 16> outs;  // (a step's outputs, without allocating: ~300 instructions an op)
    static const at::Tensor undefined;
    // (None and an int, which a Python run's tuple holds beside its tensors, are no tensor: told apart without
    // `THPVariable_Check`'s `isinstance`, which calls the tensor metaclass's `__instancecheck__` for them, ~770
    // instructions each)
    auto tensor_in = [](PyObject* o) {
      return o != Py_None && !PyLong_CheckExact(o) && THPVariable_Check(o) ? &THPVariable_Unpack(o) : &undefined;
    };
    Own values(nullptr);
    bool flat = true;  // `values` are the slots `_bind_outputs` binds (`_slots`: no list or tuple among them)
    if (got != nullptr && PyTuple_Check(got)) {
      stack.clear();
      const Py_ssize_t nv = PyTuple_GET_SIZE(got);
      values.reset(PyList_New(nv));
      if (values.p == nullptr) throw py::error_already_set();
      for (Py_ssize_t j = 0; j < nv; ++j) {
        PyObject* o = PyTuple_GET_ITEM(got, j);  // borrowed
        if (PyList_Check(o) || PyTuple_Check(o)) flat = false;
        PyList_SET_ITEM(values.p, j, Py_NewRef(o));  // steals the new reference
        outs.push_back(tensor_in(o));
      }
    } else {
      c10::SmallVector<at::Tensor, 16> results;
      for (auto& v : stack) {
        if (v.isTensor()) {
          results.push_back(std::move(v).toTensor());
        } else if (v.isTensorList()) {
          for (const at::Tensor& t : v.toTensorVector()) results.push_back(t);
        } else {
          stack.clear();
          PyErr_SetString(PyExc_RuntimeError, "native runner: the op did not return what its schema says");
          *exc = fetch();
          return false;
        }
      }
      stack.clear();
      values.reset(PyList_New(static_cast<Py_ssize_t>(results.size())));
      if (values.p == nullptr) throw py::error_already_set();
      for (size_t j = 0; j < results.size(); ++j) {
        // moved into its object (an undefined tensor is None, as the op's Python binding returns it)
        PyObject* o = THPVariable_Wrap(std::move(results[j]));
        if (o == nullptr) throw py::error_already_set();
        PyList_SET_ITEM(values.p, static_cast<Py_ssize_t>(j), o);  // steals
        outs.push_back(tensor_in(o));
      }
    }
    c.ops.add(1);
    if (!count.is_none()) {
      c.sync_all();
      count(s);
    }
    // `_bind_outputs` binds each (handle, value) pair with `WorkerSession.bind`; for fresh handles (checked and
    // admitted above, none live) that are not failed ones and plain dense tensors, `bind_new` does the same here.
    // Anything else (a failed handle, one handle twice, more handles than values, a value `_bind_outputs` refuses)
    // takes `_bind_outputs` itself.
    const size_t nh = static_cast<size_t>(PyTuple_GET_SIZE(hkeys));
    bool here = flat && nh <= outs.size();
    c10::SmallVector<uint64_t, 16> seen;
    for (size_t j = 0; j < nh && here; ++j) {
      PyObject* kj = PyTuple_GET_ITEM(hkeys, static_cast<Py_ssize_t>(j));
      const uint64_t hj = hvals[j];
      PyObject* vj = PyList_GET_ITEM(values.p, static_cast<Py_ssize_t>(j));  // borrowed
      if (hj == 0 || vj == Py_None) continue;  // `_bind_outputs` binds nothing there
      if (Py_TYPE(vj) != reinterpret_cast<PyTypeObject*>(THPVariableClass) || !bindable(*outs[j])) {
        here = false;
        break;
      }
      for (const uint64_t o : seen) {
        if (o == hj) here = false;
      }
      seen.push_back(hj);
      int pj = contains(poisoned.ptr(), kj);
      if (pj < 0) throw py::error_already_set();
      if (pj) here = false;
    }
    try {
      py::object bound;
      if (here) {
        zero_several(hvals, nh, outs, values.p);
        Own got(PyList_New(0));
        if (got.p == nullptr) throw py::error_already_set();
        for (size_t j = 0; j < nh; ++j) {
          PyObject* kj = PyTuple_GET_ITEM(hkeys, static_cast<Py_ssize_t>(j));
          const uint64_t hj = hvals[j];
          if (!outs[j]->defined() || hj == 0) continue;
          bind_new(c, kj, hj, *outs[j], PyList_GET_ITEM(values.p, static_cast<Py_ssize_t>(j)), false);
          handle_keys->put(hj, kj);
          if (PyList_Append(got.p, kj) < 0) throw py::error_already_set();
        }
        bound = py::reinterpret_steal<py::object>(got.p);
        got.p = nullptr;
      } else {
        c.sync_all();
        bound = bind_outputs(s, py::handle(hkeys), py::handle(flat ? values.p : got));
      }
      values.reset(nullptr);
      int64_t after = 0;
      if (!c.used.get(&after)) throw std::overflow_error("session use out of range");
      if (after > quota && after > used_before) {
        c.sync_all();
        over_quota(s, bound);  // raises
      }
    } catch (py::error_already_set& e) {
      e.restore();
      *exc = fetch();
      return false;
    }
    return true;
  }

  // `WorkerSession.bind_outputs`' zeroing, before `several` binds an op's outputs with `bind_new`: a new storage's
  // bytes outside the union of the extents of the outputs it binds there (`y[0]`, `y[1]` over one new storage keep
  // each other's bytes), where one of them does not cover it (`outside`); handle 0 binds nothing, as there.
  // `hvals`: the first `nh` outputs' handles.
  void zero_several(const std::vector<uint64_t>& hvals, size_t nh, c10::ArrayRef<const at::Tensor*> outs,
                    PyObject* values) {
    auto bound = [&](size_t j) { return outs[j]->defined() && hvals[j] != 0; };
    c10::SmallVector<const c10::StorageImpl*, 16> done;
    for (size_t j = 0; j < nh; ++j) {
      if (!bound(j) || !outside(outs[j]->unsafeGetTensorImpl(), outs[j]->storage().nbytes())) continue;
      const c10::StorageImpl* st = outs[j]->storage().unsafeGetStorageImpl();
      if (std::find(done.begin(), done.end(), st) != done.end()) continue;
      done.push_back(st);
      Own skey(PyLong_FromVoidPtr(const_cast<c10::StorageImpl*>(st)));
      if (skey.p == nullptr) throw py::error_already_set();
      if (get_item(storages.ptr(), skey.p, reinterpret_cast<uintptr_t>(st)) != nullptr) continue;  // not new
      if (PyErr_Occurred()) throw py::error_already_set();
      Own objs(PyList_New(0));
      if (objs.p == nullptr) throw py::error_already_set();
      for (size_t k = 0; k < nh; ++k) {  // those before j too: one that covers it keeps it whole
        if (bound(k) && outs[k]->storage().unsafeGetStorageImpl() == st &&
            PyList_Append(objs.p, PyList_GET_ITEM(values, static_cast<Py_ssize_t>(k))) < 0) {
          throw py::error_already_set();
        }
      }
      zero_new(objs.p);
    }
  }

  // `CommandExecutor._upload` of a whole tensor in one chunk (`filled`, then `WorkerSession.rebind`) for the Upload
  // message `msg` (command i), checked in `_upload`'s order before anything is done: the handle this session's and
  // not its reserved one, the shape and dtype, a bool's bytes each 0 or 1, the bytes the tensor's; the quota and the
  // device's capacity against the new bytes (`admit`, before the old tensor is let go; near the quota, where the
  // session's upload pool holds memory, Python's `admit` lets that go first: Python's), the handle limit for a new
  // handle, no upload in progress (`s.uploads`); then the tensor made and filled (`filled_tensor`). Anything else,
  // or anything that fails, leaves the command to Python untouched (false). Then the progress mark, the handle's old
  // tensor unbound (a failed one forgotten), the new one bound (`bind_new`: a new storage, counted), the ledger's
  // transfer; and a kept output of the run that only the run's list still holds (the handle's old tensor) dropped
  // from it, as the Python path holds kept outputs weakly across an upload (`eager_span`): no run keeps a tensor
  // alive that its session let go.
  // Command i among the records, `cmd` its bytes (`slices.FrameCommands.between`: one `upload` or `free` field):
  // run here (true), or left to Python untouched (false; with `exc` set where the free raised midway: the caller
  // returns it for command i, which Python records as `execute` would)
  bool between(Counts& c, PyObject* cmd, int64_t i, Word& word, const py::object& progress, PyObject* objs,
               py::object* exc) {
    if (!PyBytes_CheckExact(cmd) || PyBytes_GET_SIZE(cmd) < 1) return false;
    const auto* p = reinterpret_cast<const unsigned char*>(PyBytes_AS_STRING(cmd));
    const unsigned char* end = p + PyBytes_GET_SIZE(cmd);
    const unsigned char key = *p++;
    uint64_t len = 0;
    if (!read_size(&p, end, &len) || len != static_cast<uint64_t>(end - p)) return false;
    if (key == ((2 << 3) | 2)) return upload(c, p, end, i, word, progress, objs);
    if (key != ((4 << 3) | 2)) return false;
    // `WorkerSession.free` (`free_handles`, with this context's handle ints), as `execute` runs it
    Reused<uint64_t> hs_(free_room);
    std::vector<uint64_t>& hs = hs_.v;
    if (!parse_free(p, end, &hs)) return false;
    mark(c, i, word, progress);
    try {
      if (!PyDict_CheckExact(pending.ptr())) {  // (never: `s.uploads` is a dict) as `free_handles` runs it
        c.sync_all();  // `free_parsed` takes the freed bytes off `s.used` and `memory.used` itself
        if (!free_parsed(s.ptr(), hs, handle_keys.get())) throw std::logic_error("a session's tables are dicts");
      } else {
        free_here(c, hs);
      }
    } catch (py::error_already_set& e) {
      e.restore();
      *exc = fetch();
      return false;
    }
    drop_orphans(objs);
    return true;
  }

  // One such command outside a run (round 50, `Ctx.between`, `CommandExecutor.run_between`: the uploads at a step's
  // start, a free after a run ended, which Python ran through upb's message and `execute`), run by `between` as it
  // runs one among a run's records: the same readers (`parse_upload`, `parse_free`: a message upb takes, read to the
  // same fields), the same checks in `_upload`'s order, the same tables. True: run. False: nothing done (another
  // device's context, bytes the readers leave to upb, a check that fails, whose error is Python's: the caller parses
  // the command and executes it). The exception a free raised midway (the handles before it freed): the command
  // failed, as `execute` records it. The progress mark is the caller's (`slices._loop`, `eager_span`). A context
  // without `between` (a real GPU's session: no upload runs here) runs a free only (`free_parsed`, as `native.free`).
  py::object between_one(py::handle cmd) {
    if (!between_here && !(PyBytes_CheckExact(cmd.ptr()) && PyBytes_GET_SIZE(cmd.ptr()) > 0 &&
                           PyBytes_AS_STRING(cmd.ptr())[0] == static_cast<char>((4 << 3) | 2))) {
      return py::bool_(false);
    }
    const py::object no_progress = py::none();
    Word word(no_progress);
    Fields sf(s.ptr(), {S_used, S_ops}), mf(memory.ptr(), {S_used});
    Counts c(sf, mf);  // written back before the transfer's call, at the end, and on a raise
    Own objs(PyList_New(0));  // no run, no kept outputs
    if (objs.p == nullptr) throw py::error_already_set();
    py::object exc = py::none();
    const bool ran = between(c, cmd.ptr(), 0, word, no_progress, objs.p, &exc);
    c.sync_all();
    if (!exc.is_none()) return exc;
    return py::bool_(ran);
  }

  // `free_parsed` on the context's own tables (the session's, which it never replaces: `_native_ctx`), the bytes
  // freed taken off `s.used` and `memory.used` through the run's counters (written back before any Python code the
  // run calls, as every count of the run): a free among the records read five attributes and wrote two with
  // `-=`, and synced the counters first (~4k instructions a `Free`). Raises (the error set) where a handle raised,
  // the bytes freed before it taken off first, as `WorkerSession.free`'s `finally`.
  void free_here(Counts& c, const std::vector<uint64_t>& hs) {
    const FreeTables t{tensors.ptr(), keys.ptr(), storages.ptr(), pending.ptr(), poisoned.ptr(), pinned.ptr()};
    int64_t freed_c = 0;
    Own freed(nullptr);  // a sum of entries that are not ints `bind_new` made (never here): Python's
    const bool ok = free_loop(s.ptr(), t, hs, handle_keys.get(), &c, &freed_c, freed);
    PyObject *type = nullptr, *value = nullptr, *tb = nullptr;
    if (!ok) PyErr_Fetch(&type, &value, &tb);
    try {
      if (freed.p == nullptr && freed_c > INT64_MIN) {
        c.used.add(-freed_c);
        c.mused.add(-freed_c);
      } else {
        Own add(PyLong_FromLongLong(freed_c));
        if (add.p == nullptr) throw py::error_already_set();
        Own sum(freed.p != nullptr ? PyNumber_Add(freed.p, add.p) : Py_NewRef(add.p));
        if (sum.p == nullptr) throw py::error_already_set();
        const int any = PyObject_IsTrue(sum.p);
        if (any < 0) throw py::error_already_set();
        if (any) {
          c.sync_all();
          sub_attr(s.ptr(), S_used, sum.p);
          sub_attr(memory.ptr(), S_used, sum.p);
        }
      }
    } catch (...) {
      Py_XDECREF(type);
      Py_XDECREF(value);
      Py_XDECREF(tb);
      throw;
    }
    if (!ok) {
      PyErr_Restore(type, value, tb);
      throw py::error_already_set();
    }
  }

  // the progress mark of command i (as `run_commands` marks it)
  inline void mark(Counts& c, int64_t i, Word& word, const py::object& progress) {
    if (word.buf != nullptr) {
      const int32_t at = static_cast<int32_t>(i);  // a slice holds far fewer than 2^31 commands
      std::memcpy(word.buf, &at, 4);
    } else if (!progress.is_none()) {
      c.sync_all();
      progress(i);
    }
  }

  // the run's kept outputs that nothing but its list holds after an upload or a free among its records: dropped
  // from it, as the Python path holds them weakly across such a command (`eager_span`)
  static void drop_orphans(PyObject* objs) {
    for (Py_ssize_t j = 0; j < PyList_GET_SIZE(objs); ++j) {
      PyObject* o = PyList_GET_ITEM(objs, j);
      if (o != Py_None && Py_REFCNT(o) == 1) {
        PyList_SET_ITEM(objs, j, Py_NewRef(Py_None));
        Py_DECREF(o);
      }
    }
  }

  bool upload(Counts& c, const unsigned char* b, const unsigned char* b_end, int64_t i, Word& word,
              const py::object& progress, PyObject* objs) {
    SmallUpload u;
    if (!parse_upload(b, b_end, &u)) return false;
    if (!u.meta || u.offset != 0 || !u.last || u.len > static_cast<uint64_t>(CHUNK_BYTES)) return false;
    const uint64_t h = u.handle;
    if ((h >> HANDLE_BITS) != static_cast<uint64_t>(number) || h == static_cast<uint64_t>(base)) return false;
    if (u.dtype >= dtypes.size() || dtypes[u.dtype] == at::ScalarType::Undefined) return false;
    const at::ScalarType st = dtypes[u.dtype];
    int64_t numel = 1, nbytes = 0;
    for (int64_t d = 0; d < u.dims; ++d) {
      if (__builtin_mul_overflow(numel, u.shape[d], &numel)) return false;
    }
    if (__builtin_mul_overflow(numel, static_cast<int64_t>(c10::elementSize(st)), &nbytes)) return false;
    if (static_cast<uint64_t>(nbytes) != u.len) return false;
    if (st == at::ScalarType::Bool) {
      for (uint64_t j = 0; j < u.len; ++j) {
        if (u.data[j] > 1) return false;
      }
    }
    PyObject* tdict = tensors.ptr();
    PyObject* pdict = poisoned.ptr();
    if (!PyDict_CheckExact(pending.ptr()) || PyDict_GET_SIZE(pending.ptr()) > 0) return false;
    int64_t used = 0, mused = 0, held = 0;
    if (!c.used.get(&used) || !c.mused.get(&mused) || !attr_i64(pool.ptr(), S_held, &held)) return false;
    if (held != 0 && used + nbytes + held > quota) return false;
    if (used + nbytes > quota || mused + nbytes > capacity) return false;
    Own hkey(handle_keys->get(h));
    if (hkey.p == nullptr) throw py::error_already_set();
    const int in_t = PyDict_Contains(tdict, hkey.p);
    if (in_t < 0) throw py::error_already_set();
    const int in_p = in_t ? 0 : contains(pdict, hkey.p);
    if (in_p < 0) throw py::error_already_set();
    if (!in_t && !in_p && PyDict_GET_SIZE(tdict) + PyDict_GET_SIZE(pdict) >= max_handles) return false;
    at::Tensor t;
    try {
      t = filled_tensor(at::IntArrayRef(u.shape, static_cast<size_t>(u.dims)), st, u.data, u.len);
    } catch (const std::exception&) {
      return false;  // (out of memory) Python's `_upload` raises it
    }
    Own obj(THPVariable_Wrap(std::move(t)));  // owning the tensor's only reference (as a record's output)
    if (obj.p == nullptr) throw py::error_already_set();
    // from here on the upload is run here
    mark(c, i, word, progress);
    if (in_t) {
      unbind(c, hkey.p);
    } else if (in_p) {
      Own gone(dict_pop(pdict, hkey.p));
      if (gone.p == nullptr) throw py::error_already_set();
    }
    bind_new(c, hkey.p, h, THPVariable_Unpack(obj.p), obj.p);
    handle_keys->put(h, hkey.p);
    c.sync_all();
    Own nb(PyLong_FromLongLong(nbytes));
    if (nb.p == nullptr) throw py::error_already_set();
    PyObject* args[] = {S_upload, nb.p};
    Own r(PyObject_Vectorcall(transfer.ptr(), args, 2, nullptr));
    if (r.p == nullptr) throw py::error_already_set();
    drop_orphans(objs);
    return true;
  }

  // `WorkerSession.unbind` of a live handle (no upload in progress): its tensor dropped, its storage's count taken
  // down and the storage's bytes freed with its last handle
  void unbind(Counts& c, PyObject* hkey) {
    if (unpin(s.ptr(), pinned.ptr(), hkey) < 0) throw py::error_already_set();
    Own t(dict_pop(tensors.ptr(), hkey));
    if (t.p == nullptr) throw py::error_already_set();
    if (is_missing(t.p)) return;
    t.reset(nullptr);
    Own skey(dict_pop(keys.ptr(), hkey));  // `keys.pop(h)`
    if (skey.p == nullptr) throw py::error_already_set();
    if (is_missing(skey.p)) {
      PyErr_SetObject(PyExc_KeyError, hkey);
      throw py::error_already_set();
    }
    PyObject* entry = PyDict_GetItemWithError(storages.ptr(), skey.p);  // borrowed
    if (entry == nullptr) {
      if (!PyErr_Occurred()) PyErr_SetObject(PyExc_KeyError, skey.p);
      throw py::error_already_set();
    }
    Own held(Py_NewRef(entry));
    Own n0(PySequence_GetItem(entry, 0));
    Own one(PyLong_FromLong(1));
    if (n0.p == nullptr || one.p == nullptr) throw py::error_already_set();
    Own n1(PyNumber_Subtract(n0.p, one.p));  // `entry[0] -= 1`
    if (n1.p == nullptr || PySequence_SetItem(entry, 0, n1.p) < 0) throw py::error_already_set();
    const int last = PyObject_Not(n1.p);
    if (last < 0) throw py::error_already_set();
    if (!last) return;
    if (PyDict_DelItem(storages.ptr(), skey.p) < 0) throw py::error_already_set();
    int64_t nbytes = 0;
    Own size(PySequence_GetItem(entry, 1));
    if (size.p == nullptr) throw py::error_already_set();
    if (!as_i64(size.p, &nbytes)) throw std::overflow_error("a storage's bytes out of range");
    c.used.add(-nbytes);
    c.mused.add(-nbytes);
    entries.give(held.p);  // kept for `bind_new` where nothing else refers to it
    held.p = nullptr;
  }

  static py::object fetch() {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != nullptr && value != nullptr) PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    if (value == nullptr) return py::none();
    return py::reinterpret_steal<py::object>(value);
  }

  // Whether `t`'s storage of `nbytes` holds bytes outside `t`'s extent (`sessions._zero_outside` zeroes them in a
  // new storage): a kernel's buffer behind a smaller result (`mse_loss`'s 0-d loss over the elementwise buffer), an
  // expanded or offset result. Read from the TensorImpl (a strided tensor, checked by the callers): the common case,
  // a dense result over exactly its storage, is a product, two comparisons and torch's cached dense flag.
  static bool outside(const c10::TensorImpl* t, size_t nbytes) {
    const int64_t n = t->numel();
    const int64_t off = t->storage_offset();
    const auto item = static_cast<int64_t>(t->itemsize());
    if (static_cast<size_t>(n * item) == nbytes && off == 0 && t->is_non_overlapping_and_dense()) return false;
    if (n == 0) return nbytes > 0;  // `_zero_outside`: a tensor of no elements covers nothing
    if (off > 0) return true;
    int64_t last = 0;  // `sessions.extent`: strides are never negative
    const auto sizes = t->sizes();
    const auto strides = t->strides();
    for (size_t d = 0; d < sizes.size(); ++d) last += (sizes[d] - 1) * strides[d];
    return static_cast<size_t>((last + 1) * item) < nbytes;
  }

  // `sessions._zero_unwritten(tensors, storage)` for `objs`, tensors over one new storage (`WorkerSession.zero_new`):
  // nothing where one of them is marked `WHOLE` (`any(getattr(t, WHOLE, False))`, read here: a kernel that wrote its
  // whole buffer, the common case where a result does not cover its storage), else Python's zeroing.
  void zero_new(PyObject* objs) {
    for (Py_ssize_t j = 0; j < PyList_GET_SIZE(objs); ++j) {
      Own w(PyObject_GetAttr(PyList_GET_ITEM(objs, j), S_whole));
      if (w.p == nullptr) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) throw py::error_already_set();
        PyErr_Clear();
        continue;
      }
      const int yes = PyObject_IsTrue(w.p);
      if (yes < 0) throw py::error_already_set();
      if (yes) return;
    }
    s.attr("zero_new")(py::handle(objs));
  }

  // `WorkerSession.bind_new`: count the storage once (a new one's bytes outside `out` zeroed, unless `zero` is
  // false: `several` zeroes outside all of an op's outputs first), bind the handle
  void bind_new(Counts& c, PyObject* hkey, uint64_t h, const at::Tensor& out, PyObject* obj, bool zero = true) {
    const auto& storage = out.storage();
    const auto sv = reinterpret_cast<uintptr_t>(storage.unsafeGetStorageImpl());  // `storage_key`'s value
    Own skey(PyLong_FromVoidPtr(storage.unsafeGetStorageImpl()));
    if (skey.p == nullptr) throw py::error_already_set();
    PyObject* entry = get_item(storages.ptr(), skey.p, sv);  // borrowed
    if (entry == nullptr) {
      if (PyErr_Occurred()) throw py::error_already_set();
      const int64_t nbytes = static_cast<int64_t>(storage.nbytes());
      if (zero && outside(out.unsafeGetTensorImpl(), storage.nbytes())) {  // round 36: the runner zeroed nothing (guards.BUFFERED_RESULTS)
        Own objs(PyList_New(1));
        if (objs.p == nullptr) throw py::error_already_set();
        PyList_SET_ITEM(objs.p, 0, Py_NewRef(obj));  // steals the new reference
        zero_new(objs.p);
      }
      Own fresh(entries.take(nbytes));  // [handles on the storage, its bytes]
      if (fresh.p == nullptr) throw py::error_already_set();
      if (set_item(storages.ptr(), skey.p, fresh.p, sv) < 0) throw py::error_already_set();
      c.used.add(nbytes);
      c.mused.add(nbytes);
    } else {
      PyObject* c = PyList_GetItem(entry, 0);  // borrowed
      if (c == nullptr) throw py::error_already_set();
      Own one(PyLong_FromLong(1));
      if (one.p == nullptr) throw py::error_already_set();
      PyObject* c1 = PyNumber_Add(c, one.p);
      if (c1 == nullptr || PyList_SetItem(entry, 0, c1) < 0) throw py::error_already_set();  // steals c1
    }
    if (set_item(keys.ptr(), hkey, skey.p, h) < 0) throw py::error_already_set();
    if (set_item(tensors.ptr(), hkey, obj, h) < 0) throw py::error_already_set();
  }
};

// The handles of a serialized `Free` message (field 1, `repeated uint64`: packed varints as upb writes them, or one
// varint a field): false for anything else (another field, a truncated or overlong varint), before any side effect.
bool parse_free(const unsigned char* p, const unsigned char* end, std::vector<uint64_t>* out) {
  auto varint = [&](const unsigned char* lim, uint64_t* v) -> bool {
    uint64_t x = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p >= lim) return false;
      const unsigned char b = *p++;
      if (shift == 63 && b > 1) return false;
      x |= static_cast<uint64_t>(b & 0x7f) << shift;
      if ((b & 0x80) == 0) {
        *v = x;
        return true;
      }
    }
    return false;
  };
  while (p < end) {
    const unsigned char tag = *p++;
    uint64_t v = 0;
    if (tag == 0x08) {  // field 1, a varint
      if (!varint(end, &v)) return false;
      out->push_back(v);
    } else if (tag == 0x0a) {  // field 1, packed (its length canonical, `read_size`: upb refuses one of six bytes)
      uint64_t len = 0;
      if (!read_size(&p, end, &len) || len > static_cast<uint64_t>(end - p)) return false;
      const unsigned char* lim = p + len;
      while (p < lim) {
        if (!varint(lim, &v)) return false;
        out->push_back(v);
      }
    } else {
      return false;
    }
  }
  return true;
}

// A varint of a serialized message at `*p` (before `lim`), as protobuf writes one (overlong forms read as upb reads
// them); false for a truncated one or one of more than 64 bits
bool read_varint(const unsigned char** p, const unsigned char* lim, uint64_t* v) {
  uint64_t x = 0;
  for (int shift = 0; shift < 64; shift += 7) {
    if (*p >= lim) return false;
    const unsigned char b = *(*p)++;
    if (shift == 63 && b > 1) return false;
    x |= static_cast<uint64_t>(b & 0x7f) << shift;
    if ((b & 0x80) == 0) {
      *v = x;
      return true;
    }
  }
  return false;
}

// The field numbers of `Command`'s oneof `cmd` (proto/gpupool/v1/device.proto), each a message or bytes: written
// length-delimited. `EAGER_OP` is `eager_op`'s.
constexpr uint64_t EAGER_OP = 30;
bool command_member(uint64_t field) {
  switch (field) {
    case 1: case 2: case 3: case 4: case 5: case 6: case 20: case 21: case 22: case 30: case 70: case 71:
      return true;
    default:
      return false;
  }
}

// A buffer's bytes (`PyObject_GetBuffer`), held until the end of the scope; `ok` false where the object is no
// buffer (the error cleared)
struct Bytes {
  Py_buffer view;
  bool ok;
  explicit Bytes(PyObject* o) : ok(PyObject_GetBuffer(o, &view, PyBUF_SIMPLE) == 0) {
    if (!ok) PyErr_Clear();
  }
  ~Bytes() {
    if (ok) PyBuffer_Release(&view);
  }
  Bytes(const Bytes&) = delete;
  Bytes& operator=(const Bytes&) = delete;
  const unsigned char* begin() const { return static_cast<const unsigned char*>(view.buf); }
  const unsigned char* end() const { return begin() + view.len; }
};

// Appends a command's record to `list`: `rec[:rlen]` as bytes, or `empty` (b"") where rlen is 0
void append_record(PyObject* list, PyObject* empty, const unsigned char* rec, uint64_t rlen) {
  PyObject* item = rlen > 0
                       ? PyBytes_FromStringAndSize(reinterpret_cast<const char*>(rec), static_cast<Py_ssize_t>(rlen))
                       : Py_NewRef(empty);
  if (item == nullptr) throw py::error_already_set();
  const int r = PyList_Append(list, item);
  Py_DECREF(item);
  if (r < 0) throw py::error_already_set();
}

// A length as protobuf writes one, canonical only: a varint of at most five bytes, no overlong form (a last byte of
// 0 after the first), below INT32_MAX (upb refuses a length of INT32_MAX or more); false for anything else.
inline bool read_size(const unsigned char** p, const unsigned char* lim, uint64_t* v) {
  if (*p < lim && (**p & 0x80) == 0) {  // one byte: the usual
    *v = *(*p)++;
    return true;
  }
  uint64_t x = 0;
  for (int i = 0; i < 5; ++i) {
    if (*p >= lim) return false;
    const unsigned char b = *(*p)++;
    x |= static_cast<uint64_t>(b & 0x7f) << (7 * i);
    if ((b & 0x80) == 0) {
      if ((i > 0 && b == 0) || x >= 0x7fffffff) return false;
      *v = x;
      return true;
    }
  }
  return false;
}

// A command's eager record as `eager_records` reads it (the oneof's last member decides; every field a
// length-delimited `cmd` member within the command): false where it does not read the command that way.
bool command_record(const unsigned char* p, const unsigned char* cend, const unsigned char** rec, uint64_t* rlen) {
  uint64_t last = 0;
  *rec = nullptr;
  *rlen = 0;
  while (p < cend) {
    uint64_t k = 0, l = 0;
    if (!read_varint(&p, cend, &k) || (k & 7) != 2 || !command_member(k >> 3)) return false;
    if (!read_varint(&p, cend, &l) || l > static_cast<uint64_t>(cend - p)) return false;
    last = k >> 3;
    if (last == EAGER_OP) {
      *rec = p;
      *rlen = l;
    }
    p += l;
  }
  if (last != EAGER_OP) *rlen = 0;
  return true;
}

// `[c.eager_op for c in ClientFrame.FromString(payload).commands]` (`slices.eager_records`), read from the frame's
// bytes instead of through upb's message objects (~1.2k instructions a command: a message object per command, its
// attribute read, the oneof's case). Each command's record is its `eager_op` where the oneof's last member written
// is `eager_op` (the last such field's bytes, as a parser keeps them), b"" where another member is last or none is
// written. Only frames whose every field is a `commands` entry and whose commands hold only length-delimited `cmd`
// members are read here; anything else (an unknown or misplaced field, another wire type, a truncated length)
// gives None before anything is made, and the caller reads the parsed message. The caller parsed the frame first
// (so a frame that does not parse never gets here); a length is still checked against what is left of the buffer.
py::object eager_records(py::handle payload) {
  Bytes buf(payload.ptr());
  if (!buf.ok) return py::none();
  const unsigned char* p = buf.begin();
  const unsigned char* end = buf.end();
  Own out(PyList_New(0));
  if (out.p == nullptr) throw py::error_already_set();
  Own empty(PyBytes_FromStringAndSize(nullptr, 0));
  if (empty.p == nullptr) throw py::error_already_set();
  while (p < end) {
    uint64_t key = 0, len = 0;
    if (!read_varint(&p, end, &key) || key != ((1 << 3) | 2)) return py::none();  // field 1, length-delimited
    if (!read_varint(&p, end, &len) || len > static_cast<uint64_t>(end - p)) return py::none();
    const unsigned char* rec = nullptr;
    uint64_t rlen = 0;
    if (!command_record(p, p + len, &rec, &rlen)) return py::none();
    append_record(out.p, empty.p, rec, rlen);
    p += len;
  }
  PyObject* got = out.p;
  out.p = nullptr;
  return py::reinterpret_steal<py::object>(got);
}

// A slice's commands read from the frame's bytes for `slices.frame_commands`, so that upb parses only the commands
// that are not plain eager records: (records, at, others, ask), or None for a frame it does not read (then upb
// parses all of it, as before). A command is "plain" where its bytes are one or more `eager_op` fields (number 30,
// length-delimited) each in the canonical form protobuf writes (the key as the two bytes f2 01, the length as
// `read_size` reads it), the last one not empty: upb parses such a command to a `Command` whose oneof is
// `eager_op` holding the last field's bytes (the last one kept), and nothing in it can fail to parse; `records[i]`
// is those bytes. Every other command (another member, an unknown field, another wire type, any non-canonical
// form, an empty record or command) has its whole `commands` entry (key, length and bytes) copied into `others`, a
// frame of those entries in order, for the caller to have upb parse (they then fail or not exactly as within the
// whole frame: a repeated message's entries parse each on their own, at the same depth); `at` maps its index in
// the slice to its position in `others`; its record is what `eager_records` reads (b"" where another member is
// last), and where that reading does not read the command its index is in `ask` (the caller takes the record
// from upb's message). The frame itself must be `commands` entries only, each keyed by the byte 0a with a
// `read_size` length within the buffer; anything else gives None before anything is made. Every byte read is
// checked against the buffer's (or the entry's) end first.
//
// With `between`, a fifth element: a list of each command's bytes where the command is one `upload` or `free` field
// in the canonical form (the key 12 or 22, a `read_size` length, the message at most `SMALL_COMMAND` bytes, nothing
// else in the command) and None for every other command, or None where the slice has no such command
// (`slices.FrameCommands.between`, which `Ctx.run` runs among a run's records; upb parses them as any other).
//
// With `lazy` too (round 49), such a command is in `between` only where its message is one `parse_upload` or
// `parse_free` reads (each a message upb takes, to the same fields), and then it is not in `others` (nor `at`): upb
// never parses it unless Python asks for it (`FrameCommands`, from its bytes here: it cannot fail). One they do not
// read is in `others` only, for upb's parse before anything runs, as any other command.
constexpr uint64_t SMALL_COMMAND = 64 << 10;
py::object eager_frame(py::handle payload, bool between, bool lazy) {
  Bytes buf(payload.ptr());
  if (!buf.ok) return py::none();
  const unsigned char* p = buf.begin();
  const unsigned char* end = buf.end();
  Own records(PyList_New(0));
  if (records.p == nullptr) throw py::error_already_set();
  Own at(PyDict_New());
  if (at.p == nullptr) throw py::error_already_set();
  Own ask(PyList_New(0));
  if (ask.p == nullptr) throw py::error_already_set();
  Own empty(PyBytes_FromStringAndSize(nullptr, 0));
  if (empty.p == nullptr) throw py::error_already_set();
  std::vector<std::pair<const unsigned char*, size_t>> others;  // each other command's whole entry
  size_t others_size = 0;
  std::vector<std::pair<Py_ssize_t, py::object>> ups;  // (index, its bytes) of the small uploads and frees
  std::vector<uint64_t> free_room;  // a free's handles, read (`lazy`) and dropped
  while (p < end) {
    const unsigned char* entry = p;
    if (*p++ != ((1 << 3) | 2)) return py::none();  // field 1, length-delimited, as a one-byte key
    uint64_t len = 0;
    if (!read_size(&p, end, &len) || len > static_cast<uint64_t>(end - p)) return py::none();
    const unsigned char* cend = p + len;
    const unsigned char* rec = nullptr;
    uint64_t rlen = 0;
    bool plain = p < cend;
    for (const unsigned char* q = p; plain && q < cend;) {
      if (cend - q < 2 || q[0] != 0xf2 || q[1] != 0x01) {  // `eager_op`'s key: (30 << 3) | 2 as a varint
        plain = false;
        break;
      }
      q += 2;
      uint64_t l = 0;
      if (!read_size(&q, cend, &l) || l > static_cast<uint64_t>(cend - q)) {
        plain = false;
        break;
      }
      rec = q;
      rlen = l;
      q += l;
    }
    plain = plain && rlen > 0;
    const Py_ssize_t i = PyList_GET_SIZE(records.p);
    const unsigned char* q = p + 1;
    uint64_t ulen = 0;
    // an upload or a free the runner may run among the records (`between`), read here where `lazy` (then no upb)
    const bool here = !plain && between && p < cend && (*p == ((2 << 3) | 2) || *p == ((4 << 3) | 2)) &&
                      read_size(&q, cend, &ulen) && ulen <= SMALL_COMMAND && ulen == static_cast<uint64_t>(cend - q);
    bool read = false;
    if (here && lazy) {
      if (*p == ((2 << 3) | 2)) {
        SmallUpload u;
        read = parse_upload(q, cend, &u);
      } else {
        free_room.clear();
        read = parse_free(q, cend, &free_room);
      }
    }
    if (read) {
      rec = nullptr;
      rlen = 0;
    } else if (!plain) {
      others.emplace_back(entry, static_cast<size_t>(cend - entry));
      others_size += static_cast<size_t>(cend - entry);
      Own key(PyLong_FromSsize_t(i));
      Own pos(PyLong_FromSsize_t(static_cast<Py_ssize_t>(others.size() - 1)));
      if (key.p == nullptr || pos.p == nullptr || PyDict_SetItem(at.p, key.p, pos.p) < 0) {
        throw py::error_already_set();
      }
      if (!command_record(p, cend, &rec, &rlen)) {
        rlen = 0;
        if (PyList_Append(ask.p, key.p) < 0) throw py::error_already_set();
      }
    }
    if (here && (read || !lazy)) {
      PyObject* cmd = PyBytes_FromStringAndSize(reinterpret_cast<const char*>(p), cend - p);
      if (cmd == nullptr) throw py::error_already_set();
      ups.emplace_back(i, py::reinterpret_steal<py::object>(cmd));
    }
    append_record(records.p, empty.p, rec, rlen);
    p = cend;
  }
  Own joined(PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(others_size)));  // the entries copied once
  if (joined.p == nullptr) throw py::error_already_set();
  char* out = PyBytes_AS_STRING(joined.p);
  for (const auto& [from, size] : others) {
    std::memcpy(out, from, size);
    out += size;
  }
  auto got = py::make_tuple(py::reinterpret_borrow<py::object>(records.p), py::reinterpret_borrow<py::object>(at.p),
                            py::reinterpret_borrow<py::object>(joined.p), py::reinterpret_borrow<py::object>(ask.p));
  if (!between) return std::move(got);
  py::object up_list = py::none();
  if (!ups.empty()) {
    Own list(PyList_New(PyList_GET_SIZE(records.p)));
    if (list.p == nullptr) throw py::error_already_set();
    for (Py_ssize_t j = 0; j < PyList_GET_SIZE(records.p); ++j) PyList_SET_ITEM(list.p, j, Py_NewRef(Py_None));
    for (auto& [j, msg] : ups) PyList_SetItem(list.p, j, msg.release().ptr());  // steals; drops the None
    up_list = py::reinterpret_borrow<py::object>(list.p);
  }
  return py::make_tuple(got[0], got[1], got[2], got[3], up_list);
}

// `slices.split_frame` (`_split_frame`, the Python reading, which stays the reference): a serialized ClientFrame cut
// into its commands' spans, in the stream reader of the daemon's front for every frame a client sends (~1.2 us of
// interpreter a command there). The same reading step for step: a `commands` tag (0x0a) at each command's start,
// its length as a varint of at most six bytes (shift <= 35), its end within the frame, an empty command skipped
// uncounted, its kind the field number of its first tag (a varint of at most five bytes within the command, shift
// < 35; 0 where that tag is unfinished), never 0, at most `max_commands` of them. Returns ([(kind, span)], [the
// positions of the commands of kind `upload` or `get`], whether any command is of kind RUN_GRAPH: the one command a
// worker may run from its bytes without upb's parse first, `graph_frame`, which takes only commands whose first tag
// is run_graph's, i.e. of that kind: the front's protobuf check of a small frame without one is left to the worker's
// parse, round 45), each span as below, or None for
// anything else (a frame the reading refuses, a `raw` that is neither exactly bytes nor a one-dimensional contiguous
// memoryview of bytes: a side socket's reused frame buffer, server/bulkside.py), before anything is handed out: the
// caller then runs the Python reading, which raises its own error. Every byte read is checked against the frame's
// end first. A frame of more than COPY_FRAME bytes has its spans as slices of one memoryview of it (a memoryview's
// spans are slices of it: they hold its buffer as it does); a smaller one (an eager step's, a synced call's: nearly
// every frame) has each span as a bytes object of its own, a copy: ~100 instructions a command where a memoryview
// slice (a slice object, a new view and its registration with the buffer, its release later) cost ~1,000 and the
// front's join of the spans for the worker read each view's buffer again (round 43, daemon43: ~1.1k instructions an
// eager op of the tiny MLP in the front's reader). The copies hold no reference to `raw` (a side socket's reused frame
// buffer included), and together they are no bigger than it.
constexpr Py_ssize_t COPY_FRAME = 64 * 1024;
constexpr uint64_t RUN_GRAPH = 21;  // `Command.run_graph`'s field number (server/bulk.py RUN_GRAPH)

py::object split_frame(py::handle raw, int64_t max_commands, int64_t upload, int64_t get) {
  const unsigned char* base = nullptr;
  Py_ssize_t n = 0;
  Own view(nullptr);
  if (PyBytes_CheckExact(raw.ptr())) {
    base = reinterpret_cast<const unsigned char*>(PyBytes_AS_STRING(raw.ptr()));
    n = PyBytes_GET_SIZE(raw.ptr());
    if (n > COPY_FRAME) {  // (a smaller frame's spans are copies: no view of it)
      view.p = PyMemoryView_FromObject(raw.ptr());
      if (view.p == nullptr) throw py::error_already_set();
    }
  } else if (PyMemoryView_Check(raw.ptr())) {
    Py_buffer b;  // (a released memoryview refuses: a ValueError, cleared, and the Python reading raises it)
    if (PyObject_GetBuffer(raw.ptr(), &b, PyBUF_FULL_RO) < 0) {
      PyErr_Clear();
      return py::none();
    }
    const bool bytes = b.ndim == 1 && b.itemsize == 1 && b.strides[0] == 1 && b.suboffsets == nullptr &&
                       b.format != nullptr && std::strcmp(b.format, "B") == 0;
    base = static_cast<const unsigned char*>(b.buf);
    n = b.len;
    PyBuffer_Release(&b);  // the memoryview `raw`, which the caller holds, keeps the memory
    if (!bytes) return py::none();
    view.p = raw.ptr();
    Py_INCREF(view.p);
  } else {
    return py::none();
  }
  const bool copy = n <= COPY_FRAME;
  Own out(PyList_New(0));
  if (out.p == nullptr) throw py::error_already_set();
  Own marks(PyList_New(0));
  if (marks.p == nullptr) throw py::error_already_set();
  int64_t left = max_commands;
  bool graphs = false;
  Py_ssize_t i = 0;
  while (i < n) {
    const Py_ssize_t start = i;
    if (base[i] != 0x0a) return py::none();
    ++i;
    uint64_t length = 0;
    for (int shift = 0;; shift += 7) {
      if (i >= n || shift > 35) return py::none();
      const unsigned char b = base[i++];
      length |= static_cast<uint64_t>(b & 0x7f) << shift;
      if (b < 0x80) break;
    }
    if (length > static_cast<uint64_t>(n - i)) return py::none();
    const Py_ssize_t end = i + static_cast<Py_ssize_t>(length);
    if (length == 0) {
      i = end;
      continue;  // an empty command asks for nothing
    }
    uint64_t tag = 0, kind = 0;
    for (Py_ssize_t j = i, shift = 0; j < end && shift < 35; ++j, shift += 7) {
      const unsigned char b = base[j];
      tag |= static_cast<uint64_t>(b & 0x7f) << shift;
      if (b < 0x80) {
        kind = tag >> 3;
        break;
      }
    }
    i = end;
    if (kind == 0 || left == 0) return py::none();
    graphs |= kind == RUN_GRAPH;
    const int64_t k = static_cast<int64_t>(kind);  // < 2**32
    if (k == upload || k == get) {
      Own at(PyLong_FromLongLong(max_commands - left));
      if (at.p == nullptr || PyList_Append(marks.p, at.p) < 0) throw py::error_already_set();
    }
    --left;
    Own kobj(PyLong_FromLongLong(k));
    if (kobj.p == nullptr) throw py::error_already_set();
    Own span(copy ? PyBytes_FromStringAndSize(reinterpret_cast<const char*>(base + start), end - start)
                  : PySequence_GetSlice(view.p, start, end));
    if (span.p == nullptr) throw py::error_already_set();
    Own pair(PyTuple_Pack(2, kobj.p, span.p));
    if (pair.p == nullptr || PyList_Append(out.p, pair.p) < 0) throw py::error_already_set();
  }
  return py::make_tuple(py::reinterpret_borrow<py::object>(out.p), py::reinterpret_borrow<py::object>(marks.p),
                        py::bool_(graphs));
}

PyObject* MISSING;  // `dict_pop`'s default: an object no session table holds

// `d.pop(key, MISSING)`: one lookup where `d.get(key)` and `del d[key]` made two (~250 instructions each). A new
// reference to the value, or MISSING (a new reference too) when `d` has no such key, or nullptr with the error set.
PyObject* dict_pop(PyObject* d, PyObject* key) {
#if PY_VERSION_HEX >= 0x030D0000
  PyObject* v = nullptr;
  const int r = PyDict_Pop(d, key, &v);
  if (r < 0) return nullptr;
  if (r == 0) return Py_NewRef(MISSING);
  return v;
#else
  return _PyDict_Pop(d, key, MISSING);
#endif
}

bool is_missing(PyObject* o) { return o == MISSING; }

// `o.<name> -= n` for a Python int n
void sub_attr(PyObject* o, PyObject* name, PyObject* n) {
  Own v(PyObject_GetAttr(o, name));
  if (v.p == nullptr) throw py::error_already_set();
  Own w(PyNumber_Subtract(v.p, n));
  if (w.p == nullptr || PyObject_SetAttr(o, name, w.p) < 0) throw py::error_already_set();
}

PyObject* S_tensors;
PyObject* S_keys;
PyObject* S_pinned;
PyObject* S_pins;

// `WorkerSession.pinned` and `pins` (server/sessions.py): where handle `h` is in `pinned` (a set; null, None or any
// other object: none), `s.pins += 1`, as the session's table methods count an unbinding of a pinned handle (a
// captured step's persistent tensor or kept one: `graph_run` skips their look-ups while `pins` is what its last run
// ended with). -1 with the error set where that failed.
int unpin(PyObject* s, PyObject* pinned, PyObject* h) {
  if (pinned == nullptr || !PyAnySet_CheckExact(pinned) || PySet_GET_SIZE(pinned) == 0) return 0;
  const int in = PySet_Contains(pinned, h);
  if (in <= 0) return in;
  Own v(PyObject_GetAttr(s, S_pins));
  if (v.p == nullptr) return -1;
  Own one(PyLong_FromLong(1));
  Own w(one.p != nullptr ? PyNumber_Add(v.p, one.p) : nullptr);
  return w.p == nullptr || PyObject_SetAttr(s, S_pins, w.p) < 0 ? -1 : 0;
}

PyObject* pinned_of(PyObject* s) {
  PyObject* p = PyObject_GetAttr(s, S_pinned);
  if (p == nullptr) {
    PyErr_Clear();
    return nullptr;
  }
  return p;
}
PyObject* S_storages;
PyObject* S_uploads;
PyObject* S_poisoned;
PyObject* S_memory;
PyObject* S_check_handle;

// `WorkerSession.free` (server/sessions.py) of a serialized `Free` message's handles, step for step: each handle
// unbound (its tensor dropped, an upload in progress forgotten), a failed one forgotten, any other checked by
// `check_handle` (which raises for another session's handle, ending the loop), its storage's count dropped and the
// storage's bytes freed with the last; the bytes freed taken off the session's and the device's use at the end,
// also when a handle raised. False (nothing done) when the message is not read here or a table is not a dict: the
// caller runs `WorkerSession.free` on the parsed message. Saves the message's conversion to Python ints (~1k
// instructions a handle through upb) and the interpreter's loop (~50 bytecodes a handle).
//
// `ctx`: None (or any object but a `Ctx`), or the session's native context (`CommandExecutor._native_ctx`), whose cache of handle ints (`Keys`)
// gives each handle the int its tables hold where that context bound it: the pops find their entries by identity,
// and no int is made and freed per handle (~250 instructions a handle). Only a cache, as for `Ctx.run`'s lookups:
// any int of the handle's value finds the same entry.
bool free_handles(const py::object& session, const py::bytes& msg, const py::object& ctx) {
  std::vector<uint64_t> hs;
  char* buf = nullptr;
  Py_ssize_t len = 0;
  if (PyBytes_AsStringAndSize(msg.ptr(), &buf, &len) < 0) throw py::error_already_set();
  const auto* p = reinterpret_cast<const unsigned char*>(buf);
  hs.reserve(std::min<size_t>(static_cast<size_t>(len), 1024));  // (a handle takes a byte at least)
  if (!parse_free(p, p + len, &hs)) return false;
  // anything but a context (a test's wrapper of one) is as None
  const Keys* cached = py::isinstance<Ctx>(ctx) ? ctx.cast<const Ctx&>().handle_keys.get() : nullptr;
  return free_parsed(session.ptr(), hs, cached);
}

// `WorkerSession.free`'s loop over the handles `hs` (read from a `Free`'s bytes) on the tables `t`: false with the
// Python error set where a handle raised (or memory ran out), the loop ended there. The bytes freed are summed into
// `*freed_c` (entries `bind_new` or `bind` made: ints) and, for any other entry, into `freed` (a Python int, null
// until one is met); the caller takes them off the session's and the device's use, also when a handle raised.
// `c`: the run's counters, synced before the Python code a handle calls (`check_handle`), or null.
bool free_loop(PyObject* s, const FreeTables& tables, const std::vector<uint64_t>& hs, const Keys* cached,
               Counts* counts, int64_t* freed_out, Own& freed) {
  PyObject *tensors = tables.tensors, *keys = tables.keys, *storages = tables.storages, *uploads = tables.uploads,
           *poisoned = tables.poisoned;
  Own one(PyLong_FromLong(1)), zero(PyLong_FromLong(0));
  if (one.p == nullptr || zero.p == nullptr) return false;
  bool failed = false;
  int64_t freed_c = 0;  // the bytes freed, summed in C
  for (const uint64_t h : hs) {
    PyObject* known = cached != nullptr ? cached->find(h) : nullptr;  // borrowed
    Own key(known != nullptr ? Py_NewRef(known) : PyLong_FromUnsignedLongLong(h));
    if (key.p == nullptr || unpin(s, tables.pinned, key.p) < 0) {
      failed = true;
      break;
    }
    Own t(dict_pop(tensors, key.p));  // `tensors.pop(h, None)`
    if (t.p == nullptr) {
      failed = true;
      break;
    }
    if (t.p == MISSING || t.p == Py_None) t.reset(nullptr);
    if (PyDict_GET_SIZE(uploads) > 0) {  // `uploads.pop(h, None)`
      Own u(dict_pop(uploads, key.p));
      if (u.p == nullptr) {
        failed = true;
        break;
      }
    }
    if (t.p == nullptr) {
      Own poison(dict_pop(poisoned, key.p));  // `poisoned.pop(h, None) is None`: a failed handle is forgotten
      if (poison.p == nullptr) {
        failed = true;
        break;
      }
      if (poison.p != MISSING && poison.p != Py_None) continue;
      if (counts != nullptr) counts->sync_all();  // (Python code)
      Own r(PyObject_CallMethodOneArg(s, S_check_handle, key.p));  // raises for another session's
      if (r.p == nullptr) {
        failed = true;
        break;
      }
      continue;
    }
    t.reset(nullptr);  // `del t`
    Own skey(dict_pop(keys, key.p));  // `keys.pop(h)`
    if (skey.p == nullptr || skey.p == MISSING) {
      if (skey.p == MISSING) PyErr_SetObject(PyExc_KeyError, key.p);
      failed = true;
      break;
    }
    // the storage key's value (an int `bind_new` made of an address: its hash known), else hashed by the dict
    int64_t sv = -1;
    if (!PyLong_CheckExact(skey.p) || !as_i64(skey.p, &sv) || sv < 0) sv = -1;
    Own entry(sv >= 0 ? get_item(storages, skey.p, static_cast<uint64_t>(sv))
                      : PyDict_GetItemWithError(storages, skey.p));  // `storages[key]`
    if (entry.p == nullptr) {
      if (!PyErr_Occurred()) PyErr_SetObject(PyExc_KeyError, skey.p);
      failed = true;
      break;
    }
    Py_INCREF(entry.p);
    // `entry[0] -= 1; if entry[0] == 0`: on the list of two ints `bind_new` made, the int's value; else as Python
    int last = -1;
    PyObject* c0 = PyList_CheckExact(entry.p) && PyList_GET_SIZE(entry.p) == 2 ? PyList_GET_ITEM(entry.p, 0) : nullptr;
    int64_t n0 = 0;
    if (c0 != nullptr && PyLong_CheckExact(c0) && as_i64(c0, &n0) && n0 > INT64_MIN) {
      PyObject* c1 = PyLong_FromLongLong(n0 - 1);
      if (c1 == nullptr || PyList_SetItem(entry.p, 0, c1) < 0) {  // steals c1
        failed = true;
        break;
      }
      last = n0 - 1 == 0;
    } else {
      Own c(PySequence_GetItem(entry.p, 0));
      Own c1(c.p != nullptr ? PyNumber_InPlaceSubtract(c.p, one.p) : nullptr);
      if (c1.p == nullptr || PySequence_SetItem(entry.p, 0, c1.p) < 0) {
        failed = true;
        break;
      }
      Own now0(PySequence_GetItem(entry.p, 0));
      last = now0.p != nullptr ? PyObject_RichCompareBool(now0.p, zero.p, Py_EQ) : -1;
    }
    if (last < 0) {
      failed = true;
      break;
    }
    if (last) {
      const int gone = sv >= 0 ? del_item(storages, skey.p, static_cast<uint64_t>(sv))
                               : PyDict_DelItem(storages, skey.p);
      if (gone < 0) {
        failed = true;
        break;
      }
      // `freed += entry[1]`: summed in C while each is an int `bind_new` made (the same sum), else in Python
      PyObject* b = PyList_CheckExact(entry.p) && PyList_GET_SIZE(entry.p) == 2 ? PyList_GET_ITEM(entry.p, 1) : nullptr;
      int64_t nb = 0;
      if (b != nullptr && PyLong_CheckExact(b) && as_i64(b, &nb) && !__builtin_add_overflow(freed_c, nb, &nb)) {
        freed_c = nb;
      } else {
        if (freed.p == nullptr) freed.reset(PyLong_FromLong(0));
        Own nbytes(freed.p != nullptr ? PySequence_GetItem(entry.p, 1) : nullptr);
        Own sum(nbytes.p != nullptr ? PyNumber_InPlaceAdd(freed.p, nbytes.p) : nullptr);
        if (sum.p == nullptr) {
          failed = true;
          break;
        }
        freed.reset(sum.p);
        sum.p = nullptr;
      }
      entries.give(entry.p);  // kept for `bind_new` where nothing else refers to it
      entry.p = nullptr;
    }
  }
  *freed_out = freed_c;
  return !failed;
}

// `free_handles` of the handles `hs` (read from a `Free`'s bytes): false (nothing done) where a table is not a dict
bool free_parsed(PyObject* s, const std::vector<uint64_t>& hs, const Keys* cached) {
  Own tensors(PyObject_GetAttr(s, S_tensors)), keys(PyObject_GetAttr(s, S_keys)),
      storages(PyObject_GetAttr(s, S_storages)), uploads(PyObject_GetAttr(s, S_uploads)),
      poisoned(PyObject_GetAttr(s, S_poisoned));
  for (PyObject* d : {tensors.p, keys.p, storages.p, uploads.p, poisoned.p}) {
    if (d == nullptr) throw py::error_already_set();
    if (!PyDict_CheckExact(d)) return false;
  }
  int64_t freed_c = 0;  // the bytes freed, summed in C (added to `freed` after the loop)
  Own freed(nullptr);
  Own pinned(pinned_of(s));
  const bool failed = !free_loop(s, FreeTables{tensors.p, keys.p, storages.p, uploads.p, poisoned.p, pinned.p}, hs,
                                 cached, nullptr, &freed_c, freed);
  // `finally`: the bytes freed so far, also when a handle raised (that error is the one raised)
  PyObject *type = nullptr, *value = nullptr, *tb = nullptr;
  if (failed) PyErr_Fetch(&type, &value, &tb);
  if (freed.p == nullptr) freed.reset(PyLong_FromLong(0));
  if (freed.p == nullptr) {
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    throw py::error_already_set();
  }
  if (freed_c != 0) {
    Own add(PyLong_FromLongLong(freed_c));
    Own sum(add.p != nullptr ? PyNumber_Add(freed.p, add.p) : nullptr);
    if (sum.p == nullptr) {
      Py_XDECREF(type);
      Py_XDECREF(value);
      Py_XDECREF(tb);
      throw py::error_already_set();
    }
    freed.reset(sum.p);
    sum.p = nullptr;
  }
  const int any = PyObject_IsTrue(freed.p);
  if (any < 0) {
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    throw py::error_already_set();
  }
  if (any) {
    try {
      sub_attr(s, S_used, freed.p);
      Own memory(PyObject_GetAttr(s, S_memory));
      if (memory.p == nullptr) throw py::error_already_set();
      sub_attr(memory.p, S_used, freed.p);
    } catch (...) {
      Py_XDECREF(type);
      Py_XDECREF(value);
      Py_XDECREF(tb);
      throw;
    }
  }
  if (failed) {
    PyErr_Restore(type, value, tb);
    throw py::error_already_set();
  }
  return true;
}

// A new CPU tensor of `shape` (a list of ints, at most MAX_DIMS, none negative) and `dtype` (a torch.dtype) holding
// exactly the bytes of `data` (any contiguous buffer whose length is the tensor's bytes: else ValueError, nothing
// made): `CommandExecutor._upload`'s single-chunk upload. Made as torch's CPU `empty` kernel makes it
// (`at::detail::empty_cpu`: the same allocator, TensorImpl and dispatch keys) without the Python argument parser and
// the dispatcher (~13k instructions), then filled by one memcpy before anyone can see it (no byte of it is left
// unwritten: it never shows what the allocator's memory held before), where `host_bytes` and a memoryview's slice
// assignment cost ~10k more.
py::object filled(py::handle shape, py::handle dtype, py::handle data) {
  if (!THPDtype_Check(dtype.ptr())) throw std::invalid_argument("filled: dtype must be a torch.dtype");
  const at::ScalarType st = reinterpret_cast<THPDtype*>(dtype.ptr())->scalar_type;
  if (!PyList_CheckExact(shape.ptr())) throw std::invalid_argument("filled: shape must be a list");
  const Py_ssize_t dims = PyList_GET_SIZE(shape.ptr());
  if (dims > MAX_DIMS) throw std::invalid_argument("filled: too many dimensions");
  std::vector<int64_t> sizes(static_cast<size_t>(dims));
  int64_t numel = 1;
  for (Py_ssize_t k = 0; k < dims; ++k) {
    int64_t d = 0;
    if (!as_i64(PyList_GET_ITEM(shape.ptr(), k), &d) || d < 0 || __builtin_mul_overflow(numel, d, &numel)) {
      throw std::invalid_argument("filled: a bad size");
    }
    sizes[static_cast<size_t>(k)] = d;
  }
  int64_t nbytes = 0;
  if (__builtin_mul_overflow(numel, static_cast<int64_t>(c10::elementSize(st)), &nbytes)) {
    throw std::invalid_argument("filled: a bad size");
  }
  Py_buffer view;
  if (PyObject_GetBuffer(data.ptr(), &view, PyBUF_SIMPLE) < 0) throw py::error_already_set();
  if (view.len != nbytes) {
    PyBuffer_Release(&view);
    throw std::invalid_argument("filled: the data's length is not the tensor's bytes");
  }
  at::Tensor t;
  try {
    t = filled_tensor(sizes, st, view.buf, static_cast<size_t>(nbytes));
  } catch (...) {
    PyBuffer_Release(&view);
    throw;
  }
  PyBuffer_Release(&view);
  return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(t)));
}


// Whether a table's look-up found `t` (borrowed; nullptr: missing, or the error set, which throws) and it is the
// very object weak reference `ref` refers to (`quiet_externals`, `graph_run`)
bool found_same(PyObject* t, PyObject* ref) {
  if (t == nullptr) {
    if (PyErr_Occurred()) throw py::error_already_set();
    return false;
  }
#if PY_VERSION_HEX >= 0x030D0000
  PyObject* obj = nullptr;
  if (PyWeakref_GetRef(ref, &obj) < 0) throw py::error_already_set();
  Py_XDECREF(obj);  // compared by identity only: `t` holds it where it is the same
#else
  PyObject* obj = PyWeakref_GetObject(ref);  // borrowed
#endif
  return obj == t;
}

// The object weak reference `ref` refers to (borrowed), or null where it is gone
PyObject* referent(PyObject* ref) {
#if PY_VERSION_HEX >= 0x030D0000
  PyObject* obj = nullptr;
  if (PyWeakref_GetRef(ref, &obj) < 0) throw py::error_already_set();
  Py_XDECREF(obj);  // alive while a table holds it: `graph_run` takes a new reference before any Python code runs
  return obj;
#else
  PyObject* obj = PyWeakref_GetObject(ref);  // borrowed
  if (obj == nullptr) throw py::error_already_set();
  return obj == Py_None ? nullptr : obj;
#endif
}

// A session's `pins` (server/sessions.py), or -1 where it has none that is an int (no error set)
int64_t pins_of(PyObject* s) {
  Own v(PyObject_GetAttr(s, S_pins));
  int64_t n = -1;
  if (v.p == nullptr || !as_i64(v.p, &n) || n < 0) {
    PyErr_Clear();
    return -1;
  }
  return n;
}

// `graph._quiet`'s look-ups (server/graph.py): the persistent tensors of a captured step out of the session's table
// (`tensors`, a dict) by their handles (`handles`, a tuple of ints), each the very object the weak reference of
// `refs` (a tuple as long) refers to; then each put into its slot (`ext_slots`, a tuple of ints as long) of the
// run's `slots` (a list). A tuple of them, in order, or None (nothing written) where a handle is not bound or is
// bound to another object (or the object is gone): the caller reads them the slow way. TypeError or IndexError
// for arguments of the wrong kind. Python's loop of the same was ~1.4-1.6k instructions a tensor (a dict probe with
// another int object, a weak reference's call, a slot's write through a method wrapper).
py::object quiet_externals(py::handle tensors, py::handle handles, py::handle refs, py::handle slots,
                           py::handle ext_slots) {
  PyObject *d = tensors.ptr(), *hs = handles.ptr(), *rs = refs.ptr(), *sl = slots.ptr(), *es = ext_slots.ptr();
  if (!PyDict_CheckExact(d) || !PyTuple_CheckExact(hs) || !PyTuple_CheckExact(rs) || !PyList_CheckExact(sl) ||
      !PyTuple_CheckExact(es)) {
    throw py::type_error("quiet_externals: a dict, two tuples, a list and a tuple");
  }
  const Py_ssize_t n = PyTuple_GET_SIZE(hs);
  if (PyTuple_GET_SIZE(rs) != n || PyTuple_GET_SIZE(es) != n) throw py::value_error("quiet_externals: lengths");
  Own out(PyTuple_New(n));
  if (out.p == nullptr) throw py::error_already_set();
  std::vector<Py_ssize_t> at(static_cast<size_t>(n));
  const Py_ssize_t size = PyList_GET_SIZE(sl);
  for (Py_ssize_t k = 0; k < n; ++k) {
    PyObject* ref = PyTuple_GET_ITEM(rs, k);
    if (!PyWeakref_CheckRef(ref)) throw py::type_error("quiet_externals: refs must be weak references");
    const Py_ssize_t slot = PyLong_AsSsize_t(PyTuple_GET_ITEM(es, k));
    if (slot == -1 && PyErr_Occurred()) throw py::error_already_set();
    if (slot < 0 || slot >= size) throw py::index_error("quiet_externals: a slot out of range");
    at[static_cast<size_t>(k)] = slot;
    PyObject* t = PyDict_GetItemWithError(d, PyTuple_GET_ITEM(hs, k));  // borrowed
    if (!found_same(t, ref)) return py::none();  // freed, bound anew, or its tensor gone
    PyTuple_SET_ITEM(out.p, k, Py_NewRef(t));
  }
  for (Py_ssize_t k = 0; k < n; ++k) {  // PyList_SetItem steals the new reference and drops the slot's old value
    if (PyList_SetItem(sl, at[static_cast<size_t>(k)], Py_NewRef(PyTuple_GET_ITEM(out.p, k))) < 0) {
      throw py::error_already_set();
    }
  }
  return py::reinterpret_steal<py::object>(std::exchange(out.p, nullptr));
}

PyObject* S_admit_handles;
PyObject* S_max_handles;
PyObject* S_zero_new;

// Whether handle `h` is bound to the very tensor object `v` already and binding it again (`rebind_run`'s unbind and
// `bind_new`) would leave every table and count as they are: no upload in progress on it, its storage the one its
// key counts, and that storage's entry either shared with another handle (the unbind and the bind then take one
// from its count and add it back) or its own at the bytes counted and covered by the tensor (the unbind then frees
// it and the bind counts it again at the same bytes, with nothing to zero). A storage the run grew, moved or that
// the tensor does not cover takes the full rebinding, which counts and zeroes it. The caller found `v` bound to `h`
// already. (Round 51: a real captured step's kept tensors are new objects each run, its new gradients: the tiny MLP's
// 6 and the encoder's 27 `writes`, none found bound; its parameters and optimizer state, updated in place, are
// persistent tensors, not kept ones. Until then the bench's kernels-out replay handed one run's outputs back every
// run, which this found bound.)
bool same_binding(PyObject* keys, PyObject* storages, PyObject* uploads, PyObject* h, PyObject* v) {
  if (PyDict_GET_SIZE(uploads) > 0) {
    const int up = PyDict_Contains(uploads, h);
    if (up < 0) throw py::error_already_set();
    if (up) return false;  // the unbind forgets the upload
  }
  PyObject* key = PyDict_GetItemWithError(keys, h);  // borrowed
  if (key == nullptr) {
    if (PyErr_Occurred()) throw py::error_already_set();
    return false;  // (cannot be: the full path raises the KeyError)
  }
  const at::Tensor& t = THPVariable_Unpack(v);
  const c10::StorageImpl* st = t.storage().unsafeGetStorageImpl();
  if (!PyLong_CheckExact(key)) return false;
  void* at = PyLong_AsVoidPtr(key);
  if (at == nullptr && PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  if (at != static_cast<const void*>(st)) return false;  // the run set it to another storage
  PyObject* entry = PyDict_GetItemWithError(storages, key);  // borrowed
  if (entry == nullptr) {
    if (PyErr_Occurred()) throw py::error_already_set();
    return false;
  }
  int64_t count = 0, nbytes = 0;
  if (!(PyList_CheckExact(entry) && PyList_GET_SIZE(entry) == 2 && as_i64(PyList_GET_ITEM(entry, 0), &count) &&
        as_i64(PyList_GET_ITEM(entry, 1), &nbytes))) {
    PyErr_Clear();
    return false;  // the full path raises its TypeError
  }
  if (count > 1) return true;
  return count == 1 && static_cast<size_t>(nbytes) == st->nbytes() &&
         !Ctx::outside(t.unsafeGetTensorImpl(), static_cast<size_t>(nbytes));
}

// `WorkerSession.rebind_all` (server/sessions.py) of a captured step's run (`graph._finish`): the pairs
// `(outputs[j], slots[out_slots[j]])` for each nonzero handle of `outputs` (a list of ints, at most as long as
// `out_slots`), then `(h, slots[slot])` for each of `writes` (a dict handle -> slot), step for step: a live handle
// unbound (an upload in progress forgotten, its storage's count dropped and the storage's bytes freed with the
// last; its table entries kept and written over by the binding), a failed one forgotten, any other admitted (`admit_handles(1)` where the session is at its limit: it
// raises, ending the loop); the tensor's storage counted once (a new storage's bytes outside the tensors of the run
// that lie in it zeroed at the end, `zero_new`, where none of them covers it), the handle bound. The bytes counted
// (session and device) once at the end, also when a handle raised. False, nothing done, where a table is not a dict
// or a value is not a tensor: the caller runs `rebind_all`. The session's class must be `WorkerSession` itself
// (the caller's check): its handles were checked by the caller (outputs) and at definition (writes). `in_place`: a
// live handle's table entries written over, not popped and inserted again (below).
bool rebind_run(const py::object& session, py::handle outputs, py::handle out_slots, py::handle writes,
                py::handle slots, bool in_place) {
  PyObject *s = session.ptr(), *outs = outputs.ptr(), *oslots = out_slots.ptr(), *wr = writes.ptr(),
           *sl = slots.ptr();
  if (!PyList_CheckExact(outs) || !PyList_CheckExact(oslots) || !PyDict_CheckExact(wr) || !PyList_CheckExact(sl)) {
    return false;
  }
  Own tensors(PyObject_GetAttr(s, S_tensors)), keys(PyObject_GetAttr(s, S_keys)),
      storages(PyObject_GetAttr(s, S_storages)), uploads(PyObject_GetAttr(s, S_uploads)),
      poisoned(PyObject_GetAttr(s, S_poisoned));
  for (PyObject* t : {tensors.p, keys.p, storages.p, uploads.p, poisoned.p}) {
    if (t == nullptr) throw py::error_already_set();
    if (!PyDict_CheckExact(t)) return false;
  }
  // the pairs, every value a tensor, before any side effect
  std::vector<std::pair<PyObject*, PyObject*>> pairs;  // borrowed: the handle ints and the slots' values
  const Py_ssize_t n_slots = PyList_GET_SIZE(sl);
  auto value = [&](PyObject* slot_int) -> PyObject* {
    const Py_ssize_t k = PyLong_AsSsize_t(slot_int);
    if (k == -1 && PyErr_Occurred()) throw py::error_already_set();
    if (k < 0 || k >= n_slots) return nullptr;
    PyObject* v = PyList_GET_ITEM(sl, k);
    return THPVariable_Check(v) ? v : nullptr;
  };
  const Py_ssize_t n_out = PyList_GET_SIZE(outs);
  if (n_out > PyList_GET_SIZE(oslots)) return false;
  for (Py_ssize_t j = 0; j < n_out; ++j) {
    PyObject* h = PyList_GET_ITEM(outs, j);
    const int set = PyObject_IsTrue(h);
    if (set < 0) throw py::error_already_set();
    if (!set) continue;
    PyObject* v = value(PyList_GET_ITEM(oslots, j));
    if (v == nullptr) return false;
    pairs.emplace_back(h, v);
  }
  {
    PyObject *h, *slot;
    Py_ssize_t pos = 0;
    while (PyDict_Next(wr, &pos, &h, &slot)) {
      PyObject* v = value(slot);
      if (v == nullptr) return false;
      pairs.emplace_back(h, v);
    }
  }
  Own pinned(nullptr);  // `s.pinned`, read at the first live handle bound anew
  bool pinned_read = false;
  // owned references, dropped at the end
  struct Refs {
    std::vector<PyObject*> v;
    std::vector<std::pair<const c10::StorageImpl*, PyObject*>> fresh;  // new storages a tensor does not cover
    ~Refs() {
      for (PyObject* o : v) Py_DECREF(o);
      for (auto& f : fresh) Py_DECREF(f.second);
    }
  } refs;
  // the values held until the end (the zeroing reads them), whatever an unbind's deallocations run
  refs.v.reserve(pairs.size());
  for (auto& pr : pairs) refs.v.push_back(Py_NewRef(pr.second));
  auto& fresh = refs.fresh;
  int64_t delta = 0;
  bool failed = false;
  int64_t max_handles = -1;
  PyObject* unbound = nullptr;  // a live handle whose rebinding failed midway: taken out of `tensors` and `keys`
  for (auto& [h, v] : pairs) {
    PyObject* cur = PyDict_GetItemWithError(tensors.p, h);  // borrowed
    if (cur == nullptr && PyErr_Occurred()) {
      failed = true;
      break;
    }
    if (cur == v && same_binding(keys.p, storages.p, uploads.p, h, v)) continue;  // rebinding it changes nothing
    // `in_place` (a quiet run's, `graph_run`; round 51): a live handle's entries in `tensors` and `keys` are written
    // over below, not popped and inserted again (a real step's kept tensors are new objects each run; the pop and
    // the insert into a table with popped slots piling up, ~600 instructions a pair). Where that fails midway the
    // handle is taken out of both tables once its storage no longer counts it (`unbound`), as `rebind_all` leaves a
    // handle it popped; before that, it stays bound as it was. Otherwise (the Python's `_finish`) both are popped and
    // inserted again, as `rebind_all` does: the tables' key objects are then `writes`' own, those of every later run's
    // look-ups, which find a key by its identity where it is the same object (~110 instructions each less than
    // comparing two ints); a handle bound first by an eager op or an upload is keyed by that command's int, which a
    // run in place would keep.
    const bool live = cur != nullptr && cur != Py_None;
    if (live) {  // `unbind`
      if (!pinned_read) {  // (a handle not live was unbound before: by a table method that counted it then)
        pinned.reset(pinned_of(s));
        pinned_read = true;
      }
      if (unpin(s, pinned.p, h) < 0) {
        failed = true;
        break;
      }
      if (PyDict_GET_SIZE(uploads.p) > 0) {
        Own u(dict_pop(uploads.p, h));
        if (u.p == nullptr) {
          failed = true;
          break;
        }
      }
      Own old(in_place ? nullptr : dict_pop(tensors.p, h));  // `tensors.pop(handle)`
      if (!in_place && old.p == nullptr) {
        failed = true;
        break;
      }
      old.reset(nullptr);
      // `keys[handle]` (written over below) or `keys.pop(handle)`
      Own skey(in_place ? Py_XNewRef(PyDict_GetItemWithError(keys.p, h)) : dict_pop(keys.p, h));
      if (skey.p == nullptr || skey.p == MISSING) {
        if (!PyErr_Occurred()) PyErr_SetObject(PyExc_KeyError, h);
        failed = true;
        break;
      }
      PyObject* entry = PyDict_GetItemWithError(storages.p, skey.p);  // borrowed: `storages[old]`
      if (entry == nullptr) {
        if (!PyErr_Occurred()) PyErr_SetObject(PyExc_KeyError, skey.p);
        failed = true;
        break;
      }
      Own e(Py_NewRef(entry));
      int64_t count = 0, nbytes = 0;
      if (!(PyList_CheckExact(e.p) && PyList_GET_SIZE(e.p) == 2 && as_i64(PyList_GET_ITEM(e.p, 0), &count) &&
            as_i64(PyList_GET_ITEM(e.p, 1), &nbytes))) {
        PyErr_SetString(PyExc_TypeError, "a storage entry is not [count, bytes]");
        failed = true;
        break;
      }
      PyObject* c1 = PyLong_FromLongLong(count - 1);
      if (c1 == nullptr || PyList_SetItem(e.p, 0, c1) < 0) {  // steals c1
        failed = true;
        break;
      }
      unbound = h;  // its storage no longer counts it
      if (count - 1 == 0) {
        if (PyDict_DelItem(storages.p, skey.p) < 0) {
          failed = true;
          break;
        }
        delta -= nbytes;
        entries.give(std::exchange(e.p, nullptr));
      }
    } else {
      if (cur == Py_None) {  // (no table method binds None: `tensors.pop(handle, None)` as `rebind_all`)
        Own gone(dict_pop(tensors.p, h));
        if (gone.p == nullptr) {
          failed = true;
          break;
        }
      }
      Own poison(dict_pop(poisoned.p, h));  // `poisoned.pop(handle, None) is None`: `admit_handles(1)`
      if (poison.p == nullptr) {
        failed = true;
        break;
      }
      if (poison.p == MISSING || poison.p == Py_None) {
        if (max_handles < 0 && !attr_i64(s, S_max_handles, &max_handles)) max_handles = 0;  // 0: always ask
        if (PyDict_GET_SIZE(tensors.p) + PyDict_GET_SIZE(poisoned.p) + 1 > max_handles) {
          Own one(PyLong_FromLong(1));
          Own r(one.p != nullptr ? PyObject_CallMethodOneArg(s, S_admit_handles, one.p) : nullptr);
          if (r.p == nullptr) {
            failed = true;
            break;
          }
        }
      }
    }
    const at::Tensor& t = THPVariable_Unpack(v);  // `bind_new`
    const c10::StorageImpl* st = t.storage().unsafeGetStorageImpl();
    Own skey(PyLong_FromVoidPtr(const_cast<c10::StorageImpl*>(st)));
    if (skey.p == nullptr) {
      failed = true;
      break;
    }
    PyObject* found = PyDict_GetItemWithError(storages.p, skey.p);  // borrowed
    if (found == nullptr) {
      if (PyErr_Occurred()) {
        failed = true;
        break;
      }
      const size_t nbytes = st->nbytes();
      if (Ctx::outside(t.unsafeGetTensorImpl(), nbytes)) {  // `covers`, as `bind_new`'s: a buffer behind it?
        Own objs(PyList_New(1));
        if (objs.p == nullptr) {
          failed = true;
          break;
        }
        PyList_SET_ITEM(objs.p, 0, Py_NewRef(v));
        fresh.emplace_back(st, std::exchange(objs.p, nullptr));
      }
      Own e(entries.take(static_cast<int64_t>(nbytes)));  // [1, nbytes]
      if (e.p == nullptr || PyDict_SetItem(storages.p, skey.p, e.p) < 0) {
        failed = true;
        break;
      }
      delta += static_cast<int64_t>(nbytes);
    } else {
      PyObject* c = PyList_GetItem(found, 0);  // borrowed
      Own one(PyLong_FromLong(1));
      PyObject* c1 = c != nullptr && one.p != nullptr ? PyNumber_Add(c, one.p) : nullptr;
      if (c1 == nullptr || PyList_SetItem(found, 0, c1) < 0) {  // steals c1
        failed = true;
        break;
      }
      for (auto& f : fresh) {  // another tensor of the run over the same new storage: keep its bytes
        if (f.first == st) {
          if (PyList_Append(f.second, v) < 0) failed = true;
          break;
        }
      }
      if (failed) break;
    }
    // a live handle's entries written over (its old tensor dropped here), a new one's inserted
    if (PyDict_SetItem(keys.p, h, skey.p) < 0 || PyDict_SetItem(tensors.p, h, v) < 0) {
      failed = true;
      break;
    }
    unbound = nullptr;
  }
  // `finally`: the new storages zeroed and the bytes counted, also when a handle raised (that error is raised)
  PyObject *type = nullptr, *val = nullptr, *tb = nullptr;
  if (failed) PyErr_Fetch(&type, &val, &tb);
  try {
    if (failed && unbound != nullptr) {  // its old storage no longer counts it: forgotten, as `rebind_all` leaves it
      for (PyObject* table : {tensors.p, keys.p}) {
        Own gone(dict_pop(table, unbound));
        if (gone.p == nullptr) PyErr_Clear();  // (the handle's first error is the one raised)
      }
    }
    for (auto& f : fresh) {
      Own r(PyObject_CallMethodOneArg(s, S_zero_new, f.second));
      if (r.p == nullptr) throw py::error_already_set();
    }
    if (delta != 0) {
      add_attr(s, S_used, delta);
      Own memory(PyObject_GetAttr(s, S_memory));
      if (memory.p == nullptr) throw py::error_already_set();
      add_attr(memory.p, S_used, delta);
    }
  } catch (...) {
    Py_XDECREF(type);
    Py_XDECREF(val);
    Py_XDECREF(tb);
    throw;
  }
  if (failed) {
    PyErr_Restore(type, val, tb);
    throw py::error_already_set();
  }
  return true;
}

// A captured step's quiet run in one call (`graph._quick`, server/graph.py; round 41): what `graph._run`, `_by_value`,
// `_quiet`, the outputs' `check_handle`, `graph_trace.Traced.run` and `_finish` do for a traced graph on the CPU whose
// persistent tensors are quiet (no command that may change a tensor's metadata ran since its last run, which ended
// well). A `GraphPlan` holds what the graph fixes (made once per graph: `graph._fast_plan`). `run` checks, before
// anything is done, what `_run` checks and in its order: the inputs' count, the outputs' count, each input (a handle
// bound in the session's table to a plain strided CPU tensor of the graph's sizes, strides, storage offset and dtype,
// or bytes sent by value: exactly the input's bytes, its layout contiguous, not bool), each persistent handle still
// bound to the object the last run checked (`quiet_externals`), each output handle this session's and not reserved.
// Any of these that does not hold: None, nothing done (no tensor bound, no slot outside the call's own list
// written), and the Python path runs the command as before and raises its error. Then the traced function is
// called with its arguments picked from the slots (`Traced.args`): an exception it raises is returned (the Python
// converts it as `Traced.run` does); its outputs (an exact list or tuple, one per kept slot) go into the slots, and
// the run's outputs and kept tensors are bound (`rebind_run`, whose errors raise). True when all of it is done; where
// the traced function returned something else, (slots, its value); where `rebind_run` declines, the slots: the
// Python ends the run (`_finish`). `tensors` at the plan's making: the session's table, whose key objects of the
// persistent handles the plan keeps (`ext_keys`).
struct GraphPlan {
  Py_ssize_t n_slots = 0;
  std::vector<std::vector<int64_t>> sizes, strides;
  std::vector<int64_t> offsets, nbytes;
  std::vector<at::ScalarType> dtypes;
  std::vector<char> contiguous;
  // the persistent handles: each the int object the session's table held as its key when the plan was made (a
  // lookup then finds it by identity, not by `==` of two ints; a handle bound since under another int object is
  // still found, by value), its value (for the key's hash) and its slot
  std::vector<py::object> ext_keys;
  std::vector<uint64_t> ext_values;
  std::vector<Py_ssize_t> ext_at;
  std::vector<Py_ssize_t> picks, kept;
  py::list out_slots;  // `Graph.outputs`, as `rebind_run` takes it
  uint64_t number = 0, base = 0;  // the session's number and handle 0 (`check_handle`)
  // (round 49) the `refs` (held: its address is never another tuple's) and the session's `pins` (sessions.py) that
  // the plan's last run ended with, its persistent handles found bound to those objects at its start and `pins`
  // unchanged to its end: while both are what a run is given and finds, no table method unbound or bound anew a
  // persistent handle since (each bumps `pins`), so each is still bound to its weak reference's object, which is
  // taken without the table's look-up (~100 instructions a tensor: the encoder's 109 a step). -1: none.
  mutable py::object seen_refs;
  mutable int64_t seen_pins = -1;
  // (round 49) what a run that ended well leaves for the next: its slot list, every slot None again (`PyList_New` of
  // the encoder's 551 slots and their release were ~7k instructions a run), and each input sent by value whose
  // tensor nothing else refers to (its memory, sizes and storage its own: `reusable`), filled again in place rather
  // than allocated (~4k an input with its release). Null: none (a run that declines or fails leaves nothing).
  // The inputs' memory is the graph's reservation (peak + inputs sent by value), which the session's count holds
  // for its largest graph only: so one plan of a session at a time keeps them (server/graph.py `_spares`, `let_go`;
  // secrev50: each of a session's 32 graphs kept its own, up to 31 graphs' inputs held beyond its count).
  mutable py::object spare;
  mutable std::vector<py::object> spare_inputs;
  // (round 52) the kept tensors the traced function writes into a buffer it takes after the `picks`
  // (graph_trace.Buffer, `_into_buffers`): each its handle (the int object of `writes`), the slot `writes` binds it
  // to, its sizes, strides and dtype (offset 0) and its storage's bytes. `buffer_arg` gives the tensor the handle
  // holds where the run may write over it, else a fresh one; `said` (a Python callable, or None) hears of a fresh
  // one where the buffer's last run wrote into its old one (`was_fresh` false: a client's alias of a gradient every
  // step is said once, not per run; the first plan run after a Python one, whose kept tensors are views holding
  // their base, is not said): the log at debug level. `reused`, `fresh`: counts of either (tests, the bench).
  struct Buf {
    py::object handle;
    int64_t slot = 0;
    std::vector<int64_t> sizes, strides;
    at::ScalarType dtype = at::kFloat;
    int64_t nbytes = 0;
    mutable bool was_fresh = true;
  };
  std::vector<Buf> bufs;
  py::object said;
  mutable int64_t reused = 0, fresh = 0;
};

// The argument of buffer `b` for a run (`GraphPlan.bufs`): the tensor its handle is bound to, where the run may write
// over it -- the handle still the one `writes` binds to the buffer's slot; nothing but the session's table holding
// the tensor or its memory (its Python object, its TensorImpl and its storage each held once: no other handle, view,
// slot, input, persistent tensor or eager run of the session sees it, so no one reads its old values after); laid
// out as the buffer (a plain strided CPU tensor of its sizes, strides and dtype, offset 0, no conjugate or negative
// bit, not requiring grad, on a resizable storage of exactly its bytes from the CPU allocator: what a kernel or
// `fresh` made) -- else a fresh one, `why` saying which did not hold. (A plan runs only where no upload is under way:
// `s.uploads` empty, `graph._quick`'s and `run_raw`'s condition.) A new reference.
PyObject* buffer_arg(const GraphPlan& p, const GraphPlan::Buf& b, PyObject* tensors, PyObject* writes,
                     const char** why) {
  *why = nullptr;
  PyObject* slot = PyDict_GetItemWithError(writes, b.handle.ptr());  // borrowed
  int64_t at = -1;
  if (slot == nullptr && PyErr_Occurred()) throw py::error_already_set();
  if (slot == nullptr || !as_i64(slot, &at) || at != b.slot) {
    PyErr_Clear();
    *why = "its handle is no longer written by the graph";
  }
  PyObject* cur = *why ? nullptr : PyDict_GetItemWithError(tensors, b.handle.ptr());  // borrowed
  if (cur == nullptr && PyErr_Occurred()) throw py::error_already_set();
  if (*why == nullptr && (cur == nullptr || !THPVariable_CheckExact(cur))) *why = "its handle holds no tensor";
  if (*why == nullptr && Py_REFCNT(cur) != 1) *why = "its tensor is held elsewhere too";
  if (*why == nullptr) {
    const at::Tensor& t = THPVariable_Unpack(cur);
    if (!t.defined() || t.use_count() != 1) {
      *why = "its tensor is held elsewhere too";
    } else if (!t.storage() || t.storage().use_count() != 1) {
      *why = "another tensor (a view, another handle) shares its memory";
    } else {
      const c10::Storage& st = t.storage();
      const bool laid = t.layout() == at::kStrided && t.is_cpu() && t.scalar_type() == b.dtype &&
                        t.storage_offset() == 0 && t.sizes().equals(at::IntArrayRef(b.sizes)) &&
                        t.strides().equals(at::IntArrayRef(b.strides)) && !t.is_conj() && !t.is_neg() &&
                        !t.requires_grad() && (!t.is_inference() || c10::InferenceMode::is_enabled()) &&
                        st.nbytes() == static_cast<size_t>(b.nbytes) && st.resizable() &&
                        st.allocator() == c10::GetAllocator(c10::DeviceType::CPU) && (b.nbytes == 0 || st.mutable_data() != nullptr);
      if (laid) {
        ++p.reused;
        b.was_fresh = false;
        return Py_NewRef(cur);
      }
      *why = "its tensor is laid out otherwise";
    }
  }
  ++p.fresh;
  PyObject* made = THPVariable_Wrap(at::empty_strided(b.sizes, b.strides, at::TensorOptions().dtype(b.dtype)));
  if (made == nullptr) throw py::error_already_set();
  return made;
}


std::vector<int64_t> int_list(py::handle l, const char* what) {
  std::vector<int64_t> out;
  for (auto v : l) {
    int64_t x = 0;
    if (!as_i64(v.ptr(), &x)) throw std::invalid_argument(std::string("GraphPlan: a bad int in ") + what);
    out.push_back(x);
  }
  return out;
}

GraphPlan make_graph_plan(int64_t n_slots, py::list metas, py::list nbytes, py::list contiguous, py::tuple ext_handles,
                          py::tuple ext_slots, py::list picks, py::list kept, py::list out_slots, uint64_t number,
                          uint64_t base, py::dict tensors) {
  GraphPlan p;
  if (n_slots < 1) throw std::invalid_argument("GraphPlan: n_slots");
  p.n_slots = static_cast<Py_ssize_t>(n_slots);
  const size_t n = metas.size();
  if (nbytes.size() != n || contiguous.size() != n) throw std::invalid_argument("GraphPlan: lengths");
  for (size_t i = 0; i < n; ++i) {
    py::tuple m = metas[i].cast<py::tuple>();  // (sizes, strides, offset, dtype)
    if (m.size() != 4 || !THPDtype_Check(m[3].ptr())) throw std::invalid_argument("GraphPlan: a bad input meta");
    p.sizes.push_back(int_list(m[0], "sizes"));
    p.strides.push_back(int_list(m[1], "strides"));
    if (p.sizes.back().size() != p.strides.back().size() || p.sizes.back().size() > MAX_DIMS) {
      throw std::invalid_argument("GraphPlan: a bad input meta");
    }
    p.offsets.push_back(m[2].cast<int64_t>());
    p.dtypes.push_back(reinterpret_cast<THPDtype*>(m[3].ptr())->scalar_type);
    p.nbytes.push_back(nbytes[i].cast<int64_t>());
    p.contiguous.push_back(contiguous[i].cast<bool>() ? 1 : 0);
  }
  if (ext_handles.size() != ext_slots.size()) throw std::invalid_argument("GraphPlan: lengths");
  std::vector<std::pair<uint64_t, size_t>> want;  // (handle, index), to find the table's own key objects
  for (size_t k = 0; k < ext_slots.size(); ++k) {
    const int64_t at = ext_slots[k].cast<int64_t>();
    if (at < 1 || at >= n_slots) throw std::invalid_argument("GraphPlan: a slot out of range");
    p.ext_at.push_back(static_cast<Py_ssize_t>(at));
    PyObject* h = ext_handles[k].ptr();
    const unsigned long long v = PyLong_Check(h) ? PyLong_AsUnsignedLongLong(h) : static_cast<unsigned long long>(-1);
    if (v == static_cast<unsigned long long>(-1)) throw std::invalid_argument("GraphPlan: a bad handle");
    p.ext_values.push_back(v);
    p.ext_keys.push_back(py::reinterpret_borrow<py::object>(h));
    want.emplace_back(v, k);
  }
  std::sort(want.begin(), want.end());
  PyObject *hk, *hv;
  Py_ssize_t pos = 0;
  while (!want.empty() && PyDict_Next(tensors.ptr(), &pos, &hk, &hv)) {
    if (!PyLong_CheckExact(hk)) continue;
    const unsigned long long v = PyLong_AsUnsignedLongLong(hk);
    if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
      PyErr_Clear();
      continue;
    }
    auto it = std::lower_bound(want.begin(), want.end(), std::make_pair(static_cast<uint64_t>(v), size_t{0}));
    for (; it != want.end() && it->first == v; ++it) p.ext_keys[it->second] = py::reinterpret_borrow<py::object>(hk);
  }
  for (const auto& [from, to] : {std::pair<py::list*, std::vector<Py_ssize_t>*>{&picks, &p.picks}, {&kept, &p.kept}}) {
    for (int64_t k : int_list(*from, "slots")) {
      if (k < 1 || k >= n_slots) throw std::invalid_argument("GraphPlan: a slot out of range");
      to->push_back(static_cast<Py_ssize_t>(k));
    }
  }
  for (int64_t k : int_list(out_slots, "slots")) {
    if (k < 0 || k >= n_slots) throw std::invalid_argument("GraphPlan: a slot out of range");
  }
  p.out_slots = out_slots;
  p.number = number;
  p.base = base;
  return p;
}

// whether tensor object `v` is a plain strided CPU tensor of input `i`'s metadata (`_run`'s check, which refuses
// the others; here they go to the Python path)
bool input_fits(const GraphPlan& p, size_t i, PyObject* v) {
  if (!THPVariable_CheckExact(v)) return false;
  const at::Tensor& t = THPVariable_Unpack(v);
  if (!t.defined() || t.layout() != at::kStrided || !t.is_cpu() || t.scalar_type() != p.dtypes[i]) return false;
  const auto& sz = p.sizes[i];
  const auto& st = p.strides[i];
  return t.sizes().equals(at::IntArrayRef(sz)) && t.strides().equals(at::IntArrayRef(st)) &&
         t.storage_offset() == p.offsets[i];
}

// Whether `obj`, a slot's value after a run, is an input sent by value that a next run may fill again in place:
// no other reference to it (`refs`: those the caller holds) or to its TensorImpl and storage (no view of it is an
// output or a kept tensor), still a plain CPU tensor of the input's metadata, its storage exactly the input's bytes
bool reusable(const GraphPlan& p, size_t i, PyObject* obj, Py_ssize_t refs) {
  if (Py_REFCNT(obj) != refs || !input_fits(p, i, obj)) return false;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (t.use_count() != 1 || t.requires_grad() || !t.is_contiguous()) return false;
  const c10::Storage& st = t.storage();
  return st.use_count() == 1 && st.nbytes() == static_cast<size_t>(p.nbytes[i]) && t.storage_offset() == 0 &&
         (st.nbytes() == 0 || st.mutable_data() != nullptr);
}

py::object graph_run(const GraphPlan& p, const py::object& session, py::handle inputs, py::handle outputs,
                     py::handle data, py::handle refs, py::handle writes, py::handle fn) {
  PyObject *s = session.ptr(), *ins = inputs.ptr(), *outs = outputs.ptr(), *dt = data.ptr();
  if (!PyList_CheckExact(ins) || !PyList_CheckExact(outs) || !PyTuple_CheckExact(refs.ptr())) return py::none();
  const size_t n_in = p.sizes.size();
  if (static_cast<size_t>(PyList_GET_SIZE(ins)) != n_in) return py::none();  // `_run`'s InvalidArgument
  if (PyList_GET_SIZE(outs) > PyList_GET_SIZE(p.out_slots.ptr())) return py::none();
  Own tensors(PyObject_GetAttr(s, S_tensors));
  if (tensors.p == nullptr) throw py::error_already_set();
  if (!PyDict_CheckExact(tensors.p)) return py::none();
  Own slots(nullptr);
  if (p.spare && Py_REFCNT(p.spare.ptr()) == 1 && PyList_GET_SIZE(p.spare.ptr()) == p.n_slots) {
    slots.reset(p.spare.release().ptr());  // the last run's, every slot None
  } else {
    p.spare = py::object();
    slots.reset(PyList_New(p.n_slots));
    if (slots.p == nullptr) throw py::error_already_set();
    for (Py_ssize_t k = 0; k < p.n_slots; ++k) PyList_SET_ITEM(slots.p, k, Py_NewRef(Py_None));
  }
  if (p.spare_inputs.size() != n_in) p.spare_inputs.assign(n_in, py::object());
  for (size_t i = 0; i < n_in; ++i) {
    PyObject* h = PyList_GET_ITEM(ins, static_cast<Py_ssize_t>(i));
    const int set = PyObject_IsTrue(h);
    if (set < 0) throw py::error_already_set();
    PyObject* t = nullptr;  // new reference
    if (set) {
      PyObject* found = PyDict_GetItemWithError(tensors.p, h);  // borrowed
      if (found == nullptr) {
        if (PyErr_Occurred()) throw py::error_already_set();
        return py::none();  // `resolve`'s error
      }
      if (!input_fits(p, i, found)) return py::none();
      t = Py_NewRef(found);
    } else {  // sent by value (`_by_value`, on the host: an owned copy)
      if (!PyList_CheckExact(dt) || static_cast<Py_ssize_t>(i) >= PyList_GET_SIZE(dt) || !p.contiguous[i] ||
          p.dtypes[i] == at::kBool) {
        return py::none();
      }
      Py_buffer view;
      if (PyObject_GetBuffer(PyList_GET_ITEM(dt, static_cast<Py_ssize_t>(i)), &view, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        return py::none();
      }
      if (view.len != p.nbytes[i]) {
        PyBuffer_Release(&view);
        return py::none();
      }
      // the last run's tensor of this input, where it left one (`reusable` then; only the plan has held it since)
      // (bounds checked: `let_go` empties the list, and Python code may run inside a run)
      py::object kept = i < p.spare_inputs.size() ? std::move(p.spare_inputs[i]) : py::object();
      if (kept && Py_REFCNT(kept.ptr()) == 1) {
        const at::Tensor& old = THPVariable_Unpack(kept.ptr());
        if (view.len > 0) std::memcpy(old.storage().mutable_data(), view.buf, static_cast<size_t>(view.len));
        PyBuffer_Release(&view);
        t = kept.release().ptr();
      } else {
        at::Tensor made;
        try {
          made = filled_tensor(p.sizes[i], p.dtypes[i], view.buf, static_cast<size_t>(view.len));
        } catch (...) {
          PyBuffer_Release(&view);
          throw;
        }
        PyBuffer_Release(&view);
        t = THPVariable_Wrap(std::move(made));
        if (t == nullptr) throw py::error_already_set();
      }
    }
    PyList_SetItem(slots.p, static_cast<Py_ssize_t>(i) + 1, t);  // steals `t`, drops the None
  }
  // the persistent tensors (`quiet_externals`, into the call's own slots): without the table's look-ups where
  // `refs` and the session's `pins` are those the plan's last run ended with (`GraphPlan.seen_pins`)
  PyObject* rs = refs.ptr();
  const size_t n_ext = p.ext_keys.size();
  if (static_cast<size_t>(PyTuple_GET_SIZE(rs)) != n_ext) return py::none();
  const int64_t pins = pins_of(s);
  const bool seen = pins >= 0 && p.seen_pins == pins && p.seen_refs.ptr() == rs;
  for (size_t k = 0; k < n_ext; ++k) {
    PyObject* ref = PyTuple_GET_ITEM(rs, static_cast<Py_ssize_t>(k));
    if (!PyWeakref_CheckRef(ref)) return py::none();
    PyObject* t = seen ? referent(ref) : nullptr;  // borrowed
    if (t == nullptr) {
      t = get_item(tensors.p, p.ext_keys[k].ptr(), p.ext_values[k]);  // borrowed
      if (!found_same(t, ref)) return py::none();  // freed, bound anew, or its tensor gone
    }
    PyList_SetItem(slots.p, p.ext_at[k], Py_NewRef(t));  // steals the new reference, drops the None
  }
  for (Py_ssize_t j = 0; j < PyList_GET_SIZE(outs); ++j) {  // `check_handle`
    PyObject* h = PyList_GET_ITEM(outs, j);
    const int set = PyObject_IsTrue(h);
    if (set < 0) throw py::error_already_set();
    if (!set) continue;
    const unsigned long long v = PyLong_AsUnsignedLongLong(h);
    if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
      PyErr_Clear();
      return py::none();
    }
    if ((v >> 32) != p.number || v == p.base) return py::none();
  }
  // the traced function's call (`Traced.run`): the picks, then the buffers (`buffer_arg`, after every check above:
  // a plan that declines has written over nothing)
  const Py_ssize_t n_args = static_cast<Py_ssize_t>(p.picks.size());
  Own args(PyTuple_New(n_args + static_cast<Py_ssize_t>(p.bufs.size())));
  if (args.p == nullptr) throw py::error_already_set();
  for (Py_ssize_t k = 0; k < n_args; ++k) {
    PyTuple_SET_ITEM(args.p, k, Py_NewRef(PyList_GET_ITEM(slots.p, p.picks[static_cast<size_t>(k)])));
  }
  if (!p.bufs.empty()) {
    PyObject* wr = writes.ptr();
    if (!PyDict_CheckExact(wr)) return py::none();
    for (size_t i = 0; i < p.bufs.size(); ++i) {
      const char* why = nullptr;
      PyTuple_SET_ITEM(args.p, n_args + static_cast<Py_ssize_t>(i), buffer_arg(p, p.bufs[i], tensors.p, wr, &why));
      if (why != nullptr && !std::exchange(p.bufs[i].was_fresh, true) && p.said && !p.said.is_none()) {
        Own r(PyObject_CallFunction(p.said.ptr(), "ns", static_cast<Py_ssize_t>(i), why));  // (a log at debug level)
        if (r.p == nullptr) PyErr_Clear();  // (a log that failed fails nothing)
      }
    }
  }
  Own out(PyObject_Call(fn.ptr(), args.p, nullptr));
  args.reset(nullptr);
  if (out.p == nullptr) {  // its exception, for the Python to convert
    PyObject *type = nullptr, *value = nullptr, *tb = nullptr;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value == nullptr) {
      Py_XDECREF(type);
      Py_XDECREF(tb);
      throw std::runtime_error("the traced function failed without an exception");
    }
    if (tb != nullptr) PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return py::reinterpret_steal<py::object>(value);
  }
  const Py_ssize_t n_kept = static_cast<Py_ssize_t>(p.kept.size());
  // a list (a TorchScript graph's list of its kept tensors) or a tuple, one per kept slot
  if (!(PyList_CheckExact(out.p) || PyTuple_CheckExact(out.p)) || PySequence_Fast_GET_SIZE(out.p) != n_kept) {
    Own pair(PyTuple_Pack(2, slots.p, out.p));
    if (pair.p == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(std::exchange(pair.p, nullptr));
  }
  for (Py_ssize_t k = 0; k < n_kept; ++k) {
    if (PyList_SetItem(slots.p, p.kept[static_cast<size_t>(k)], Py_NewRef(PySequence_Fast_GET_ITEM(out.p, k))) < 0) {
      throw py::error_already_set();
    }
  }
  if (!rebind_run(session, outputs, p.out_slots, writes, slots.p, true)) {  // (its last run put `writes`' keys there)
    return py::reinterpret_steal<py::object>(std::exchange(slots.p, nullptr));
  }
  // every persistent handle was bound to its reference's object at the start; where no table method unbound one
  // since (`pins` as it was), the next run with these `refs` and `pins` takes them without the look-ups
  if (pins >= 0 && pins_of(s) == pins) {
    p.seen_refs = py::reinterpret_borrow<py::object>(refs);
    p.seen_pins = pins;
  } else {
    p.seen_pins = -1;
  }
  // the slots this run wrote back to None (the list kept for the next run), an input sent by value whose tensor
  // only the list holds kept for the next run to fill again
  PyObject* none = Py_None;
  for (size_t i = 0; i < n_in; ++i) {
    const Py_ssize_t at = static_cast<Py_ssize_t>(i) + 1;
    PyObject* v = PyList_GET_ITEM(slots.p, at);
    if (i < p.spare_inputs.size() && !PyObject_IsTrue(PyList_GET_ITEM(ins, static_cast<Py_ssize_t>(i))) &&
        THPVariable_CheckExact(v) && reusable(p, i, v, 1)) {
      p.spare_inputs[i] = py::reinterpret_steal<py::object>(v);  // the list's reference, moved
      PyList_SET_ITEM(slots.p, at, Py_NewRef(none));
    } else if (PyList_SetItem(slots.p, at, Py_NewRef(none)) < 0) {
      throw py::error_already_set();
    }
  }
  for (const auto* at : {&p.ext_at, &p.kept}) {
    for (const Py_ssize_t k : *at) {  // (in range: the plan's making checked them)
      PyObject* old = PyList_GET_ITEM(slots.p, k);
      PyList_SET_ITEM(slots.p, k, Py_NewRef(none));
      Py_DECREF(old);
    }
  }
  p.spare = py::reinterpret_steal<py::object>(std::exchange(slots.p, nullptr));
  return py::bool_(true);
}

// `graph_run` of a `RunGraph` message's bytes (`raw`, its `SerializeToString()`; round 42, `GraphTable.run`): its
// `inputs` (2), `outputs` (3) and `input_data` (10) read here, as upb reads them (a repeated int packed or not, the
// values appended), rather than as three lists made of upb's containers (~3 us each on this box, more than the
// message's serialization). `data`: the inputs' bytes where the slice took them out of the message (a list), else
// None: its `input_data`. None, nothing done, where the message holds anything else than those and its `graph_id`
// (1): `drop_writes` (4), another field or wire type, a truncated field: the Python path then runs the command.
// `graph_id` (round 43: the bytes as they came in a frame of one command, which no upb parse read, from
// `slices.run_commands`): the graph's number, and None also where the message's `graph_id` as upb reads it (its
// last value, 0 without one) is another; None: not checked (the caller read it from upb's message).
py::object graph_run_raw(const GraphPlan& p, const py::object& session, py::bytes raw, py::handle data,
                         py::handle refs, py::handle writes, py::handle fn, py::handle graph_id) {
  const auto* q = reinterpret_cast<const unsigned char*>(PyBytes_AS_STRING(raw.ptr()));
  const unsigned char* end = q + PyBytes_GET_SIZE(raw.ptr());
  uint64_t want = 0, gid = 0;
  const bool check = !graph_id.is_none();
  if (check) {
    want = PyLong_AsUnsignedLongLong(graph_id.ptr());
    if (want == static_cast<uint64_t>(-1) && PyErr_Occurred()) throw py::error_already_set();
  }
  Own ins(PyList_New(0)), outs(PyList_New(0));
  if (ins.p == nullptr || outs.p == nullptr) throw py::error_already_set();
  Own spans(data.is_none() ? PyList_New(0) : nullptr);
  if (data.is_none() && spans.p == nullptr) throw py::error_already_set();
  auto append = [](PyObject* list, uint64_t v) {
    Own x(PyLong_FromUnsignedLongLong(v));
    if (x.p == nullptr || PyList_Append(list, x.p) < 0) throw py::error_already_set();
  };
  while (q < end) {
    uint64_t key = 0, v = 0;
    if (!read_varint(&q, end, &key)) return py::none();
    const uint64_t field = key >> 3, wire = key & 7;
    if (wire == 0 && field >= 1 && field <= 3) {
      if (!read_varint(&q, end, &v)) return py::none();
      if (field != 1) {
        append(field == 2 ? ins.p : outs.p, v);
      } else {
        gid = v;
      }
    } else if (wire == 2 && (field == 2 || field == 3 || field == 10)) {
      uint64_t len = 0;
      if (!read_varint(&q, end, &len) || len > static_cast<uint64_t>(end - q)) return py::none();
      const unsigned char* lim = q + len;
      if (field == 10) {
        if (spans.p != nullptr) {
          Own b(PyBytes_FromStringAndSize(reinterpret_cast<const char*>(q), static_cast<Py_ssize_t>(len)));
          if (b.p == nullptr || PyList_Append(spans.p, b.p) < 0) throw py::error_already_set();
        }
        q = lim;
        continue;
      }
      while (q < lim) {
        if (!read_varint(&q, lim, &v)) return py::none();
        append(field == 2 ? ins.p : outs.p, v);
      }
    } else {
      return py::none();  // `drop_writes`, or what the Python path reads (and refuses) its own way
    }
  }
  if (check && gid != want) return py::none();
  return graph_run(p, session, ins.p, outs.p, spans.p != nullptr ? py::handle(spans.p) : data, refs, writes, fn);
}

// A length as `slices.lone_run_graph` reads one (`_size`): a canonical varint of at most four bytes (no overlong form)
inline bool read_len4(const unsigned char** p, const unsigned char* lim, uint64_t* v) {
  uint64_t x = 0;
  for (int i = 0; i < 4; ++i) {
    if (*p >= lim) return false;
    const unsigned char b = *(*p)++;
    x |= static_cast<uint64_t>(b & 0x7f) << (7 * i);
    if ((b & 0x80) == 0) {
      if (i > 0 && b == 0) return false;
      *v = x;
      return true;
    }
  }
  return false;
}

// A RunGraph message's bytes read as upb reads them, where nothing in them can fail upb's parse: only `graph_id` (1,
// a varint), `inputs`, `outputs`, `drop_writes` (2-4, varints, packed or not: a packed field's varints end exactly
// at its end) and `input_data` (10, length-delimited), each value within the bytes. Its `graph_id` as upb reads it
// (the last value, 0 without one) into `gid`; false for anything else (another field or wire type, a varint of more
// than 64 bits, a length past the end).
bool run_graph_bytes(const unsigned char* q, const unsigned char* end, uint64_t* gid) {
  *gid = 0;
  while (q < end) {
    uint64_t key = 0, v = 0;
    if (!read_varint(&q, end, &key)) return false;
    const uint64_t field = key >> 3, wire = key & 7;
    if (wire == 0 && field >= 1 && field <= 4) {
      if (!read_varint(&q, end, &v)) return false;
      if (field == 1) *gid = v;
    } else if (wire == 2 && ((field >= 2 && field <= 4) || field == 10)) {
      uint64_t len = 0;
      if (!read_varint(&q, end, &len) || len > static_cast<uint64_t>(end - q)) return false;
      const unsigned char* lim = q + len;
      if (field != 10) {
        while (q < lim) {
          if (!read_varint(&q, lim, &v)) return false;
        }
      }
      q = lim;
    } else {
      return false;
    }
  }
  return true;
}

// A slice's frame of RunGraph commands only (round 44, `slices.run_commands`: capture's frames, one step's RunGraph
// or a batch of steps' when they come fast): [(graph_id, the RunGraph's bytes), ...] in order, or None for any other
// frame. Each `commands` entry must be written as protobuf writes a command holding one `run_graph` (the key 0a, a
// `read_len4` length ending where the next entry starts, the field's key aa 01 and a `read_len4` length ending at the
// entry's end), and its message one `run_graph_bytes` reads (so upb parses the frame, and each command on its own,
// to these messages, and none can fail its parse: a frame's commands may then run one by one, each parsed only where
// the raw run declines it). `graph_id` is the one upb reads.
py::object graph_frame(py::handle payload) {
  Bytes buf(payload.ptr());
  if (!buf.ok) return py::none();
  const unsigned char* p = buf.begin();
  const unsigned char* end = buf.end();
  if (p == end || *p != 0x0a) return py::none();  // (an eager frame: declined at its first byte)
  std::vector<std::pair<const unsigned char*, size_t>> bodies;
  std::vector<uint64_t> gids;
  while (p < end) {
    uint64_t len = 0, inner = 0, gid = 0;
    if (*p++ != 0x0a || !read_len4(&p, end, &len) || len > static_cast<uint64_t>(end - p)) return py::none();
    const unsigned char* cend = p + len;
    if (cend - p < 2 || p[0] != 0xaa || p[1] != 0x01) return py::none();
    p += 2;
    if (!read_len4(&p, cend, &inner) || inner != static_cast<uint64_t>(cend - p)) return py::none();
    if (!run_graph_bytes(p, cend, &gid)) return py::none();
    bodies.emplace_back(p, static_cast<size_t>(inner));
    gids.push_back(gid);
    p = cend;
  }
  Own out(PyList_New(static_cast<Py_ssize_t>(bodies.size())));
  if (out.p == nullptr) throw py::error_already_set();
  for (size_t k = 0; k < bodies.size(); ++k) {
    Own id(PyLong_FromUnsignedLongLong(gids[k]));
    if (id.p == nullptr) throw py::error_already_set();
    Own raw(PyBytes_FromStringAndSize(reinterpret_cast<const char*>(bodies[k].first),
                                      static_cast<Py_ssize_t>(bodies[k].second)));
    if (raw.p == nullptr) throw py::error_already_set();
    PyObject* pair = PyTuple_Pack(2, id.p, raw.p);
    if (pair == nullptr) throw py::error_already_set();
    PyList_SET_ITEM(out.p, static_cast<Py_ssize_t>(k), pair);
  }
  return py::reinterpret_steal<py::object>(std::exchange(out.p, nullptr));
}

// The two calls of a captured step's slice (round 44) as CPython METH_FASTCALL functions rather than pybind11's
// (whose dispatch, its argument loaders and overload loop, was ~2-3k instructions a call: as much as reading the
// frame): `graph_frame(payload)` and `run_raw(plan, session, raw, refs, writes, fn, graph_id)`, which is
// `plan.run_raw(session, raw, None, refs, writes, fn, graph_id)`. A C++ exception becomes the Python one it becomes
// through pybind11 in this extension: a Python error set stays, pybind11's own as pybind11 sets them, any other as
// torch's translator (registered with pybind11 by torch) makes it (c10's errors, an allocation's OutOfMemoryError).
template <typename F>
PyObject* fast_call(F&& f) {
  try {
    return f().release().ptr();
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (py::builtin_exception& e) {
    e.set_error();
  } catch (const std::exception&) {
    torch::translate_exception_to_python(std::current_exception());
  }
  return nullptr;
}

// `eager_frame(payload, between=False, lazy=False)`, positional only: once a slice (`slices.frame_commands`)
PyObject* eager_frame_fast(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs < 1 || nargs > 3) {
    PyErr_SetString(PyExc_TypeError, "eager_frame(payload, between=False, lazy=False) takes one to three arguments");
    return nullptr;
  }
  int flags[2] = {0, 0};
  for (Py_ssize_t k = 1; k < nargs; ++k) {
    flags[k - 1] = PyObject_IsTrue(args[k]);
    if (flags[k - 1] < 0) return nullptr;
  }
  return fast_call([&] { return eager_frame(args[0], flags[0] != 0, flags[1] != 0); });
}

// The front's reader (`service.DeviceServicer._frame`, round 49): of `marked` (the positions of a frame's Uploads and
// Gets, `split_frame`'s), those whose command is not an Upload read here and asking nothing of the side channel: a
// list of them, in order, for upb's parse (the reader's check, `_take_bulk`). An Upload read here is a `commands`
// entry (`commands[n]`'s span: the byte 0a and a `read_size` length to its end) of one `upload` field (12, a
// `read_size` length to the end) whose message `parse_upload` reads (no `bulk_bytes`: a field it refuses), which upb
// takes to the same fields: its parse would refuse nothing and find no bulk to take. Anything else (a Get, a span
// that is no buffer, any other form) is listed.
py::object plain_uploads(PyObject* commands, PyObject* marked) {
  if (!PyList_CheckExact(commands) || !PyList_CheckExact(marked)) throw py::type_error("plain_uploads(list, list)");
  Own rest(PyList_New(0));
  if (rest.p == nullptr) throw py::error_already_set();
  const Py_ssize_t n = PyList_GET_SIZE(commands);
  for (Py_ssize_t j = 0; j < PyList_GET_SIZE(marked); ++j) {
    PyObject* pos = PyList_GET_ITEM(marked, j);
    const Py_ssize_t at = PyLong_AsSsize_t(pos);
    if (at == -1 && PyErr_Occurred()) throw py::error_already_set();
    bool plain = false;
    if (at >= 0 && at < n) {
      PyObject* item = PyList_GET_ITEM(commands, at);
      if (PyTuple_CheckExact(item) && PyTuple_GET_SIZE(item) == 2) {
        Bytes buf(PyTuple_GET_ITEM(item, 1));
        const unsigned char* p = buf.begin();
        const unsigned char* end = buf.ok ? buf.end() : p;
        uint64_t len = 0;
        if (buf.ok && p < end && *p++ == ((1 << 3) | 2) && read_size(&p, end, &len) &&
            len == static_cast<uint64_t>(end - p) && p < end && *p++ == ((2 << 3) | 2) &&
            read_size(&p, end, &len) && len == static_cast<uint64_t>(end - p)) {
          SmallUpload u;
          plain = parse_upload(p, end, &u);
        }
      }
    }
    if (!plain && PyList_Append(rest.p, pos) < 0) throw py::error_already_set();
  }
  return py::reinterpret_steal<py::object>(std::exchange(rest.p, nullptr));
}

PyObject* plain_uploads_fast(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "plain_uploads(commands, marked) takes two arguments");
    return nullptr;
  }
  return fast_call([&] { return plain_uploads(args[0], args[1]); });
}

PyObject* graph_frame_fast(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 1) {
    PyErr_SetString(PyExc_TypeError, "graph_frame(payload) takes one argument");
    return nullptr;
  }
  return fast_call([&] { return graph_frame(args[0]); });
}

PyObject* run_raw_fast(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 7 || !PyBytes_CheckExact(args[2])) {
    PyErr_SetString(PyExc_TypeError, "run_raw(plan, session, raw: bytes, refs, writes, fn, graph_id)");
    return nullptr;
  }
  return fast_call([&] {
    const GraphPlan& plan = py::cast<const GraphPlan&>(py::handle(args[0]));  // (a cast_error: TypeError)
    return graph_run_raw(plan, py::reinterpret_borrow<py::object>(args[1]),
                         py::reinterpret_borrow<py::bytes>(args[2]), py::none(), args[3], args[4], args[5], args[6]);
  });
}

PyMethodDef FAST_DEFS[] = {
    {"eager_frame", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&eager_frame_fast)), METH_FASTCALL,
     "A slice's commands read for slices.frame_commands: (records, at, others, ask[, between]), or None"},
    {"plain_uploads", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&plain_uploads_fast)),
     METH_FASTCALL, "Of a frame's marked Uploads and Gets, those the front's reader leaves to upb's parse"},
    {"graph_frame", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&graph_frame_fast)), METH_FASTCALL,
     "A frame of RunGraphs only: [(graph_id, bytes)], or None (native_runner.cpp `graph_frame`)"},
    {"run_raw", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&run_raw_fast)), METH_FASTCALL,
     "GraphPlan.run_raw(session, raw, None, refs, writes, fn, graph_id) of `plan`"},
    {nullptr, nullptr, 0, nullptr},
};
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  S_used = PyUnicode_InternFromString("used");
  S_ops = PyUnicode_InternFromString("ops");
  S_run = PyUnicode_InternFromString("run");
  S_whole = PyUnicode_InternFromString("_gpupool_whole");
  m.attr("WHOLE") = py::reinterpret_borrow<py::str>(S_whole);  // tests: the same name as `opargs.WHOLE`
  S_tensors = PyUnicode_InternFromString("tensors");
  S_pinned = PyUnicode_InternFromString("pinned");
  S_pins = PyUnicode_InternFromString("pins");
  S_keys = PyUnicode_InternFromString("_keys");
  S_storages = PyUnicode_InternFromString("_storages");
  S_next = PyUnicode_InternFromString("next");
  S_alt = PyUnicode_InternFromString("alt");
  S_quota = PyUnicode_InternFromString("quota");
  S_flops = PyUnicode_InternFromString("flops");
  S_native = PyUnicode_InternFromString("native");
  S_uploads = PyUnicode_InternFromString("uploads");
  S_poisoned = PyUnicode_InternFromString("poisoned");
  S_memory = PyUnicode_InternFromString("memory");
  S_check_handle = PyUnicode_InternFromString("check_handle");
  S_held = PyUnicode_InternFromString("held");
  S_upload = PyUnicode_InternFromString("upload");
  S_admit_handles = PyUnicode_InternFromString("admit_handles");
  S_max_handles = PyUnicode_InternFromString("max_handles");
  S_zero_new = PyUnicode_InternFromString("zero_new");
  MISSING = PyObject_CallNoArgs(reinterpret_cast<PyObject*>(&PyBaseObject_Type));  // `object()`, never freed
  known_hash = check_known_hash();
  m.attr("KNOWN_HASH") = known_hash;  // tests: whether the tables' calls pass the hash
  py::class_<Plan, std::shared_ptr<Plan>>(m, "Plan");
  m.def("plan", &make_plan, py::arg("name"), py::arg("overload"), py::arg("size"), py::arg("fixed"), py::arg("outs"),
        py::arg("args"), py::arg("need"), py::arg("keep"), py::arg("owner"), py::arg("run"), py::arg("returns"),
        py::arg("seeded") = false, py::arg("n_pos") = -1, py::arg("zero") = false, py::arg("ranges") = py::list(),
        py::arg("devices") = py::list(), py::arg("below_autograd") = false);
  py::class_<Trace>(m, "Trace")
      .def(py::init([](py::list steps, py::object origin) {
             Trace t;
             for (auto st : steps) {
               t.steps.push_back(st.is_none() ? nullptr : st.cast<std::shared_ptr<Plan>>());
             }
             if (!origin.is_none() && !PyWeakref_CheckRef(origin.ptr())) {
               throw std::invalid_argument("a trace's origin must be a weak reference or None");
             }
             t.origin = origin;
             return t;
           }),
           py::arg("steps"), py::arg("origin") = py::none())
      .def("__len__", [](const Trace& t) { return t.steps.size(); })
      // its kept views (`Shells`), for tests: per one, (step, the bytes of the storage it holds, the records it served
      // after the first)
      .def("kept_views", [](const Trace& t) {
        py::list out;
        for (size_t k = 0; k < t.steps.size(); ++k) {
          if (t.steps[k] == nullptr) continue;
          for (const Arg& a : t.steps[k]->args) {
            for (const Input& in : a.inputs) {
              if (!in.shell.defined()) continue;
              out.append(py::make_tuple(k, in.shell.storage().nbytes(), in.shell_reused));
            }
          }
        }
        return out;
      })
      .def("runs", [](const Trace& t, int64_t k) {
        return k >= 0 && k < static_cast<int64_t>(t.steps.size()) && t.steps[k] != nullptr;
      });
  trace_type = py::detail::get_type_info(typeid(Trace));
  py::class_<Ctx>(m, "Ctx")
      .def(py::init([](py::object s, py::object memory, py::object count, py::object bind_outputs,
                       py::object over_quota, int64_t capacity, py::object rng, py::object between) {
        Ctx c;
        c.s = s;
        c.tensors = s.attr("tensors");
        c.poisoned = s.attr("poisoned");
        c.storages = s.attr("_storages");
        c.keys = s.attr("_keys");
        c.pinned = py::getattr(s, "pinned", py::none());
        if (!PyDict_CheckExact(c.tensors.ptr()) || !PyDict_CheckExact(c.poisoned.ptr()) ||
            !PyDict_CheckExact(c.storages.ptr()) || !PyDict_CheckExact(c.keys.ptr())) {
          throw std::invalid_argument("a session's tables must be dicts");
        }
        // the table's own key objects, so that the lookups of tensors bound from Python (a model's parameters, its
        // optimizer's states: a run's external inputs, every step) find their entries by identity, not by `==` of
        // two ints (`Keys`); at most half the cache's room
        PyObject *hk, *hv;
        Py_ssize_t pos = 0;
        size_t seeded = 0;
        while (seeded < Keys::LIMIT / 2 && PyDict_Next(c.tensors.ptr(), &pos, &hk, &hv)) {
          if (!PyLong_CheckExact(hk)) continue;
          const uint64_t h = PyLong_AsUnsignedLongLong(hk);
          if (h == static_cast<uint64_t>(-1) && PyErr_Occurred()) {
            PyErr_Clear();
            continue;
          }
          c.handle_keys->put(h, hk);
          ++seeded;
        }
        c.memory = memory;
        c.count = count;
        c.bind_outputs = bind_outputs;
        c.over_quota = over_quota;
        c.quota = s.attr("quota").cast<int64_t>();
        c.capacity = capacity;
        c.max_handles = s.attr("max_handles").cast<int64_t>();
        c.number = s.attr("number").cast<int64_t>();
        c.base = s.attr("handle_base").cast<int64_t>();
        c.flops = s.attr("max_op_flops").cast<int64_t>();
        if (!rng.is_none()) {  // (owner table, lock): seeded records run here (`exclusive_rng`)
          auto r = rng.cast<py::tuple>();
          if (r.size() != 2 || !PyDict_CheckExact(r[0].ptr())) throw std::invalid_argument("rng: (owners, lock)");
          c.rng_owner = r[0];
          c.rng_lock = r[1];
          c.rng_acquire = c.rng_lock.attr("acquire");
          c.rng_release = c.rng_lock.attr("release");
          c.own_process = true;
        }
        if (!between.is_none()) {  // (transfer, pool, dtypes): uploads and frees among the records run here
          auto u = between.cast<py::tuple>();
          if (u.size() != 3) throw std::invalid_argument("between: (transfer, pool, dtypes)");
          c.transfer = u[0];
          c.pool = u[1];
          c.pending = s.attr("uploads");
          for (auto d : u[2].cast<py::list>()) {  // the wire's dtypes by number (None: none)
            c.dtypes.push_back(THPDtype_Check(d.ptr()) ? reinterpret_cast<THPDtype*>(d.ptr())->scalar_type
                                                       : at::ScalarType::Undefined);
          }
          c.between_here = true;
        }
        return c;
      }),
      py::arg("s"), py::arg("memory"), py::arg("count"), py::arg("bind_outputs"), py::arg("over_quota"),
      py::arg("capacity"), py::arg("rng") = py::none(), py::arg("between") = py::none())
      .def("run", &Ctx::run, py::arg("first"), py::arg("k"), py::arg("records"), py::arg("i"), py::arg("objs"),
           py::arg("progress"), py::arg("start"), py::arg("budget"), py::arg("between") = py::none())
      // one upload or free from its command's bytes outside a run (`Ctx::between_one`): True, False or an exception
      .def("between", &Ctx::between_one, py::arg("cmd"))
      // the int its lookups of handle `h` use now (`Keys`), or None: for tests
      .def("cached_key", [](const Ctx& c, uint64_t h) -> py::object {
        PyObject* k = c.handle_keys->find(h);
        if (k == nullptr) return py::none();
        return py::reinterpret_borrow<py::object>(k);
      });
  m.def("free", &free_handles, py::arg("session"), py::arg("msg"), py::arg("ctx") = py::none());
  m.def("filled", &filled);
  m.def("pinned", [] { return pinned_records; });
  m.def("plain_views", [] { return plain_views; });
  m.def("quiet_externals", &quiet_externals);
  m.def("rebind_run", &rebind_run, py::arg("session"), py::arg("outputs"), py::arg("out_slots"), py::arg("writes"),
        py::arg("slots"), py::arg("in_place") = false);
  py::class_<GraphPlan>(m, "GraphPlan")
      .def(py::init(&make_graph_plan), py::arg("n_slots"), py::arg("metas"), py::arg("nbytes"), py::arg("contiguous"),
           py::arg("ext_handles"), py::arg("ext_slots"), py::arg("picks"), py::arg("kept"), py::arg("out_slots"),
           py::arg("number"), py::arg("base"), py::arg("tensors"))
      .def_property_readonly("seen_pins", [](const GraphPlan& p) { return p.seen_pins; })
      // (secrev50) the inputs sent by value its last run kept for the next (`spare_inputs`) let go: server/graph.py
      // `_spares` keeps them in one plan of a session at a time, and in none while the Python path runs a graph
      .def("let_go", [](const GraphPlan& p) { p.spare_inputs.clear(); })
      // (secrev51) how many inputs it keeps now (`spare_inputs` set): for tests, the fuzz's graphs campaign
      .def_property_readonly("spares",
                             [](const GraphPlan& p) {
                               size_t n = 0;
                               for (const auto& o : p.spare_inputs) n += o ? 1 : 0;
                               return n;
                             })
      // (round 52) the kept tensors its traced function writes into buffers it takes (graph_trace.Buffer, in
      // order): (handle, slot, sizes, strides, dtype, nbytes) each; `said(index, why)` hears of a buffer's first
      // fresh one
      .def("buffers",
           [](GraphPlan& p, py::list bufs, py::object said) {
             std::vector<GraphPlan::Buf> made;
             for (auto item : bufs) {
               py::tuple b = item.cast<py::tuple>();
               if (b.size() != 6 || !PyLong_CheckExact(b[0].ptr()) || !THPDtype_Check(b[4].ptr())) {
                 throw std::invalid_argument("GraphPlan.buffers: a bad buffer");
               }
               GraphPlan::Buf x;
               x.handle = b[0];
               x.slot = b[1].cast<int64_t>();
               x.sizes = int_list(b[2], "sizes");
               x.strides = int_list(b[3], "strides");
               x.dtype = reinterpret_cast<THPDtype*>(b[4].ptr())->scalar_type;
               x.nbytes = b[5].cast<int64_t>();
               if (x.sizes.size() != x.strides.size() || x.sizes.size() > MAX_DIMS || x.slot < 1 ||
                   x.slot >= p.n_slots || x.nbytes < 0) {
                 throw std::invalid_argument("GraphPlan.buffers: a bad buffer");
               }
               for (size_t d = 0; d < x.sizes.size(); ++d) {
                 if (x.sizes[d] < 0 || x.strides[d] < 0) throw std::invalid_argument("GraphPlan.buffers: a bad buffer");
               }
               made.push_back(std::move(x));
             }
             p.bufs = std::move(made);
             p.said = std::move(said);
           })
      .def_property_readonly("reused", [](const GraphPlan& p) { return p.reused; })
      .def_property_readonly("fresh", [](const GraphPlan& p) { return p.fresh; })
      .def("run", &graph_run, py::arg("session"), py::arg("inputs"), py::arg("outputs"), py::arg("data"),
           py::arg("refs"), py::arg("writes"), py::arg("fn"))
      .def("run_raw", &graph_run_raw, py::arg("session"), py::arg("raw"), py::arg("data"), py::arg("refs"),
           py::arg("writes"), py::arg("fn"), py::arg("graph_id") = py::none());
  m.def("eager_records", &eager_records);
  m.def("split_frame", &split_frame);
  for (PyMethodDef* d = FAST_DEFS; d->ml_name != nullptr; ++d) {
    Own f(PyCFunction_NewEx(d, nullptr, nullptr));
    if (f.p == nullptr) throw py::error_already_set();
    m.attr(d->ml_name) = py::reinterpret_borrow<py::object>(f.p);
  }
  // the fused attention's compositions in C++ (`attn::run`): a plan's (`_compile`), and each alone for tests
  m.def("in_cpp", [](std::shared_ptr<Plan> plan, int which) {  // `Plan::in_cpp`
    if (which < 1 || which > 4) throw std::invalid_argument("in_cpp: 1 to 4");
    if (plan->n_pos < 0 || plan->returns != (which == 4 ? ONE : SEVERAL)) {
      throw std::invalid_argument("in_cpp: a Python run's plan of the op's returns");
    }
    plan->in_cpp = which;
  });
  m.def("attention_calls", [] { return attn::native_calls; });
  m.def("dropout_calls", [] { return dropout::native_calls; });
  m.def("attention_forward", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const std::optional<at::Tensor>& bias, double p, bool causal, bool debug,
                                std::optional<double> scale) -> py::object {
    std::optional<attn::Forward> f;
    const int major = p == 0.0 ? attn::cuda_major(q) : 0;
    {
      py::gil_scoped_release nogil;
      f = attn::forward_call(q, k, v, bias ? *bias : at::Tensor(), p, causal, debug, scale, major);
    }
    if (!f) return py::none();
    PyObject* got = attn::forward_tuple(std::move(*f));
    if (got == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(got);
  }, py::arg("query"), py::arg("key"), py::arg("value"), py::arg("attn_bias"), py::arg("dropout_p"),
     py::arg("is_causal"), py::arg("return_debug_mask"), py::arg("scale"));
  m.def("attention_backward", [](const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const std::optional<at::Tensor>& bias,
                                 const std::vector<bool>& grad_input_mask, const at::Tensor& out,
                                 const at::Tensor& logsumexp, double p, bool causal, const at::Tensor& seed,
                                 std::optional<double> scale) -> py::object {
    std::optional<attn::Backward> r;
    const int major = p == 0.0 ? attn::cuda_major(q) : 0;
    {
      py::gil_scoped_release nogil;
      r = attn::backward_call(grad, q, k, v, bias ? *bias : at::Tensor(), grad_input_mask, out, logsumexp, p, causal,
                              seed, scale, major);
    }
    if (!r) return py::none();
    PyObject* got = attn::backward_tuple(std::move(*r));
    if (got == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(got);
  }, py::arg("grad_out"), py::arg("query"), py::arg("key"), py::arg("value"), py::arg("attn_bias"),
     py::arg("grad_input_mask"), py::arg("out"), py::arg("logsumexp"), py::arg("dropout_p"), py::arg("is_causal"),
     py::arg("philox_seed"), py::arg("scale"));
  m.def("storage_key", [](const at::Tensor& t) {
    return py::reinterpret_steal<py::object>(PyLong_FromVoidPtr(t.storage().unsafeGetStorageImpl()));
  });
}
