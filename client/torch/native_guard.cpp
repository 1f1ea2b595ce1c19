// The device guard of the `gpupool` (PrivateUse1) device in C++: what torch's C++ (the autograd engine, the device
// guards around kernels, InputMetadata's current stream) asks of the device several times per op.
//
// torch's Python-backend setup registers torch::acc::PythonDeviceGuard, whose every method asks the Python object for
// its `type_` through pybind's override lookup (the GIL, an attribute lookup, a Python call): ~3 calls per op. This
// guard answers the same questions with the same answers, without Python:
//   - one device, gpupool:0: getDevice/exchangeDevice report index 0, setDevice/uncheckedSetDevice do nothing
//     (gpupool keeps its own current device in client/torch/api.py; torch's guard never moved it), deviceCount 1;
//   - one stream per device, the default stream of gpupool:0 (getStream/getNewStream/exchangeStream);
//   - no events: record/block/destroy do nothing, queryEvent and queryStream are true, synchronizeStream returns.
// Everything else keeps DeviceGuardImplInterface's defaults, as the Python guard does.
//
// Built at first use by client/torch/native.py (g++ against torch's headers and libc10 only) and loaded with ctypes:
// the two C functions below are its whole interface. No Python headers, no pybind: nothing but c10.

#include <c10/core/impl/DeviceGuardImplInterface.h>

namespace {

using c10::Device;
using c10::DeviceIndex;
using c10::DeviceType;
using c10::Stream;

constexpr DeviceType kType = DeviceType::PrivateUse1;

struct GpupoolGuard final : public c10::impl::DeviceGuardImplInterface {
  DeviceType type() const override {
    return kType;
  }
  Device exchangeDevice(Device /*unused*/) const override {
    return Device(kType, 0);
  }
  Device getDevice() const override {
    return Device(kType, 0);
  }
  void setDevice(Device /*unused*/) const override {}
  void uncheckedSetDevice(Device /*unused*/) const noexcept override {}
  Stream getStream(Device /*unused*/) const noexcept override {
    return Stream(Stream::DEFAULT, Device(kType, 0));
  }
  Stream getNewStream(Device /*unused*/, int /*priority*/ = 0) const override {
    return Stream(Stream::DEFAULT, Device(kType, 0));
  }
  Stream exchangeStream(Stream /*unused*/) const noexcept override {
    return Stream(Stream::DEFAULT, Device(kType, 0));
  }
  DeviceIndex deviceCount() const noexcept override {
    return 1;
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

}  // namespace

extern "C" {

// Put this guard in c10's registry for PrivateUse1, replacing what is there (the Python guard). Returns 0.
__attribute__((visibility("default"))) int gpupool_register_guard() {
  c10::impl::registerDeviceGuard(kType, kGuard);
  return 0;
}

// 1 if c10's registry holds this guard for PrivateUse1 now, else 0 (the tests check it).
__attribute__((visibility("default"))) int gpupool_guard_active() {
  return c10::impl::device_guard_impl_registry[static_cast<size_t>(kType)].load() == kGuard ? 1 : 0;
}
}
