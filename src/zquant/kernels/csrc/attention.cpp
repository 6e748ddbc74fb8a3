// zquant's attention over the step runner's KV cache (decode.cpp): causal softmax attention of a
// sequence's new query rows against its cached positions, for prompts and decode steps alike.
//
// Cache layout (per block; ld = the cache's positions rounded up to a multiple of 64):
//   keys   [slots, kv_heads, ld / 64, head_dim, 64]   transposed in blocks of 64 positions: 16
//          consecutive positions are one vector, and a block's keys are 64 * head_dim contiguous values
//   values [slots, kv_heads, ld, head_dim]
// float32, or int8 with one float32 scale per position per head ([slots, kv_heads, ld] each).
//
// Arithmetic, in float32, the same for every query whatever the tiling, the batch or how a prompt
// was split into steps (so a sequence never depends on what else runs with it, and a prompt
// prefilled in pieces attends exactly as one prefilled at once):
//   s_j = (sum_k q_k key_j,k, one fused multiply-add per k in order k = 0 .. d-1) [* kscale_j] * scaling
//   p_j = exp(s_j - max_j s_j)            (Sleef's exp, as torch's vectorized exp)
//   out = (sum_j p_j [* vscale_j] value_j, in order j = 0 ..) * (1 / sum_j p_j)
// An exact two-pass softmax, not SDPA's online one: results agree with torch's
// scaled_dot_product_attention to float rounding, not bit for bit. A NaN or infinity in a query,
// key, value or scale makes the output NaN, as in floating point.

#include "zquant_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#define ZQ_HOT_INLINE static inline __attribute__((always_inline))

namespace zq {
namespace {

// 16 cache entries as float32: float32 memory, or int8 widened (its scale applied by the caller).
template <bool I8>
ZQ_HOT_INLINE __m512 load_kv(const void* base, int64_t off) {
  if constexpr (I8)
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
        reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(base) + off))));
  else
    return _mm512_loadu_ps(static_cast<const float*>(base) + off);
}

template <bool I8>
ZQ_HOT_INLINE __m512 load_kv_masked(const void* base, int64_t off, __mmask16 m) {
  if constexpr (I8)
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, static_cast<const int8_t*>(base) + off)));
  else
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(base) + off);
}

constexpr int kKB = 4;   // blocks of 16 positions per score tile (QB x 4 accumulators): one key block
static_assert(16 * kKB == 64, "a score tile is one 64-position block of the key cache");

// Scores of QB query rows (q, row stride qs) against positions [j0, j0 + 64) of one head's
// keys kt [ld / 64][d][64] (j0 a multiple of 64); position p > last[i] (the causal limit of row i)
// gets -inf.
template <bool I8, int QB>
ZQ_HOT_INLINE void score_tile(const float* q, int64_t qs, const void* kt, const float* ks, int64_t ld, int64_t d,
                              int64_t j0, const int64_t* last, float scaling, float* S) {
  __m512 acc[QB][kKB];
#pragma GCC unroll 4
  for (int i = 0; i < QB; ++i)
#pragma GCC unroll 4
    for (int b = 0; b < kKB; ++b) acc[i][b] = _mm512_setzero_ps();
  for (int64_t k = 0; k < d; ++k) {
    __m512 kv[kKB];
#pragma GCC unroll 4
    for (int b = 0; b < kKB; ++b) kv[b] = load_kv<I8>(kt, (j0 / 64 * d + k) * 64 + 16 * b);
#pragma GCC unroll 4
    for (int i = 0; i < QB; ++i) {
      const __m512 qv = _mm512_set1_ps(q[i * qs + k]);
#pragma GCC unroll 4
      for (int b = 0; b < kKB; ++b) acc[i][b] = _mm512_fmadd_ps(qv, kv[b], acc[i][b]);
    }
  }
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 sc = _mm512_set1_ps(scaling), ninf = _mm512_set1_ps(-INFINITY);
#pragma GCC unroll 4
  for (int b = 0; b < kKB; ++b) {
    const int64_t j = j0 + 16 * b;
    const __m512 kscale = I8 ? _mm512_loadu_ps(ks + j) : _mm512_set1_ps(1.f);
    const __m512i pos = _mm512_add_epi32(_mm512_set1_epi32((int32_t)j), lane);
#pragma GCC unroll 4
    for (int i = 0; i < QB; ++i) {
      __m512 s = I8 ? _mm512_mul_ps(acc[i][b], kscale) : acc[i][b];
      s = _mm512_mul_ps(s, sc);
      const __mmask16 past = _mm512_cmpgt_epi32_mask(pos, _mm512_set1_epi32((int32_t)last[i]));
      _mm512_storeu_ps(S + i * ld + j, _mm512_mask_mov_ps(s, past, ninf));
    }
  }
}

// S[0:len] (scores) -> exp(s - max) in place; returns 1 / sum (NaN when some score is NaN).
float softmax_row(float* S, int64_t len) {
  __m512 mxv = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < len; j += 16) mxv = _mm512_max_ps(mxv, _mm512_mask_loadu_ps(mxv, tail_mask(len - j), S + j));
  const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(mxv));
  __m512 sum = _mm512_setzero_ps(), nan = _mm512_setzero_ps();
  for (int64_t j = 0; j < len; j += 16) {
    const __mmask16 m = tail_mask(len - j);
    const __m512 s = _mm512_maskz_loadu_ps(m, S + j);
    nan = _mm512_mask_mov_ps(nan, _mm512_cmp_ps_mask(s, s, _CMP_UNORD_Q), s);   // max drops NaNs: keep them
    const __m512 e = _mm512_maskz_mov_ps(m, Sleef_expf16_u10(_mm512_sub_ps(s, mx)));
    _mm512_mask_storeu_ps(S + j, m, e);
    sum = _mm512_add_ps(sum, e);
  }
  return 1.f / (_mm512_reduce_add_ps(sum) + _mm512_reduce_add_ps(nan));
}

constexpr int64_t kMaxVec = kMaxHeadDim / 16;   // 16-lane vectors of one head

// out[0:d] = (sum_j P[j] [* vs[j]] v[j]) * inv over positions [0, len), v [ld][d].
template <bool I8>
void weighted_values(const float* P, const void* v, const float* vs, int64_t len, int64_t d, float inv, float* out) {
  const int64_t nv = (d + 15) / 16;
  __m512 acc[kMaxVec];
  for (int64_t c = 0; c < nv; ++c) acc[c] = _mm512_setzero_ps();
  if (d % 16 == 0) {
    for (int64_t j = 0; j < len; ++j) {
      const __m512 p = _mm512_set1_ps(I8 ? P[j] * vs[j] : P[j]);
      for (int64_t c = 0; c < nv; ++c) acc[c] = _mm512_fmadd_ps(p, load_kv<I8>(v, j * d + 16 * c), acc[c]);
    }
  } else {
    for (int64_t j = 0; j < len; ++j) {
      const __m512 p = _mm512_set1_ps(I8 ? P[j] * vs[j] : P[j]);
      for (int64_t c = 0; c < nv; ++c)
        acc[c] = _mm512_fmadd_ps(p, load_kv_masked<I8>(v, j * d + 16 * c, tail_mask(d - 16 * c)), acc[c]);
    }
  }
  for (int64_t c = 0; c < nv; ++c)
    _mm512_mask_storeu_ps(out + 16 * c, tail_mask(d - 16 * c), _mm512_mul_ps(acc[c], _mm512_set1_ps(inv)));
}

// QB consecutive query rows of one head at positions pos0 .. pos0 + QB - 1, over one kv head.
template <bool I8, int QB>
void attend_rows(const AttnSeq& sq, const AttnShape& a, int64_t head, int64_t row0, std::vector<float>& S) {
  const int64_t g = head / (a.heads / a.kv_heads), qs = a.heads * a.d;
  const float* q = sq.q + row0 * qs + head * a.d;
  float* out = sq.out + row0 * qs + head * a.d;
  const int64_t es = I8 ? 1 : 4;
  const char* kt = static_cast<const char*>(sq.keys) + g * a.d * a.ld * es;
  const char* v = static_cast<const char*>(sq.values) + g * a.ld * a.d * es;
  const float* ks = I8 ? sq.kscale + g * a.ld : nullptr;
  const float* vs = I8 ? sq.vscale + g * a.ld : nullptr;
  int64_t last[QB];
  for (int i = 0; i < QB; ++i) last[i] = sq.pos0 + row0 + i;
  const int64_t len = last[QB - 1] + 1;
  if ((int64_t)S.size() < QB * a.ld) S.resize(QB * a.ld);
  for (int64_t j0 = 0; j0 < len; j0 += 16 * kKB)
    score_tile<I8, QB>(q, qs, kt, ks, a.ld, a.d, j0, last, a.scaling, S.data());
  for (int i = 0; i < QB; ++i) {
    float* Si = S.data() + i * a.ld;
    const float inv = softmax_row(Si, last[i] + 1);
    weighted_values<I8>(Si, v, vs, last[i] + 1, a.d, inv, out + i * qs);
  }
}

constexpr int kQB = 4;   // query rows per task in a prompt
template <bool I8>
using RowsFn = void (*)(const AttnSeq&, const AttnShape&, int64_t, int64_t, std::vector<float>&);
template <bool I8>
constexpr RowsFn<I8> kRows[kQB] = {attend_rows<I8, 1>, attend_rows<I8, 2>, attend_rows<I8, 3>, attend_rows<I8, 4>};

}  // namespace

void attend(const std::vector<AttnSeq>& seqs, const AttnShape& a) {
  TORCH_CHECK(a.d > 0 && a.d <= kMaxHeadDim && a.ld % 64 == 0 && a.heads % a.kv_heads == 0, "attend: bad shape");
  struct Task { int64_t seq, head, row0; int rows; };
  std::vector<Task> tasks;
  for (int64_t s = 0; s < (int64_t)seqs.size(); ++s)
    for (int64_t h = 0; h < a.heads; ++h)
      for (int64_t r = 0; r < seqs[s].n; r += kQB)
        tasks.push_back({s, h, r, (int)std::min<int64_t>(kQB, seqs[s].n - r)});
  at::parallel_for(0, (int64_t)tasks.size(), 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> S;
    for (int64_t t = t0; t < t1; ++t) {
      const Task& k = tasks[t];
      if (a.int8) kRows<true>[k.rows - 1](seqs[k.seq], a, k.head, k.row0, S);
      else kRows<false>[k.rows - 1](seqs[k.seq], a, k.head, k.row0, S);
    }
  });
}

}  // namespace zq
