// What the extension's translation units share: zquant_cpu.cpp's ops that decode.cpp builds on,
// attention.cpp's and head.cpp's kernels.
#pragma once

#include <ATen/ATen.h>
#include <torch/extension.h>

#include <immintrin.h>

#include <optional>
#include <vector>

// Sleef's exp as exported by libtorch_cpu: what torch's 16-lane Vectorized<float>::exp() calls.
extern "C" __m512 Sleef_expf16_u10(__m512);

namespace zq {

using at::Tensor;

// The first min(n, 16) lanes.
inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
}

// 16 floats from f32 or bf16 memory (masked tail: missing lanes read as 0; bf16 -> f32 is exact).
// A full mask takes a plain load (measured: the bf16 head kernel at M = 1, 2 threads, 3.07 -> 2.75-2.96 ms).
inline __m512 load16(const void* p, bool bf16, __mmask16 m) {
  if (bf16) {
    const __m256i h = m == 0xFFFF ? _mm256_loadu_si256(static_cast<const __m256i*>(p)) : _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  return m == 0xFFFF ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
}

// Activations after a linear layer (see zquant_cpu.cpp). kGeluNew (transformers' NewGELUActivation,
// a Python formula) only in the decode step, which computes it with the formula's own ops.
enum Act : int64_t { kNone = 0, kRelu = 1, kGelu = 2, kGeluTanh = 3, kSilu = 4, kGeluNew = 5 };
// How an activation is quantized: token-wise symmetric / asymmetric, or with one static scale;
// kNoQuant: not at all (a linear or norm output that no consumer wants quantized).
enum QMode : int64_t { kNoQuant = -1, kSym = 0, kAsym = 1, kStatic = 2 };
// The fused normalizations: Llama's RMSNorm, or LayerNorm.
enum Norm : int64_t { kRms = 0, kLayer = 1 };

std::vector<Tensor> quantize(const Tensor& x, int64_t mode, double static_scale);
std::vector<Tensor> norm_quant(const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                               double eps, int64_t kind, int64_t mode);
std::vector<Tensor> linear(const Tensor& x, const std::optional<Tensor>& qa, const std::optional<Tensor>& ascale,
                           const std::optional<Tensor>& aoff, int64_t amode, double static_scale, const Tensor& wpack,
                           const Tensor& wsum, const Tensor& wscale, const std::optional<Tensor>& wbias, int64_t bits,
                           int64_t N, int64_t act, bool gated, int64_t out_mode);

// attention.cpp: causal attention of new query rows over the step runner's KV cache (its layout is
// described there). One sequence's part of a step:
struct AttnSeq {
  const float* q;                 // [n, heads, d]: the new rows' queries (RoPE applied)
  float* out;                     // [n, heads, d]
  int64_t n, pos0;                // the new rows, and the position of the first
  const void* keys;               // the sequence's cache slot: keys [kv_heads, ld / 64, d, 64]
  const void* values;             // values [kv_heads, ld, d]
  const float* kscale;            // INT8 cache: scales [kv_heads, ld]; else null
  const float* vscale;
};
struct AttnShape {
  int64_t heads, kv_heads, d, ld;   // ld: cache positions, a multiple of 64
  float scaling;
  bool int8;
};
constexpr int64_t kMaxHeadDim = 256;
void attend(const std::vector<AttnSeq>& seqs, const AttnShape& shape);

// head.cpp: the output head's kernel and huge-page memory for the decode weights.
Tensor head_logits(const Tensor& x, const Tensor& w);
Tensor hugepage_empty(int64_t nbytes);
void register_head(pybind11::module_& m);

// decode.cpp: the whole-model step runner (zquant.generate's fast path).
void register_decode(pybind11::module_& m);

}  // namespace zq
