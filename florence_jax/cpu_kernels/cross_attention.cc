// One decoding step's attention on the CPU, two kernels.
//
// florence_cross_attention: each prompt's few query rows (its beams) against the prompt's encoder keys and
// values, every head, in one pass over them.
//
//   q     (B, G, H, D)      the step's queries: G rows (beams) per prompt, heads-major within a row
//   key   (B, H, P, D, W)   keys packed panel-major over positions: panel p holds positions p*W .. p*W+W-1,
//                           one contiguous (D, W) block (W = kPanel, the rows-product kernel's panel width)
//   value (B, H, P*W, D)
//   fill  (B, P*W)          NaN where a position's score stands; otherwise the score it takes instead (the
//                           float32 minimum for a masked position, as the einsum path's mask; -inf for the
//                           padding past the prompt's positions, which then weighs exactly 0)
//   out   (B, G, H, D)      softmax(q k^T * scale) v
//
// Why: XLA:CPU runs these as batched matrix-vector products, one query row at a time, reading each
// prompt's keys and values once per beam and on one core (docs/benchmarks.md). Here a (prompt, head)
// pair's keys and values are read once for all its beams, the pairs split among XLA's intra-op threads.
//
// florence_cached_attention: each row's query against its self-attention cache, whose slots may lie in
// other rows (beam search forks a hypothesis by copying its row of slot sources, never its keys):
//
//   q      (R, H, D)      the step's queries
//   key    (R, H, S, D)   slot j of row r holds the keys written by row r at step j
//   value  (R, H, S, D)
//   source (R, S) int32   the row whose slot j row r's hypothesis reads
//   length (1,) int32     slots 0 .. length-1 are attended
//   out    (R, H, D)
//
// Float32 throughout. As the einsum path: scores are the dot product times the scale, the softmax
// subtracts the row's maximum, exponentiates, divides by the sum, and the probabilities multiply the values;
// a row whose every position is masked averages them uniformly. The exponential is a polynomial (Cephes'
// expf, within 2 ulp), so results differ from XLA's in the last bits only.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace florence;

constexpr int kBeamBlock = 4;    // query rows handled together (scores_fn, values_fn)

// Scores of G query rows against every position: s[g][j] = (q_g . k_j) * scale, or the fill.
template <int G>
static void scores(const float* q, int64_t ldq, const float* key, const float* fill, float* s, int64_t P,
                   int64_t D, float scale) {
  const int64_t S = P * kPanel;
  for (int64_t p = 0; p < P; ++p) {
    vec acc[G][kVecs];
    for (int g = 0; g < G; ++g)
      for (int v = 0; v < kVecs; ++v) acc[g][v] = vec{};
    const float* kp = key + p * D * kPanel;
    for (int64_t d = 0; d < D; ++d, kp += kPanel) {
      vec kv[kVecs];
      for (int v = 0; v < kVecs; ++v) kv[v] = load(kp + v * kLanes);
      for (int g = 0; g < G; ++g) {
        const float qd = q[g * ldq + d];
        for (int v = 0; v < kVecs; ++v) acc[g][v] += qd * kv[v];
      }
    }
    for (int v = 0; v < kVecs; ++v) {
      const int64_t j = p * kPanel + v * kLanes;
      const vec f = load(fill + j);
      const ivec keep = f != f;  // NaN: the score stands
      for (int g = 0; g < G; ++g) store(s + g * S + j, keep ? acc[g][v] * scale : f);
    }
  }
}

using ScoresFn = void (*)(const float*, int64_t, const float*, const float*, float*, int64_t, int64_t, float);
using ValuesFn = void (*)(const float*, int64_t, const float*, float*, int64_t);

static ScoresFn scores_fn(int g) {
  switch (g) {
    case 1: return &scores<1>;
    case 2: return &scores<2>;
    case 3: return &scores<3>;
    default: return &scores<4>;
  }
}

template <int G>
static ValuesFn values_for(int dv) {
  switch (dv) {
    case 1: return &weighted_values<G, 1>;
    case 2: return &weighted_values<G, 2>;
    case 3: return &weighted_values<G, 3>;
    case 4: return &weighted_values<G, 4>;
    case 5: return &weighted_values<G, 5>;
    case 6: return &weighted_values<G, 6>;
    case 7: return &weighted_values<G, 7>;
    default: return &weighted_values<G, 8>;
  }
}

static ValuesFn values_fn(int g, int dv) {
  switch (g) {
    case 1: return values_for<1>(dv);
    case 2: return values_for<2>(dv);
    case 3: return values_for<3>(dv);
    default: return values_for<4>(dv);
  }
}

struct Shape {
  int64_t B, G, H, D, P;
};

static inline float hsum(vec v) {
  float a[kLanes];
  std::memcpy(a, &v, sizeof a);
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) a[i] += a[i + w];
  return a[0];
}

// One (row, head) pair of florence_cached_attention, head_dim = DV vectors; s: scratch of n rounded up to
// whole vectors.
template <int DV>
static void cached_pair(const float* q, const float* key, const float* value, const int32_t* source, int64_t n,
                        int64_t row_stride, float scale, float* s, float* out) {
  vec qv[DV];
  for (int v = 0; v < DV; ++v) qv[v] = load(q + v * kLanes);
  const int64_t D = DV * kLanes;
  for (int64_t j = 0; j < n; ++j) {
    const float* k = key + source[j] * row_stride + j * D;
    vec acc = qv[0] * load(k);
    for (int v = 1; v < DV; ++v) acc += qv[v] * load(k + v * kLanes);
    s[j] = hsum(acc) * scale;
  }
  const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;
  for (int64_t j = n; j < padded; ++j) s[j] = -std::numeric_limits<float>::infinity();
  softmax(s, 1, padded);
  vec acc[DV];
  for (int v = 0; v < DV; ++v) acc[v] = vec{};
  for (int64_t j = 0; j < n; ++j) {
    const float* x = value + source[j] * row_stride + j * D;
    for (int v = 0; v < DV; ++v) acc[v] += s[j] * load(x + v * kLanes);
  }
  for (int v = 0; v < DV; ++v) store(out + v * kLanes, acc[v]);
}

using CachedFn = void (*)(const float*, const float*, const float*, const int32_t*, int64_t, int64_t, float, float*,
                          float*);

static CachedFn cached_fn(int dv) {
  switch (dv) {
    case 1: return &cached_pair<1>;
    case 2: return &cached_pair<2>;
    case 3: return &cached_pair<3>;
    case 4: return &cached_pair<4>;
    case 5: return &cached_pair<5>;
    case 6: return &cached_pair<6>;
    case 7: return &cached_pair<7>;
    default: return &cached_pair<8>;
  }
}

// Pairs [t0, t1) of (prompt, head), pair t = b * H + h.
static void run(const Shape& sh, const float* q, const float* key, const float* value, const float* fill,
                float scale, float* out, int64_t t0, int64_t t1) {
  const int64_t S = sh.P * kPanel, D = sh.D, ldq = sh.H * D;
  thread_local std::vector<float> buffer;
  buffer.resize(static_cast<size_t>(kBeamBlock * S));
  float* s = buffer.data();
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t b = t / sh.H, h = t % sh.H;
    const float* kb = key + t * sh.P * D * kPanel;
    const float* vb = value + t * S * D;
    const float* fb = fill + b * S;
    for (int64_t g0 = 0; g0 < sh.G; g0 += kBeamBlock) {
      const int g = static_cast<int>(std::min<int64_t>(kBeamBlock, sh.G - g0));
      const int64_t row = (b * sh.G + g0) * sh.H + h;  // (b, g0, h) in (B, G, H, D)
      scores_fn(g)(q + row * D, ldq, kb, fb, s, sh.P, D, scale);
      softmax(s, g, S);
      values_fn(g, static_cast<int>(D / kLanes))(s, S, vb, out + row * D, ldq);
    }
  }
}

static ffi::Future CrossAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> key,
                                  ffi::Buffer<ffi::F32> value, ffi::Buffer<ffi::F32> fill, float scale,
                                  ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = key.dimensions(), vd = value.dimensions(), fd = fill.dimensions();
  const bool ok = qd.size() == 4 && kd.size() == 5 && vd.size() == 4 && fd.size() == 2 && kd[0] == qd[0] &&
                  kd[1] == qd[2] && kd[3] == qd[3] && kd[4] == kPanel && vd[0] == qd[0] && vd[1] == qd[2] &&
                  vd[2] == kd[2] * kPanel && vd[3] == qd[3] && fd[0] == qd[0] && fd[1] == vd[2] &&
                  qd[3] % kLanes == 0 && qd[3] / kLanes >= 1 && qd[3] / kLanes <= kMaxHeadVecs &&
                  out->dimensions().size() == 4 && std::equal(qd.begin(), qd.end(), out->dimensions().begin());
  if (!ok)
    return invalid(
        "florence_cross_attention: expected q (B, G, H, D), key (B, H, P, D, panel), value (B, H, P*panel, D), "
        "fill (B, P*panel), D a multiple of the vector width up to 8 vectors");
  const Shape sh{qd[0], qd[1], qd[2], qd[3], kd[2]};
  const float *qp = q.typed_data(), *kp = key.typed_data(), *vp = value.typed_data(), *fp = fill.typed_data();
  float* op = out->typed_data();
  return split(pool, sh.B * sh.H, sh.B * sh.H, [=](int64_t t0, int64_t t1) { run(sh, qp, kp, vp, fp, scale, op, t0, t1); });
}

static ffi::Future CachedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> key,
                                   ffi::Buffer<ffi::F32> value, ffi::Buffer<ffi::S32> source,
                                   ffi::Buffer<ffi::S32> length, float scale, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = key.dimensions(), vd = value.dimensions(), sd = source.dimensions();
  const auto od = out->dimensions();
  const bool ok = qd.size() == 3 && kd.size() == 4 && vd.size() == 4 && sd.size() == 2 && od.size() == 3 &&
                  length.element_count() == 1 && kd[0] == qd[0] && kd[1] == qd[1] && kd[3] == qd[2] &&
                  std::equal(kd.begin(), kd.end(), vd.begin()) && sd[0] == qd[0] && sd[1] == kd[2] &&
                  std::equal(qd.begin(), qd.end(), od.begin()) && qd[2] % kLanes == 0 && qd[2] / kLanes >= 1 &&
                  qd[2] / kLanes <= kMaxHeadVecs;
  const int64_t n = ok ? static_cast<int64_t>(length.typed_data()[0]) : 0;
  if (!ok || n < 1 || n > kd[2])
    return invalid(
        "florence_cached_attention: expected q (R, H, D), key and value (R, H, S, D), source (R, S) int32, "
        "length in 1 .. S, D a multiple of the vector width up to 8 vectors");
  const int64_t R = qd[0], H = qd[1], D = qd[2], S = kd[2];
  const float *qp = q.typed_data(), *kp = key.typed_data(), *vp = value.typed_data();
  const int32_t* sp = source.typed_data();
  float* op = out->typed_data();
  const CachedFn fn = cached_fn(static_cast<int>(D / kLanes));
  return split(pool, R * H, R * H, [=](int64_t t0, int64_t t1) {
    thread_local std::vector<float> buffer;
    buffer.resize(static_cast<size_t>((n + kLanes - 1) / kLanes * kLanes));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / H, h = t % H;
      // Row rr's slot j for head h is at ((rr * H + h) * S + j) * D: the head's offset here, rr's in fn.
      fn(qp + t * D, kp + h * S * D, vp + h * S * D, sp + r * S, n, H * S * D, scale, buffer.data(), op + t * D);
    }
  });
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(florence_cached_attention, CachedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(florence_cross_attention, CrossAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());

extern "C" int florence_cross_attention_lanes() { return kLanes; }
extern "C" int florence_cross_attention_max_head_dim() { return kLanes * kMaxHeadVecs; }
