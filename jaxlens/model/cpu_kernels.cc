// jaxlens's CPU kernels for a few activation rows times a weight (see cpu_kernels.py).
//
// JaxlensBf16MatVec: one row times a bf16 weight. XLA:CPU's one-row bf16 dot is a scalar loop and
// its two-row one reads ~half the bytes per second of its one-row f32 dot, so bf16 decoding was
// slower than f32. This reads the bf16 weight where it lies, widens it in registers (a bf16 is the
// top half of an f32) and accumulates in f32: the exact bf16 x f32 products, summed in f32.
//
// JaxlensF32Rows / JaxlensBf16Rows: 2..8 rows times an f32 or bf16 weight (batched decoding).
// XLA:CPU's few-row dots read the weight at a quarter to a half of the machine's bandwidth; these
// stream each weight row once, contiguously, for all the rows together (see rows_kn, rows_nk), a
// bf16 weight widened in registers, the sums in f32.
//
// Built by cpu_kernels.py on the machine that runs them (-march=native), called through the XLA
// FFI; the work is split over XLA's intra-op threads.
//
//   trans=false: y[R, G, N] = sum_k x[R, K] * w[G, K, N]
//   trans=true:  y[R, N]    = sum_k x[R, K] * w[N, K]
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

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

void run_tile(Job& j, int64_t t);

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

void run_tile(Job& j, int64_t t) {
  if (j.trans) tile_nk(j, t); else tile_kn(j, t);
}

// Take tiles until none is left (the caller and each helper; a helper that starts late finds none).
template <class J>
void work(J& j) {
  for (;;) {
    const int64_t t = j.next.fetch_add(1);
    if (t >= j.n_tiles) return;
    run_tile(j, t);
    j.done.fetch_add(1, std::memory_order_release);
  }
}

// Run a job's tiles on the caller and up to pool.num_threads() helpers; return when all are done.
template <class J>
void run_job(ffi::ThreadPool& pool, const std::shared_ptr<J>& j) {
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), j->n_tiles - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([j] { work(*j); });
  work(*j);
  // Wait for tiles still in a helper's hands; yield after a while so that a helper sharing this
  // core (more threads than cores) can finish.
  for (int64_t spins = 0; j->done.load(std::memory_order_acquire) < j->n_tiles; ++spins)
    if (spins < 20000) cpu_relax(); else std::this_thread::yield();
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
  run_job(pool, j);
  return ffi::Error::Success();
}


// ---- a few rows, f32 or bf16 weights ----------------------------------------------------------
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));  // unaligned loads and stores
typedef uint16_t h8u __attribute__((vector_size(16), aligned(2)));
typedef uint32_t w8 __attribute__((vector_size(32)));
inline v8 load8(const float* p) { return *reinterpret_cast<const v8u*>(p); }
inline v8 load8(const uint16_t* p) {  // eight bf16, widened: each is the top half of an f32
  const w8 u = __builtin_convertvector(*reinterpret_cast<const h8u*>(p), w8) << 16;
  v8 f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) { return widen(*p); }
inline void store8(float* p, v8 v) { *reinterpret_cast<v8u*>(p) = v; }
inline v8 splat8(float s) { return v8{s, s, s, s, s, s, s, s}; }

constexpr int64_t kMaxRows = 8;   // rows per pass over the weight (more rows: more passes)
constexpr int64_t kWideCols = 1536;  // kn: columns per tile at most (6 KB contiguous per weight row)
constexpr int64_t kMinChunk = 64;    // kn: weight rows per K chunk at least

template <class T>
struct RowsJob {
  const float* x;
  const T* w;
  float* y;
  int64_t R, G, K, N;
  bool trans;
  int64_t tile, tiles_per_g, n_tiles;
  int64_t kchunks = 1;  // kn: K split into chunks, each summed into its own slice of `part`
  std::unique_ptr<float[]> part;  // [kchunks, R, G, N] (every element written by a tile), added into y in chunk order
  std::atomic<int64_t> next{0}, done{0};
};

// kn: columns [n0, n0 + width) of group g for rows [r0, r0 + RR), over weight rows [k0, k1), into
// out. The weight rows are streamed in order, four at a time, each read once for all RR rows; the
// sums live in a small buffer whose row stride is padded so that its rows and the weight rows do not fall into the same L1 sets (weight
// rows N floats apart would otherwise evict each other's lines).
template <int RR, class T>
void rows_kn(const RowsJob<T>& j, int64_t g, int64_t n0, int64_t width, int64_t r0, int64_t k0, int64_t k1,
             float* out) {
  const int64_t K = j.K, N = j.N, S = (width + 7) / 8 * 8 + 24, nv = width / 8;
  thread_local std::vector<float> buffer;
  if (buffer.size() < static_cast<size_t>(RR * S)) buffer.resize(RR * S);
  float* acc = buffer.data();
  std::fill(acc, acc + RR * S, 0.f);
  const float* x = j.x + r0 * K;
  const T* wg = j.w + g * K * N + n0;
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    const T* w = wg + k * N;
    for (int64_t v = 0; v < nv; ++v) {
      const v8 w0 = load8(w + 8 * v), w1 = load8(w + N + 8 * v), w2 = load8(w + 2 * N + 8 * v),
               w3 = load8(w + 3 * N + 8 * v);
      for (int r = 0; r < RR; ++r) {
        const float* xr = x + r * K + k;
        float* a = acc + r * S + 8 * v;
        store8(a, load8(a) + splat8(xr[0]) * w0 + splat8(xr[1]) * w1 + splat8(xr[2]) * w2 + splat8(xr[3]) * w3);
      }
    }
    for (int64_t c = nv * 8; c < width; ++c)
      for (int r = 0; r < RR; ++r) {
        const float* xr = x + r * K + k;
        acc[r * S + c] += xr[0] * load1(w + c) + xr[1] * load1(w + N + c) + xr[2] * load1(w + 2 * N + c) +
                          xr[3] * load1(w + 3 * N + c);
      }
  }
  for (; k < k1; ++k) {
    const T* w = wg + k * N;
    for (int r = 0; r < RR; ++r) {
      const float xk = x[r * K + k];
      for (int64_t c = 0; c < width; ++c) acc[r * S + c] += xk * load1(w + c);
    }
  }
  for (int r = 0; r < RR; ++r)
    std::memcpy(out + ((r0 + r) * j.G + g) * N + n0, acc + r * S, width * sizeof(float));
}

// nk: weight rows [n0, n1) for rows [r0, r0 + MR): MR x NB dot products over K at once, in 8
// lanes each (every weight row is read contiguously, NB at a time, once per MR activation rows).
template <int MR, int NB, class T>
void rows_nk_block(const RowsJob<T>& j, int64_t n, int64_t r0) {
  const int64_t K = j.K, kv = K / 8 * 8;
  v8 acc[MR][NB];
  for (int r = 0; r < MR; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = v8{};
  const T* w = j.w + n * K;
  const float* x = j.x + r0 * K;
  for (int64_t k = 0; k < kv; k += 8) {
    v8 wv[NB];
    for (int b = 0; b < NB; ++b) wv[b] = load8(w + b * K + k);
    for (int r = 0; r < MR; ++r) {
      const v8 xv = load8(x + r * K + k);
      for (int b = 0; b < NB; ++b) acc[r][b] += xv * wv[b];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int b = 0; b < NB; ++b) {
      float total = 0;
      for (int i = 0; i < 8; ++i) total += acc[r][b][i];
      for (int64_t k = kv; k < K; ++k) total += x[r * K + k] * load1(w + b * K + k);
      j.y[(r0 + r) * j.N + n + b] = total;
    }
}

template <int MR, class T>
void rows_nk(const RowsJob<T>& j, int64_t n0, int64_t n1, int64_t r0) {
  int64_t n = n0;
  for (; n + 3 <= n1; n += 3) rows_nk_block<MR, 3>(j, n, r0);
  for (; n < n1; ++n) rows_nk_block<MR, 1>(j, n, r0);
}

template <int RR, class T>
void rows_kn_dispatch(const RowsJob<T>& j, int64_t g, int64_t n0, int64_t width, int64_t r0, int64_t rows,
                      int64_t k0, int64_t k1, float* out) {
  if constexpr (RR > 1) {
    if (rows < RR) return rows_kn_dispatch<RR - 1>(j, g, n0, width, r0, rows, k0, k1, out);
  }
  rows_kn<RR>(j, g, n0, width, r0, k0, k1, out);
}

template <class T>
void run_tile(RowsJob<T>& j, int64_t t) {
  const int64_t chunk = t % j.kchunks, gt = t / j.kchunks;
  const int64_t g = gt / j.tiles_per_g, n0 = (gt % j.tiles_per_g) * j.tile, n1 = std::min(j.N, n0 + j.tile);
  const int64_t k0 = chunk * j.K / j.kchunks, k1 = (chunk + 1) * j.K / j.kchunks;
  float* out = j.kchunks > 1 ? j.part.get() + chunk * j.R * j.G * j.N : j.y;
  for (int64_t r0 = 0; r0 < j.R; r0 += kMaxRows) {
    const int64_t rows = std::min(kMaxRows, j.R - r0);
    if (!j.trans) {
      rows_kn_dispatch<kMaxRows>(j, g, n0, n1 - n0, r0, rows, k0, k1, out);
    } else {
      int64_t r = r0;
      for (; r + 4 <= r0 + rows; r += 4) rows_nk<4>(j, n0, n1, r);
      for (; r < r0 + rows; ++r) rows_nk<1>(j, n0, n1, r);
    }
  }
}

template <class T, class WBuffer>
ffi::Error Rows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, WBuffer w, ffi::ResultBuffer<ffi::F32> y, bool trans) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("rows kernel: x must be [rows, K]");
  auto j = std::make_shared<RowsJob<T>>();
  j->x = x.typed_data();
  j->w = reinterpret_cast<const T*>(w.untyped_data());
  j->y = y->typed_data();
  j->R = xd[0];
  j->K = xd[1];
  j->trans = trans;
  const int64_t threads = pool.num_threads() + 1;
  if (trans) {
    if (wd.size() != 2 || wd[1] != j->K || yd.size() != 2 || yd[0] != j->R || yd[1] != wd[0])
      return ffi::Error::InvalidArgument("rows kernel: trans wants x [R, K], w [N, K], y [R, N]");
    j->G = 1;
    j->N = wd[0];
    j->tile = 48;  // weight rows per tile: many tiles, so the threads finish together
    j->tiles_per_g = (j->N + j->tile - 1) / j->tile;
  } else {
    if (wd.size() != 3 || wd[1] != j->K || yd.size() != 3 || yd[0] != j->R || yd[1] != wd[0] || yd[2] != wd[2])
      return ffi::Error::InvalidArgument("rows kernel: wants x [R, K], w [G, K, N], y [R, G, N]");
    j->G = wd[0];
    j->N = wd[2];
    // Wide tiles stream the weight rows best. Too few of them for two per thread: split K instead
    // of narrowing the tiles (each thread then streams whole rows of its own block of the weight),
    // each chunk at least kMinChunk rows, the chunks' sums added in order afterwards.
    const int64_t per_g = (j->N + kWideCols - 1) / kWideCols;
    j->tile = ((j->N + per_g - 1) / per_g + 7) / 8 * 8;
    j->tiles_per_g = (j->N + j->tile - 1) / j->tile;
    const int64_t tiles = j->G * j->tiles_per_g;
    if (tiles < 2 * threads)
      j->kchunks = std::max<int64_t>(1, std::min((2 * threads + tiles - 1) / tiles, j->K / kMinChunk));
  }
  j->n_tiles = j->G * j->tiles_per_g * j->kchunks;
  if (j->R == 0 || j->N == 0 || j->G == 0) return ffi::Error::Success();
  const int64_t size = j->R * j->G * j->N;
  if (j->kchunks > 1) j->part.reset(new float[j->kchunks * size]);  // not zeroed: the tiles write it all
  run_job(pool, j);
  if (j->kchunks > 1) {
    float* y = j->y;
    const float* part = j->part.get();
    std::memcpy(y, part, size * sizeof(float));
    for (int64_t c = 1; c < j->kchunks; ++c)
      for (int64_t i = 0; i < size; ++i) y[i] += part[c * size + i];
  }
  return ffi::Error::Success();
}

ffi::Error F32Rows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, bool trans) {
  return Rows<float>(pool, x, w, y, trans);
}

ffi::Error Bf16Rows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                    ffi::ResultBuffer<ffi::F32> y, bool trans) {
  return Rows<uint16_t>(pool, x, w, y, trans);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlensBf16MatVec, MatVec,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlensF32Rows, F32Rows,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxlensBf16Rows, Bf16Rows,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans"));
