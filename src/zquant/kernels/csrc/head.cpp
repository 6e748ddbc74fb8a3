// The output head's kernel (zquant.generate's fast path: logits of the final-normed rows) and the
// huge-page memory the decode weights live on. Python side: zquant/kernels/cpu.py (head, head_weight,
// hugepage_copy).

#include "zquant_cpu.h"

#include <ATen/Parallel.h>

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#define ZQ_HOT_INLINE static inline __attribute__((always_inline))

namespace zq {
namespace {

// MR activation rows x NR weight rows of an output head: out[i * ldo + j] = x_i . w_j, each a
// dot product in one fixed order (16-lane partial sums over k, then _mm512_reduce_add_ps), so a
// logit never depends on MR, NR or the other rows of the batch. w rows are float32 or bfloat16
// (widened in registers: exact), row stride K elements. pf: the next strip, prefetched into L1
// (null: none), one line per 64 bytes of each row.
template <int MR, int NR>
ZQ_HOT_INLINE void head_tile(const float* x, int64_t K, const char* w, bool bf16, float* out, int64_t ldo,
                             const char* pf) {
  __m512 acc[MR][NR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t es = bf16 ? 2 : 4;
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mk = tail_mask(K - k);     // (all lanes but in a tail: plain loads, see load16)
    if (pf && ((k * es) & 63) == 0)
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) _mm_prefetch(pf + (j * K + k) * es, _MM_HINT_T0);
    __m512 xv[MR];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) xv[i] = _mm512_maskz_loadu_ps(mk, x + i * K + k);
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) {
      const __m512 wv = load16(w + (j * K + k) * es, bf16, mk);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) out[i * ldo + j] = _mm512_reduce_add_ps(acc[i][j]);
}

// Rows [0, MR) of x against a strip of nw <= kHeadStrip weight rows, NR at a time (16
// accumulators per tile: 1 x 16, 2 x 8, 3 x 4 or 4 x 4). The strip stays in L1 while the row
// blocks run over it; the first block prefetches the next strip (pf) from memory.
constexpr int64_t kHeadStrip = 16;
template <int MR, int NR>
void head_rows(const float* x, int64_t K, const char* w, int64_t es, bool bf16, int64_t nw, float* out, int64_t ldo,
               const char* pf) {
  int64_t j = 0;
  for (; j + NR <= nw; j += NR, pf = pf ? pf + NR * K * es : nullptr)
    head_tile<MR, NR>(x, K, w + j * K * es, bf16, out + j, ldo, pf);
  for (; j < nw; ++j) head_tile<MR, 1>(x, K, w + j * K * es, bf16, out + j, ldo, nullptr);
}

using HeadRowsFn = void (*)(const float*, int64_t, const char*, int64_t, bool, int64_t, float*, int64_t, const char*);
static const HeadRowsFn kHeadRows[4] = {head_rows<1, 16>, head_rows<2, 8>, head_rows<3, 4>, head_rows<4, 4>};

}  // namespace

// logits [M, V] = x [M, K] float32 . w [V, K]^T, w float32 or bfloat16 (an output head). Every
// logit is one dot product in a fixed order whatever M and the thread count (see head_tile): a
// sequence's logits do not depend on the other rows of the batch, unlike a BLAS GEMM that blocks
// by M. The threads split the vocabulary into strips, so the weight is streamed from memory once.
Tensor head_logits(const Tensor& x_in, const Tensor& w_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "head_logits: x must be float32 [M, K]");
  TORCH_CHECK(w_in.dim() == 2 && w_in.size(1) == x_in.size(1) &&
                  (w_in.scalar_type() == at::kFloat || w_in.scalar_type() == at::kBFloat16),
              "head_logits: w must be float32 or bfloat16 [V, K]");
  const Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), V = w.size(0);
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  const int64_t es = bf16 ? 2 : 4;
  Tensor out = at::empty({M, V}, x.options());
  const float* xp = x.data_ptr<float>();
  const char* wp = static_cast<const char*>(w.data_ptr());
  float* op = out.data_ptr<float>();
  const int64_t strips = (V + kHeadStrip - 1) / kHeadStrip;
  at::parallel_for(0, strips, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t v0 = b * kHeadStrip, nw = std::min<int64_t>(kHeadStrip, V - v0);
      const char* strip = wp + v0 * K * es;
      const char* next = b + 1 < b1 ? strip + kHeadStrip * K * es : nullptr;
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t nm = std::min<int64_t>(4, M - m0);
        kHeadRows[nm - 1](xp + m0 * K, K, strip, es, bf16, nw, op + m0 * V + v0, V, m0 == 0 ? next : nullptr);
      }
    }
  });
  return out;
}

// An uninitialised uint8 tensor of nbytes on 2 MiB-aligned memory advised for transparent huge
// pages (weights streamed once per token: fewer TLB misses; see cpu.py's hugepage_copy).
Tensor hugepage_empty(int64_t nbytes) {
  TORCH_CHECK(nbytes >= 0, "hugepage_empty: negative size");
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t size = std::max<size_t>(kHuge, (size_t(nbytes) + kHuge - 1) / kHuge * kHuge);
  void* p = nullptr;
  TORCH_CHECK(posix_memalign(&p, kHuge, size) == 0, "hugepage_empty: out of memory (", nbytes, " bytes)");
  madvise(p, size, MADV_HUGEPAGE);        // advice only: without THP the memory is ordinary pages
  return at::from_blob(p, {nbytes}, [](void* q) { std::free(q); }, at::TensorOptions().dtype(at::kByte));
}

void register_head(pybind11::module_& m) {
  const auto nogil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("head_logits", &head_logits, "batch-invariant x . w^T for an output head (w float32 or bfloat16)", nogil);
  m.def("hugepage_empty", &hugepage_empty, "an uninitialised uint8 tensor on memory advised for huge pages");
}

}  // namespace zq
