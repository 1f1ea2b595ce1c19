// The C++ client of `gpupool run --native-client` (experimental; rounds 12-13 a spike in spike/): a PrivateUse1 backend
// that records eager ops in C++, with no Python per op.
//
// Tensors on the device are plain at::Tensors with no local data: the Allocator hands out a DataPtr whose
// pointer and context are a handle id (never dereferenced), and whose deleter queues that id on a C++ free list, so a
// tensor's death costs no Python. Every aten op that reaches PrivateUse1 lands in one boxed fallback, which
//   1. infers the outputs' metadata by running the op's Meta kernel on meta copies of the inputs (or finds it in a
//      cache keyed by the op and the inputs' geometry and non-tensor arguments),
//   2. allocates the new outputs (new handles) or hands back the written inputs (in-place, out=), or makes views
//      sharing an input's storage (aliasing ops without a metadata kernel of their own),
//   3. appends one compact record to a byte buffer: op id, each argument (tensors as storage handle + dtype + sizes +
//      strides + offset, CPU scalar tensors inline, other values tagged), output handles.
// View ops with a metadata-only kernel in at::native (view, as_strided, _reshape_alias; and through as_strided every
// CompositeExplicitAutograd view: t, transpose, expand, unsqueeze, squeeze, permute, select, slice, detach, alias)
// share the input's storage and make no record: later records carry their geometry.
// Copies from CPU are upload records (the bytes follow); syncs (`.item()`, `.cpu()`) append a sync record and return
// ZEROS (there is no daemon to answer). The sink is null: a full buffer is counted and dropped, or, in "keep" mode
// (tests), kept for Python to decode.
//
// The Python side (client/native/backend.py) builds this with torch.utils.cpp_extension.load (is_python_module=False)
// and talks to it through the `gpupool_native::*` operators below. No pybind, no Python headers: the one direct call
// into Python, a frame's hand-off (`PyHandOff`), reaches CPython's stable ABI through dlsym.

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/SDPBackend.h>
#include <ATen/native/transformers/attention.h>
#include "sdpa_choice.h"
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/detail/PrivateUse1HooksInterface.h>
#include <ATen/ops/_reshape_alias_native.h>
#include <ATen/ops/as_strided_native.h>
#include <ATen/ops/view_native.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <dlfcn.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace torch {
// libtorch_python (torch/csrc/utils/python_arg_parser.h): the aten ops whose Python call (`torch.ops.aten.X.Y(...)`,
// the daemon's) takes a number for a Tensor argument. Declared here: the header pulls in Python's.
bool should_allow_numbers_as_tensors(const std::string& name);
}  // namespace torch

namespace {

using c10::Device;
using c10::DeviceIndex;
using c10::DeviceType;
using c10::DispatchKey;
using c10::DispatchKeySet;
using c10::IValue;
using c10::Stream;

constexpr DeviceType kType = DeviceType::PrivateUse1;
const DispatchKeySet kKeys{DispatchKey::PrivateUse1};

// ---------------------------------------------------------------------------------------------------------------------
// Record kinds and argument tags of the byte buffer (little-endian, no alignment). One record:
//   u32 length of the rest, u8 kind, then
//   'O' op:     u32 op id, u8 nargs, args..., u8 nouts, u64 out handles (0 for an output that is an input or a view)
//   'U' upload: tensor geometry (as an argument), u64 nbytes, the bytes (dtype of the destination, contiguous)
//   'S' sync:   tensor geometry (the tensor read back)
//   'F' free:   u32 count, u64 handles
//   'A' alloc:  u64 handle, u64 nbytes (an explicit empty/empty_strided: the daemon allocates it)
// Argument tags: 'T' tensor (u64 handle, u8 dtype, u8 ndim, i64 sizes, i64 strides, i64 offset), 'C' CPU tensor
// inline (u8 dtype, u8 ndim, sizes, u64 nbytes, bytes: contiguous), 'N' none, 'i' i64, 'd' f64, 'b' u8, 'I' int list
// (u32 n, i64...), 'D' double list, 'B' bool list, 'L' tensor list (u32 n, each 'T'/'C'/'N'), 's' string (u32 n, bytes),
// 'v' device (i8 type, i8 index), 'c' complex (2 f64).
// ---------------------------------------------------------------------------------------------------------------------

std::mutex g_mu;                 // guards the buffer, the stats, the op ids and the cache (ops may run on the
                                 // autograd engine's device thread)
// An allocator whose value-less construct leaves bytes uninitialized: std::vector::resize would zero-fill every byte
// it adds (round 14: 4.8% of the tiny MLP's client instructions, each small temporary Buf zeroing its first 4 KiB).
template <typename T>
struct NoInit : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = NoInit<U>;
  };
  NoInit() = default;
  template <typename U>
  NoInit(const NoInit<U>&) noexcept {}
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};

// A byte buffer that grows without zero-filling (`NoInit`; a fresh one starts at 256 bytes).
struct Buf {
  std::vector<uint8_t, NoInit<uint8_t>> v;
  size_t n = 0;
  uint8_t* grow(size_t k) {  // inlined at every put; the rare reallocation out of line (round 15: 1% of the tiny MLP)
    if (__builtin_expect(n + k > v.size(), 0)) enlarge(n + k);
    uint8_t* p = v.data() + n;
    n += k;
    return p;
  }
  __attribute__((noinline)) void enlarge(size_t need) { v.resize(std::max({2 * v.size(), need, size_t{256}})); }
  size_t size() const { return n; }
  bool empty() const { return n == 0; }
  uint8_t* data() { return v.data(); }
  void clear() { n = 0; }
  void resize(size_t k) { n = k; }  // shrink only
};
// Several devices (gpupool:0..N-1, a lease of N GPUs: each its own daemon session): a storage's id carries its device's
// index in its top bits (the deleter, which gets the id alone, queues it on that device's free list); the id's low bits
// are a process-wide counter, so ids are unique across devices and the wire handle is the session's base + the low bits.
constexpr int kMaxDevices = 64;
constexpr int kIndexShift = 48;
constexpr uint64_t kIdMask = (uint64_t{1} << kIndexShift) - 1;
thread_local DeviceIndex t_current = 0;  // this thread's current gpupool device (torch's guards, set_device)
std::atomic<int> g_count{1};             // the devices the process can name (the lease's)

inline DeviceIndex index_of_id(uint64_t id) { return static_cast<DeviceIndex>(id >> kIndexShift); }

// The current device for a scope (the allocator makes storages on the current device).
struct AtDevice {
  DeviceIndex prev;
  explicit AtDevice(DeviceIndex i) : prev(t_current) { t_current = i; }
  ~AtDevice() { t_current = prev; }
};

Buf g_buf;                       // records not yet "sent" (the null/keep sink, no daemon: every device's)
bool g_keep = false;            // keep records for Python (tests) instead of dropping full buffers
size_t g_flush_at = 1 << 16;    // the null sink drops the buffer past this many bytes
std::mutex g_free_mu;             // guards the free list and the live set: deleters take it, never g_mu
std::vector<uint64_t> g_free[kMaxDevices];  // per device: the storages whose tensors died, not yet in a free record
std::atomic<uint64_t> g_next{1};
std::atomic<bool> g_track{false};  // keep the set of live handles (tests: every handle freed exactly once)
std::unordered_set<uint64_t> g_live;
std::atomic<int64_t> g_allocated{0}, g_freed{0}, g_double_frees{0};
bool g_cache_on = true;

struct Stats {
  int64_t op_records = 0, uploads = 0, syncs = 0, free_records = 0,
          alloc_records = 0, bytes = 0, dropped_bytes = 0, meta_runs = 0, cache_hits = 0, view_outputs = 0;
} g_stats;

std::vector<std::string> g_op_names;                           // op id -> "aten::name.overload"
std::unordered_map<c10::OperatorHandle, uint32_t> g_op_ids;    // guarded by g_mu

template <typename T>
inline void put(Buf& b, T v) {
  std::memcpy(b.grow(sizeof(T)), &v, sizeof(T));
}

inline void put_bytes(Buf& b, const void* p, size_t n) {
  if (n) std::memcpy(b.grow(n), p, n);
}

// Start a record (returns where its length goes); finish_record patches the length.
inline size_t begin_record(uint8_t kind) {
  const size_t at = g_buf.size();
  put<uint32_t>(g_buf, 0);
  put<uint8_t>(g_buf, kind);
  return at;
}

inline void finish_record(size_t at) {
  const uint32_t len = static_cast<uint32_t>(g_buf.size() - at - 4);
  std::memcpy(g_buf.data() + at, &len, 4);
  g_stats.bytes += len + 4;
  if (!g_keep && g_buf.size() >= g_flush_at) {  // the null sink: count and drop
    g_stats.dropped_bytes += static_cast<int64_t>(g_buf.size());
    g_buf.clear();
  }
}

// Free records for the handles that died since the last record (called under g_mu before each record).
inline void drain_frees() {
  std::lock_guard<std::mutex> flock(g_free_mu);
  for (auto& dead : g_free) {
    if (dead.empty()) continue;
    const size_t at = begin_record('F');
    put<uint32_t>(g_buf, static_cast<uint32_t>(dead.size()));
    put_bytes(g_buf, dead.data(), dead.size() * sizeof(uint64_t));
    dead.clear();
    g_stats.free_records++;
    finish_record(at);
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// The allocator: no memory, a handle per storage.
// ---------------------------------------------------------------------------------------------------------------------

void free_handle(void* ctx) {
  const uint64_t h = reinterpret_cast<uintptr_t>(ctx);
  std::lock_guard<std::mutex> lock(g_free_mu);
  if (g_track.load(std::memory_order_relaxed) && g_live.erase(h) == 0) {
    g_double_frees++;
    return;
  }
  g_free[index_of_id(h)].push_back(h);
  g_freed.fetch_add(1, std::memory_order_relaxed);
}

// Per device: the session's memory quota in bytes (0: not attached, or unknown), set when it attaches (`set_quota`).
std::atomic<int64_t> g_quota[kMaxDevices];

// A tensor larger than its session's whole quota (HandleAllocator): torch's OutOfMemoryError where nothing catches it;
// the kernels that make most tensors (the encoder's outputs, the factories) catch it, with g_mu released, and raise
// the shim's OutOfMemoryError instead (`raise_over_quota`), as a daemon's quota refusal is raised.
struct QuotaExceeded : public c10::OutOfMemoryError {
  QuotaExceeded(DeviceIndex i, size_t n, int64_t q, const std::string& msg)
      : c10::OutOfMemoryError(msg), index(i), nbytes(n), quota(q) {}
  DeviceIndex index;
  size_t nbytes;
  int64_t quota;
};

// The shim's OutOfMemoryError (a torch.OutOfMemoryError and a gpupool.errors.ResourceExhausted), raised by the
// `over_quota` operator's Python implementation (backend.connect); `e` itself where it has none. Never under g_mu.
[[noreturn]] void raise_over_quota(const QuotaExceeded& e) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("gpupool_native::over_quota", "")
                       .typed<void(int64_t, int64_t, int64_t)>();
  if (op.hasKernelForDispatchKey(c10::DispatchKey::CompositeExplicitAutograd)) {
    op.call(e.index, static_cast<int64_t>(e.nbytes), e.quota);
  }
  throw e;
}

struct HandleAllocator final : public c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    const DeviceIndex i = t_current;
    // A tensor larger than the session's whole quota: an OutOfMemoryError now, as CUDA's allocator raises one at the
    // call (round 50). The daemon would refuse it too, but at the next sync, after the ops that followed had run on a
    // tensor with no value: a backward over it left a `.grad` with none, which every later step read (a script that
    // caught the error and went on with a smaller batch failed again until `zero_grad`). One that fits the quota but
    // not what is free is the daemon's to refuse, at the next sync. (An op's other outputs made before this one die
    // unsent: freeing a handle the daemon never made is harmless there.)
    const int64_t quota = i >= 0 && i < kMaxDevices ? g_quota[i].load(std::memory_order_relaxed) : 0;
    if (quota > 0 && nbytes > static_cast<size_t>(quota)) {
      throw QuotaExceeded(i, nbytes, quota, c10::str("memory quota exceeded: ", nbytes, " bytes requested, more than the "
                          "session's whole ", quota, " byte limit (gpupool:", int(i), "): refused at the call, nothing "
                          "was allocated"));
    }
    return storage_ptr(i);
  }
  // A new storage id on device i, as its DataPtr (data and context: the id; freed by free_handle).
  static c10::DataPtr storage_ptr(DeviceIndex i) {
    const uint64_t h = g_next.fetch_add(1, std::memory_order_relaxed) | (static_cast<uint64_t>(i) << kIndexShift);
    g_allocated.fetch_add(1, std::memory_order_relaxed);
    if (g_track.load(std::memory_order_relaxed)) {
      std::lock_guard<std::mutex> lock(g_free_mu);
      g_live.insert(h);
    }
    void* p = reinterpret_cast<void*>(static_cast<uintptr_t>(h));
    return {p, p, &free_handle, Device(kType, i)};
  }
  c10::DeleterFnPtr raw_deleter() const override {
    return nullptr;  // no raw allocations
  }
  void copy_data(void* /*dest*/, const void* /*src*/, std::size_t /*count*/) const override {
    TORCH_CHECK(false, "gpupool native client: the device holds no bytes to copy");
  }
};

HandleAllocator g_alloc;

inline uint64_t handle_of(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.storage().data_ptr().get_context());
}
inline uint64_t handle_of_impl(const c10::TensorImpl& t) {
  return reinterpret_cast<uintptr_t>(t.storage().data_ptr().get_context());
}

// ---------------------------------------------------------------------------------------------------------------------
// The device guard (a minimal one: the current device per thread as CUDA's, one stream per device, no events), as
// client/torch/native_guard.cpp's.
// ---------------------------------------------------------------------------------------------------------------------

struct SpikeGuard final : public c10::impl::DeviceGuardImplInterface {
  DeviceType type() const override { return kType; }
  Device exchangeDevice(Device d) const override {
    const DeviceIndex old = t_current;
    if (d.index() >= 0) t_current = d.index();
    return Device(kType, old);
  }
  Device getDevice() const override { return Device(kType, t_current); }
  void setDevice(Device d) const override {
    if (d.index() >= 0) t_current = d.index();
  }
  void uncheckedSetDevice(Device d) const noexcept override {
    if (d.index() >= 0) t_current = d.index();
  }
  Stream getStream(Device d) const noexcept override {
    return Stream(Stream::DEFAULT, Device(kType, d.index() >= 0 ? d.index() : t_current));
  }
  Stream getNewStream(Device d, int = 0) const override { return getStream(d); }
  Stream exchangeStream(Stream s) const noexcept override { return getStream(s.device()); }
  DeviceIndex deviceCount() const noexcept override { return static_cast<DeviceIndex>(g_count.load()); }
  void record(void**, const Stream&, const DeviceIndex, const c10::EventFlag) const override {}
  void block(void*, const Stream&) const override {}
  bool queryEvent(void*) const override { return true; }
  void destroyEvent(void*, const DeviceIndex) const noexcept override {}
  bool queryStream(const Stream&) const override { return true; }
  void synchronizeStream(const Stream&) const override {}
};

void resize_storage_bytes(const c10::Storage& storage, size_t n);  // below (wire mode)

// The hooks torch's autograd engine and the accelerator API ask of a PrivateUse1 backend: the lease's devices, always
// there, the current one per thread; and a storage's resize (`untyped_storage().resize_`: FSDP2's free_storage and
// alloc_storage).
struct SpikeHooks final : public at::PrivateUse1HooksInterface {
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasPrimaryContext(DeviceIndex) const override { return true; }
  Device getDeviceFromPtr(void* p) const override {
    return Device(kType, index_of_id(reinterpret_cast<uintptr_t>(p)));
  }
  DeviceIndex deviceCount() const override { return static_cast<DeviceIndex>(g_count.load()); }
  DeviceIndex getCurrentDevice() const override { return t_current; }
  void setCurrentDevice(DeviceIndex i) const override {
    if (i >= 0) t_current = i;
  }
  DeviceIndex exchangeDevice(DeviceIndex i) const override {
    const DeviceIndex old = t_current;
    if (i >= 0) t_current = i;
    return old;
  }
  DeviceIndex maybeExchangeDevice(DeviceIndex i) const override { return exchangeDevice(i); }
  void resizePrivateUse1Bytes(const c10::Storage& storage, size_t newsize) const override {
    resize_storage_bytes(storage, newsize);
  }
};

const bool kHooksRegistered = [] {
  at::RegisterPrivateUse1HooksInterface(new SpikeHooks());  // leaked: torch keeps the pointer
  return true;
}();

// ---------------------------------------------------------------------------------------------------------------------
// Encoding arguments, and the meta-inference cache key.
// ---------------------------------------------------------------------------------------------------------------------

void put_geometry(Buf& b, const at::Tensor& t) {
  put<uint8_t>(b, static_cast<uint8_t>(t.scalar_type()));
  const auto sizes = t.sizes();
  const auto strides = t.strides();
  put<uint8_t>(b, static_cast<uint8_t>(sizes.size()));
  put_bytes(b, sizes.data(), sizes.size() * sizeof(int64_t));
  put_bytes(b, strides.data(), strides.size() * sizeof(int64_t));
  put<int64_t>(b, t.storage_offset());
}

void put_tensor(Buf& b, const at::Tensor& t) {
  if (!t.defined()) {
    put<uint8_t>(b, 'N');
    return;
  }
  if (t.device().type() == kType) {
    put<uint8_t>(b, 'T');
    put<uint64_t>(b, handle_of(t));
    put_geometry(b, t);
    return;
  }
  TORCH_CHECK(t.device().is_cpu(), "gpupool native client: a ", t.device(), " tensor among the arguments of a device op");
  const at::Tensor c = t.contiguous();
  put<uint8_t>(b, 'C');
  put<uint8_t>(b, static_cast<uint8_t>(c.scalar_type()));
  put<uint8_t>(b, static_cast<uint8_t>(c.dim()));
  put_bytes(b, c.sizes().data(), c.dim() * sizeof(int64_t));
  const uint64_t n = c.nbytes();
  put<uint64_t>(b, n);
  put_bytes(b, c.const_data_ptr(), n);
}

// A list's tag and count, into the record and the key.
inline void list_head(Buf& b, std::string& k, char tag, size_t n) {
  put<uint8_t>(b, static_cast<uint8_t>(tag));
  put<uint32_t>(b, static_cast<uint32_t>(n));
  k.push_back(tag);
  k.push_back(static_cast<char>(n));
}

// An int64 into the record and, as the same bytes, into the cache key (ints can change an output's metadata).
inline void put_keyed(Buf& b, std::string& k, int64_t x) {
  put<int64_t>(b, x);
  k.append(reinterpret_cast<const char*>(&x), sizeof(x));
}

// An argument's tensor in a cache key: where it lives, its dtype and geometry.
void key_tensor(std::string& k, const at::Tensor& t) {
  if (!t.defined()) {
    k.push_back('N');
    return;
  }
  // one append of the whole part (round 15: push_back and append per field were 1.5% of the tiny MLP's instructions)
  const size_t n = static_cast<size_t>(t.dim());
  char part[3 + (2 * 64 + 1) * sizeof(int64_t)];
  const int64_t off = t.storage_offset();
  if (n > 64) {  // the long way
    k.push_back(t.device().type() == kType ? 'T' : 'C');
    k.push_back(static_cast<char>(t.scalar_type()));
    k.append(reinterpret_cast<const char*>(&n), sizeof(n));
    k.append(reinterpret_cast<const char*>(t.sizes().data()), n * sizeof(int64_t));
    k.append(reinterpret_cast<const char*>(t.strides().data()), n * sizeof(int64_t));
    k.append(reinterpret_cast<const char*>(&off), sizeof(off));
    return;
  }
  const size_t dims = n * sizeof(int64_t);
  // 'W': a wrapped number (a Python number), whose outputs' dtypes differ from a plain 0-dim CPU tensor's
  part[0] = t.device().type() == kType ? 'T' : (t.unsafeGetTensorImpl()->is_wrapped_number() ? 'W' : 'C');
  part[1] = static_cast<char>(t.scalar_type());
  part[2] = static_cast<char>(n);
  std::memcpy(part + 3, t.sizes().data(), dims);
  std::memcpy(part + 3 + dims, t.strides().data(), dims);
  std::memcpy(part + 3 + 2 * dims, &off, sizeof(off));
  k.append(part, 3 + 2 * dims + sizeof(off));
}

// One argument into the record (b) and the cache key (k). Doubles go into the key by type only (their value never
// changes an output's metadata: Adam's step sizes would otherwise miss every time), as the Python shim keys them.
void put_arg(Buf& b, std::string& k, const IValue& v) {
  if (v.isTensor()) {
    const at::Tensor& t = v.toTensor();
    put_tensor(b, t);
    key_tensor(k, t);
  } else if (v.isNone()) {
    put<uint8_t>(b, 'N');
    k.push_back('N');
  } else if (v.isInt()) {
    const int64_t x = v.toInt();
    put<uint8_t>(b, 'i');
    put<int64_t>(b, x);
    k.push_back('i');
    k.append(reinterpret_cast<const char*>(&x), sizeof(x));
  } else if (v.isDouble()) {
    put<uint8_t>(b, 'd');
    put<double>(b, v.toDouble());
    k.push_back('d');
  } else if (v.isBool()) {
    put<uint8_t>(b, 'b');
    put<uint8_t>(b, v.toBool());
    k.push_back(v.toBool() ? 'y' : 'n');
  } else if (v.isTensorList()) {
    const auto list = v.toTensorList();
    list_head(b, k, 'L', list.size());
    for (size_t i = 0; i < list.size(); i++) {
      const at::Tensor t = list.get(i);
      put_tensor(b, t);
      key_tensor(k, t);
    }
  } else if (v.isIntList()) {
    const auto list = v.toIntList();
    list_head(b, k, 'I', list.size());
    for (size_t i = 0; i < list.size(); i++) {
      const int64_t x = list.get(i);
      put_keyed(b, k, x);
    }
  } else if (v.isDoubleList()) {
    const auto list = v.toDoubleList();
    list_head(b, k, 'D', list.size());
    for (size_t i = 0; i < list.size(); i++) put<double>(b, list.get(i));
  } else if (v.isBoolList()) {
    const auto list = v.toBoolList();
    list_head(b, k, 'B', list.size());
    for (size_t i = 0; i < list.size(); i++) {
      put<uint8_t>(b, list.get(i));
      k.push_back(list.get(i) ? 'y' : 'n');
    }
  } else if (v.isList()) {  // Tensor?[] (index), Scalar[] (_foreach_div_.ScalarList): each element tagged
    const auto list = v.toListRef();
    list_head(b, k, 'L', list.size());
    for (const IValue& e : list) {
      TORCH_CHECK(!e.isList(), "gpupool native client: a list of lists");
      put_arg(b, k, e);
    }
  } else if (v.isString()) {
    const auto& s = v.toStringRef();
    put<uint8_t>(b, 's');
    put<uint32_t>(b, static_cast<uint32_t>(s.size()));
    put_bytes(b, s.data(), s.size());
    k.push_back('s');
    k.append(s);
  } else if (v.isDevice()) {
    const Device d = v.toDevice();
    put<uint8_t>(b, 'v');
    put<int8_t>(b, static_cast<int8_t>(d.type()));
    put<int8_t>(b, d.index());
    k.push_back('v');
    k.push_back(static_cast<char>(d.type()));
  } else if (v.isComplexDouble()) {
    const auto c = v.toComplexDouble();
    put<uint8_t>(b, 'c');
    put<double>(b, c.real());
    put<double>(b, c.imag());
    k.push_back('c');
  } else {
    TORCH_CHECK(false, "gpupool native client: an argument of kind ", v.tagKind(), " is not supported (a Generator: random ops need "
                "the daemon's RNG; a Storage or a Stream)");
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// Meta inference and its cache.
// ---------------------------------------------------------------------------------------------------------------------

// What one output is: a new tensor, an input written in place (in-place, out=), or a view of an input's storage.
struct OutPlan {
  // NONE: an undefined tensor (no handle); VALUE: an int return that is a size of the inputs (`shape_ints`), in `offset`
  enum Kind : uint8_t { NEW, INPUT, VIEW, NONE, VALUE } kind = NEW;
  int arg = -1;        // INPUT/VIEW: the argument it is (or views); for a tensor-list argument also `elem`
  int elem = -1;
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> sizes, strides;
  int64_t offset = 0;
};

// One return of the op: a tensor (one plan), a tensor list (n plans), or nothing else is supported.
struct RetPlan {
  bool is_list = false;
  bool is_int = false;  // one VALUE plan: the int goes back on the stack, the record's output handle is 0
  std::vector<OutPlan> outs;
};

struct Plan {
  std::vector<RetPlan> rets;
  bool python = false;  // wire mode: the Meta kernel cannot say (data-dependent shapes, a non-tensor return): Python
};

// The meta-cache key's hash: 8 bytes at a time (round 48: std::hash's byte-wise _Hash_bytes over keys of 50-300
// bytes, the geometry of every tensor argument, was ~5% of the fallback's instructions). Equality is still the whole
// key's.
struct KeyHash {
  size_t operator()(const std::string& k) const noexcept {
    const auto* p = reinterpret_cast<const unsigned char*>(k.data());
    size_t n = k.size();
    uint64_t h = 0x9e3779b97f4a7c15ULL ^ n;
    for (; n >= 8; n -= 8, p += 8) {
      uint64_t w;
      std::memcpy(&w, p, 8);
      h = (h ^ w) * 0xff51afd7ed558ccdULL;
      h ^= h >> 32;
    }
    uint64_t w = 0;
    std::memcpy(&w, p, n);
    h = (h ^ w) * 0xc4ceb9fe1a85ec53ULL;
    return static_cast<size_t>(h ^ (h >> 29));
  }
};
std::unordered_map<std::string, Plan, KeyHash> g_cache;  // guarded by g_mu

at::Tensor to_meta(const at::Tensor& t) {
  if (!t.defined()) return t;
  // A Python number (`loss * 0.5`) reaches the op as a wrapped number (a 0-dim CPU tensor), which takes no part in
  // type promotion and goes beside meta tensors as it goes beside a device's; a 0-dim meta double would promote: the
  // meta of a 0-dim float32 times it came out float64 where the daemon's (and local) result is float32, and `.cpu()`
  // of such a loss failed the download's dtype check (round 29).
  if (t.unsafeGetTensorImpl()->is_wrapped_number()) return t;
  auto opts = t.options().device(c10::kMeta);
  if (t.storage_offset() == 0) {
    return at::empty_strided(t.sizes(), t.strides(), opts);
  }
  // Keep the offset (views' outputs are placed by it): a meta storage as large as the real one.
  const auto bytes = t.storage().nbytes();
  at::Tensor base = at::empty({static_cast<int64_t>(bytes)}, opts.dtype(at::kByte));
  return at::empty({0}, opts).set_(base.storage(), t.storage_offset(), t.sizes(), t.strides());
}

IValue meta_ivalue(const IValue& v) {
  if (v.isTensor()) return to_meta(v.toTensor());
  if (v.isTensorList()) {
    c10::List<at::Tensor> out;
    for (const at::Tensor& t : v.toTensorList().vec()) out.push_back(to_meta(t));
    return out;
  }
  if (v.isList() && !v.isIntList() && !v.isDoubleList() && !v.isBoolList()) {
    bool tensors = false;
    for (const IValue& e : v.toListRef()) tensors |= e.isTensor();
    if (!tensors) return v;  // Scalar[]
    c10::List<std::optional<at::Tensor>> out;
    for (const IValue& e : v.toListRef()) {
      out.push_back(e.isTensor() ? std::optional<at::Tensor>(to_meta(e.toTensor())) : std::nullopt);
    }
    return out;
  }
  if (v.isDevice()) return Device(c10::kMeta);
  return v;
}

// Which meta input (argument index, list element) is this meta tensor: by TensorImpl identity (in-place / out=
// returns its argument) or, for a view, by sharing its storage.
std::pair<int, int> find_input(const std::vector<IValue>& margs, const at::Tensor& m, bool by_storage) {
  for (size_t i = 0; i < margs.size(); i++) {
    const IValue& a = margs[i];
    auto same = [&](const at::Tensor& t) {
      if (!t.defined()) return false;
      return by_storage ? t.storage().is_alias_of(m.storage()) : t.unsafeGetTensorImpl() == m.unsafeGetTensorImpl();
    };
    if (a.isTensor()) {
      if (same(a.toTensor())) return {static_cast<int>(i), -1};
    } else if (a.isTensorList()) {
      const auto list = a.toTensorList();
      for (size_t j = 0; j < list.size(); j++)
        if (same(list.get(j))) return {static_cast<int>(i), static_cast<int>(j)};
    } else if (a.isList() && !a.isIntList() && !a.isDoubleList() && !a.isBoolList()) {
      const auto list = a.toListRef();
      for (size_t j = 0; j < list.size(); j++)
        if (list[j].isTensor() && same(list[j].toTensor())) return {static_cast<int>(i), static_cast<int>(j)};
    }
  }
  return {-1, -1};
}

OutPlan plan_one(const c10::Argument& ret, const std::vector<IValue>& margs, const at::Tensor& m) {
  OutPlan p;
  if (!m.defined()) {  // the fused attention's cum_seq_q/k, debug mask: an undefined tensor, no handle
    p.kind = OutPlan::NONE;
    return p;
  }
  p.dtype = m.scalar_type();
  p.sizes = m.sizes().vec();
  p.strides = m.strides().vec();
  p.offset = m.storage_offset();
  const auto* alias = ret.alias_info();
  if (alias != nullptr && alias->isWrite()) {
    auto [i, j] = find_input(margs, m, false);
    TORCH_CHECK(i >= 0, "gpupool native client: a written output that is none of the inputs");
    p.kind = OutPlan::INPUT;
    p.arg = i;
    p.elem = j;
  } else if (alias != nullptr) {
    auto [i, j] = find_input(margs, m, true);
    TORCH_CHECK(i >= 0, "gpupool native client: a view output whose storage is none of the inputs'");
    p.kind = OutPlan::VIEW;
    p.arg = i;
    p.elem = j;
  }
  return p;
}

Plan infer(const c10::OperatorHandle& op, const IValue* args, size_t nargs, std::vector<IValue>& margs_out) {
  const auto& schema = op.schema();
  std::vector<IValue> margs;
  margs.reserve(nargs);
  for (size_t i = 0; i < nargs; i++) margs.push_back(meta_ivalue(args[i]));
  torch::jit::Stack ms(margs.begin(), margs.end());
  op.redispatchBoxed(DispatchKeySet(DispatchKey::Meta), &ms);
  Plan plan;
  const auto& rets = schema.returns();
  TORCH_CHECK(ms.size() == rets.size(), "gpupool native client: ", schema.name(), " returned ", ms.size(), " values for ", rets.size());
  for (size_t r = 0; r < rets.size(); r++) {
    RetPlan rp;
    const IValue& v = ms[r];
    if (v.isTensor()) {
      rp.outs.push_back(plan_one(rets[r], margs, v.toTensor()));
    } else if (v.isNone()) {
      OutPlan p;
      p.kind = OutPlan::NONE;
      rp.outs.push_back(p);
    } else if (v.isInt() && schema.name() == "aten::_scaled_dot_product_fused_attention_overrideable") {
      // its max_q and max_k: the query's and key's lengths, from the Meta kernel (client/torch/meta.py SHAPE_INTS)
      OutPlan p;
      p.kind = OutPlan::VALUE;
      p.offset = v.toInt();
      rp.is_int = true;
      rp.outs.push_back(p);
    } else if (v.isTensorList()) {
      rp.is_list = true;
      for (const at::Tensor& t : v.toTensorList().vec()) rp.outs.push_back(plan_one(rets[r], margs, t));
    } else {
      TORCH_CHECK(false, "gpupool native client: ", schema.name(), " returns a ", v.tagKind(),
                  ": a value read from the device needs a sync, which the records cannot do");
    }
    // A written input whose meta copy was resized (out= of the wrong size) would need its storage replaced.
    for (const OutPlan& p : rp.outs) {
      if (p.kind != OutPlan::INPUT) continue;
      const IValue& a = args[p.arg];
      const at::Tensor in = p.elem < 0 ? a.toTensor()
                                       : (a.isTensorList() ? a.toTensorList().get(p.elem) : a.toListRef()[p.elem].toTensor());
      TORCH_CHECK(in.sizes().vec() == p.sizes && in.strides().vec() == p.strides,
                  "gpupool native client: ", schema.name(), " resizes an out= argument: not supported");
    }
    plan.rets.push_back(std::move(rp));
  }
  size_t nouts = 0;
  for (const RetPlan& r : plan.rets) nouts += r.outs.size();
  // A compact record names at most 255 outputs (a u8 count): a `_foreach_` op over more tensors (Adam's over a model
  // of more than 255 parameters) goes through the Python fallback, as an `Op`.
  TORCH_CHECK(nouts <= 255, "gpupool native client: ", schema.name(), " returns ", nouts,
              " tensors: more than a compact record names");
  margs_out = std::move(margs);
  return plan;
}

at::Tensor make_out(const OutPlan& p, const IValue* args) {
  if (p.kind == OutPlan::NONE || p.kind == OutPlan::VALUE) return at::Tensor();
  if (p.kind == OutPlan::NEW) {
    return at::detail::empty_strided_generic(p.sizes, p.strides, &g_alloc, kKeys, p.dtype);
  }
  const IValue& a = args[p.arg];
  const at::Tensor in = p.elem < 0 ? a.toTensor()
                                   : (a.isTensorList() ? a.toTensorList().get(p.elem) : a.toListRef()[p.elem].toTensor());
  if (p.kind == OutPlan::INPUT) return in;
  g_stats.view_outputs++;
  // The view's own dtype (the Meta kernel's): `view_as_complex`, `view_as_real` and `view(dtype)` change it; until
  // round 48 the input's was kept (a float32 "view_as_complex" of the float pairs: silently wrong values).
  at::Tensor v = at::detail::make_tensor<c10::TensorImpl>(c10::TensorImpl::VIEW, c10::Storage(in.storage()),
                                                           in.key_set(), c10::scalarTypeToTypeMeta(p.dtype));
  v.unsafeGetTensorImpl()->set_sizes_and_strides(p.sizes, p.strides, p.offset);
  return v;
}

uint32_t op_id(const c10::OperatorHandle& op) {
  auto it = g_op_ids.find(op);
  if (it != g_op_ids.end()) return it->second;
  const uint32_t id = static_cast<uint32_t>(g_op_names.size());
  const auto& name = op.operator_name();
  g_op_names.push_back(name.overload_name.empty() ? name.name : name.name + "." + name.overload_name);
  g_op_ids.emplace(op, id);
  return id;
}

// ---------------------------------------------------------------------------------------------------------------------
// Wire mode (configure_wire): records in the daemon's own format, for a real session. The buffer then holds finished
// `ClientFrame.commands` entries (Command{eager_op}, Command{upload}, Command{free}: byte for byte what protobuf
// writes, as client/session.py's eager_command and upload_command write them), and every $GPUPOOL_FLUSH_OPS commands
// (32 by default, as the Python client's frames), and at every sync, the buffer goes to Python once (the
// `gpupool_native::send` / `sync_scalar` / `download` operators, implemented in Python by client/native/backend.py
// over client/session.py's Session). Compact records
// (gpupool/compact.py): u32 op id (u8 name length and the name the first time), u8 n, u64 outputs, u8 n, args,
// u8 n, (u8 length, name, arg) kwargs; kwarg-only arguments of the schema go by name.
//
// Handles: the daemon names tensors, not storages. A storage's handle (its DataPtr id's low bits + its device's session's
// handle base: each device its own session, Dev)
// names the tensor its first op made (its "base" geometry). A tensor argument with another geometry on that storage
// (a view: t(), expand, a slice) travels as a view argument (compact tag VIEW: the storage's handle and the view's
// sizes, strides and storage offset; a tensor list with such elements as VIEWS), which the daemon applies to the
// handle's tensor for that record only (compact.view_of, bounds checked against the storage as it is then): no record
// of its own. As the Python shim (client/torch/encode.py `_c_view`, `_c_tensor_list`), three cases need a daemon
// tensor of the view's own instead, a view handle made by an `aten::as_strided` record from the storage's handle and
// cached per storage and geometry until the storage dies (then freed with it):
//   - every view argument of an op that may change its written arguments' sizes, strides or storage (WireOp.reshapes:
//     it writes an argument and has an out= argument, or is neither pointwise nor a `_foreach_` op nor one of
//     copy_/zero_/fill_/bernoulli_/normal_/uniform_: resize_, set_, t_, out= ops that resize);
//   - a tensor list holding a None (the plain TENSORS form, 0 for the None; VIEWS has no None element);
//   - whatever names a tensor by handle alone: a sync (`.item()`, `.cpu()`), the Python fallback (`wire_handle`);
// and a view with another dtype than its storage's (`retyped_handle`), or of more than 64 dims, goes by handle.
// ---------------------------------------------------------------------------------------------------------------------

// Compact tags (gpupool/compact.py).
enum : uint8_t { T_NONE = 0, T_TENSOR, T_INT, T_FLOAT, T_BOOL, T_TENSORS, T_INTS, T_FLOATS, T_BOOLS, T_DTYPE, T_DEVICE,
                 T_CPU, T_LAYOUT, T_MEMORY_FORMAT, T_VIEW, T_VIEWS };
constexpr size_t kMaxViewDims = 64;                      // compact.MAX_DIMS
constexpr size_t kFlushCommands = 32;                    // client/torch/runtime.py FLUSH_OPS (the default)
constexpr size_t kChunkBytes = 4 * 1024 * 1024;          // gpupool/wire.py CHUNK_BYTES: an upload's chunks
constexpr size_t kMaxUpload = 12 * 1024 * 1024;         // a frame (< kFlushBytes before it) stays under the daemon's
                                                          // 16 MiB default --max-message-size (until round 47: 32 MiB,
                                                          // and an upload of 16-32 MiB ended the session)
constexpr size_t kFlushBytes = 1024 * 1024;              // client/session.py MAX_BATCH_BYTES: a frame goes out past it
constexpr size_t kSideUpload = 1024 * 1024;              // client/bulk.py MIN_UPLOAD: outside a recorded step an upload
                                                          // of this many bytes or more goes through Session.upload (the
                                                          // side socket's bulk bytes, straight from the tensor: round 52)

bool g_wire = false;                                      // wire mode (configure_wire ran for some device)
size_t g_flush_commands = kFlushCommands;                 // commands a frame (configure_wire: $GPUPOOL_FLUSH_OPS)
int g_dtype_code[64];                                     // c10::ScalarType -> tensor.proto DType (-1: none)
int g_layout_strided = -1;                                // tensor.proto Layout of torch.strided
int g_mf_code[4] = {-1, -1, -1, -1};                      // c10::MemoryFormat -> tensor.proto MemoryFormat
std::unordered_set<std::string> g_wire_ops;               // the op set the wire mode sends (g_wire_all: every op)
bool g_wire_all = false;
bool g_python = false;                                    // a Python fallback is registered (PrivateUse2)

// `gpupool run --native-client`: the session is attached at the first tensor made on the device (as the Python
// shim's device() attaches on first use), by the Python operator `gpupool_native::autoconnect` (backend.py
// `_autoconnect`), which calls configure_wire. Set once by `set_autoconnect`.
std::atomic<bool> g_autoconnect{false};

// A device index the process can name: one of the lease's (0..g_count-1).
inline DeviceIndex checked_index(DeviceIndex i) {
  TORCH_CHECK(i >= 0 && i < g_count.load(), "gpupool --native-client: gpupool:", static_cast<int>(i),
              " is not a device of this process (", g_count.load(), " leased: gpupool:0..", g_count.load() - 1, ")");
  return i;
}

// The device a factory makes its tensor on: its device argument's index, else the current device.
inline DeviceIndex factory_index(std::optional<Device> device) {
  return checked_index(device && device->has_index() ? device->index() : t_current);
}

// A storage's geometry. Its dims are inline up to 6 (round 48: two std::vector copies, four heap calls, for every new
// output's Store, made and freed once per op).
using Dims = c10::SmallVector<int64_t, 6>;
struct Geo {
  at::ScalarType dtype = at::kFloat;
  Dims sizes, strides;
  int64_t offset = 0;
  Geo() = default;
  Geo(at::ScalarType d, c10::IntArrayRef s, c10::IntArrayRef st, int64_t o)
      : dtype(d), sizes(s.begin(), s.end()), strides(st.begin(), st.end()), offset(o) {}
  static Geo of(const at::Tensor& t) { return {t.scalar_type(), t.sizes(), t.strides(), t.storage_offset()}; }
  bool same(const at::Tensor& t) const {  // a loop, not memcmp through the PLT: a few dims (round 48)
    if (t.scalar_type() != dtype || t.storage_offset() != offset) return false;
    const c10::IntArrayRef ts = t.sizes(), tt = t.strides();
    const size_t n = sizes.size();
    if (ts.size() != n || tt.size() != n) return false;
    for (size_t i = 0; i < n; i++)
      if (ts[i] != sizes[i] || tt[i] != strides[i]) return false;
    return true;
  }
};
struct Store {
  Geo base;
  std::vector<std::pair<Geo, uint64_t>> views;  // as_strided handles on this storage
  int64_t nbytes = 0;                           // the storage's bytes, counted in its Dev's `held` (`hold`)
};
// One device's session as the records see it (wire mode; the fields but send_mu are guarded by g_mu).
struct Dev {
  bool wire = false;                          // its session is attached (configure_wire)
  uint64_t base = 0;                          // the session's handle_base
  Buf buf;                                    // the frame being written
  size_t cmds = 0;                            // commands in buf
  std::unordered_map<uint64_t, Store> stores;                       // storage id -> what the daemon holds
  std::vector<std::pair<uint64_t, std::vector<uint8_t>>> pending;   // empty/empty_strided held back (args part)
  std::vector<uint8_t> named;                 // op id -> its name went out on this session's stream
  Buf out;                                    // the frame being handed to Python (guarded by send_mu)
  std::mutex send_mu;                         // frames go to Python in the order they were cut
  // Step capture (client/native/capture.py): while a thread records a step on this device (`record_start`), every
  // command that thread writes into the frame, and every Free any thread writes, is also appended to `tape` (the
  // recording, decoded by Python at `record_stop`). The recording thread's view handles are its own (`rec_views`,
  // freed with their storage or at the end: two recordings of one step make the same as_strided records), and its
  // records name views by view handle, never by view argument (a graph's op names tensors by slot). `watched`: handles
  // a defined graph binds; their Frees are noted in `fired` (`fired`: the graph is re-recorded, or stops writing one).
  bool taping = false;
  Buf tape;
  std::vector<std::pair<std::pair<uint64_t, Geo>, uint64_t>> rec_views;  // (storage id, geometry) -> view handle id
  std::unordered_set<uint64_t> watched;
  std::vector<int64_t> fired;
  // The bytes of the storages in `stores` (reserve52): a bound of what the session holds on the daemon, which
  // knows no other tenant's use. Past the session's quota (`hold`) `near` makes the next frame a sync (`flush_frame`,
  // `sync_near`): the daemon's refusal of that op is raised at the call that made it, as CUDA's allocator raises.
  int64_t held = 0;
  std::atomic<bool> near{false};              // (read without g_mu by frame_full and flush_frame)
  std::vector<uint64_t> dead;                 // drain_frees_wire's, swapped with this device's free list
  Buf freed, free_msg;                        // drain_frees_wire's Free handles, emit_free's message (kept: no
                                              // allocation a frame)
  uint64_t handle(uint64_t sid) const { return base + (sid & kIdMask); }  // a storage's wire handle
};
Dev g_devs[kMaxDevices];

// A storage the daemon holds from now on (its Store `st`, of `n` bytes), or one resized to `n`: counted in d.held.
// Past the session's quota the frame that carries it goes out as a sync (`near`): far from the quota nothing more.
// Under g_mu.
inline void hold(Dev& d, Store& st, size_t n) {
  d.held += static_cast<int64_t>(n) - st.nbytes;
  st.nbytes = static_cast<int64_t>(n);
  const int64_t quota = g_quota[&d - g_devs].load(std::memory_order_relaxed);
  if (__builtin_expect(quota > 0 && d.held > quota, 0)) d.near.store(true, std::memory_order_relaxed);
}
thread_local int t_recdev = -1;  // the device this thread records a step on (-1: none)

// Under g_mu. d.taping first: record_start/record_stop set it with t_recdev, so no step recorded on d costs no
// thread-local read (round 48: a __tls_get_addr call in this shared library at every view argument).
inline bool recording_here(const Dev& d) { return d.taping && t_recdev == &d - g_devs; }

// The bytes a command just wrote into d's frame (from `start`), onto the tape of a step being recorded there: the
// recording thread's commands, and every thread's Frees (`any_thread`).
inline void tape_from(Dev& d, size_t start, bool any_thread) {
  if (__builtin_expect(d.taping, 0) && (any_thread || recording_here(d)))
    put_bytes(d.tape, d.buf.data() + start, d.buf.n - start);
}

// Wire mode: device i's session must be attached (it is, by ensure_wire, under `gpupool run --native-client`).
inline DeviceIndex wired(DeviceIndex i) {
  TORCH_CHECK(g_devs[i].wire, "gpupool native client: gpupool:", static_cast<int>(i), " has no session attached");
  return i;
}

inline Dev& dev_of(const at::Tensor& t) { return g_devs[wired(t.device().index())]; }

// The session of device `i` is attached from the first tensor made on it (`gpupool run --native-client`: the
// Python operator `gpupool_native::autoconnect`, backend.py `_autoconnect`, calls configure_wire for it).
inline void ensure_wire(DeviceIndex i) {
  if (g_devs[i].wire || !g_autoconnect.load(std::memory_order_relaxed)) return;
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("gpupool_native::autoconnect", "").typed<void(int64_t)>();
  op.call(i);
}

struct WireOp {
  bool allowed = false;
  bool reshapes = false;  // may change a written argument's geometry: its view arguments go by handle (see Handles:)
  bool numbers = false;   // the daemon's call of it takes a number for a Tensor argument (a wrapped number goes so)
  size_t npos = 0;
  std::vector<uint8_t> kind;  // per schema argument: 0 (by value), T_DTYPE, T_LAYOUT, T_MEMORY_FORMAT
};
std::vector<WireOp> g_wire_info;  // by op id
// This thread's scratch for a record and its meta-cache key, reached once per op through a call (round 48: GCC's
// global-dynamic TLS model in this shared library called __tls_get_addr at every use of a thread_local object, some
// 20 times an op).
struct Scratch {
  Buf rec;
  std::string key;
};
__attribute__((noinline)) Scratch& scratch() {
  thread_local Scratch s;
  return s;
}
struct WireStats {
  int64_t frames = 0, view_handles = 0, frees = 0, skipped_views = 0, python_ops = 0, view_args = 0;
  int64_t kept_moves = 0;  // `move_kept`: kept tensors moved off a storage an alias shares, at a replay
} g_wstats;

inline void put_varint(Buf& b, uint64_t v) {
  while (v >= 0x80) {
    put<uint8_t>(b, static_cast<uint8_t>(v | 0x80));
    v >>= 7;
  }
  put<uint8_t>(b, static_cast<uint8_t>(v));
}

inline size_t varint_len(uint64_t v) {
  size_t n = 1;
  while (v >= 0x80) {
    v >>= 7;
    n++;
  }
  return n;
}

// One ClientFrame.commands entry: tag 1, the Command (field `field_tag`, length-delimited `body`).
void emit_command(Dev& d, const uint8_t* field_tag, size_t tag_len, const Buf& body) {
  const size_t start = d.buf.n;
  const size_t cmd = tag_len + varint_len(body.n) + body.n;
  put<uint8_t>(d.buf, 0x0a);
  put_varint(d.buf, cmd);
  put_bytes(d.buf, field_tag, tag_len);
  put_varint(d.buf, body.n);
  put_bytes(d.buf, body.v.data(), body.n);
  d.cmds++;
  tape_from(d, start, tag_len == 1 && field_tag[0] == 0x22);  // Command.free (4): any thread's
}

uint32_t op_id(const c10::OperatorHandle& op);

WireOp& wire_info(const c10::OperatorHandle& op, uint32_t id, bool internal) {
  if (g_wire_info.size() <= id) g_wire_info.resize(id + 1);
  WireOp& w = g_wire_info[id];
  if (w.kind.empty() && !op.schema().arguments().empty()) {
    for (const auto& a : op.schema().arguments()) {
      c10::TypePtr t = a.real_type();
      if (auto o = t->cast<c10::OptionalType>()) t = o->getElementType();
      const auto k = t->kind();
      w.kind.push_back(k == c10::TypeKind::ScalarTypeType   ? T_DTYPE
                       : k == c10::TypeKind::LayoutType     ? T_LAYOUT
                       : k == c10::TypeKind::MemoryFormatType ? T_MEMORY_FORMAT
                                                              : 0);
      if (!a.kwarg_only()) w.npos++;
    }
    // client/torch/meta.py Schema.reshapes, on the schema: writes an argument, and has an out= argument or is neither
    // pointwise nor `_foreach_` nor one of the ops that write values only
    static const std::unordered_set<std::string> values{"aten::copy_", "aten::zero_", "aten::fill_",
                                                        "aten::bernoulli_", "aten::normal_", "aten::uniform_"};
    bool mutates = false, out = false;
    for (const auto& a : op.schema().arguments()) {
      mutates |= a.alias_info() != nullptr && a.alias_info()->isWrite();
      out |= a.is_out();
    }
    const std::string& base = op.schema().name();
    w.reshapes = mutates && (out || !(op.hasTag(at::Tag::pointwise) || base.rfind("aten::_foreach_", 0) == 0 ||
                                      values.count(base) > 0));
    w.allowed = g_wire_all || g_wire_ops.count(g_op_names[id]) > 0;
    w.numbers = base.rfind("aten::", 0) == 0 && torch::should_allow_numbers_as_tensors(base.substr(6));
  }
  if (internal) w.allowed = true;
  return w;
}

// A compact record: head (op id, the name the first time), outputs, then `args` (the argument part). Written
// straight into d's frame as emit_command would write it (round 48: it was built in a thread-local buffer first and
// copied over), its lengths known up front.
void emit_record(Dev& d, uint32_t id, c10::ArrayRef<uint64_t> outs, const Buf& args) {
  if (d.named.size() <= id) d.named.resize(id + 1, 0);
  const bool first = !d.named[id];  // each session learns an op's name on its own stream
  const std::string* name = first ? &g_op_names[id] : nullptr;
  const size_t name_len = first ? name->size() : 0;
  const size_t body = 4 + 1 + name_len + 1 + outs.size() * sizeof(uint64_t) + args.n;
  static const uint8_t tag[] = {0xf2, 0x01};  // Command.eager_op (30)
  const size_t cmd = sizeof(tag) + varint_len(body) + body;
  const size_t start = d.buf.n;
  put<uint8_t>(d.buf, 0x0a);  // ClientFrame.commands (1)
  put_varint(d.buf, cmd);
  put_bytes(d.buf, tag, sizeof(tag));
  put_varint(d.buf, body);
  uint8_t* p = d.buf.grow(body);
  std::memcpy(p, &id, 4);
  p[4] = static_cast<uint8_t>(name_len);
  p += 5;
  if (first) {
    std::memcpy(p, name->data(), name_len);
    p += name_len;
    d.named[id] = 1;
  }
  *p++ = static_cast<uint8_t>(outs.size());
  if (!outs.empty()) std::memcpy(p, outs.data(), outs.size() * sizeof(uint64_t));
  p += outs.size() * sizeof(uint64_t);
  if (args.n) std::memcpy(p, args.v.data(), args.n);
  d.cmds++;
  tape_from(d, start, false);
  g_stats.op_records++;
  g_stats.bytes += static_cast<int64_t>(body);
}

inline void put_ints(Buf& b, uint8_t tag, c10::IntArrayRef v) {
  put<uint8_t>(b, tag);
  put<uint16_t>(b, static_cast<uint16_t>(v.size()));
  put_bytes(b, v.data(), v.size() * sizeof(int64_t));
}

const c10::OperatorHandle& named_op(const char* name) {
  static std::unordered_map<std::string, c10::OperatorHandle> ops;
  auto it = ops.find(name);
  if (it == ops.end()) {
    const std::string full(name);  // "aten::view.dtype": the name and its overload
    const size_t dot = full.find('.');
    const std::string op = full.substr(0, dot), overload = dot == std::string::npos ? "" : full.substr(dot + 1);
    it = ops.emplace(name, c10::Dispatcher::singleton().findSchemaOrThrow(op.c_str(), overload.c_str())).first;
  }
  return it->second;
}

// The id of an op the client sends of its own accord (as_strided for a view handle, empty_strided, copy_), its name
// defined on the wire the first time.
uint32_t internal_op(const char* name) {
  const auto& op = named_op(name);
  const uint32_t id = op_id(op);
  wire_info(op, id, true);
  return id;
}

// View handle `vh` of storage `sid` (geometry `g`) kept: the recording thread's own while it records. Its wire handle.
uint64_t keep_view(Dev& d, uint64_t sid, Store& s, const Geo& g, uint64_t vh, bool rec) {
  if (rec)
    d.rec_views.push_back({{sid, g}, vh});
  else
    s.views.emplace_back(g, vh);
  g_wstats.view_handles++;
  return d.base + vh;
}

// A view handle made now (cached like the others) whose tensor is `Geo g` of the tensor `from` names.
uint64_t strided_handle(Dev& d, uint64_t sid, Store& s, uint64_t from, const Geo& g, bool rec) {
  const uint64_t vh = g_next.fetch_add(1, std::memory_order_relaxed);
  Buf local;
  put<uint8_t>(local, 4);
  put<uint8_t>(local, T_TENSOR);
  put<uint64_t>(local, from);
  put_ints(local, T_INTS, g.sizes);
  put_ints(local, T_INTS, g.strides);
  put<uint8_t>(local, T_INT);
  put<int64_t>(local, g.offset);
  put<uint8_t>(local, 0);
  emit_record(d, internal_op("aten::as_strided"), {d.base + vh}, local);
  return keep_view(d, sid, s, g, vh, rec);
}

// The handle of the whole storage `sid` as one flat tensor of `dtype` (a view of another dtype than its storage's:
// `view_as_complex` of a float tensor, `view_as_real`, `view(dtype)`): `as_strided` of the storage's tensor to its
// elements in a row, then `view.dtype` of that (both cached as view handles of the storage, freed with it); the view
// is then `as_strided` of this handle, in `dtype`'s elements. Until round 48 refused ("a view with another dtype than
// its storage's").
uint64_t retyped_handle(Dev& d, uint64_t sid, Store& s, const at::Tensor& t, bool rec) {
  const at::ScalarType dtype = t.scalar_type();
  const int code = g_dtype_code[static_cast<int>(dtype)];
  TORCH_CHECK(code >= 0, "gpupool native client: no wire code for ", dtype);
  const int64_t from_size = static_cast<int64_t>(c10::elementSize(s.base.dtype));
  const int64_t to_size = static_cast<int64_t>(c10::elementSize(dtype));
  const int64_t unit = std::max(from_size, to_size);  // element sizes are powers of two: their lcm
  const int64_t whole = (static_cast<int64_t>(t.storage().nbytes()) / unit) * unit;  // bytes both dtypes show
  Geo to{dtype, {whole / to_size}, {1}, 0};
  for (const auto& [g, h] : s.views)
    if (g.dtype == to.dtype && g.sizes == to.sizes && g.strides == to.strides && g.offset == 0) return d.base + h;
  if (rec)
    for (const auto& [k, h] : d.rec_views)
      if (k.first == sid && k.second.dtype == to.dtype && k.second.sizes == to.sizes && k.second.strides == to.strides &&
          k.second.offset == 0)
        return d.base + h;
  const uint64_t flat = strided_handle(d, sid, s, d.handle(sid), Geo{s.base.dtype, {whole / from_size}, {1}, 0}, rec);
  const uint64_t vh = g_next.fetch_add(1, std::memory_order_relaxed);
  Buf local;
  put<uint8_t>(local, 2);
  put<uint8_t>(local, T_TENSOR);
  put<uint64_t>(local, flat);
  put<uint8_t>(local, T_DTYPE);
  put<uint8_t>(local, static_cast<uint8_t>(code));
  put<uint8_t>(local, 0);
  emit_record(d, internal_op("aten::view.dtype"), {d.base + vh}, local);
  return keep_view(d, sid, s, to, vh, rec);
}

// The wire handle of a device tensor: its storage's, or a view handle (made now, once per geometry and storage).
uint64_t wire_handle(Dev& d, const at::Tensor& t) {
  const uint64_t sid = handle_of(t);
  auto it = d.stores.find(sid);
  TORCH_CHECK(it != d.stores.end(), "gpupool native client: a tensor on a storage the daemon never saw (storage ", sid, ")");
  Store& s = it->second;
  if (s.base.same(t)) return d.handle(sid);
  for (const auto& [g, h] : s.views)
    if (g.same(t)) return d.base + h;
  const bool rec = recording_here(d);
  if (rec)
    for (const auto& [k, h] : d.rec_views)
      if (k.first == sid && k.second.same(t)) return d.base + h;
  uint64_t from = d.handle(sid);
  if (t.scalar_type() != s.base.dtype) from = retyped_handle(d, sid, s, t, rec);
  return strided_handle(d, sid, s, from, Geo::of(t), rec);
}

// A device tensor as a record names it (`views`: the op may take view arguments, !WireOp.reshapes): its storage's
// handle (TENSOR) when it has its storage's base geometry, else a view argument (VIEW: the storage's handle and the
// tensor's geometry, gpupool/compact.py `view`), or, where views may not travel so, a view handle (`wire_handle`).
void put_ref(Dev& d, Buf& b, const at::Tensor& t, bool views) {
  const uint64_t sid = handle_of(t);
  auto it = d.stores.find(sid);
  TORCH_CHECK(it != d.stores.end(), "gpupool native client: a tensor on a storage the daemon never saw (storage ", sid, ")");
  const Geo& base = it->second.base;
  if (base.same(t)) {
    put<uint8_t>(b, T_TENSOR);
    put<uint64_t>(b, d.handle(sid));
    return;
  }
  const size_t n = static_cast<size_t>(t.dim());
  if (!views || t.scalar_type() != base.dtype || n > kMaxViewDims) {
    put<uint8_t>(b, T_TENSOR);
    put<uint64_t>(b, wire_handle(d, t));
    return;
  }
  // u8 VIEW, u64 handle, u8 rank, i64 sizes[rank], i64 strides[rank], i64 offset (torch's are never negative)
  uint8_t* p = b.grow(1 + 8 + 1 + (2 * n + 1) * sizeof(int64_t));
  const uint64_t h = d.handle(sid);
  const int64_t off = t.storage_offset();
  p[0] = T_VIEW;
  std::memcpy(p + 1, &h, 8);
  p[9] = static_cast<uint8_t>(n);
  std::memcpy(p + 10, t.sizes().data(), n * sizeof(int64_t));
  std::memcpy(p + 10 + n * sizeof(int64_t), t.strides().data(), n * sizeof(int64_t));
  std::memcpy(p + 10 + 2 * n * sizeof(int64_t), &off, sizeof(off));
  g_wstats.view_args++;
}

// Frees of the storages that died, as one Command{free}: a storage's handle and its view handles (a recording's own,
// `rec_views`, too: none is found for a later storage, and the daemon holds none past its storage). A storage whose
// empty was held back and never sent is simply forgotten. Storage ids are never reused (g_next counts up).
// One Free command of the handles in `packed` (varints) into d's frame.
void emit_free(Dev& d, const Buf& packed) {
  Buf& fr = d.free_msg;
  fr.clear();
  put<uint8_t>(fr, 0x0a);  // Free.handles (1), packed
  put_varint(fr, packed.n);
  put_bytes(fr, packed.v.data(), packed.n);
  static const uint8_t tag[] = {0x22};  // Command.free (4)
  emit_command(d, tag, 1, fr);
}

void drain_frees_wire(Dev& d) {
  std::vector<uint64_t>& dead = d.dead;  // swapped with the free list: both keep their capacity
  dead.clear();
  {
    std::lock_guard<std::mutex> flock(g_free_mu);
    std::vector<uint64_t>& list = g_free[&d - g_devs];
    if (list.empty()) return;
    dead.swap(list);
  }
  Buf& packed = d.freed;
  packed.clear();
  for (uint64_t sid : dead) {
    auto p = std::find_if(d.pending.begin(), d.pending.end(), [sid](const auto& e) { return e.first == sid; });
    const bool held = p != d.pending.end();
    if (held) d.pending.erase(p);
    auto it = d.stores.find(sid);
    if (it == d.stores.end()) continue;
    if (!held) put_varint(packed, d.handle(sid));
    for (const auto& v : it->second.views) put_varint(packed, d.base + v.second);
    if (!d.watched.empty()) {
      if (d.watched.erase(d.handle(sid))) d.fired.push_back(static_cast<int64_t>(d.handle(sid)));
      for (const auto& v : it->second.views)
        if (d.watched.erase(d.base + v.second)) d.fired.push_back(static_cast<int64_t>(d.base + v.second));
    }
    if (__builtin_expect(!d.rec_views.empty(), 0)) {  // a step records: its view handles of this storage die with it
      auto& rv = d.rec_views;
      rv.erase(std::remove_if(rv.begin(), rv.end(),
                              [&](const auto& e) {
                                if (e.first.first != sid) return false;
                                put_varint(packed, d.base + e.second);
                                return true;
                              }),
               rv.end());
    }
    d.held -= it->second.nbytes;
    d.stores.erase(it);
  }
  if (packed.n == 0) return;
  emit_free(d, packed);
  g_stats.free_records++;
  g_wstats.frees++;
}

void materialize_pending(Dev& d) {
  if (d.pending.empty()) return;
  const uint32_t id = internal_op("aten::empty_strided");
  for (auto& [sid, args] : d.pending) {
    Buf b;
    put_bytes(b, args.data(), args.size());
    emit_record(d, id, {d.handle(sid)}, b);
  }
  d.pending.clear();
}

// Before a record: the held-back empties it may name. Frees wait for the frame's end (take_frame_locked), one
// Command{free} per frame as the runtime batches them: handles are never reused, so a late free is still right.
inline void prelude_wire(Dev& d) {
  if (d.pending.empty()) return;
  drain_frees_wire(d);  // an empty that died unsent is dropped, not sent
  materialize_pending(d);
}

inline int64_t index_of(const Dev& d) { return &d - g_devs; }

// The frame so far, moved to d.out (swapped out of d.buf: no copy; both keep their capacity); its size. d.out is
// valid while the caller holds d.send_mu (whoever takes a frame holds it until it is sent).
size_t cut_frame_locked(Dev& d) {
  drain_frees_wire(d);
  d.out.clear();
  std::swap(d.out.v, d.buf.v);
  std::swap(d.out.n, d.buf.n);
  d.cmds = 0;
  g_wstats.frames++;
  return d.out.size();
}

// The frame so far, as a tensor over d.out's bytes (`cut_frame_locked`; not owning them).
at::Tensor take_frame_locked(Dev& d) {
  if (cut_frame_locked(d) == 0) return at::empty({0}, at::kByte);
  return at::from_blob(d.out.data(), {static_cast<int64_t>(d.out.size())}, at::kByte);
}

// A frame's hand-off to Python without the dispatcher (round 49): the Python function backend.py registered
// (`gpupool_native_set_hand_off`, through ctypes.PyDLL: `_hand_off`, which calls the device's Session.send_commands)
// called with the frame as one bytes object and the device's index, under the GIL. Until round 49 every frame went
// through the `gpupool_native::send` operator: torch's boxed Python kernel (IValues to Python objects), a Tensor
// object over the buffer, its `.numpy().tobytes()` (~25k instructions a frame of the ~50k the hand-off cost, tiny
// MLP: BENCHMARKS.md "Round 49, transport49"). The bytes are the same (a copy of the buffer, as tobytes made). CPython's
// functions are found with dlsym in the process (all of them in the stable ABI since 3.2): none, no fast path, and
// the frame goes through the operator as before (a process without Python does not reach here: frames go to Python).
struct PyHandOff {
  using Obj = void*;
  int (*ensure)() = nullptr;  // PyGILState_Ensure (PyGILState_STATE: an enum, int-sized)
  void (*release)(int) = nullptr;
  Obj (*bytes)(const char*, ssize_t) = nullptr;    // PyBytes_FromStringAndSize
  Obj (*integer)(long long) = nullptr;             // PyLong_FromLongLong
  Obj (*call)(Obj, ...) = nullptr;                 // PyObject_CallFunctionObjArgs (NULL-terminated)
  int (*truth)(Obj) = nullptr;                     // PyObject_IsTrue
  void (*decref)(Obj) = nullptr;                   // Py_DecRef
  void (*incref)(Obj) = nullptr;                   // Py_IncRef
  void (*clear)() = nullptr;                       // PyErr_Clear
  std::atomic<Obj> fn{nullptr};                    // the Python function (a reference held for good)
  template <typename F>
  static bool find(F& f, const char* name) {
    f = reinterpret_cast<F>(dlsym(RTLD_DEFAULT, name));
    return f != nullptr;
  }
  bool resolve() {
    return find(ensure, "PyGILState_Ensure") && find(release, "PyGILState_Release") &&
           find(bytes, "PyBytes_FromStringAndSize") && find(integer, "PyLong_FromLongLong") &&
           find(call, "PyObject_CallFunctionObjArgs") && find(truth, "PyObject_IsTrue") &&
           find(decref, "Py_DecRef") && find(incref, "Py_IncRef") && find(clear, "PyErr_Clear");
  }
  // 0: handed over; 1: the Python function caught an error (it keeps it for `gpupool_native::hand_off_failed`);
  // -1: the call itself failed before the function ran (no memory for the bytes object): nothing was handed over.
  int operator()(Obj f, const uint8_t* p, size_t n, int64_t index) {
    const int gil = ensure();
    int r = -1;
    if (Obj b = bytes(reinterpret_cast<const char*>(p), static_cast<ssize_t>(n))) {
      if (Obj i = integer(index)) {
        if (Obj res = call(f, b, i, nullptr)) {
          r = truth(res);
          decref(res);
        }
        decref(i);
      }
      decref(b);
    }
    if (r < 0) clear();
    release(gil);
    return r < 0 ? -1 : r;
  }
} g_hand_off;
std::atomic<int64_t> g_direct_frames{0};  // frames handed over by g_hand_off (wire_stats' "direct_frames")

// Hand device d's buffer to Python (to its session's send_commands): one call per frame, by `g_hand_off` where
// backend.py registered it, else by the `gpupool_native::send` operator.
void send_frame(Dev& d) {
  std::lock_guard<std::mutex> send(d.send_mu);
  size_t n;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    n = cut_frame_locked(d);
  }
  if (n == 0) return;
  if (void* fn = g_hand_off.fn.load(std::memory_order_acquire)) {
    const int r = g_hand_off(fn, d.out.data(), n, index_of(d));
    if (r == 0) {
      g_direct_frames.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    if (r > 0) {  // send_commands raised: the operator raises that exception (translated) as `send` raised it
      static auto failed = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("gpupool_native::hand_off_failed", "")
                               .typed<void(int64_t)>();
      failed.call(index_of(d));
      TORCH_CHECK(false, "gpupool native client: a frame's hand-off failed and left no error");
    }
    // r < 0: nothing was handed over; the operator below hands the same bytes over (or raises why not)
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("gpupool_native::send", "")
                       .typed<void(const at::Tensor&, int64_t)>();
  op.call(at::from_blob(d.out.data(), {static_cast<int64_t>(n)}, at::kByte), index_of(d));
}

inline bool frame_full(const Dev& d) {
  return d.cmds >= g_flush_commands || d.buf.size() >= kFlushBytes || d.near.load(std::memory_order_relaxed);
}

// A frame out (send_frame) at the end of a kernel. Past the session's quota (Dev::near, `hold`: reserve52) a sync
// follows, by the `gpupool_native::sync_near` operator (backend.py): the daemon's refusal of the op that went past is
// raised at its call, as CUDA's allocator raises at the allocation, before the script's next lines (its backward, an
// optimizer's step) run on a tensor without a value. Not on a thread recording a step (a sync is refused there: the
// flag waits for its end). An empty held back goes with the op that first names it, whose end is the next flush here.
void flush_frame(Dev& d) {
  send_frame(d);
  if (__builtin_expect(!d.near.load(std::memory_order_relaxed), 1)) return;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    if (recording_here(d) || !d.near.exchange(false, std::memory_order_relaxed)) return;
    drain_frees_wire(d);  // storages that died since (a refused one): back within the quota, no sync
    if (d.held <= g_quota[index_of(d)].load(std::memory_order_relaxed)) return;
  }
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("gpupool_native::sync_near", "").typed<void(int64_t)>();
  if (op.hasKernelForDispatchKey(c10::DispatchKey::CompositeExplicitAutograd)) op.call(index_of(d));
}

// A tensor argument. A 0-dim CPU tensor goes as a number only where that is what it is and the daemon's call of the op
// takes one (`numbers`: add, mul, ...; a Python number `x * 2` reaches the op as a wrapped number); any other throws
// here, and the op goes to the Python fallback: a `torch.tensor(2.0, dtype=torch.float64)`, whose dtype takes part in
// type promotion as a number's does not, is sent inline in an `Op`, as the Python client sends it; a wrapped number
// reaches Python as a number, and an op whose call refuses one fails there with torch's own error (the Scalar
// overloads that would make such calls, `x % 3`'s remainder.Scalar, are sent whole: `claim`).
void put_wire_tensor(Dev& d, Buf& b, std::string& k, const at::Tensor& t, bool views, bool numbers) {
  key_tensor(k, t);
  if (!t.defined()) {
    put<uint8_t>(b, T_NONE);
  } else if (t.device().type() == kType) {
    put_ref(d, b, t, views);
  } else {
    TORCH_CHECK(t.device().is_cpu() && t.dim() == 0, "gpupool native client: a ", t.device(), " tensor of ", t.dim(),
                " dims among a device op's arguments: only 0-dim CPU tensors (sent as numbers) are in the native client");
    TORCH_CHECK(numbers && t.unsafeGetTensorImpl()->is_wrapped_number(), "gpupool native client: a 0-dim CPU tensor "
                "that is no number the daemon takes (sent inline by the Python fallback)");
    if (at::isFloatingType(t.scalar_type())) {
      put<uint8_t>(b, T_FLOAT);
      put<double>(b, t.item<double>());
    } else if (t.scalar_type() == at::kBool) {
      put<uint8_t>(b, T_BOOL);
      put<uint8_t>(b, t.item<bool>());
    } else {
      TORCH_CHECK(at::isIntegralType(t.scalar_type(), false), "gpupool native client: a complex CPU scalar tensor argument");
      put<uint8_t>(b, T_INT);
      put<int64_t>(b, t.item<int64_t>());
    }
  }
}

// One argument in the compact format (b) and into the meta-cache key (k, as put_arg keys it); `views`: as put_ref's.
void put_wire_arg(Dev& d, Buf& b, std::string& k, const IValue& v, uint8_t kind, bool views, bool numbers) {
  if (v.isTensor()) {
    put_wire_tensor(d, b, k, v.toTensor(), views, numbers);
  } else if (v.isNone()) {
    put<uint8_t>(b, T_NONE);
    k.push_back('N');
  } else if (v.isInt()) {
    const int64_t x = v.toInt();
    k.push_back('i');
    k.append(reinterpret_cast<const char*>(&x), sizeof(x));
    int code = -1;
    if (kind == T_DTYPE) code = (x >= 0 && x < 64) ? g_dtype_code[x] : -1;
    else if (kind == T_LAYOUT) code = x == static_cast<int64_t>(at::kStrided) ? g_layout_strided : -1;
    else if (kind == T_MEMORY_FORMAT) code = (x >= 0 && x < 4) ? g_mf_code[x] : -1;
    if (kind != 0) {
      TORCH_CHECK(code >= 0, "gpupool native client: no wire code for this dtype/layout/memory format (", x, ")");
      put<uint8_t>(b, kind);
      put<uint8_t>(b, static_cast<uint8_t>(code));
    } else {
      put<uint8_t>(b, T_INT);
      put<int64_t>(b, x);
    }
  } else if (v.isDouble()) {
    put<uint8_t>(b, T_FLOAT);
    put<double>(b, v.toDouble());
    k.push_back('d');
  } else if (v.isBool()) {
    put<uint8_t>(b, T_BOOL);
    put<uint8_t>(b, v.toBool());
    k.push_back(v.toBool() ? 'y' : 'n');
  } else if (v.isTensorList() || (v.isList() && !v.isIntList() && !v.isDoubleList() && !v.isBoolList())) {
    // Tensor[], Tensor?[] (TENSORS, 0 for None) or Scalar[] (FLOATS / INTS)
    const c10::ArrayRef<IValue> items = v.toListRef();  // any list's elements, without copies
    bool tensors = true, doubles = true, ints = true;
    for (const IValue& e : items) {
      tensors &= e.isTensor() || e.isNone();
      doubles &= e.isDouble();
      ints &= e.isInt();
    }
    TORCH_CHECK(items.size() <= 65535, "gpupool native client: a list of ", items.size(), " entries");
    k.push_back('L');
    k.push_back(static_cast<char>(items.size()));
    if (tensors) {
      // VIEWS (each element TENSOR or VIEW, tag included) when an element is a view and none is a None; else the
      // plain TENSORS list of handles (views by view handle, `wire_handle`)
      // (no view: every element is its storage's base tensor, named by the storage's handle without a second look)
      bool any_view = false, any_none = false;
      for (const IValue& e : items) {
        if (e.isNone()) {
          any_none = true;
          continue;
        }
        const at::Tensor& t = e.toTensor();
        TORCH_CHECK(t.device().type() == kType, "gpupool native client: a ", t.device(), " tensor in a tensor list: not in the native client");
        if (!any_view) {
          auto it = d.stores.find(handle_of(t));
          any_view = it == d.stores.end() || !it->second.base.same(t);
        }
      }
      const bool as_views = views && any_view && !any_none;
      put<uint8_t>(b, as_views ? T_VIEWS : T_TENSORS);
      put<uint16_t>(b, static_cast<uint16_t>(items.size()));
      for (const IValue& e : items) {
        if (e.isNone()) {
          put<uint64_t>(b, 0);
          k.push_back('N');
          continue;
        }
        const at::Tensor& t = e.toTensor();
        key_tensor(k, t);
        if (as_views) {
          put_ref(d, b, t, true);
        } else if (!any_view) {
          put<uint64_t>(b, d.handle(handle_of(t)));  // wire_handle's answer for a base tensor
        } else {
          put<uint64_t>(b, wire_handle(d, t));
        }
      }
    } else if (doubles || ints) {
      put<uint8_t>(b, doubles ? T_FLOATS : T_INTS);
      put<uint16_t>(b, static_cast<uint16_t>(items.size()));
      for (const IValue& e : items) {
        if (doubles) {
          put<double>(b, e.toDouble());
        } else {
          const int64_t x = e.toInt();
          put_keyed(b, k, x);
        }
      }
    } else {
      TORCH_CHECK(false, "gpupool native client: a list of mixed values: not in the compact format");
    }
  } else if (v.isIntList()) {
    const auto list = v.toIntList();
    TORCH_CHECK(list.size() <= 65535, "gpupool native client: a list of ", list.size(), " entries");
    put<uint8_t>(b, T_INTS);
    put<uint16_t>(b, static_cast<uint16_t>(list.size()));
    k.push_back('I');
    for (size_t i = 0; i < list.size(); i++) {
      const int64_t x = list.get(i);
      put_keyed(b, k, x);
    }
  } else if (v.isDoubleList()) {
    const auto list = v.toDoubleList();
    put<uint8_t>(b, T_FLOATS);
    put<uint16_t>(b, static_cast<uint16_t>(list.size()));
    k.push_back('D');
    k.push_back(static_cast<char>(list.size()));
    for (size_t i = 0; i < list.size(); i++) put<double>(b, list.get(i));
  } else if (v.isBoolList()) {
    const auto list = v.toBoolList();
    put<uint8_t>(b, T_BOOLS);
    put<uint16_t>(b, static_cast<uint16_t>(list.size()));
    k.push_back('B');
    for (size_t i = 0; i < list.size(); i++) {
      put<uint8_t>(b, list.get(i));
      k.push_back(list.get(i) ? 'y' : 'n');
    }
  } else if (v.isDevice()) {
    const Device d = v.toDevice();
    TORCH_CHECK(d.type() == kType || d.is_cpu(), "gpupool native client: a ", d, " device argument");
    put<uint8_t>(b, d.type() == kType ? T_DEVICE : T_CPU);
    k.push_back('v');
    k.push_back(static_cast<char>(d.type()));
  } else {
    TORCH_CHECK(false, "gpupool native client: an argument of kind ", v.tagKind(), " has no compact form (strings, complex numbers, "
                "Generators: the C++ encoder does not send them)");
  }
}

// The device an op runs on: its device tensors' (all on one device, else torch's own error for tensors on two
// devices), else its device argument's index, else the current device.
void note_index(DeviceIndex& found, const at::Tensor& t) {
  if (!t.defined() || t.device().type() != kType) return;
  const DeviceIndex i = t.device().index();
  if (found < 0) {
    found = i;
    return;
  }
  TORCH_CHECK(found == i, "Expected all tensors to be on the same device, but found at least two devices, ",
              Device(kType, found), " and ", Device(kType, i), "!");
}

DeviceIndex op_index(const IValue* args, size_t nargs) {
  DeviceIndex found = -1, asked = -1;
  for (size_t i = 0; i < nargs; i++) {
    const IValue& v = args[i];
    if (v.isTensor()) {
      note_index(found, v.toTensor());
    } else if (v.isTensorList() || (v.isList() && !v.isIntList() && !v.isDoubleList() && !v.isBoolList())) {
      for (const IValue& e : v.toListRef())
        if (e.isTensor()) note_index(found, e.toTensor());
    } else if (v.isDevice() && v.toDevice().type() == kType && v.toDevice().has_index()) {
      asked = v.toDevice().index();
    }
  }
  return checked_index(found >= 0 ? found : asked >= 0 ? asked : t_current);
}

// The op's outputs onto the stack in the plan's order, a list return as one list.
void push_outputs(torch::jit::Stack* stack, const std::vector<RetPlan>& rets, c10::SmallVector<at::Tensor, 4>& made) {
  size_t k = 0;
  for (const RetPlan& r : rets) {
    if (r.is_int) {
      stack->emplace_back(r.outs[0].offset);
      k++;
    } else if (r.is_list) {
      c10::List<at::Tensor> l;
      l.reserve(r.outs.size());
      for (size_t j = 0; j < r.outs.size(); j++) l.push_back(std::move(made[k++]));
      stack->emplace_back(std::move(l));
    } else {
      stack->emplace_back(std::move(made[k++]));
    }
  }
}

// The op the C++ encoder cannot send (outside the op set; an argument the compact form lacks: a string, a complex
// number, a Generator, a CPU tensor of some size; outputs the Meta kernel cannot infer: data-dependent shapes, a
// non-tensor return) goes to the Python fallback registered at PrivateUse2 (client/native/backend.py `_python_op`),
// which sends it as a protobuf `Op` or runs it on the CPU around a sync. Called without g_mu.
void python_fallback(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  {
    std::lock_guard<std::mutex> lock(g_mu);
    g_wstats.python_ops++;
  }
  op.redispatchBoxed(DispatchKeySet(DispatchKey::PrivateUse2), stack);
}

void wire_fallback(const c10::OperatorHandle& op, torch::jit::Stack* stack, DeviceIndex index) {
  const auto& schema = op.schema();
  const auto& sargs = schema.arguments();
  const size_t nargs = sargs.size();
  IValue* args = stack->data() + (stack->size() - nargs);
  Dev& d = g_devs[index];
  TORCH_CHECK(t_recdev < 0 || t_recdev == index, "gpupool:", static_cast<int>(index), ": a captured step must run on one "
              "gpupool device (", op.schema().name(), " while recording a step on gpupool:", t_recdev, ")");
  std::unique_lock<std::mutex> lock(g_mu);
  const uint32_t id = op_id(op);
  const size_t npos = wire_info(op, id, false).npos;
  if (!g_wire_info[id].allowed) {
    TORCH_CHECK(g_python, "gpupool native client: ", g_op_names[id], " is outside the op set the C++ encoder sends: not "
                "supported");
    lock.unlock();
    python_fallback(op, stack);
    return;
  }
  prelude_wire(d);
  Scratch& sc = scratch();
  Buf& rec = sc.rec;
  rec.clear();
  std::string& key = sc.key;
  key.clear();
  key.append(reinterpret_cast<const char*>(&id), sizeof(id));
  try {
    const WireOp& w = g_wire_info[id];
    const bool views = !w.reshapes && !recording_here(d);
    put<uint8_t>(rec, static_cast<uint8_t>(npos));
    for (size_t i = 0; i < npos; i++) put_wire_arg(d, rec, key, args[i], w.kind[i], views, w.numbers);
    put<uint8_t>(rec, static_cast<uint8_t>(nargs - npos));
    for (size_t i = npos; i < nargs; i++) {
      const std::string& name = sargs[i].name();
      put<uint8_t>(rec, static_cast<uint8_t>(name.size()));
      put_bytes(rec, name.data(), name.size());
      put_wire_arg(d, rec, key, args[i], w.kind[i], views, w.numbers);
    }
  } catch (const std::exception&) {
    if (!g_python) throw;
    lock.unlock();  // an argument without a compact form: the view handles made so far stay (they are right)
    python_fallback(op, stack);
    return;
  }
  const Plan* plan = nullptr;
  Plan fresh;
  auto it = g_cache.find(key);
  if (it != g_cache.end()) {
    plan = &it->second;
    g_stats.cache_hits++;
  } else {
    lock.unlock();  // a Python meta kernel may free tensors or run ops
    std::vector<IValue> margs;
    try {
      fresh = infer(op, args, nargs, margs);
    } catch (const std::exception&) {  // c10::Error, or a Python meta kernel's error
      if (!g_python) throw;
      fresh = Plan{};  // no Meta kernel, data-dependent outputs, a non-tensor return, an out= resize: Python's
      fresh.python = true;
    }
    margs.clear();
    lock.lock();
    g_stats.meta_runs++;
    plan = &g_cache.emplace(key, std::move(fresh)).first->second;
  }
  if (plan->python) {
    lock.unlock();
    python_fallback(op, stack);
    return;
  }
  c10::SmallVector<uint64_t, 8> outs;  // no heap allocation per op
  c10::SmallVector<at::Tensor, 4> made;
  bool any_named = false;
  const AtDevice at_device(index);  // new outputs on the op's device
  for (const RetPlan& r : plan->rets) {
    for (const OutPlan& p : r.outs) {
      try {
        made.push_back(make_out(p, args));
      } catch (const QuotaExceeded& e) {
        lock.unlock();
        raise_over_quota(e);
      }
      if (p.kind == OutPlan::NEW) {
        const uint64_t sid = handle_of(made.back());
        Store& st = d.stores[sid];  // a new storage (handles are never reused): its geometry written in place
        st.base.dtype = p.dtype;
        st.base.sizes.assign(p.sizes.begin(), p.sizes.end());
        st.base.strides.assign(p.strides.begin(), p.strides.end());
        st.base.offset = p.offset;
        st.views.clear();
        hold(d, st, made.back().storage().nbytes());
        outs.push_back(d.handle(sid));
      } else {
        outs.push_back(0);
      }
      any_named |= p.kind != OutPlan::VIEW;
    }
  }
  if (any_named || outs.empty()) {
    emit_record(d, id, outs, rec);
  } else {
    g_wstats.skipped_views++;  // only views of inputs: the daemon need not compute what no handle names
  }
  const bool full = frame_full(d);
  lock.unlock();
  torch::jit::drop(*stack, nargs);
  push_outputs(stack, plan->rets, made);
  if (full) flush_frame(d);
}

// ---------------------------------------------------------------------------------------------------------------------
// The boxed fallback: every op without a kernel of its own on PrivateUse1.
// ---------------------------------------------------------------------------------------------------------------------

thread_local std::string t_key;

at::Tensor& lazy_bits_copy_(at::Tensor& self, const at::Tensor& src, bool non_blocking);

// A conjugate or negative view argument (`z.conj()`, its `.imag`) of an op torch lets through with the bit (its
// Conjugate/Negative fallthroughs: clone, which resolve_conj() calls, mm, bmm, addmm, dot, vdot, ...; every other op
// gets it materialized by torch first): a record names a storage, not the bit, so it is materialized here, as torch's
// own kernels read it. Not for a view op (its output keeps the bit, make_out) nor a written argument (refused).
// Until round 48 the bit was dropped: `a @ b.conj()`, `b.conj().resolve_conj()` computed with `b`.
void resolve_lazy_bits(const c10::OperatorHandle& op, IValue* args, size_t nargs) {
  const auto& schema = op.schema();
  for (const auto& r : schema.returns())
    if (r.alias_info() != nullptr && !r.alias_info()->isWrite()) return;
  for (size_t i = 0; i < nargs; i++) {
    if (!args[i].isTensor()) continue;
    const at::Tensor t = args[i].toTensor();
    if (!(t.is_conj() || t.is_neg()) || t.device().type() != kType) continue;
    const auto* alias = schema.arguments()[i].alias_info();
    TORCH_CHECK(alias == nullptr || !alias->isWrite(), "gpupool native client: ", schema.name(),
                " writes a conjugate or negative view: not supported (resolve_conj() / resolve_neg() it first)");
    at::Tensor plain = at::empty(t.sizes(), t.options());
    lazy_bits_copy_(plain, t, false);
    args[i] = std::move(plain);
  }
}

void spike_fallback(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const size_t nargs = op.schema().arguments().size();
  IValue* args = stack->data() + (stack->size() - nargs);
  bool bits = false;  // (two bits of each tensor argument's key set)
  for (size_t i = 0; i < nargs; i++)
    if (args[i].isTensor()) bits |= args[i].toTensor().is_conj() || args[i].toTensor().is_neg();
  if (bits) resolve_lazy_bits(op, args, nargs);
  const DeviceIndex index = op_index(args, nargs);
  ensure_wire(index);
  if (g_wire) {
    wire_fallback(op, stack, wired(index));
    return;
  }
  const AtDevice at_device(index);
  std::unique_lock<std::mutex> lock(g_mu);
  drain_frees();
  const uint32_t id = op_id(op);
  size_t at = begin_record('O');
  put<uint32_t>(g_buf, id);
  put<uint8_t>(g_buf, static_cast<uint8_t>(nargs));
  std::string& key = t_key;
  key.clear();
  key.append(reinterpret_cast<const char*>(&id), sizeof(id));
  try {
    for (size_t i = 0; i < nargs; i++) put_arg(g_buf, key, args[i]);
  } catch (...) {
    g_buf.resize(at);  // an unsupported argument: no partial record stays in the buffer
    throw;
  }
  const Plan* plan = nullptr;
  Plan fresh;
  if (g_cache_on) {
    auto it = g_cache.find(key);
    if (it != g_cache.end()) {
      plan = &it->second;
      g_stats.cache_hits++;
    }
  }
  if (plan == nullptr) {
    // Run the Meta kernel without the lock (a meta registration may be Python, which may free tensors or run ops):
    // set the record so far aside and put it back after.
    std::vector<uint8_t> head(g_buf.data() + at, g_buf.data() + g_buf.size());
    g_buf.resize(at);
    lock.unlock();
    std::vector<IValue> margs;
    fresh = infer(op, args, nargs, margs);
    margs.clear();  // meta tensors die here, outside the lock
    lock.lock();
    g_stats.meta_runs++;
    at = g_buf.size();
    put_bytes(g_buf, head.data(), head.size());
    plan = g_cache_on ? &g_cache.emplace(key, std::move(fresh)).first->second : &fresh;
  }
  size_t nouts = 0;
  for (const RetPlan& r : plan->rets) nouts += r.outs.size();
  put<uint8_t>(g_buf, static_cast<uint8_t>(nouts));
  c10::SmallVector<at::Tensor, 4> made;
  for (const RetPlan& r : plan->rets) {
    for (const OutPlan& p : r.outs) {
      made.push_back(make_out(p, args));  // the allocator does not take g_mu
      put<uint64_t>(g_buf, p.kind == OutPlan::NEW ? handle_of(made.back()) : 0);
    }
  }
  g_stats.op_records++;
  finish_record(at);
  lock.unlock();
  torch::jit::drop(*stack, nargs);  // inputs may die here: their deleters take g_free_mu only
  push_outputs(stack, plan->rets, made);
}

// ---------------------------------------------------------------------------------------------------------------------
// Kernels of our own: factories, copies, syncs, metadata-only views.
// ---------------------------------------------------------------------------------------------------------------------

// Wire mode: an empty is held back (the usual next step, a copy from the CPU, then becomes one Upload into its handle);
// anything else that names it first sends it as aten::empty_strided.
void wire_alloc(const at::Tensor& t) {
  Dev& d = dev_of(t);
  std::lock_guard<std::mutex> lock(g_mu);
  const int code = g_dtype_code[static_cast<int>(t.scalar_type())];
  TORCH_CHECK(code >= 0, "gpupool native client: no wire code for ", t.scalar_type());
  Buf b;
  put<uint8_t>(b, 2);
  put_ints(b, T_INTS, t.sizes());
  put_ints(b, T_INTS, t.strides());
  put<uint8_t>(b, 2);
  put<uint8_t>(b, 5);
  put_bytes(b, "dtype", 5);
  put<uint8_t>(b, T_DTYPE);
  put<uint8_t>(b, static_cast<uint8_t>(code));
  put<uint8_t>(b, 6);
  put_bytes(b, "device", 6);
  put<uint8_t>(b, T_DEVICE);
  const uint64_t sid = handle_of(t);
  hold(d, d.stores[sid] = Store{Geo::of(t), {}}, t.storage().nbytes());
  d.pending.emplace_back(sid, std::vector<uint8_t>(b.v.data(), b.v.data() + b.n));
  g_stats.alloc_records++;
}

void alloc_record(const at::Tensor& t) {
  if (g_wire) {
    wire_alloc(t);
    return;
  }
  std::lock_guard<std::mutex> lock(g_mu);
  drain_frees();
  const size_t at = begin_record('A');
  put<uint64_t>(g_buf, handle_of(t));
  put<uint64_t>(g_buf, t.storage().nbytes());
  g_stats.alloc_records++;
  finish_record(at);
}

at::Tensor spike_empty(c10::IntArrayRef size, std::optional<at::ScalarType> dtype, std::optional<at::Layout> layout,
                       std::optional<Device> device, std::optional<bool> /*pin*/,
                       std::optional<at::MemoryFormat> mf) {
  const DeviceIndex index = factory_index(device);
  ensure_wire(index);
  const AtDevice at_device(index);
  TORCH_CHECK(!layout || *layout == at::kStrided, "gpupool native client: only strided tensors");
  at::Tensor t;
  try {
    t = at::detail::empty_generic(size, &g_alloc, kKeys, dtype.value_or(at::get_default_dtype_as_scalartype()), mf);
  } catch (const QuotaExceeded& e) {
    raise_over_quota(e);
  }
  alloc_record(t);
  return t;
}

at::Tensor spike_empty_strided(c10::IntArrayRef size, c10::IntArrayRef stride, std::optional<at::ScalarType> dtype,
                               std::optional<at::Layout> layout, std::optional<Device> device,
                               std::optional<bool> /*pin*/) {
  const DeviceIndex index = factory_index(device);
  ensure_wire(index);
  const AtDevice at_device(index);
  TORCH_CHECK(!layout || *layout == at::kStrided, "gpupool native client: only strided tensors");
  at::Tensor t;
  try {
    t = at::detail::empty_strided_generic(size, stride, &g_alloc, kKeys, dtype.value_or(at::get_default_dtype_as_scalartype()));
  } catch (const QuotaExceeded& e) {
    raise_over_quota(e);
  }
  alloc_record(t);
  return t;
}

// `untyped_storage().resize_(n)` (torch's resize_bytes_nocuda calls the hooks' resizePrivateUse1Bytes): FSDP2 frees an
// unsharded parameter with resize_(0) and gets it back with resize_(its size) before the all-gather writes it. Wire
// mode: one Command{resize_storage} naming the storage's handle (server/storage_resize.py resizes the daemon's storage
// in place: its tensors are refused while they do not fit it, the bytes it gains are charged and zeroed), then the
// storage's own size here; its DataPtr (the handle) stays, so every tensor on it keeps naming it. A storage the daemon
// never saw (keep mode, an empty that died unsent) only changes its size.
void resize_storage_bytes(const c10::Storage& storage, size_t n) {
  TORCH_CHECK(n <= static_cast<size_t>(INT64_MAX), "gpupool: a storage cannot be resized to a negative size (",
              static_cast<int64_t>(n), ")");
  TORCH_CHECK(storage.resizable(), "Trying to resize storage that is not resizable");
  c10::StorageImpl* impl = storage.unsafeGetStorageImpl();
  if (impl->nbytes() == n) return;
  const uint64_t sid = reinterpret_cast<uintptr_t>(storage.data_ptr().get_context());
  const DeviceIndex i = storage.device().index();
  if (g_wire && i >= 0 && i < static_cast<DeviceIndex>(kMaxDevices)) {
    Dev& d = g_devs[i];
    bool full = false;
    {
      std::lock_guard<std::mutex> lock(g_mu);
      if (!d.wire) {
        impl->set_nbytes(n);
        return;
      }
      TORCH_CHECK(!recording_here(d), "gpupool native client: a storage resize (untyped_storage().resize_) inside a ",
                  "recorded step: not supported (resize it outside gpupool.torch.capture)");
      prelude_wire(d);  // an empty held back goes out first: the resize names its handle
      if (auto it = d.stores.find(sid); it != d.stores.end()) {
        hold(d, it->second, n);
        Buf b;
        put<uint8_t>(b, 0x08);  // ResizeStorage.handle (1)
        put_varint(b, d.handle(sid));
        put<uint8_t>(b, 0x10);  // ResizeStorage.nbytes (2)
        put_varint(b, n);
        static const uint8_t tag[] = {0x42};  // Command.resize_storage (8)
        emit_command(d, tag, 1, b);
        full = frame_full(d);
      }
    }
    if (full) flush_frame(d);
  }
  impl->set_nbytes(n);
}

void sync_record(const at::Tensor& t) {
  std::lock_guard<std::mutex> lock(g_mu);
  drain_frees();
  const size_t at = begin_record('S');
  put<uint64_t>(g_buf, handle_of(t));
  put_geometry(g_buf, t);
  g_stats.syncs++;
  finish_record(at);
}

// Wire mode: Command{upload}s of a contiguous CPU tensor of at most 12 MiB (kMaxUpload) into wire handle `wh`, in the frame: chunks
// of at most 4 MiB, the first with the tensor's meta, the last marked (as client/session.py's `upload` writes them on
// the stream). Outside a recorded step only those under 1 MiB come here (kSideUpload, round 52); a larger one goes
// through Session.upload itself (wire_big_upload).
void emit_upload(Dev& d, uint64_t wh, const at::Tensor& c) {
  const size_t n = c.nbytes();
  TORCH_CHECK(n <= kMaxUpload, "gpupool native client: an upload of ", n, " bytes into the frame (wire_copy_ sends those "
              "over 12 MiB through Session.upload)");
  const int code = g_dtype_code[static_cast<int>(c.scalar_type())];
  TORCH_CHECK(code >= 0, "gpupool native client: no wire code for ", c.scalar_type());
  Buf meta;
  if (code != 0) {
    put<uint8_t>(meta, 0x08);
    put_varint(meta, static_cast<uint64_t>(code));
  }
  for (int f = 0; f < 2; f++) {  // TensorMeta.shape (2), .stride (3): packed varints, left out when empty
    const auto v = f == 0 ? c.sizes() : c.strides();
    if (v.empty()) continue;
    Buf body;
    for (int64_t x : v) put_varint(body, static_cast<uint64_t>(x));
    put<uint8_t>(meta, f == 0 ? 0x12 : 0x1a);
    put_varint(meta, body.n);
    put_bytes(meta, body.v.data(), body.n);
  }
  const auto* bytes = static_cast<const uint8_t*>(c.const_data_ptr());
  const size_t start = d.buf.n;
  size_t off = 0;
  do {
    const size_t k = std::min(kChunkBytes, n - off);
    Buf head;  // the Upload's fields before its data; the data goes straight from the tensor into the frame
    put<uint8_t>(head, 0x08);  // Upload.handle (1)
    put_varint(head, wh);
    if (off == 0) {
      put<uint8_t>(head, 0x12);  // Upload.meta (2)
      put_varint(head, meta.n);
      put_bytes(head, meta.v.data(), meta.n);
    } else {
      put<uint8_t>(head, 0x18);  // Upload.offset (3)
      put_varint(head, off);
    }
    if (k) {
      put<uint8_t>(head, 0x22);  // Upload.data (4)
      put_varint(head, k);
    }
    const bool last = off + k >= n;
    const size_t up = head.n + k + (last ? 2 : 0);
    const size_t cmd = 1 + varint_len(up) + up;
    put<uint8_t>(d.buf, 0x0a);  // ClientFrame.commands (1)
    put_varint(d.buf, cmd);
    put<uint8_t>(d.buf, 0x12);  // Command.upload (2)
    put_varint(d.buf, up);
    put_bytes(d.buf, head.v.data(), head.n);
    put_bytes(d.buf, bytes + off, k);
    if (last) {
      put<uint8_t>(d.buf, 0x28);  // Upload.last (5) = true
      put<uint8_t>(d.buf, 0x01);
    }
    d.cmds++;
    off += k;
  } while (off < n);
  tape_from(d, start, false);
  g_stats.uploads++;
}

// A sync's frame (the caller holds d.send_mu): everything recorded so far on t's device, and the handle `t` is read by.
at::Tensor take_sync_frame(Dev& d, const at::Tensor& t, uint64_t* h) {
  std::lock_guard<std::mutex> lock(g_mu);
  prelude_wire(d);
  *h = wire_handle(d, t);
  g_stats.syncs++;
  d.near.store(false, std::memory_order_relaxed);  // (a sync itself: its reply raises a refusal)
  return take_frame_locked(d);
}

// `self` (a device tensor, or a view) takes the values of wire handle `tmp` (an upload's temporary): a copy_ record
// on the daemon, then a Free of `tmp`. The caller holds g_mu.
void emit_copy_from(Dev& d, const at::Tensor& self, uint64_t tmp) {
  const uint32_t id = internal_op("aten::copy_");
  Buf b;
  put<uint8_t>(b, 2);
  put_ref(d, b, self, !recording_here(d));  // copy_ writes values only: a view goes as a view argument
  put<uint8_t>(b, T_TENSOR);
  put<uint64_t>(b, tmp);
  put<uint8_t>(b, 0);
  emit_record(d, id, {0}, b);
  Buf fr, packed;
  put_varint(packed, tmp);
  put<uint8_t>(fr, 0x0a);
  put_varint(fr, packed.n);
  put_bytes(fr, packed.v.data(), packed.n);
  static const uint8_t tag[] = {0x22};
  emit_command(d, tag, 1, fr);
}

// Wire mode: an upload over 12 MiB (a frame could not hold it under the daemon's 16 MiB message limit), or outside a recorded
// step one of 1 MiB or more (kSideUpload: on the side socket its bytes leave from the tensor's memory). The frame so far goes
// out, then client/session.py's Session.upload sends the bytes as the Python client's uploads go (the bulk side socket
// when the session has one, else 4 MiB chunks on the stream, a frame each; the daemon's quota and bounds as for any
// upload): into the held-back empty's handle when `self` is all of it, else into a temporary handle that a copy_
// record then copies into `self` (a slice, a view, an earlier tensor), as for the small ones.
void wire_big_upload(const at::Tensor& self, const at::Tensor& c) {
  Dev& d = dev_of(self);
  bool full = false;
  {
    std::lock_guard<std::mutex> send(d.send_mu);
    uint64_t h;
    bool whole;
    at::Tensor frame;
    {
      std::lock_guard<std::mutex> lock(g_mu);
      const uint64_t sid = handle_of(self);
      auto p = std::find_if(d.pending.begin(), d.pending.end(), [sid](const auto& e) { return e.first == sid; });
      whole = p != d.pending.end() && self.is_contiguous() && self.storage_offset() == 0 &&
              self.nbytes() == self.storage().nbytes();
      if (whole) {
        d.pending.erase(p);
        d.stores[sid].base = Geo::of(self);  // (held since wire_alloc: no views yet)
        h = d.handle(sid);
      } else {
        materialize_pending(d);
        h = d.base + g_next.fetch_add(1, std::memory_order_relaxed);
      }
      g_stats.uploads++;
      frame = take_frame_locked(d);
    }
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("gpupool_native::upload", "")
                         .typed<void(const at::Tensor&, int64_t, int64_t, const at::Tensor&)>();
    op.call(frame, index_of(d), static_cast<int64_t>(h), c);
    if (!whole) {
      std::lock_guard<std::mutex> lock(g_mu);
      emit_copy_from(d, self, h);
      full = frame_full(d);
    }
  }
  if (full || d.near.load(std::memory_order_relaxed)) flush_frame(d);  // (past the quota: a sync, even for `whole`)
}

at::Tensor& wire_copy_(at::Tensor& self, const at::Tensor& src, bool non_blocking) {
  const bool dst_dev = self.device().type() == kType;
  const bool src_dev = src.device().type() == kType;
  if (dst_dev && src_dev && self.device() != src.device()) {
    // gpupool:i to gpupool:j (`.to("gpupool:1")`): through the host, as the Python client copies between devices
    // (client/torch/transfer.py: a download from i, an upload to j). Each session keeps its own order.
    return self.copy_(src.cpu());
  }
  if (dst_dev && !src_dev) {
    Dev& d = dev_of(self);
    TORCH_CHECK(src.device().is_cpu(), "gpupool native client: copy from ", src.device());
    const at::Tensor c = src.to(self.scalar_type()).expand(self.sizes()).contiguous();
    // (a recorded step's upload stays in the frame, on its tape, up to kMaxUpload; `t_recdev`: this thread's)
    if (c.nbytes() > kMaxUpload || (c.nbytes() >= kSideUpload && t_recdev < 0)) {
      wire_big_upload(self, c);
      return self;
    }
    bool full;
    {
      std::lock_guard<std::mutex> lock(g_mu);
      const uint64_t sid = handle_of(self);
      auto p = std::find_if(d.pending.begin(), d.pending.end(), [sid](const auto& e) { return e.first == sid; });
      if (p != d.pending.end() && self.is_contiguous() && self.storage_offset() == 0 &&
          self.nbytes() == self.storage().nbytes()) {
        d.pending.erase(p);  // the held-back empty becomes the upload itself
        d.stores[sid].base = Geo::of(self);  // (held since wire_alloc: no views yet)
        emit_upload(d, d.handle(sid), c);
      } else {  // into a temporary handle, then copy_ on the daemon
        materialize_pending(d);
        const uint64_t tmp = d.base + g_next.fetch_add(1, std::memory_order_relaxed);
        emit_upload(d, tmp, c);
        emit_copy_from(d, self, tmp);
      }
      full = frame_full(d);
    }
    if (full) flush_frame(d);
    return self;
  }
  if (!dst_dev && src_dev) {  // a download: the frame goes out, then Session.download of the tensor's handle
    TORCH_CHECK(self.device().is_cpu(), "gpupool native client: copy to ", self.device());
    Dev& d = dev_of(src);
    std::optional<Geo> base;
    {
      std::lock_guard<std::mutex> lock(g_mu);
      auto it = d.stores.find(handle_of(src));
      if (it != d.stores.end() && it->second.base.dtype != src.scalar_type()) base = it->second.base;
    }
    if (base) {  // a view with another dtype than its storage's (torch.save reads a storage as bytes): the storage's
                 // tensor comes back into a host storage of the same bytes, and the view is taken of those
      const at::Tensor whole = at::detail::make_tensor<c10::TensorImpl>(
          c10::TensorImpl::VIEW, c10::Storage(src.storage()), src.key_set(), c10::scalarTypeToTypeMeta(base->dtype));
      whole.unsafeGetTensorImpl()->set_sizes_and_strides(base->sizes, base->strides, base->offset);
      const at::Tensor host = at::zeros({static_cast<int64_t>(src.storage().nbytes())}, at::kByte);
      at::empty({0}, host.options().dtype(base->dtype))
          .set_(host.storage(), base->offset, base->sizes, base->strides)
          .copy_(whole);
      self.copy_(at::empty({0}, host.options().dtype(src.scalar_type()))
                     .set_(host.storage(), src.storage_offset(), src.sizes(), src.strides()));
      return self;
    }
    std::lock_guard<std::mutex> send(d.send_mu);
    uint64_t h;
    const at::Tensor frame = take_sync_frame(d, src, &h);
    if (self.device().is_cpu() && self.is_contiguous() && self.sizes() == src.sizes() &&
        self.scalar_type() == src.scalar_type() && self.scalar_type() != at::kBool && !self.is_conj() &&
        !self.is_neg()) {
      // `.cpu()`'s fresh tensor, or any contiguous one of the same shape and dtype (round 47): the bytes land in it,
      // not in new memory copied over after (one copy of the download less). Not bool: Session.download checks a
      // bool download's bytes only once all came, and `self` would hold them before that.
      static auto into = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("gpupool_native::download_into", "")
                             .typed<void(const at::Tensor&, int64_t, int64_t, const at::Tensor&)>();
      into.call(frame, index_of(d), static_cast<int64_t>(h), self);
      return self;
    }
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("gpupool_native::download", "")
                         .typed<at::Tensor(const at::Tensor&, int64_t, int64_t, c10::IntArrayRef, at::ScalarType)>();
    // The shape and dtype the handle's tensor has here: Session.download holds the daemon's reply to them before it
    // allocates anything, and returns only a tensor every byte of which the daemon sent.
    const at::Tensor value = op.call(frame, index_of(d), static_cast<int64_t>(h), src.sizes(), src.scalar_type());
    TORCH_CHECK(value.sizes() == src.sizes() && value.scalar_type() == src.scalar_type() && value.is_contiguous(),
                "gpupool native client: a download of ", src.sizes(), " ", src.scalar_type(), " came back as ",
                value.sizes(), " ", value.scalar_type());
    self.copy_(value);
    return self;
  }
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("aten::copy_", "");
  torch::jit::Stack st{self, src, non_blocking};
  spike_fallback(op, &st);
  return self;
}

at::Tensor& spike_copy_(at::Tensor& self, const at::Tensor& src, bool non_blocking);

// A copy from a conjugate or negative view (`z.conj()`, its `.imag`; torch's Conjugate fallback materializes one with
// a copy before `mul`, `add`, ...): the records and transfers name storages, not the bits, so the source's bytes are
// copied as they are and the conjugate or negation then applied to the copy, as torch's own copy_ does in its kernel.
// Until round 48 the bits were dropped: `a * b.conj()` multiplied by `b`, a rotary embedding's gradient was wrong.
at::Tensor without_lazy_bits(const at::Tensor& t) {  // the same storage and geometry, no conjugate/negative bit
  const at::Tensor plain = at::detail::make_tensor<c10::TensorImpl>(
      c10::TensorImpl::VIEW, c10::Storage(t.storage()),
      t.key_set().remove(c10::DispatchKey::Conjugate).remove(c10::DispatchKey::Negative), t.dtype());
  plain.unsafeGetTensorImpl()->set_sizes_and_strides(t.sizes(), t.strides(), t.storage_offset());
  return plain;
}

at::Tensor& lazy_bits_copy_(at::Tensor& self, const at::Tensor& src, bool non_blocking) {
  if (self.is_conj() || self.is_neg()) {
    // A copy into a conjugate or negative view (`z.conj().mul_(2)`, `z.conj().zero_()`: torch's Conjugate fallback
    // computes into a plain tensor and copies that back into the view): the viewed tensor gets the conjugate and
    // negation of `src` (both their own inverses). Until round 48 (specrev48) refused; on dabf16a0 the bits were
    // dropped (`z.conj().mul_(2)` wrote conj(2 conj(z)) into z).
    at::Tensor plain = without_lazy_bits(self);
    spike_copy_(plain, src, non_blocking);
    if (self.is_conj() && plain.is_complex()) at::view_as_real(plain).select(-1, 1).neg_();
    if (self.is_neg()) plain.neg_();
    return self;
  }
  if (src.device().type() != kType) return spike_copy_(self, src.resolve_conj().resolve_neg(), non_blocking);
  spike_copy_(self, without_lazy_bits(src), non_blocking);
  // (into a real dtype: the real part, unchanged; conj_physical_ has no kernel here: a DispatchStub of CPU and CUDA)
  if (src.is_conj() && self.is_complex()) at::view_as_real(self).select(-1, 1).neg_();
  if (src.is_neg()) self.neg_();
  return self;
}

at::Tensor& spike_copy_(at::Tensor& self, const at::Tensor& src, bool non_blocking) {
  if (src.is_conj() || src.is_neg() || self.is_conj() || self.is_neg()) return lazy_bits_copy_(self, src, non_blocking);
  if (g_wire) return wire_copy_(self, src, non_blocking);
  const bool dst_dev = self.device().type() == kType;
  const bool src_dev = src.device().type() == kType;
  if (dst_dev && !src_dev) {  // upload: the bytes, converted to the destination's dtype and shape, contiguous
    TORCH_CHECK(src.device().is_cpu(), "gpupool native client: copy from ", src.device());
    const at::Tensor c = src.to(self.scalar_type()).expand(self.sizes()).contiguous();
    std::lock_guard<std::mutex> lock(g_mu);
    drain_frees();
    const size_t at = begin_record('U');
    put<uint64_t>(g_buf, handle_of(self));
    put_geometry(g_buf, self);
    put<uint64_t>(g_buf, c.nbytes());
    put_bytes(g_buf, c.const_data_ptr(), c.nbytes());
    g_stats.uploads++;
    finish_record(at);
    return self;
  }
  if (!dst_dev && src_dev) {  // download: a sync record; no daemon answers, so the bytes are zeros
    TORCH_CHECK(self.device().is_cpu(), "gpupool native client: copy to ", self.device());
    sync_record(src);
    self.zero_();
    return self;
  }
  // On the device: an op record, through the fallback.
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("aten::copy_", "");
  torch::jit::Stack st{self, src, non_blocking};
  spike_fallback(op, &st);
  return self;
}

at::Scalar spike_local_scalar_dense(const at::Tensor& self) {
  if (g_wire) {  // flush the frame and read the value in the same round trip (Sync.scalar_handles)
    Dev& d = dev_of(self);
    std::lock_guard<std::mutex> send(d.send_mu);
    uint64_t h;
    const at::Tensor frame = take_sync_frame(d, self, &h);
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("gpupool_native::sync_scalar", "")
                         .typed<double(const at::Tensor&, int64_t, int64_t)>();
    const double v = op.call(frame, index_of(d), static_cast<int64_t>(h));
    if (at::isFloatingType(self.scalar_type())) return at::Scalar(v);
    if (self.scalar_type() == at::kBool) return at::Scalar(v != 0.0);
    TORCH_CHECK(!at::isComplexType(self.scalar_type()), "gpupool native client: .item() of a complex tensor");
    return at::Scalar(static_cast<int64_t>(v));
  }
  sync_record(self);
  if (at::isFloatingType(self.scalar_type())) return at::Scalar(0.0);
  if (self.scalar_type() == at::kBool) return at::Scalar(false);
  TORCH_CHECK(!at::isComplexType(self.scalar_type()), "gpupool native client: .item() of a complex tensor");
  return at::Scalar(int64_t{0});
}

at::Tensor spike_view(const at::Tensor& self, c10::IntArrayRef size) {
  return at::native::view(self, size);
}

at::Tensor spike_as_strided(const at::Tensor& self, c10::IntArrayRef size, c10::IntArrayRef stride,
                            std::optional<int64_t> offset) {
  return at::native::as_strided_tensorimpl(self, size, stride, offset);
}

at::Tensor spike_reshape_alias(const at::Tensor& self, c10::IntArrayRef size, c10::IntArrayRef stride) {
  return at::native::_reshape_alias(self, size, stride);
}

// set_(Storage): a tensor takes another device storage, metadata only as a view (its records name the storage's
// handle). torch.save's `storage.cpu()` is `empty({0}).set_(storage)` then a copy to the host.
at::Tensor& spike_set_storage_offset(at::Tensor& self, c10::Storage source, int64_t offset, c10::IntArrayRef size,
                                     c10::IntArrayRef stride) {
  TORCH_CHECK(source.device() == self.device(), "gpupool native client: set_ of a storage on ", source.device(),
              " to a tensor on ", self.device());
  TORCH_CHECK(t_recdev < 0, "aten::set_ (it re-points or grows a storage) inside a step being captured: a replayed step "
              "cannot stop for the client. Move it out of the step (return the tensor and call .item() on the result), "
              "or do not capture this function");
  std::vector<int64_t> strides = stride.vec();
  if (strides.empty()) {  // contiguous
    strides.resize(size.size());
    int64_t step = 1;
    for (size_t i = size.size(); i-- > 0;) {
      strides[i] = step;
      step *= std::max<int64_t>(size[i], 1);
    }
  }
  TORCH_CHECK(strides.size() == size.size(), "gpupool native client: set_: ", size.size(), " sizes and ",
              strides.size(), " strides");
  int64_t last = offset;
  bool empty = false;
  for (size_t i = 0; i < size.size(); i++) {
    TORCH_CHECK(size[i] >= 0 && strides[i] >= 0, "gpupool native client: set_: negative sizes or strides");
    empty = empty || size[i] == 0;
    last += (size[i] - 1) * strides[i];
  }
  TORCH_CHECK(offset >= 0 && (empty || (last + 1) * static_cast<int64_t>(self.itemsize()) <=
                                           static_cast<int64_t>(source.nbytes())),
              "gpupool native client: set_: the geometry is out of the storage's bounds");
  self.unsafeGetTensorImpl()->set_storage_keep_dtype(std::move(source));
  self.unsafeGetTensorImpl()->set_sizes_and_strides(size, strides, offset);
  return self;
}

at::Tensor& spike_set_storage(at::Tensor& self, c10::Storage source) {
  const int64_t n = static_cast<int64_t>(source.nbytes() / self.itemsize());
  return spike_set_storage_offset(self, std::move(source), 0, {n}, {});
}

// ---------------------------------------------------------------------------------------------------------------------
// Control operators for Python (gpupool_native::*).
// ---------------------------------------------------------------------------------------------------------------------

// In the order of client/native/backend.py's STATS.
std::vector<int64_t> stats() {
  std::lock_guard<std::mutex> lock(g_mu);
  std::lock_guard<std::mutex> flock(g_free_mu);
  const Stats& s = g_stats;
  size_t free_pending = 0;
  for (const auto& dead : g_free) free_pending += dead.size();
  return {g_allocated.load(), g_freed.load(), g_double_frees.load(), s.op_records, s.uploads, s.syncs,
          s.free_records, s.alloc_records, s.bytes, s.dropped_bytes, s.meta_runs, s.cache_hits, s.view_outputs,
          static_cast<int64_t>(g_live.size()), static_cast<int64_t>(free_pending),
          static_cast<int64_t>(g_cache.size())};
}

void configure(bool keep, bool track, bool cache) {
  std::lock_guard<std::mutex> lock(g_mu);
  std::lock_guard<std::mutex> flock(g_free_mu);
  g_keep = keep;
  g_track = track;
  if (!track) g_live.clear();
  g_cache_on = cache;
  if (!cache) g_cache.clear();
}

// The records kept since the last call (keep mode), as bytes; the frees pending are drained into them first.
at::Tensor take_records() {
  std::lock_guard<std::mutex> lock(g_mu);
  drain_frees();
  at::Tensor out = at::empty({static_cast<int64_t>(g_buf.size())}, at::kByte);
  if (!g_buf.empty()) std::memcpy(out.data_ptr(), g_buf.data(), g_buf.size());
  g_buf.clear();
  return out;
}

std::string op_name(int64_t id) {
  std::lock_guard<std::mutex> lock(g_mu);
  TORCH_CHECK(id >= 0 && id < static_cast<int64_t>(g_op_names.size()), "gpupool native client: no op id ", id);
  return g_op_names[id];
}

// Send more ops to the fallback than the ones with no kernel at all on PrivateUse1:
//  - functional: every op whose PrivateUse1 kernel would be a CompositeExplicitAutogradNonFunctional one (the
//    functional and in-place forms of structured ops: addmm, relu, add_, lerp_, ...). Without this claim torch runs
//    such an op as empty_strided + its out= form (addmm.out, out=self for add_), two dispatches and an extra record;
//  - foreach: every _foreach_* op whose kernel would be CompositeExplicitAutograd's per-tensor loop (a record per
//    tensor and per op) becomes one record;
//  - with functional, also convolution and convolution_backward (else convolution_overrideable: not implemented), and
//    the ops whose CompositeExplicitAutograd kernel stands in for a CPU kernel (native_layer_norm, ...: bit for bit),
//    and the Scalar overloads whose CompositeExplicitAutograd kernel calls their Tensor sibling with a wrapped number
//    the daemon's call of that sibling refuses (remainder.Scalar, fmod.Scalar, bitwise_and.Scalar: `wraps_scalar`).
// Returns the number of ops claimed now. The registrations live until the process ends.
int64_t claim(bool functional, bool foreach) {
  static std::vector<std::unique_ptr<torch::Library>> libs;
  auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, "aten", DispatchKey::PrivateUse1, __FILE__,
                                              __LINE__);
  int64_t n = 0;
  auto& d = c10::Dispatcher::singleton();
  std::unordered_map<std::string, std::vector<c10::OperatorHandle>> overloads;
  for (const auto& name : d.getAllOpNames()) {
    auto op = d.findOp(name);
    if (op && op->hasSchema()) overloads[name.name].push_back(*op);
  }
  // `x % 3` is remainder.Scalar, whose CompositeExplicitAutograd kernel calls remainder.Tensor with 3 as a wrapped
  // number: sent so, the daemon's `torch.ops.aten.remainder.Tensor(x, 3)` refuses the number (only add, mul, ... take
  // one: WireOp.numbers). Such an op (an overload with a Scalar where a sibling overload of the same name has a Tensor,
  // all else equal) goes whole, as the Python client sends it.
  auto wraps_scalar = [&](const c10::OperatorHandle& op) {
    const auto& s = op.schema();
    if (torch::should_allow_numbers_as_tensors(s.name().substr(6)) ||
        !op.hasKernelForDispatchKey(DispatchKey::CompositeExplicitAutograd) ||
        op.hasKernelForDispatchKey(DispatchKey::CPU))
      return false;
    for (const auto& a : s.arguments())
      if (a.is_out()) return false;
    for (const auto& other : overloads[s.name()]) {
      const auto& t = other.schema();
      if (t.overload_name() == s.overload_name() || t.arguments().size() != s.arguments().size()) continue;
      bool same = true, scalar_for_tensor = false;
      for (size_t i = 0; i < s.arguments().size() && same; i++) {
        const auto &a = s.arguments()[i], &b = t.arguments()[i];
        if (a.name() != b.name()) same = false;
        else if (a.type()->kind() == c10::TypeKind::NumberType && b.type()->kind() == c10::TypeKind::TensorType)
          scalar_for_tensor = true;
        else if (*a.type() != *b.type()) same = false;
      }
      if (same && scalar_for_tensor) return true;
    }
    return false;
  };
  for (const auto& name : d.getAllOpNames()) {
    if (name.name.rfind("aten::", 0) != 0) continue;
    auto op = d.findOp(name);
    if (!op || !op->hasSchema() || op->hasKernelForDispatchKey(DispatchKey::PrivateUse1)) continue;
    const bool nonfunctional = op->hasKernelForDispatchKey(DispatchKey::CompositeExplicitAutogradNonFunctional);
    const bool is_foreach = name.name.rfind("aten::_foreach_", 0) == 0 &&
                            op->hasKernelForDispatchKey(DispatchKey::CompositeExplicitAutograd);
    // convolution: its CompositeExplicitAutograd kernel ends in convolution_overrideable, which no backend but
    // CPU/CUDA/MKLDNN has (the daemon runs the whole op, as the shim sends it); clone (`contiguous()`, `reshape` of a
    // view): one record, as the shim sends it, not its composite kernel's empty_strided + copy_ (round 15)
    // an op with both a CPU kernel and a CompositeExplicitAutograd one (native_layer_norm, native_group_norm, addr,
    // _stack, any/all.dims): the composite one decomposes it here into other ops, whose results differ from the CPU
    // kernel's in the last bits (a LayerNorm's loss did); the daemon runs the whole op, as the shim sends it (round 16)
    const bool cpu_and_composite = op->hasKernelForDispatchKey(DispatchKey::CPU) &&
                                   op->hasKernelForDispatchKey(DispatchKey::CompositeExplicitAutograd) &&
                                   !op->schema().is_mutable();
    const bool whole = functional && (name.name == "aten::convolution" || name.name == "aten::convolution_backward" ||
                                      name.name == "aten::clone" || cpu_and_composite || wraps_scalar(*op));
    if (!((functional && nonfunctional) || (foreach && is_foreach) || whole)) continue;
    const std::string short_name = name.name.substr(6);
    const std::string full = name.overload_name.empty() ? short_name : short_name + "." + name.overload_name;
    lib->impl(full.c_str(), torch::CppFunction::makeFromBoxedFunction<&spike_fallback>());
    n++;
  }
  libs.push_back(std::move(lib));
  return n;
}

// scaled_dot_product_attention's fused backend (`gpupool_sdp_choice` below). On by default; `configure_wire` sets it
// from $GPUPOOL_FUSED_SDPA as gpupool/config.py `fused_sdpa` parsed it (the shim's parser: this file reads no
// environment), `set_fused_sdp` at any time.
std::atomic<bool> g_fused_sdp{true};
// Per device: whether its daemon serves the fused op with dropout (AttachReply.features has "sdpa_dropout"), set by
// `configure_wire`; false before, and for a daemon from before round 24 (a call with dropout takes the math path).
std::atomic<bool> g_sdp_dropout[kMaxDevices] = {};

// Wire mode from now on for device `index` (before any tensor is made on it): its handles are base + n; ops outside
// `ops` (none: every op is in) and what the encoder cannot send go to the Python fallback at PrivateUse2 with `python`,
// else are refused. The op set and the tables are the first call's (the process's).
void configure_wire(int64_t index, int64_t base, std::optional<std::vector<std::string>> ops,
                    std::vector<int64_t> dtype_codes, int64_t strided, std::vector<int64_t> mf_codes, bool python,
                    int64_t flush_ops, bool fused_sdpa, bool sdpa_dropout) {
  // commands a frame: $GPUPOOL_FLUSH_OPS as gpupool/config.py `flush_ops` parsed it (the Python client's parser); the
  // range is checked again here only as a guard
  TORCH_CHECK(flush_ops >= 1 && flush_ops <= 65536, "gpupool native client: flush_ops=", flush_ops,
              " is not a number of commands from 1 to 65536");
  std::lock_guard<std::mutex> lock(g_mu);
  Dev& d = g_devs[checked_index(static_cast<DeviceIndex>(index))];
  TORCH_CHECK(!d.wire, "gpupool native client: gpupool:", index, " has its session already");
  TORCH_CHECK(g_wire || g_next.load() == 1, "gpupool native client: wire mode must be set before any tensor is made on the device");
  d.base = static_cast<uint64_t>(base);
  d.wire = true;
  g_sdp_dropout[checked_index(static_cast<DeviceIndex>(index))].store(sdpa_dropout);
  if (g_wire) return;
  TORCH_CHECK(dtype_codes.size() <= 64 && mf_codes.size() == 4, "gpupool native client: bad code tables");
  std::fill(std::begin(g_dtype_code), std::end(g_dtype_code), -1);
  for (size_t i = 0; i < dtype_codes.size(); i++) g_dtype_code[i] = static_cast<int>(dtype_codes[i]);
  for (size_t i = 0; i < 4; i++) g_mf_code[i] = static_cast<int>(mf_codes[i]);
  g_layout_strided = static_cast<int>(strided);
  g_wire_all = !ops.has_value();
  if (ops) g_wire_ops = std::unordered_set<std::string>(ops->begin(), ops->end());
  g_python = python;
  g_flush_commands = static_cast<size_t>(flush_ops);
  g_fused_sdp.store(fused_sdpa);
  g_keep = true;  // the buffer is a frame: never dropped
  g_wire = true;
}

int64_t scalar_type_of(const at::Tensor& t) { return static_cast<int64_t>(t.scalar_type()); }

// Every attached device's frame goes out (a sync of all of them, an exit).
void flush_now() {
  for (Dev& d : g_devs)
    if (d.wire) send_frame(d);
}

std::vector<int64_t> wire_stats() {
  std::lock_guard<std::mutex> lock(g_mu);
  size_t stores = 0, pending = 0;
  for (const Dev& d : g_devs) {
    stores += d.stores.size();
    pending += d.pending.size();
  }
  return {g_wstats.frames, g_wstats.view_handles, g_wstats.frees, g_wstats.skipped_views,
          static_cast<int64_t>(stores), static_cast<int64_t>(pending), g_wstats.python_ops, g_wstats.view_args,
          g_direct_frames.load(), g_wstats.kept_moves};
}

// For the Python fallback (client/native/backend.py `_python_op`), wire mode.
// The handle a record names `t` by (its storage's, or a view handle made now); held-back empties are sent first.
int64_t py_wire_handle(const at::Tensor& t) {
  TORCH_CHECK(t.device().type() == kType, "gpupool native client: wire_handle of a ", t.device(), " tensor");
  Dev& d = dev_of(t);
  std::lock_guard<std::mutex> lock(g_mu);
  prelude_wire(d);
  return static_cast<int64_t>(wire_handle(d, t));
}

// A new output of an op the Python fallback sends on device `index`: a fresh storage the daemon does not know yet (see
// adopt).
at::Tensor py_new_output(c10::IntArrayRef size, c10::IntArrayRef stride, at::ScalarType dtype, int64_t index) {
  const DeviceIndex i = checked_index(static_cast<DeviceIndex>(index));
  ensure_wire(i);
  const AtDevice at_device(i);
  try {
    return at::detail::empty_strided_generic(size, stride, &g_alloc, kKeys, dtype);
  } catch (const QuotaExceeded& e) {
    raise_over_quota(e);
  }
}

// A finished ClientFrame.commands entry (the Python fallback's `Op`) into device `index`'s frame, in order with its
// records.
void py_append_command(const at::Tensor& raw, int64_t index) {
  TORCH_CHECK(raw.device().is_cpu() && raw.scalar_type() == at::kByte && raw.is_contiguous(), "gpupool native client: bad command");
  Dev& d = g_devs[wired(checked_index(static_cast<DeviceIndex>(index)))];
  bool full;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    prelude_wire(d);
    const size_t start = d.buf.n;
    put_bytes(d.buf, raw.const_data_ptr(), raw.numel());
    d.cmds++;
    tape_from(d, start, false);
    full = frame_full(d);
  }
  if (full) flush_frame(d);
}

// An out= argument the op resizes (the daemon's kernel resizes its tensor in place, under the same handle): the
// spike tensor takes the new geometry, and its storage the new size, keeping its handle. Only a whole storage.
void py_resize_output(const at::Tensor& t, c10::IntArrayRef size, c10::IntArrayRef stride) {
  Dev& d = dev_of(t);
  std::lock_guard<std::mutex> lock(g_mu);
  const uint64_t sid = handle_of(t);
  auto it = d.stores.find(sid);
  TORCH_CHECK(it != d.stores.end() && it->second.base.same(t) && t.storage_offset() == 0,
              "gpupool native client: an op resizes an out= argument that is a view: not supported");
  t.storage().unsafeGetStorageImpl()->set_nbytes(at::detail::computeStorageNbytes(size, stride, t.dtype().itemsize()));
  t.unsafeGetTensorImpl()->set_sizes_and_strides(size, stride, 0);
  it->second.base = Geo::of(t);
  hold(d, it->second, t.storage().nbytes());
}

// The handles of new outputs (their storages' ids + the session's base); with `commit`, the daemon now holds them
// (their op was queued): they are named by later records and freed when they die. Uncommitted, a storage dies
// unseen (no Free).
std::vector<int64_t> py_adopt(const std::vector<at::Tensor>& ts, bool commit) {
  std::lock_guard<std::mutex> lock(g_mu);
  std::vector<int64_t> out;
  for (const at::Tensor& t : ts) {
    TORCH_CHECK(t.device().type() == kType && t.storage_offset() == 0, "gpupool native client: adopt of a tensor that is no output");
    Dev& d = g_devs[wired(t.device().index())];
    const uint64_t sid = handle_of(t);
    if (commit) hold(d, d.stores[sid] = Store{Geo::of(t), {}}, t.storage().nbytes());
    out.push_back(static_cast<int64_t>(d.handle(sid)));
  }
  return out;
}

void set_autoconnect() { g_autoconnect = true; }

// Step capture (client/native/capture.py). From now on the calling thread's commands to device `index` (and every
// thread's Frees there) are also kept on its tape, until `record_stop`; one recording per device at a time.
void record_start(int64_t index) {
  Dev& d = g_devs[wired(checked_index(static_cast<DeviceIndex>(index)))];
  std::lock_guard<std::mutex> lock(g_mu);
  TORCH_CHECK(t_recdev < 0, "gpupool native client: this thread records a step already (on gpupool:", t_recdev, ")");
  TORCH_CHECK(!d.taping, "gpupool native client: another thread records a step on gpupool:", index, " (captured steps "
              "record one at a time per device)");
  prelude_wire(d);  // empties held back before the step are not its ops
  d.tape.clear();
  d.rec_views.clear();
  d.taping = true;
  t_recdev = static_cast<int>(index);
}

// The recording ends: the Frees so far and those of its own view handles go on the tape, which comes back (bytes:
// ClientFrame.commands entries, as the frame holds them).
at::Tensor record_stop(int64_t index) {
  Dev& d = g_devs[wired(checked_index(static_cast<DeviceIndex>(index)))];
  std::lock_guard<std::mutex> lock(g_mu);
  TORCH_CHECK(d.taping && t_recdev == index, "gpupool native client: this thread records no step on gpupool:", index);
  materialize_pending(d);  // an empty the step made and never used is its op too
  drain_frees_wire(d);
  if (!d.rec_views.empty()) {
    Buf packed;
    for (const auto& v : d.rec_views) put_varint(packed, d.base + v.second);
    emit_free(d, packed);
    d.rec_views.clear();
  }
  d.taping = false;
  t_recdev = -1;
  at::Tensor out = at::empty({static_cast<int64_t>(d.tape.size())}, at::kByte);
  if (!d.tape.empty()) std::memcpy(out.data_ptr(), d.tape.data(), d.tape.size());
  d.tape.clear();
  return out;
}

// Handles a defined graph binds (`on`) or no longer binds: a Free of one is noted for `fired`.
void watch(int64_t index, std::vector<int64_t> handles, bool on) {
  Dev& d = g_devs[wired(checked_index(static_cast<DeviceIndex>(index)))];
  std::lock_guard<std::mutex> lock(g_mu);
  for (int64_t h : handles) {
    if (on)
      d.watched.insert(static_cast<uint64_t>(h));
    else
      d.watched.erase(static_cast<uint64_t>(h));
  }
}

// The watched handles freed since the last call (the tensors that died so far are freed into the frame first).
std::vector<int64_t> fired(int64_t index) {
  Dev& d = g_devs[wired(checked_index(static_cast<DeviceIndex>(index)))];
  std::lock_guard<std::mutex> lock(g_mu);
  if (d.watched.empty()) return {};
  drain_frees_wire(d);
  std::vector<int64_t> out;
  out.swap(d.fired);
  return out;
}

// Step capture's replay (client/native/capture.py `_replay`): one call a replayed step, in place of the Python that
// asked for the freed watched handles (`fired`), made and adopted each output (`new_output`, `adopt`), and built and
// appended the RunGraph command (`append_command`). A defined graph's outputs (sizes, strides, dtype), by device and
// graph id: `replay_outputs` at its DefineGraph, `replay_forget` when it goes (guarded by g_mu).
struct ReplayOut {
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
};
// A defined graph as `replay` needs it: its outputs, and the handles it writes (a kept tensor's storage, bound anew by
// every run: the view handles made of it since are of the last run's tensor, freed at the next), with the kept tensor
// of each where the script's `.grad`s hold it (`kept`, by write, with its storage as last seen: `move_kept`; empty
// elsewhere). The storage is held here (round 55): where the script sets `p.grad` to None between steps
// (`opt.zero_grad()` outside the step), its handle stays the run's and a new `.grad` on it is given back (`regrad`).
struct Kept {
  c10::weak_intrusive_ptr<c10::TensorImpl> tensor{c10::intrusive_ptr<c10::TensorImpl>()};
  c10::Storage storage;  // its use count read without a lock: 2, held by the tensor alone (and here)
  c10::weak_intrusive_ptr<c10::TensorImpl> param{c10::intrusive_ptr<c10::TensorImpl>()};  // whose `.grad` it is
  std::vector<int64_t> sizes, strides;             // the `.grad`'s geometry (a new one's: `regrad`)
  int64_t offset = 0;
  caffe2::TypeMeta dtype;
  bool fresh = false;  // the recording began with no `.grad` there (capture_step.py `_note_grads`)
};
struct ReplayGraph {
  std::vector<ReplayOut> outs;
  std::vector<uint64_t> writes;
  std::vector<Kept> kept;
};
std::unordered_map<int64_t, ReplayGraph> g_replays[kMaxDevices];
constexpr size_t kByValueBytes = 256 * 1024;  // capture.py BY_VALUE_BYTES: CPU arguments up to this go inside the run
constexpr int kHoldSteps = 4;                  // capture.py HOLD_STEPS: replays a frame at most before it goes out
int g_held[kMaxDevices] = {};                  // replays appended to a device's frame since one sent it (g_mu)
thread_local Buf t_run;

// A Python object's reference count. torch's interpreter call takes the GIL around reading it (~600 instructions a
// `.grad` a replay: +18k a step of the encoder's 28); it reads the object's first word, which this reads directly once
// `replay_outputs` has seen the two agree (CPython's PyObject_HEAD; `g_refcnt_direct`), else it makes the call.
std::atomic<bool> g_refcnt_direct{false};
inline int64_t py_refcnt(PyObject* o) {
  if (g_refcnt_direct.load(std::memory_order_relaxed)) return *reinterpret_cast<const volatile int64_t*>(o);
  return static_cast<int64_t>((*c10::impl::getGlobalPyInterpreter())->refcnt(o));
}
void check_refcnt(const at::Tensor& t) {
  PyObject* o = t.unsafeGetTensorImpl()->pyobj_slot()->load_pyobj();
  if (o == nullptr) return;
  const int64_t direct = *reinterpret_cast<const volatile int64_t*>(o);
  g_refcnt_direct.store(direct == static_cast<int64_t>((*c10::impl::getGlobalPyInterpreter())->refcnt(o)),
                        std::memory_order_relaxed);
}

// `params`: the step's parameters with a `.grad` (capture_step.py `kept_params`), their `.grad`s the candidates for
// `kept`. A graph writes a `.grad`'s handle only where the recorded step made that `.grad` anew (`zero_grad()` with
// set_to_none=True): as eagerly, a replay then leaves a new tensor in `p.grad` where the script holds the old one.
// `fresh`: those of them that had no `.grad` when the recording began (`opt.zero_grad()` before the call).
void replay_outputs(int64_t index, int64_t graph_id, const std::vector<at::Tensor>& outputs, c10::IntArrayRef writes,
                    const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& fresh) {
  const DeviceIndex i = checked_index(static_cast<DeviceIndex>(index));
  ReplayGraph g;
  for (const at::Tensor& t : outputs) g.outs.push_back({t.sizes().vec(), t.strides().vec(), t.scalar_type()});
  for (const int64_t h : writes) g.writes.push_back(static_cast<uint64_t>(h));
  std::lock_guard<std::mutex> lock(g_mu);
  const Dev& d = g_devs[i];
  for (const uint64_t h : g.writes) {
    Kept kept;
    for (const at::Tensor& p : params) {
      const at::Tensor& t = p.grad();
      if (t.defined() && t.device() == Device(kType, i) && t.has_storage() && d.handle(handle_of(t)) == h) {
        kept.tensor = c10::weak_intrusive_ptr<c10::TensorImpl>(t.getIntrusivePtr());
        kept.storage = t.storage();
        kept.param = c10::weak_intrusive_ptr<c10::TensorImpl>(p.getIntrusivePtr());
        kept.sizes = t.sizes().vec();
        kept.strides = t.strides().vec();
        kept.offset = t.storage_offset();
        kept.dtype = t.dtype();
        kept.fresh = std::any_of(fresh.begin(), fresh.end(), [&](const at::Tensor& f) { return f.is_same(p); });
        check_refcnt(t);
      }
    }
    g.kept.push_back(std::move(kept));
  }
  g_replays[index][graph_id] = std::move(g);
}

// Whether something besides its parameter holds kept tensor `t` (`uses` strong references): the script's `g = p.grad`.
// Expected: the parameter's `.grad` slot, the tensor's PyObject where one was made (it holds the tensor), and that
// PyObject's one reference from C++ (torch's PyObject preservation: held while C++ holds the tensor).
bool held_elsewhere(const c10::TensorImpl& t, uint32_t uses) {
  PyObject* o = t.pyobj_slot()->load_pyobj();
  if (o == nullptr) return uses > 1;
  return uses > 2 || py_refcnt(o) > 1;
}

// Parameter `kept.param`'s `.grad` is not the one graph `g` writes on storage `sid` before a run (`kept.fresh`: the
// recording began without one). Where it is None (`opt.zero_grad()` since the last step) or another tensor (another
// graph's of the step, which sets it to None itself), as eagerly, where autograd leaves a new `.grad` each step, the
// run's becomes `p.grad`: the kept tensor, or where the script holds it (`g = p.grad`) a new tensor on the storage
// (`move_kept`: `g` keeps the old values), or where it died a new tensor on the storage held here. False where the
// recording began without a `.grad` and there is one: eagerly the step would add to it; the graph cannot replay that.
// Under g_mu.
void move_kept(Dev& d, DeviceIndex i, Kept& kept, c10::TensorImpl* t, uint64_t sid, const at::Tensor* param);
bool regrad(Dev& d, DeviceIndex i, Kept& kept, uint64_t sid) {
  at::Tensor param(kept.param.lock());
  if (!param.defined()) return true;
  const c10::intrusive_ptr<c10::TensorImpl> t = kept.tensor.lock();
  const at::Tensor& now = param.grad();
  if (now.defined() && (kept.fresh || now.unsafeGetTensorImpl() == t.get())) return !kept.fresh;
  if (t && t->has_storage() && handle_of_impl(*t) == sid && d.stores.count(sid)) {
    move_kept(d, i, kept, t.get(), sid, &param);
    return true;
  }
  // it died: a new `.grad` on the storage held here (an alias of it the script keeps: `free_write_views` moves the
  // new `.grad` off the storage next)
  if (!kept.storage || reinterpret_cast<uintptr_t>(kept.storage.data_ptr().get_context()) != sid) return true;
  at::Tensor grad = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(kept.storage), kKeys, kept.dtype);
  grad.unsafeGetTensorImpl()->set_sizes_and_strides(kept.sizes, kept.strides, kept.offset);
  kept.tensor = c10::weak_intrusive_ptr<c10::TensorImpl>(grad.getIntrusivePtr());
  param.mutable_grad() = std::move(grad);
  return true;
}

// Kept tensor `t` (on storage `sid`, which graph `g` writes) shares its storage with another tensor: an alias the
// script keeps (`p.grad.detach()`, `p.grad.view(-1)`), or the script holds `t` itself (`g = p.grad`: `param`, whose
// `.grad` it is). Eager autograd would leave a new tensor in `p.grad` and the alias (or `g`) its old values, so before
// the run binds the storage's handle anew: the old storage (its aliases, its view handles) takes a new storage id,
// whose handle is an `alias` of the old tensor on the daemon; a new storage takes the old id, which the run binds: `t`
// takes it, or, where `param` is given, a new tensor on it becomes `param.grad` (`t` keeps the old storage). The new
// `.grad` goes into `kept`. Under g_mu.
void move_kept(Dev& d, DeviceIndex i, Kept& kept, c10::TensorImpl* t, uint64_t sid, const at::Tensor* param) {
  c10::StorageImpl* old = t->storage().unsafeGetStorageImpl();
  c10::DataPtr mine = old->set_data_ptr(HandleAllocator::storage_ptr(i));
  const uint64_t moved = reinterpret_cast<uintptr_t>(old->data_ptr().get_context());
  const size_t n = old->nbytes();
  c10::Storage fresh(c10::make_intrusive<c10::StorageImpl>(c10::StorageImpl::use_byte_size_t(), n, std::move(mine),
                                                           &g_alloc, old->resizable()));
  if (param != nullptr) {
    at::Tensor grad = at::detail::make_tensor<c10::TensorImpl>(std::move(fresh), kKeys, t->dtype());
    grad.unsafeGetTensorImpl()->set_sizes_and_strides(t->sizes(), t->strides(), t->storage_offset());
    kept.tensor = c10::weak_intrusive_ptr<c10::TensorImpl>(grad.getIntrusivePtr());
    kept.storage = grad.storage();
    param->mutable_grad() = std::move(grad);
  } else {
    const bool allow = t->allow_tensor_metadata_change();
    t->set_allow_tensor_metadata_change(true);
    t->set_storage_keep_dtype(std::move(fresh));
    t->set_allow_tensor_metadata_change(allow);
    kept.storage = t->storage();
  }
  Buf local;
  put<uint8_t>(local, 1);
  put<uint8_t>(local, T_TENSOR);
  put<uint64_t>(local, d.handle(sid));
  put<uint8_t>(local, 0);
  emit_record(d, internal_op("aten::alias"), {d.handle(moved)}, local);
  Store st = std::move(d.stores[sid]);
  for (const auto& v : st.views)  // a graph that binds one by identity would now read the old tensor: recorded anew
    if (d.watched.erase(d.base + v.second)) d.fired.push_back(static_cast<int64_t>(d.base + v.second));
  Store& now = d.stores[sid] = Store{st.base, {}, 0};
  hold(d, now, n);
  d.stores[moved] = std::move(st);
  g_wstats.kept_moves++;
}

// The view handles of the storages graph `g` writes, freed into d's frame (before its run binds those handles anew):
// made since the last run (`wire_handle`: `p.grad` of a bias, a view of the kept sum), they name its tensor on the
// daemon, not the one this run leaves; the next `wire_handle` makes them anew. A watched one is noted in `fired`.
// A kept tensor whose storage another tensor shares moves to a new one first (`move_kept`: the views stay); a parameter
// whose `.grad` the script set to None since gets one back (`regrad`). False where the graph cannot run as the eager
// step would (`regrad`): the caller has it recorded anew.
bool free_write_views(Dev& d, DeviceIndex i, ReplayGraph& g) {
  Buf& packed = d.freed;
  packed.clear();
  bool runs = true;
  for (size_t k = 0; k < g.writes.size(); k++) {
    const uint64_t h = g.writes[k];
    if (h < d.base) continue;
    const uint64_t sid = (static_cast<uint64_t>(i) << kIndexShift) | ((h - d.base) & kIdMask);
    Kept& kept = g.kept[k];
    const c10::TensorImpl* const param = kept.param.use_count() > 0 ? kept.param._unsafe_get_target() : nullptr;
    if (param != nullptr && (kept.fresh || param->grad().unsafeGetTensorImpl() != kept.tensor._unsafe_get_target() ||
                             kept.tensor.use_count() == 0)) {
      // (not to run: the views of the writes before this one, taken off their storages, are still freed below)
      if (!(runs = regrad(d, i, kept, sid))) break;
    }
    const uint32_t uses = kept.tensor.use_count();  // (usual: its storage held by it alone, it by its parameter)
    const bool held = uses > 1 && held_elsewhere(*kept.tensor._unsafe_get_target(), uses);
    if (uses > 0 && (held || kept.storage.use_count() != 2)) {
      const c10::intrusive_ptr<c10::TensorImpl> t = kept.tensor.lock();
      if (t && t->has_storage() && handle_of_impl(*t) == sid) {
        at::Tensor param;
        if (held)
          if (c10::intrusive_ptr<c10::TensorImpl> p = kept.param.lock()) param = at::Tensor(std::move(p));
        const bool mine = param.defined() && param.grad().unsafeGetTensorImpl() == t.get();  // still its `.grad`
        const c10::StorageImpl* const st = t->storage().unsafeGetStorageImpl();
        const size_t alone = st == kept.storage.unsafeGetStorageImpl() ? 2 : 1;  // (held here too)
        if ((mine || t->storage().use_count() > alone) && d.stores.count(sid))
          move_kept(d, i, kept, t.get(), sid, mine ? &param : nullptr);
        else
          kept.storage = t->storage();
      }
    }
    auto it = d.stores.find(sid);
    if (it == d.stores.end() || it->second.views.empty()) continue;
    for (const auto& v : it->second.views) {
      put_varint(packed, d.base + v.second);
      if (d.watched.erase(d.base + v.second)) d.fired.push_back(static_cast<int64_t>(d.base + v.second));
    }
    it->second.views.clear();
  }
  if (packed.n == 0) return runs;
  emit_free(d, packed);
  g_wstats.frees++;
  return runs;
}

void replay_forget(int64_t index, int64_t graph_id) {
  checked_index(static_cast<DeviceIndex>(index));
  std::lock_guard<std::mutex> lock(g_mu);
  g_replays[index].erase(graph_id);
}

inline void put_packed(Buf& b, uint8_t tag, const uint64_t* v, size_t n) {
  if (n == 0) return;
  size_t len = 0;
  for (size_t i = 0; i < n; i++) len += varint_len(v[i]);
  put<uint8_t>(b, tag);
  put_varint(b, len);
  for (size_t i = 0; i < n; i++) put_varint(b, v[i]);
}

// One replay of graph `graph_id` on device `index` with the step's tensor arguments `inputs` (its pytree's tensor
// leaves in order: gpupool tensors of that device by handle, CPU tensors by value), `drop_writes` as RunGraph's.
// Returns (the outputs, nothing) once the RunGraph is in the frame, its outputs new tensors whose handles the daemon
// holds from now on. Nothing is written when it returns a second list, which says why:
//   [-1]: `current` (the call names no device) and the calling thread's current device is not `index`;
//   the watched handles freed since the last call (`fired`'s list: the caller hears of them, then calls again);
//   [-2]: the CPU arguments together exceed kByValueBytes (the caller uploads them and passes device tensors);
//   [-3]: a parameter's `.grad` is not as the recorded step found it (`regrad`: the caller records the step anew).
// The Frees of the tensors that died so far go into the frame first (as `fired` sends them).
using Replayed = std::tuple<std::vector<at::Tensor>, std::vector<int64_t>>;
inline Replayed not_run(std::vector<int64_t> why) { return Replayed(std::vector<at::Tensor>(), std::move(why)); }

Replayed replay(int64_t index, int64_t graph_id, bool current,
                                                                 const std::vector<at::Tensor>& inputs,
                                                                 c10::IntArrayRef drop_writes) {
  const DeviceIndex i = checked_index(static_cast<DeviceIndex>(index));
  Dev& d = g_devs[wired(i)];
  if (current && t_current != i) return not_run({-1});
  size_t cpu_bytes = 0;
  bool any_data = false;
  for (const at::Tensor& x : inputs) {
    if (x.device().type() == kType) {
      TORCH_CHECK(x.device().index() == i, "gpupool native client: the arguments of a captured step are on more than "
                  "one gpupool device (gpupool:", static_cast<int>(i), " and ", x.device(), ")");
    } else {
      TORCH_CHECK(x.device().is_cpu(), "gpupool native client: a captured step's tensor argument on ", x.device(),
                  " (gpupool or CPU tensors only)");
      const size_t n = static_cast<size_t>(x.numel()) * x.element_size();
      cpu_bytes += n;
      any_data |= n > 0;
    }
  }
  std::vector<at::Tensor> made;
  std::vector<int64_t> fired;
  bool flush = false;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto g = g_replays[i].find(graph_id);
    TORCH_CHECK(g != g_replays[i].end(), "gpupool native client: graph ", graph_id, " is not defined on gpupool:",
                static_cast<int>(i));
    if (!d.watched.empty()) {
      drain_frees_wire(d);
      if (!free_write_views(d, i, g->second)) return not_run({-3});
      if (!d.fired.empty()) {
        fired.swap(d.fired);
        return not_run(std::move(fired));
      }
    } else if (!free_write_views(d, i, g->second)) {
      return not_run({-3});
    }
    if (cpu_bytes > kByValueBytes) return not_run({-2});
    prelude_wire(d);
    {
      const AtDevice at_device(i);
      made.reserve(g->second.outs.size());
      for (const ReplayOut& o : g->second.outs)
        made.push_back(at::detail::empty_strided_generic(o.sizes, o.strides, &g_alloc, kKeys, o.dtype));
    }
    c10::SmallVector<uint64_t, 8> ins, outs;
    for (const at::Tensor& x : inputs) ins.push_back(x.device().type() == kType ? wire_handle(d, x) : 0);
    for (const at::Tensor& t : made) outs.push_back(d.handle(handle_of(t)));
    Buf& b = t_run;
    b.clear();
    put<uint8_t>(b, 0x08);  // RunGraph.graph_id (1)
    put_varint(b, static_cast<uint64_t>(graph_id));
    put_packed(b, 0x12, ins.data(), ins.size());  // inputs (2)
    put_packed(b, 0x1a, outs.data(), outs.size());  // outputs (3)
    put_packed(b, 0x22, reinterpret_cast<const uint64_t*>(drop_writes.data()), drop_writes.size());  // drop_writes (4)
    if (any_data) {  // input_data (10): every input's, a gpupool tensor's empty
      at::NoGradGuard no_grad;
      for (const at::Tensor& x : inputs) {
        put<uint8_t>(b, 0x52);
        if (x.device().type() == kType) {
          put<uint8_t>(b, 0);
          continue;
        }
        const at::Tensor c = x.contiguous();
        const size_t n = static_cast<size_t>(c.numel()) * c.element_size();
        put_varint(b, n);
        put_bytes(b, c.const_data_ptr(), n);
      }
    }
    static const uint8_t tag[] = {0xaa, 0x01};  // Command.run_graph (21)
    emit_command(d, tag, 2, b);
    for (const at::Tensor& t : made) hold(d, d.stores[handle_of(t)] = Store{Geo::of(t), {}}, t.storage().nbytes());
    if (++g_held[i] >= kHoldSteps) {
      g_held[i] = 0;
      flush = true;
    }
    flush |= frame_full(d);
  }
  if (flush) flush_frame(d);
  return Replayed(std::move(made), std::vector<int64_t>());
}

// A fresh handle on device `index`'s session that no storage names (a collective's port handle: group.py).
int64_t py_new_handle(int64_t index) {
  const Dev& d = g_devs[wired(checked_index(static_cast<DeviceIndex>(index)))];
  return static_cast<int64_t>(d.base + g_next.fetch_add(1, std::memory_order_relaxed));
}

// Device `index`'s session's memory quota (backend.connect: the Attach reply's), which HandleAllocator checks.
void set_quota(int64_t index, int64_t bytes) {
  TORCH_CHECK(index >= 0 && index < kMaxDevices, "gpupool native client: no device ", index);
  g_quota[index].store(bytes, std::memory_order_relaxed);
}

// The devices the process can name (the lease's, 1..kMaxDevices), set before the first tensor (enable()).
void set_device_count(int64_t n) {
  TORCH_CHECK(n >= 1 && n <= kMaxDevices, "gpupool native client: ", n, " devices (1..", kMaxDevices, ")");
  g_count = static_cast<int>(n);
}

int64_t device_count() { return g_count.load(); }

// The calling thread's current device (torch.gpupool.current_device / set_device; torch's guards use the same).
int64_t current_device() { return t_current; }

void set_current_device(int64_t index) { t_current = checked_index(static_cast<DeviceIndex>(index)); }

void reset_stats() {
  std::lock_guard<std::mutex> lock(g_mu);
  g_stats = Stats{};
  g_allocated = 0;
  g_freed = 0;
  g_double_frees = 0;
}

}  // namespace

C10_REGISTER_GUARD_IMPL(PrivateUse1, SpikeGuard);
REGISTER_ALLOCATOR(c10::DeviceType::PrivateUse1, &g_alloc);

TORCH_LIBRARY_IMPL(_, PrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&spike_fallback>());
}

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("empty.memory_format", TORCH_FN(spike_empty));
  m.impl("empty_strided", TORCH_FN(spike_empty_strided));
  m.impl("copy_", TORCH_FN(spike_copy_));
  m.impl("_local_scalar_dense", TORCH_FN(spike_local_scalar_dense));
  m.impl("view", TORCH_FN(spike_view));
  m.impl("as_strided", TORCH_FN(spike_as_strided));
  m.impl("_reshape_alias", TORCH_FN(spike_reshape_alias));
  m.impl("set_.source_Storage", TORCH_FN(spike_set_storage));
  m.impl("set_.source_Storage_storage_offset", TORCH_FN(spike_set_storage_offset));
  // The fused attention `gpupool_sdp_choice` picks: its CompositeExplicitAutograd kernel only raises ("an operator for
  // privateuse1 backends"), and would win over the fallback: recorded like any other op.
  m.impl("_scaled_dot_product_fused_attention_overrideable", torch::CppFunction::makeFromBoxedFunction<&spike_fallback>());
  m.impl("_scaled_dot_product_fused_attention_overrideable_backward",
         torch::CppFunction::makeFromBoxedFunction<&spike_fallback>());
}

namespace {

// scaled_dot_product_attention's backend on a gpupool device: client/sdpa_choice.h (shared with the shim's guard).
// (`g_fused_sdp`, declared above `configure_wire`, which sets it)

int64_t gpupool_sdp_choice(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::optional<at::Tensor>& mask, double dropout_p, bool is_causal,
                           std::optional<double> /*scale*/, bool enable_gqa) {
  const int index = q.device().index();
  // A call with dropout in a step being recorded takes torch's math path, as on the Python client (client/torch/
  // capture.py FUSED_DROPOUT_IN_GRAPHS): in a graph its ops are TorchScript nodes, the fused call one that calls back
  // into Python and recomputes the forward in its backward. The same bits either way.
  const bool dropout = t_recdev < 0 && index >= 0 && index < kMaxDevices &&
                       g_sdp_dropout[index].load(std::memory_order_relaxed);
  return gpupool_sdpa::sdp_choice(g_fused_sdp.load(std::memory_order_relaxed), dropout, q, k, v, mask, dropout_p,
                                  is_causal, enable_gqa);
}

}  // namespace

namespace at::native {
REGISTER_PRIVATEUSE1_DISPATCH(_fused_sdp_choice_stub, &gpupool_sdp_choice);
}  // namespace at::native

namespace {

bool set_fused_sdp(bool on) {
  return g_fused_sdp.exchange(on);
}

}  // namespace

// backend.py, through ctypes.PyDLL (the GIL held): the Python function every frame is handed to from now on
// (`PyHandOff`), a reference to it kept for good; 0 where CPython's functions are not found (frames then go through
// the `gpupool_native::send` operator, as before round 49). Set once (a second call keeps the first function).
extern "C" __attribute__((visibility("default"))) int gpupool_native_set_hand_off(void* fn) {
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  if (g_hand_off.fn.load() != nullptr) return 1;
  if (fn == nullptr || !g_hand_off.resolve()) return 0;
  g_hand_off.incref(fn);
  g_hand_off.fn.store(fn, std::memory_order_release);
  return 1;
}

TORCH_LIBRARY(gpupool_native, m) {
  m.def("stats() -> int[]", &stats);
  m.def("configure(bool keep, bool track, bool cache) -> ()", &configure);
  m.def("take_records() -> Tensor", &take_records);
  m.def("op_name(int id) -> str", &op_name);
  m.def("reset_stats() -> ()", &reset_stats);
  m.def("claim(bool functional, bool foreach) -> int", &claim);
  m.def("configure_wire(int index, int base, str[]? ops, int[] dtype_codes, int strided, int[] mf_codes, bool python, int flush_ops, bool fused_sdpa, bool sdpa_dropout) "
        "-> ()", &configure_wire);
  m.def("wire_handle(Tensor t) -> int", &py_wire_handle);
  m.def("new_output(int[] size, int[] stride, ScalarType dtype, int index) -> Tensor", &py_new_output);
  m.def("adopt(Tensor[] ts, bool commit) -> int[]", &py_adopt);
  m.def("resize_output(Tensor t, int[] size, int[] stride) -> ()", &py_resize_output);
  m.def("append_command(Tensor raw, int index) -> ()", &py_append_command);
  m.def("scalar_type(Tensor t) -> int", &scalar_type_of);
  m.def("flush() -> ()", &flush_now);
  m.def("wire_stats() -> int[]", &wire_stats);
  m.def("set_autoconnect() -> ()", &set_autoconnect);
  m.def("record_start(int index) -> ()", &record_start);
  m.def("record_stop(int index) -> Tensor", &record_stop);
  m.def("watch(int index, int[] handles, bool on) -> ()", &watch);
  m.def("fired(int index) -> int[]", &fired);
  m.def("replay(int index, int graph_id, bool current, Tensor[] inputs, int[] drop_writes) -> (Tensor[], int[])", &replay);
  m.def("replay_outputs(int index, int graph_id, Tensor[] outputs, int[] writes, Tensor[] params, Tensor[] fresh) -> ()",
        &replay_outputs);
  m.def("replay_forget(int index, int graph_id) -> ()", &replay_forget);
  m.def("new_handle(int index) -> int", &py_new_handle);
  m.def("set_device_count(int n) -> ()", &set_device_count);
  m.def("set_quota(int index, int bytes) -> ()", &set_quota);  // the session's memory quota (HandleAllocator)
  m.def("over_quota(int index, int nbytes, int quota) -> ()");  // raises the shim's OutOfMemoryError (backend.py)
  m.def("sync_near(int index) -> ()");  // a sync past the session's quota, its error raised at the call (backend.py)
  m.def("device_count() -> int", &device_count);
  m.def("current_device() -> int", &current_device);
  m.def("set_current_device(int index) -> ()", &set_current_device);
  m.def("set_fused_sdp(bool on) -> bool", &set_fused_sdp);  // scaled_dot_product_attention's fused backend (default on)
  // Implemented in Python (client/native/backend.py, over client/session.py's Session of device `index`): the frame
  // hand-offs.
  m.def("send(Tensor frame, int index) -> ()");
  m.def("hand_off_failed(int index) -> ()");  // raises the error `_hand_off` caught (g_hand_off's frames)
  m.def("sync_scalar(Tensor frame, int index, int handle) -> float");
  m.def("download(Tensor frame, int index, int handle, int[] shape, ScalarType dtype) -> Tensor");
  m.def("download_into(Tensor frame, int index, int handle, Tensor(a!) out) -> ()");  // into `.cpu()`'s tensor
  m.def("upload(Tensor frame, int index, int handle, Tensor data) -> ()");  // wire_big_upload's: Session.upload
  m.def("autoconnect(int index) -> ()");  // gpupool run --native-client: attach the session of the lease's device
}
