// One DSLA decode step for a batch of pooled sequences, fused into one call.
//
// The Python step (dsla_serve/ops/recurrent.py, driven by DSLAAttention.step) is the reference this
// kernel is tested against; both implement dsla_serve/ops/naive.py. Decode at batch 1 is bound by
// per-op dispatch overhead (about 150 small tensor ops per layer in Python), so this kernel does the
// whole token mixing of a DSLA layer after the q/k/v projection in one call, reading and writing the
// pool's slots in place: the leaving token's un-rotation, the k/v/q adapters, both gates, the state
// update, the state reads with RMS norm and gain, the exact window, the mixing and the output gate.
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
//            [k of every head | v of every head]; the weights' own dtype
//   adapters (A: (r, in), B transposed: (r, out)) acc_t, or empty tensors
//   mix      (Hq, 2 | 3) acc_t              softmax of (alpha_far, alpha_close[, beta])
//   gain     (Hq, D); og_w (D, D) transposed (in, out), og_b (Hq, D) or empty (no output gate)
// Returns o (B, Hq D) scalar_t, and the o adapter's output (B, hidden) scalar_t (empty without one).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

template <typename T>
inline void rotate(const T* x, const T* cos, const T* sin, T* out, int64_t D, T sign) {
  // Llama's rotary embedding: out = x cos + rotate_half(x) sin; sign = -1 undoes it.
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    out[i] = x[i] * cos[i] - sign * x[i + half] * sin[i];
    out[i + half] = x[i + half] * cos[i + half] + sign * x[i] * sin[i + half];
  }
}

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

template <typename T, typename S>
inline T dot_mixed(const T* a, const S* b, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * static_cast<T>(b[i]);
  return acc;
}

template <typename T>
inline void low_rank_add(const T* A, const T* Bt, const T* x, T* y, int64_t n_in, int64_t n_out, int64_t r) {
  // y += B (A x): a rank-r adapter; A (r, n_in), Bt = B transposed (r, n_out).
  for (int64_t j = 0; j < r; ++j) {
    const T t = dot(A + j * n_in, x, n_in);
    const T* b = Bt + j * n_out;
#pragma omp simd
    for (int64_t o = 0; o < n_out; ++o) y[o] += b[o] * t;
  }
}

template <typename T>
inline T log_sigmoid(T x) {
  return std::min(x, T(0)) - std::log1p(std::exp(-std::abs(x)));
}

template <typename acc_t, typename w_t>
void gate_gemv(const at::Tensor& w, const at::Tensor& bias, const acc_t* x, const std::vector<char>& enters, acc_t* g,
               int64_t B, int64_t n_out, int64_t n_in) {
  const w_t* w_p = w.data_ptr<w_t>();
  const w_t* b_p = bias.data_ptr<w_t>();
  at::parallel_for(0, n_out, 64, [&](int64_t o0, int64_t o1) {
    for (int64_t b = 0; b < B; ++b) {
      if (!enters[b]) continue;
      for (int64_t o = o0; o < o1; ++o) g[b * n_out + o] = dot_mixed(x + b * n_in, w_p + o * n_in, n_in) + acc_t(b_p[o]);
    }
  });
}

template <typename scalar_t, typename acc_t>
std::vector<at::Tensor> step_impl(
    const at::Tensor& qkv, const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
    const at::Tensor& lcos, const at::Tensor& lsin, const at::Tensor& pos, const at::Tensor& slots,
    at::Tensor& states, at::Tensor& ring_k, at::Tensor& ring_v, const at::Tensor& gate_w, const at::Tensor& gate_b,
    const at::Tensor& ak, const at::Tensor& bk, const at::Tensor& av, const at::Tensor& bv, const at::Tensor& aq,
    const at::Tensor& bq, const at::Tensor& ao, const at::Tensor& bo, const at::Tensor& mix, const at::Tensor& gain,
    const at::Tensor& og_w, const at::Tensor& og_b, int64_t Hq, int64_t Hkv, int64_t D, double gate_normalizer,
    double gate_min, double eps, bool normalize, bool rope, double scale, double window_scale) {
  const int64_t B = qkv.size(0), W = ring_k.size(2), G = Hq / Hkv, KV = Hkv * D;
  const int64_t row = qkv.size(1), n_gates = gate_w.size(0) / KV;
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
          low_rank_add<acc_t>(ak.data_ptr<acc_t>(), bk.data_ptr<acc_t>(), k0.data(), xk, KV, KV, ak.size(0));
        }
        if (av.numel()) {
          std::vector<acc_t> v0(xv, xv + KV);
          low_rank_add<acc_t>(av.data_ptr<acc_t>(), bv.data_ptr<acc_t>(), v0.data(), xv, KV, KV, av.size(0));
        }
      }
      acc_t* qs = qs_p + b * Hq * D;
      for (int64_t i = 0; i < Hq * D; ++i) qs[i] = in[i];
      if (aq.numel()) {
        const int64_t n = hidden.size(1);
        std::vector<acc_t> hb(n);
        const scalar_t* hp = hidden.data_ptr<scalar_t>() + b * n;
        for (int64_t i = 0; i < n; ++i) hb[i] = hp[i];
        low_rank_add<acc_t>(aq.data_ptr<acc_t>(), bq.data_ptr<acc_t>(), hb.data(), qs, n, Hq * D, aq.size(0));
      }
    }
  });

  // Phase 2: both gates of every entering row, (B, nG KV), from weights in their own dtype (bfloat16
  // halves the bytes a step reads; a one-row bfloat16 GEMM through ATen measured 3x slower than this).
  std::vector<acc_t> g(B * n_gates * KV);
  const acc_t* g_p = g.data();
  if (gate_w.scalar_type() == at::kBFloat16) {
    gate_gemv<acc_t, c10::BFloat16>(gate_w, gate_b, x_p, enters, g.data(), B, n_gates * KV, 2 * KV);
  } else {
    TORCH_CHECK(gate_w.scalar_type() == states.scalar_type(), "gate weights must be bfloat16 or the states' dtype");
    gate_gemv<acc_t, acc_t>(gate_w, gate_b, x_p, enters, g.data(), B, n_gates * KV, 2 * KV);
  }

  // Phase 3, per (row, KV head): state update, reads, window, mixing, output gate.
  at::Tensor o = at::empty({B, Hq * D}, qkv.options());
  scalar_t* o_p = o.data_ptr<scalar_t>();
  const acc_t* mix_p = mix.data_ptr<acc_t>();
  const acc_t* gain_p = gain.data_ptr<acc_t>();
  const bool out_gate = og_w.numel() > 0;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t i0, int64_t i1) {
    std::vector<acc_t> decay(D), kst(D), q_rot(D), read(D), win(D), scores(std::max<int64_t>(W, 1)), cc(D), ss(D),
        lc(D), ls(D), qv(D), qg(G * D), reads(G * D), outs(G * D);
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t b = it / Hkv, h = it % Hkv, p = pos_p[b];
      const scalar_t* in = qkv_p + b * row;
      acc_t* S = st + (slot_p[b] * 2 * Hkv + h) * D * D;  // state s at S + s Hkv D D
      const acc_t* xk = x_p + b * 2 * KV + h * D;
      const acc_t* xv = x_p + b * 2 * KV + KV + h * D;
      for (int64_t i = 0; i < D; ++i) {
        cc[i] = c_p[b * D + i];
        ss[i] = s_p[b * D + i];
      }
      const bool has_state = enters[b];  // with a window: a token has left it, so the states hold one
      if (enters[b]) {
        if (rope) {
          for (int64_t i = 0; i < D; ++i) {  // the entering token's position: the leaving one's with a window
            lc[i] = has_window ? acc_t(lc_p[b * D + i]) : cc[i];
            ls[i] = has_window ? acc_t(ls_p[b * D + i]) : ss[i];
          }
          rotate<acc_t>(xk, lc.data(), ls.data(), kst.data(), D, acc_t(1));
        } else {
          std::copy(xk, xk + D, kst.begin());
        }
      }
      // The group's queries, scaled (and rotated with rope).
      for (int64_t gq = 0; gq < G; ++gq) {
        const acc_t* qsrc = qs_p + b * Hq * D + (h * G + gq) * D;
        acc_t* dst = qg.data() + gq * D;
        if (rope) {
          rotate<acc_t>(qsrc, cc.data(), ss.data(), dst, D, acc_t(1));
        } else {
          std::copy(qsrc, qsrc + D, dst);
        }
        for (int64_t i = 0; i < D; ++i) dst[i] *= acc_t(scale);
      }
      std::fill(outs.begin(), outs.end(), acc_t(0));
      for (int64_t s = 0; s < 2 && has_state; ++s) {
        // One pass over the state: update each row (a token enters), then every query of the group reads it.
        acc_t* Ss = S + s * Hkv * D * D;
        const acc_t* gs = g_p + b * n_gates * KV + std::min<int64_t>(s, n_gates - 1) * KV + h * D;
        for (int64_t i = 0; i < D; ++i) {
          const acc_t gv = log_sigmoid(gs[i]) / acc_t(gate_normalizer);
          decay[i] = std::exp(std::max(gv, acc_t(gate_min)));
        }
        std::fill(reads.begin(), reads.end(), acc_t(0));
        for (int64_t i = 0; i < D; ++i) {
          acc_t* r = Ss + i * D;
          const acc_t di = decay[i], ki = kst[i];
#pragma omp simd
          for (int64_t j = 0; j < D; ++j) r[j] = di * r[j] + ki * xv[j];
          for (int64_t gq = 0; gq < G; ++gq) {
            const acc_t qi = qg[gq * D + i];
            acc_t* rd = reads.data() + gq * D;
#pragma omp simd
            for (int64_t j = 0; j < D; ++j) rd[j] += qi * r[j];
          }
        }
        for (int64_t gq = 0; gq < G; ++gq) {
          const int64_t hq = h * G + gq;
          const acc_t* rd = reads.data() + gq * D;
          acc_t norm = 1;
          if (normalize) norm = acc_t(1) / std::sqrt(dot(rd, rd, D) / acc_t(D) + acc_t(eps));
          const acc_t w = mix_p[hq * n_mix + s] * norm;
          acc_t* out = outs.data() + gq * D;
#pragma omp simd
          for (int64_t j = 0; j < D; ++j) out[j] += w * rd[j] * gain_p[hq * D + j];
        }
      }
      for (int64_t gq = 0; gq < G; ++gq) {
        const int64_t hq = h * G + gq;
        acc_t* out = outs.data() + gq * D;
        if (has_window) {
          for (int64_t i = 0; i < D; ++i) qv[i] = in[hq * D + i];
          rotate<acc_t>(qv.data(), cc.data(), ss.data(), q_rot.data(), D, acc_t(1));
          const int64_t n_valid = std::min(p + 1, W), slot = slot_p[b];
          const scalar_t* keys = rk + (slot * Hkv + h) * W * D;
          const scalar_t* vals = rv + (slot * Hkv + h) * W * D;
          acc_t mx = -INFINITY;
          for (int64_t t = 0; t < n_valid; ++t) {
            scores[t] = dot_mixed(q_rot.data(), keys + t * D, D) * acc_t(window_scale);
            mx = std::max(mx, scores[t]);
          }
          acc_t den = 0;
          for (int64_t t = 0; t < n_valid; ++t) den += (scores[t] = std::exp(scores[t] - mx));
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
      low_rank_add<acc_t>(ao.data_ptr<acc_t>(), bo.data_ptr<acc_t>(), ob.data(), y.data(), n, n_out, ao.size(0));
      for (int64_t i = 0; i < n_out; ++i) e_p[b * n_out + i] = static_cast<scalar_t>(y[i]);
    }
  }
  return {o, extra};
}

}  // namespace

std::vector<at::Tensor> dsla_decode_step(
    at::Tensor qkv, at::Tensor hidden, at::Tensor cos, at::Tensor sin, at::Tensor lcos, at::Tensor lsin,
    at::Tensor pos, at::Tensor slots, at::Tensor states, at::Tensor ring_k, at::Tensor ring_v, at::Tensor gate_w,
    at::Tensor gate_b, at::Tensor ak, at::Tensor bk, at::Tensor av, at::Tensor bv, at::Tensor aq, at::Tensor bq,
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
  for (const at::Tensor* t : {&ak, &bk, &av, &bv, &aq, &bq, &ao, &bo, &mix, &gain, &og_w, &og_b}) {
    TORCH_CHECK(t->numel() == 0 || (t->scalar_type() == states.scalar_type() && t->is_contiguous()),
                "layer parameters must be contiguous, in the states' dtype");
  }
  std::vector<at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "dsla_decode_step", [&] {
    using acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    TORCH_CHECK(states.scalar_type() == c10::CppTypeToScalarType<acc>::value, "states must be float32 (float64 model: float64)");
    out = step_impl<scalar_t, acc>(
        qkv.contiguous(), hidden.contiguous(), cos.contiguous(), sin.contiguous(), lcos.contiguous(),
        lsin.contiguous(), pos.contiguous(), slots.contiguous(), states, ring_k, ring_v, gate_w, gate_b, ak, bk, av,
        bv, aq, bq, ao, bo, mix, gain, og_w, og_b, Hq, Hkv, D, gate_normalizer, gate_min, eps, normalize, rope, scale,
        window_scale);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dsla_decode_step", &dsla_decode_step, "one fused DSLA decode step over pooled slots (in place)");
}
