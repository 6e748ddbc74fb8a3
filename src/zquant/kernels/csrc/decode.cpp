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
//   written into the cache -> attention of each sequence's new rows over its own cache prefix
//   (attention.cpp: zquant's kernel, so a sequence never depends on what else is in the batch) ->
//   o GEMM -> x += o -> norm2 quantized -> MLP: gated GEMM (silu(gate) * up, quantized for down;
//   Llama) or up GEMM + activation (GPT-2) -> down GEMM -> x += down. Norms are RMSNorm or LayerNorm.
// Everything but attention is bit-identical to the modules; attention agrees with the model's SDPA
// to float rounding (tests/test_generate.py checks both). The integer arithmetic is the same.

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

}  // namespace

class Decoder {
 public:
  Decoder(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t norm_kind,
          std::optional<Tensor> cos, std::optional<Tensor> sin, NormParams final_norm)
      : hidden_(hidden), heads_(heads), kv_heads_(kv_heads), d_(head_dim), norm_kind_(norm_kind),
        final_(std::move(final_norm)) {
    TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && head_dim > 0 && head_dim % 2 == 0 &&
                    head_dim <= kMaxHeadDim,
                "Decoder: bad head layout (head_dim at most ", kMaxHeadDim, ")");
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

  // Allocates the cache (the layout is described in attention.cpp): per block, keys [slots, kv_heads,
  // ld / 64, head_dim, 64] and values [slots, kv_heads, ld, head_dim] (ld = max_len rounded up to 64), float32
  // or int8 with one float32 scale per token per head ([slots, kv_heads, ld]).
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
    const int64_t ld = (max_len + 63) / 64 * 64;
    for (size_t i = 0; i < blocks_.size(); ++i) {
      keys_.push_back(at::empty({slots, kv_heads_, ld / 64, d_, 64}, dtype));
      values_.push_back(at::empty({slots, kv_heads_, ld, d_}, dtype));
      if (int8) {
        kscale_.push_back(at::empty({slots, kv_heads_, ld}, at::kFloat));
        vscale_.push_back(at::empty({slots, kv_heads_, ld}, at::kFloat));
      }
    }
    slots_ = slots;
    max_len_ = max_len;
    ld_ = ld;
    int8_ = int8;
  }

  // x [T, hidden] float32 (embedded new tokens), seqs int64 [S, 3] (slot, start, count).
  // Returns the final norm of the last row of each sequence [S, hidden], or of every row.
  Tensor step(const Tensor& x_in, const Tensor& seqs_in, bool all_rows) {
    at::NoGradGuard no_grad;
    const Tensor seqs = seqs_in.to(at::kLong).contiguous();
    check_step(x_in, seqs);
    Tensor x = x_in.contiguous().clone();          // the residual stream, updated in place
    const Seqs sq(seqs);
    for (size_t l = 0; l < blocks_.size(); ++l) run_block(l, x, sq);
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

  // (keys, values) of a block as [slots, kv_heads, max_len, head_dim] (keys: a copy), plus (key scales,
  // value scales) [slots, kv_heads, max_len] for an INT8 cache.
  std::vector<Tensor> cache(int64_t block) const {
    TORCH_CHECK(block >= 0 && block < (int64_t)keys_.size(), "Decoder.cache: no block ", block);
    const Tensor k = key_rows(keys_[block]).narrow(2, 0, max_len_);
    const Tensor v = values_[block].narrow(2, 0, max_len_);
    if (int8_) return {k, v, kscale_[block].narrow(2, 0, max_len_), vscale_[block].narrow(2, 0, max_len_)};
    return {k, v};
  }

  // Bytes the KV cache takes.
  int64_t cache_bytes() const {
    int64_t n = 0;
    for (const auto* v : {&keys_, &values_, &kscale_, &vscale_})
      for (const auto& t : *v) n += t.numel() * t.element_size();
    return n;
  }

  // Attention through torch's SDPA (true) or zquant's kernel (false, the default; see attend).
  void use_sdpa(bool on) { sdpa_ = on; }

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

  void run_block(size_t l, Tensor& x, const Seqs& sq) {
    const Block& b = blocks_[l];
    const auto h1 = norm_quant(x, b.norm1.weight, b.norm1.bias, b.norm1.eps, norm_kind_, b.qkv.feed_mode());
    const Tensor qkv = b.qkv(h1, kNone, kNoQuant)[0];
    const Tensor attn = attend(l, qkv, sq, b.scaling);
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

  // Keys [..., ld / 64, d, 64] (the cache's blocks) as contiguous rows [..., ld, d].
  Tensor key_rows(const Tensor& keys) const {
    std::vector<int64_t> shape(keys.sizes().begin(), keys.sizes().end() - 3);
    shape.insert(shape.end(), {ld_, d_});
    return keys.transpose(-1, -2).contiguous().view(shape);
  }

  // Where element 0 of position pos's key sits in a head's keys [ld / 64, d, 64].
  int64_t key_offset(int64_t pos) const { return pos / 64 * d_ * 64 + pos % 64; }

  // RoPE on each row's q (into q [T, heads, d]) and k, and k, v into block l's cache at the row's position.
  void write_rows(size_t l, const Tensor& qkv, const Seqs& sq, Tensor& q) {
    const int64_t T = qkv.size(0), nq = heads_ * d_, nk = kv_heads_ * d_, width = nq + 2 * nk;
    const float* src = qkv.data_ptr<float>();
    at::parallel_for(0, T, 16, [&](int64_t r0, int64_t r1) {
      std::vector<float> kbuf(d_);
      std::vector<int8_t> kq(d_);
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
          const int64_t head = sq.slot[s] * kv_heads_ + h;                  // [slot, kv head]
          const float* k = row + nq + h * d_;
          if (c) rope_head(k, c, sn, d_, kbuf.data()), k = kbuf.data();
          const float* v = row + nq + nk + h * d_;
          if (int8_) {
            int8_t* kt = keys_[l].data_ptr<int8_t>() + head * d_ * ld_ + key_offset(pos);
            quantize_head(k, d_, kq.data(), kscale_[l].data_ptr<float>() + head * ld_ + pos);
            for (int64_t j = 0; j < d_; ++j) kt[j * 64] = kq[j];
            quantize_head(v, d_, values_[l].data_ptr<int8_t>() + (head * ld_ + pos) * d_,
                          vscale_[l].data_ptr<float>() + head * ld_ + pos);
          } else {
            float* kt = keys_[l].data_ptr<float>() + head * d_ * ld_ + key_offset(pos);
            for (int64_t j = 0; j < d_; ++j) kt[j * 64] = k[j];
            std::memcpy(values_[l].data_ptr<float>() + (head * ld_ + pos) * d_, v, d_ * sizeof(float));
          }
        }
      }
    });
  }

  // qkv [T, (heads + 2 kv_heads) d] -> attention output [T, heads d]: k, v into the cache, then every
  // sequence's new rows over its own cache prefix (attention.cpp), so a sequence never depends on
  // what else is in the batch.
  Tensor attend(size_t l, const Tensor& qkv, const Seqs& sq, double scaling) {
    const int64_t T = qkv.size(0);
    Tensor attn = at::empty({T, heads_ * d_}, qkv.options());
    Tensor q = at::empty({T, heads_, d_}, qkv.options());
    write_rows(l, qkv, sq, q);
    if (sdpa_) {
      for (int64_t s = 0; s < sq.size(); ++s) attend_sdpa(l, q, sq, s, scaling, attn);
      return attn;
    }
    const int64_t es = int8_ ? 1 : 4, slot_elems = kv_heads_ * d_ * ld_;
    std::vector<AttnSeq> seqs;
    for (int64_t s = 0; s < sq.size(); ++s) {
      const int64_t r = sq.row0[s], slot = sq.slot[s];
      seqs.push_back({q.data_ptr<float>() + r * heads_ * d_, attn.data_ptr<float>() + r * heads_ * d_, sq.count(s),
                      sq.pos0[s], static_cast<const char*>(keys_[l].data_ptr()) + slot * slot_elems * es,
                      static_cast<const char*>(values_[l].data_ptr()) + slot * slot_elems * es,
                      int8_ ? kscale_[l].data_ptr<float>() + slot * kv_heads_ * ld_ : nullptr,
                      int8_ ? vscale_[l].data_ptr<float>() + slot * kv_heads_ * ld_ : nullptr});
    }
    zq::attend(seqs, AttnShape{heads_, kv_heads_, d_, ld_, (float)scaling, int8_});
    return attn;
  }

  // Sequence s's rows through torch's scaled_dot_product_attention over its cache prefix (keys back
  // in [kv, len, d], INT8 entries dequantized), exactly as the model's own forward attends: with
  // use_sdpa(true), a float32 cache gives results bit-identical to the model's (for checking).
  void attend_sdpa(size_t l, const Tensor& q, const Seqs& sq, int64_t s, double scaling, Tensor& attn) const {
    const int64_t n = sq.count(s), p0 = sq.pos0[s], len = p0 + n;
    const Tensor qs = q.narrow(0, sq.row0[s], n).view({1, n, heads_, d_}).transpose(1, 2);     // [1, heads, n, d]
    Tensor ks = key_rows(keys_[l][sq.slot[s]]).narrow(1, 0, len);
    Tensor vs = values_[l][sq.slot[s]].narrow(1, 0, len);
    if (int8_) {
      ks = ks.to(at::kFloat) * kscale_[l][sq.slot[s]].narrow(1, 0, len).unsqueeze(-1);
      vs = vs.to(at::kFloat) * vscale_[l][sq.slot[s]].narrow(1, 0, len).unsqueeze(-1);
    }
    std::optional<Tensor> mask;
    const bool causal = n > 1 && p0 == 0;   // a prompt from position 0: HF's is_causal path
    if (n > 1 && p0 > 0) {                  // new tokens after cached ones: query i sees keys <= start + i
      const Tensor qi = at::arange(n, at::kLong).unsqueeze(1) + p0;
      mask = (qi >= at::arange(len, at::kLong).unsqueeze(0)).view({1, 1, n, len});
    }
    const Tensor out = at::scaled_dot_product_attention(qs, ks.unsqueeze(0), vs.unsqueeze(0), mask, 0.0, causal,
                                                        scaling, heads_ != kv_heads_);       // [1, heads, n, d]
    attn.narrow(0, sq.row0[s], n).view({n, heads_, d_}).copy_(out.select(0, 0).transpose(0, 1));
  }

  int64_t hidden_, heads_, kv_heads_, d_, norm_kind_;
  Tensor cos_, sin_;
  NormParams final_;
  std::vector<Block> blocks_;
  std::vector<Tensor> keys_, values_, kscale_, vscale_;
  int64_t slots_ = 0, max_len_ = 0, ld_ = 0;
  bool sdpa_ = false;
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
  m.attr("MAX_HEAD_DIM") = kMaxHeadDim;
  py::class_<Decoder>(m, "Decoder", "zquant's whole-model decode step over a preallocated KV cache")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, std::optional<Tensor>, std::optional<Tensor>,
                    NormParams>(),
           py::arg("hidden"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("norm_kind"),
           py::arg("cos"), py::arg("sin"), py::arg("final_norm"))
      .def("add_block", &Decoder::add_block)
      .def("reserve", &Decoder::reserve, nogil)
      .def("step", &Decoder::step, nogil)
      .def("cache", &Decoder::cache)
      .def("use_sdpa", &Decoder::use_sdpa)
      .def_property_readonly("cache_bytes", &Decoder::cache_bytes)
      .def_property_readonly("num_blocks", &Decoder::num_blocks)
      .def_property_readonly("slots", &Decoder::slots)
      .def_property_readonly("max_len", &Decoder::max_len);
}

}  // namespace zq
