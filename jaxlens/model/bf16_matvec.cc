// jaxlens's CPU kernel for one activation row times a bf16 weight (see cpu_kernels.py).
//
// XLA:CPU's one-row bf16 dot is a scalar loop and its two-row one reads ~half the bytes per
// second of its one-row f32 dot, so bf16 decoding was slower than f32. This reads the bf16 weight
// where it lies, widens it in registers (a bf16 is the top half of an f32) and accumulates in f32:
// the exact bf16 x f32 products, summed in f32. Built by cpu_kernels.py on the machine that runs
// it (-march=native), called through the XLA FFI; the work is split over XLA's intra-op threads.
//
//   trans=false: y[R, G, N] = sum_k x[R, K] * w[G, K, N]
//   trans=true:  y[R, N]    = sum_k x[R, K] * w[N, K]
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float widen(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

struct Job {
  const float* x;
  const uint16_t* w;
  float* y;
  int64_t R, G, K, N;
  bool trans;
  int64_t tile, tiles_per_g, n_tiles;
  std::atomic<int64_t> next{0}, done{0};
};

// Columns [n0, n0 + tile) of group g, every row, over the whole K (four weight rows per pass, so
// the f32 accumulators are read and written once per four rows).
void tile_kn(const Job& j, int64_t t) {
  const int64_t g = t / j.tiles_per_g, n0 = (t % j.tiles_per_g) * j.tile;
  const int64_t width = std::min(j.N, n0 + j.tile) - n0;
  alignas(64) float acc[1024];
  const uint16_t* wg = j.w + g * j.K * j.N + n0;
  for (int64_t r = 0; r < j.R; ++r) {
    const float* xr = j.x + r * j.K;
    std::fill(acc, acc + width, 0.f);
    int64_t k = 0;
    for (; k + 4 <= j.K; k += 4) {
      const uint16_t *w0 = wg + k * j.N, *w1 = w0 + j.N, *w2 = w1 + j.N, *w3 = w2 + j.N;
      const float x0 = xr[k], x1 = xr[k + 1], x2 = xr[k + 2], x3 = xr[k + 3];
      for (int64_t n = 0; n < width; ++n)
        acc[n] += x0 * widen(w0[n]) + x1 * widen(w1[n]) + x2 * widen(w2[n]) + x3 * widen(w3[n]);
    }
    for (; k < j.K; ++k) {
      const uint16_t* w0 = wg + k * j.N;
      const float x0 = xr[k];
      for (int64_t n = 0; n < width; ++n) acc[n] += x0 * widen(w0[n]);
    }
    std::memcpy(j.y + (r * j.G + g) * j.N + n0, acc, width * sizeof(float));
  }
}

// Weight rows [n0, n0 + tile): one dot product over K per row and activation row, in 16 lanes.
void tile_nk(const Job& j, int64_t t) {
  const int64_t n0 = t * j.tile, n1 = std::min(j.N, n0 + j.tile);
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wn = j.w + n * j.K;
    for (int64_t r = 0; r < j.R; ++r) {
      const float* xr = j.x + r * j.K;
      float lanes[16] = {0};
      int64_t k = 0;
      for (; k + 16 <= j.K; k += 16)
        for (int i = 0; i < 16; ++i) lanes[i] += xr[k + i] * widen(wn[k + i]);
      float total = 0;
      for (int i = 0; i < 16; ++i) total += lanes[i];
      for (; k < j.K; ++k) total += xr[k] * widen(wn[k]);
      j.y[r * j.N + n] = total;
    }
  }
}

// Take tiles until none is left (the caller and each helper; a helper that starts late finds none).
void work(Job& j) {
  for (;;) {
    const int64_t t = j.next.fetch_add(1);
    if (t >= j.n_tiles) return;
    if (j.trans) tile_nk(j, t); else tile_kn(j, t);
    j.done.fetch_add(1, std::memory_order_release);
  }
}

ffi::Error MatVec(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                  ffi::ResultBuffer<ffi::F32> y, bool trans) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("bf16_matvec: x must be [rows, K]");
  auto j = std::make_shared<Job>();
  j->x = x.typed_data();
  j->w = reinterpret_cast<const uint16_t*>(w.untyped_data());
  j->y = y->typed_data();
  j->R = xd[0];
  j->K = xd[1];
  j->trans = trans;
  if (trans) {
    if (wd.size() != 2 || wd[1] != j->K || yd.size() != 2 || yd[0] != j->R || yd[1] != wd[0])
      return ffi::Error::InvalidArgument("bf16_matvec: trans wants x [R, K], w [N, K], y [R, N]");
    j->G = 1;
    j->N = wd[0];
    j->tile = 64;
    j->tiles_per_g = (j->N + j->tile - 1) / j->tile;
  } else {
    if (wd.size() != 3 || wd[1] != j->K || yd.size() != 3 || yd[0] != j->R || yd[1] != wd[0] || yd[2] != wd[2])
      return ffi::Error::InvalidArgument("bf16_matvec: wants x [R, K], w [G, K, N], y [R, G, N]");
    j->G = wd[0];
    j->N = wd[2];
    // Wide column tiles stream the weight rows best; equal widths balance the threads.
    const int64_t per_g = std::max<int64_t>(1, (j->N + 511) / 512);
    j->tile = std::min<int64_t>(1024, ((j->N + per_g - 1) / per_g + 15) / 16 * 16);
    j->tiles_per_g = (j->N + j->tile - 1) / j->tile;
  }
  j->n_tiles = j->G * j->tiles_per_g;
  if (j->R == 0 || j->N == 0 || j->G == 0) return ffi::Error::Success();
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), j->n_tiles - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([j] { work(*j); });
  work(*j);
  // Wait for tiles still in a helper's hands; yield after a while so that a helper sharing this
  // core (more threads than cores) can finish.
  for (int64_t spins = 0; j->done.load(std::memory_order_acquire) < j->n_tiles; ++spins)
    if (spins < 20000) cpu_relax(); else std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlensBf16MatVec, MatVec,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans"));
