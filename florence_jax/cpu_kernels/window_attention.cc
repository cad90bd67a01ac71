// DaViT's window attention on the CPU: every head of every window, straight from the qkv projection's
// output.
//
//   qkv (W, N, 3C)   per window and token: q, k, v, each heads x head size (C = H * D), as the projection
//                    wrote them
//   out (W, N, C)    softmax(q k^T * scale) v per window and head, heads x head size: the output
//                    projection's input
//
// Why: a window is 144 tokens with heads of 32 channels, and XLA:CPU runs the two products of each (window,
// head) pair, 144 x 144 by 32, as a batch of small matrix products on one core at 23-37 GFLOP/s, after
// transposing q, k and v heads-major (docs/benchmarks.md). Here the (window, head) pairs are split among
// XLA's intra-op threads; a pair's keys are laid out transposed (D, N) and its values (N, D) in a small
// buffer that stays in cache, and its scores are made a block of rows at a time with every accumulator in a
// register, turned into probabilities and multiplied by the values before the next block.
//
// Float32 throughout, as the einsum path: scores are the dot product times the scale, the softmax subtracts
// the row's maximum, exponentiates (kernels.h's polynomial, within 2 ulp), divides by the sum; the
// probabilities multiply the values. Results differ from XLA's in the last bits only.
//
// Built at first use with the host's C++ compiler (florence_jax/cpu_kernels/__init__.py), registered with
// XLA as the FFI target "florence_window_attention".
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace florence;

constexpr int kRowBlock = 8;      // query rows whose scores are made together
constexpr int kColumnVecs = 3;    // score columns per register block: kColumnVecs vectors

// s[r][j .. j + CV * kLanes) = (q_r . k_j) * scale for R query rows (q: rows ldq apart) against the keys
// kt (D, np), transposed.
template <int R, int CV>
static void score_block(const float* q, int64_t ldq, const float* kt, int64_t np, int64_t D, float scale,
                        float* s) {
  vec acc[R][CV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CV; ++c) acc[r][c] = vec{};
  for (int64_t d = 0; d < D; ++d, kt += np) {
    vec kv[CV];
    for (int c = 0; c < CV; ++c) kv[c] = load(kt + c * kLanes);
    for (int r = 0; r < R; ++r) {
      const float qd = q[r * ldq + d];
      for (int c = 0; c < CV; ++c) acc[r][c] += qd * kv[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CV; ++c) store(s + r * np + c * kLanes, acc[r][c] * scale);
}

// All np columns of R rows' scores, in blocks of kColumnVecs vectors.
template <int R>
static void score_rows(const float* q, int64_t ldq, const float* kt, int64_t np, int64_t D, float scale,
                       float* s) {
  const int64_t vecs = np / kLanes;
  int64_t c = 0;
  for (; c + kColumnVecs <= vecs; c += kColumnVecs)
    score_block<R, kColumnVecs>(q, ldq, kt + c * kLanes, np, D, scale, s + c * kLanes);
  switch (vecs - c) {
    case 2: score_block<R, 2>(q, ldq, kt + c * kLanes, np, D, scale, s + c * kLanes); break;
    case 1: score_block<R, 1>(q, ldq, kt + c * kLanes, np, D, scale, s + c * kLanes); break;
    default: break;
  }
}

using ScoreFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float, float*);
using ValuesFn = void (*)(const float*, int64_t, const float*, float*, int64_t);

template <int... Rs>
static ScoreFn score_fn(int rows, std::integer_sequence<int, Rs...>) {
  static constexpr ScoreFn table[] = {&score_rows<Rs + 1>...};
  return table[rows - 1];
}

template <int R, int... Vs>
static ValuesFn values_of(int dv, std::integer_sequence<int, Vs...>) {
  static constexpr ValuesFn table[] = {&weighted_values<R, Vs + 1>...};
  return table[dv - 1];
}

template <int R>
static ValuesFn values_for(int dv) {
  return values_of<R>(dv, std::make_integer_sequence<int, kMaxHeadVecs>{});
}

template <int... Rs>
static ValuesFn values_fn(int rows, int dv, std::integer_sequence<int, Rs...>) {
  static constexpr ValuesFn (*table[])(int) = {&values_for<Rs + 1>...};
  return table[rows - 1](dv);
}

struct Shape {
  int64_t W, N, H, D;
};

// Pairs [t0, t1) of (window, head), pair t = w * H + h.
static void run(const Shape& sh, const float* qkv, float scale, float* out, int64_t t0, int64_t t1) {
  const int64_t N = sh.N, D = sh.D, C = sh.H * D, np = (N + kLanes - 1) / kLanes * kLanes;
  const int dv = static_cast<int>(D / kLanes);
  thread_local std::vector<float> buffer;
  buffer.resize(static_cast<size_t>(D * np + np * D + kRowBlock * np));
  float* kt = buffer.data();   // (D, np): keys transposed, zero past N
  float* v = kt + D * np;      // (np, D): values, zero past N
  float* s = v + np * D;       // (kRowBlock, np): a block of rows' scores, then probabilities
  std::fill(kt, kt + D * np, 0.0f);
  std::fill(v + N * D, v + np * D, 0.0f);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t w = t / sh.H, h = t % sh.H;
    const float* base = qkv + w * N * 3 * C + h * D;
    for (int64_t j = 0; j < N; ++j) {
      const float* k = base + j * 3 * C + C;
      for (int64_t d = 0; d < D; ++d) kt[d * np + j] = k[d];
      std::memcpy(v + j * D, k + C, D * sizeof(float));
    }
    for (int64_t i0 = 0; i0 < N; i0 += kRowBlock) {
      const int rows = static_cast<int>(std::min<int64_t>(kRowBlock, N - i0));
      score_fn(rows, std::make_integer_sequence<int, kRowBlock>{})(base + i0 * 3 * C, 3 * C, kt, np, D, scale, s);
      for (int r = 0; r < rows; ++r)
        for (int64_t j = N; j < np; ++j) s[r * np + j] = -std::numeric_limits<float>::infinity();
      softmax(s, rows, np);
      values_fn(rows, dv, std::make_integer_sequence<int, kRowBlock>{})(s, np, v,
                                                                        out + (w * N + i0) * C + h * D, C);
    }
  }
}

static ffi::Future WindowAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, int64_t heads, float scale,
                                   ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = qkv.dimensions(), od = out->dimensions();
  const bool ok = xd.size() == 3 && od.size() == 3 && heads >= 1 && xd[2] % (3 * heads) == 0 && od[0] == xd[0] &&
                  od[1] == xd[1] && od[2] * 3 == xd[2] && (od[2] / heads) % kLanes == 0 &&
                  od[2] / heads / kLanes >= 1 && od[2] / heads / kLanes <= kMaxHeadVecs && xd[1] >= 1;
  if (!ok)
    return invalid(
        "florence_window_attention: expected qkv (W, N, 3 * H * D), out (W, N, H * D), D a multiple of the "
        "vector width up to 8 vectors");
  const Shape sh{xd[0], xd[1], heads, od[2] / heads};
  const float* xp = qkv.typed_data();
  float* op = out->typed_data();
  // Chunks of 8 pairs (about 20 MFLOP with DaViT's windows), shared by every thread of XLA's pool.
  return share(pool, sh.W * sh.H, 8, sh.W * sh.H, [=](int64_t t0, int64_t t1) { run(sh, xp, scale, op, t0, t1); });
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(florence_window_attention, WindowAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("heads")
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());
