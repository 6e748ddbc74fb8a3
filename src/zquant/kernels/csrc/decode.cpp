// zquant's step runner: one call runs every block of a pre-norm decoder (Llama family) for a group
// of sequences, over a preallocated KV cache. The Python side is zquant/generate/fast.py.
//
// A step takes the embedded new tokens of S sequences, x [T, H] (the rows of sequence s are
// contiguous, in order), and a table seqs int64 [S, 3] of (cache slot, start position, count):
// sequence s's new tokens sit at positions start .. start + count - 1 of its slot. Prefill is a
// step with count = prompt length; decode a step with count 1 per sequence; both can mix.
//
// Per block, the same operations as the model's modules on the fused CPU path, in the same order:
//   h = norm1(x) quantized per token -> qkv = one GEMM over the q, k, v weights (concatenated rows:
//   each output column is computed exactly as by its own layer) -> RoPE on q and k when the model
//   has it (HF's q * cos + rotate_half(q) * sin, with the cos / sin table HF computes) -> k, v
//   written into the cache -> per sequence torch's scaled_dot_product_attention over its own cache
//   prefix (so a sequence never depends on what else is in the batch) -> o GEMM -> x += o ->
//   norm2 quantized -> MLP: gated GEMM (silu(gate) * up, quantized for down; Llama) or up GEMM +
//   activation (GPT-2) -> down GEMM -> x += down. Norms are RMSNorm or LayerNorm.
// Results are bit-identical to the modules (tests/test_generate.py checks it).

#include "zquant_cpu.h"

#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

namespace zq {
namespace {

// A prepacked quantized linear layer (zquant.kernels.cpu.PackedWeight) and how its input is quantized.
struct QLinear {
  Tensor wpack, wsum, wscale;
  std::optional<Tensor> wbias;
  int64_t bits = 8, n = 0;
  bool gated = false;
  int64_t amode = kSym;
  double static_scale = 0.0;

  bool dynamic() const { return amode == kSym || amode == kAsym; }
  // The quantization mode its producer should fuse (none for a static scale: it quantizes itself).
  int64_t feed_mode() const { return dynamic() ? amode : int64_t(kNoQuant); }

  // in = {x} or {x, u, scale, offset} (x quantized by its producer).
  std::vector<Tensor> operator()(const std::vector<Tensor>& in, int64_t act, int64_t out_mode) const {
    const bool given = in.size() == 4 && dynamic();
    return linear(in[0], given ? std::optional<Tensor>(in[1]) : std::nullopt,
                  given ? std::optional<Tensor>(in[2]) : std::nullopt, given ? std::optional<Tensor>(in[3]) : std::nullopt,
                  amode, static_scale, wpack, wsum, wscale, wbias, bits, n, act, gated, out_mode);
  }
};

struct NormParams {
  Tensor weight;
  std::optional<Tensor> bias;
  double eps = 1e-6;
};

struct Block {
  NormParams norm1, norm2;
  QLinear qkv, o, up, down;   // up: gate and up interleaved (gated) or the MLP's first layer
  int64_t act = kSilu;        // gated: silu; plain: the activation after up
  double scaling = 1.0;       // attention's softmax scale (GPT-2 can scale it per layer)
};

// transformers' NewGELUActivation (GPT-2), op for op as its Python formula evaluates:
// 0.5 * x * (1.0 + tanh(sqrt(2 / pi) * (x + 0.044715 * x ** 3))).
Tensor gelu_new(const Tensor& x) {
  const Tensor inner = (x + at::pow(x, 3.0) * 0.044715) * std::sqrt(2.0 / M_PI);
  return (x * 0.5) * (at::tanh(inner) + 1.0);
}

// HF's RoPE on one head vector: out = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1).
// Separate multiplies and adds (compiled with -ffp-contract=off), like the eager ops.
inline void rope_head(const float* x, const float* c, const float* s, int64_t d, float* out) {
  const int64_t h = d / 2;
  for (int64_t j = 0; j < h; ++j) out[j] = x[j] * c[j] + (-x[j + h]) * s[j];
  for (int64_t j = h; j < d; ++j) out[j] = x[j] * c[j] + x[j - h] * s[j];
}


// One head vector x[0:d] into the INT8 cache: symmetric, one scale per token per head
// (ZeroQuant's token-wise idea applied to the cache), rounded half to even like torch.round.
// A vector holding a NaN or an infinity gets scale NaN (and zeros), so attention over it gives
// NaN like the floating-point cache would, instead of a finite clamp.
inline void quantize_head(const float* x, int64_t d, int8_t* q, float* scale) {
  float amax = 0.f;
  bool finite = true;
  for (int64_t j = 0; j < d; ++j) finite = finite && std::isfinite(x[j]), amax = std::max(amax, std::fabs(x[j]));
  if (!finite) {
    std::fill(q, q + d, int8_t(0));
    *scale = NAN;
    return;
  }
  const float s = amax > 0.f ? amax / 127.f : 1.f;
  for (int64_t j = 0; j < d; ++j) q[j] = (int8_t)std::max(-127.f, std::min(127.f, std::nearbyint(x[j] / s)));
  *scale = s;
}

inline float dot_i8(const float* q, const int8_t* k, int64_t d) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < d; j += 16) {
    const __mmask16 m = tail_mask(d - j);
    const __m512 kv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, k + j)));
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + j), kv, acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// One query head q[0:d] over an INT8 cache prefix (keys k / values v int8 [len, d], scales
// [len]): out = softmax(scaling * q . k_j * ks_j) . (v_j * vs_j), in float32.
void attend_i8(const float* q, const int8_t* k, const float* ks, const int8_t* v, const float* vs, int64_t len,
               int64_t d, double scaling, float* scores, float* out) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < len; ++j) mx = std::max(mx, scores[j] = dot_i8(q, k + j * d, d) * ks[j] * (float)scaling);
  float sum = 0.f;
  for (int64_t j = 0; j < len; ++j) sum += scores[j] = std::exp(scores[j] - mx);
  std::fill(out, out + d, 0.f);
  for (int64_t j = 0; j < len; ++j) {
    const float w = scores[j] / sum * vs[j];
    const int8_t* vr = v + j * d;
    for (int64_t c = 0; c < d; ++c) out[c] += w * (float)vr[c];
  }
}

}  // namespace

// logits [M, V] = x [M, K] float32 . w [V, K]^T, w float32 or bfloat16 (an output head). Every
// logit is one dot product in a fixed order (16-lane partial sums over k, then a fixed
// reduction), whatever M and the thread count: a sequence's logits do not depend on the other
// rows of the batch, unlike a BLAS GEMM that blocks by M. The weight is read once per call.
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
  constexpr int64_t kRows = 4;                    // weight rows per pass
  constexpr int64_t kMr = 4;                      // activation rows per pass: 4 x 4 accumulators
  at::parallel_for(0, (V + kRows - 1) / kRows, 16, [&](int64_t b0, int64_t b1) {
    std::vector<float> wf(bf16 ? kRows * K : 0);  // bf16: the pass's weight rows as float32, converted once
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t v0 = b * kRows, nv = std::min<int64_t>(kRows, V - v0);
      const float* wrows = bf16 ? wf.data() : reinterpret_cast<const float*>(wp) + v0 * K;
      for (int64_t j = 0; bf16 && j < nv; ++j)
        for (int64_t k = 0; k < K; k += 16) {
          const __mmask16 mk = tail_mask(K - k);
          _mm512_mask_storeu_ps(wf.data() + j * K + k, mk, load16(wp + ((v0 + j) * K + k) * es, true, mk));
        }
      for (int64_t m0 = 0; m0 < M; m0 += kMr) {
        const int64_t nm = std::min<int64_t>(kMr, M - m0);
        __m512 acc[kMr][kRows];
        for (auto& row : acc)
          for (auto& a : row) a = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
          const __mmask16 mk = tail_mask(K - k);
          __m512 wv[kRows];
          for (int64_t j = 0; j < nv; ++j) wv[j] = _mm512_maskz_loadu_ps(mk, wrows + j * K + k);
          for (int64_t i = 0; i < nm; ++i) {
            const __m512 xv = _mm512_maskz_loadu_ps(mk, xp + (m0 + i) * K + k);
            for (int64_t j = 0; j < nv; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
          }
        }
        // a logit's sum runs over k in the same order whatever M and the blocking: batch-invariant
        for (int64_t i = 0; i < nm; ++i)
          for (int64_t j = 0; j < nv; ++j) op[(m0 + i) * V + v0 + j] = _mm512_reduce_add_ps(acc[i][j]);
      }
    }
  });
  return out;
}

class Decoder {
 public:
  Decoder(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t norm_kind,
          std::optional<Tensor> cos, std::optional<Tensor> sin, NormParams final_norm)
      : hidden_(hidden), heads_(heads), kv_heads_(kv_heads), d_(head_dim), norm_kind_(norm_kind),
        final_(std::move(final_norm)) {
    TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && head_dim > 0 && head_dim % 2 == 0,
                "Decoder: bad head layout");
    if (cos.has_value()) {
      TORCH_CHECK(sin.has_value() && cos->dim() == 2 && cos->size(1) == head_dim && sin->sizes() == cos->sizes(),
                  "Decoder: cos / sin must be [positions, head_dim]");
      cos_ = cos->contiguous().to(at::kFloat);
      sin_ = sin->contiguous().to(at::kFloat);
    }
  }

  void add_block(NormParams n1, QLinear qkv, QLinear o, NormParams n2, QLinear up, QLinear down, int64_t act,
                 double scaling) {
    TORCH_CHECK(qkv.n == (heads_ + 2 * kv_heads_) * d_ && o.n == hidden_ && down.n == hidden_,
                "Decoder.add_block: layer shapes do not match the head layout");
    TORCH_CHECK(up.gated ? act == kSilu : (act >= kNone && act <= kGeluNew),
                "Decoder.add_block: unsupported MLP activation ", act);
    blocks_.push_back(Block{std::move(n1), std::move(n2), std::move(qkv), std::move(o), std::move(up),
                            std::move(down), act, scaling});
  }

  // Allocates the cache: per block, keys and values [slots, kv_heads, max_len, head_dim], float32,
  // or int8 with one float32 scale per token per head ([slots, kv_heads, max_len]).
  // Uninitialised memory: a step only reads positions it (or an earlier step) wrote. A cache that
  // is already as large, of the same kind, is kept.
  void reserve(int64_t slots, int64_t max_len, bool int8) {
    TORCH_CHECK(slots > 0 && max_len > 0, "Decoder.reserve: slots and max_len must be positive");
    TORCH_CHECK(!cos_.defined() || max_len <= cos_.size(0), "Decoder.reserve: max_len ", max_len,
                " exceeds the RoPE table's ", cos_.size(0), " positions");
    if (!keys_.empty() && slots <= slots_ && max_len <= max_len_ && int8 == int8_) return;
    keys_.clear();
    values_.clear();
    kscale_.clear();
    vscale_.clear();
    const auto dtype = int8 ? at::kChar : at::kFloat;
    for (size_t i = 0; i < blocks_.size(); ++i) {
      keys_.push_back(at::empty({slots, kv_heads_, max_len, d_}, dtype));
      values_.push_back(at::empty({slots, kv_heads_, max_len, d_}, dtype));
      if (int8) {
        kscale_.push_back(at::empty({slots, kv_heads_, max_len}, at::kFloat));
        vscale_.push_back(at::empty({slots, kv_heads_, max_len}, at::kFloat));
      }
    }
    slots_ = slots;
    max_len_ = max_len;
    int8_ = int8;
  }

  // x [T, hidden] float32 (embedded new tokens), seqs int64 [S, 3] (slot, start, count).
  // Returns the final norm of the last row of each sequence [S, hidden], or of every row.
  Tensor step(const Tensor& x_in, const Tensor& seqs_in, bool all_rows) {
    at::NoGradGuard no_grad;
    const Tensor seqs = seqs_in.to(at::kLong).contiguous();
    check_step(x_in, seqs);
    Tensor x = x_in.contiguous().clone();          // the residual stream, updated in place
    for (size_t l = 0; l < blocks_.size(); ++l) run_block(l, x, seqs);
    Tensor rows = x;
    if (!all_rows) {
      const int64_t S = seqs.size(0);
      const int64_t* sq = seqs.data_ptr<int64_t>();
      std::vector<int64_t> last(S);
      for (int64_t s = 0, r = 0; s < S; ++s) r += sq[s * 3 + 2], last[s] = r - 1;
      rows = x.index_select(0, at::tensor(last, at::kLong));
    }
    return norm_quant(rows, final_.weight, final_.bias, final_.eps, norm_kind_, kNoQuant)[0];
  }

  // (keys, values) of a block, plus (key scales, value scales) for an INT8 cache.
  std::vector<Tensor> cache(int64_t block) const {
    TORCH_CHECK(block >= 0 && block < (int64_t)keys_.size(), "Decoder.cache: no block ", block);
    if (int8_) return {keys_[block], values_[block], kscale_[block], vscale_[block]};
    return {keys_[block], values_[block]};
  }

  // Bytes the KV cache takes.
  int64_t cache_bytes() const {
    int64_t n = 0;
    for (const auto* v : {&keys_, &values_, &kscale_, &vscale_})
      for (const auto& t : *v) n += t.numel() * t.element_size();
    return n;
  }

  int64_t num_blocks() const { return (int64_t)blocks_.size(); }
  int64_t slots() const { return slots_; }
  int64_t max_len() const { return max_len_; }

 private:
  void check_step(const Tensor& x, const Tensor& seqs) const {
    TORCH_CHECK(!keys_.empty(), "Decoder.step: call reserve() first");
    TORCH_CHECK(x.dim() == 2 && x.size(1) == hidden_ && x.scalar_type() == at::kFloat,
                "Decoder.step: x must be float32 [tokens, ", hidden_, "]");
    TORCH_CHECK(seqs.dim() == 2 && seqs.size(1) == 3, "Decoder.step: seqs must be [S, 3] (slot, start, count)");
    const int64_t* sq = seqs.data_ptr<int64_t>();
    int64_t total = 0;
    for (int64_t s = 0; s < seqs.size(0); ++s) {
      const int64_t slot = sq[s * 3], start = sq[s * 3 + 1], count = sq[s * 3 + 2];
      TORCH_CHECK(slot >= 0 && slot < slots_, "Decoder.step: slot ", slot, " out of range");
      TORCH_CHECK(start >= 0 && count > 0 && start + count <= max_len_, "Decoder.step: positions ", start, "..",
                  start + count - 1, " outside the cache's ", max_len_);
      total += count;
    }
    TORCH_CHECK(total == x.size(0), "Decoder.step: seqs count ", total, " rows, x has ", x.size(0));
  }

  void run_block(size_t l, Tensor& x, const Tensor& seqs) {
    const Block& b = blocks_[l];
    const auto h1 = norm_quant(x, b.norm1.weight, b.norm1.bias, b.norm1.eps, norm_kind_, b.qkv.feed_mode());
    const Tensor qkv = b.qkv(h1, kNone, kNoQuant)[0];
    const Tensor attn = attend(l, qkv, seqs, b.scaling);
    x.add_(b.o({attn}, kNone, kNoQuant)[0]);
    const auto h2 = norm_quant(x, b.norm2.weight, b.norm2.bias, b.norm2.eps, norm_kind_, b.up.feed_mode());
    if (b.act == kGeluNew) {                  // not an epilogue op: the formula on the GEMM's output
      const Tensor mid = gelu_new(b.up(h2, kNone, kNoQuant)[0]);
      x.add_(b.down({mid}, kNone, kNoQuant)[0]);
    } else {
      const auto mid = b.up(h2, b.act, b.down.feed_mode());
      x.add_(b.down(mid, kNone, kNoQuant)[0]);
    }
  }

  // The step's sequences: their rows [row0[s], row0[s + 1]) of the step, first positions, cache slots.
  struct Seqs {
    std::vector<int64_t> row0, pos0, slot;
    explicit Seqs(const Tensor& seqs) : row0(seqs.size(0) + 1, 0), pos0(seqs.size(0)), slot(seqs.size(0)) {
      const int64_t* sq = seqs.data_ptr<int64_t>();
      for (int64_t s = 0; s < seqs.size(0); ++s)
        slot[s] = sq[s * 3], pos0[s] = sq[s * 3 + 1], row0[s + 1] = row0[s] + sq[s * 3 + 2];
    }
    int64_t size() const { return (int64_t)slot.size(); }
    int64_t count(int64_t s) const { return row0[s + 1] - row0[s]; }
  };

  // RoPE on each row's q (into q [T, heads, d]) and k, and k, v into block l's cache at the row's position.
  void write_rows(size_t l, const Tensor& qkv, const Seqs& sq, Tensor& q) {
    const int64_t T = qkv.size(0), nq = heads_ * d_, nk = kv_heads_ * d_, width = nq + 2 * nk;
    const float* src = qkv.data_ptr<float>();
    at::parallel_for(0, T, 16, [&](int64_t r0, int64_t r1) {
      std::vector<float> kbuf(d_);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t s = std::upper_bound(sq.row0.begin(), sq.row0.end(), r) - sq.row0.begin() - 1;
        const int64_t pos = sq.pos0[s] + (r - sq.row0[s]);
        const float* row = src + r * width;
        const float* c = cos_.defined() ? cos_.data_ptr<float>() + pos * d_ : nullptr;
        const float* sn = cos_.defined() ? sin_.data_ptr<float>() + pos * d_ : nullptr;
        float* qr = q.data_ptr<float>() + r * nq;
        for (int64_t h = 0; h < heads_; ++h) {
          if (c) rope_head(row + h * d_, c, sn, d_, qr + h * d_);
          else std::memcpy(qr + h * d_, row + h * d_, d_ * sizeof(float));
        }
        for (int64_t h = 0; h < kv_heads_; ++h) {
          const int64_t tok = (sq.slot[s] * kv_heads_ + h) * max_len_ + pos;     // [slot, head, pos]
          const float* k = row + nq + h * d_;
          if (c) rope_head(k, c, sn, d_, kbuf.data()), k = kbuf.data();
          const float* v = row + nq + nk + h * d_;
          if (int8_) {
            quantize_head(k, d_, keys_[l].data_ptr<int8_t>() + tok * d_, kscale_[l].data_ptr<float>() + tok);
            quantize_head(v, d_, values_[l].data_ptr<int8_t>() + tok * d_, vscale_[l].data_ptr<float>() + tok);
          } else {
            std::memcpy(keys_[l].data_ptr<float>() + tok * d_, k, d_ * sizeof(float));
            std::memcpy(values_[l].data_ptr<float>() + tok * d_, v, d_ * sizeof(float));
          }
        }
      }
    });
  }

  // Block l's cached keys and values of slot for positions [0, len), as float32 [1, kv, len, d]
  // (views of a float cache; dequantized from an INT8 one).
  std::pair<Tensor, Tensor> cached(size_t l, int64_t slot, int64_t len) const {
    auto part = [&](const Tensor& t) { return t.select(0, slot).narrow(1, 0, len); };
    if (!int8_) return {part(keys_[l]).unsqueeze(0), part(values_[l]).unsqueeze(0)};
    return {(part(keys_[l]).to(at::kFloat) * part(kscale_[l]).unsqueeze(-1)).unsqueeze(0),
            (part(values_[l]).to(at::kFloat) * part(vscale_[l]).unsqueeze(-1)).unsqueeze(0)};
  }

  // Decode steps over an INT8 cache: one query per sequence, straight from the int8 rows.
  void attend_decode_i8(size_t l, const Tensor& q, const Seqs& sq, double scaling, Tensor& attn) const {
    const int64_t rep = heads_ / kv_heads_;
    at::parallel_for(0, sq.size() * heads_, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> scores(max_len_);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t s = t / heads_, h = t % heads_, g = h / rep, r = sq.row0[s];
        const int64_t base = (sq.slot[s] * kv_heads_ + g) * max_len_;
        attend_i8(q.data_ptr<float>() + (r * heads_ + h) * d_, keys_[l].data_ptr<int8_t>() + base * d_,
                  kscale_[l].data_ptr<float>() + base, values_[l].data_ptr<int8_t>() + base * d_,
                  vscale_[l].data_ptr<float>() + base, sq.pos0[s] + 1, d_, scaling, scores.data(),
                  attn.data_ptr<float>() + (r * heads_ + h) * d_);
      }
    });
  }

  // qkv [T, (heads + 2 kv_heads) d] -> attention output [T, heads d]; writes k, v into the cache.
  Tensor attend(size_t l, const Tensor& qkv, const Tensor& seqs, double scaling) {
    const int64_t T = qkv.size(0);
    const Seqs sq(seqs);
    Tensor attn = at::empty({T, heads_ * d_}, qkv.options());
    Tensor q = at::empty({T, heads_, d_}, qkv.options());
    write_rows(l, qkv, sq, q);
    if (int8_ && T == sq.size()) {            // every sequence adds one token
      attend_decode_i8(l, q, sq, scaling, attn);
      return attn;
    }
    for (int64_t s = 0; s < sq.size(); ++s) {
      const int64_t n = sq.count(s), p0 = sq.pos0[s], len = p0 + n;
      const Tensor qs = q.narrow(0, sq.row0[s], n).view({1, n, heads_, d_}).transpose(1, 2);   // [1, heads, n, d]
      const auto [ks, vs] = cached(l, sq.slot[s], len);                                        // [1, kv, len, d]
      std::optional<Tensor> mask;
      bool causal = false;
      if (n > 1 && p0 == 0) {
        causal = true;                        // a prompt from position 0: HF's is_causal path
      } else if (n > 1) {                     // new tokens after cached ones: query i sees keys <= start + i
        const Tensor qi = at::arange(n, at::kLong).unsqueeze(1) + p0;
        mask = (qi >= at::arange(len, at::kLong).unsqueeze(0)).view({1, 1, n, len});
      }
      const Tensor out = at::scaled_dot_product_attention(qs, ks, vs, mask, 0.0, causal, scaling,
                                                          heads_ != kv_heads_);        // [1, heads, n, d]
      attn.narrow(0, sq.row0[s], n).view({n, heads_, d_}).copy_(out.select(0, 0).transpose(0, 1));
    }
    return attn;
  }

  int64_t hidden_, heads_, kv_heads_, d_, norm_kind_;
  Tensor cos_, sin_;
  NormParams final_;
  std::vector<Block> blocks_;
  std::vector<Tensor> keys_, values_, kscale_, vscale_;
  int64_t slots_ = 0, max_len_ = 0;
  bool int8_ = false;
};

void register_decode(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<QLinear>(m, "QLinear", "a prepacked quantized linear layer for the step runner")
      .def(py::init([](Tensor wpack, Tensor wsum, Tensor wscale, std::optional<Tensor> wbias, int64_t bits, int64_t n,
                       bool gated, int64_t amode, double static_scale) {
             return QLinear{wpack, wsum, wscale, wbias, bits, n, gated, amode, static_scale};
           }),
           py::arg("wpack"), py::arg("wsum"), py::arg("wscale"), py::arg("wbias"), py::arg("bits"), py::arg("n"),
           py::arg("gated"), py::arg("amode"), py::arg("static_scale"));
  py::class_<NormParams>(m, "NormParams", "a norm's weight, bias and epsilon")
      .def(py::init([](Tensor w, std::optional<Tensor> b, double eps) {
             return NormParams{w.contiguous().to(at::kFloat), b ? std::optional<Tensor>(b->contiguous().to(at::kFloat))
                                                                : std::nullopt, eps};
           }),
           py::arg("weight"), py::arg("bias"), py::arg("eps"));
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("head_logits", &head_logits, "batch-invariant x . w^T for an output head (w float32 or bfloat16)", nogil);
  py::class_<Decoder>(m, "Decoder", "zquant's whole-model decode step over a preallocated KV cache")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, std::optional<Tensor>, std::optional<Tensor>,
                    NormParams>(),
           py::arg("hidden"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("norm_kind"),
           py::arg("cos"), py::arg("sin"), py::arg("final_norm"))
      .def("add_block", &Decoder::add_block)
      .def("reserve", &Decoder::reserve, nogil)
      .def("step", &Decoder::step, nogil)
      .def("cache", &Decoder::cache)
      .def_property_readonly("cache_bytes", &Decoder::cache_bytes)
      .def_property_readonly("num_blocks", &Decoder::num_blocks)
      .def_property_readonly("slots", &Decoder::slots)
      .def_property_readonly("max_len", &Decoder::max_len);
}

}  // namespace zq
