// The steady path of an eager op on remote tensors in C (CPython's API only: no torch headers, no pybind):
// `RemoteTensor.__torch_dispatch__` for an op whose meta-cache entry exists, whose arguments are remote tensors and
// plain values, on a device nobody is recording a step on. It does what client/torch/remote.py `run_remote` does on
// that path (the compact record, the cache key, the lookup, the handles, the wrappers, `rt.eager_op` and the session's
// `eager_op`), without ~300 Python bytecodes an op. Anything else - a cache miss, a value the compact record has no
// encoding for, a CPU tensor, a capture, a held-back empty, an error to raise - goes to the Python dispatcher
// (`dispatch.torch_dispatch`), which stays the reference: this path makes the same key, the same record bytes and the
// same wrappers, or makes nothing at all (every check comes before the first side effect).
//
// Built at first use by client/torch/native.py (`build_ops`) and imported as an extension module;
// `GPUPOOL_NATIVE_OPS=0` keeps the Python dispatcher (the A/B, the tests' reference).

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstdint>
#include <cstring>
#include <string>

namespace {

// Set once by `setup`; borrowed forever (the module keeps its own references).
PyObject* g_remote_type = nullptr;   // tensor.RemoteTensor (exact type: other subclasses fall back)
PyObject* g_view_type = nullptr;     // tensor.RemoteView (a lazy view: `_gp_v` is its view argument's bytes)
PyObject* g_alias_fn = nullptr;      // transfer._alias (detach, alias): `SPECIAL` handlers done here too
PyObject* g_view_fn = nullptr;       // transfer._view (the view ops)
PyObject* g_geometry = nullptr;      // transfer._GEOMETRY: a view's meta -> its view argument's bytes after the handle
PyObject* g_runtime = nullptr;       // the runtime module (FREE_BATCH, FLUSH_OPS: read per op, as its methods do)
PyObject* g_make_wrapper = nullptr;  // torch.Tensor._make_wrapper_subclass
PyObject* g_strided = nullptr;       // torch.strided
PyObject* g_py_dispatch = nullptr;   // dispatch.torch_dispatch: everything this path does not do
PyObject* g_compiler = nullptr;      // torch.compiler (its `_is_compiling_flag`)
PyObject* g_cache = nullptr;         // meta.CACHE
Py_ssize_t g_max_op_ids = 0;         // compact.MAX_OP_IDS
Py_ssize_t g_max_outputs = 0;        // compact.MAX_OUTPUTS
long g_plain = 0, g_special = 1;     // dispatch._PLAIN, dispatch._SPECIAL
PyObject* g_one = nullptr;           // the int 1
// Set by `setup_session` (optional: without it every record goes through Session.eager_op in Python)
PyObject* g_session_type = nullptr;  // client.session.Session (exact type: a subclass or a stand-in gets its method)
PyObject* g_session_mod = nullptr;   // client.session (MAX_BATCH_COMMANDS, read per op as the method does)
PyObject* g_eager_short = nullptr;   // session._EAGER_SHORT as a tuple: the entry prefix of a record of n < 128 bytes
// Set by `setup_rules`: torch._library.simple_registry and its own find_torch_dispatch_rule (`find_rule`)
PyObject* g_registry = nullptr;
PyObject* g_find_rule = nullptr;
PyObject* g_inference_on = nullptr;  // torch.is_inference_mode_enabled (setup_inference)
// Set by `setup_values` (optional: without them such arguments take the Python dispatcher)
PyObject* g_const_types = nullptr;   // (torch.dtype, torch.layout, torch.memory_format)
PyObject* g_consts = nullptr;        // each such value the wire has a code for -> compact.encode_value(value)
unsigned long long g_ran = 0, g_passed = 0;  // ops this path ran, ops it passed to the Python dispatcher (`stats`)

// interned attribute names
PyObject *s_gp_route, *s_fast, *s_gp_rt, *s_gp_h, *s_gp_key, *s_recorders, *s_op_ids, *s_pending, *s_entries,
    *s_hits, *s_one, *s_metas, *s_wrapper, *s_spec, *s_flat_tuple, *s_flat_list, *s_values, *s_handle_base,
    *s_handle_count, *s_device, *s_eager_op, *s_is_compiling, *s_gp_v, *s_closed, *s_gp_sch, *s_shared, *s_watched,
    *s_dead, *s_dead_bytes, *s_release, *s_itemsize, *s_heads, *s_ops_sent, *s_unflushed, *s_session, *s_free_bytes,
    *s_flush_ops, *s_free_batch, *s_raise, *s_lock, *s_acquire, *s_eager, *s_sealed_count, *s_max_batch,
    *s_qualname, *s_singleton, *s_data, *s_rules, *s_nbytes, *s_room, *s_near, *s_near_flag, *s_kept, *s_grad;

// Argument kinds (meta.T, TL, S, SL, V), as `Schema.fast` codes them.
enum Kind : long { kT = 0, kTL = 1, kS = 2, kSL = 3, kV = 4 };

// Tags of gpupool/compact.py.
enum Tag : unsigned char {
  tNONE = 0, tTENSOR = 1, tINT = 2, tFLOAT = 3, tBOOL = 4, tTENSORS = 5, tINTS = 6, tFLOATS = 7, tBOOLS = 8, tVIEW = 14,
  tVIEWS = 15
};

inline bool is_remote(PyObject* v) {
  return Py_TYPE(v) == reinterpret_cast<PyTypeObject*>(g_remote_type) ||
         Py_TYPE(v) == reinterpret_cast<PyTypeObject*>(g_view_type);
}

PyObject* new_wrapper(PyObject* type, PyObject* rt_device, PyObject* rt, PyObject* handle, PyObject* m, PyObject* shape,
                      PyObject* strides, PyObject* offset, PyObject* dtype, PyObject* view);

int send_record(PyObject* rt, PyObject* name, const std::string& body);

struct Ref {  // an owned reference, released at scope end
  PyObject* p = nullptr;
  Ref() = default;
  explicit Ref(PyObject* o) : p(o) {}
  Ref(const Ref&) = delete;
  Ref& operator=(const Ref&) = delete;
  ~Ref() { Py_XDECREF(p); }
  PyObject* release() {
    PyObject* o = p;
    p = nullptr;
    return o;
  }
};

// A handle (a Python int) as a uint64_t: PyLong_AsUnsignedLong, whose digit loop costs ~150 instructions less than
// PyLong_AsUnsignedLongLong's byte-array conversion of a multi-digit int (a handle is one: ~6 conversions an op); the
// same value or the same error types (TypeError for a non-int, OverflowError for a negative or too large one). -1 with
// an error set on failure.
static_assert(sizeof(unsigned long) == sizeof(uint64_t), "an LP64 host");
inline uint64_t as_u64(PyObject* v) {
  return static_cast<uint64_t>(PyLong_AsUnsignedLong(v));
}

void put_u64(std::string& out, unsigned char tag, uint64_t v) {
  char b[9];
  b[0] = static_cast<char>(tag);
  std::memcpy(b + 1, &v, 8);  // little-endian hosts only (checked in setup)
  out.append(b, 9);
}

// A borrowed entry of a dict (an instance's __dict__: a wrapper subclass keeps its attributes there) by a str name
// whose hash is kept (this file's interned names: hashed once, when interned), without PyDict_GetItemWithError's call
// of PyObject_Hash for it (~90 such lookups an op); the same lookup and errors.
inline PyObject* dict_get(PyObject* d, PyObject* name) {
#if PY_VERSION_HEX < 0x030D0000
  const Py_hash_t hash = PyUnicode_CheckExact(name) ? reinterpret_cast<PyASCIIObject*>(name)->hash : -1;
  if (hash != -1) return _PyDict_GetItem_KnownHash(d, name, hash);
#endif
  return PyDict_GetItemWithError(d, name);
}

// obj.<name> as a new reference: from the instance's __dict__ when it is there (the runtime, the meta cache and its
// entries are plain instances: an attribute lookup through the type costs ~5x a dict lookup), else getattr.
PyObject* get_attr(PyObject* obj, PyObject* name) {
  PyObject** dp = _PyObject_GetDictPtr(obj);
  if (dp != nullptr && *dp != nullptr) {
    PyObject* v = dict_get(*dp, name);
    if (v != nullptr) {
      Py_INCREF(v);
      return v;
    }
    if (PyErr_Occurred()) return nullptr;
  }
  return PyObject_GetAttr(obj, name);
}

// obj.<name> = value, into the instance's __dict__ where the attribute lives there (else setattr).
int set_attr(PyObject* obj, PyObject* name, PyObject* value) {
  PyObject** dp = _PyObject_GetDictPtr(obj);
  if (dp != nullptr && *dp != nullptr) {
    const int has = PyDict_Contains(*dp, name);
    if (has < 0) return -1;
    if (has) return PyDict_SetItem(*dp, name, value);
  }
  return PyObject_SetAttr(obj, name, value);
}

// A remote tensor's attributes (borrowed from its __dict__): its runtime, handle, metadata key, and a lazy view's
// argument (bytes; nullptr for a tensor with a daemon tensor of its own).
struct Remote {
  PyObject *rt = nullptr, *h = nullptr, *key = nullptr, *view = nullptr;
};

// 0: read; 1: not this path's (no such attributes, or a view argument that is not bytes); -1: an error is set.
int remote_fields(PyObject* t, Remote& r) {
  if (!is_remote(t)) return 1;
  PyObject** dp = _PyObject_GetDictPtr(t);
  if (dp == nullptr || *dp == nullptr) return 1;
  r.rt = dict_get(*dp, s_gp_rt);
  r.h = r.rt ? dict_get(*dp, s_gp_h) : nullptr;
  r.key = r.h ? dict_get(*dp, s_gp_key) : nullptr;
  if (r.key == nullptr) return PyErr_Occurred() ? -1 : 1;
  r.view = dict_get(*dp, s_gp_v);
  if (r.view == nullptr && PyErr_Occurred()) return -1;
  if (r.view == Py_None) r.view = nullptr;
  if (r.view != nullptr && !PyBytes_CheckExact(r.view)) return 1;
  return 0;
}

// The same runtime as the arguments before (`*rt`, set by the first): false for a second device (the Python path
// raises torch's error).
inline bool same_device(PyObject** rt, PyObject* other) {
  if (*rt == nullptr) *rt = other;
  return *rt == other;
}

// Whether values of this type may be in `g_consts`.
inline bool is_const_type(PyTypeObject* tv) {
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(g_const_types); i++) {
    if (reinterpret_cast<PyObject*>(tv) == PyTuple_GET_ITEM(g_const_types, i)) return true;
  }
  return false;
}

// 0: encoded; 1: not this path's (fall back); -1: a Python error is set.
// The key part and bytes are exactly encode.build_compact's (`_c_one`) for the cases handled here.
int encode_arg(PyObject* v, long kind, bool by_type, PyObject** rt, PyObject** key_part, std::string& out) {
  if (is_remote(v)) {  // a remote tensor, or a view (encode._c_view: the op does not reshape, so never `own`)
    Remote r;
    const int got = remote_fields(v, r);
    if (got != 0) return got;
    if (!same_device(rt, r.rt)) return 1;
    if (r.view != nullptr) {
      out.append(PyBytes_AS_STRING(r.view), static_cast<size_t>(PyBytes_GET_SIZE(r.view)));
    } else {
      const uint64_t hv = as_u64(r.h);
      if (hv == static_cast<uint64_t>(-1) && PyErr_Occurred()) return -1;
      put_u64(out, tTENSOR, hv);
    }
    Py_INCREF(r.key);
    *key_part = r.key;
    return 0;
  }
  if (v == Py_None) {
    out.push_back(static_cast<char>(tNONE));
    Py_INCREF(Py_None);
    *key_part = Py_None;
    return 0;
  }
  PyTypeObject* tv = Py_TYPE(v);
  const bool is_bool = tv == &PyBool_Type, is_int = tv == &PyLong_Type, is_float = tv == &PyFloat_Type;
  if (kind == kV) {
    if (is_bool) {  // keyed by value
      out.push_back(static_cast<char>(tBOOL));
      out.push_back(v == Py_True ? 1 : 0);
      Py_INCREF(v);
      *key_part = v;
      return 0;
    }
    if (is_int) {
      int overflow = 0;
      long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
      if (overflow) return 1;
      if (x == -1 && PyErr_Occurred()) return -1;
      put_u64(out, tINT, static_cast<uint64_t>(x));
      Py_INCREF(v);
      *key_part = v;
      return 0;
    }
    if (is_float) {  // eps, p, scale: keyed as (float, value) (meta._value_key: 1 and 1.0 hash alike)
      *key_part = PyTuple_Pack(2, reinterpret_cast<PyObject*>(&PyFloat_Type), v);
      if (*key_part == nullptr) return -1;
      const double x = PyFloat_AS_DOUBLE(v);
      uint64_t bits;
      std::memcpy(&bits, &x, 8);
      put_u64(out, tFLOAT, bits);
      return 0;
    }
    if (g_consts != nullptr && is_const_type(tv)) {  // a dtype, layout or memory format: keyed by itself
      PyObject* code = PyDict_GetItemWithError(g_consts, v);  // borrowed: its bytes
      if (code == nullptr) return PyErr_Occurred() ? -1 : 1;  // one the wire has no code for: Unencodable
      out.append(PyBytes_AS_STRING(code), static_cast<size_t>(PyBytes_GET_SIZE(code)));
      Py_INCREF(v);
      *key_part = v;
      return 0;
    }
    if (tv == &PyList_Type && PyList_GET_SIZE(v) > 0 && Py_TYPE(PyList_GET_ITEM(v, 0)) == &PyBool_Type) {
      // a list of exact bools (output_mask): keyed as a tuple of them, encoded as BOOLS (compact._encode_list)
      const Py_ssize_t n = PyList_GET_SIZE(v);
      if (n > 65535) return 1;
      std::string part;
      part.push_back(static_cast<char>(tBOOLS));
      const uint16_t n16 = static_cast<uint16_t>(n);
      part.append(reinterpret_cast<const char*>(&n16), 2);
      for (Py_ssize_t i = 0; i < n; i++) {
        PyObject* x = PyList_GET_ITEM(v, i);
        if (Py_TYPE(x) != &PyBool_Type) return 1;
        part.push_back(x == Py_True ? 1 : 0);
      }
      PyObject* t = PyList_AsTuple(v);
      if (t == nullptr) return -1;
      out += part;
      *key_part = t;
      return 0;
    }
    if (tv == &PyList_Type) {  // a list of exact ints: keyed as a tuple of them
      Py_ssize_t n = PyList_GET_SIZE(v);
      if (n > 65535) return 1;
      for (Py_ssize_t i = 0; i < n; i++) {
        if (Py_TYPE(PyList_GET_ITEM(v, i)) != &PyLong_Type) return 1;
      }
      std::string part;
      part.push_back(static_cast<char>(tINTS));
      const uint16_t n16 = static_cast<uint16_t>(n);
      part.append(reinterpret_cast<const char*>(&n16), 2);
      for (Py_ssize_t i = 0; i < n; i++) {
        int overflow = 0;
        long long x = PyLong_AsLongLongAndOverflow(PyList_GET_ITEM(v, i), &overflow);
        if (overflow) return 1;
        if (x == -1 && PyErr_Occurred()) return -1;
        part.append(reinterpret_cast<const char*>(&x), 8);
      }
      PyObject* t = PyList_AsTuple(v);
      if (t == nullptr) return -1;
      out += part;
      *key_part = t;
      return 0;
    }
    return 1;
  }
  if ((kind == kS || kind == kT) && (is_bool || is_int || is_float)) {
    if (is_bool) {
      out.push_back(static_cast<char>(tBOOL));
      out.push_back(v == Py_True ? 1 : 0);
    } else if (is_int) {
      int overflow = 0;
      long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
      if (overflow) return 1;
      if (x == -1 && PyErr_Occurred()) return -1;
      put_u64(out, tINT, static_cast<uint64_t>(x));
    } else {
      double x = PyFloat_AS_DOUBLE(v);
      uint64_t bits;
      std::memcpy(&bits, &x, 8);
      put_u64(out, tFLOAT, bits);
    }
    PyObject* t = reinterpret_cast<PyObject*>(tv);
    if (kind == kT || by_type) {  // a Python number for a Tensor, or a Scalar of an op with tensor inputs: its type
      Py_INCREF(t);
      *key_part = t;
    } else {  // a factory's Scalar decides shapes: (type, value)
      *key_part = PyTuple_Pack(2, t, v);
      if (*key_part == nullptr) return -1;
    }
    return 0;
  }
  if (kind == kSL && by_type && tv == &PyList_Type) {  // a Scalar list of an op with tensor inputs: keyed by types
    const Py_ssize_t n = PyList_GET_SIZE(v);
    if (n > 65535) return 1;
    bool any_float = false;
    for (Py_ssize_t i = 0; i < n; i++) {
      PyTypeObject* tx = Py_TYPE(PyList_GET_ITEM(v, i));
      if (tx == &PyFloat_Type) {
        any_float = true;
      } else if (tx != &PyLong_Type) {
        return 1;  // bools, numbers of other types: the Python path
      }
    }
    Ref keys(PyTuple_New(n));
    if (keys.p == nullptr) return -1;
    std::string part;  // compact._encode_list: INTS if all are ints, else FLOATS
    part.push_back(static_cast<char>(any_float ? tFLOATS : tINTS));
    const uint16_t n16 = static_cast<uint16_t>(n);
    part.append(reinterpret_cast<const char*>(&n16), 2);
    for (Py_ssize_t i = 0; i < n; i++) {
      PyObject* x = PyList_GET_ITEM(v, i);
      if (any_float) {
        const double d = PyFloat_AsDouble(x);  // an int converts as struct's "d" converts it
        if (d == -1.0 && PyErr_Occurred()) return -1;
        part.append(reinterpret_cast<const char*>(&d), 8);
      } else {
        int overflow = 0;
        const long long y = PyLong_AsLongLongAndOverflow(x, &overflow);
        if (overflow) return 1;
        if (y == -1 && PyErr_Occurred()) return -1;
        part.append(reinterpret_cast<const char*>(&y), 8);
      }
      PyObject* tx = reinterpret_cast<PyObject*>(Py_TYPE(x));
      Py_INCREF(tx);
      PyTuple_SET_ITEM(keys.p, i, tx);
    }
    out += part;
    *key_part = keys.release();
    return 0;
  }
  if (kind == kTL && (tv == &PyList_Type || tv == &PyTuple_Type)) {  // remote tensors and views, no None
    Py_ssize_t n = PySequence_Fast_GET_SIZE(v);
    if (n > 65535) return 1;
    PyObject** items = PySequence_Fast_ITEMS(v);
    Ref keys(PyTuple_New(n));
    if (keys.p == nullptr) return -1;
    std::string handles, elements;  // the list as TENSORS (handles), and as VIEWS (elements, tags included)
    bool lazy = false;
    for (Py_ssize_t i = 0; i < n; i++) {
      Remote r;
      const int got = remote_fields(items[i], r);
      if (got != 0) return got;
      if (!same_device(rt, r.rt)) return 1;
      const uint64_t hv = as_u64(r.h);
      if (hv == static_cast<uint64_t>(-1) && PyErr_Occurred()) return -1;
      handles.append(reinterpret_cast<const char*>(&hv), 8);
      if (r.view != nullptr) {
        lazy = true;
        elements.append(PyBytes_AS_STRING(r.view), static_cast<size_t>(PyBytes_GET_SIZE(r.view)));
      } else {
        put_u64(elements, tTENSOR, hv);
      }
      Py_INCREF(r.key);
      PyTuple_SET_ITEM(keys.p, i, r.key);
    }
    out.push_back(static_cast<char>(lazy ? tVIEWS : tTENSORS));
    const uint16_t n16 = static_cast<uint16_t>(n);
    out.append(reinterpret_cast<const char*>(&n16), 2);
    out += lazy ? elements : handles;
    *key_part = keys.release();
    return 0;
  }
  return 1;
}

// True if `o` (an attribute's value) is truthy; -1 on error.
inline int truthy(PyObject* o) {
  return PyObject_IsTrue(o);
}

int add_attr(PyObject* obj, PyObject* name, PyObject* delta);

// meta.CACHE.hits += 1 (the benchmarks report it)
int bump_hits() {
  return add_attr(g_cache, s_hits, g_one);
}

// rt.new_handle(), as run_remote inlines it: rt._handle_base + next(rt._handle_count)
PyObject* new_handle(PyObject* base, PyObject* counter) {
  Ref n(PyIter_Next(counter));
  if (n.p == nullptr) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "gpupool: the session's handle counter ended");
    return nullptr;
  }
  return PyNumber_Add(base, n.p);
}

// runtime.DeviceRuntime.spend(outs.nbytes), inline (reserve52): rt._room less the op's new bytes; below 0, or
// after an empty made past it (rt._near), rt.near(): a sync, which raises the daemon's refusal at this call.
// 0, or -1 with an error set.
int spend_room(PyObject* rt, PyObject* outs) {
  Ref nb(get_attr(outs, s_nbytes));
  if (nb.p == nullptr) return -1;
  PyObject** dp = _PyObject_GetDictPtr(rt);
  if (dp == nullptr || *dp == nullptr) return 0;  // (a runtime without the count: nothing to keep)
  const long long n = PyLong_AsLongLong(nb.p);
  if (n == -1 && PyErr_Occurred()) return -1;
  bool near = false;
  if (n != 0) {
    PyObject* room = dict_get(*dp, s_room);  // borrowed: a float (runtime.py says why)
    if (room == nullptr) return PyErr_Occurred() ? -1 : 0;
    double left = PyFloat_AsDouble(room);
    if (left == -1.0 && PyErr_Occurred()) return -1;
    left -= static_cast<double>(n);
    if (Py_REFCNT(room) == 1 && PyFloat_CheckExact(room)) {
      // only the runtime's dict holds it (no constant, no reader): written in place, no new float and no dict store
      // (~250 instructions an op of the ~550 this count costs: round 53, perf53)
      reinterpret_cast<PyFloatObject*>(room)->ob_fval = left;
    } else {
      Ref now(PyFloat_FromDouble(left));
      if (now.p == nullptr || PyDict_SetItem(*dp, s_room, now.p) < 0) return -1;
    }
    near = left < 0;
  }
  if (!near) {
    PyObject* flag = dict_get(*dp, s_near_flag);  // borrowed
    if (flag == nullptr) return PyErr_Occurred() ? -1 : 0;
    if (flag != Py_True) return 0;
  }
  Ref done(PyObject_CallMethodNoArgs(rt, s_near));
  return done.p == nullptr ? -1 : 0;
}

// The fast path proper. Returns a new reference (the op's result), nullptr with an error set, or nullptr without
// one: not this path's (the caller falls back to the Python dispatcher).
PyObject* fast_plain(PyObject* sch, PyObject* args, PyObject* kwargs) {
  Ref fast(get_attr(sch, s_fast));
  if (fast.p == nullptr) return nullptr;
  if (fast.p == Py_None || !PyTuple_Check(fast.p) || PyTuple_GET_SIZE(fast.p) != 6) return nullptr;
  // Schema.fast: (name, kinds, by_type, alias positions, keyword argument kinds, the device argument's position or -1)
  PyObject* name = PyTuple_GET_ITEM(fast.p, 0);
  PyObject* kinds = PyTuple_GET_ITEM(fast.p, 1);
  const bool by_type = PyTuple_GET_ITEM(fast.p, 2) == Py_True;
  PyObject* alias = PyTuple_GET_ITEM(fast.p, 3);
  PyObject* kwarg_kinds = PyTuple_GET_ITEM(fast.p, 4);
  const long device_at = PyLong_AsLong(PyTuple_GET_ITEM(fast.p, 5));
  if (device_at == -1 && PyErr_Occurred()) return nullptr;
  const Py_ssize_t nargs = PyTuple_GET_SIZE(args);
  const Py_ssize_t nkw = kwargs != nullptr ? PyDict_GET_SIZE(kwargs) : 0;
  if (nargs > PyTuple_GET_SIZE(kinds) || nargs > 255 || nkw > 255 || !PyDict_CheckExact(kwarg_kinds)) return nullptr;
  if (device_at >= 0) {  // Schema.device_plain: only with no device named (dispatch._other decides any other case)
    if (nargs > device_at && PyTuple_GET_ITEM(args, device_at) != Py_None) return nullptr;
    PyObject* device = nkw > 0 ? dict_get(kwargs, s_device) : nullptr;  // borrowed
    if (device == nullptr && PyErr_Occurred()) return nullptr;
    if (device != nullptr && device != Py_None) return nullptr;
  }

  std::string tail;
  tail.reserve(16 + 10 * nargs);
  tail.push_back(static_cast<char>(nargs));
  Ref key(PyTuple_New(nargs + 1 + nkw));
  if (key.p == nullptr) return nullptr;
  Py_INCREF(sch);
  PyTuple_SET_ITEM(key.p, 0, sch);
  PyObject* rt = nullptr;  // borrowed: held by the arguments
  for (Py_ssize_t i = 0; i < nargs; i++) {
    PyObject* part = nullptr;
    const long kind = PyLong_AsLong(PyTuple_GET_ITEM(kinds, i));
    const int r = encode_arg(PyTuple_GET_ITEM(args, i), kind, by_type, &rt, &part, tail);
    if (r != 0) return nullptr;  // an error (set) or not this path's (none set)
    PyTuple_SET_ITEM(key.p, i + 1, part);
  }
  tail.push_back(static_cast<char>(nkw));
  if (nkw > 0) {  // encode.build_compact's: by name in sorted order, each keyed (name, part) after the arguments
    Ref names(PyDict_Keys(kwargs));
    if (names.p == nullptr || PyList_Sort(names.p) < 0) return nullptr;
    for (Py_ssize_t i = 0; i < nkw; i++) {
      PyObject* kw = PyList_GET_ITEM(names.p, i);
      Py_ssize_t len = 0;
      const char* raw = PyUnicode_Check(kw) && PyUnicode_IS_ASCII(kw) ? PyUnicode_AsUTF8AndSize(kw, &len) : nullptr;
      if (raw == nullptr || len == 0 || len > 255) return nullptr;  // Unencodable (or an error, set)
      PyObject* code = dict_get(kwarg_kinds, kw);  // borrowed; absent: meta.V
      if (code == nullptr && PyErr_Occurred()) return nullptr;
      const long kind = code != nullptr ? PyLong_AsLong(code) : kV;
      if (kind == -1 && PyErr_Occurred()) return nullptr;
      PyObject* v = dict_get(kwargs, kw);  // borrowed
      if (v == nullptr) return nullptr;
      tail.push_back(static_cast<char>(len));  // compact.kwarg_key(name)
      tail.append(raw, static_cast<size_t>(len));
      PyObject* part = nullptr;
      const int r = encode_arg(v, kind, by_type, &rt, &part, tail);
      if (r != 0) return nullptr;
      Ref owned(part);
      PyObject* pair = PyTuple_Pack(2, kw, part);
      if (pair == nullptr) return nullptr;
      PyTuple_SET_ITEM(key.p, nargs + 1 + i, pair);
    }
  }
  if (rt == nullptr) return nullptr;

  // run_remote's checks, inline: no recorder (a capture records `Op`s), room for op ids, no held-back empties
  {
    Ref rec(get_attr(rt, s_recorders));
    if (rec.p == nullptr) return nullptr;
    const int t = truthy(rec.p);
    if (t != 0) return nullptr;
    Ref ids(get_attr(rt, s_op_ids));
    if (ids.p == nullptr) return nullptr;
    const Py_ssize_t n = PyObject_Length(ids.p);
    if (n < 0 || n >= g_max_op_ids) return nullptr;
    Ref pend(get_attr(rt, s_pending));
    if (pend.p == nullptr) return nullptr;
    if (truthy(pend.p) != 0) return nullptr;
    Ref closed(get_attr(rt, s_closed));  // a detached device: the Python path raises DeviceLost
    if (closed.p == nullptr) return nullptr;
    if (truthy(closed.p) != 0) return nullptr;
  }
  Ref entries(get_attr(g_cache, s_entries));
  if (entries.p == nullptr || !PyDict_Check(entries.p)) return nullptr;
  PyObject* outs = PyDict_GetItemWithError(entries.p, key.p);  // borrowed
  if (outs == nullptr) return nullptr;  // a miss (or an unhashable key: the Python path says so)
  Py_INCREF(outs);
  Ref outs_ref(outs);

  Ref device(get_attr(rt, s_device));
  Ref base(device.p ? get_attr(rt, s_handle_base) : nullptr);
  Ref counter(base.p ? get_attr(rt, s_handle_count) : nullptr);
  if (counter.p == nullptr) return nullptr;
  Ref one(get_attr(outs, s_one));
  if (one.p == nullptr) return nullptr;

  std::string body;
  Ref result;
  if (one.p != Py_None) {  // one new tensor: most ops
    if (!PyTuple_Check(one.p) || PyTuple_GET_SIZE(one.p) != 5) return nullptr;
    // every check is done: from here on, side effects (run_remote's, in its order)
    if (bump_hits() < 0) return nullptr;
    Ref h(new_handle(base.p, counter.p));
    if (h.p == nullptr) return nullptr;
    const uint64_t hv = as_u64(h.p);
    if (hv == static_cast<uint64_t>(-1) && PyErr_Occurred()) return nullptr;
    PyObject* o = one.p;
    result.p = new_wrapper(g_remote_type, device.p, rt, h.p, PyTuple_GET_ITEM(o, 0), PyTuple_GET_ITEM(o, 1), PyTuple_GET_ITEM(o, 2),
                            PyTuple_GET_ITEM(o, 3), PyTuple_GET_ITEM(o, 4), nullptr);
    if (result.p == nullptr) return nullptr;
    body.reserve(9 + tail.size());
    put_u64(body, 1, hv);
  } else {  // several outputs, None outputs, written arguments returned (in-place ops)
    Ref metas(get_attr(outs, s_metas));
    Ref wrapper(metas.p ? get_attr(outs, s_wrapper) : nullptr);
    Ref spec(wrapper.p ? get_attr(outs, s_spec) : nullptr);
    Ref values(spec.p ? get_attr(outs, s_values) : nullptr);
    if (values.p == nullptr) return nullptr;
    if (!PyTuple_Check(metas.p) || !PyTuple_Check(wrapper.p) || !PyTuple_Check(values.p)) return nullptr;
    if (PyTuple_GET_SIZE(values.p) != 0) return nullptr;  // sizes as outputs (meta.SHAPE_INTS): the Python path
    const Py_ssize_t n = PyTuple_GET_SIZE(metas.p);
    if (n == 0 || n > g_max_outputs || PyTuple_GET_SIZE(wrapper.p) != n) return nullptr;
    int shape_kind = 0;  // 0: one output (spec None), 1: a flat tuple, 2: a flat list
    if (spec.p != Py_None) {
      Ref ft(get_attr(outs, s_flat_tuple));
      Ref fl(ft.p ? get_attr(outs, s_flat_list) : nullptr);
      if (fl.p == nullptr) return nullptr;
      if (ft.p == Py_True) {
        shape_kind = 1;
      } else if (fl.p == Py_True) {
        shape_kind = 2;
      } else {
        return nullptr;  // a nested result: the Python path's pytree
      }
    } else if (n != 1) {
      return nullptr;
    }
    const Py_ssize_t nalias = PyTuple_GET_SIZE(alias);
    // The written arguments an op returns: positional, remote (encoded above) and with the metadata the meta kernel
    // gave (so that run_remote's `_fix_metadata` has nothing to fix: only values are written, `Schema.reshapes`)
    for (Py_ssize_t i = 0; i < n && i < nalias; i++) {
      const long at = PyLong_AsLong(PyTuple_GET_ITEM(alias, i));
      if (at == -2) continue;
      if (at < 0 || at >= nargs) return nullptr;
      PyObject* arg = PyTuple_GET_ITEM(args, at);
      PyObject* m = PyTuple_GET_ITEM(metas.p, i);
      if (Py_TYPE(arg) != reinterpret_cast<PyTypeObject*>(g_remote_type) || m == Py_None) return nullptr;
      PyObject* ak = PyTuple_GET_ITEM(key.p, at + 1);  // the argument's _gp_key
      const int same = PyObject_RichCompareBool(ak, m, Py_EQ);
      if (same != 1) return nullptr;  // an error (set) or a metadata change: the Python path
    }
    for (Py_ssize_t i = 0; i < n; i++) {  // each new output's meta and wrapper arguments as meta.Outputs has them
      PyObject* m = PyTuple_GET_ITEM(metas.p, i);
      PyObject* w = PyTuple_GET_ITEM(wrapper.p, i);
      if (i < nalias && PyLong_AsLong(PyTuple_GET_ITEM(alias, i)) != -2) continue;
      if (m != Py_None && (!PyTuple_Check(m) || PyTuple_GET_SIZE(m) != 4 || !PyTuple_Check(w) ||
                           PyTuple_GET_SIZE(w) != 2)) {
        return nullptr;
      }
    }
    // every check is done: side effects from here on
    if (bump_hits() < 0) return nullptr;
    Ref results(PyList_New(n));
    if (results.p == nullptr) return nullptr;
    body.reserve(1 + 8 * n + tail.size());
    body.push_back(static_cast<char>(n));
    for (Py_ssize_t i = 0; i < n; i++) {
      const long at = i < nalias ? PyLong_AsLong(PyTuple_GET_ITEM(alias, i)) : -2;
      PyObject* m = PyTuple_GET_ITEM(metas.p, i);
      uint64_t hv = 0;
      PyObject* r;
      if (at != -2) {
        r = PyTuple_GET_ITEM(args, at);
        Py_INCREF(r);
      } else if (m == Py_None) {
        r = Py_None;
        Py_INCREF(r);
      } else {
        Ref h(new_handle(base.p, counter.p));
        if (h.p == nullptr) return nullptr;
        hv = as_u64(h.p);
        if (hv == static_cast<uint64_t>(-1) && PyErr_Occurred()) return nullptr;
        PyObject* w = PyTuple_GET_ITEM(wrapper.p, i);
        r = new_wrapper(g_remote_type, device.p, rt, h.p, m, PyTuple_GET_ITEM(m, 0), PyTuple_GET_ITEM(w, 0),
                        PyTuple_GET_ITEM(w, 1), PyTuple_GET_ITEM(m, 3), nullptr);
        if (r == nullptr) return nullptr;
      }
      PyList_SET_ITEM(results.p, i, r);
      body.append(reinterpret_cast<const char*>(&hv), 8);
    }
    if (shape_kind == 0) {
      result.p = PyList_GET_ITEM(results.p, 0);
      Py_INCREF(result.p);
    } else if (shape_kind == 1) {
      result.p = PyList_AsTuple(results.p);
      if (result.p == nullptr) return nullptr;
    } else {
      result.p = results.release();
    }
  }
  body += tail;
  if (send_record(rt, name, body) < 0) return nullptr;
  if (spend_room(rt, outs) < 0) return nullptr;
  return result.release();
}

// tensor.wrapper_args: (strides, storage offset) for `_make_wrapper_subclass`, None where torch's default is the same
// (contiguous strides, offset 0). A new reference to a 2-tuple, or nullptr (an error set, or none: not this path's).
PyObject* wrapper_args(PyObject* shape, PyObject* stride, PyObject* offset) {
  if (!PyTuple_Check(shape) || !PyTuple_Check(stride) || !PyLong_Check(offset)) return nullptr;
  const int nonzero = PyObject_IsTrue(offset);
  if (nonzero < 0) return nullptr;
  if (nonzero) return PyTuple_Pack(2, stride, offset);
  const Py_ssize_t n = PyTuple_GET_SIZE(shape);
  if (PyTuple_GET_SIZE(stride) != n) return PyTuple_Pack(2, stride, Py_None);
  bool contiguous = true;
  long long expect = 1;
  for (Py_ssize_t i = n - 1; i >= 0; i--) {
    const long long st = PyLong_AsLongLong(PyTuple_GET_ITEM(stride, i));
    const long long sz = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, i));
    if (PyErr_Occurred()) return nullptr;
    if (st != expect) {
      contiguous = false;
      break;
    }
    expect *= sz > 1 ? sz : 1;
  }
  return PyTuple_Pack(2, contiguous ? Py_None : stride, Py_None);
}

// A wrapper of type `type` with its attributes (tensor.wrap / transfer._lazy_view: `view` non-null for a lazy view).
PyObject* new_wrapper(PyObject* type, PyObject* rt_device, PyObject* rt, PyObject* handle, PyObject* m, PyObject* shape,
                      PyObject* strides, PyObject* offset, PyObject* dtype, PyObject* view) {
  PyObject* argv[] = {type, shape, strides, offset, Py_None, dtype, g_strided, rt_device};
  Ref t(PyObject_Vectorcall(g_make_wrapper, argv, 8, nullptr));
  if (t.p == nullptr) return nullptr;
  PyObject** dp = _PyObject_GetDictPtr(t.p);
  if (dp == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "gpupool: a RemoteTensor without __dict__");
    return nullptr;
  }
  if (*dp == nullptr) {
    *dp = PyDict_New();
    if (*dp == nullptr) return nullptr;
  }
  if (PyDict_SetItem(*dp, s_gp_rt, rt) < 0 || PyDict_SetItem(*dp, s_gp_h, handle) < 0 ||
      PyDict_SetItem(*dp, s_gp_key, m) < 0 || (view != nullptr && PyDict_SetItem(*dp, s_gp_v, view) < 0)) {
    return nullptr;
  }
  return t.release();
}

// A lock type's acquire and release, looked up once per type where no later lookup can differ: a type nobody can
// change (Py_TPFLAGS_IMMUTABLETYPE) whose instances have no __dict__ (threading.RLock's and Lock's: `_thread.RLock`,
// `_thread.lock`). lock.acquire() then skips the method lookup (~120 instructions of ~700, three pairs an op).
struct LockMethods {
  PyTypeObject* type = nullptr;
  PyObject* acquire = nullptr;  // the type's method descriptors (owned)
  PyObject* release = nullptr;
};
LockMethods g_lock_methods[2];

// The cached methods of `lock`'s type, nullptr for a type whose methods are looked up per call (an error is never set).
const LockMethods* lock_methods(PyObject* lock) {
  PyTypeObject* t = Py_TYPE(lock);
  for (const LockMethods& m : g_lock_methods) {
    if (m.type == t) return &m;
  }
  if (!PyType_HasFeature(t, Py_TPFLAGS_IMMUTABLETYPE) || t->tp_dictoffset != 0) return nullptr;
  for (LockMethods& m : g_lock_methods) {
    if (m.type != nullptr) continue;
    PyObject* acquire = _PyType_Lookup(t, s_acquire);  // borrowed
    PyObject* release = _PyType_Lookup(t, s_release);
    if (acquire == nullptr || release == nullptr || !PyType_HasFeature(Py_TYPE(acquire), Py_TPFLAGS_METHOD_DESCRIPTOR) ||
        !PyType_HasFeature(Py_TYPE(release), Py_TPFLAGS_METHOD_DESCRIPTOR)) {
      return nullptr;
    }
    Py_INCREF(t), Py_INCREF(acquire), Py_INCREF(release);
    m.type = t, m.acquire = acquire, m.release = release;
    return &m;
  }
  return nullptr;  // (more than two lock types: the others are looked up per call)
}

// lock.acquire() (a threading lock: RLock's and Lock's are C methods). False with an error set on failure.
bool lock_acquire(PyObject* lock) {
  const LockMethods* m = lock_methods(lock);
  Ref got(m != nullptr ? PyObject_Vectorcall(m->acquire, &lock, 1, nullptr) : PyObject_CallMethodNoArgs(lock, s_acquire));
  return got.p != nullptr;
}

// lock.release(), whatever happened while it was held: an error already set stays set. -1 if the release failed.
int lock_release(PyObject* lock) {
  const LockMethods* m = lock_methods(lock);
  if (!PyErr_Occurred()) {  // the usual case: no error to keep aside (PyErr_Fetch and Restore: ~50 instructions)
    Ref done(m != nullptr ? PyObject_Vectorcall(m->release, &lock, 1, nullptr)
                          : PyObject_CallMethodNoArgs(lock, s_release));
    return done.p == nullptr ? -1 : 0;
  }
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  Ref done(m != nullptr ? PyObject_Vectorcall(m->release, &lock, 1, nullptr) : PyObject_CallMethodNoArgs(lock, s_release));
  if (done.p == nullptr) {
    Py_XDECREF(type), Py_XDECREF(value), Py_XDECREF(tb);
    return -1;
  }
  PyErr_Restore(type, value, tb);
  return 0;
}

// rt.share(handle): one more tensor holds it. DeviceRuntime.share inline: `shared[handle] += 1` under the runtime's
// lock (a tensor dying on another thread changes `shared` under it: runtime.release).
int share(PyObject* rt, PyObject* handle) {
  Ref lock(get_attr(rt, s_lock));
  if (lock.p == nullptr || !lock_acquire(lock.p)) return -1;
  int rc = -1;
  {
    Ref shared(get_attr(rt, s_shared));
    if (shared.p != nullptr && PyDict_CheckExact(shared.p)) {
      PyObject* n = PyDict_GetItemWithError(shared.p, handle);  // borrowed
      if (n != nullptr || !PyErr_Occurred()) {
        Ref more(n != nullptr ? PyNumber_Add(n, g_one) : (Py_INCREF(g_one), g_one));
        if (more.p != nullptr) rc = PyDict_SetItem(shared.p, handle, more.p);
      }
    } else if (shared.p != nullptr) {
      PyErr_SetString(PyExc_TypeError, "gpupool: DeviceRuntime.shared is not a dict");
    }
  }
  return lock_release(lock.p) < 0 ? -1 : rc;
}

// The first branch of runtime.DeviceRuntime.release's locked part, inline: a handle other tensors still hold
// (`shared`: a detach, an alias, a view) loses one holder. 1: done; 0: not that case (the method does the rest,
// taking the lock again: as if it had been called a moment later); -1: an error is set.
int unshare(PyObject* rt, PyObject* handle) {
  Ref lock(get_attr(rt, s_lock));
  if (lock.p == nullptr || !lock_acquire(lock.p)) return -1;
  int rc = 0;
  {
    Ref shared(get_attr(rt, s_shared));
    PyObject* extra = shared.p != nullptr && PyDict_CheckExact(shared.p) ? PyDict_GetItemWithError(shared.p, handle)
                                                                         : nullptr;  // borrowed
    if (shared.p == nullptr || PyErr_Occurred()) {
      rc = -1;
    } else if (extra != nullptr && PyLong_CheckExact(extra)) {  // `if extra:` (a count, >= 1 while it is there)
      const long long n = PyLong_AsLongLong(extra);
      if (n == -1 && PyErr_Occurred()) {
        rc = -1;
      } else if (n == 1) {
        rc = PyDict_DelItem(shared.p, handle) < 0 ? -1 : 1;
      } else if (n > 1) {
        Ref less(PyLong_FromLongLong(n - 1));
        rc = less.p == nullptr || PyDict_SetItem(shared.p, handle, less.p) < 0 ? -1 : 1;
      }
    }
  }
  return lock_release(lock.p) < 0 ? -1 : rc;
}

// Whether the runtime has no recorder, no held-back empty and is open: 1 yes, 0 no, -1 an error.
int quiet(PyObject* rt) {
  static PyObject** const names[] = {&s_recorders, &s_pending, &s_closed};
  for (PyObject** name : names) {
    Ref v(get_attr(rt, *name));
    if (v.p == nullptr) return -1;
    const int t = PyObject_IsTrue(v.p);
    if (t != 0) return t < 0 ? -1 : 0;
  }
  return 1;
}

// Whether handle `h` is one a captured step's graph writes (`rt.kept`: its aliases are noted, transfer.py `_keep`):
// 1 yes (the Python path), 0 no, -1 an error.
int kept_handle(PyObject* rt, PyObject* h) {
  Ref kept(get_attr(rt, s_kept));
  if (kept.p == nullptr) return -1;
  if (!PyDict_CheckExact(kept.p) || PyDict_GET_SIZE(kept.p) == 0) return 0;
  return PyDict_Contains(kept.p, h);
}

// transfer._alias (detach, alias): a new tensor sharing the daemon tensor, or a lazy view of the same one.
PyObject* fast_alias(PyObject* args) {
  if (PyTuple_GET_SIZE(args) != 1) return nullptr;
  Remote r;
  if (remote_fields(PyTuple_GET_ITEM(args, 0), r) != 0) return nullptr;  // an error (set), or the Python path's
  PyObject *rt = r.rt, *h = r.h, *key = r.key, *view = r.view;
  if (!PyTuple_Check(key) || PyTuple_GET_SIZE(key) != 4) return nullptr;
  Ref keep_rt(rt), keep_h(h), keep_key(key), keep_view(view);  // the tensor's dict may change in the calls below
  Py_INCREF(rt), Py_INCREF(h), Py_INCREF(key), Py_XINCREF(view);
  const int q = quiet(rt);  // (_alias sends held-back empties first: that, and recorders' release hooks, in Python)
  if (q <= 0 || kept_handle(rt, h) != 0) return nullptr;
  Ref device(get_attr(rt, s_device));
  if (device.p == nullptr) return nullptr;
  Ref wargs(wrapper_args(PyTuple_GET_ITEM(key, 0), PyTuple_GET_ITEM(key, 1), PyTuple_GET_ITEM(key, 2)));
  if (wargs.p == nullptr) return nullptr;
  if (share(rt, h) < 0) return nullptr;
  return new_wrapper(view ? g_view_type : g_remote_type, device.p, rt, h, key, PyTuple_GET_ITEM(key, 0),
                     PyTuple_GET_ITEM(wargs.p, 0), PyTuple_GET_ITEM(wargs.p, 1), PyTuple_GET_ITEM(key, 3), view);
}

// transfer._view: a view op as a lazy view of its input's daemon tensor (no record), its output from the meta cache.
PyObject* fast_view(PyObject* sch, PyObject* args) {
  const Py_ssize_t nargs = PyTuple_GET_SIZE(args);
  if (nargs < 1 || nargs > 16) return nullptr;
  Remote r;
  if (remote_fields(PyTuple_GET_ITEM(args, 0), r) != 0) return nullptr;  // an error (set), or the Python path's
  PyObject *rt = r.rt, *base = r.h, *tkey = r.key;
  Ref keep_rt(rt), keep_base(base);
  Py_INCREF(rt), Py_INCREF(base);
  Ref key(PyTuple_New(nargs + 1));
  if (key.p == nullptr) return nullptr;
  Py_INCREF(sch);
  PyTuple_SET_ITEM(key.p, 0, sch);
  Py_INCREF(tkey);
  PyTuple_SET_ITEM(key.p, 1, tkey);
  for (Py_ssize_t i = 1; i < nargs; i++) {  // ints, bools, None, lists or tuples of exact ints
    PyObject* a = PyTuple_GET_ITEM(args, i);
    PyTypeObject* ta = Py_TYPE(a);
    PyObject* part;
    if (ta == &PyList_Type || ta == &PyTuple_Type) {
      const Py_ssize_t n = PySequence_Fast_GET_SIZE(a);
      PyObject** items = PySequence_Fast_ITEMS(a);
      for (Py_ssize_t j = 0; j < n; j++) {
        if (Py_TYPE(items[j]) != &PyLong_Type) return nullptr;
      }
      part = ta == &PyTuple_Type ? (Py_INCREF(a), a) : PyList_AsTuple(a);
      if (part == nullptr) return nullptr;
    } else if (ta == &PyLong_Type || ta == &PyBool_Type || a == Py_None) {
      Py_INCREF(a);
      part = a;
    } else {
      return nullptr;
    }
    PyTuple_SET_ITEM(key.p, i + 1, part);
  }
  const int q = quiet(rt);
  if (q <= 0 || kept_handle(rt, base) != 0) return nullptr;
  Ref entries(get_attr(g_cache, s_entries));
  if (entries.p == nullptr || !PyDict_Check(entries.p)) return nullptr;
  PyObject* outs = PyDict_GetItemWithError(entries.p, key.p);
  if (outs == nullptr) return nullptr;
  Ref keep_outs(outs);
  Py_INCREF(outs);
  Ref one(get_attr(outs, s_one));
  if (one.p == nullptr || one.p == Py_None || !PyTuple_Check(one.p) || PyTuple_GET_SIZE(one.p) != 5) return nullptr;
  PyObject* m = PyTuple_GET_ITEM(one.p, 0);
  PyObject* geometry = PyDict_GetItemWithError(g_geometry, m);
  if (geometry == nullptr || !PyBytes_CheckExact(geometry)) return nullptr;
  const uint64_t hv = as_u64(base);
  if (hv == static_cast<uint64_t>(-1) && PyErr_Occurred()) return nullptr;
  std::string arg;
  put_u64(arg, tVIEW, hv);
  arg.append(PyBytes_AS_STRING(geometry), static_cast<size_t>(PyBytes_GET_SIZE(geometry)));
  Ref view(PyBytes_FromStringAndSize(arg.data(), static_cast<Py_ssize_t>(arg.size())));
  Ref device(view.p ? get_attr(rt, s_device) : nullptr);
  if (device.p == nullptr) return nullptr;
  // every check is done: side effects from here on (the meta-cache hit, the share), as _view's
  if (bump_hits() < 0 || share(rt, base) < 0) return nullptr;
  return new_wrapper(g_view_type, device.p, rt, base, m, PyTuple_GET_ITEM(one.p, 1), PyTuple_GET_ITEM(one.p, 2),
                     PyTuple_GET_ITEM(one.p, 3), PyTuple_GET_ITEM(one.p, 4), view.p);
}

// rt.<name> += delta. Where the attribute is in the instance's __dict__ (get_attr's and set_attr's case), one lookup
// there and one store: get_attr then set_attr looked it up twice (~150 instructions, ~4 an op).
int add_attr(PyObject* obj, PyObject* name, PyObject* delta) {
  PyObject** dp = _PyObject_GetDictPtr(obj);
  if (dp != nullptr && *dp != nullptr) {
    PyObject* v = dict_get(*dp, name);
    if (v != nullptr) {
      Ref keep(v);  // held across the addition (an int's runs no Python code; another type's might)
      Py_INCREF(v);
      Ref more(PyNumber_Add(v, delta));
      if (more.p == nullptr) return -1;
      return PyDict_SetItem(*dp, name, more.p);
    }
    if (PyErr_Occurred()) return -1;
  }
  Ref v(PyObject_GetAttr(obj, name));
  if (v.p == nullptr) return -1;
  Ref more(PyNumber_Add(v.p, delta));
  if (more.p == nullptr) return -1;
  return PyObject_SetAttr(obj, name, more.p);
}

// A Python int attribute as a C integer; -1 with an error set on failure. (PyLong_AsLong: the same 64 bits on an LP64
// host, without PyLong_AsLongLong's byte-array conversion of a multi-digit int.)
long long int_attr(PyObject* obj, PyObject* name) {
  Ref v(get_attr(obj, name));
  if (v.p == nullptr) return -1;
  return PyLong_AsLong(v.p);
}

// protocol.varint(v) into out (room for 10 bytes); its length
size_t put_varint(char* out, uint64_t v) {
  size_t i = 0;
  while (v > 0x7F) {
    out[i++] = static_cast<char>((v & 0x7F) | 0x80);
    v >>= 7;
  }
  out[i++] = static_cast<char>(v);
  return i;
}

PyObject* g_session_eager = nullptr;  // Session.eager_op as `setup_session` found it (a patched class: its method)

// client/session.py Session.eager_op(head + body), its usual case inline: a record (of any length) joins a batch of
// eager records that already holds some (`_eager`: the frame's protobuf part is sealed before the first) and does not fill
// the frame. 1: queued; 0: not that case (the caller calls the method, which does every case); -1: an error is set.
int session_append(PyObject* session, PyObject* head, const std::string& body) {
  if (g_session_type == nullptr || Py_TYPE(session) != reinterpret_cast<PyTypeObject*>(g_session_type)) return 0;
  PyObject* method = dict_get(reinterpret_cast<PyTypeObject*>(g_session_type)->tp_dict, s_eager_op);
  if (method != g_session_eager) return PyErr_Occurred() ? -1 : 0;
  PyObject** dp = _PyObject_GetDictPtr(session);
  if (dp == nullptr || *dp == nullptr) return 0;
  PyObject* d = *dp;
  PyObject* own = dict_get(d, s_eager_op);  // an instance's own eager_op (a test's spy)
  if (own != nullptr || PyErr_Occurred()) return own != nullptr ? 0 : -1;
  const Py_ssize_t nhead = PyBytes_GET_SIZE(head);
  const Py_ssize_t n = nhead + static_cast<Py_ssize_t>(body.size());
  // _EAGER_SHORT[n] for n < 128; session.eager_command's prefix for a longer record (the foreach ops' records of
  // Adam: ~3 a step of the tiny MLP went through the method until round 47), byte for byte
  char long_prefix[24];
  const char* pre;
  Py_ssize_t np;
  if (n < PyTuple_GET_SIZE(g_eager_short)) {
    PyObject* prefix = PyTuple_GET_ITEM(g_eager_short, n);
    pre = PyBytes_AS_STRING(prefix);
    np = PyBytes_GET_SIZE(prefix);
  } else {
    char inner[12] = {'\xf2', '\x01'};  // _EAGER_TAG + varint(n)
    const size_t ninner = 2 + put_varint(inner + 2, static_cast<uint64_t>(n));
    long_prefix[0] = '\x0a';  // b"\x0a" + varint(len(inner) + n) + inner
    const size_t nlen = put_varint(long_prefix + 1, static_cast<uint64_t>(ninner) + static_cast<uint64_t>(n));
    std::memcpy(long_prefix + 1 + nlen, inner, ninner);
    pre = long_prefix;
    np = static_cast<Py_ssize_t>(1 + nlen + ninner);
  }
  const long long max_commands = int_attr(g_session_mod, s_max_batch);
  if (max_commands == -1 && PyErr_Occurred()) return -1;
  Ref cmd(PyBytes_FromStringAndSize(nullptr, np + n));  // the prefix + record
  if (cmd.p == nullptr) return -1;
  char* out = PyBytes_AS_STRING(cmd.p);
  std::memcpy(out, pre, static_cast<size_t>(np));
  std::memcpy(out + np, PyBytes_AS_STRING(head), static_cast<size_t>(nhead));
  std::memcpy(out + np + nhead, body.data(), body.size());
  Ref lock(get_attr(session, s_lock));
  if (lock.p == nullptr || !lock_acquire(lock.p)) return -1;
  int rc = 0;
  {
    PyObject* eager = dict_get(d, s_eager);  // read under the lock: `_seal` replaces the list
    PyObject* sealed = eager != nullptr ? dict_get(d, s_sealed_count) : nullptr;
    if (PyErr_Occurred()) {
      rc = -1;
    } else if (sealed != nullptr && PyList_CheckExact(eager) && PyList_GET_SIZE(eager) > 0 &&
               PyLong_CheckExact(sealed)) {
      const long long count = PyLong_AsLongLong(sealed);
      if (count == -1 && PyErr_Occurred()) {
        rc = -1;
      } else if (PyList_GET_SIZE(eager) + 1 + count < max_commands) {
        rc = PyList_Append(eager, cmd.p) < 0 ? -1 : 1;
      }
    }
  }
  return lock_release(lock.p) < 0 ? -1 : rc;
}

// runtime.DeviceRuntime.eager_op(name, body), its usual case inline: the op's id is defined, no batch of frees is due
// and the frame does not fill; any other case calls the method itself. Returns 0, or -1 with an error set.
int send_record(PyObject* rt, PyObject* name, const std::string& body) {
  bool inline_ok = true;
  PyObject** rdp = _PyObject_GetDictPtr(rt);
  if (rdp != nullptr && *rdp != nullptr) {  // an `eager_op` of the instance's own (a test's spy): call it
    PyObject* own = dict_get(*rdp, s_eager_op);
    if (own != nullptr) {
      inline_ok = false;
    } else if (PyErr_Occurred()) {
      return -1;
    }
  }
  Ref heads(get_attr(rt, s_heads));
  if (heads.p != nullptr && !PyDict_Check(heads.p)) {  // (-1 always with an error set: the op's side effects are done)
    PyErr_SetString(PyExc_TypeError, "gpupool: DeviceRuntime._heads is not a dict");
    return -1;
  }
  if (heads.p == nullptr) return -1;
  PyObject* head = dict_get(heads.p, name);  // borrowed
  if (head == nullptr && PyErr_Occurred()) return -1;
  if (head == nullptr || !PyBytes_CheckExact(head)) {
    inline_ok = false;  // the first record of this name defines its id (under the runtime's lock)
  }
  if (inline_ok) {
    Ref dead(get_attr(rt, s_dead));
    if (dead.p == nullptr) return -1;
    const Py_ssize_t ndead = PyObject_Length(dead.p);
    if (ndead < 0) return -1;
    if (ndead > 0) {
      const long long batch = int_attr(g_runtime, s_free_batch);
      const long long bytes = batch < 0 ? -1 : int_attr(rt, s_dead_bytes);
      const long long limit = bytes < 0 ? -1 : int_attr(rt, s_free_bytes);
      if (PyErr_Occurred()) return -1;
      if (ndead >= batch || bytes >= limit) inline_ok = false;  // a Free goes out first: the method does it
    }
  }
  if (inline_ok) {
    const long long unflushed = int_attr(rt, s_unflushed);
    const long long flush_ops = unflushed < 0 ? -1 : int_attr(g_runtime, s_flush_ops);
    if (PyErr_Occurred()) return -1;
    if (unflushed + 1 >= flush_ops) inline_ok = false;  // the frame goes out after this record: the method
  }
  if (!inline_ok) {
    Ref raw(PyBytes_FromStringAndSize(body.data(), static_cast<Py_ssize_t>(body.size())));
    if (raw.p == nullptr) return -1;
    PyObject* argv[] = {rt, name, raw.p};
    Ref done(PyObject_VectorcallMethod(s_eager_op, argv, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, nullptr));
    return done.p == nullptr ? -1 : 0;
  }
  if (add_attr(rt, s_ops_sent, g_one) < 0) return -1;
  Ref session(get_attr(rt, s_session));
  if (session.p == nullptr) return -1;
  const int queued = session_append(session.p, head, body);
  if (queued < 0) return -1;
  if (queued > 0) return add_attr(rt, s_unflushed, g_one);
  const Py_ssize_t nhead = PyBytes_GET_SIZE(head);
  Ref record(PyBytes_FromStringAndSize(nullptr, nhead + static_cast<Py_ssize_t>(body.size())));
  if (record.p == nullptr) return -1;
  std::memcpy(PyBytes_AS_STRING(record.p), PyBytes_AS_STRING(head), static_cast<size_t>(nhead));
  std::memcpy(PyBytes_AS_STRING(record.p) + nhead, body.data(), body.size());
  PyObject* argv[] = {session.p, record.p};
  Ref done(PyObject_VectorcallMethod(s_eager_op, argv, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, nullptr));
  if (done.p == nullptr) {  // the method's `except Exception as exc: self._raise(exc)`
    if (!PyErr_ExceptionMatches(PyExc_Exception)) return -1;
    PyObject *type, *exc, *tb;
    PyErr_Fetch(&type, &exc, &tb);
    PyErr_NormalizeException(&type, &exc, &tb);
    if (tb != nullptr) PyException_SetTraceback(exc, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    PyObject* rargv[] = {rt, exc};
    Ref raised(PyObject_VectorcallMethod(s_raise, rargv, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, nullptr));
    Py_DECREF(exc);
    if (raised.p != nullptr) {
      PyErr_SetString(PyExc_RuntimeError, "gpupool: DeviceRuntime._raise returned");
    }
    return -1;
  }
  return add_attr(rt, s_unflushed, g_one);
}

// dtype.itemsize, kept per torch.dtype (one object per dtype for the process, its itemsize fixed): the attribute
// lookup through the type costs ~300 instructions on every death. -1 with an error set on failure.
struct ItemSize {
  PyObject* dtype;  // owned
  long long size;
};
ItemSize g_itemsizes[32];
size_t g_nitemsizes = 0;

long long itemsize(PyObject* dtype) {
  for (size_t i = 0; i < g_nitemsizes; i++) {
    if (g_itemsizes[i].dtype == dtype) return g_itemsizes[i].size;
  }
  const long long size = int_attr(dtype, s_itemsize);
  if (size == -1 && PyErr_Occurred()) return -1;
  PyObject* dtype_type = g_const_types != nullptr ? PyTuple_GET_ITEM(g_const_types, 0) : nullptr;  // torch.dtype
  if (Py_TYPE(dtype) == reinterpret_cast<PyTypeObject*>(dtype_type) && g_nitemsizes < 32) {
    Py_INCREF(dtype);
    g_itemsizes[g_nitemsizes++] = ItemSize{dtype, size};
  }
  return size;
}

// RemoteTensor.__del__ (tensor.py), the same steps: the handle of a dying tensor goes to its runtime's batch of
// frees, with its bytes from its key; the lock-free case inline, any other through rt.release.
PyObject* remote_del(PyObject* self, PyObject* /*unused*/) {
  PyObject** dp = _PyObject_GetDictPtr(self);
  if (dp == nullptr || *dp == nullptr) Py_RETURN_NONE;
  PyObject* d = *dp;
  PyObject* h = dict_get(d, s_gp_h);
  if (h == nullptr) {
    if (PyErr_Occurred()) return nullptr;
    Py_RETURN_NONE;
  }
  const int live = PyObject_IsTrue(h);
  if (live <= 0) return live < 0 ? nullptr : (Py_INCREF(Py_None), Py_None);
  Ref keep_h(h);
  Py_INCREF(h);
  long long nbytes = 0;
  PyObject* key = dict_get(d, s_gp_key);
  if (key == nullptr && PyErr_Occurred()) return nullptr;
  if (key != nullptr && key != Py_None) {
    if (!PyTuple_Check(key) || PyTuple_GET_SIZE(key) != 4 || !PyTuple_Check(PyTuple_GET_ITEM(key, 0))) {
      PyErr_SetString(PyExc_TypeError, "gpupool: a remote tensor's _gp_key is not (shape, stride, offset, dtype)");
      return nullptr;
    }
    PyObject* shape = PyTuple_GET_ITEM(key, 0);
    long long n = 1;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(shape); i++) {
      n *= PyLong_AsLongLong(PyTuple_GET_ITEM(shape, i));
    }
    const long long size = itemsize(PyTuple_GET_ITEM(key, 3));
    if (PyErr_Occurred()) return nullptr;
    nbytes = n * size;
  }
  PyObject* rt = dict_get(d, s_gp_rt);
  if (rt == nullptr) {
    if (!PyErr_Occurred()) PyErr_SetObject(PyExc_KeyError, s_gp_rt);
    return nullptr;
  }
  Ref keep_rt(rt);
  Py_INCREF(rt);
  Ref nb(PyLong_FromLongLong(nbytes));
  if (nb.p == nullptr) return nullptr;
  bool plain = true;  // `h not in rt.shared and not (rt.watched or rt.pending or rt.closed or rt.recorders)`
  {
    Ref shared(get_attr(rt, s_shared));
    if (shared.p == nullptr) return nullptr;
    const int in = PySequence_Contains(shared.p, h);
    if (in < 0) return nullptr;
    plain = in == 0;
    static PyObject** const names[] = {&s_watched, &s_pending, &s_closed, &s_recorders};
    for (PyObject** name : names) {
      if (!plain) break;
      Ref v(get_attr(rt, *name));
      if (v.p == nullptr) return nullptr;
      const int t = PyObject_IsTrue(v.p);
      if (t < 0) return nullptr;
      plain = t == 0;
    }
  }
  if (plain) {
    Ref dead(get_attr(rt, s_dead));
    if (dead.p == nullptr) return nullptr;
    if (PyList_CheckExact(dead.p) ? PyList_Append(dead.p, h) < 0 : true) {
      if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "gpupool: DeviceRuntime._dead is not a list");
      return nullptr;
    }
    if (add_attr(rt, s_dead_bytes, nb.p) < 0) return nullptr;
    Py_RETURN_NONE;
  }
  PyObject** rdp = _PyObject_GetDictPtr(rt);  // a `release` of the instance's own (a test's spy): call it
  PyObject* own = rdp != nullptr && *rdp != nullptr ? dict_get(*rdp, s_release) : nullptr;
  if (own == nullptr && PyErr_Occurred()) return nullptr;
  if (own == nullptr) {
    const int done = unshare(rt, h);
    if (done < 0) return nullptr;
    if (done > 0) Py_RETURN_NONE;
  }
  PyObject* argv[] = {rt, h, nb.p};
  return PyObject_VectorcallMethod(s_release, argv, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, nullptr);
}

PyMethodDef del_def = {"__del__", remote_del, METH_NOARGS,
                       "RemoteTensor.__del__ in C (client/torch/native_ops.cpp): the handle joins the batch of frees"};

// Everything this path leaves to Python: the Python dispatcher with the call's own arguments.
PyObject* to_python(PyObject* const* a, size_t nargsf, PyObject* kwnames) {
  g_passed++;
  return PyObject_Vectorcall(g_py_dispatch, a, nargsf, kwnames);
}

// `RemoteTensor.__torch_dispatch__` (a classmethod of this function): (cls, func, types, args=(), kwargs=None).
PyObject* torch_dispatch(PyObject* /*module*/, PyObject* const* a, Py_ssize_t nargs, PyObject* kwnames) {
  if (g_py_dispatch == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "gpupool native ops: setup() was not called");
    return nullptr;
  }
  if (kwnames != nullptr || nargs < 3 || nargs > 5) return to_python(a, nargs, kwnames);
  PyObject* func = a[1];
  PyObject* args = nargs > 3 ? a[3] : nullptr;
  PyObject* kwargs = nargs > 4 ? a[4] : Py_None;
  if (args == nullptr || !PyTuple_CheckExact(args)) return to_python(a, nargs, kwnames);
  {  // Dynamo traced into here: the Python dispatcher runs the op eagerly (a graph break)
    Ref flag(get_attr(g_compiler, s_is_compiling));
    if (flag.p == nullptr) return nullptr;
    const int t = truthy(flag.p);
    if (t < 0) return nullptr;
    if (t) return to_python(a, nargs, kwnames);
  }
  if (kwargs != Py_None && !PyDict_CheckExact(kwargs)) return to_python(a, nargs, kwnames);
  Ref route(get_attr(func, s_gp_route));
  if (route.p == nullptr) {
    if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return nullptr;
    PyErr_Clear();  // not routed yet: the Python dispatcher works it out (dispatch._route)
    return to_python(a, nargs, kwnames);
  }
  if (!PyTuple_Check(route.p) || PyTuple_GET_SIZE(route.p) != 3) return to_python(a, nargs, kwnames);
  const long kind = PyLong_AsLong(PyTuple_GET_ITEM(route.p, 0));
  if (kind == -1 && PyErr_Occurred()) return nullptr;
  if (PyTuple_GET_ITEM(route.p, 2) == Py_True && g_inference_on != nullptr) {
    // A view op under torch.inference_mode goes to the Python dispatcher, which makes a normal tensor's views outside
    // it (dispatch.py `_outside_inference`): a wrapper made here would be an inference tensor, which torch's view
    // bookkeeping refuses ("Cannot set version_counter for inference tensor")
    Ref on(PyObject_CallNoArgs(g_inference_on));
    if (on.p == nullptr) return nullptr;
    if (on.p == Py_True) return to_python(a, nargs, kwnames);
  }
  if (kind != g_special) {  // plain, or another op whose Schema.fast says the C path may run it (device_plain)
    PyObject* out = fast_plain(PyTuple_GET_ITEM(route.p, 1), args, kwargs == Py_None ? nullptr : kwargs);
    if (out != nullptr) {
      g_ran++;
      return out;
    }
    if (PyErr_Occurred()) return nullptr;
  } else if (kind == g_special && (kwargs == Py_None || PyDict_GET_SIZE(kwargs) == 0)) {
    PyObject* how = PyTuple_GET_ITEM(route.p, 1);
    PyObject* out = nullptr;
    if (how == g_alias_fn) {
      out = fast_alias(args);
    } else if (how == g_view_fn) {
      Ref sch(get_attr(func, s_gp_sch));
      if (sch.p == nullptr) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return nullptr;
        PyErr_Clear();  // (dispatch._route sets both)
      } else {
        out = fast_view(sch.p, args);
      }
    }
    if (out != nullptr) {
      g_ran++;
      return out;
    }
    if (PyErr_Occurred()) return nullptr;
  }
  return to_python(a, nargs, kwnames);
}

// New references to a[0..n) in *slots[0..n) (replacing what they held): the setup functions' objects.
void keep(PyObject* const* a, PyObject** const* slots, int n) {
  for (int i = 0; i < n; i++) {
    Py_INCREF(a[i]);
    Py_XSETREF(*slots[i], a[i]);
  }
}

// Whether every item of a tuple passes `check`; false with a TypeError saying `what` if not.
bool items_are(PyObject* tuple, bool (*check)(PyObject*), const char* what) {
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(tuple); i++) {
    if (!check(PyTuple_GET_ITEM(tuple, i))) {
      PyErr_SetString(PyExc_TypeError, what);
      return false;
    }
  }
  return true;
}

PyObject* setup(PyObject* /*module*/, PyObject* const* a, Py_ssize_t nargs) {
  if (nargs != 15) {
    PyErr_SetString(PyExc_TypeError, "setup(remote_type, make_wrapper, strided, py_dispatch, compiler, cache, "
                                     "view_type, alias_fn, view_fn, geometry, max_op_ids, max_outputs, plain, "
                                     "special, runtime)");
    return nullptr;
  }
  const uint16_t probe = 1;
  if (*reinterpret_cast<const unsigned char*>(&probe) != 1) {
    PyErr_SetString(PyExc_RuntimeError, "gpupool native ops: little-endian hosts only");
    return nullptr;
  }
  if (!PyType_Check(a[0]) || !PyType_Check(a[6]) || !PyDict_Check(a[9])) {
    PyErr_SetString(PyExc_TypeError, "setup: remote_type and view_type are types, geometry a dict");
    return nullptr;
  }
  PyObject** slots[] = {&g_remote_type, &g_make_wrapper, &g_strided, &g_py_dispatch, &g_compiler,
                        &g_cache,       &g_view_type,    &g_alias_fn, &g_view_fn,    &g_geometry};
  keep(a, slots, 10);
  g_max_op_ids = PyLong_AsSsize_t(a[10]);
  g_max_outputs = PyLong_AsSsize_t(a[11]);
  g_plain = PyLong_AsLong(a[12]);
  g_special = PyLong_AsLong(a[13]);
  if (PyErr_Occurred()) return nullptr;
  Py_INCREF(a[14]);
  Py_XSETREF(g_runtime, a[14]);
  // RemoteTensor.__del__ in C: a method descriptor of the class (slot_tp_finalize calls it with the tensor)
  return PyDescr_NewMethod(reinterpret_cast<PyTypeObject*>(g_remote_type), &del_def);
}

// setup_inference(torch.is_inference_mode_enabled): view ops under inference mode go to the Python dispatcher.
PyObject* setup_inference(PyObject* /*module*/, PyObject* const* a, Py_ssize_t nargs) {
  if (nargs != 1 || !PyCallable_Check(a[0])) {
    PyErr_SetString(PyExc_TypeError, "setup_inference(torch.is_inference_mode_enabled)");
    return nullptr;
  }
  Py_INCREF(a[0]);
  Py_XSETREF(g_inference_on, a[0]);
  Py_RETURN_NONE;
}

// setup_session(Session, Session.eager_op, session module, _EAGER_SHORT): what `session_append` needs.
PyObject* setup_session(PyObject* /*module*/, PyObject* const* a, Py_ssize_t nargs) {
  if (nargs != 4 || !PyType_Check(a[0]) || !PyTuple_CheckExact(a[3])) {
    PyErr_SetString(PyExc_TypeError, "setup_session(Session, Session.eager_op, session module, tuple(_EAGER_SHORT))");
    return nullptr;
  }
  auto is_bytes = [](PyObject* o) { return PyBytes_CheckExact(o) != 0; };
  if (!items_are(a[3], is_bytes, "setup_session: the prefixes are bytes")) return nullptr;
  PyObject** slots[] = {&g_session_type, &g_session_eager, &g_session_mod, &g_eager_short};
  keep(a, slots, 4);
  Py_RETURN_NONE;
}

// setup_values(types, values): dtype, layout and memory format arguments (`input_dtype`, `memory_format`) in C too;
// `values` maps each value the wire has a code for to its bytes (compact.encode_value)
PyObject* setup_values(PyObject* /*module*/, PyObject* const* a, Py_ssize_t nargs) {
  if (nargs != 2 || !PyTuple_CheckExact(a[0]) || !PyDict_CheckExact(a[1])) {
    PyErr_SetString(PyExc_TypeError, "setup_values(tuple of types, dict of value -> bytes)");
    return nullptr;
  }
  if (!items_are(a[0], [](PyObject* o) { return PyType_Check(o) != 0; }, "setup_values: not a type")) return nullptr;
  PyObject *key, *value;
  Py_ssize_t pos = 0;
  while (PyDict_Next(a[1], &pos, &key, &value)) {
    if (!PyBytes_CheckExact(value)) {
      PyErr_SetString(PyExc_TypeError, "setup_values: the encodings are bytes");
      return nullptr;
    }
  }
  PyObject** slots[] = {&g_const_types, &g_consts};
  keep(a, slots, 2);
  Py_RETURN_NONE;
}

// torch._library.simple_registry.find_torch_dispatch_rule(op, cls), which torch calls before every
// `__torch_dispatch__` of a tensor subclass (three Python calls an op): the same lookup in C,
// `singleton._data[op.__qualname__].torch_dispatch_rules._data.get(cls)`, None where the op has no entry yet (the
// original makes an empty one first). Anything unexpected (another registry, a failing attribute) calls the original.
PyObject* find_rule(PyObject* /*module*/, PyObject* const* a, Py_ssize_t nargs, PyObject* kwnames) {
  if (g_registry == nullptr || g_find_rule == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "gpupool native ops: setup_rules() was not called");
    return nullptr;
  }
  auto original = [&]() { return PyObject_Vectorcall(g_find_rule, a, static_cast<size_t>(nargs), kwnames); };
  if (nargs != 2 || kwnames != nullptr) return original();  // keyword arguments: the original's own binding
  Ref qualname(PyObject_GetAttr(a[0], s_qualname));
  Ref registry(qualname.p != nullptr ? get_attr(g_registry, s_singleton) : nullptr);
  Ref data(registry.p != nullptr ? get_attr(registry.p, s_data) : nullptr);
  if (data.p == nullptr || !PyDict_CheckExact(data.p) || !PyUnicode_CheckExact(qualname.p)) {
    PyErr_Clear();
    return original();
  }
  PyObject* entry = dict_get(data.p, qualname.p);  // borrowed
  if (entry == nullptr) {
    if (PyErr_Occurred()) return nullptr;
    Py_RETURN_NONE;
  }
  Ref keep_entry(entry);
  Py_INCREF(entry);
  Ref holder(get_attr(entry, s_rules));
  Ref rules(holder.p != nullptr ? get_attr(holder.p, s_data) : nullptr);
  if (rules.p == nullptr || !PyDict_CheckExact(rules.p)) {
    PyErr_Clear();
    return original();
  }
  PyObject* rule = PyDict_GetItemWithError(rules.p, a[1]);  // borrowed
  if (rule == nullptr) {
    if (PyErr_Occurred()) return nullptr;
    Py_RETURN_NONE;
  }
  Py_INCREF(rule);
  return rule;
}

// setup_rules(torch._library.simple_registry, its find_torch_dispatch_rule): what `find_rule` reads and falls back to
PyObject* setup_rules(PyObject* /*module*/, PyObject* const* a, Py_ssize_t nargs) {
  if (nargs != 2 || !PyModule_Check(a[0]) || !PyCallable_Check(a[1])) {
    PyErr_SetString(PyExc_TypeError, "setup_rules(simple_registry module, find_torch_dispatch_rule)");
    return nullptr;
  }
  PyObject** slots[] = {&g_registry, &g_find_rule};
  keep(a, slots, 2);
  Py_RETURN_NONE;
}

// The native guard's gpupool_current_device (native_guard.cpp), its address given by `setup_current_device`: the
// calling thread's current device in one C call, where ctypes' call of it cost ~11k instructions (a captured step
// with CPU arguments only asks for it every replay: client/torch/capture.py `_runtime`).
using CurrentDevice = int (*)();
CurrentDevice g_current_device = nullptr;

PyObject* setup_current_device(PyObject* /*module*/, PyObject* const* a, Py_ssize_t nargs) {
  if (nargs != 1 || !PyLong_Check(a[0])) {
    PyErr_SetString(PyExc_TypeError, "setup_current_device(address of gpupool_current_device)");
    return nullptr;
  }
  void* address = PyLong_AsVoidPtr(a[0]);
  if (address == nullptr) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "setup_current_device: a null address");
    return nullptr;
  }
  g_current_device = reinterpret_cast<CurrentDevice>(address);
  Py_RETURN_NONE;
}

// The native guard's gpupool_grad_object (native_guard.cpp): a tensor's `.grad` as its Python object, ~20
// instructions where torch's getter costs ~700 (`grads_off`); set by `setup_grad_object` once it answered as the
// getter does on a probe (a tensor with a `.grad`, one without).
using GradObject = void* (*)(void*);
GradObject g_grad_object = nullptr;

// setup_grad_object(address, probe, probe_grad, bare): True, and `grads_off` reads `.grad`s through it, where it found
// `probe_grad` as `probe`'s `.grad` and none in `bare`'s.
PyObject* setup_grad_object(PyObject* /*module*/, PyObject* const* a, Py_ssize_t nargs) {
  if (nargs != 4 || !PyLong_Check(a[0])) {
    PyErr_SetString(PyExc_TypeError, "setup_grad_object(address of gpupool_grad_object, probe, probe_grad, bare)");
    return nullptr;
  }
  void* address = PyLong_AsVoidPtr(a[0]);
  if (address == nullptr) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "setup_grad_object: a null address");
    return nullptr;
  }
  const auto f = reinterpret_cast<GradObject>(address);
  if (f(a[1]) != a[2] || f(a[3]) != nullptr) Py_RETURN_FALSE;
  g_grad_object = f;
  Py_RETURN_TRUE;
}

PyObject* current_device(PyObject* /*module*/, PyObject* /*unused*/) {
  if (g_current_device == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "current_device before setup_current_device");
    return nullptr;
  }
  return PyLong_FromLong(g_current_device());
}

// bytes_at(address, n): a bytes object of the n bytes at `address` (a contiguous CPU tensor's data_ptr and nbytes,
// the caller holding the tensor): a captured step's small CPU arguments, sent by value every replay
// (client/torch/capture.py `_host_bytes`), where wire.host_bytes' ctypes call and tobytes cost ~12k instructions.
PyObject* bytes_at(PyObject* /*module*/, PyObject* const* a, Py_ssize_t nargs) {
  if (nargs != 2 || !PyLong_Check(a[0]) || !PyLong_Check(a[1])) {
    PyErr_SetString(PyExc_TypeError, "bytes_at(address, n)");
    return nullptr;
  }
  const Py_ssize_t n = PyLong_AsSsize_t(a[1]);
  if (n < 0) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bytes_at: a negative size");
    return nullptr;
  }
  if (n == 0) return PyBytes_FromStringAndSize(nullptr, 0);
  void* address = PyLong_AsVoidPtr(a[0]);
  if (address == nullptr) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bytes_at: a null address");
    return nullptr;
  }
  return PyBytes_FromStringAndSize(static_cast<const char*>(address), n);
}

// grads_off(grads, refs, getter): the indices (a list; None where there is none) of a captured graph's `.grad` entries
// (client/torch/capture.py `_Graph.grads`: [handle, a weak reference to the parameter, the `.grad` the graph holds,
// fresh]) whose parameter is alive and whose `.grad` is no longer that tensor (set to None, replaced), or whose tensor
// has references besides the entry's and its parameter's (`refs` of them: the script holds it, `g = p.grad`): those
// `_replay` hands to `_regrad` before the run. Every parameter's, read before each replay (round 56: the Python loop
// read the first one's `.grad` and every tensor's reference count, and missed another parameter's `.grad` set to None).
// `getter`: torch's `.grad` descriptor (TensorBase's), called directly where the parameter's type has it (else an
// attribute lookup); the caller turns torch's __torch_function__ lookup in it off (DisableTorchFunctionSubclass: ~900
// instructions a parameter otherwise).
PyObject* grads_off(PyObject* /*module*/, PyObject* const* a, Py_ssize_t nargs) {
  if (nargs != 3 || !PyList_Check(a[0]) || !PyLong_Check(a[1]) || !Py_IS_TYPE(a[2], &PyGetSetDescr_Type)) {
    PyErr_SetString(PyExc_TypeError, "grads_off(grads, refs, getter)");
    return nullptr;
  }
  const Py_ssize_t refs = PyLong_AsSsize_t(a[1]);
  if (refs < 0 && PyErr_Occurred()) return nullptr;
  PyObject* const descr = a[2];
  const PyGetSetDef* const getset = reinterpret_cast<PyGetSetDescrObject*>(descr)->d_getset;
  PyObject* off = nullptr;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(a[0]); i++) {
    PyObject* entry = PyList_GET_ITEM(a[0], i);
    bool as_held = false;
    if (PyList_Check(entry) && PyList_GET_SIZE(entry) >= 3 && PyWeakref_Check(PyList_GET_ITEM(entry, 1))) {
      PyObject* param = PyWeakref_GetObject(PyList_GET_ITEM(entry, 1));  // (borrowed; None once it died)
      if (param == nullptr) {
        Py_XDECREF(off);
        return nullptr;
      }
      PyObject* grad = PyList_GET_ITEM(entry, 2);
      const bool plain = param != Py_None && _PyType_Lookup(Py_TYPE(param), s_grad) == descr;
      if (param == Py_None) {
        as_held = true;  // (nothing to give it back to)
      } else if (plain && g_grad_object != nullptr) {  // (no Python runs meanwhile: `param` stays alive)
        as_held = g_grad_object(param) == grad && Py_REFCNT(grad) == refs;
      } else {
        Py_INCREF(param);
        PyObject* now = plain && getset->get != nullptr ? getset->get(param, getset->closure)
                                                        : PyObject_GetAttr(param, s_grad);
        Py_DECREF(param);
        if (now == nullptr) {
          Py_XDECREF(off);
          return nullptr;
        }
        as_held = now == grad && Py_REFCNT(grad) == refs + 1;  // (+1: `now`)
        Py_DECREF(now);
      }
    }
    if (as_held) continue;
    if (off == nullptr && (off = PyList_New(0)) == nullptr) return nullptr;
    PyObject* index = PyLong_FromSsize_t(i);
    if (index == nullptr || PyList_Append(off, index) < 0) {
      Py_XDECREF(index);
      Py_DECREF(off);
      return nullptr;
    }
    Py_DECREF(index);
  }
  if (off != nullptr) return off;
  Py_RETURN_NONE;
}

// (ops run here, ops passed to the Python dispatcher) since the process started: what the tests check
PyObject* stats(PyObject* /*module*/, PyObject* /*unused*/) {
  return Py_BuildValue("(KK)", g_ran, g_passed);
}

// torch looks a tensor's `__torch_function__` and `__torch_dispatch__` up by a C string (torch/csrc/utils/
// python_strings.h `PyObject_FastGetAttrString`: `check_has_torch_function` on every tensor argument of a torch
// function - 8 and more on each foreach op of Adam -, `handle_torch_function_no_python_arg_parser` on every
// `__torch_dispatch__`, `_make_wrapper_subclass` on the class of every wrapper), ~10 times an op. Where the object's
// type has no `tp_getattr` it makes a fresh str of the name for `tp_getattro`: the fresh string's hash (siphash) and a
// type-attribute lookup that misses CPython's method cache (it keys on the name object) and walks the MRO, ~1k
// instructions a lookup. Where the type has a `tp_getattr`, torch (and `PyObject_GetAttrString`) call it with the C
// string instead: `named_getattr` is `getattr(obj, name)` with the name's interned str for those two names (the same
// lookup through `tp_getattro`, the same result and errors; the method cache then hits), and exactly what torch does
// otherwise for any other name. CPython never calls `tp_getattr` where `tp_getattro` is set (PyObject_GetAttr), and
// resets it to NULL if `__getattr__`/`__getattribute__` is assigned on the class (update_slot): nothing else changes.
struct NamedAttr {
  const char* text;
  PyObject* name;  // interned by `setup_getattr`
};
NamedAttr g_named[] = {{"__torch_function__", nullptr}, {"__torch_dispatch__", nullptr}};

PyObject* named_getattr(PyObject* obj, char* text) {
  for (const NamedAttr& n : g_named) {
    if (n.name != nullptr && std::strcmp(text, n.text) == 0) return PyObject_GetAttr(obj, n.name);
  }
  Ref name(PyUnicode_FromString(text));  // torch's own way for any other name
  return name.p != nullptr ? PyObject_GetAttr(obj, name.p) : nullptr;
}

// setup_getattr(*types): `named_getattr` as the `tp_getattr` of each type (RemoteTensor, RemoteView, and torch's
// tensor metaclass, whose `tp_getattro` looks a class's `__torch_dispatch__` up for `_make_wrapper_subclass`) that has
// none yet; a tuple of bools: whether each type has it now (a type with a `tp_getattr` of its own keeps it).
PyObject* setup_getattr(PyObject* /*module*/, PyObject* const* a, Py_ssize_t nargs) {
  for (NamedAttr& n : g_named) {
    if (n.name == nullptr) {
      n.name = PyUnicode_InternFromString(n.text);
      if (n.name == nullptr) return nullptr;
    }
  }
  Ref out(PyTuple_New(nargs));
  if (out.p == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < nargs; i++) {
    if (!PyType_Check(a[i])) {
      PyErr_SetString(PyExc_TypeError, "setup_getattr(*types)");
      return nullptr;
    }
    auto* tp = reinterpret_cast<PyTypeObject*>(a[i]);
    if (tp->tp_getattr == nullptr && tp->tp_getattro != nullptr) tp->tp_getattr = named_getattr;
    PyObject* on = tp->tp_getattr == named_getattr ? Py_True : Py_False;
    Py_INCREF(on);
    PyTuple_SET_ITEM(out.p, i, on);
  }
  return out.release();
}

PyMethodDef methods[] = {
    {"stats", stats, METH_NOARGS, "(ops run in C, ops passed to the Python dispatcher)"},
    {"torch_dispatch", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(torch_dispatch)),
     METH_FASTCALL | METH_KEYWORDS, "RemoteTensor.__torch_dispatch__'s steady path (see the source's head)"},
    {"setup", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(setup)), METH_FASTCALL,
     "the Python objects the fast path uses"},
    {"setup_session", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(setup_session)), METH_FASTCALL,
     "what Session.eager_op's inline case needs"},
    {"setup_values", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(setup_values)), METH_FASTCALL,
     "the encodings of dtypes, layouts and memory formats"},
    {"setup_inference", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(setup_inference)), METH_FASTCALL,
     "torch.is_inference_mode_enabled: view ops under inference mode take the Python dispatcher"},
    {"find_rule", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(find_rule)),
     METH_FASTCALL | METH_KEYWORDS, "torch._library.simple_registry.find_torch_dispatch_rule in C"},
    {"setup_getattr", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(setup_getattr)), METH_FASTCALL,
     "torch's attribute lookups by C string (tp_getattr) through interned names"},
    {"setup_rules", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(setup_rules)), METH_FASTCALL,
     "the registry find_rule reads"},
    {"setup_current_device", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(setup_current_device)),
     METH_FASTCALL, "the address of the native guard's gpupool_current_device"},
    {"current_device", current_device, METH_NOARGS, "the calling thread's current gpupool device (native guard)"},
    {"bytes_at", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(bytes_at)), METH_FASTCALL,
     "the bytes at an address (a contiguous CPU tensor's data)"},
    {"setup_grad_object", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(setup_grad_object)),
     METH_FASTCALL, "the address of the native guard's gpupool_grad_object, checked on a probe"},
    {"grads_off", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(grads_off)), METH_FASTCALL,
     "the entries of a captured graph's `.grad`s whose parameter's `.grad` is not as the graph holds it"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "gpupool_native_ops", nullptr, -1, methods,
                          nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit_gpupool_native_ops() {
  struct Name {
    PyObject** slot;
    const char* text;
  };
  const Name names[] = {{&s_gp_route, "_gp_route"}, {&s_fast, "fast"}, {&s_gp_rt, "_gp_rt"}, {&s_gp_h, "_gp_h"},
                        {&s_gp_key, "_gp_key"}, {&s_recorders, "recorders"}, {&s_op_ids, "op_ids"},
                        {&s_pending, "pending"}, {&s_entries, "entries"}, {&s_hits, "hits"}, {&s_one, "one"},
                        {&s_metas, "metas"}, {&s_wrapper, "wrapper"}, {&s_spec, "spec"},
                        {&s_flat_tuple, "flat_tuple"}, {&s_flat_list, "flat_list"}, {&s_values, "values"},
                        {&s_handle_base, "_handle_base"}, {&s_handle_count, "_handle_count"},
                        {&s_device, "device"}, {&s_eager_op, "eager_op"},
                        {&s_is_compiling, "_is_compiling_flag"}, {&s_gp_v, "_gp_v"}, {&s_closed, "closed"},
                        {&s_gp_sch, "_gp_sch"}, {&s_shared, "shared"}, {&s_kept, "kept"},
                        {&s_watched, "watched"}, {&s_dead, "_dead"}, {&s_dead_bytes, "_dead_bytes"},
                        {&s_release, "release"}, {&s_itemsize, "itemsize"}, {&s_heads, "_heads"},
                        {&s_ops_sent, "ops_sent"}, {&s_unflushed, "_unflushed"}, {&s_session, "session"},
                        {&s_free_bytes, "free_bytes"}, {&s_flush_ops, "FLUSH_OPS"}, {&s_free_batch, "FREE_BATCH"},
                        {&s_raise, "_raise"}, {&s_lock, "_lock"}, {&s_acquire, "acquire"},
                        {&s_eager, "_eager"}, {&s_sealed_count, "_sealed_count"},
                        {&s_max_batch, "MAX_BATCH_COMMANDS"}, {&s_qualname, "__qualname__"},
                        {&s_singleton, "singleton"}, {&s_data, "_data"}, {&s_rules, "torch_dispatch_rules"},
                        {&s_nbytes, "nbytes"}, {&s_room, "_room"}, {&s_near, "near"},
                        {&s_near_flag, "_near"}, {&s_grad, "grad"}};
  for (const Name& n : names) {
    *n.slot = PyUnicode_InternFromString(n.text);
    if (*n.slot == nullptr) return nullptr;
  }
  g_one = PyLong_FromLong(1);
  if (g_one == nullptr) return nullptr;
  return PyModule_Create(&module_def);
}
