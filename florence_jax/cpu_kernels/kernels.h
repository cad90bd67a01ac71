// What florence_jax's CPU kernels share: the vector width they are built for and the split of a call's work
// among XLA's intra-op threads.
#ifndef FLORENCE_JAX_CPU_KERNELS_H_
#define FLORENCE_JAX_CPU_KERNELS_H_

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace florence {

#if defined(__AVX512F__)
constexpr int kLanes = 16, kVecs = 2;  // 32 registers
#elif defined(__AVX__)
constexpr int kLanes = 8, kVecs = 1;   // 16 registers
#elif defined(__aarch64__)
constexpr int kLanes = 4, kVecs = 2;   // 32 registers
#else
constexpr int kLanes = 4, kVecs = 1;
#endif
// Columns of a packed panel (rows_product.cc's weights, cross_attention.cc's keys): kVecs vectors.
constexpr int kPanel = kLanes * kVecs;

typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t ivec __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }

inline vec splat(float x) { return vec{} + x; }

// A call's future, failed with this message (a bad operand shape).
inline xla::ffi::Future invalid(const char* message) {
  xla::ffi::Promise done;
  xla::ffi::Future future(done);
  done.SetError(xla::ffi::Error::InvalidArgument(message));
  return future;
}

// Runs part(i0, i1) over [0, n) in up to `tasks` parts, one per thread of XLA's intra-op pool (the calling
// thread runs the first); the returned future is ready when every part is.
template <typename Part>
xla::ffi::Future split(xla::ffi::ThreadPool& pool, int64_t n, int64_t tasks, Part part) {
  xla::ffi::Promise done;
  xla::ffi::Future future(done);
  tasks = std::max<int64_t>(1, std::min<int64_t>({tasks, n, static_cast<int64_t>(pool.num_threads())}));
  if (tasks == 1) {
    part(0, n);
    done.SetAvailable();
    return future;
  }
  xla::ffi::CountDownPromise left(done, tasks);
  for (int64_t t = 1; t < tasks; ++t)
    pool.Schedule([=]() mutable {
      part(n * t / tasks, n * (t + 1) / tasks);
      left.CountDown();
    });
  part(0, n / tasks);
  left.CountDown();
  return future;
}

}  // namespace florence

#endif  // FLORENCE_JAX_CPU_KERNELS_H_
