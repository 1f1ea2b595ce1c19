// The one copy of gpupool's choice of `scaled_dot_product_attention`'s backend on a gpupool device, included by both
// C++ sources that answer torch's `_fused_sdp_choice_stub` for PrivateUse1: client/torch/native_guard.cpp (the shim's
// device guard) and client/native/native_client.cpp (the C++ client). Each library is built from its own source and
// cached by a hash that covers this file too (client/torch/native.py `library_path`, client/native/build.py
// `built_path`): an edit here rebuilds both.
//
// scaled_dot_product_attention's backend on a gpupool device (torch asks `_fused_sdp_choice_stub` for PrivateUse1;
// without an answer it takes the math path: bmm, mul, `_safe_softmax`, views, ~30 autograd nodes and records a call).
// `overrideable` sends one `_scaled_dot_product_fused_attention_overrideable` record (+ its backward), which the
// daemon runs fused (server/attention.py; with dropout_p in (0, 1) torch's math path itself, its mask drawn from the
// session's seeded stream exactly as the math path's `native_dropout` draws it); `math` is kept for every call the
// daemon's fused op refuses or where local CPU's flash kernel would not run either: dropout_p of 1 or more, GQA, other than 4-D, mixed or non-floating dtypes, float64 without dropout, unequal head sizes, an empty
// or last-dim-strided input, a mask that needs a gradient, is of another dtype or does not broadcast to the scores.
// server/attention.py `check_forward` holds the same rules (a test checks both sides on the same calls).
#pragma once

#include <ATen/Context.h>
#include <ATen/SDPBackend.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace gpupool_sdpa {

// `fused`: the caller's switch (off: always the math path). `dropout`: whether the daemon of q's device serves the
// fused op with dropout (AttachReply.features names "sdpa_dropout"; a daemon from before round 24 names nothing, and
// one from before round 23 refuses dropout_p other than 0): without it a call with dropout takes the math path.
inline int64_t sdp_choice(bool fused, bool dropout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& mask, double dropout_p, bool is_causal,
                          bool enable_gqa) {
  const int64_t math = static_cast<int64_t>(at::SDPBackend::math);
  // The fused op stands for the fused kernels a GPU would choose from (flash, efficient, cuDNN; overrideable, its own
  // name): the script's `torch.nn.attention.sdpa_kernel(SDPBackend.MATH)` (or `torch.backends.cuda.sdp_kernel(
  // enable_flash=False, enable_mem_efficient=False)`, `enable_*_sdp(False)`) turns them all off and gets the math
  // path, as on a GPU: a script asks for it where it takes a gradient of a gradient, which no fused kernel has (until
  // round 47: "derivative for aten::_scaled_dot_product_fused_attention_overrideable_backward is not implemented").
  const at::Context& ctx = at::globalContext();
  const bool flash = ctx.userEnabledFlashSDP(), efficient = ctx.userEnabledMemEfficientSDP();
  const bool cudnn = ctx.userEnabledCuDNNSDP(), own = ctx.userEnabledOverrideableSDP();
  // The math backend off too (`sdpa_kernel(SDPBackend.FLASH_ATTENTION)`, `sdpa_kernel([])`, `enable_math_sdp(False)`):
  // where no enabled fused kernel of a GPU takes the call, a GPU raises torch's "No available kernel. Aborting
  // execution." and so does this (until round 48 the math path ran). Where a GPU's fused kernel would take it and the
  // daemon's does not (a mask that needs a gradient, GQA: CUDA's efficient/flash kernels), the math path still runs.
  const bool math_on = ctx.userEnabledMathSDP();
  auto none = [&](const char* why) -> int64_t {
    TORCH_CHECK(math_on, "No available kernel. Aborting execution. (gpupool: scaled_dot_product_attention with the "
                "math backend disabled and no enabled fused backend that takes this call, as on a GPU: ", why, ")");
    return math;
  };
  // Every fused backend off and math on (`sdpa_kernel(SDPBackend.MATH)`): the math path, as on a GPU; a script asks
  // for it where it takes a gradient of a gradient, which no fused kernel has (until round 47: "derivative for
  // aten::_scaled_dot_product_fused_attention_overrideable_backward is not implemented").
  if (!flash && !efficient && !cudnn && !own) return none("every fused backend is disabled");
  // dropout_p in (0, 1): the daemon's dropout composition draws the math path's `native_dropout` numbers from the
  // session's seeded stream (server/attention.py); 1 (or out of range) keeps the math path, which handles it.
  if (!(dropout_p >= 0.0 && dropout_p < 1.0)) return none("dropout_p out of [0, 1)");
  // Grouped-query attention (`enable_gqa=True`, fewer key/value heads than query heads): the fused op has no
  // enable_gqa argument, so torch's math path (repeat_interleave of key and value, then the math path's ops) runs it,
  // with local CPU's values. On a GPU flash attention (float16/bfloat16, no mask) and cuDNN take GQA, the
  // memory-efficient kernel does not (`check_batch_size_and_num_heads_dense<false>` in torch's sdp_utils.cpp): with
  // the math backend off and none of those two able to take the call, a GPU raises "No available kernel", and so does
  // this (until round 49 the math path ran anyway).
  if (enable_gqa && !math_on) {
    const bool half = q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16;
    const bool masked = mask.has_value() && mask->defined();
    if (!(half && ((flash && !masked) || cudnn)))
      return none("grouped-query attention (enable_gqa) is taken by flash attention without attn_mask and cuDNN "
                  "attention, in float16 and bfloat16 only; the memory-efficient kernel takes none");
  }
  if (!fused || (dropout_p != 0.0 && !dropout) || enable_gqa) return math;
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4 || q.is_nested() || k.is_nested() || v.is_nested())
    return none("inputs other than 4-D");
  const auto dt = q.scalar_type();
  if (dt != at::kFloat && dt != at::kHalf && dt != at::kBFloat16 && dt != at::kDouble) return none("the dtype");
  if (k.scalar_type() != dt || v.scalar_type() != dt) return none("mixed dtypes");
  if (dt == at::kDouble && !math_on) return none("float64 (no fused kernel of a GPU takes it)");
  // flash or cuDNN alone: half and bfloat16 only; flash takes no mask
  const bool half = dt == at::kHalf || dt == at::kBFloat16;
  const bool masked = mask.has_value() && mask->defined();
  if (!efficient && !own && !(half && ((flash && !masked) || cudnn)))
    return none(half ? "flash attention takes no attn_mask" : "flash and cuDNN attention take float16 and bfloat16 only");
  // float64 without dropout: torch's math path, as CUDA's fused kernels take no float64. The daemon's CPU flash kernel
  // would return a float64 logsumexp where torch's meta kernel (the clients' shapes) says float32, which the backward
  // then refuses (round 26: no float64 backward through the pool). With dropout the daemon runs the math path's own
  // steps (a float32 logsumexp nothing reads): fused still. server/attention.py `check_forward` refuses the same.
  if (dt == at::kDouble && dropout_p == 0.0) return math;
  const int64_t b = q.size(0), h = q.size(1), l = q.size(2), e = q.size(3), s = k.size(2);
  if (k.size(0) != b || v.size(0) != b || k.size(1) != h || v.size(1) != h || v.size(2) != s) return math;
  if (k.size(3) != e || v.size(3) != e) return math;
  if (b == 0 || h == 0 || l == 0 || e == 0 || s == 0) return math;
  if (q.stride(3) != 1 || k.stride(3) != 1 || v.stride(3) != 1) return none("a last dimension not contiguous");
  if (masked) {
    const at::Tensor& m = *mask;
    // (a 0-D or 1-D mask: the daemon takes 2 to 4 dims, as local CPU's flash kernel does; the math path takes any)
    // attn_mask with is_causal=True: both apply, the fused op's way (server/attention.py: the CPU flash kernel, CUDA's
    // memory-efficient kernel, its math composition and its dropout composition all take both), as local CPU's flash
    // kernel and a GPU's memory-efficient and cuDNN kernels run it. torch's math path refuses the pair ("Explicit
    // attn_mask should not be set when is_causal=True"): until round 49 this sent it there, and a script that runs on
    // a GPU and on the CPU failed on gpupool. A mask the fused op does not take (below) still gets that error.
    if (m.requires_grad() || m.is_nested() || m.dim() < 2 || m.dim() > 4) return math;
    if (m.scalar_type() != at::kBool && m.scalar_type() != dt) return math;
    const int64_t scores[4] = {b, h, l, s};
    for (int64_t i = 1; i <= m.dim(); i++) {
      const int64_t n = m.size(m.dim() - i);
      if (n != 1 && n != scores[4 - i]) return math;
    }
  }
  return static_cast<int64_t>(at::SDPBackend::overrideable);
}

}  // namespace gpupool_sdpa
