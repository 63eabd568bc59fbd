// A decode token through every layer of a MoE transformer in one call: for each layer the
// residual add and RMSNorm, q/k/v (one parallel region), the fused attention over the KV cache
// (attention.h), the output projection, the second add and norm, the router (fp32 GEMV,
// softmax or sigmoid, top-k, optional renormalisation and scale) and the routed experts
// (expert_ffn.h: gate+up of all of them in one region, down in a second).
//
// What it replaces is the same maths as ~40 Python-level calls a layer; each of them, right
// after an expert kernel has swept the caches, paid tens of microseconds of cold dispatch
// (docs/PERFORMANCE.md). The kernels are the ones the Python path calls, on the same
// activation rows, so the projections and experts give the same numbers; the router's
// logits and softmax sum in a different order than torch's (fp32 rounding).
#pragma once

#include <chrono>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <utility>
#include <vector>

#include "attention.h"
#include "expert_ffn.h"
#include "norm.h"

namespace moestream_cpu {

struct QLinear {
  const uint8_t* weight;  // [N, K] in GGUF blocks of qtype
  int64_t qtype, N;
  const float* bias;  // [N] or null
};

struct DecodeLayer {
  const float* attn_norm;
  const float* ffn_norm;
  QLinear q, k, v, o;
  const float* q_norm;  // null: no q/k norm
  const float* k_norm;
  const float* router;       // [E, D] float32
  const float* router_bias;  // [E] correction bias (choice only) or null
  const uint8_t* gate;       // expert e's gate at gate + e * gate_stride bytes
  const uint8_t* up;
  const uint8_t* down;
  int64_t gate_stride, up_stride, down_stride;
  FfnTypes types;  // the experts' block types (a Q4_K_M mix changes down's between layers)
};

// Parts timed when asked (seconds, summed over the layers): what `moestream bench --profile`
// shows for this path.
enum DecodePart { PART_NORM = 0, PART_QKV, PART_ATTENTION, PART_OUT, PART_ROUTER, PART_EXPERTS, PART_HEAD, N_PARTS };

struct DecodeModel {
  int64_t D, H, n_kv, hd, I, E, top_k;
  float eps;
  bool norm_per_head;
  int64_t rope_dims;
  bool neox;
  bool exact_linear;   // fp32 route for the attention projections
  bool exact_experts;  // and for the experts
  bool sigmoid;        // gating: sigmoid, else softmax
  bool norm_topk;
  float weights_scale;
  std::vector<DecodeLayer> layers;
  std::vector<double> inv_freq;  // rope: rope_dims / 2 frequencies
  double rope_scale = 1.0;       // positions are multiplied by it (linear scaling)
  const float* output_norm = nullptr;
  QLinear lm_head{nullptr, 0, 0, nullptr};

  // cos and signed sin [rope_dims] of a position, as engine/layers.py's Rope.tables makes
  // them: angles in double, each repeated where its pair's two values sit (adjacent, or the
  // two halves for NEOX), the sine negated at each pair's first value, cast to float.
  void rope_tables(int64_t position, float* cos, float* signed_sin) const {
    const int64_t half = rope_dims / 2;
    for (int64_t i = 0; i < half; ++i) {
      const double angle = (static_cast<double>(position) * rope_scale) * inv_freq[i];
      const float c = static_cast<float>(std::cos(angle)), s = static_cast<float>(std::sin(angle));
      const int64_t first = neox ? i : 2 * i, second = neox ? i + half : 2 * i + 1;
      cos[first] = cos[second] = c;
      signed_sin[first] = -s;
      signed_sin[second] = s;
    }
  }

  // h [D]: the token's embedding in, h + every layer's attention and FFN out. KV caches:
  // layer l's slot s of KV head j at base + l * layer_stride + s * slot_stride + j * hd
  // elements; the context is slots [slot0, slot0 + ctx), or slot_ids[0 .. ctx) when not null
  // (a block table's slots), the new token's the last, at `position`. ids / weights [n_layers, top_k]: each layer's routing; logits [vocab] (when
  // not null): lm_head of the output-normed h; seconds [N_PARTS] when not null.
  template <class T>
  void run(float* h, T* k_cache, T* v_cache, int64_t layer_stride, int64_t slot_stride, int64_t slot0, int64_t ctx,
           int64_t position, const int64_t* slot_ids, int64_t* ids, float* weights, float* logits,
           double* seconds) const {
    if (slot_ids != nullptr) slot0 = 0;
    const SlotMap slot{slot_ids};
    using clock = std::chrono::steady_clock;
    auto mark = clock::now();
    auto lap = [&](DecodePart part) {
      if (seconds == nullptr) return;
      const auto now = clock::now();
      seconds[part] += std::chrono::duration<double>(now - mark).count();
      mark = now;
    };
    std::vector<float> x(D), q(H * hd), k(n_kv * hd), v(n_kv * hd), attn(H * hd), delta(D), ffn(D, 0.f);
    std::vector<float> router_logits(E), probs(E), choice(E), routed(top_k * D), cos(rope_dims), signed_sin(rope_dims);
    rope_tables(position, cos.data(), signed_sin.data());
    const DecodeAttention shape{H, n_kv, hd, nullptr, nullptr, norm_per_head, eps, cos.data(), signed_sin.data(),
                                rope_dims, neox};
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    for (size_t l = 0; l < layers.size(); ++l) {
      const DecodeLayer& L = layers[l];
      add_rms_norm(h, l == 0 ? nullptr : ffn.data(), L.attn_norm, 1, D, eps, h, x.data());
      lap(PART_NORM);
      project({{&L.q, q.data()}, {&L.k, k.data()}, {&L.v, v.data()}}, x.data(), D);
      lap(PART_QKV);
      DecodeAttention a = shape;
      a.q_norm = L.q_norm;
      a.k_norm = L.k_norm;
      decode_attention(a, q.data(), k.data(), v.data(), k_cache + l * layer_stride + slot0 * slot_stride,
                       v_cache + l * layer_stride + slot0 * slot_stride, ctx, slot_stride, scale, attn.data(),
                       ATTEND_PARALLEL_MIN_FMAS_WARM, slot);
      lap(PART_ATTENTION);
      project({{&L.o, delta.data()}}, attn.data(), H * hd);
      lap(PART_OUT);
      add_rms_norm(h, delta.data(), L.ffn_norm, 1, D, eps, h, x.data());
      lap(PART_NORM);
      route(L, x.data(), router_logits.data(), probs.data(), choice.data(), ids + l * top_k, weights + l * top_k);
      lap(PART_ROUTER);
      std::vector<LayerExpert> experts;  // the top-k are distinct experts
      experts.reserve(top_k);
      for (int64_t j = 0; j < top_k; ++j) {
        const int64_t e = ids[l * top_k + j];
        experts.emplace_back(e, reinterpret_cast<uintptr_t>(L.gate + e * L.gate_stride),
                             reinterpret_cast<uintptr_t>(L.up + e * L.up_stride),
                             reinterpret_cast<uintptr_t>(L.down + e * L.down_stride));
      }
      run_moe_layer(x.data(), 1, D, I, top_k, ids + l * top_k, weights + l * top_k, experts, L.types, routed.data(),
                    exact_experts);
      for (int64_t d = 0; d < D; ++d) {  // the k rows summed in order, as per_k.sum(1)
        float s = routed[d];
        for (int64_t j = 1; j < top_k; ++j) s += routed[j * D + d];
        ffn[d] = s;
      }
      lap(PART_EXPERTS);
    }
    for (int64_t d = 0; d < D; ++d) h[d] += ffn[d];
    if (logits != nullptr && lm_head.weight != nullptr) {
      add_rms_norm(h, nullptr, output_norm, 1, D, eps, x.data(), x.data());
      project({{&lm_head, logits}}, x.data(), D);
      lap(PART_HEAD);
    }
  }

 private:
  // y_i = W_i x (+ b_i) for matrices of one input: one parallel region (project_rows).
  void project(std::initializer_list<std::pair<const QLinear*, float*>> mats, const float* x, int64_t K) const {
    std::vector<Projection> projections;
    for (const auto& [lin, y] : mats) projections.push_back(Projection{lin->weight, lin->qtype, lin->N, y});
    project_rows(projections, x, 1, K, exact_linear);
    for (const auto& [lin, y] : mats)
      if (lin->bias != nullptr)
        for (int64_t n = 0; n < lin->N; ++n) y[n] += lin->bias[n];
  }

  // Top-k of the router as engine/router.py's select_experts (no expert groups): scores are
  // softmax or sigmoid of the logits, chosen by score (+ correction bias), weighted by score,
  // optionally renormalised (the sum clamped as llama.cpp does) and scaled. Ties: lower id.
  void route(const DecodeLayer& L, const float* x, float* logits, float* probs, float* choice, int64_t* ids,
             float* w) const {
    for (int64_t e = 0; e < E; ++e) logits[e] = lane_dot(L.router + e * D, x, D);
    if (sigmoid) {
      for (int64_t e = 0; e < E; ++e) probs[e] = 1.0f / (1.0f + std::exp(-logits[e]));
    } else {
      float top = -INFINITY;
      for (int64_t e = 0; e < E; ++e) top = std::max(top, logits[e]);
      float total = 0.f;
      for (int64_t e = 0; e < E; ++e) total += (probs[e] = std::exp(logits[e] - top));
      for (int64_t e = 0; e < E; ++e) probs[e] /= total;
    }
    for (int64_t e = 0; e < E; ++e) choice[e] = L.router_bias != nullptr ? probs[e] + L.router_bias[e] : probs[e];
    float sum = 0.f;
    std::vector<bool> taken(E, false);  // distinct experts even where scores are NaN
    for (int64_t j = 0; j < top_k; ++j) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e)
        if (!taken[e] && (best < 0 || choice[e] > choice[best])) best = e;
      taken[best] = true;
      ids[j] = best;
      w[j] = probs[best];
      sum += probs[best];
    }
    if (norm_topk)
      for (int64_t j = 0; j < top_k; ++j) w[j] /= std::max(sum, 6.103515625e-5f);
    if (weights_scale != 1.0f)
      for (int64_t j = 0; j < top_k; ++j) w[j] *= weights_scale;
  }
};

}  // namespace moestream_cpu
