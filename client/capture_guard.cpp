// The watched objects' part of a captured step's guard key in one C call (client/capture_guard.py `Watch.key`, both
// clients'): `read_watch(specs)` compares what each part was made from with what its objects hold now, by identity
// (pointers, no Python code runs), and returns the part as `Watch.key`'s Python path would, or None where anything
// differs or is not as expected: the Python path then remakes the parts (it is the reference; this only skips its
// interpreted comparisons: ~20k instructions a tiny-MLP step's optimizer and modules, round 45).
//
// specs: a tuple, one entry per watched part, in order:
//   (0, dicts, children): a module tree. dicts: the list of the `__dict__`s of `m.modules()`; children: per dict, the
//       keys and values of its `_modules` (in its order) then the end marker. Gives the tuple of the dicts'
//       `training` values (each True or False, else None: the Python path).
//   (1, opt, groups, objects, number): an optimizer whose part is kept (capture_guard.py `_OptimizerPart`).
//       `opt.param_groups` must be `groups` (a list), and per group dict: the dict, its keys and values in order,
//       the end marker, the items of its "params" list or tuple (none if it has none), the end marker, all in
//       `objects` as they are now. Gives `number`.
// setup(end): the end marker (capture_guard.py `_END`).
//
// CPython's C API only (no torch headers): built at first use by capture_guard.py through client/cbuild.py.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

namespace {

PyObject* g_end = nullptr;              // capture_guard._END
PyObject* s_modules = nullptr;          // "_modules"
PyObject* s_training = nullptr;         // "training"
PyObject* s_params = nullptr;           // "params"
PyObject* s_param_groups = nullptr;     // "param_groups"

// The training flags of a module part, or nullptr with no error set where it differs (a Python error is passed on).
PyObject* module_flags(PyObject* dicts, PyObject* children) {
  if (!PyList_CheckExact(dicts) || !PyTuple_CheckExact(children)) return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(dicts);
  const Py_ssize_t have = PyTuple_GET_SIZE(children);
  PyObject* flags = PyTuple_New(n);
  if (flags == nullptr) return nullptr;
  Py_ssize_t at = 0;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* d = PyList_GET_ITEM(dicts, i);
    if (!PyDict_CheckExact(d)) goto differs;
    {
      PyObject* mods = PyDict_GetItemWithError(d, s_modules);  // borrowed
      if (mods == nullptr || !PyDict_CheckExact(mods)) goto differs;
      Py_ssize_t pos = 0;
      PyObject* key;
      PyObject* value;
      while (PyDict_Next(mods, &pos, &key, &value)) {
        if (at + 2 > have || PyTuple_GET_ITEM(children, at) != key || PyTuple_GET_ITEM(children, at + 1) != value) {
          goto differs;
        }
        at += 2;
      }
      if (at >= have || PyTuple_GET_ITEM(children, at) != g_end) goto differs;
      ++at;
      PyObject* flag = PyDict_GetItemWithError(d, s_training);  // borrowed
      if (flag != Py_True && flag != Py_False) goto differs;
      Py_INCREF(flag);
      PyTuple_SET_ITEM(flags, i, flag);
    }
  }
  if (at != have) goto differs;
  return flags;
differs:
  Py_DECREF(flags);
  return nullptr;
}

bool same(PyObject* objects, Py_ssize_t& at, PyObject* obj) {
  if (at >= PyTuple_GET_SIZE(objects) || PyTuple_GET_ITEM(objects, at) != obj) return false;
  ++at;
  return true;
}

// Whether an optimizer's param_groups hold what `objects` says (see the head); -1 with a Python error set.
int optimizer_same(PyObject* opt, PyObject* groups, PyObject* objects) {
  if (!PyTuple_CheckExact(objects)) return 0;
  PyObject* now = PyObject_GetAttr(opt, s_param_groups);
  if (now == nullptr) {
    if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return -1;
    PyErr_Clear();
    return 0;
  }
  Py_DECREF(now);  // compared by identity only, and `groups` (the spec's) keeps that list alive
  if (now != groups || !PyList_CheckExact(groups)) return 0;
  Py_ssize_t at = 0;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(groups); ++i) {
    PyObject* g = PyList_GET_ITEM(groups, i);
    if (!PyDict_CheckExact(g) || !same(objects, at, g)) return 0;
    Py_ssize_t pos = 0;
    PyObject* key;
    PyObject* value;
    while (PyDict_Next(g, &pos, &key, &value)) {
      if (!same(objects, at, key) || !same(objects, at, value)) return 0;
    }
    if (!same(objects, at, g_end)) return 0;
    PyObject* params = PyDict_GetItemWithError(g, s_params);  // borrowed
    if (params == nullptr && PyErr_Occurred()) return -1;
    if (params != nullptr) {
      if (PyList_CheckExact(params)) {
        for (Py_ssize_t j = 0; j < PyList_GET_SIZE(params); ++j) {
          if (!same(objects, at, PyList_GET_ITEM(params, j))) return 0;
        }
      } else if (PyTuple_CheckExact(params)) {
        for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(params); ++j) {
          if (!same(objects, at, PyTuple_GET_ITEM(params, j))) return 0;
        }
      } else {
        return 0;  // the Python path reads it
      }
    }
    if (!same(objects, at, g_end)) return 0;
  }
  return at == PyTuple_GET_SIZE(objects) ? 1 : 0;
}

PyObject* read_watch(PyObject* /*module*/, PyObject* specs) {
  if (g_end == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "read_watch before setup");
    return nullptr;
  }
  if (!PyTuple_CheckExact(specs)) {
    PyErr_SetString(PyExc_TypeError, "read_watch(a tuple of part specs)");
    return nullptr;
  }
  const Py_ssize_t n = PyTuple_GET_SIZE(specs);
  PyObject* out = PyTuple_New(n);
  if (out == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* spec = PyTuple_GET_ITEM(specs, i);
    if (!PyTuple_CheckExact(spec) || PyTuple_GET_SIZE(spec) < 1) goto bad;
    {
      const long kind = PyLong_AsLong(PyTuple_GET_ITEM(spec, 0));
      if (kind == 0 && PyTuple_GET_SIZE(spec) == 3) {
        PyObject* flags = module_flags(PyTuple_GET_ITEM(spec, 1), PyTuple_GET_ITEM(spec, 2));
        if (flags == nullptr) goto differs;
        PyTuple_SET_ITEM(out, i, flags);
      } else if (kind == 1 && PyTuple_GET_SIZE(spec) == 5) {
        const int ok = optimizer_same(PyTuple_GET_ITEM(spec, 1), PyTuple_GET_ITEM(spec, 2), PyTuple_GET_ITEM(spec, 3));
        if (ok < 0) {
          Py_DECREF(out);
          return nullptr;
        }
        if (ok == 0) goto differs;
        PyObject* number = PyTuple_GET_ITEM(spec, 4);
        Py_INCREF(number);
        PyTuple_SET_ITEM(out, i, number);
      } else {
        goto bad;
      }
    }
  }
  return out;
differs:
  Py_DECREF(out);
  if (PyErr_Occurred()) return nullptr;  // a lookup's error (a dict key's __eq__ raising): the caller's
  Py_RETURN_NONE;
bad:
  Py_DECREF(out);
  if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "read_watch: a part spec is (0, dicts, children) or "
                                                          "(1, opt, groups, objects, number)");
  return nullptr;
}

PyObject* setup(PyObject* /*module*/, PyObject* end) {
  Py_INCREF(end);
  Py_XSETREF(g_end, end);
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"read_watch", read_watch, METH_O, "the watched objects' part of a guard key, or None where it may differ"},
    {"setup", setup, METH_O, "the end marker of a run of objects (capture_guard._END)"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "gpupool_capture_guard", nullptr, -1, methods,
                          nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit_gpupool_capture_guard() {
  PyObject** slots[] = {&s_modules, &s_training, &s_params, &s_param_groups};
  const char* names[] = {"_modules", "training", "params", "param_groups"};
  for (int i = 0; i < 4; ++i) {
    *slots[i] = PyUnicode_InternFromString(names[i]);
    if (*slots[i] == nullptr) return nullptr;
  }
  return PyModule_Create(&module_def);
}
