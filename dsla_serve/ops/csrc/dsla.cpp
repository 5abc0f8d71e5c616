// The fused C++ DSLA kernels: one decode step for a batch of pooled sequences, and the prefill scan.
//
// Both implement dsla_serve/ops/naive.py and are tested against the Python paths: the decode step
// against the Python step (dsla_serve/ops/recurrent.py, driven by DSLAAttention.step), the scan
// against the chunked form (dsla_serve/ops/chunk.py) and the naive reference.
//
// Decode step. Decode at batch 1 is bound by per-op dispatch overhead (about 150 small tensor ops per
// layer in Python), so this kernel does the whole token mixing of a DSLA layer after the q/k/v
// projection in one call, reading and writing the pool's slots in place: the leaving token's
// un-rotation, the k/v/q adapters, both gates, the state update, the state reads with RMS norm and
// gain, the exact window, the mixing and the output gate.
//
// Layouts (acc_t = float, double for a float64 model):
//   qkv      (B, (Hq + 2 Hkv) D) scalar_t   q | k | v of the new token, un-rotated
//   hidden   (B, hidden) scalar_t           layer input (for the q adapter), or empty
//   cos/sin  (B, D) scalar_t                rotary of the new token; lcos/lsin: of the leaving one
//   pos      (B,) int64                     position of the new token
//   slots    (B,) int64                     pool slot of each row
//   states   (S, 2, Hkv, D, D) acc_t        in place
//   ring_k/v (S, Hkv, W, D) scalar_t        in place (W = 0: unused)
//   gate_w   (nG Hkv D, 2 Hkv D), gate_b (nG Hkv D)   nG = 2 (far, close) or 1 (single state); columns
//            [k of every head | v of every head]; in the weights' own dtype, or packed (pack_gate) with
//            gate_scale: int8 codes' row scales, bfloat16 (out,), else empty
//   adapters (A: (r, in), B transposed: (r, out)) acc_t or bfloat16, or empty tensors
//   mix      (Hq, 2 | 3) acc_t              softmax of (alpha_far, alpha_close[, beta])
//   gain     (Hq, D); og_w (D, D) transposed (in, out), og_b (Hq, D) or empty (no output gate)
// Returns o (B, Hq D) scalar_t, and the o adapter's output (B, hidden) scalar_t (empty without one).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

namespace {

struct FlushDenormals {
  // Flush-to-zero and denormals-are-zero while a worker runs a scan: softmax weights of far-away
  // scores times values and long-decayed state rows fall below float's normal range, and x86 then
  // takes microcode assists (a real layer's window measured 4x slower than on random inputs).
#if defined(__x86_64__)
  const unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

template <typename T>
inline void rotate(const T* __restrict x, const T* __restrict cos, const T* __restrict sin, T* __restrict out,
                   int64_t D, T sign) {
  // Llama's rotary embedding: out = x cos + rotate_half(x) sin; sign = -1 undoes it. out must not alias x.
  const int64_t half = D / 2;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) out[i] = x[i] * cos[i] - sign * x[i + half] * sin[i];
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) out[i + half] = x[i + half] * cos[i + half] + sign * x[i] * sin[i + half];
}

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

template <typename T>
inline T sum_squares(const T* x, int64_t n) {
  // dot(x, x, n); float with AVX-512: four vector accumulators and a tree reduction (the compiler's
  // reduction of dot ends in a chain of 16 dependent scalar adds, 18 of them a token in the scan's mixing)
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    if (n % 64 == 0) {
      __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t i = 0; i < n; i += 64) {
        for (int u = 0; u < 4; ++u) {
          const __m512 v = _mm512_loadu_ps(x + i + 16 * u);
          a[u] = _mm512_fmadd_ps(v, v, a[u]);
        }
      }
      return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
    }
  }
#endif
  return dot(x, x, n);
}

template <typename T, typename S>
inline T dot_mixed(const T* a, const S* b, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * static_cast<T>(b[i]);
  return acc;
}

#if defined(__AVX512F__)
inline __m512 exp_nonpositive(__m512 x) {
  // exp(x) for x <= 0 (below -87, where float's normal range ends: 0), 16 lanes: Cody-Waite reduction,
  // a degree-7 polynomial and scalef (< 2 ulp; GCC 12 leaves std::exp and bit-cast versions of this
  // scalar, one call per element).
  const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
  const __m512 x0 = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x0, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145752f), x0);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.98412698e-4f);
  for (const float c : {1.38888889e-3f, 8.33333333e-3f, 4.16666667e-2f, 1.66666667e-1f, 0.5f, 1.0f, 1.0f}) {
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  }
  return _mm512_maskz_mov_ps(normal, _mm512_scalef_ps(p, k));
}
#endif

template <typename T>
inline T exp_shifted(T* x, int64_t n, T shift) {
  // x[i] = exp(x[i] - shift) in place; returns their sum. Arguments <= 0 (decays; softmax scores
  // after their max). float with AVX-512: exp_nonpositive; elsewhere std::exp, so the float64 tests
  // compare exactly.
  T sum = 0;
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 s = _mm512_set1_ps(shift);
    __m512 acc = _mm512_setzero_ps();
    for (; i < n; i += 16) {
      const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
      const __m512 p = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), s));
      _mm512_mask_storeu_ps(x + i, m, p);
      acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(m, p));
    }
    return _mm512_reduce_add_ps(acc);
  }
#endif
  for (; i < n; ++i) sum += (x[i] = std::exp(x[i] - shift));
  return sum;
}

template <typename T>
inline T log_sigmoid(T x) {
  return std::min(x, T(0)) - std::log1p(std::exp(-std::abs(x)));
}

#if defined(__AVX512F__)
// 16 lanes of float or bfloat16 <-> float; bfloat16 stores round to nearest even, as ATen's casts do.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 round16(const float*, __m512 x) { return x; }
inline __m512 round16(const c10::BFloat16*, __m512 x) {  // x rounded to bfloat16's precision, as float (finite x)
  const __m512i b = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(int(0xFFFF0000u))));
}
inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
inline void store16(c10::BFloat16* p, __m512 x) {  // x already rounded (round16): truncation is exact
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(x), 16)));
}
#endif

template <typename T, typename W>
inline void low_rank_add(const W* A, const W* Bt, const T* x, T* y, int64_t n_in, int64_t n_out, int64_t r) {
  // y += B (A x): a rank-r adapter; A (r, n_in), Bt = B transposed (r, n_out), in T or bfloat16.
  std::vector<T> t(r);
  for (int64_t j = 0; j < r; ++j) t[j] = dot_mixed(x, A + j * n_in, n_in);
  for (int64_t j = 0; j < r; ++j) {
    const W* b = Bt + j * n_out;
#pragma omp simd
    for (int64_t o = 0; o < n_out; ++o) y[o] += static_cast<T>(b[o]) * t[j];
  }
}

template <typename acc_t>
inline void adapter_add(const at::Tensor& A, const at::Tensor& Bt, const acc_t* x, acc_t* y) {
  // y += B (A x) for an adapter held in bfloat16 or in acc_t: A (r, in), Bt = B transposed (r, out)
  const int64_t r = A.size(0), n_in = A.size(1), n_out = Bt.size(1);
  if (A.scalar_type() == at::kBFloat16) {
    low_rank_add(A.data_ptr<c10::BFloat16>(), Bt.data_ptr<c10::BFloat16>(), x, y, n_in, n_out, r);
  } else {
    low_rank_add(A.data_ptr<acc_t>(), Bt.data_ptr<acc_t>(), x, y, n_in, n_out, r);
  }
}

template <typename scalar_t, typename acc_t>
inline void decay_from_logits(const scalar_t* x, acc_t* decay, int64_t D, acc_t normalizer, acc_t gate_min) {
  // A gate's per-token decay from its pre-activation: exp(max(logsigmoid(x) / normaliser, gate_min)).
  // float with AVX-512: logsigmoid(x) = min(x, 0) - log1p(e), e = exp(-|x|) in (0, 1], and
  // log1p(e) = 2 atanh(e / (2 + e)) by its odd series to t^13 (t <= 1/3: error ~1e-8, below float's
  // precision); NaN stays NaN. Elsewhere the scalar formula, so the float64 tests compare exactly.
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float> && !std::is_same_v<scalar_t, double>) {
    const __m512 zero = _mm512_setzero_ps(), two = _mm512_set1_ps(2.0f), inv = _mm512_set1_ps(1.0f / normalizer),
                 floor = _mm512_set1_ps(gate_min);
    for (; i + 16 <= D; i += 16) {
      const __m512 xv = load16(x + i);
      const __m512 e = exp_nonpositive(_mm512_sub_ps(zero, _mm512_abs_ps(xv)));
      const __m512 t = _mm512_div_ps(e, _mm512_add_ps(two, e)), t2 = _mm512_mul_ps(t, t);
      __m512 p = _mm512_set1_ps(2.0f / 13);
      for (const float c : {2.0f / 11, 2.0f / 9, 2.0f / 7, 2.0f / 5, 2.0f / 3, 2.0f}) p = _mm512_fmadd_ps(p, t2, _mm512_set1_ps(c));
      const __m512 ls = _mm512_sub_ps(_mm512_min_ps(xv, zero), _mm512_mul_ps(p, t));
      const __m512 d = exp_nonpositive(_mm512_max_ps(_mm512_mul_ps(ls, inv), floor));
      _mm512_storeu_ps(decay + i, _mm512_mask_mov_ps(d, _mm512_cmp_ps_mask(xv, xv, _CMP_UNORD_Q), xv));
    }
  }
#endif
  for (; i < D; ++i) {
    const acc_t g = log_sigmoid(acc_t(x[i])) / normalizer;
    decay[i] = std::isnan(g) ? g : std::exp(std::max(g, gate_min));
  }
}

// NOTE(decisions): a decode step streams ~100 MB of weights (and at batch 8 ~25 MB of DSLA states) from
// memory, and the hardware prefetcher stops at 4 KiB pages. Prefetching 2 KiB ahead made batch-1 decode
// ~7 % faster and batch 8 ~4 % in the GEMVs (3 alternating runs each; 1 and 4 KiB measured no better), and
// the DSLA step's kernel ~12 % faster (its gate weights and states). The step's states are prefetched
// whole (16 KiB at D = 64) before their update: against the 2 KiB-ahead row prefetch of the loop it
// replaced, equal within the noise of 3 alternating runs at batch 1 and 8.
constexpr int64_t PREFETCH = 2048;

inline void prefetch(const void* p, int64_t bytes) {  // the cache lines of [p, p + bytes)
#if defined(__x86_64__)
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(c + i, _MM_HINT_T0);
#endif
}

inline void prefetch_ahead(const void* p, int64_t bytes) {  // the cache lines PREFETCH past [p, p + bytes)
  prefetch(static_cast<const char*>(p) + PREFETCH, bytes);
}

template <typename acc_t, typename w_t>
void gate_gemv(const at::Tensor& w, const at::Tensor& bias, const acc_t* x, const std::vector<char>& enters, acc_t* g,
               int64_t B, int64_t n_out, int64_t n_in) {
  // g (B, n_out) = x W^T + bias; bfloat16 weights take the rows rounded to bfloat16, as gate_gemv_bf16
  // and the Python step's projection do
  std::vector<acc_t> rounded;
  if constexpr (std::is_same_v<w_t, c10::BFloat16>) {
    rounded.assign(x, x + B * n_in);
    for (acc_t& e : rounded) e = acc_t(static_cast<float>(c10::BFloat16(static_cast<float>(e))));
    x = rounded.data();
  }
  const w_t* w_p = w.data_ptr<w_t>();
  const w_t* b_p = bias.data_ptr<w_t>();
  const int64_t first = std::find(enters.begin(), enters.end(), 1) - enters.begin();  // prefetches for all rows
  at::parallel_for(0, n_out, 64, [&](int64_t o0, int64_t o1) {
    for (int64_t b = 0; b < B; ++b) {
      if (!enters[b]) continue;
      for (int64_t o = o0; o < o1; ++o) {
        if (b == first) prefetch_ahead(w_p + o * n_in, n_in * sizeof(w_t));
        g[b * n_out + o] = dot_mixed(x + b * n_in, w_p + o * n_in, n_in) + acc_t(b_p[o]);
      }
    }
  });
}

// The state update and reads of one token, shared by the decode step and the prefill scan.
template <typename acc_t, int64_t D, int64_t G>
inline void scan_token(acc_t* S, const acc_t* decay, const acc_t* kk, const acc_t* vv, const acc_t* qq, acc_t* out,
                       int64_t out_stride) {
  // One token on one D x D state: every row decays and takes k v^T, and the G queries read the row
  // while it is in registers. Blocks of one vector register of columns keep the G accumulators there.
  constexpr int64_t block = 128 / sizeof(acc_t);  // two vector registers: 2 G independent FMA chains
  static_assert(D % block == 0, "head_dim must be a multiple of two vector registers");
  for (int64_t jb = 0; jb < D; jb += block) {
    acc_t acc[G][block] = {};
    acc_t vb[block];
    for (int64_t j = 0; j < block; ++j) vb[j] = vv[jb + j];
    for (int64_t r = 0; r < D; ++r) {
      acc_t* row = S + r * D + jb;
      const acc_t dr = decay[r], kr = kk[r];
#pragma omp simd
      for (int64_t j = 0; j < block; ++j) row[j] = dr * row[j] + kr * vb[j];
      for (int64_t g = 0; g < G; ++g) {
        const acc_t qr = qq[g * D + r];
#pragma omp simd
        for (int64_t j = 0; j < block; ++j) acc[g][j] += qr * row[j];
      }
    }
    for (int64_t g = 0; g < G; ++g) std::copy(acc[g], acc[g] + block, out + g * out_stride + jb);
  }
}

template <typename acc_t>
inline void scan_token_any(acc_t* S, const acc_t* decay, const acc_t* kk, const acc_t* vv, const acc_t* qq, acc_t* out,
                           int64_t out_stride, int64_t D, int64_t G) {
  for (int64_t g = 0; g < G; ++g) std::fill(out + g * out_stride, out + g * out_stride + D, acc_t(0));
  for (int64_t r = 0; r < D; ++r) {
    acc_t* row = S + r * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) row[j] = decay[r] * row[j] + kk[r] * vv[j];
    for (int64_t g = 0; g < G; ++g) {
      acc_t* a = out + g * out_stride;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) a[j] += qq[g * D + r] * row[j];
    }
  }
}

template <typename acc_t>
using TokenFn = void (*)(acc_t*, const acc_t*, const acc_t*, const acc_t*, const acc_t*, acc_t*, int64_t);

template <typename acc_t, int64_t D>
TokenFn<acc_t> token_fn_g(int64_t G) {
  switch (G) {
    case 1: return scan_token<acc_t, D, 1>;
    case 2: return scan_token<acc_t, D, 2>;
    case 3: return scan_token<acc_t, D, 3>;
    case 4: return scan_token<acc_t, D, 4>;
    case 5: return scan_token<acc_t, D, 5>;
    case 6: return scan_token<acc_t, D, 6>;
    case 7: return scan_token<acc_t, D, 7>;
    case 8: return scan_token<acc_t, D, 8>;
    default: return nullptr;
  }
}

template <typename acc_t>
TokenFn<acc_t> token_fn(int64_t D, int64_t G) {
  // Specialised for the common head sizes and groups; nullptr: the generic loop.
  if (D == 64) return token_fn_g<acc_t, 64>(G);
  if (D == 128) return token_fn_g<acc_t, 128>(G);
  return nullptr;
}

#if defined(__AVX512BF16__)
constexpr bool kBf16Dot = true;
#else
constexpr bool kBf16Dot = false;
#endif

// NOTE(decisions): where int8 codes do not apply (pack_gate), bfloat16 gate weights are packed for
// AVX512-BF16's dot product (16 output rows per vector, an input pair per lane). As float FMAs on
// converted weights the gates took ~6 us of a batch-1 layer step's ~29 (its inputs in L2); packed, the
// step took ~26.6 (3 alternating runs each). Every path with bfloat16 weights rounds the rows to
// bfloat16 first, as the Python step's projection does, so a CPU with or without AVX512-BF16 computes
// the same gates up to the order of the sums; int8 codes (quantised models) differ by their rounding.
at::Tensor pack_gate_bf16(const at::Tensor& w) {  // (n_out, n_in) -> (n_out/16, n_in/2, 16, 2)
  return w.view({w.size(0) / 16, 16, w.size(1) / 2, 2}).transpose(1, 2).contiguous();
}

bool packable_gate(const at::Tensor& w) {
  return kBf16Dot && w.scalar_type() == at::kBFloat16 && w.dim() == 2 && w.size(0) % 16 == 0 && w.size(1) % 2 == 0;
}

std::pair<at::Tensor, at::Tensor> pack_gate_int8(const at::Tensor& w) {
  // bfloat16 gate weights (n_out, n_in) as int8 codes for the VNNI GEMV, as Int8Linear quantises (one
  // bfloat16 scale per row, codes in [-127, 127]) and packs (pack_int8_vnni): (packed, scale)
  const at::Tensor wf = w.to(at::kFloat);
  const at::Tensor scale = (wf.abs().amax(1) / 127).clamp_min(1e-10).to(at::kBFloat16);
  const at::Tensor codes = (wf / scale.to(at::kFloat).unsqueeze(1)).round().clamp(-127, 127).to(at::kShort) + 128;
  const int64_t n_out = w.size(0), n_in = w.size(1);
  const at::Tensor bytes = codes.to(at::kByte).view({n_out / 16, 16, n_in / 4, 4}).permute({0, 2, 1, 3});
  return {bytes.reshape({n_out / 16, n_in / 4, 64}).contiguous(), scale};
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
void gate_gemv_int8(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& bias, const float* x, float* g,
                    int64_t B, int64_t n_in);
#endif

#if defined(__AVX512BF16__)
void gate_gemv_bf16(const at::Tensor& w, const at::Tensor& bias, const float* x, float* g, int64_t B, int64_t n_out,
                    int64_t n_in) {
  // g (B, n_out) = bf16(x) W^T + bias, W packed by pack_gate_bf16; four rows share each weight load.
  const int64_t pairs = n_in / 2;
  std::vector<uint32_t> xp(B * pairs);  // each row's inputs as bfloat16 pairs
  for (int64_t i = 0; i < B * pairs; ++i) {
    const c10::BFloat16 lo(x[2 * i]), hi(x[2 * i + 1]);
    xp[i] = uint32_t(lo.x) | (uint32_t(hi.x) << 16);
  }
  const __m512i* wp = reinterpret_cast<const __m512i*>(w.data_ptr<c10::BFloat16>());
  const c10::BFloat16* b_p = bias.data_ptr<c10::BFloat16>();
  at::parallel_for(0, n_out / 16, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t rb = r0; rb < r1; ++rb) {
      const __m512i* wb = wp + rb * pairs;
      prefetch_ahead(wb, pairs * 64);
      const __m512 b16 = load16(b_p + rb * 16);
      for (int64_t b0 = 0; b0 < B; b0 += 4) {  // 4 rows x 4 partial sums: independent dot-product chains
        const int64_t nb = std::min<int64_t>(4, B - b0);
        __m512 acc[4][4];
        for (int64_t j = 0; j < 4; ++j) acc[j][0] = b16, acc[j][1] = acc[j][2] = acc[j][3] = _mm512_setzero_ps();
        for (int64_t p = 0; p < pairs; p += 4) {
          for (int64_t u = 0; u < 4 && p + u < pairs; ++u) {
            const __m512bh wv = (__m512bh)_mm512_loadu_si512(wb + p + u);
            for (int64_t j = 0; j < nb; ++j) {
              const __m512bh xv = (__m512bh)_mm512_set1_epi32(int(xp[(b0 + j) * pairs + p + u]));
              acc[j][u] = _mm512_dpbf16_ps(acc[j][u], wv, xv);
            }
          }
        }
        for (int64_t j = 0; j < nb; ++j) {
          const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[j][0], acc[j][1]), _mm512_add_ps(acc[j][2], acc[j][3]));
          _mm512_storeu_ps(g + (b0 + j) * n_out + rb * 16, sum);
        }
      }
    }
  });
}
#endif

template <typename scalar_t, typename acc_t>
std::vector<at::Tensor> step_impl(
    const at::Tensor& qkv, const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
    const at::Tensor& lcos, const at::Tensor& lsin, const at::Tensor& pos, const at::Tensor& slots,
    at::Tensor& states, at::Tensor& ring_k, at::Tensor& ring_v, const at::Tensor& gate_w, const at::Tensor& gate_b,
    const at::Tensor& gate_scale, const at::Tensor& ak, const at::Tensor& bk, const at::Tensor& av, const at::Tensor& bv, const at::Tensor& aq,
    const at::Tensor& bq, const at::Tensor& ao, const at::Tensor& bo, const at::Tensor& mix, const at::Tensor& gain,
    const at::Tensor& og_w, const at::Tensor& og_b, int64_t Hq, int64_t Hkv, int64_t D, double gate_normalizer,
    double gate_min, double eps, bool normalize, bool rope, double scale, double window_scale) {
  const int64_t B = qkv.size(0), W = ring_k.size(2), G = Hq / Hkv, KV = Hkv * D;
  const bool packed_gate = gate_w.dim() == 4, int8_gate = gate_w.scalar_type() == at::kByte;  // pack_gate_bf16's, _int8's
  const int64_t row = qkv.size(1), n_gates = (packed_gate || int8_gate ? gate_w.size(0) * 16 : gate_w.size(0)) / KV;
  const bool has_window = W > 0;
  const int64_t n_mix = mix.size(1);
  const scalar_t* qkv_p = qkv.data_ptr<scalar_t>();
  const int64_t* pos_p = pos.data_ptr<int64_t>();
  const int64_t* slot_p = slots.data_ptr<int64_t>();
  acc_t* st = states.data_ptr<acc_t>();
  scalar_t* rk = has_window ? ring_k.data_ptr<scalar_t>() : nullptr;
  scalar_t* rv = has_window ? ring_v.data_ptr<scalar_t>() : nullptr;

  // Phase 1, per row: the token entering the states (un-rotated, adapted) and the window write.
  auto opts = states.options();
  at::Tensor x = at::zeros({B, 2 * KV}, opts);  // [k_s | v_s] of the entering token
  at::Tensor q_state = at::empty({B, Hq * D}, opts);
  std::vector<char> enters(B);
  acc_t* x_p = x.data_ptr<acc_t>();
  acc_t* qs_p = q_state.data_ptr<acc_t>();
  const scalar_t *c_p = cos.data_ptr<scalar_t>(), *s_p = sin.data_ptr<scalar_t>();
  const scalar_t *lc_p = lcos.data_ptr<scalar_t>(), *ls_p = lsin.data_ptr<scalar_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> lc(D), ls(D), cc(D), ss(D), a(D), rot(D);
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* in = qkv_p + b * row;
      const int64_t p = pos_p[b];
      acc_t* xk = x_p + b * 2 * KV;
      acc_t* xv = xk + KV;
      enters[b] = has_window ? p >= W : 1;
      if (has_window) {
        const int64_t j = p % W, slot = slot_p[b];
        for (int64_t i = 0; i < D; ++i) {
          lc[i] = lc_p[b * D + i];
          ls[i] = ls_p[b * D + i];
          cc[i] = c_p[b * D + i];
          ss[i] = s_p[b * D + i];
        }
        for (int64_t h = 0; h < Hkv; ++h) {
          scalar_t* kslot = rk + ((slot * Hkv + h) * W + j) * D;
          scalar_t* vslot = rv + ((slot * Hkv + h) * W + j) * D;
          if (enters[b]) {  // the token leaving the window (same ring slot): un-rotate its key
            for (int64_t i = 0; i < D; ++i) a[i] = kslot[i];
            rotate<acc_t>(a.data(), lc.data(), ls.data(), xk + h * D, D, acc_t(-1));
            for (int64_t i = 0; i < D; ++i) xv[h * D + i] = vslot[i];
          }
          const scalar_t* k_new = in + Hq * D + h * D;
          const scalar_t* v_new = in + (Hq + Hkv) * D + h * D;
          for (int64_t i = 0; i < D; ++i) a[i] = k_new[i];
          rotate<acc_t>(a.data(), cc.data(), ss.data(), rot.data(), D, acc_t(1));
          for (int64_t i = 0; i < D; ++i) {
            kslot[i] = static_cast<scalar_t>(rot[i]);
            vslot[i] = v_new[i];
          }
        }
      } else {
        for (int64_t i = 0; i < KV; ++i) {
          xk[i] = in[Hq * D + i];
          xv[i] = in[(Hq + Hkv) * D + i];
        }
      }
      if (enters[b]) {
        if (ak.numel()) {
          std::vector<acc_t> k0(xk, xk + KV);
          adapter_add<acc_t>(ak, bk, k0.data(), xk);
        }
        if (av.numel()) {
          std::vector<acc_t> v0(xv, xv + KV);
          adapter_add<acc_t>(av, bv, v0.data(), xv);
        }
      }
      acc_t* qs = qs_p + b * Hq * D;
      for (int64_t i = 0; i < Hq * D; ++i) qs[i] = in[i];
      if (aq.numel()) {
        const int64_t n = hidden.size(1);
        std::vector<acc_t> hb(n);
        const scalar_t* hp = hidden.data_ptr<scalar_t>() + b * n;
        for (int64_t i = 0; i < n; ++i) hb[i] = hp[i];
        adapter_add<acc_t>(aq, bq, hb.data(), qs);
      }
    }
  });

  // Phase 2: both gates of every entering row, (B, nG KV), from int8 codes or bfloat16 weights as pack_gate
  // made them (or the weights in their own dtype; a one-row GEMM through ATen measured 3x slower).
  std::vector<acc_t> g(B * n_gates * KV);
  const acc_t* g_p = g.data();
  if (int8_gate) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    if constexpr (std::is_same_v<acc_t, float>) {
      gate_gemv_int8(gate_w, gate_scale, gate_b, x_p, g.data(), B, 2 * KV);
    } else {
      TORCH_CHECK(false, "int8 gate weights need float32 states");
    }
#else
    TORCH_CHECK(false, "int8 gate weights need AVX512-VNNI");
#endif
  } else if (packed_gate) {
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<acc_t, float>) {
      gate_gemv_bf16(gate_w, gate_b, x_p, g.data(), B, n_gates * KV, 2 * KV);
    } else {
      TORCH_CHECK(false, "packed gate weights need float32 states");
    }
#else
    TORCH_CHECK(false, "packed gate weights need AVX512-BF16");
#endif
  } else if (gate_w.scalar_type() == at::kBFloat16) {
    gate_gemv<acc_t, c10::BFloat16>(gate_w, gate_b, x_p, enters, g.data(), B, n_gates * KV, 2 * KV);
  } else {
    TORCH_CHECK(gate_w.scalar_type() == states.scalar_type(), "gate weights must be bfloat16 or the states' dtype");
    gate_gemv<acc_t, acc_t>(gate_w, gate_b, x_p, enters, g.data(), B, n_gates * KV, 2 * KV);
  }

  // Phase 3, per (row, KV head, state): the state update and the group's reads, normalised and weighted.
  // NOTE(decisions): split by state (then phase 4 by query head) so that one sequence's three KV heads
  // balance over two threads (2 + 1 heads: one thread idle a third of the step; decode at 512 tokens
  // ~10 % faster a layer).
  at::Tensor o = at::empty({B, Hq * D}, qkv.options());
  scalar_t* o_p = o.data_ptr<scalar_t>();
  const acc_t* mix_p = mix.data_ptr<acc_t>();
  const acc_t* gain_p = gain.data_ptr<acc_t>();
  const bool out_gate = og_w.numel() > 0;
  std::vector<acc_t> parts(B * Hkv * 2 * G * D);  // (B, Hkv, state, G, D): each state's share of the output
  const TokenFn<acc_t> fast = token_fn<acc_t>(D, G);
  at::parallel_for(0, B * Hkv * 2, 1, [&](int64_t i0, int64_t i1) {
    const FlushDenormals ftz;
    std::vector<acc_t> decay(D), kst(D), cc(D), ss(D), lc(D), ls(D), qg(G * D), reads(G * D);
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t b = it / (2 * Hkv), h = it / 2 % Hkv, s = it % 2;
      acc_t* part = parts.data() + it * G * D;
      if (!enters[b]) {  // with a window: no token has left it yet, so the states hold none
        std::fill(part, part + G * D, acc_t(0));
        continue;
      }
      const acc_t* xk = x_p + b * 2 * KV + h * D;
      const acc_t* xv = x_p + b * 2 * KV + KV + h * D;
      if (rope) {
        for (int64_t i = 0; i < D; ++i) {  // the entering token's position: the leaving one's with a window
          cc[i] = c_p[b * D + i];
          ss[i] = s_p[b * D + i];
          lc[i] = has_window ? acc_t(lc_p[b * D + i]) : cc[i];
          ls[i] = has_window ? acc_t(ls_p[b * D + i]) : ss[i];
        }
        rotate<acc_t>(xk, lc.data(), ls.data(), kst.data(), D, acc_t(1));
      } else {
        std::copy(xk, xk + D, kst.begin());
      }
      for (int64_t gq = 0; gq < G; ++gq) {  // the group's queries, scaled (and rotated with rope)
        const acc_t* qsrc = qs_p + b * Hq * D + (h * G + gq) * D;
        acc_t* dst = qg.data() + gq * D;
        if (rope) {
          rotate<acc_t>(qsrc, cc.data(), ss.data(), dst, D, acc_t(1));
        } else {
          std::copy(qsrc, qsrc + D, dst);
        }
        for (int64_t i = 0; i < D; ++i) dst[i] *= acc_t(scale);
      }
      // One pass over the state, as a prefill token's: update each row (a token enters), then every
      // query of the group reads it while it is in registers.
      acc_t* Ss = st + ((slot_p[b] * 2 + s) * Hkv + h) * D * D;
      prefetch(Ss, D * D * sizeof(acc_t));  // the whole state, while the decays are made
      const acc_t* gs = g_p + b * n_gates * KV + std::min<int64_t>(s, n_gates - 1) * KV + h * D;
      decay_from_logits<acc_t, acc_t>(gs, decay.data(), D, acc_t(gate_normalizer), acc_t(gate_min));
      if (fast) {
        fast(Ss, decay.data(), kst.data(), xv, qg.data(), reads.data(), D);
      } else {
        scan_token_any(Ss, decay.data(), kst.data(), xv, qg.data(), reads.data(), D, D, G);
      }
      for (int64_t gq = 0; gq < G; ++gq) {
        const int64_t hq = h * G + gq;
        const acc_t* rd = reads.data() + gq * D;
        acc_t norm = 1;
        if (normalize) norm = acc_t(1) / std::sqrt(sum_squares(rd, D) / acc_t(D) + acc_t(eps));
        const acc_t w = mix_p[hq * n_mix + s] * norm;
        acc_t* out = part + gq * D;
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) out[j] = w * rd[j] * gain_p[hq * D + j];
      }
    }
  });

  // Phase 4, per (row, query head): both states' shares, the exact window, the output gate.
  at::parallel_for(0, B * Hq, 1, [&](int64_t i0, int64_t i1) {
    const FlushDenormals ftz;
    std::vector<acc_t> q_rot(D), read(D), win(D), scores(std::max<int64_t>(W, 1)), cc(D), ss(D), qv(D), out(D);
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t b = it / Hq, hq = it % Hq, h = hq / G, gq = hq % G, p = pos_p[b];
      const scalar_t* in = qkv_p + b * row;
      const bool has_state = enters[b];
      const acc_t* far = parts.data() + ((b * Hkv + h) * 2 * G + gq) * D;
      const acc_t* close = far + G * D;
      for (int64_t j = 0; j < D; ++j) out[j] = far[j] + close[j];
      if (has_window) {
        for (int64_t i = 0; i < D; ++i) {
          cc[i] = c_p[b * D + i];
          ss[i] = s_p[b * D + i];
          qv[i] = in[hq * D + i];
        }
        rotate<acc_t>(qv.data(), cc.data(), ss.data(), q_rot.data(), D, acc_t(1));
        const int64_t n_valid = std::min(p + 1, W), slot = slot_p[b];
        const scalar_t* keys = rk + (slot * Hkv + h) * W * D;
        const scalar_t* vals = rv + (slot * Hkv + h) * W * D;
        acc_t mx = -INFINITY;
        for (int64_t t = 0; t < n_valid; ++t) {
          scores[t] = dot_mixed(q_rot.data(), keys + t * D, D) * acc_t(window_scale);
          mx = std::max(mx, scores[t]);
        }
        const acc_t den = exp_shifted(scores.data(), n_valid, mx);
        std::fill(win.begin(), win.end(), acc_t(0));
        for (int64_t t = 0; t < n_valid; ++t) {
          const acc_t pt = scores[t] / den;
          const scalar_t* vt = vals + t * D;
#pragma omp simd
          for (int64_t j = 0; j < D; ++j) win[j] += pt * static_cast<acc_t>(vt[j]);
        }
        const acc_t w = has_state ? mix_p[hq * n_mix + 2] : acc_t(1);
        for (int64_t j = 0; j < D; ++j) out[j] += w * win[j];
      }
      if (out_gate) {  // 2 sigmoid(W_og q + b_og), from the un-rotated query
        const acc_t* wog_t = og_w.data_ptr<acc_t>();  // transposed: (in, out)
        const acc_t* bog = og_b.data_ptr<acc_t>() + hq * D;
        std::copy(bog, bog + D, read.begin());
        for (int64_t i = 0; i < D; ++i) {
          const acc_t qi = in[hq * D + i];
          const acc_t* w = wog_t + i * D;
#pragma omp simd
          for (int64_t j = 0; j < D; ++j) read[j] += w[j] * qi;
        }
        for (int64_t j = 0; j < D; ++j) out[j] *= acc_t(2) / (acc_t(1) + std::exp(-read[j]));
      }
      scalar_t* dst = o_p + b * Hq * D + hq * D;
      for (int64_t j = 0; j < D; ++j) dst[j] = static_cast<scalar_t>(out[j]);
    }
  });

  at::Tensor extra = at::empty({0}, qkv.options());
  if (ao.numel()) {  // o adapter: B (A o), on the mixed read-out as the output projection sees it
    const int64_t n = ao.size(1), n_out = bo.size(1);
    extra = at::empty({B, n_out}, qkv.options());
    scalar_t* e_p = extra.data_ptr<scalar_t>();
    std::vector<acc_t> ob(n), y(n_out);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < n; ++i) ob[i] = o_p[b * n + i];
      std::fill(y.begin(), y.end(), acc_t(0));
      adapter_add<acc_t>(ao, bo, ob.data(), y.data());
      for (int64_t i = 0; i < n_out; ++i) e_p[b * n_out + i] = static_cast<scalar_t>(y[i]);
    }
  }
  return {o, extra};
}

// ---- Prefill scan ----
//
// The chunked form (dsla_serve/ops/chunk.py) builds each chunk's decay-masked score matrix with ~30
// float32 tensor ops; on this CPU it lost to bfloat16 flash attention up to 8k tokens. The states are
// small (D x D per KV head), so the plain recurrence is cheaper here: each token updates every state
// row and the group's queries read the row while it is in registers, one pass over the state per
// token, states in L1. Phase 1 scans each (sequence, state, KV head) alone and stores the raw reads;
// phase 2 mixes them per token with the exact window.

template <typename T>
struct View4 {  // a 4-d tensor whose last axis is contiguous: element (a, b, c, :)
  const T* p;
  int64_t s0, s1, s2;
  explicit View4(const at::Tensor& t) : p(t.data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)) {}
  const T* at(int64_t a, int64_t b, int64_t c) const { return p + a * s0 + b * s1 + c * s2; }
};

template <typename scalar_t>
struct GateLogits {  // the gates' pre-activations (B, L, nG, Hkv, D), from which the scan makes the decays
  const scalar_t* p = nullptr;  // null: the log-decays come as tensors
  int64_t n_gates = 0, L = 0, Hkv = 0;
  double normalizer = 1, gate_min = 0;
  const scalar_t* at(int64_t b, int64_t e, int64_t s, int64_t h, int64_t D) const {
    return p + (((b * L + e) * n_gates + std::min(s, n_gates - 1)) * Hkv + h) * D;
  }
};

template <typename scalar_t, typename acc_t>
void scan_state(const View4<scalar_t>& q, const View4<scalar_t>& k, const View4<scalar_t>& v, const View4<acc_t>& g,
                const GateLogits<scalar_t>& logits, const scalar_t* cos, const scalar_t* sin, int64_t s, int64_t b,
                int64_t h, int64_t G, int64_t T, int64_t P, int64_t W, int64_t D, int64_t i0, int64_t i1,
                acc_t scale, acc_t* S, acc_t* reads /* token i, head g at reads + (i - i0) row_stride + g D */,
                int64_t row_stride) {
  // One state s of one KV head over the new tokens i0 <= i < i1 of T: the token P + i - W enters,
  // then query i reads.
  // Decays from the log-decays g or from the gates' pre-activations; cos/sin (B, L, D), when given,
  // rotate the states' keys and queries (RoPE inside DSLA) at their positions.
  const TokenFn<acc_t> fast = token_fn<acc_t>(D, G);
  const int64_t L = P + T;
  std::vector<acc_t> decay(D), kk(D), vv(D), qq(G * D), x(D), c(D), sn(D);
  auto row = [&](int64_t pos) {  // the rotary tables of position pos into c, sn
    for (int64_t r = 0; r < D; ++r) c[r] = cos[(b * L + pos) * D + r], sn[r] = sin[(b * L + pos) * D + r];
  };
  auto rope = [&](acc_t* t) {  // t rotated in place by the row loaded last
    std::copy(t, t + D, x.begin());
    rotate<acc_t>(x.data(), c.data(), sn.data(), t, D, acc_t(1));
  };
  for (int64_t i = std::max(i0, W - P); i < i1; ++i) {  // earlier queries: nothing has left the window
    const int64_t e = P + i - W;
    const scalar_t* kp = k.at(b, h, e);
    const scalar_t* vp = v.at(b, h, e);
    if (logits.p) {
      decay_from_logits<scalar_t, acc_t>(logits.at(b, e, s, h, D), decay.data(), D, acc_t(logits.normalizer),
                                         acc_t(logits.gate_min));
    } else {
      const acc_t* gp = g.at(b, h, e);
      std::copy(gp, gp + D, decay.begin());
      exp_shifted(decay.data(), D, acc_t(0));
    }
    for (int64_t r = 0; r < D; ++r) {
      kk[r] = kp[r];
      vv[r] = vp[r];
    }
    if (cos) row(e), rope(kk.data());
    if (cos) row(P + i);
    for (int64_t gq = 0; gq < G; ++gq) {
      const scalar_t* qp = q.at(b, h * G + gq, i);
      acc_t* qg = qq.data() + gq * D;
      for (int64_t r = 0; r < D; ++r) qg[r] = acc_t(qp[r]);
      if (cos) rope(qg);
      for (int64_t r = 0; r < D; ++r) qg[r] *= scale;
    }
    if (fast) {
      fast(S, decay.data(), kk.data(), vv.data(), qq.data(), reads + (i - i0) * row_stride, D);
    } else {
      scan_token_any(S, decay.data(), kk.data(), vv.data(), qq.data(), reads + (i - i0) * row_stride, D, D, G);
    }
  }
}

template <typename acc_t, int64_t DC>
inline void window_head(const acc_t* qq, const acc_t* kt, int64_t Lp, const acc_t* vt, int64_t n, acc_t w, acc_t* sc,
                        acc_t* out, int64_t D_rt) {
  // out += w softmax(q . keys) values for one query over its n window keys: kt (D, Lp) transposed keys
  // from the first one, vt (n, D). Independent accumulators hide the FMA latency; DC > 0 (the head
  // size known at compile time) keeps the output in registers.
  constexpr int64_t lanes = 64 / sizeof(acc_t);
  const int64_t D = DC > 0 ? DC : D_rt;
  for (int64_t tb = 0; tb < n; tb += lanes) {  // one register of scores; keys past the query: padding
    acc_t a[4][lanes] = {};
    int64_t d = 0;
    for (; d + 4 <= D; d += 4) {
      for (int64_t u = 0; u < 4; ++u) {
        const acc_t qd = qq[d + u];
        const acc_t* kd = kt + (d + u) * Lp + tb;
#pragma omp simd
        for (int64_t j = 0; j < lanes; ++j) a[u][j] += qd * kd[j];
      }
    }
    for (; d < D; ++d) {
#pragma omp simd
      for (int64_t j = 0; j < lanes; ++j) a[0][j] += qq[d] * kt[d * Lp + tb + j];
    }
#pragma omp simd
    for (int64_t j = 0; j < lanes; ++j) sc[tb + j] = (a[0][j] + a[1][j]) + (a[2][j] + a[3][j]);
  }
  acc_t mx = -INFINITY;
  for (int64_t t = 0; t < n; ++t) mx = std::max(mx, sc[t]);
  const acc_t scale = w / exp_shifted(sc, n, mx);
  if constexpr (DC > 0) {
    acc_t o[DC] = {};
    for (int64_t t = 0; t < n; ++t) {
      const acc_t pt = scale * sc[t];
#pragma omp simd
      for (int64_t j = 0; j < DC; ++j) o[j] += pt * vt[t * DC + j];
    }
#pragma omp simd
    for (int64_t j = 0; j < DC; ++j) out[j] += o[j];
  } else {
    for (int64_t t = 0; t < n; ++t) {
      const acc_t pt = scale * sc[t];
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) out[j] += pt * vt[t * D + j];
    }
  }
}

#if defined(__AVX512F__)
template <int G>
void window_group64(const float* qq, const float* kt, int64_t Lp, const float* vt, int64_t n, const float* w,
                    float* sc, int64_t sc_stride, float* out) {
  // window_head for the G query heads of one KV head at once (head_dim 64, float): each key row
  // loaded feeds G heads, each query broadcast feeds two blocks of 16 keys, and the G x 4 output
  // registers accumulate independently. qq (G, 64) scaled queries; sc (G, sc_stride) scores; out
  // (G, 64) +=. Reads keys up to 31 past the last one: kt's padding.
  for (int64_t tb = 0; tb < n; tb += 32) {
    __m512 a[G][2][2];
    for (int g = 0; g < G; ++g)
      for (int x = 0; x < 2; ++x) a[g][x][0] = a[g][x][1] = _mm512_setzero_ps();
    for (int64_t d = 0; d < 64; d += 2) {
      for (int u = 0; u < 2; ++u) {
        const float* kd = kt + (d + u) * Lp + tb;
        const __m512 k0 = _mm512_loadu_ps(kd), k1 = _mm512_loadu_ps(kd + 16);
        for (int g = 0; g < G; ++g) {
          const __m512 qb = _mm512_set1_ps(qq[g * 64 + d + u]);
          a[g][0][u] = _mm512_fmadd_ps(qb, k0, a[g][0][u]);
          a[g][1][u] = _mm512_fmadd_ps(qb, k1, a[g][1][u]);
        }
      }
    }
    for (int g = 0; g < G; ++g) {
      _mm512_storeu_ps(sc + g * sc_stride + tb, _mm512_add_ps(a[g][0][0], a[g][0][1]));
      _mm512_storeu_ps(sc + g * sc_stride + tb + 16, _mm512_add_ps(a[g][1][0], a[g][1][1]));
    }
  }
  float scale[G];
  for (int g = 0; g < G; ++g) {
    float* sg = sc + g * sc_stride;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < n; t += 16) {
      const __mmask16 m = n - t >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - t)) - 1);
      mx = _mm512_mask_max_ps(mx, m, mx, _mm512_loadu_ps(sg + t));
    }
    scale[g] = w[g] / exp_shifted(sg, n, _mm512_reduce_max_ps(mx));
  }
  __m512 o[G][4];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < 4; ++j) o[g][j] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    const float* vr = vt + t * 64;
    const __m512 v0 = _mm512_loadu_ps(vr), v1 = _mm512_loadu_ps(vr + 16), v2 = _mm512_loadu_ps(vr + 32),
                 v3 = _mm512_loadu_ps(vr + 48);
    for (int g = 0; g < G; ++g) {
      const __m512 p = _mm512_set1_ps(sc[g * sc_stride + t]);
      o[g][0] = _mm512_fmadd_ps(p, v0, o[g][0]);
      o[g][1] = _mm512_fmadd_ps(p, v1, o[g][1]);
      o[g][2] = _mm512_fmadd_ps(p, v2, o[g][2]);
      o[g][3] = _mm512_fmadd_ps(p, v3, o[g][3]);
    }
  }
  for (int g = 0; g < G; ++g) {
    const __m512 sg = _mm512_set1_ps(scale[g]);
    for (int j = 0; j < 4; ++j) {
      float* dst = out + g * 64 + j * 16;
      _mm512_storeu_ps(dst, _mm512_fmadd_ps(sg, o[g][j], _mm512_loadu_ps(dst)));
    }
  }
}

using WindowGroupFn = void (*)(const float*, const float*, int64_t, const float*, int64_t, const float*, float*,
                               int64_t, float*);
inline WindowGroupFn window_group_fn(int64_t D, int64_t G) {
  if (D != 64) return nullptr;
  switch (G) {
    case 1: return window_group64<1>;
    case 2: return window_group64<2>;
    case 3: return window_group64<3>;
    case 4: return window_group64<4>;
    default: return nullptr;
  }
}
#endif

// NOTE(decisions): the prefill scan runs its two phases by chunks of this many tokens, so the reads
// passed between them stay in L2 (256 tokens of one sequence: 1.2 MB at 9 heads of 64).
constexpr int64_t kScanChunk = 256;

template <typename scalar_t, typename acc_t>
std::vector<at::Tensor> scan_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g_far,
                                  const at::Tensor& g_close, const GateLogits<scalar_t>& logits, at::Tensor state,
                                  const at::Tensor& mix, const at::Tensor& gain, const at::Tensor& q_rot,
                                  const at::Tensor& k_rot, const at::Tensor& v_win, const at::Tensor& cos,
                                  const at::Tensor& sin, bool rope_states, const at::Tensor& og, const at::Tensor& og_b,
                                  int64_t W, double scale, double window_scale, bool normalize, double eps) {
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), L = k.size(2), G = Hq / Hkv, P = L - T, n_mix = mix.size(1);
  acc_t* st = state.data_ptr<acc_t>();
  const View4<scalar_t> qv(q), kv(k), vv(v);
  // with gate logits the log-decay views are unused (state stands in: any 4+-d tensor)
  const View4<acc_t> gv[2] = {View4<acc_t>(logits.p ? state : g_far), View4<acc_t>(logits.p ? state : g_close)};
  const bool rope = cos.numel() > 0;
  const scalar_t* cos_p = rope ? cos.data_ptr<scalar_t>() : nullptr;
  const scalar_t* sin_p = rope ? sin.data_ptr<scalar_t>() : nullptr;

  // The window's keys transposed, (B, Hkv, D, L + 2 lanes) (zero padding: whole registers of scores
  // are computed past the last key and ignored), and values, (B, Hkv, L, D), in acc_t: a query's
  // scores over its W keys are then vector FMAs along the keys, with no horizontal sums.
  // With cos/sin given the window's q and k arrive un-rotated and RoPE is applied here.
  constexpr int64_t lanes = 64 / sizeof(acc_t);
  const int64_t Lp = L + 2 * lanes;
  at::Tensor keys_t, vals;
  if (W) {
    keys_t = at::zeros({B, Hkv, D, Lp}, state.options());
    acc_t* kt = keys_t.data_ptr<acc_t>();
    const View4<scalar_t> kw(k_rot);
    at::parallel_for(0, B * Hkv, 1, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> a(D), c(D), sn(D), r(D);
      for (int64_t bh = t0; bh < t1; ++bh) {
        const int64_t b = bh / Hkv, h = bh % Hkv;
        acc_t* dst = kt + bh * D * Lp;
        for (int64_t t = 0; t < L; ++t) {
          const scalar_t* kp = kw.at(b, h, t);
          for (int64_t d = 0; d < D; ++d) a[d] = kp[d];
          if (rope) {
            for (int64_t d = 0; d < D; ++d) c[d] = cos_p[(b * L + t) * D + d], sn[d] = sin_p[(b * L + t) * D + d];
            rotate<acc_t>(a.data(), c.data(), sn.data(), r.data(), D, acc_t(1));
            std::swap(a, r);
          }
          for (int64_t d = 0; d < D; ++d) dst[d * Lp + t] = a[d];
        }
      }
    });
    vals = v_win.to(state.scalar_type()).contiguous();
  }
  const acc_t* kt_p = W ? keys_t.data_ptr<acc_t>() : nullptr;
  const acc_t* v_p = W ? vals.data_ptr<acc_t>() : nullptr;

  // By chunks of kScanChunk tokens: phase 1 runs both states of every KV head over the chunk (their
  // reads of a token together, (B, chunk, 2, Hq, D), so phase 2 finds one block per token; rows of
  // queries that read no state stay unwritten and unread), then phase 2, per token of the chunk: the
  // window of every KV head's query group, then per query head the RMS norm and gain of each state's
  // read, the mixing and the output gate. The reads stay in L2 between the phases.
  const int64_t CH = std::min(T, std::max<int64_t>(16, kScanChunk / B));  // the reads of B sequences
  at::Tensor reads = at::empty({B, CH, 2, Hq, D}, state.options());
  acc_t* reads_p = reads.data_ptr<acc_t>();
  at::Tensor o = at::empty({B, T, Hq, D}, q.options());
  scalar_t* o_p = o.data_ptr<scalar_t>();
  const acc_t* mix_p = mix.data_ptr<acc_t>();
  const acc_t* gain_p = gain.numel() ? gain.data_ptr<acc_t>() : nullptr;
  const View4<scalar_t> qr(W ? q_rot : q);
  const bool gated = og.numel() > 0;  // output gate: out *= 2 sigmoid(og + og_b)
  const View4<scalar_t> ogv(gated ? og : q);
  const acc_t* ogb_p = gated ? og_b.data_ptr<acc_t>() : nullptr;
#if defined(__AVX512F__)
  WindowGroupFn group_fn = nullptr;
  if constexpr (std::is_same_v<acc_t, float>) group_fn = window_group_fn(D, G);
#endif
  const int64_t sc_stride = W + 2 * lanes;
  for (int64_t c0 = 0; c0 < T; c0 += CH) {
  const int64_t n_c = std::min(T, c0 + CH) - c0;
  at::parallel_for(0, 2 * B * Hkv, 1, [&](int64_t t0, int64_t t1) {
    const FlushDenormals ftz;
    for (int64_t task = t0; task < t1; ++task) {  // (state, sequence, KV head), the states' layout
      const int64_t s = task / (B * Hkv), b = (task / Hkv) % B, h = task % Hkv;
      acc_t* rd = reads_p + ((b * CH * 2 + s) * Hq + h * G) * D;
      scan_state<scalar_t, acc_t>(qv, kv, vv, gv[s], logits, rope_states ? cos_p : nullptr,
                                  rope_states ? sin_p : nullptr, s, b, h, G, T, P, W, D, c0, c0 + n_c, acc_t(scale),
                                  st + task * D * D, rd, 2 * Hq * D);
    }
  });
  at::parallel_for(0, B * n_c, 16, [&](int64_t t0, int64_t t1) {
    const FlushDenormals ftz;
    std::vector<acc_t> outs(Hq * D), qq(Hq * D), qa(D), c(D), sn(D), e(D), w(G), scores(G * sc_stride);
    for (int64_t it = t0; it < t1; ++it) {
      const int64_t b = it / n_c, i = c0 + it % n_c;
      // NOTE(decisions): with this prefetch and sum_squares the scan at 1024 tokens took 2.66 instead of
      // 2.86 ms a layer (3 alternating runs); a whole prefill moved within its noise.
      if (it + 1 < t1) {  // the next token's reads (half written by the other worker: not in this core's caches)
        prefetch(reads_p + ((it + 1) / n_c * CH + (it + 1) % n_c) * 2 * Hq * D, 2 * Hq * D * sizeof(acc_t));
      }
      const bool has_state = P + i - W >= 0;
      std::fill(outs.begin(), outs.end(), acc_t(0));
      if (W) {  // softmax over the n keys last - n + 1 .. last, last = P + i: the query's own among them
        if (rope) {  // the query's position P + i: one rotary row for all its heads
          const int64_t row = (b * L + P + i) * D;
          for (int64_t j = 0; j < D; ++j) c[j] = cos_p[row + j], sn[j] = sin_p[row + j];
        }
        const acc_t ws = acc_t(window_scale);
        for (int64_t hq = 0; hq < Hq; ++hq) {
          const scalar_t* qp = qr.at(b, hq, i);
#pragma omp simd
          for (int64_t j = 0; j < D; ++j) qa[j] = acc_t(qp[j]) * ws;
          if (rope) {
            rotate<acc_t>(qa.data(), c.data(), sn.data(), qq.data() + hq * D, D, acc_t(1));
          } else {
            std::copy(qa.begin(), qa.end(), qq.begin() + hq * D);
          }
        }
        const int64_t last = P + i, lo = std::max<int64_t>(0, last - W + 1), n = last - lo + 1;
        for (int64_t h = 0; h < Hkv; ++h) {
          for (int64_t g = 0; g < G; ++g) w[g] = has_state ? mix_p[(h * G + g) * n_mix + 2] : acc_t(1);
          const acc_t* kt = kt_p + (b * Hkv + h) * D * Lp + lo;
          const acc_t* vt = v_p + ((b * Hkv + h) * L + lo) * D;
          acc_t* out = outs.data() + h * G * D;
#if defined(__AVX512F__)
          if constexpr (std::is_same_v<acc_t, float>) {
            if (group_fn) {
              group_fn(qq.data() + h * G * D, kt, Lp, vt, n, w.data(), scores.data(), sc_stride, out);
              continue;
            }
          }
#endif
          for (int64_t g = 0; g < G; ++g) {
            const acc_t* qh = qq.data() + (h * G + g) * D;
            acc_t* oh = out + g * D;
            if (D == 64) {
              window_head<acc_t, 64>(qh, kt, Lp, vt, n, w[g], scores.data(), oh, D);
            } else if (D == 128) {
              window_head<acc_t, 128>(qh, kt, Lp, vt, n, w[g], scores.data(), oh, D);
            } else {
              window_head<acc_t, 0>(qh, kt, Lp, vt, n, w[g], scores.data(), oh, D);
            }
          }
        }
      }
      for (int64_t hq = 0; hq < Hq; ++hq) {
        acc_t* out = outs.data() + hq * D;
        for (int64_t s = 0; s < 2 && has_state; ++s) {
          const acc_t* rd = reads_p + (((b * CH + i - c0) * 2 + s) * Hq + hq) * D;
          acc_t norm = 1;
          if (normalize) norm = acc_t(1) / std::sqrt(sum_squares(rd, D) / acc_t(D) + acc_t(eps));
          const acc_t ws = mix_p[hq * n_mix + s] * norm;
#pragma omp simd
          for (int64_t j = 0; j < D; ++j) out[j] += ws * rd[j] * (gain_p ? gain_p[hq * D + j] : acc_t(1));
        }
        if (gated) {  // 2 sigmoid(x) from exp(-|x|) (arguments <= 0, as exp_shifted takes them)
          const scalar_t* gp = ogv.at(b, hq, i);
          const acc_t* gb = ogb_p + hq * D;
#pragma omp simd
          for (int64_t j = 0; j < D; ++j) qa[j] = acc_t(gp[j]) + gb[j], e[j] = -std::abs(qa[j]);
          exp_shifted(e.data(), D, acc_t(0));
#pragma omp simd
          for (int64_t j = 0; j < D; ++j) out[j] *= acc_t(2) * (qa[j] >= 0 ? acc_t(1) : e[j]) / (acc_t(1) + e[j]);
        }
        scalar_t* dst = o_p + ((b * T + i) * Hq + hq) * D;
        int64_t j = 0;
#if defined(__AVX512F__)
        if constexpr (std::is_same_v<acc_t, float>) {
          for (; j + 16 <= D; j += 16) store16(dst + j, round16(dst, _mm512_loadu_ps(out + j)));
        }
#endif
        for (; j < D; ++j) dst[j] = static_cast<scalar_t>(out[j]);
      }
    }
  });
  }
  return {o, state};
}

// ---- Attention decode ----
//
// One decode token of an attention layer for a batch of sequences, each with its own preallocated KV
// cache: rotate q and k, append k and v in place, attend. Done with ATen it is ~20 small ops and one
// SDPA per sequence per layer, and at batch 1 a 135M model is bound by that overhead. Keys are split
// into chunks scored in parallel (flash decoding) so that one long sequence still uses every core;
// the group's G query heads share each key and value load.

constexpr int64_t kAttnChunk = 256;
// NOTE(decisions): bfloat16/float keys and values are read 16 lanes at a time (and prefetched); converted
// one element at a time into a buffer first, a layer at 8192 tokens read its 3 MB of KV at ~4.4 GB/s.
template <typename scalar_t>
constexpr bool kVectorKV = !std::is_same_v<scalar_t, double>;

template <typename scalar_t, typename acc_t>
at::Tensor attention_impl(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                          const std::vector<at::Tensor>& keys, const std::vector<at::Tensor>& values,
                          const std::vector<int64_t>& lengths, int64_t Hq, int64_t Hkv, int64_t D, double scale) {
  const int64_t B = qkv.size(0), G = Hq / Hkv, row = qkv.size(1);
  const scalar_t* qkv_p = qkv.data_ptr<scalar_t>();
  const scalar_t *c_p = cos.data_ptr<scalar_t>(), *s_p = sin.data_ptr<scalar_t>();
  // Append the new key (rotated) and value of every (row, KV head).
  for (int64_t b = 0; b < B; ++b) {
    std::vector<acc_t> a(D), rot(D), cc(D), ss(D);
    for (int64_t i = 0; i < D; ++i) cc[i] = c_p[b * D + i], ss[i] = s_p[b * D + i];
    for (int64_t h = 0; h < Hkv; ++h) {
      const scalar_t* k_new = qkv_p + b * row + (Hq + h) * D;
      const scalar_t* v_new = qkv_p + b * row + (Hq + Hkv + h) * D;
      scalar_t* kd = keys[b].data_ptr<scalar_t>() + h * keys[b].stride(0) + lengths[b] * D;
      scalar_t* vd = values[b].data_ptr<scalar_t>() + h * values[b].stride(0) + lengths[b] * D;
      for (int64_t i = 0; i < D; ++i) a[i] = k_new[i];
      rotate<acc_t>(a.data(), cc.data(), ss.data(), rot.data(), D, acc_t(1));
      for (int64_t i = 0; i < D; ++i) kd[i] = static_cast<scalar_t>(rot[i]), vd[i] = v_new[i];
    }
  }
  int64_t n_chunks = 1;
  for (int64_t b = 0; b < B; ++b) n_chunks = std::max(n_chunks, (lengths[b] + kAttnChunk) / kAttnChunk);
  // Per (row, KV head, chunk) and query of the group: running max, sum of weights, weighted values.
  const int64_t items = B * Hkv * n_chunks;
  std::vector<acc_t> part_max(items * G, -INFINITY), part_sum(items * G, 0), part_out(items * G * D, 0);
  at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
    const FlushDenormals ftz;
    std::vector<acc_t> qg(G * D), a(D), cc(D), ss(D), scores(G * kAttnChunk);
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t b = it / (Hkv * n_chunks), h = (it / n_chunks) % Hkv, c = it % n_chunks;
      const int64_t L = lengths[b] + 1, t0 = c * kAttnChunk, t1 = std::min(L, t0 + kAttnChunk);
      if (t0 >= t1) continue;
      for (int64_t i = 0; i < D; ++i) cc[i] = c_p[b * D + i], ss[i] = s_p[b * D + i];
      for (int64_t g = 0; g < G; ++g) {
        const scalar_t* q = qkv_p + b * row + (h * G + g) * D;
        for (int64_t i = 0; i < D; ++i) a[i] = acc_t(q[i]) * acc_t(scale);
        rotate<acc_t>(a.data(), cc.data(), ss.data(), qg.data() + g * D, D, acc_t(1));
      }
      const scalar_t* kp = keys[b].data_ptr<scalar_t>() + h * keys[b].stride(0);
      const scalar_t* vp = values[b].data_ptr<scalar_t>() + h * values[b].stride(0);
      const int64_t n = t1 - t0;
      const bool lanes = kVectorKV<scalar_t> && D % 16 == 0;
      for (int64_t t = 0; t < n; ++t) {
        const scalar_t* kt = kp + (t0 + t) * D;
#if defined(__AVX512F__)
        if constexpr (kVectorKV<scalar_t>) {
          if (lanes) {
            prefetch_ahead(kt, D * sizeof(scalar_t));
            for (int64_t g = 0; g < G; ++g) {
              __m512 sum = _mm512_setzero_ps();
              for (int64_t j = 0; j < D; j += 16) sum = _mm512_fmadd_ps(_mm512_loadu_ps(&qg[g * D + j]), load16(kt + j), sum);
              scores[g * kAttnChunk + t] = _mm512_reduce_add_ps(sum);
            }
            continue;
          }
        }
#endif
        std::copy(kt, kt + D, a.begin());
        for (int64_t g = 0; g < G; ++g) scores[g * kAttnChunk + t] = dot(qg.data() + g * D, a.data(), D);
      }
      for (int64_t g = 0; g < G; ++g) {
        acc_t* sc = scores.data() + g * kAttnChunk;
        const acc_t mx = *std::max_element(sc, sc + n);
        part_max[it * G + g] = mx;
        part_sum[it * G + g] = exp_shifted(sc, n, mx);
      }
      acc_t* out = part_out.data() + it * G * D;
      for (int64_t t = 0; t < n; ++t) {
        const scalar_t* vt = vp + (t0 + t) * D;
#if defined(__AVX512F__)
        if constexpr (kVectorKV<scalar_t>) {
          if (lanes) {
            prefetch_ahead(vt, D * sizeof(scalar_t));
            for (int64_t j = 0; j < D; j += 16) {
              const __m512 vj = load16(vt + j);
              for (int64_t g = 0; g < G; ++g) {
                float* o = out + g * D + j;
                _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_set1_ps(scores[g * kAttnChunk + t]), vj, _mm512_loadu_ps(o)));
              }
            }
            continue;
          }
        }
#endif
        std::copy(vt, vt + D, a.begin());
        for (int64_t g = 0; g < G; ++g) {
          const acc_t w = scores[g * kAttnChunk + t];
          acc_t* o = out + g * D;
#pragma omp simd
          for (int64_t j = 0; j < D; ++j) o[j] += w * a[j];
        }
      }
    }
  });
  // Merge the chunks of every (row, query head).
  at::Tensor o = at::empty({B, Hq * D}, qkv.options());
  scalar_t* o_p = o.data_ptr<scalar_t>();
  std::vector<acc_t> acc(D);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < Hkv; ++h) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t first = (b * Hkv + h) * n_chunks;
        acc_t mx = -INFINITY, den = 0;
        for (int64_t c = 0; c < n_chunks; ++c) mx = std::max(mx, part_max[(first + c) * G + g]);
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t c = 0; c < n_chunks; ++c) {
          const int64_t it = first + c;
          if (part_sum[it * G + g] == 0) continue;
          const acc_t w = std::exp(part_max[it * G + g] - mx);
          den += w * part_sum[it * G + g];
          const acc_t* po = part_out.data() + (it * G + g) * D;
          for (int64_t j = 0; j < D; ++j) acc[j] += w * po[j];
        }
        scalar_t* dst = o_p + b * Hq * D + (h * G + g) * D;
        for (int64_t j = 0; j < D; ++j) dst[j] = static_cast<scalar_t>(acc[j] / den);
      }
    }
  }
  return o;
}

// ---- int4 weight-only GEMV ----
//
// Decode multiplies a few rows of activations by every int4 weight matrix. ATen's CPU int4 kernel
// de-quantises each weight to float before its FMA, and measured compute-bound here (slower than its
// own int8 kernel, which reads twice the bytes). This one multiplies integers: the activations are
// quantised to int8 per group of 32 inputs (as llama.cpp does), and AVX512-VNNI's dpbusd takes 64
// unsigned 4-bit codes times 64 int8 activations per instruction. Weights are packed for it: 16
// output rows per vector, one int32 lane per row, four consecutive inputs per lane.
//
// Layout (see dsla_serve/model/quant.py, pack_int4_vnni):
//   packed  (out/16, in/32, 4, 64) uint8   block (rows rb*16.., group g, pair p): byte r*4+k holds the
//           code of row r, input g*32 + 8p + k in its low nibble and input g*32 + 8p + 4 + k in its high
//   scale   (out/16, in/32, 16) bfloat16   per row and group: w = code * scale + offset
//   offset  (out/16, in/32, 16) float32
// y[o] = sum_g scale[o,g] dx[g] sum_i code[o,i] xq[i] + offset[o,g] sum_i x[i], with x[i] ~ dx[g] xq[i].

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool kInt4Gemv = true;

struct RowCodes {
  // Rows of activations (M, in) as int8 codes per group of 32 inputs: x ~ d[0] q[0], and with the
  // residual pass x ~ d[0] q[0] + d[1] q[1] (the codes of what the first pass missed: error / 254).
  // Also each group's exact sum (int4's offsets) and each pass's code sum (int8's offset of 128).
  int64_t in = 0, n_groups = 0, passes = 1;
  std::vector<int8_t> q[2];
  std::vector<float> d[2], xsum;
  std::vector<int32_t> qsum[2];
  const int32_t* codes(int64_t pass, int64_t m, int64_t g) const {
    return reinterpret_cast<const int32_t*>(q[pass].data() + m * in + g * 32);
  }
};

template <typename scalar_t>
inline void load_group(const scalar_t* x, __m512 v[2]) {  // 32 activations as float
  if constexpr (std::is_same_v<scalar_t, double>) {
    for (int64_t h = 0; h < 2; ++h) {  // two 8-lane conversions joined (AVX512F only)
      const __m256 lo = _mm512_cvtpd_ps(_mm512_loadu_pd(x + 16 * h));
      const __m256 hi = _mm512_cvtpd_ps(_mm512_loadu_pd(x + 16 * h + 8));
      v[h] = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1));
    }
  } else {
    v[0] = load16(x), v[1] = load16(x + 16);
  }
}

template <typename scalar_t>
RowCodes quantize_rows(const scalar_t* x, int64_t M, int64_t in, bool residual) {
  // 16 lanes at a time (one element at a time: 8 rows x 1536 inputs took ~35 us, now ~5); codes round to
  // nearest even (as lrintf), a group's sum in tree order. A group whose scale would not be a normal float
  // (|x| < ~1e-36) codes as zeros.
  RowCodes c;
  c.in = in, c.n_groups = in / 32, c.passes = residual ? 2 : 1;
  c.xsum.resize(M * c.n_groups);
  for (int64_t p = 0; p < c.passes; ++p) {
    c.q[p].resize(M * in), c.d[p].resize(M * c.n_groups), c.qsum[p].resize(M * c.n_groups);
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < c.n_groups; ++g) {
      __m512 v[2];
      load_group(x + m * in + g * 32, v);
      c.xsum[m * c.n_groups + g] = _mm512_reduce_add_ps(_mm512_add_ps(v[0], v[1]));
      for (int64_t p = 0; p < c.passes; ++p) {  // pass 1 codes what pass 0 left in v
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
        const float d = amax / 127.0f, inv = d >= std::numeric_limits<float>::min() ? 1.0f / d : 0.0f;
        int8_t* q = c.q[p].data() + m * in + g * 32;
        __m512i qs = _mm512_setzero_si512();
        for (int64_t h = 0; h < 2; ++h) {
          const __m512i qh = _mm512_cvtps_epi32(_mm512_mul_ps(v[h], _mm512_set1_ps(inv)));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16 * h), _mm512_cvtsepi32_epi8(qh));
          qs = _mm512_add_epi32(qs, qh);
          v[h] = _mm512_fnmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(qh), v[h]);
        }
        c.d[p][m * c.n_groups + g] = d;
        c.qsum[p][m * c.n_groups + g] = _mm512_reduce_add_epi32(qs);
      }
    }
  }
  return c;
}

inline __m512i dot_group(const __m512i* w, const int32_t* xq, __m512i dot) {
  // dot + the 16 lanes' dpbusd over one group: 8 weight vectors (4 inputs a lane) times 32 int8 codes,
  // in two chains (one chain's latency bound a row: 3072 x 576 at 8 rows 63 -> 55 us in cache)
  __m512i odd = _mm512_setzero_si512();
  for (int64_t q = 0; q < 8; q += 2) {
    dot = _mm512_dpbusd_epi32(dot, w[q], _mm512_set1_epi32(xq[q]));
    odd = _mm512_dpbusd_epi32(odd, w[q + 1], _mm512_set1_epi32(xq[q + 1]));
  }
  return _mm512_add_epi32(dot, odd);
}

template <typename scalar_t>
inline void store_lanes(scalar_t* dst, __m512 v) {  // 16 float lanes into 16 outputs of any dtype
  alignas(64) float out[16];
  _mm512_store_ps(out, v);
  for (int64_t r = 0; r < 16; ++r) dst[r] = static_cast<scalar_t>(out[r]);
}

template <typename scalar_t, bool residual>
at::Tensor int4_gemv_impl(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                          const at::Tensor& offset) {
  const int64_t M = x.size(0), in = x.size(1), n_groups = in / 32, n_blocks = packed.size(0);
  const RowCodes c = quantize_rows(x.data_ptr<scalar_t>(), M, in, residual);
  at::Tensor y = at::empty({M, n_blocks * 16}, x.options());
  scalar_t* y_p = y.data_ptr<scalar_t>();
  const uint8_t* w_p = packed.data_ptr<uint8_t>();
  const c10::BFloat16* s_p = scale.data_ptr<c10::BFloat16>();
  const float* c_p = offset.data_ptr<float>();
  at::parallel_for(0, n_blocks, 4, [&](int64_t b0, int64_t b1) {
    std::vector<__m512> acc(M);
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    for (int64_t rb = b0; rb < b1; ++rb) {
      for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
      for (int64_t g = 0; g < n_groups; ++g) {
        const uint8_t* wg = w_p + (rb * n_groups + g) * 256;
        prefetch_ahead(wg, 256);
        __m512i codes[8];
        for (int64_t p = 0; p < 4; ++p) {
          const __m512i v = _mm512_loadu_si512(wg + p * 64);
          codes[2 * p] = _mm512_and_si512(v, nibble);
          codes[2 * p + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
        }
        const int64_t sg = (rb * n_groups + g) * 16;
        const __m512 ws = load16(s_p + sg);
        const __m512 wc = _mm512_loadu_ps(c_p + sg);
        for (int64_t m = 0; m < M; ++m) {
          const int64_t mg = m * n_groups + g;
          for (int64_t p = 0; p < (residual ? 2 : 1); ++p) {
            const __m512i dot = dot_group(codes, c.codes(p, m, g), _mm512_setzero_si512());
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(ws, _mm512_set1_ps(c.d[p][mg])), acc[m]);
          }
          acc[m] = _mm512_fmadd_ps(wc, _mm512_set1_ps(c.xsum[mg]), acc[m]);
        }
      }
      for (int64_t m = 0; m < M; ++m) store_lanes(y_p + m * n_blocks * 16 + rb * 16, acc[m]);
    }
  });
  return y;
}

// ---- int8 weight-only GEMV ----
//
// The int8 weights (the lm_head of the int4 mode, every linear of the int8 mode) by the same scheme:
// ATen's int8 kernel (``_weight_int8pack_mm``) takes time in proportion to the rows (8 rows of the
// lm_head: 4.9 ms vs 2.0 for one), reading the weights again for each; here a block of weights is
// loaded once for all rows. Activations as above (int8 per group of 32); the weights are the unsigned
// operand of dpbusd, offset by 128, so sum_i (w_i + 128) xq_i - 128 sum_i xq_i = sum_i w_i xq_i.
//
// Layout (see dsla_serve/model/quant.py, pack_int8_vnni):
//   packed  (out/16, in/4, 64) uint8   block (rows rb*16.., input quad j): byte r*4+k holds
//           w[rb*16 + r, 4j + k] + 128
//   scale   (out,) bfloat16            per row: w = code * scale
// y[o] = scale[o] sum_g dx[g] sum_i code[o,i] xq[i].

template <bool residual, typename Store>
void int8_rows(const RowCodes& c, int64_t M, const at::Tensor& packed, const at::Tensor& scale, Store store) {
  // x W^T for the M rows coded in c: store(m, rb, y) takes outputs rb*16.. of row m (16 float lanes)
  const int64_t in = c.in, n_groups = c.n_groups, n_blocks = packed.size(0);
  const uint8_t* w_p = packed.data_ptr<uint8_t>();
  const c10::BFloat16* s_p = scale.data_ptr<c10::BFloat16>();
  at::parallel_for(0, n_blocks, 4, [&](int64_t b0, int64_t b1) {
    std::vector<__m512> acc(M);
    for (int64_t rb = b0; rb < b1; ++rb) {
      for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
      const uint8_t* wb = w_p + rb * (in / 4) * 64;
      for (int64_t g = 0; g < n_groups; ++g) {
        __m512i w[8];
        prefetch_ahead(wb + g * 512, 512);
        for (int64_t q = 0; q < 8; ++q) w[q] = _mm512_loadu_si512(wb + (g * 8 + q) * 64);
        for (int64_t m = 0; m < M; ++m) {
          for (int64_t p = 0; p < (residual ? 2 : 1); ++p) {  // the weights' offset of 128 adds 128 x the codes' sum
            const int64_t mg = m * n_groups + g;
            const __m512i dot = dot_group(w, c.codes(p, m, g), _mm512_set1_epi32(-128 * c.qsum[p][mg]));
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(c.d[p][mg]), acc[m]);
          }
        }
      }
      const __m512 ws = load16(s_p + rb * 16);
      for (int64_t m = 0; m < M; ++m) store(m, rb, _mm512_mul_ps(acc[m], ws));
    }
  });
}

template <typename scalar_t, bool residual>
at::Tensor int8_gemv_impl(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale) {
  const int64_t M = x.size(0), n_out = packed.size(0) * 16;
  const RowCodes c = quantize_rows(x.data_ptr<scalar_t>(), M, x.size(1), residual);
  at::Tensor y = at::empty({M, n_out}, x.options());
  scalar_t* y_p = y.data_ptr<scalar_t>();
  int8_rows<residual>(c, M, packed, scale, [&](int64_t m, int64_t rb, __m512 v) { store_lanes(y_p + m * n_out + rb * 16, v); });
  return y;
}

void gate_gemv_int8(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& bias, const float* x, float* g,
                    int64_t B, int64_t n_in) {
  // The decode step's gates, g (B, n_out) = x W^T + bias, with W as pack_gate_int8 made it; the rows coded
  // with the residual pass (int8 codes of what the first pass missed)
  const int64_t n_out = packed.size(0) * 16;
  const RowCodes c = quantize_rows(x, B, n_in, true);
  const c10::BFloat16* b_p = bias.data_ptr<c10::BFloat16>();
  int8_rows<true>(c, B, packed, scale, [&](int64_t m, int64_t rb, __m512 v) {
    _mm512_storeu_ps(g + m * n_out + rb * 16, _mm512_add_ps(v, load16(b_p + rb * 16)));
  });
}
#else
constexpr bool kInt4Gemv = false;
#endif

// ---- RMS norm and the gated MLP's activation ----
//
// Around the kernels above, a layer's token runs a Llama RMSNorm twice (four ATen ops each: float32
// copy, norm, copy back, weight) and silu(gate) * up (two ops, each a pass over the rows): at batch 1
// that is ~10 dispatches per layer, in prefill ~6 passes over (T, hidden) per norm. One pass each here,
// rounding where those ops round (the norm to the input's dtype before the weight, silu before the product).

template <typename scalar_t>
at::Tensor rms_norm_impl(const at::Tensor& x, const at::Tensor& weight, double eps) {
  // Statistics and normalisation in float whatever the dtype (Llama's RMSNorm casts to float32, a
  // float64 model included), the weight product in the input's dtype.
  using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t n = x.size(-1), rows = x.numel() / n;
  at::Tensor y = at::empty_like(x);
  const scalar_t *x_p = x.data_ptr<scalar_t>(), *w_p = weight.data_ptr<scalar_t>();
  scalar_t* y_p = y.data_ptr<scalar_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* xr = x_p + r * n;
      scalar_t* yr = y_p + r * n;
      float ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < n; ++i) ss += float(xr[i]) * float(xr[i]);
      const float inv = 1.0f / std::sqrt(ss / float(n) + float(eps));
      int64_t i0 = 0;
#if defined(__AVX512F__)
      if constexpr (!std::is_same_v<scalar_t, double>) {  // the same roundings 16 lanes at a time: converting
        for (; i0 + 16 <= n; i0 += 16) {                   // one element at a time cost ~1 ns an element
          const __m512 normed = round16(xr, _mm512_mul_ps(load16(xr + i0), _mm512_set1_ps(inv)));
          store16(yr + i0, round16(xr, _mm512_mul_ps(load16(w_p + i0), normed)));
        }
      }
#endif
#pragma omp simd
      for (int64_t i = i0; i < n; ++i) {
        yr[i] = static_cast<scalar_t>(out_t(w_p[i]) * out_t(static_cast<scalar_t>(float(xr[i]) * inv)));
      }
    }
  });
  return y;
}


template <typename scalar_t>
at::Tensor silu_mul_impl(const at::Tensor& gate_up) {
  // (..., 2 I) [gate | up] -> (..., I) silu(gate) * up, silu rounded to the dtype before the product
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t I = gate_up.size(-1) / 2, rows = gate_up.numel() / (2 * I);
  std::vector<int64_t> shape(gate_up.sizes().begin(), gate_up.sizes().end());
  shape.back() = I;
  at::Tensor y = at::empty(shape, gate_up.options());
  const scalar_t* g_p = gate_up.data_ptr<scalar_t>();
  scalar_t* y_p = y.data_ptr<scalar_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / I), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t *g = g_p + r * 2 * I, *u = g + I;
      scalar_t* yr = y_p + r * I;
      int64_t i = 0;
#if defined(__AVX512F__)
      if constexpr (!std::is_same_v<scalar_t, double>) {  // sigmoid(g) = g >= 0 ? 1 / (1 + e) : e / (1 + e), e = exp(-|g|)
        const __m512 one = _mm512_set1_ps(1.0f);
        for (; i + 16 <= I; i += 16) {
          const __m512 gv = load16(g + i);
          const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(gv)));
          const __m512 num = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(gv, _mm512_setzero_ps(), _CMP_GE_OQ), e, one);
          const __m512 act = round16(g, _mm512_mul_ps(gv, _mm512_div_ps(num, _mm512_add_ps(one, e))));
          store16(yr + i, round16(g, _mm512_mul_ps(act, load16(u + i))));
        }
      }
#endif
      for (; i < I; ++i) {
        const scalar_t act = static_cast<scalar_t>(acc_t(g[i]) / (acc_t(1) + std::exp(-acc_t(g[i]))));
        yr[i] = static_cast<scalar_t>(acc_t(act) * acc_t(u[i]));
      }
    }
  });
  return y;
}

template <typename scalar_t>
at::Tensor rope_impl(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  // Llama's rotary embedding of x (B, H, T, D) (last axis contiguous) with cos/sin (B, T, D): out (B, H,
  // T, D) contiguous, computed in float (double for float64) and rounded once.
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), half = D / 2;
  at::Tensor out = at::empty({B, H, T, D}, x.options());
  const View4<scalar_t> xv(x);
  const scalar_t *c_p = cos.data_ptr<scalar_t>(), *s_p = sin.data_ptr<scalar_t>();
  scalar_t* o_p = out.data_ptr<scalar_t>();
  at::parallel_for(0, B * H * T, 64, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> a(D), c(D), sn(D), o(D);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / (H * T), h = (r / T) % H, t = r % T;
      const scalar_t* xp = xv.at(b, h, t);
      const scalar_t *cp = c_p + (b * T + t) * D, *sp = s_p + (b * T + t) * D;
      scalar_t* op = o_p + r * D;
#if defined(__AVX512F__)
      if constexpr (!std::is_same_v<scalar_t, double>) {
        if (half % 16 == 0) {
          for (int64_t i = 0; i < half; i += 16) {
            const __m512 x1 = load16(xp + i), x2 = load16(xp + half + i);
            const __m512 o1 = _mm512_fnmadd_ps(x2, load16(sp + i), _mm512_mul_ps(x1, load16(cp + i)));
            const __m512 o2 = _mm512_fmadd_ps(x1, load16(sp + half + i), _mm512_mul_ps(x2, load16(cp + half + i)));
            store16(op + i, round16(op, o1));
            store16(op + half + i, round16(op, o2));
          }
          continue;
        }
      }
#endif
      for (int64_t i = 0; i < D; ++i) a[i] = xp[i], c[i] = cp[i], sn[i] = sp[i];
      rotate<acc_t>(a.data(), c.data(), sn.data(), o.data(), D, acc_t(1));
      for (int64_t i = 0; i < D; ++i) op[i] = static_cast<scalar_t>(o[i]);
    }
  });
  return out;
}

}  // namespace

std::vector<at::Tensor> dsla_decode_step(
    at::Tensor qkv, at::Tensor hidden, at::Tensor cos, at::Tensor sin, at::Tensor lcos, at::Tensor lsin,
    at::Tensor pos, at::Tensor slots, at::Tensor states, at::Tensor ring_k, at::Tensor ring_v, at::Tensor gate_w,
    at::Tensor gate_b, at::Tensor gate_scale, at::Tensor ak, at::Tensor bk, at::Tensor av, at::Tensor bv, at::Tensor aq, at::Tensor bq,
    at::Tensor ao, at::Tensor bo, at::Tensor mix, at::Tensor gain, at::Tensor og_w, at::Tensor og_b, int64_t Hq,
    int64_t Hkv, int64_t D, double gate_normalizer, double gate_min, double eps, bool normalize, bool rope,
    double scale, double window_scale) {
  TORCH_CHECK(qkv.device().is_cpu(), "dsla_decode_step runs on the CPU");
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == (Hq + 2 * Hkv) * D, "qkv must be (B, (Hq + 2 Hkv) D)");
  TORCH_CHECK(states.is_contiguous() && ring_k.is_contiguous() && ring_v.is_contiguous(), "pool tensors must be contiguous");
  TORCH_CHECK(D % 2 == 0, "head_dim must be even");
  for (const at::Tensor* t : {&cos, &sin, &lcos, &lsin, &ring_k, &ring_v}) {
    TORCH_CHECK(t->scalar_type() == qkv.scalar_type(), "rotary tables and window rings must have qkv's dtype");
  }
  TORCH_CHECK(hidden.numel() == 0 || hidden.scalar_type() == qkv.scalar_type(), "hidden must have qkv's dtype");
  TORCH_CHECK(pos.scalar_type() == at::kLong && slots.scalar_type() == at::kLong, "pos and slots must be int64");
  TORCH_CHECK(pos.numel() == qkv.size(0) && slots.numel() == qkv.size(0) &&
                  (hidden.numel() == 0 || (hidden.dim() == 2 && hidden.size(0) == qkv.size(0))),
              "pos, slots and hidden need one row per row of qkv");
  const bool int8_gate = gate_w.scalar_type() == at::kByte;
  const int64_t KV = Hkv * D, n_out = gate_w.dim() == 2 ? gate_w.size(0) : gate_w.size(0) * 16;
  const int64_t n_in = gate_w.dim() == 2 ? gate_w.size(1) : int8_gate ? gate_w.size(1) * 4 : gate_w.size(1) * 2;
  TORCH_CHECK((gate_w.dim() == 2 && !int8_gate) ||
                  (gate_w.dim() == 4 && gate_w.scalar_type() == at::kBFloat16 && gate_w.size(2) == 16 &&
                   gate_w.size(3) == 2 && states.scalar_type() == at::kFloat && kBf16Dot) ||
                  (int8_gate && gate_w.dim() == 3 && gate_w.size(2) == 64 && n_in % 32 == 0 &&
                   gate_scale.scalar_type() == at::kBFloat16 && gate_scale.is_contiguous() && gate_scale.numel() == n_out &&
                   states.scalar_type() == at::kFloat && kInt4Gemv),
              "packed gate weights are bfloat16 (out/16, in/2, 16, 2) with AVX512-BF16, or int8 (out/16, in/4, 64) "
              "with a bfloat16 scale (out,) and AVX512-VNNI, each for float32 states");
  TORCH_CHECK(gate_w.is_contiguous() && (n_out == KV || n_out == 2 * KV) && n_in == 2 * KV && gate_b.numel() == n_out &&
                  gate_b.is_contiguous() &&
                  gate_b.scalar_type() == (int8_gate ? at::kBFloat16 : gate_w.scalar_type()),
              "gate weights must be contiguous (nG Hkv D, 2 Hkv D), nG = 1 or 2, with a contiguous bias of nG Hkv D in "
              "their dtype (int8 codes: bfloat16)");
  for (const at::Tensor* t : {&mix, &gain, &og_w, &og_b}) {
    TORCH_CHECK(t->numel() == 0 || (t->scalar_type() == states.scalar_type() && t->is_contiguous()),
                "layer parameters must be contiguous, in the states' dtype");
  }
  for (const auto& [a, b] : {std::pair(&ak, &bk), std::pair(&av, &bv), std::pair(&aq, &bq), std::pair(&ao, &bo)}) {
    TORCH_CHECK(a->numel() == 0 || (a->is_contiguous() && b->is_contiguous() && a->dim() == 2 && b->dim() == 2 &&
                                    a->size(0) == b->size(0) && a->scalar_type() == b->scalar_type() &&
                                    (a->scalar_type() == states.scalar_type() ||
                                     (a->scalar_type() == at::kBFloat16 && states.scalar_type() == at::kFloat))),
                "adapters must be contiguous (r, in) and transposed (r, out), in the states' dtype or bfloat16");
  }
  TORCH_CHECK((ak.numel() == 0 || (ak.size(1) == KV && bk.size(1) == KV)) &&
                  (av.numel() == 0 || (av.size(1) == KV && bv.size(1) == KV)) &&
                  (aq.numel() == 0 || (hidden.dim() == 2 && aq.size(1) == hidden.size(1) && bq.size(1) == Hq * D)) &&
                  (ao.numel() == 0 || ao.size(1) == Hq * D),
              "adapter shapes: k and v (r, Hkv D), q from the layer input (r, hidden) to (r, Hq D), o from (r, Hq D)");
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "dsla_decode_step", [&] {
    using acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    TORCH_CHECK(states.scalar_type() == c10::CppTypeToScalarType<acc>::value, "states must be float32 (float64 model: float64)");
    out = step_impl<scalar_t, acc>(
        qkv.contiguous(), hidden.contiguous(), cos.contiguous(), sin.contiguous(), lcos.contiguous(),
        lsin.contiguous(), pos.contiguous(), slots.contiguous(), states, ring_k, ring_v, gate_w, gate_b, gate_scale, ak, bk, av,
        bv, aq, bq, ao, bo, mix, gain, og_w, og_b, Hq, Hkv, D, gate_normalizer, gate_min, eps, normalize, rope, scale,
        window_scale);
  });
  return out;
}

struct StepLayer {
  // A DSLA layer's step parameters and options (StepParams in native.py), converted from Python once per
  // change: handing the kernel ~25 arguments per call cost ~5 us of a ~90 us layer step at batch 1.
  std::vector<at::Tensor> p;  // gate_w (bfloat16 ones packed by pack_gate_int8 or pack_gate_bf16), gate_b, ak, bk,
                              // av, bv, aq, bq, ao, bo, mix, gain, og_w, og_b
  at::Tensor gate_scale;      // pack_gate_int8's scale, or empty
  int64_t Hq, Hkv, D;
  double gate_normalizer, gate_min, eps;
  bool normalize, rope;
  double scale, window_scale;
};

std::vector<at::Tensor> dsla_decode_layer(at::Tensor qkv, at::Tensor hidden, at::Tensor cos, at::Tensor sin,
                                          at::Tensor lcos, at::Tensor lsin, at::Tensor pos, at::Tensor slots,
                                          at::Tensor states, at::Tensor ring_k, at::Tensor ring_v, const StepLayer& l) {
  // qkv and hidden (B, n) or a decode step's (B, 1, n): viewed here, not by a Python op per layer
  const std::vector<at::Tensor>& p = l.p;
  qkv = qkv.reshape({qkv.size(0), -1});
  if (hidden.numel()) hidden = hidden.reshape({hidden.size(0), -1});
  return dsla_decode_step(qkv, hidden, cos, sin, lcos, lsin, pos, slots, states, ring_k, ring_v, p[0], p[1], l.gate_scale,
                          p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11], p[12], p[13], l.Hq, l.Hkv, l.D,
                          l.gate_normalizer, l.gate_min, l.eps, l.normalize, l.rope, l.scale, l.window_scale);
}

class Watch {
  // Tensors and a snapshot of their (data pointer, version counter): changed() says whether any was
  // written or moved since the last call. Held here, a decode step checks a model's ~500 DSLA parameters
  // in ~1 us; the same check handing them over from Python (the list converted each time) took ~300 us.
 public:
  explicit Watch(std::vector<at::Tensor> tensors) : tensors_(std::move(tensors)), key_(snapshot()) {}
  bool changed() {
    std::vector<int64_t> now = snapshot();
    const bool moved = now != key_;
    key_ = std::move(now);
    return moved;
  }

 private:
  std::vector<int64_t> snapshot() const {
    std::vector<int64_t> key;
    key.reserve(2 * tensors_.size());
    for (const at::Tensor& t : tensors_) {
      key.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
      key.push_back(t.is_inference() ? -1 : static_cast<int64_t>(t._version()));  // inference tensors have none
    }
    return key;
  }
  std::vector<at::Tensor> tensors_;
  std::vector<int64_t> key_;
};

std::vector<at::Tensor> dsla_scan(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor g_far, at::Tensor g_close,
                                  at::Tensor gate_logits, double gate_normalizer, double gate_min, at::Tensor state,
                                  at::Tensor mix, at::Tensor gain, at::Tensor q_rot, at::Tensor k_rot, at::Tensor v_win,
                                  at::Tensor cos, at::Tensor sin, bool rope_states, at::Tensor og, at::Tensor og_b,
                                  int64_t W, double scale, double window_scale, bool normalize, double eps) {
  TORCH_CHECK(q.device().is_cpu(), "dsla_scan runs on the CPU");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be (B, H, T, D)");
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), L = k.size(2);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(L - T >= 0 && L - T <= W, "keys hold ", L, " tokens for ", T, " queries: the prefix must be 0..", W);
  TORCH_CHECK(v.size(3) == D && k.size(3) == D, "the scan needs K == V == head_dim");
  TORCH_CHECK(state.dim() == 5 && state.size(0) == 2 && state.size(1) == B && state.size(2) == Hkv &&
                  state.size(3) == D && state.size(4) == D && state.is_contiguous(),
              "state must be contiguous (2, B, Hkv, D, D)");
  auto last_contiguous = [](const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); };
  q = last_contiguous(q), k = last_contiguous(k), v = last_contiguous(v);
  const bool from_logits = gate_logits.dim() == 5;  // (an empty (0,) tensor: the log-decays g_far/g_close)
  if (from_logits) {
    TORCH_CHECK(gate_logits.dim() == 5 && gate_logits.size(0) == B && gate_logits.size(1) == L &&
                    (gate_logits.size(2) == 1 || gate_logits.size(2) == 2) && gate_logits.size(3) == Hkv &&
                    gate_logits.size(4) == D && gate_logits.scalar_type() == q.scalar_type(),
                "gate_logits must be (B, L, 1 | 2, Hkv, D) in q's dtype");
    TORCH_CHECK(gate_normalizer > 0, "gate_normalizer must be > 0");
    gate_logits = gate_logits.contiguous();
  } else {
    g_far = last_contiguous(g_far), g_close = last_contiguous(g_close);
    TORCH_CHECK(g_far.sizes() == k.sizes() && g_close.sizes() == k.sizes(), "gates must be shaped like k");
  }
  if (W) {
    TORCH_CHECK(q_rot.sizes() == q.sizes() && k_rot.sizes() == k.sizes() && v_win.sizes() == v.sizes(),
                "q_rot, k_rot, v_win must match q, k, v");
    q_rot = last_contiguous(q_rot), k_rot = last_contiguous(k_rot), v_win = last_contiguous(v_win);
  }
  // One cos/sin serves both rotations: the window's (q_rot/k_rot then arrive un-rotated) and, with
  // rope_states, the states' q and k.
  TORCH_CHECK(!rope_states || cos.dim() == 3, "rope_states needs cos/sin");
  if (cos.dim() == 3 && (W || rope_states)) {
    TORCH_CHECK(cos.dim() == 3 && cos.size(0) == B && cos.size(1) == L && cos.size(2) == D && cos.sizes() == sin.sizes(),
                "cos/sin must be (B, L, D): the keys' positions");
    TORCH_CHECK(cos.scalar_type() == q.scalar_type() && sin.scalar_type() == q.scalar_type(), "cos/sin need q's dtype");
    cos = cos.contiguous(), sin = sin.contiguous();
  } else {
    cos = sin = at::empty({0}, q.options());
  }
  if (og.numel()) {
    TORCH_CHECK(og.sizes() == q.sizes() && og.scalar_type() == q.scalar_type(), "og must be shaped and typed like q");
    TORCH_CHECK(og_b.numel() == Hq * D && og_b.is_contiguous() && og_b.scalar_type() == state.scalar_type(),
                "og_b must be contiguous (Hq, D) in the state dtype");
    og = last_contiguous(og);
  }
  for (const at::Tensor* t : {&k, &v, &q_rot, &k_rot, &v_win}) {
    TORCH_CHECK(t->numel() == 0 || t->scalar_type() == q.scalar_type(), "q, k, v and the window inputs share one dtype");
  }
  for (const at::Tensor* t : {&g_far, &g_close, &mix, &gain}) {
    TORCH_CHECK(t->numel() == 0 || t->scalar_type() == state.scalar_type(), "gates, mixing and gain need the state dtype");
  }
  TORCH_CHECK(mix.dim() == 2 && mix.size(0) == Hq && mix.size(1) == (W ? 3 : 2) && mix.is_contiguous(),
              "mix must be contiguous (Hq, 2), (Hq, 3) with a window");
  TORCH_CHECK(gain.numel() == 0 || (gain.numel() == Hq * D && gain.is_contiguous()), "gain must be (Hq, D)");
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "dsla_scan", [&] {
    using acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    TORCH_CHECK(state.scalar_type() == c10::CppTypeToScalarType<acc>::value, "state must be float32 (float64 model: float64)");
    GateLogits<scalar_t> logits;
    if (from_logits) {
      logits = {gate_logits.data_ptr<scalar_t>(), gate_logits.size(2), L, Hkv, gate_normalizer, gate_min};
    }
    out = scan_impl<scalar_t, acc>(q, k, v, g_far, g_close, logits, state, mix, gain, q_rot, k_rot, v_win, cos, sin,
                                   rope_states, og, og_b, W, scale, window_scale, normalize, eps);
  });
  return out;
}

at::Tensor attention_decode(at::Tensor qkv, at::Tensor cos, at::Tensor sin, std::vector<at::Tensor> keys,
                            std::vector<at::Tensor> values, std::vector<int64_t> lengths, int64_t Hq, int64_t Hkv,
                            int64_t D, double scale) {
  // qkv, cos and sin (B, n) or a decode step's (B, 1, n): viewed here, not by a Python op per layer
  TORCH_CHECK(qkv.dim() >= 2 && cos.dim() >= 2 && sin.dim() >= 2, "qkv, cos and sin must be (B, n) or (B, 1, n)");
  qkv = qkv.reshape({qkv.size(0), -1}), cos = cos.reshape({cos.size(0), -1}), sin = sin.reshape({sin.size(0), -1});
  TORCH_CHECK(qkv.device().is_cpu() && qkv.size(1) == (Hq + 2 * Hkv) * D, "qkv must be (B, (Hq + 2 Hkv) D) on the CPU");
  const int64_t B = qkv.size(0);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(int64_t(keys.size()) == B && int64_t(values.size()) == B && int64_t(lengths.size()) == B,
              "one KV cache and length per row");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.size(0) == B && cos.size(-1) == D, "cos/sin must be (B, D)");
  for (int64_t b = 0; b < B; ++b) {
    for (const at::Tensor* t : {&keys[b], &values[b]}) {
      TORCH_CHECK(t->dim() == 3 && t->size(0) == Hkv && t->size(2) == D && t->stride(2) == 1 && t->stride(1) == D,
                  "KV caches must be (Hkv, capacity, D) with contiguous rows");
      TORCH_CHECK(t->scalar_type() == qkv.scalar_type(), "KV caches must have qkv's dtype");
      TORCH_CHECK(lengths[b] >= 0 && lengths[b] < t->size(1), "a KV cache has no room for the new token");
    }
  }
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "attention_decode", [&] {
    using acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    out = attention_impl<scalar_t, acc>(qkv.contiguous(), cos.contiguous(), sin.contiguous(), keys, values, lengths,
                                        Hq, Hkv, D, scale);
  });
  return out;
}

at::Tensor int8_gemv(at::Tensor x, at::Tensor packed, at::Tensor scale, bool residual) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.size(1) % 32 == 0, "x must be (M, in) on the CPU, in % 32 == 0");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.size(1) * 4 == x.size(1) &&
                  packed.size(2) == 64 && packed.is_contiguous(),
              "packed must be contiguous uint8 (out/16, in/4, 64)");
  TORCH_CHECK(scale.scalar_type() == at::kBFloat16 && scale.is_contiguous() && scale.numel() == packed.size(0) * 16,
              "scale must be contiguous bfloat16 (out,)");
  at::Tensor y;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "int8_gemv", [&] {
    y = residual ? int8_gemv_impl<scalar_t, true>(x.contiguous(), packed, scale)
                 : int8_gemv_impl<scalar_t, false>(x.contiguous(), packed, scale);
  });
  return y;
#else
  TORCH_CHECK(false, "int8_gemv needs AVX512-VNNI (this build has none)");
#endif
}

at::Tensor int8_dequant(at::Tensor packed, at::Tensor scale) {
  // The bf16 weight (out, in) of int8_gemv's operands, for prefill's GEMM: one pass (from Python the
  // strided un-packing and the two products took 1.5x as long as the GEMM they feed at 512 rows).
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.size(2) == 64 && packed.is_contiguous(),
              "packed must be contiguous uint8 (out/16, in/4, 64)");
  TORCH_CHECK(scale.scalar_type() == at::kBFloat16 && scale.is_contiguous() && scale.numel() == packed.size(0) * 16,
              "scale must be contiguous bfloat16 (out,)");
  const int64_t n_blocks = packed.size(0), quads = packed.size(1), in = quads * 4;
  at::Tensor w = at::empty({n_blocks * 16, in}, scale.options());
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const at::BFloat16* s = scale.data_ptr<at::BFloat16>();
  at::BFloat16* w_p = w.data_ptr<at::BFloat16>();
  at::parallel_for(0, n_blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t rb = b0; rb < b1; ++rb) {
      for (int64_t r = 0; r < 16; ++r) {
        const float sc = static_cast<float>(s[rb * 16 + r]);
        at::BFloat16* row = w_p + (rb * 16 + r) * in;
        for (int64_t j = 0; j < quads; ++j) {
          const uint8_t* q = p + (rb * quads + j) * 64 + r * 4;
          for (int64_t k = 0; k < 4; ++k) row[j * 4 + k] = static_cast<at::BFloat16>(float(int(q[k]) - 128) * sc);
        }
      }
    }
  });
  return w;
}

bool has_int4_gemv() { return kInt4Gemv; }

bool int8_packable_gate(const at::Tensor& w) {
  return kInt4Gemv && w.scalar_type() == at::kBFloat16 && w.dim() == 2 && w.size(0) % 16 == 0 && w.size(1) % 32 == 0;
}

struct PackedGate {
  at::Tensor w, scale;  // scale: pack_gate_int8's, or empty
};

PackedGate pack_gate(const at::Tensor& w, bool float_states, bool int8) {
  // The gate weights as the decode step reads them: with ``int8`` (a quantised model) int8 codes for
  // AVX512-VNNI where the shape allows, else packed for AVX512-BF16's dot product, else as they are.
  // NOTE(decisions): int8 codes halve the bytes of the largest thing a DSLA layer's step reads (the
  // default model's gates: 295 -> 147 KB a layer); 100 % DSLA decode took 0.922 / 0.956 x the time of
  // bfloat16 gates at 512 tokens and 0.945 x at 2048 (interleaved runs, 8 x 40 steps each), and its
  // teacher-forced decode perplexity moved by +0.15 / +0.24 / -0.49 % at 25 / 50 / 100 % (8 held-out
  // blocks of 8 domains, 128 tokens each; the int4 model).
  if (int8 && float_states && int8_packable_gate(w)) {
    auto [packed, scale] = pack_gate_int8(w);
    return {packed, scale};
  }
  return {float_states && packable_gate(w) ? pack_gate_bf16(w) : w, at::empty({0}, w.options())};
}

std::tuple<at::Tensor, std::string> gate_projection(at::Tensor w, at::Tensor bias, at::Tensor x, bool int8) {
  // The decode step's gate projection alone (for tests): x (B, in) float32 by bfloat16 w (out, in), packed
  // as StepLayer packs it (``int8``: a quantised model's), and bias (out,): (B, out) float32, and the
  // packing used ("int8", "bfloat16" or "none").
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 2 && bias.scalar_type() == at::kBFloat16 &&
                  bias.numel() == w.size(0) && x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == w.size(1),
              "gate_projection: bfloat16 w (out, in) and bias (out,), float32 x (B, in)");
  const int64_t B = x.size(0), n_out = w.size(0), n_in = w.size(1);
  at::Tensor g = at::empty({B, n_out}, x.options());
  x = x.contiguous(), bias = bias.contiguous();
  const PackedGate p = pack_gate(w.contiguous(), true, int8);
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (p.w.scalar_type() == at::kByte) {
    gate_gemv_int8(p.w, p.scale, bias, x.data_ptr<float>(), g.data_ptr<float>(), B, n_in);
    return {g, "int8"};
  }
#endif
#if defined(__AVX512BF16__)
  if (p.w.dim() == 4) {
    gate_gemv_bf16(p.w, bias, x.data_ptr<float>(), g.data_ptr<float>(), B, n_out, n_in);
    return {g, "bfloat16"};
  }
#endif
  gate_gemv<float, c10::BFloat16>(p.w, bias, x.data_ptr<float>(), std::vector<char>(B, 1), g.data_ptr<float>(), B, n_out,
                                  n_in);
  return {g, "none"};
}

at::Tensor int4_gemv(at::Tensor x, at::Tensor packed, at::Tensor scale, at::Tensor offset, bool residual) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.size(1) % 32 == 0, "x must be (M, in) on the CPU, in % 32 == 0");
  const int64_t n_blocks = packed.size(0), n_groups = x.size(1) / 32;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 4 && packed.size(1) == n_groups &&
                  packed.size(2) == 4 && packed.size(3) == 64 && packed.is_contiguous(),
              "packed must be contiguous uint8 (out/16, in/32, 4, 64)");
  TORCH_CHECK(scale.scalar_type() == at::kBFloat16 && scale.is_contiguous() && scale.numel() == n_blocks * n_groups * 16,
              "scale must be contiguous bfloat16 (out/16, in/32, 16)");
  TORCH_CHECK(offset.scalar_type() == at::kFloat && offset.is_contiguous() && offset.numel() == n_blocks * n_groups * 16,
              "offset must be contiguous float32 (out/16, in/32, 16)");
  at::Tensor y;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "int4_gemv", [&] {
    y = residual ? int4_gemv_impl<scalar_t, true>(x.contiguous(), packed, scale, offset)
                 : int4_gemv_impl<scalar_t, false>(x.contiguous(), packed, scale, offset);
  });
  return y;
#else
  TORCH_CHECK(false, "int4_gemv needs AVX512-VNNI (this build has none)");
#endif
}

at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && weight.scalar_type() == x.scalar_type(),
              "rms_norm: CPU tensors, weight in x's dtype");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "rms_norm: x needs a non-empty last dimension");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "rms_norm: weight must be (hidden,)");
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    out = rms_norm_impl<scalar_t>(x.contiguous(), weight.contiguous(), eps);
  });
  return out;
}

at::Tensor silu_mul(at::Tensor gate_up) {
  TORCH_CHECK(gate_up.device().is_cpu() && gate_up.dim() >= 1 && gate_up.size(-1) > 0 && gate_up.size(-1) % 2 == 0,
              "silu_mul: a CPU tensor with an even, non-zero last dimension");
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gate_up.scalar_type(), "silu_mul", [&] {
    out = silu_mul_impl<scalar_t>(gate_up.contiguous());
  });
  return out;
}

// ---- a decode layer's int4 linears in three calls ----
//
// At batch 1 a layer's linears, norms and residual adds were ~10 Python-level calls (module dispatch,
// reshapes, dtype checks) of 3-10 us each around ~0.25 ms of kernels: a third of the step. These compose
// the kernels above in one call each, computing and rounding exactly as the separate calls do.

at::Tensor rows2d(const at::Tensor& x) { return x.reshape({-1, x.size(-1)}); }

at::Tensor as_rows_of(const at::Tensor& y, const at::Tensor& like) {  // (M, n) -> like's leading shape + (n,)
  std::vector<int64_t> shape(like.sizes().begin(), like.sizes().end());
  shape.back() = y.size(-1);
  return y.view(shape);
}

std::vector<at::Tensor> norm_int4(at::Tensor x, at::Tensor norm_w, double eps, at::Tensor packed, at::Tensor scale,
                                  at::Tensor offset, bool residual) {
  // h = rms_norm(x), y = h W^T: the layer input of the token mixing and its fused q/k/v
  at::Tensor h = rms_norm(x, norm_w, eps);
  return {h, as_rows_of(int4_gemv(rows2d(h), packed, scale, offset, residual), h)};
}

at::Tensor int4_residual(at::Tensor x, at::Tensor o, at::Tensor packed, at::Tensor scale, at::Tensor offset,
                         bool residual, std::optional<at::Tensor> extra) {
  // x + (o W^T + extra): the mixing's output projection (extra: the o adapter's output, or None)
  at::Tensor y = int4_gemv(rows2d(o), packed, scale, offset, residual);
  if (extra) y.add_(rows2d(*extra));
  return x + y.view(x.sizes());
}

at::Tensor int4_mlp(at::Tensor x, at::Tensor norm_w, double eps, at::Tensor gu_packed, at::Tensor gu_scale,
                    at::Tensor gu_offset, at::Tensor down_packed, at::Tensor down_scale, at::Tensor down_offset,
                    bool residual) {
  // x + down(silu(gate) * up)(rms_norm(x)) with gate and up fused
  at::Tensor gate_up = int4_gemv(rows2d(rms_norm(x, norm_w, eps)), gu_packed, gu_scale, gu_offset, residual);
  return x + int4_gemv(silu_mul(gate_up), down_packed, down_scale, down_offset, residual).view(x.sizes());
}

at::Tensor rope(at::Tensor x, at::Tensor cos, at::Tensor sin) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.size(3) % 2 == 0, "rope: x must be a CPU (B, H, T, D), D even");
  TORCH_CHECK(cos.dim() == 3 && cos.size(0) == x.size(0) && cos.size(1) == x.size(2) && cos.size(2) == x.size(3) &&
                  cos.sizes() == sin.sizes(),
              "rope: cos/sin must be (B, T, D)");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(), "rope: cos/sin need x's dtype");
  if (x.size(3) > 1 && x.stride(3) != 1) x = x.contiguous();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rope", [&] {
    out = rope_impl<scalar_t>(x, cos.contiguous(), sin.contiguous());
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "Llama RMSNorm (float statistics, rounded as the ATen ops round)");
  m.def("rope", &rope, "Llama's rotary embedding of (B, H, T, D) by (B, T, D) tables: a contiguous copy");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused (..., 2 I) [gate | up]");
  m.def("attention_decode", &attention_decode, "one attention decode token for a batch (KV appended in place)");
  m.def("has_int4_gemv", &has_int4_gemv, "whether this build has the AVX512-VNNI int4 GEMV");
  m.def("gate_projection", &gate_projection, "the decode step's gate projection of float32 rows (tests)");
  m.def("int8_dequant", &int8_dequant, "int8_gemv's packed weights as a bf16 (out, in) matrix");
  m.def("int8_gemv", &int8_gemv, "y = x W^T for a few rows x and int8 weights packed for VNNI");
  m.def("int4_gemv", &int4_gemv, "y = x W^T for a few rows x and int4 weights packed for VNNI");
  m.def("norm_int4", &norm_int4, "rms_norm(x) and its int4 projection");
  m.def("int4_residual", &int4_residual, "x + o W^T (+ extra), int4 weights");
  m.def("int4_mlp", &int4_mlp, "x + a gated silu MLP of rms_norm(x), int4 weights");
  py::class_<StepLayer>(m, "StepLayer")
      .def(py::init([](std::vector<at::Tensor> p, int64_t Hq, int64_t Hkv, int64_t D, double gate_normalizer,
                       double gate_min, double eps, bool normalize, bool rope, double scale, double window_scale,
                       bool int8_gates) {
        TORCH_CHECK(p.size() == 14, "StepLayer takes the 14 parameter tensors of StepParams");
        PackedGate gate = pack_gate(p[0], p[10].scalar_type() == at::kFloat, int8_gates);  // float32 states
        p[0] = gate.w;
        return StepLayer{std::move(p), gate.scale, Hq, Hkv, D, gate_normalizer, gate_min, eps, normalize, rope, scale,
                         window_scale};
      }));
  m.def("dsla_decode_layer", &dsla_decode_layer, "dsla_decode_step with a StepLayer's parameters and options");
  py::class_<Watch>(m, "Watch")
      .def(py::init<std::vector<at::Tensor>>())
      .def("changed", &Watch::changed, "whether any tensor was written or moved since the last call");
  m.def("dsla_scan", &dsla_scan, "DSLA prefill: the recurrent scan of both states and the window (state in place)");
}
