// The device guard of the `gpupool` (PrivateUse1) device in C++: what torch's C++ (the autograd engine, the device
// guards around kernels, InputMetadata's current stream, torch.accelerator) asks of the device several times per op.
//
// torch's Python-backend setup registers torch::acc::PythonDeviceGuard, whose every method asks the Python object for
// its `type_` through pybind's override lookup (the GIL, an attribute lookup, a Python call): ~3 calls per op, and
// whose answers are fixed (one device, always index 0, setDevice ignored). This guard answers without Python, and
// answers for every device the process can name:
//   - the current device is per thread, as CUDA's is: getDevice/exchangeDevice/setDevice/uncheckedSetDevice read and
//     write it, and gpupool's own current device (client/torch/api.py current_index/set_device, torch.gpupool.
//     set_device) is this same variable, read and written through gpupool_current_device/gpupool_set_current_device:
//     one source of truth for torch's guards, torch.accelerator and gpupool's factories;
//   - deviceCount is the number of devices the process can name (api.device_count), pushed from Python as devices
//     are attached (gpupool_set_device_count; it never shrinks, as a CUDA process's count does not);
//   - one stream per device, its default stream (getStream/getNewStream/exchangeStream);
//   - no events: record/block/destroy do nothing, queryEvent and queryStream are true, synchronizeStream returns.
// Everything else keeps DeviceGuardImplInterface's defaults, as the Python guard does.
//
// Built at first use by client/torch/native.py (g++ against torch's headers and libc10 only) and loaded with ctypes:
// the C functions below are its whole interface. No Python headers, no pybind: c10, and libtorch_cpu for the
// scaled_dot_product_attention backend choice (`gpupool_sdp_choice`).

#include <ATen/SDPBackend.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/transformers/attention.h>
#include "sdpa_choice.h"
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <atomic>
#include <optional>

namespace {

using c10::Device;
using c10::DeviceIndex;
using c10::DeviceType;
using c10::Stream;

constexpr DeviceType kType = DeviceType::PrivateUse1;

thread_local DeviceIndex t_current = 0;           // this thread's current gpupool device
std::atomic<DeviceIndex> g_count{1};             // devices the process can name

struct GpupoolGuard final : public c10::impl::DeviceGuardImplInterface {
  DeviceType type() const override {
    return kType;
  }
  Device exchangeDevice(Device d) const override {
    const DeviceIndex old = t_current;
    if (d.index() >= 0) {
      t_current = d.index();
    }
    return Device(kType, old);
  }
  Device getDevice() const override {
    return Device(kType, t_current);
  }
  void setDevice(Device d) const override {
    if (d.index() >= 0) {
      t_current = d.index();
    }
  }
  void uncheckedSetDevice(Device d) const noexcept override {
    if (d.index() >= 0) {
      t_current = d.index();
    }
  }
  Stream getStream(Device d) const noexcept override {
    return Stream(Stream::DEFAULT, Device(kType, d.index() >= 0 ? d.index() : t_current));
  }
  Stream getNewStream(Device d, int /*priority*/ = 0) const override {
    return getStream(d);
  }
  Stream exchangeStream(Stream s) const noexcept override {
    return getStream(s.device());
  }
  DeviceIndex deviceCount() const noexcept override {
    return g_count.load(std::memory_order_relaxed);
  }
  void record(void** /*event*/, const Stream& /*stream*/, const DeviceIndex /*device_index*/,
              const c10::EventFlag /*flag*/) const override {}
  void block(void* /*event*/, const Stream& /*stream*/) const override {}
  bool queryEvent(void* /*event*/) const override {
    return true;
  }
  void destroyEvent(void* /*event*/, const DeviceIndex /*device_index*/) const noexcept override {}
  bool queryStream(const Stream& /*stream*/) const override {
    return true;
  }
  void synchronizeStream(const Stream& /*stream*/) const override {}
};

// Leaked on purpose: the registry holds plain pointers and may be read until the process ends (see
// DeviceGuardImplInterface.h, "you must *leak* objects when putting them in the registry").
const GpupoolGuard* const kGuard = new GpupoolGuard();

// scaled_dot_product_attention's backend on a gpupool device: client/sdpa_choice.h (shared with the C++ client).
std::atomic<bool> g_fused_sdp{true};

// Set on a thread while it records a captured step (client/torch/capture.py): a call with dropout takes torch's
// math path there. The daemon traces the math path's aten calls into the step's TorchScript graph, where the fused
// dropout call would be a Python callback that recomputes the forward (round 23: 1.6x the daemon's CPU per captured
// encoder step); eager calls keep the fused op (one record instead of ~30). Both give the same bits.
thread_local bool t_capturing = false;

// Per device: whether its daemon serves the fused op with dropout (AttachReply.features has "sdpa_dropout"), set at
// attach (`gpupool_set_sdp_dropout`); false until then, and for a daemon from before round 24.
std::atomic<bool> g_sdp_dropout[128] = {};

int64_t gpupool_sdp_choice(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::optional<at::Tensor>& mask, double dropout_p, bool is_causal,
                           std::optional<double> /*scale*/, bool enable_gqa) {
  if (t_capturing && dropout_p != 0.0) return static_cast<int64_t>(at::SDPBackend::math);
  const int index = q.device().index();
  const bool dropout = index >= 0 && index < 128 && g_sdp_dropout[index].load(std::memory_order_relaxed);
  return gpupool_sdpa::sdp_choice(g_fused_sdp.load(std::memory_order_relaxed), dropout, q, k, v, mask, dropout_p,
                                  is_causal, enable_gqa);
}

}  // namespace

extern "C" {

// Answer torch's `_fused_sdp_choice_stub` for PrivateUse1 with `gpupool_sdp_choice` above. Returns 0.
__attribute__((visibility("default"))) int gpupool_register_sdp_choice() {
  at::native::_fused_sdp_choice_stub.set_privateuse1_dispatch_ptr(&gpupool_sdp_choice);
  return 0;
}

// 1: choose the fused backend where `gpupool_sdp_choice` allows (the default); 0: always torch's math path (the
// benchmarks' before/after, the tests' reference). Returns the previous setting.
__attribute__((visibility("default"))) int gpupool_set_fused_sdp(int on) {
  return g_fused_sdp.exchange(on != 0) ? 1 : 0;
}

// Whether device `index`'s daemon serves the fused op with dropout (`g_sdp_dropout`): 1 yes, 0 no. Returns the
// previous setting, or -1 for an index outside 0..127.
__attribute__((visibility("default"))) int gpupool_set_sdp_dropout(int index, int on) {
  if (index < 0 || index > 127) {
    return -1;
  }
  return g_sdp_dropout[index].exchange(on != 0) ? 1 : 0;
}

// 1 while the calling thread records a captured step (`t_capturing`), 0 after. Returns the previous setting.
__attribute__((visibility("default"))) int gpupool_set_capturing(int on) {
  const bool was = t_capturing;
  t_capturing = on != 0;
  return was ? 1 : 0;
}

// Put this guard in c10's registry for PrivateUse1, replacing what is there (the Python guard). Returns 0.
__attribute__((visibility("default"))) int gpupool_register_guard() {
  c10::impl::registerDeviceGuard(kType, kGuard);
  return 0;
}

// 1 if c10's registry holds this guard for PrivateUse1 now, else 0 (the tests check it).
__attribute__((visibility("default"))) int gpupool_guard_active() {
  return c10::impl::device_guard_impl_registry[static_cast<size_t>(kType)].load() == kGuard ? 1 : 0;
}

// A tensor's `.grad` as its Python object (nullptr where it has none, or the `.grad` none yet), read from the tensor's
// Python object `obj` (torch's THPVariable: PyObject_HEAD, then its at::Tensor: `PyTensor`): client/torch/capture.py's
// check of every parameter's `.grad` before a replay (native_ops.cpp `grads_off`), where torch's `.grad` getter costs
// ~700 instructions a parameter. native_ops.py `link_current_device` checks that it answers as the getter does on a
// probe before native_ops uses it (a torch whose THPVariable differs keeps the getter).
namespace {
struct PyTensor {
  intptr_t refcnt;
  void* type;
  at::Tensor cdata;
};
}  // namespace
extern "C" __attribute__((visibility("default"))) void* gpupool_grad_object(void* obj) {
  const at::Tensor& grad = static_cast<const PyTensor*>(obj)->cdata.unsafeGetTensorImpl()->grad();
  return grad.defined() ? grad.unsafeGetTensorImpl()->pyobj_slot()->load_pyobj() : nullptr;
}

// The calling thread's current gpupool device (what getDevice answers torch).
__attribute__((visibility("default"))) int gpupool_current_device() {
  return t_current;
}

// Make `index` the calling thread's current gpupool device (what setDevice does for torch). Returns 0, or -1 for an
// index outside 0..127 (c10's DeviceIndex is a signed byte).
__attribute__((visibility("default"))) int gpupool_set_current_device(int index) {
  if (index < 0 || index > 127) {
    return -1;
  }
  t_current = static_cast<DeviceIndex>(index);
  return 0;
}

// Raise deviceCount to `count` (1..127); it never shrinks. Returns the count now.
__attribute__((visibility("default"))) int gpupool_set_device_count(int count) {
  if (count > 127) {
    count = 127;
  }
  DeviceIndex now = g_count.load();
  while (count > now && !g_count.compare_exchange_weak(now, static_cast<DeviceIndex>(count))) {
  }
  return g_count.load();
}
}
