// zquant CPU fast path: INT8 x INT8 -> INT32 GEMM with AVX-512 VNNI, with token-wise
// quantization fused into the producer of the activation and dequantization fused into the
// GEMM's output. Built just in time by zquant/kernels/build.py; the Python side is
// zquant/kernels/cpu.py, and every op here has a plain-PyTorch twin (kernels/reference.py, or
// the model's own modules for the fused normalizations and activations) whose results it
// reproduces bit for bit.
//
// Conventions (the same as zquant.primitives):
//   * an activation row is quantized to int8 q, and stored as u = q + 128 (uint8) because VNNI's
//     vpdpbusd multiplies unsigned by signed bytes. The row's "offset" o = 128 + zero_point
//     (128 when symmetric) undoes that exactly in int32:  sum_k (q - z) w = sum_k u w - o * rowsum(w).
//   * rounding is round-half-even on the correctly rounded float quotient x / scale, exactly as
//     torch.round(x / scale): a true division, no multiply-by-reciprocal shortcut.
//   * the epilogue applies the float ops in the reference's order (acc * wscale, * xscale, + bias),
//     compiled with -ffp-contract=off.
//   * a row with a NaN or an infinity gets scale NaN and q = 0 (see nonfinite_row), so its output
//     row is NaN, as in floating point; the other rows are unaffected.
//
// Packed weight layout (built in Python, zquant/kernels/cpu.py:pack): output rows are padded to a
// multiple of 16 and grouped in "tiles" of 16 rows; K is padded to a multiple of 4. A tile is
// [K/4][16 rows][4 k] int8, i.e. one 64-byte vector per 4 k values, the operand of one vpdpbusd.
// INT4 tiles keep two values per byte, stored as w + 8 (0..15): the 64-byte vector t holds k groups
// 2t (low nibbles) and 2t + 1 (high nibbles), so unpacking a group is an AND (and a shift), and the
// nibbles serve as vpdpbusd's signed operand as they are. The + 8 adds 8 * sum_k u to a row's
// accumulator, which the epilogue takes off (Gemm::usum). An odd last group has no high nibbles.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "zquant_cpu.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace zq {

using at::Tensor;

// ------------------------------------------------------------------------------------------
// Small SIMD helpers
// ------------------------------------------------------------------------------------------

constexpr int kTile = 16;       // output rows (packed columns) per tile = int32 lanes per zmm
constexpr int kMR = 6;          // activation rows per micro-kernel
constexpr int kMaxNV = 4;       // tiles per micro-kernel (6 x 4 = 24 accumulators)

// The codes that cross from Python as integers: the enums Act, QMode and Norm of zquant_cpu.h
// (shared with decode.cpp), defined there only; the module exports each as a {name: code} dict
// (ACT_CODES, QUANT_MODES, NORM_CODES), which cpu.py reads.
// Activations: in a gated GEMM (act(gate) * up) only SiLU, computed in the epilogue exactly as
// torch does; after a plain GEMM, torch's own in-place op runs on the output.

struct CodeName {
  const char* name;
  int64_t code;
};
constexpr CodeName kActNames[] = {{"none", kNone}, {"relu", kRelu}, {"gelu", kGelu}, {"gelu_tanh", kGeluTanh},
                                  {"silu", kSilu}, {"gelu_new", kGeluNew}};
constexpr CodeName kQModeNames[] = {{"none", kNoQuant}, {"sym", kSym}, {"asym", kAsym}, {"static", kStatic}};
constexpr CodeName kNormNames[] = {{"rms", kRms}, {"layer", kLayer}};

// (tail_mask and load16, the masked 16-lane loads, are in zquant_cpu.h: decode.cpp uses them too.)

// float -> bf16 with round-to-nearest-even, NaN kept quiet (what c10::BFloat16 does).
static inline __m256i to_bf16(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// v rounded to bf16 precision and widened back (an intermediate `.to(bfloat16)` in the reference).
static inline __m512 round_bf16(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(v)), 16));
}

static inline void store16(void* p, __m512 v, bool bf16, __mmask16 m) {
  if (bf16) _mm256_mask_storeu_epi16(p, m, to_bf16(v));
  else _mm512_mask_storeu_ps(p, m, v);
}

// ------------------------------------------------------------------------------------------
// Bit-exact twins of the PyTorch computations the fused ops replace
// ------------------------------------------------------------------------------------------
//
// INT8 rounding is discontinuous: a fused normalization or activation that differs from PyTorch's
// by one float32 ulp flips some quantized values, and on models with massive activation outliers
// (SmolLM2) that moves the perplexity in its third digit. So these helpers reproduce, operation
// for operation, what torch computes on CPU; the tests compare them with torch bit for bit.
// Note: torch registers many CPU kernels (sum among them) for AVX2 only ("REGISTER_DISPATCH"
// skips AVX-512), so there its Vectorized<float> has 8 lanes; silu has an AVX-512 kernel (16).

// (Sleef_expf16_u10, Sleef's exp as exported by libtorch_cpu, is declared in zquant_cpu.h.)

static inline int64_t ceil_log2(int64_t x) {   // ATen's utils::CeilLog2
  return x <= 2 ? 1 : 64 - __builtin_clzll((uint64_t)(x - 1));
}

// ATen's multi_row_sum (SumKernel.cpp): 4 interleaved running sums over `size` groups, added in
// cascaded levels. V is float or __m256; load(i, k) returns element (vector) i * 4 + k.
template <typename V, typename Load, typename Add>
static inline void multi_row_sum(int64_t size, V (&out)[4], V zero, const Load& load, const Add& add) {
  constexpr int64_t kLevels = 4;
  const int64_t level_power = std::max<int64_t>(4, ceil_log2(size) / kLevels);
  const int64_t level_step = int64_t(1) << level_power, level_mask = level_step - 1;
  V acc[kLevels][4];
  for (auto& level : acc)
    for (auto& a : level) a = zero;
  int64_t i = 0;
  for (; i + level_step <= size;) {
    for (int64_t j = 0; j < level_step; ++j, ++i)
      for (int k = 0; k < 4; ++k) acc[0][k] = add(acc[0][k], load(i, k));
    for (int64_t j = 1; j < kLevels; ++j) {
      for (int k = 0; k < 4; ++k) {
        acc[j][k] = add(acc[j][k], acc[j - 1][k]);
        acc[j - 1][k] = zero;
      }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < size; ++i)
    for (int k = 0; k < 4; ++k) acc[0][k] = add(acc[0][k], load(i, k));
  for (int64_t j = 1; j < kLevels; ++j)
    for (int k = 0; k < 4; ++k) acc[0][k] = add(acc[0][k], acc[j][k]);
  for (int k = 0; k < 4; ++k) out[k] = acc[0][k];
}

// sum(x[k]^2 for k < K) in the order of torch's `x.pow(2).sum(-1)` on a contiguous float row:
// cascade_sum -> vectorized_inner_sum over 8-lane vectors (scalar_inner_sum below 8 elements).
template <bool BF16>
static float aten_row_sum_sq(const char* xr, int64_t K) {
  constexpr int64_t es = BF16 ? 2 : 4;
  auto sq = [&](int64_t k) {
    const float v = _mm512_cvtss_f32(load16(xr + k * es, BF16, 1));
    return v * v;
  };
  auto fadd = [](float a, float b) { return a + b; };
  if (K < 8) {
    float part[4];
    const int64_t groups = K / 4;
    multi_row_sum<float>(groups, part, 0.f, [&](int64_t i, int k) { return sq(4 * i + k); }, fadd);
    for (int64_t k = groups * 4; k < K; ++k) part[0] += sq(k);
    return ((part[0] + part[1]) + part[2]) + part[3];
  }
  const int64_t nvec = K / 8, groups = nvec / 4;
  auto vsq = [&](int64_t v) {
    const __m256 x = _mm512_castps512_ps256(load16(xr + v * 8 * es, BF16, 0xFF));
    return _mm256_mul_ps(x, x);
  };
  __m256 part[4];
  multi_row_sum<__m256>(groups, part, _mm256_setzero_ps(), [&](int64_t i, int k) { return vsq(4 * i + k); },
                        [](__m256 a, __m256 b) { return _mm256_add_ps(a, b); });
  for (int64_t v = groups * 4; v < nvec; ++v) part[0] = _mm256_add_ps(part[0], vsq(v));
  for (int k = 1; k < 4; ++k) part[0] = _mm256_add_ps(part[0], part[k]);
  float total = 0.f;
  for (int64_t k = nvec * 8; k < K; ++k) total += sq(k);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, part[0]);
  for (float lane : lanes) total += lane;
  return total;
}

// Where torch's elementwise silu on a contiguous tensor of `numel` elements uses its scalar code
// (std::exp) instead of the vectorized one (Sleef): cpu_kernel_vec splits [0, numel) like
// at::parallel_for (grain 32768) and each chunk runs `step`-element vector iterations (two
// vectors), then a scalar tail. The two exps differ on ~0.4% of inputs, so the tails matter.
struct ScalarTails {
  static constexpr int kMax = 256;
  int64_t begin[kMax];
  int64_t end[kMax];
  int n = 0;
  ScalarTails(int64_t numel, int64_t threads, int64_t step) {
    constexpr int64_t kGrain = 32768;
    int64_t chunks = 1, chunk = std::max<int64_t>(numel, 1);
    if (numel > kGrain && threads > 1) {
      chunks = std::min<int64_t>({threads, (numel + kGrain - 1) / kGrain, kMax});
      chunk = (numel + chunks - 1) / chunks;
    }
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t b = c * chunk, e = std::min(numel, b + chunk);
      if (b >= e) break;
      const int64_t vec_end = b + (e - b) / step * step;
      if (vec_end < e) { begin[n] = vec_end; end[n] = e; ++n; }
    }
  }
  // lanes of the 16 elements starting at flat index i that fall in a scalar tail
  __mmask16 lanes(int64_t i) const {
    __mmask16 m = 0;
    for (int t = 0; t < n; ++t)
      if (begin[t] < i + 16 && end[t] > i)
        for (int64_t j = std::max(begin[t], i); j < std::min(end[t], i + 16); ++j) m |= (__mmask16)(1u << (j - i));
    return m;
  }
};

// torch's silu, x / (1 + exp(-x)), given e = Sleef's exp(-x) (see store_gated); `scalar` lanes
// use std::exp like torch's scalar tails.
static inline __m512 silu16(__m512 x, __m512 e, __mmask16 scalar) {
  if (__builtin_expect(scalar != 0, 0)) {
    alignas(64) float ev[16], nv[16];
    _mm512_store_ps(ev, e);
    _mm512_store_ps(nv, _mm512_xor_ps(x, _mm512_set1_ps(-0.f)));
    for (int j = 0; j < 16; ++j)
      if (scalar & (1u << j)) ev[j] = std::exp(nv[j]);
    e = _mm512_load_ps(ev);
  }
  return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

// ------------------------------------------------------------------------------------------
// Token-wise quantization of one row (the same arithmetic as primitives.quantize_per_token)
// ------------------------------------------------------------------------------------------

// Non-finite activations propagate as in floating point: a row with a NaN or an infinity (or,
// asymmetric, a range wider than float32) gets scale NaN and q = 0 (u = 128, offset 128), as in
// primitives.quantize_per_token, so its GEMM output row is NaN and the other rows are untouched.
//
// The check rides on the abs-max reduction: with the sign cleared, the unsigned order of float bits
// is the float order, and every NaN and infinity lies at or above kNonFiniteBits, so one integer
// max per vector yields the absmax and the check together. (_mm512_max_ps cannot: when either
// operand is NaN it returns the second, so a NaN is dropped by the next step of the reduction.)
constexpr uint32_t kNonFiniteBits = 0x7F800000u;

static inline __m512i abs_bits(__m512 v) {
  return _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7FFFFFFF));
}

static void nonfinite_row(uint8_t* u, int64_t Kp, float* scale_out, int32_t* off_out) {
  std::memset(u, 128, Kp);
  *scale_out = std::numeric_limits<float>::quiet_NaN();
  *off_out = 128;
}

// Quantizes row x[0:K] (f32 or bf16) into u[0:Kp] (u = q + 128; padding = 128, i.e. q = 0).
// MODE kSym / kAsym / kStatic (static_scale used). Writes the row's scale and offset.
// Templated so that the hot loops carry no per-vector branches.
template <bool BF16, int MODE>
static void quantize_row_t(const void* x, int64_t K, int64_t Kp, float static_scale, uint8_t* __restrict u,
                           float* scale_out, int32_t* off_out) {
  constexpr int64_t es = BF16 ? 2 : 4;
  const char* __restrict xb = static_cast<const char*>(x);
  float scale, zero = 0.f;
  if constexpr (MODE == kStatic) {
    scale = static_scale;
  } else if constexpr (MODE == kSym) {
    __m512i mx = _mm512_setzero_si512();
    for (int64_t i = 0; i < K; i += 16)
      mx = _mm512_max_epu32(mx, abs_bits(load16(xb + i * es, BF16, tail_mask(K - i))));
    const uint32_t bits = _mm512_reduce_max_epu32(mx);
    if (bits >= kNonFiniteBits) return nonfinite_row(u, Kp, scale_out, off_out);
    float absmax;
    std::memcpy(&absmax, &bits, 4);
    scale = absmax > 0.f ? absmax / 127.0f : 1.0f;
  } else {
    __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();   // starting at 0 = clamping the range to include 0
    __m512i mx = _mm512_setzero_si512();                         // min / max drop NaNs: checked apart
    for (int64_t i = 0; i < K; i += 16) {
      const __m512 v = load16(xb + i * es, BF16, tail_mask(K - i));   // masked-out lanes read 0: harmless
      lo = _mm512_min_ps(lo, v);
      hi = _mm512_max_ps(hi, v);
      mx = _mm512_max_epu32(mx, abs_bits(v));
    }
    const float l = _mm512_reduce_min_ps(lo), h = _mm512_reduce_max_ps(hi);
    const float span = h - l;
    if (_mm512_reduce_max_epu32(mx) >= kNonFiniteBits || !(span <= std::numeric_limits<float>::max()))
      return nonfinite_row(u, Kp, scale_out, off_out);
    scale = span > 0.f ? span / 255.0f : 1.0f;
    zero = std::min(127.f, std::max(-128.f, -128.f - std::nearbyint(l / scale)));
  }
  const __m512 vs = _mm512_set1_ps(scale), vz = _mm512_set1_ps(zero);
  const __m512 vlo = _mm512_set1_ps(MODE == kAsym ? -128.f : -127.f), vhi = _mm512_set1_ps(127.f);
  const __m512i v128 = _mm512_set1_epi32(128);
  __m512i seen = _mm512_setzero_si512();   // static: the |x| bits seen, for the finite check
  // One 16-value step. A true division, not a multiplication by 1/s: round(x / s) then equals
  // torch.round(x / scale) exactly (a reciprocal can move a quotient across a .5 boundary), and
  // measured on Zen 5 the division is even cheaper than detecting those rare lanes.
  auto step = [&](__m512 xv) {
    if constexpr (MODE == kStatic) seen = _mm512_max_epu32(seen, abs_bits(xv));
    __m512 q = _mm512_roundscale_ps(_mm512_div_ps(xv, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    if constexpr (MODE == kAsym) q = _mm512_add_ps(q, vz);
    // (symmetric: |x / s| <= 127 anyway, except when absmax / 127 underflows to 0, as in the reference)
    q = _mm512_min_ps(_mm512_max_ps(q, vlo), vhi);
    // vpmovdb to a register, then a plain store: its memory form is microcoded and slow on AMD
    return _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(q), v128));
  };
  int64_t i = 0;
  for (; i + 16 <= K; i += 16)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(u + i), step(load16(xb + i * es, BF16, 0xFFFF)));
  if (i < K) {
    const __mmask16 m = tail_mask(K - i);
    _mm_mask_storeu_epi8(u + i, m, step(load16(xb + i * es, BF16, m)));
  }
  for (int64_t i = K; i < Kp; ++i) u[i] = 128;
  if constexpr (MODE == kStatic)
    if (_mm512_reduce_max_epu32(seen) >= kNonFiniteBits) return nonfinite_row(u, Kp, scale_out, off_out);
  *scale_out = scale;
  *off_out = 128 + (int32_t)zero;
}

static void quantize_row(const void* x, bool bf16, int64_t K, int64_t Kp, int64_t mode, float static_scale,
                         uint8_t* u, float* scale_out, int32_t* off_out) {
#define ZQ_Q(B, MD) quantize_row_t<B, MD>(x, K, Kp, static_scale, u, scale_out, off_out)
  if (bf16) {
    if (mode == kSym) ZQ_Q(true, kSym); else if (mode == kAsym) ZQ_Q(true, kAsym); else ZQ_Q(true, kStatic);
  } else {
    if (mode == kSym) ZQ_Q(false, kSym); else if (mode == kAsym) ZQ_Q(false, kAsym); else ZQ_Q(false, kStatic);
  }
#undef ZQ_Q
}

static inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Rows handled per parallel task so that a task is worth a few microseconds.
static inline int64_t row_grain(int64_t K) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(K, 1)); }

// Activations are contiguous [..., K]: M = numel / K rows.
static void check_x(const Tensor& x) {
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous(), "zquant_cpu: expected a contiguous activation [..., K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "zquant_cpu: activations must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(!x.is_cuda(), "zquant_cpu: CPU tensors only");
}

static inline int64_t rows_of(const Tensor& x) {
  const int64_t K = x.size(-1);
  return K == 0 ? 0 : x.numel() / K;
}

// x.shape[:-1] + [n]
static std::vector<int64_t> with_last(const Tensor& x, int64_t n) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = n;
  return sizes;
}

static void quantize_rows(const Tensor& x, int64_t mode, double static_scale, uint8_t* u, int64_t Kp,
                          float* scale, int32_t* off) {
  const int64_t M = rows_of(x), K = x.size(-1);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const char* xb = static_cast<const char*>(x.data_ptr());
  const int64_t row_bytes = K * (bf16 ? 2 : 4);
  const float ss = (float)static_scale;
  at::parallel_for(0, M, row_grain(K), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m)
      quantize_row(xb + m * row_bytes, bf16, K, Kp, mode, ss, u + m * Kp, scale + m, off + m);
  });
}

// quantize(x [..., K], mode, static_scale) -> (u uint8 [M, Kp], scale f32 [M], offset i32 [M])
std::vector<Tensor> quantize(const Tensor& x, int64_t mode, double static_scale) {
  at::NoGradGuard no_grad;   // no autograd graph inside (e.g. LayerNorm's weight): no gradient here
  check_x(x);
  TORCH_CHECK(mode == kSym || mode == kAsym || mode == kStatic, "zquant_cpu.quantize: bad mode ", mode);
  const int64_t M = rows_of(x), Kp = round_up(x.size(-1), 4);
  Tensor u = at::empty({M, Kp}, x.options().dtype(at::kByte));
  Tensor s = at::empty({M}, x.options().dtype(at::kFloat));
  Tensor o = at::empty({M}, x.options().dtype(at::kInt));
  quantize_rows(x, mode, static_scale, u.data_ptr<uint8_t>(), Kp, s.data_ptr<float>(), o.data_ptr<int32_t>());
  return {u, s, o};
}

// ------------------------------------------------------------------------------------------
// Fused normalization + quantization
// ------------------------------------------------------------------------------------------

// norm_quant(x [..., K], weight [K]?, bias [K]?, eps, kind (kRms / kLayer), mode)
//   -> (y [..., K] in x's dtype, u uint8 [M, Kp], scale [M], offset [M]); mode kNoQuant = y only.
// y is written once; the quantization then re-reads the row just written (still in L1), so the
// quantized values are exactly those a consumer would compute from y.
std::vector<Tensor> norm_quant(const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                               double eps, int64_t kind, int64_t mode) {
  at::NoGradGuard no_grad;   // no autograd graph inside (e.g. LayerNorm's weight): no gradient here
  check_x(x);
  TORCH_CHECK(kind == kRms || kind == kLayer, "zquant_cpu.norm_quant: kind must be ", int64_t(kRms),
              " (RMSNorm) or ", int64_t(kLayer), " (LayerNorm), got ", kind);
  const int64_t M = rows_of(x), K = x.size(-1), Kp = round_up(K, 4);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const bool quant = mode != kNoQuant;
  Tensor u = at::empty({quant ? M : 0, Kp}, x.options().dtype(at::kByte));
  Tensor s = at::empty({quant ? M : 0}, x.options().dtype(at::kFloat));
  Tensor o = at::empty({quant ? M : 0}, x.options().dtype(at::kInt));
  uint8_t* up = quant ? u.data_ptr<uint8_t>() : nullptr;
  float* sp = quant ? s.data_ptr<float>() : nullptr;
  int32_t* op = quant ? o.data_ptr<int32_t>() : nullptr;
  const int64_t es = bf16 ? 2 : 4;
  Tensor y;
  if (kind == kLayer) {
    // LayerNorm: torch's own kernel, bit-identical to the module by construction; the
    // quantization then reads each row once more.
    y = at::layer_norm(x, {K}, weight, bias, eps);
    const char* yb = static_cast<const char*>(y.data_ptr());
    if (quant)
      at::parallel_for(0, M, row_grain(K), [&](int64_t rb, int64_t re) {
        for (int64_t m = rb; m < re; ++m) quantize_row(yb + m * K * es, bf16, K, Kp, mode, 0.f, up + m * Kp, sp + m, op + m);
      });
    return {y, u, s, o};
  }
  // LlamaRMSNorm, operation for operation:  x.float(); v = x.pow(2).mean(-1); x * rsqrt(v + eps);
  // .to(dtype); weight * that. Each row is normalized and quantized while it is in L1.
  Tensor w;
  if (weight.has_value() && weight->defined()) {
    w = weight->contiguous().to(at::kFloat);
    TORCH_CHECK(w.numel() == K, "zquant_cpu.norm_quant: weight size");
  }
  y = at::empty_like(x);
  const char* xb = static_cast<const char*>(x.data_ptr());
  char* yb = static_cast<char*>(y.data_ptr());
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  const float feps = (float)eps;
  at::parallel_for(0, M, row_grain(K), [&](int64_t rb, int64_t re) {
    for (int64_t m = rb; m < re; ++m) {
      const char* xr = xb + m * K * es;
      char* yr = yb + m * K * es;
      const float var = (bf16 ? aten_row_sum_sq<true>(xr, K) : aten_row_sum_sq<false>(xr, K)) / (float)K;
      const __m512 rstd = _mm512_set1_ps(1.0f / std::sqrt(var + feps));
      for (int64_t i = 0; i < K; i += 16) {
        const __mmask16 mk = tail_mask(K - i);
        __m512 v = _mm512_mul_ps(load16(xr + i * es, bf16, mk), rstd);
        if (bf16) v = round_bf16(v);
        if (wp) v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, wp + i), v);
        store16(yr + i * es, v, bf16, mk);
      }
      if (quant) quantize_row(yr, bf16, K, Kp, mode, 0.f, up + m * Kp, sp + m, op + m);
    }
  });
  return {y, u, s, o};
}

// ------------------------------------------------------------------------------------------
// The dequantizing epilogue
// ------------------------------------------------------------------------------------------

struct Gemm {
  const uint8_t* A;  int64_t lda;  const float* ascale;  const int32_t* aoff;  int64_t M;
  const uint8_t* W;  int64_t bits;  int64_t K4;  int64_t ntiles;
  const int32_t* usum;                      // INT4: sum_k u of each row (see the layout), else null
  const int32_t* wsum;  const float* wscale;  const float* wbias;
  bool gated;  const ScalarTails* tails;    // gated: silu's scalar-tail lanes of the output
  char* out;  bool out_bf16;  int64_t N;    // out is [M, N], row stride N
};

#define ZQ_INLINE inline __attribute__((always_inline))

// The INT4 correction of row m: 8 * sum_k u (the nibbles' + 8, see the layout), else 0.
static ZQ_INLINE __m512i int4_correction(const Gemm& g, int64_t m) {
  return _mm512_set1_epi32(g.usum ? 8 * g.usum[m] : 0);
}

// int32 accumulators of one vector -> float, in the reference's order:
// (acc - c8 - offset * rowsum(w)) * weight scale * token scale + bias (c8: int4_correction).
static ZQ_INLINE __m512 dequant(const Gemm& g, __m512i acc, int64_t col, __m512i off, __m512i c8, __m512 sx) {
  acc = _mm512_sub_epi32(_mm512_sub_epi32(acc, c8), _mm512_mullo_epi32(off, _mm512_loadu_si512(g.wsum + col)));
  __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_loadu_ps(g.wscale + col));
  f = _mm512_mul_ps(f, sx);
  if (g.wbias) f = _mm512_add_ps(f, _mm512_loadu_ps(g.wbias + col));
  return f;
}

// One output vector of a plain GEMM: columns col .. col + 15 of row m (orow); false past N.
static ZQ_INLINE bool store_plain(const Gemm& g, char* orow, int64_t col, __m512i acc, __m512i off, __m512i c8,
                                  __m512 sx) {
  if (col >= g.N) return false;
  const int64_t es = g.out_bf16 ? 2 : 4;
  store16(orow + col * es, dequant(g, acc, col, off, c8, sx), g.out_bf16, tail_mask(g.N - col));
  return true;
}

// Output rows m0 .. m0 + mr - 1 of a gated GEMM from the accumulators of nv tiles, acc[r * kMaxNV + v]:
// tiles alternate gate, up, and the output is silu(gate) * up for 16 columns per pair, rounded
// like the reference's separate tensors (gate and up in x's dtype, then silu, then the product).
// Out of line and once per micro-kernel call, from memory: silu's cost dwarfs the round trip, and
// a call per row would spill the other rows' accumulators around it (measured: 20% slower).
// Three passes over the call's (up to 6 x 2) output vectors: dequantize, exp, then finish and
// store. Measured against one pass per vector (576 x 1536 pair): the same speed up to M = 1024,
// faster beyond, where the single pass slowed down per row (M = 2048, SmolLM2's 8 x 256 prefill:
// 4.97 -> 4.50 ms; M = 4096: 10.5 -> 9.1 ms).
__attribute__((noinline)) static void store_gated(const Gemm& g, int64_t m0, int mr, int64_t tile0, int nv,
                                                  const __m512i* acc) {
  constexpr int kMaxVec = kMR * kMaxNV / 2;
  const bool bf = g.out_bf16;
  const int pairs = (int)std::min<int64_t>(nv / 2, (g.N - tile0 / 2 * kTile + kTile - 1) / kTile);
  __m512 gate[kMaxVec], up[kMaxVec], e[kMaxVec];
  for (int r = 0; r < mr; ++r) {
    const __m512 sx = _mm512_set1_ps(g.ascale[m0 + r]);
    const __m512i off = _mm512_set1_epi32(g.aoff[m0 + r]), c8 = int4_correction(g, m0 + r);
    for (int p = 0; p < pairs; ++p) {
      const int64_t pc = (tile0 + 2 * p) * kTile;
      __m512 gv = dequant(g, acc[r * kMaxNV + 2 * p], pc, off, c8, sx);
      __m512 uv = dequant(g, acc[r * kMaxNV + 2 * p + 1], pc + 16, off, c8, sx);
      if (bf) { gv = round_bf16(gv); uv = round_bf16(uv); }
      gate[r * pairs + p] = gv;
      up[r * pairs + p] = uv;
    }
  }
  for (int i = 0; i < mr * pairs; ++i) e[i] = Sleef_expf16_u10(_mm512_xor_ps(gate[i], _mm512_set1_ps(-0.f)));
  for (int r = 0; r < mr; ++r) {
    const int64_t m = m0 + r;
    char* orow = g.out + m * g.N * (bf ? 2 : 4);
    for (int p = 0; p < pairs; ++p) {
      const int64_t oc = (tile0 / 2 + p) * kTile;
      const int i = r * pairs + p;
      __m512 a = silu16(gate[i], e[i], g.tails->lanes(m * g.N + oc));
      if (bf) a = round_bf16(a);
      store16(orow + oc * (bf ? 2 : 4), _mm512_mul_ps(a, up[i]), bf, tail_mask(g.N - oc));
    }
  }
}

// Output row m of a plain GEMM, the 16 x NV columns of tiles [tile0, tile0 + NV), from the
// accumulators a0..a3, dequantized and stored once. Inlined into the micro-kernels, so the
// accumulators go from registers to the output without a round trip through memory (measured:
// 3-4% faster at K = 576).
template <int NV>
static ZQ_INLINE void epilogue_row(const Gemm& g, int64_t m, int64_t tile0, __m512i a0, __m512i a1, __m512i a2,
                                   __m512i a3) {
  const __m512 sx = _mm512_set1_ps(g.ascale[m]);
  const __m512i off = _mm512_set1_epi32(g.aoff[m]), c8 = int4_correction(g, m);
  char* orow = g.out + m * g.N * (g.out_bf16 ? 2 : 4);
  const int64_t col = tile0 * kTile;
  if (!store_plain(g, orow, col, a0, off, c8, sx)) return;
  if constexpr (NV > 1) if (!store_plain(g, orow, col + 16, a1, off, c8, sx)) return;
  if constexpr (NV > 2) if (!store_plain(g, orow, col + 32, a2, off, c8, sx)) return;
  if constexpr (NV > 3) store_plain(g, orow, col + 48, a3, off, c8, sx);
}

// ------------------------------------------------------------------------------------------
// INT8 GEMM micro-kernels (AVX-512 VNNI)
// ------------------------------------------------------------------------------------------

// vpdpbusd through inline asm: GCC 12's intrinsic keeps the accumulators in memory
// (a load and a store around every instruction), which costs more than half the speed.
#define ZQ_DP(c, a, b) asm("vpdpbusd %2, %1, %0" : "+v"(c) : "v"(a), "v"(b))

static inline __m512i bcast4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// k group kq of an INT4 tile (the layout described at the top): the low or high nibbles of its
// 64-byte pair vector, w + 8 as int8.
static ZQ_INLINE __m512i unpack_group(const uint8_t* tile, int64_t kq) {
  __m512i v = _mm512_loadu_si512(tile + 64 * (kq >> 1));
  if (kq & 1) v = _mm512_srli_epi16(v, 4);
  return _mm512_and_si512(v, _mm512_set1_epi8(0x0F));
}

// Output rows m0 .. m0 + MR - 1 of tiles tile0 .. tile0 + NV - 1: sum_k A[r, k] * tile_v[k] over K4
// groups of 4 k, then the epilogue. A is u8 with row stride lda; tile v starts at B + v * tile_bytes,
// 64 bytes per k group.
// PH independent accumulator sets walk interleaved k groups so that small MR still keeps
// >= 16 vpdpbusd chains in flight (their latency would otherwise bound M = 1, 2).
// MR * PH <= 6 "virtual rows" of NV <= 4 accumulators: at most 24 of the 32 zmm registers.
// Q4: B holds INT4 tiles (32 bytes per k group), unpacked in registers (an AND, and a shift for odd
// groups). The unpacking runs on the vector ALUs beside the vpdpbusd chains; measured, it is never
// slower than unpacking a strip into an L2 buffer once and reading it back.
// pf, npf: npf cache lines from pf are prefetched into L2, one per k step. The driver passes a
// share of the next weight strip, so that the first row block of that strip does not stall on
// memory (measured: 2-5% faster on the 4096-wide GEMMs at M = 128, whose weights come from L3 / DRAM).
template <int MR, int NV, int PH, bool Q4>
static void micro(const uint8_t* __restrict A, int64_t lda, const int8_t* __restrict B, int64_t tile_bytes,
                  int64_t K4, const char* pf, int64_t npf, const Gemm& g, int64_t m0, int64_t tile0) {
  static_assert(MR * PH <= 6 && NV >= 1 && NV <= 4, "register budget");
  const __m512i z = _mm512_setzero_si512();
  __m512i c00 = z, c01 = z, c02 = z, c03 = z, c10 = z, c11 = z, c12 = z, c13 = z, c20 = z, c21 = z, c22 = z, c23 = z;
  __m512i c30 = z, c31 = z, c32 = z, c33 = z, c40 = z, c41 = z, c42 = z, c43 = z, c50 = z, c51 = z, c52 = z, c53 = z;
  const int8_t* const b0 = B;
  const int8_t* const b1 = B + (NV > 1 ? tile_bytes : 0);
  const int8_t* const b2 = B + (NV > 2 ? 2 * tile_bytes : 0);
  const int8_t* const b3 = B + (NV > 3 ? 3 * tile_bytes : 0);
  const uint8_t* arow[6];
  for (int r = 0; r < 6; ++r) arow[r] = A + (r < MR ? r : 0) * lda;
  const char* const pf_end = pf + 64 * npf;
  __m512i w0 = z, w1 = z, w2 = z, w3 = z;
  auto wload = [](const int8_t* b, int64_t kq) {
    if constexpr (Q4) return unpack_group(reinterpret_cast<const uint8_t*>(b), kq);
    else return _mm512_loadu_si512(b + 64 * kq);
  };
// virtual row j: activation row j % MR, k group k + j / MR; the weights are loaded by its first row.
#define ZQ_VROW(j, kk)                                                                   \
  if constexpr (MR * PH > j) {                                                           \
    constexpr int r_ = j % MR, p_ = j / MR;                                              \
    const int64_t kq = (kk) + p_;                                                        \
    if constexpr (r_ == 0) {                                                             \
      w0 = wload(b0, kq);                                                                \
      if constexpr (NV > 1) w1 = wload(b1, kq);                                          \
      if constexpr (NV > 2) w2 = wload(b2, kq);                                          \
      if constexpr (NV > 3) w3 = wload(b3, kq);                                          \
    }                                                                                    \
    const __m512i a_ = bcast4(arow[r_] + 4 * kq);                                        \
    ZQ_DP(c##j##0, a_, w0);                                                              \
    if constexpr (NV > 1) ZQ_DP(c##j##1, a_, w1);                                        \
    if constexpr (NV > 2) ZQ_DP(c##j##2, a_, w2);                                        \
    if constexpr (NV > 3) ZQ_DP(c##j##3, a_, w3);                                        \
  }
  int64_t k = 0;
  for (; k + PH <= K4; k += PH) {
    if (pf < pf_end) {
      _mm_prefetch(pf, _MM_HINT_T1);
      pf += 64;
    }
    ZQ_VROW(0, k) ZQ_VROW(1, k) ZQ_VROW(2, k) ZQ_VROW(3, k) ZQ_VROW(4, k) ZQ_VROW(5, k)
  }
  if constexpr (PH > 1) {
    for (; k < K4; ++k) {   // leftover k groups: phase 0 (virtual rows 0..MR-1) only
#define ZQ_TAIL(j) if constexpr (MR > j) { ZQ_VROW(j, k) }
      ZQ_TAIL(0) ZQ_TAIL(1) ZQ_TAIL(2) ZQ_TAIL(3) ZQ_TAIL(4) ZQ_TAIL(5)
#undef ZQ_TAIL
    }
  }
#undef ZQ_VROW
  // virtual row `src` adds into its row `dst` = src % MR (int32 sums: the order does not matter)
#define ZQ_FOLD(src, dst)                                                          \
  if constexpr (MR * PH > src && src >= MR && src % MR == dst) {                   \
    c##dst##0 = _mm512_add_epi32(c##dst##0, c##src##0);                            \
    if constexpr (NV > 1) c##dst##1 = _mm512_add_epi32(c##dst##1, c##src##1);      \
    if constexpr (NV > 2) c##dst##2 = _mm512_add_epi32(c##dst##2, c##src##2);      \
    if constexpr (NV > 3) c##dst##3 = _mm512_add_epi32(c##dst##3, c##src##3);      \
  }
  ZQ_FOLD(1, 0) ZQ_FOLD(2, 0) ZQ_FOLD(2, 1) ZQ_FOLD(3, 0) ZQ_FOLD(3, 1) ZQ_FOLD(3, 2)
  ZQ_FOLD(4, 0) ZQ_FOLD(4, 1) ZQ_FOLD(4, 2) ZQ_FOLD(4, 3) ZQ_FOLD(5, 0) ZQ_FOLD(5, 1) ZQ_FOLD(5, 2) ZQ_FOLD(5, 3)
  ZQ_FOLD(5, 4)
#undef ZQ_FOLD
  if (__builtin_expect(g.gated, 0)) {
    alignas(64) __m512i acc[kMR * kMaxNV];
#define ZQ_KEEP(r)                                                                 \
  if constexpr (MR > r) {                                                          \
    acc[r * 4] = c##r##0, acc[r * 4 + 1] = c##r##1;                                \
    acc[r * 4 + 2] = c##r##2, acc[r * 4 + 3] = c##r##3;                            \
  }
    ZQ_KEEP(0) ZQ_KEEP(1) ZQ_KEEP(2) ZQ_KEEP(3) ZQ_KEEP(4) ZQ_KEEP(5)
#undef ZQ_KEEP
    store_gated(g, m0, MR, tile0, NV, acc);
    return;
  }
#define ZQ_OUT(r) if constexpr (MR > r) epilogue_row<NV>(g, m0 + r, tile0, c##r##0, c##r##1, c##r##2, c##r##3);
  ZQ_OUT(0) ZQ_OUT(1) ZQ_OUT(2) ZQ_OUT(3) ZQ_OUT(4) ZQ_OUT(5)
#undef ZQ_OUT
}

using MicroFn = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, int64_t, const char*, int64_t, const Gemm&,
                         int64_t, int64_t);

template <int MR, int NV, bool Q4>
static constexpr MicroFn pick() {
  // rows x phases <= 6; small MR gets more phases (see micro)
  constexpr int PH = MR == 1 ? 4 : (MR == 2 ? 2 : (MR == 3 ? 2 : 1));
  return &micro<MR, NV, PH, Q4>;
}

#define ZQ_ROW_OF_KERNELS(MR, Q4) {pick<MR, 1, Q4>(), pick<MR, 2, Q4>(), pick<MR, 3, Q4>(), pick<MR, 4, Q4>()}
// [int4][rows - 1][tiles - 1]
static const MicroFn kMicro[2][kMR][kMaxNV] = {
    {ZQ_ROW_OF_KERNELS(1, false), ZQ_ROW_OF_KERNELS(2, false), ZQ_ROW_OF_KERNELS(3, false),
     ZQ_ROW_OF_KERNELS(4, false), ZQ_ROW_OF_KERNELS(5, false), ZQ_ROW_OF_KERNELS(6, false)},
    {ZQ_ROW_OF_KERNELS(1, true), ZQ_ROW_OF_KERNELS(2, true), ZQ_ROW_OF_KERNELS(3, true),
     ZQ_ROW_OF_KERNELS(4, true), ZQ_ROW_OF_KERNELS(5, true), ZQ_ROW_OF_KERNELS(6, true)},
};
#undef ZQ_ROW_OF_KERNELS

// ------------------------------------------------------------------------------------------
// GEMM driver
// ------------------------------------------------------------------------------------------

// Bytes of one packed 16-row tile in g.W: K4 groups of 64 int8 values (INT4: 32 bytes, in pairs).
static inline int64_t packed_tile_bytes(const Gemm& g) { return g.bits == 8 ? g.K4 * 64 : (g.K4 + 1) / 2 * 64; }

// Rows per block: the activation block (MC x Kp bytes) and a weight strip stay in L2.
static inline int64_t block_rows(int64_t Kp) {
  return std::max<int64_t>(kMR, (524288 / std::max<int64_t>(Kp, 1)) / kMR * kMR);
}

// Path selection by shape: the thresholds, defined here only (exported to Python under the names
// in PYBIND11_MODULE; cpu.py's docstring describes the paths by them). Measured in docs/benchmarks.md.
//
// Row blocks per strip from which the next strip is prefetched (see gemm_part).
constexpr int64_t kPrefetchBlocks = 8;
// Rows per thread from which the threads split the rows of a GEMM (see split_by_rows): 24. Below
// that a call is decode-sized and weight-bandwidth bound, and the threads split the columns.
constexpr int64_t kRowSplitMinRowsPerThread = 4 * kMR;
// The same for weights of fewer than 2 column units (tiles, or gate/up pairs) per thread, which
// a column split would leave some threads without: 12.
constexpr int64_t kRowSplitMinRowsPerThreadNarrow = 2 * kMR;
// The largest packed weight split by rows, every thread streaming all of it: 8 MB, L3-resident.
constexpr int64_t kRowSplitMaxWeightBytes = int64_t(8) << 20;
// GEMMs with M x N x K below this run on one thread, a fork/join costing more: 2^17.
constexpr int64_t kSingleThreadMaxMNK = int64_t(1) << 17;

// sum_k A[m, k] over the Kp columns of rows [m0, m1) into sums[m] (INT4's correction, see dequant).
static void row_sums(const uint8_t* A, int64_t lda, int64_t Kp, int64_t m0, int64_t m1, int32_t* sums) {
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t m = m0; m < m1; ++m) {
    __m512i acc = zero;
    for (int64_t k = 0; k < Kp; k += 64) {
      const __mmask64 mk = Kp - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (Kp - k)) - 1;
      acc = _mm512_add_epi64(acc, _mm512_sad_epu8(_mm512_maskz_loadu_epi8(mk, A + m * lda + k), zero));
    }
    sums[m] = (int32_t)_mm512_reduce_add_epi64(acc);
  }
}

// Output columns of `units` (tiles, or gate/up tile pairs) [u0, u1) for rows [m0, m1).
// Loops: blocks of MC rows; strips of up to 4 tiles (their weights stay in L1 / L2 while every
// 6-row block of the MC rows runs over them); 6-row blocks. With `prefetch` (weights that come
// from L3 or DRAM), while a strip runs, its row blocks prefetch the next strip's weights.
static void gemm_part(const Gemm& g_in, int64_t u0, int64_t u1, int64_t m0, int64_t m1, bool prefetch) {
  Gemm g = g_in;
  if (g.bits == 4) {                        // INT4: the row sums of rows [m0, m1), for this thread
    static thread_local std::vector<int32_t> sums;
    if ((int64_t)sums.size() < g.M) sums.resize(g.M);
    row_sums(g.A, g.lda, g.K4 * 4, m0, m1, sums.data());
    g.usum = sums.data();
  }
  const int64_t unit_tiles = g.gated ? 2 : 1, strip_units = kMaxNV / unit_tiles;
  const int64_t MC = block_rows(g.K4 * 4);
  const int64_t packed_tile = packed_tile_bytes(g);
  const bool q4 = g.bits == 4;
  for (int64_t mc = m0; mc < m1; mc += MC) {
    const int64_t me = std::min(mc + MC, m1), blocks = (me - mc + kMR - 1) / kMR;
    for (int64_t u = u0; u < u1; u += strip_units) {
      const int64_t tile0 = u * unit_tiles;
      const int nv = (int)(std::min(strip_units, u1 - u) * unit_tiles);
      const int8_t* B = reinterpret_cast<const int8_t*>(g.W + tile0 * packed_tile);
      // The next strip (of this row block, else the first of the next one), shared out among
      // this strip's row blocks. Only where the GEMM is compute bound: with few row blocks it
      // streams the weight, and more requests in flight only compete with that stream (measured:
      // 7% slower at M = 16 on 4096 x 11008); and not for L2-resident weights (1% slower).
      int64_t next = u + strip_units < u1 ? u + strip_units : (me < m1 ? u0 : u1), lines = 0, share = 0;
      if (prefetch && next < u1 && blocks >= kPrefetchBlocks) {
        lines = std::min(strip_units, u1 - next) * unit_tiles * packed_tile / 64;
        share = (lines + blocks - 1) / blocks;
      }
      const char* pf = reinterpret_cast<const char*>(g.W) + next * unit_tiles * packed_tile;
      for (int64_t m = mc, b = 0; m < me; m += kMR, ++b) {
        const int mr = (int)std::min<int64_t>(kMR, me - m);
        const int64_t first = std::min(lines, b * share), npf = std::min(lines, first + share) - first;
        kMicro[q4][mr - 1][nv - 1](g.A + m * g.lda, g.lda, B, packed_tile, g.K4, pf + 64 * first, npf, g, m, tile0);
      }
    }
  }
}

// Runs f(t, nt) on nt threads of one OpenMP team (inline when nt == 1). One team per op: the
// quantization, the GEMM and the output quantization are separated by barriers, not by three
// fork/joins. Inside another parallel region OpenMP does not nest, and the op runs on one thread.
template <typename F>
static void in_team(int64_t nt, const F& f) {
  if (nt <= 1) {
    f(0, 1);
    return;
  }
#pragma omp parallel num_threads((int)nt)
  f(omp_get_thread_num(), omp_get_num_threads());
}

// Threads for a GEMM of this size: a fork/join costs a few microseconds, a tiny layer less.
static int64_t team_size(int64_t M, int64_t N, int64_t K) {
  const int64_t T = std::max<int64_t>(1, at::get_num_threads());
  return M * N * K < kSingleThreadMaxMNK ? 1 : T;
}

// How a GEMM is shared by nt threads. By rows when there are enough of them and the weight is
// small enough (L3-resident) for every thread to stream it: then each thread quantizes,
// multiplies and re-quantizes its own row blocks while they are hot, with no barrier. Otherwise
// by output columns (each thread streams only its part of the weight: what decode and big
// weights need), with barriers between the quantization, the GEMM and the output quantization.
static bool split_by_rows(const Gemm& g, int64_t nt) {
  if (nt == 1) return true;
  const int64_t units = g.gated ? g.ntiles / 2 : g.ntiles;
  const int64_t weight_bytes = g.ntiles * packed_tile_bytes(g);
  if (units < 2 * nt) return g.M >= kRowSplitMinRowsPerThreadNarrow * nt;
  return weight_bytes <= kRowSplitMaxWeightBytes && g.M >= kRowSplitMinRowsPerThread * nt;
}

// Rows [m0, m1) of thread t's even share of M rows.
static inline std::pair<int64_t, int64_t> row_share(int64_t M, int64_t t, int64_t nt) {
  return {M * t / nt, M * (t + 1) / nt};
}

// Buffers for an activation quantized inside `linear` (it never leaves the op), reused across calls.
struct ActScratch {
  std::vector<uint8_t> u;
  std::vector<float> s;
  std::vector<int32_t> o;
};
static thread_local ActScratch act_scratch;

// A token-wise quantized activation in the kernel's format: u [M, Kp], scale [M], offset [M].
struct QuantRows {
  uint8_t* u;
  float* s;
  int32_t* o;
};

// The activation `linear` multiplies: the one its producer quantized (qa, ascale, aoff: checked
// against M x Kp) when `given`, else this thread's scratch buffers, for x's quantization.
static QuantRows input_rows(bool given, const std::optional<Tensor>& qa, const std::optional<Tensor>& ascale,
                            const std::optional<Tensor>& aoff, int64_t M, int64_t Kp) {
  if (given) {
    TORCH_CHECK(qa->dim() == 2 && qa->size(0) == M && qa->size(1) == Kp && qa->is_contiguous() &&
                qa->scalar_type() == at::kByte, "zquant_cpu.linear: quantized activation does not match x");
    TORCH_CHECK(ascale.has_value() && aoff.has_value() && ascale->numel() == M && aoff->numel() == M &&
                ascale->scalar_type() == at::kFloat && aoff->scalar_type() == at::kInt, "zquant_cpu.linear: activation scales");
    return {qa->data_ptr<uint8_t>(), ascale->data_ptr<float>(), aoff->data_ptr<int32_t>()};
  }
  ActScratch& a = act_scratch;
  if ((int64_t)a.u.size() < M * Kp) a.u.resize(M * Kp);
  if ((int64_t)a.s.size() < M) { a.s.resize(M); a.o.resize(M); }
  return {a.u.data(), a.s.data(), a.o.data()};
}

// The output's quantization for the next layer, returned with y: u [M, Np4], scale [M], offset [M]
// (undefined tensors, null pointers when out_mode is kNoQuant).
struct OutQuant {
  Tensor u, s, o;
  QuantRows rows;
};

static OutQuant output_rows(const Tensor& x, int64_t M, int64_t N, int64_t out_mode) {
  if (out_mode == kNoQuant) return {Tensor(), Tensor(), Tensor(), {nullptr, nullptr, nullptr}};
  OutQuant q{at::empty({M, round_up(N, 4)}, x.options().dtype(at::kByte)), at::empty({M}, x.options().dtype(at::kFloat)),
             at::empty({M}, x.options().dtype(at::kInt)), {}};
  q.rows = {q.u.data_ptr<uint8_t>(), q.s.data_ptr<float>(), q.o.data_ptr<int32_t>()};
  return q;
}

// Checks a packed weight (wpack, wsum, wscale, wbias?) against K4 groups of 4 inputs and N
// outputs; returns its number of 16-row tiles.
static int64_t check_packed_weight(const Tensor& wpack, const Tensor& wsum, const Tensor& wscale,
                                   const std::optional<Tensor>& wbias, int64_t bits, int64_t N, int64_t K, int64_t K4,
                                   bool gated) {
  TORCH_CHECK(bits == 8 || bits == 4, "zquant_cpu.linear: bits must be 4 or 8");
  TORCH_CHECK(wpack.is_contiguous() && wsum.is_contiguous() && wscale.is_contiguous(), "zquant_cpu.linear: packed weight");
  const int64_t ntiles = wsum.numel() / kTile;
  TORCH_CHECK(wpack.numel() == ntiles * (bits == 8 ? K4 : (K4 + 1) / 2) * 64 && wscale.numel() == ntiles * kTile,
              "zquant_cpu.linear: packed weight does not match K=", K);
  TORCH_CHECK(N <= (gated ? ntiles / 2 : ntiles) * kTile, "zquant_cpu.linear: N larger than the packed weight");
  if (wbias.has_value() && wbias->defined())
    TORCH_CHECK(wbias->numel() == ntiles * kTile && wbias->is_contiguous(), "zquant_cpu.linear: bias");
  return ntiles;
}

// Rows [r0, r1) of a row-major [M, K] matrix in x's dtype (the input x, or the output y for the
// next layer) quantized with `mode` into `dst` ([M, Kp]).
struct RowQuantizer {
  const char* src;
  int64_t K, Kp;
  bool bf16;
  int64_t mode;
  float static_scale;
  QuantRows dst;
  void operator()(int64_t r0, int64_t r1) const {
    const int64_t row_bytes = K * (bf16 ? 2 : 4);
    for (int64_t m = r0; m < r1; ++m)
      quantize_row(src + m * row_bytes, bf16, K, Kp, mode, static_scale, dst.u + m * Kp, dst.s + m, dst.o + m);
  }
};

// Thread t's part of a GEMM split by rows (see split_by_rows): its own row blocks, each quantized
// (qin), multiplied and re-quantized for the next layer (qout) while it is in L2, with no barrier.
// A null qin / qout: nothing to quantize (the input came quantized / no output quantization here).
static void rows_part(const Gemm& g, const RowQuantizer* qin, const RowQuantizer* qout, int64_t t, int64_t nt) {
  const int64_t units = g.gated ? g.ntiles / 2 : g.ntiles;
  const int64_t blocks = (g.M + kMR - 1) / kMR, MC = block_rows(g.K4 * 4);
  const int64_t m0 = blocks * t / nt * kMR, m1 = std::min(g.M, blocks * (t + 1) / nt * kMR);
  for (int64_t mc = m0; mc < m1; mc += MC) {
    const int64_t me = std::min(mc + MC, m1);
    if (qin) (*qin)(mc, me);
    gemm_part(g, 0, units, mc, me, false);
    if (qout) (*qout)(mc, me);
  }
}

// Thread t's part of a GEMM split by output columns: it quantizes its share of the rows, then
// multiplies all rows by its share of the weight (streaming only that part), then quantizes its
// share of the output rows; the barriers wait for the other threads' rows and columns.
static void columns_part(const Gemm& g, const RowQuantizer* qin, const RowQuantizer* qout, int64_t t, int64_t nt) {
  const int64_t units = g.gated ? g.ntiles / 2 : g.ntiles;
  const auto [r0, r1] = row_share(g.M, t, nt);
  if (qin) {
    (*qin)(r0, r1);
#pragma omp barrier
  }
  gemm_part(g, units * t / nt, units * (t + 1) / nt, 0, g.M, true);
  if (qout) {
#pragma omp barrier
    (*qout)(r0, r1);
  }
}

// A plain GEMM's activation: torch's own in-place op on the output (bit-identical to the model's
// module), run after the GEMM's team.
static void apply_act(Tensor& y, int64_t act) {
  switch (act) {
    case kRelu: at::relu_(y); break;
    case kGelu: at::gelu_(y, "none"); break;
    case kGeluTanh: at::gelu_(y, "tanh"); break;
    default: at::silu_(y); break;
  }
}

// linear(x [..., K], qa?, ascale?, aoff?, amode, static_scale, wpack, wsum [Np], wscale [Np], wbias [Np]?,
//        bits, N, act, gated, out_mode) -> [y [..., N]] or [y, u, scale, offset] unless out_mode is kNoQuant.
// With qa given, x only supplies M and the output dtype (its quantization was fused upstream);
// otherwise x is quantized here with `amode`. out_mode quantizes y for the next layer.
std::vector<Tensor> linear(const Tensor& x, const std::optional<Tensor>& qa, const std::optional<Tensor>& ascale,
                           const std::optional<Tensor>& aoff, int64_t amode, double static_scale, const Tensor& wpack,
                           const Tensor& wsum, const Tensor& wscale, const std::optional<Tensor>& wbias, int64_t bits,
                           int64_t N, int64_t act, bool gated, int64_t out_mode) {
  at::NoGradGuard no_grad;   // no autograd graph inside (e.g. LayerNorm's weight): no gradient here
  check_x(x);
  const int64_t M = rows_of(x), K = x.size(-1), Kp = round_up(K, 4), K4 = Kp / 4;
  const int64_t ntiles = check_packed_weight(wpack, wsum, wscale, wbias, bits, N, K, K4, gated);
  TORCH_CHECK(amode == kSym || amode == kAsym || amode == kStatic, "zquant_cpu.linear: bad activation mode");
  TORCH_CHECK(out_mode == kNoQuant || out_mode == kSym || out_mode == kAsym,
              "zquant_cpu.linear: bad output quantization mode");
  TORCH_CHECK(act >= kNone && act <= kSilu && (!gated || act == kSilu), "zquant_cpu.linear: bad activation ", act);
  const float* wb = wbias.has_value() && wbias->defined() ? wbias->data_ptr<float>() : nullptr;
  const bool given = qa.has_value() && qa->defined();
  const QuantRows in = input_rows(given, qa, ascale, aoff, M, Kp);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  Tensor y = at::empty(with_last(x, N), x.options());
  OutQuant out = output_rows(x, M, N, out_mode);
  // silu's vector iterations cover 2 (AVX-512) vectors of x's dtype: 32 floats or 64 bfloat16s
  const ScalarTails tails(M * N, at::get_num_threads(), bf16 ? 64 : 32);
  Gemm g{in.u, Kp, in.s, in.o, M, static_cast<const uint8_t*>(wpack.data_ptr()), bits, K4, ntiles, nullptr,
         wsum.data_ptr<int32_t>(), wscale.data_ptr<float>(), wb, gated, &tails,
         static_cast<char*>(y.data_ptr()), bf16, N};
  const RowQuantizer qin{static_cast<const char*>(x.data_ptr()), K, Kp, bf16, amode, (float)static_scale, in};
  const RowQuantizer qout{g.out, N, round_up(N, 4), bf16, out_mode, 0.f, out.rows};
  // A plain GEMM's activation is torch's own op on the output, so the output can only be
  // quantized after it: then outside the GEMM's team.
  const bool post_act = !gated && act != kNone, quant_out = out_mode != kNoQuant;
  if (M > 0) {
    const RowQuantizer* team_in = given ? nullptr : &qin;
    const RowQuantizer* team_out = quant_out && !post_act ? &qout : nullptr;
    in_team(team_size(M, N, K), [&](int64_t t, int64_t nt) {
      if (split_by_rows(g, nt)) rows_part(g, team_in, team_out, t, nt);
      else columns_part(g, team_in, team_out, t, nt);
    });
  }
  if (post_act) {
    apply_act(y, act);
    if (quant_out && M > 0)
      in_team(team_size(M, N, 64), [&](int64_t t, int64_t nt) {
        const auto [r0, r1] = row_share(M, t, nt);
        qout(r0, r1);
      });
  }
  if (!quant_out) return {y};
  return {y, out.u, out.s, out.o};
}

}  // namespace zq

// A Python module (pybind11), not torch.ops operators: a call through the dispatcher costs ~2 us
// more, as much as a whole decode-sized GEMM. The GIL is released while a kernel runs.
template <size_t N>
static pybind11::dict code_dict(const zq::CodeName (&names)[N]) {
  pybind11::dict d;
  for (const auto& n : names) d[n.name] = n.code;
  return d;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("ACT_CODES") = code_dict(zq::kActNames);
  m.attr("QUANT_MODES") = code_dict(zq::kQModeNames);
  m.attr("NORM_CODES") = code_dict(zq::kNormNames);
  m.attr("ROW_SPLIT_MIN_ROWS_PER_THREAD") = zq::kRowSplitMinRowsPerThread;
  m.attr("ROW_SPLIT_MIN_ROWS_PER_THREAD_NARROW") = zq::kRowSplitMinRowsPerThreadNarrow;
  m.attr("ROW_SPLIT_MAX_WEIGHT_BYTES") = zq::kRowSplitMaxWeightBytes;
  m.attr("SINGLE_THREAD_MAX_MNK") = zq::kSingleThreadMaxMNK;
  m.attr("PREFETCH_BLOCKS") = zq::kPrefetchBlocks;
  const auto nogil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("quantize", &zq::quantize, "token-wise INT8 quantization of x [..., K]", nogil);
  m.def("norm_quant", &zq::norm_quant, "RMSNorm / LayerNorm, quantized for the next layer", nogil);
  m.def("linear", &zq::linear, "quantized linear layer: quantize, INT8 GEMM, dequantizing epilogue", nogil);
  zq::register_decode(m);
  zq::register_head(m);
}
