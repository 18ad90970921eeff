// jaxrnn's native CPU kernel: the recurrence of the built-in cells (Elman tanh/relu, LSTM,
// GRU) as one XLA FFI call, each step's matmuls and gates fused and spread over threads.
//
// Compiled on first use by jaxrnn/_src/native.py (the system C++ compiler, -O3 -march=native)
// and registered as the FFI targets "jaxrnn_rnn_forward_cpu" (below),
// "jaxrnn_rnn_backward_cpu" (the gradient pass's backward loop, further down) and, for
// matmul_dtype=bfloat16, "jaxrnn_rnn_gradients_cpu" (the gradient pass's input and weight
// gradients after that loop, at the end). Semantics are those of jaxrnn/_src/fastpath.py's
// scans, step for step:
//
//   zx_t = x_t W_x + b_x,  z_t = h_{t-1} W_h + b_in   (gate-major columns)
//   elman: h_t = act(zx_t + z_t)
//   lstm:  i, f, g, o = σ(zx_i + z_i), σ(zx_f + z_f), tanh(zx_g + z_g), σ(zx_o + z_o)
//          c_t = f c_{t-1} + i g;  h_t = o tanh(c_t)
//   gru:   r = σ(zx_r + z_r);  u = σ(zx_z + z_z);  n = tanh(zx_n + r z_n)
//          h_t = (1 - u) n + u h_{t-1}
//
// A masked step holds the carry and outputs zeros; a reset zeroes the carry before the step
// (after it when running in reverse). For the gradient pass it also writes the residuals of
// fastpath's linear JVP rule: the carry h entering each step and the per-kind arrays (the
// Elman's, h, unless the caller takes it from the outputs).
//
// Batch: the per-step arrays are (N, T, B', ·): N runs of the sequence (the examples of a
// jax.vmap; else one), each B' rows wide, so that a vmapped call needs no transposes. The kernel
// runs their B = N·B' rows together (`step_row`); carries are (B, ·). Weights (w_x, b_x, w_h,
// b_in) may have a leading axis of E members (an ensemble under jax.vmap): member m's weights
// then compute the runs [m·N/E, (m+1)·N/E) (`run_members`).
//
// Threads: the hidden units are cut into one chunk per thread; a chunk's W_x and W_h columns
// (all gates of its units) are packed once per call (by the threads as they arrive,
// `pack_unclaimed`), so whoever computes the chunk needs nothing from the other chunks but
// h_{t-1}. Chunks are published once per step (`Shared`).
// Where each thread gets enough rows, the rows are cut into groups instead, one thread each,
// each group one chunk of all units, with no h to exchange (`row_groups`, `run_groups`).

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <new>
#include <thread>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// Intel AMX (bf16 tiles): the matmuls of `matmul_dtype=bfloat16`, where -march=native has it;
// else AVX512-BF16's VDPBF16PS where it has that (`gemm_bf16`).
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define JAXRNN_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef int32_t vi8 __attribute__((vector_size(32)));

enum Kind : int32_t { kElmanTanh = 0, kElmanRelu = 1, kLstm = 2, kGru = 3 };

// Float buffers aligned to a cache line, so that the kernels' 16-lane loads of packed weights
// and of z rows never straddle two lines (malloc only promises 16 bytes).
template <class T>
struct Aligned {
  using value_type = T;
  Aligned() = default;
  template <class U>
  Aligned(const Aligned<U>&) {}
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64)));
  }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <class U>
  bool operator==(const Aligned<U>&) const { return true; }
  template <class U>
  bool operator!=(const Aligned<U>&) const { return false; }
};
using Floats = std::vector<float, Aligned<float>>;
// The same, left uninitialized by `resize`: for the packed weights, which the packing writes
// whole every call. (Zero-filled first, the 16 MiB of an LSTM's W_h at H = 1024 were written
// twice a call.)
template <class T>
struct Uninitialized : Aligned<T> {
  template <class U>
  struct rebind {
    using other = Uninitialized<U>;
  };
  Uninitialized() = default;
  template <class U>
  Uninitialized(const Uninitialized<U>&) {}
  template <class U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
using Packed = std::vector<float, Uninitialized<float>>;
// bfloat16 buffers, aligned so that every 64-byte row of an AMX tile is one cache line (a
// tile loaded across lines took twice as long: B64 K512 N1024, 116 against 277 multiply-adds
// a cycle).
using Halves = std::vector<uint16_t, Aligned<uint16_t>>;

// Asks for transparent huge pages (2 MiB) under a large result buffer that is not yet in
// memory. XLA:CPU allocates its temporaries for a call as one block, and glibc maps a block of
// 32 MiB or more anew in each call, so the first write of every 4 KiB page faults: about 0.45
// ms per MiB on a 2-core Intel Xeon virtual machine, 0.14 under huge pages (the gradient pass
// of LSTM B64 T128 H512 took 65 000 faults a call). Where a buffer of at least 1 MiB is not
// resident (mincore on its first whole page: memory the allocator reuses is left as it is),
// the advice covers the 2 MiB pages the buffer touches, reaching past its ends into whatever
// lies around it, less than 2 MiB each side (in the block: other temporaries, which XLA
// writes in the same call), so that a buffer smaller than 4 MiB, or not aligned, gets huge
// pages too. Linux only (MADV_HUGEPAGE takes effect where the system's transparent_hugepage
// setting is "madvise" or "always"; it changes no contents); a hint, never an error.
void advise_huge_pages(const void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t p = reinterpret_cast<uintptr_t>(data);
  const uintptr_t probe = (p + page - 1) & ~(page - 1);
  unsigned char resident = 0;
  if (bytes < (uintptr_t{1} << 20) || probe + page > p + bytes ||
      mincore(reinterpret_cast<void*>(probe), 1, &resident) != 0 || (resident & 1))
    return;
  const uintptr_t begin = p & ~(kHuge - 1);
  const uintptr_t end = (p + bytes + kHuge - 1) & ~(kHuge - 1);
  madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// ---- elementwise math, the same code for one float, 8 and 16 lanes --------------------------

template <class V>
inline V splat(float a);
template <>
inline float splat<float>(float a) { return a; }
template <>
inline v16 splat<v16>(float a) { return v16{} + a; }
template <>
inline v8 splat<v8>(float a) { return v8{} + a; }

inline int32_t to_int(float a) { return static_cast<int32_t>(a); }
inline vi16 to_int(v16 a) { return __builtin_convertvector(a, vi16); }
inline float bits_to_float(int32_t a) { float f; std::memcpy(&f, &a, 4); return f; }
inline v16 bits_to_float(vi16 a) { v16 f; std::memcpy(&f, &a, 64); return f; }
inline vi8 to_int(v8 a) { return __builtin_convertvector(a, vi8); }
inline v8 bits_to_float(vi8 a) { v8 f; std::memcpy(&f, &a, 32); return f; }

template <class V>
inline V load(const float* p);
template <>
inline float load<float>(const float* p) { return *p; }
template <>
inline v16 load<v16>(const float* p) { v16 v; std::memcpy(&v, p, 64); return v; }
inline void store(float* p, float v) { *p = v; }
inline void store(float* p, v16 v) { std::memcpy(p, &v, 64); }
template <>
inline v8 load<v8>(const float* p) { v8 v; std::memcpy(&v, p, 32); return v; }
inline void store(float* p, v8 v) { std::memcpy(p, &v, 32); }

// exp(x) = 2^n · p(r), x = n ln2 + r, |r| ≤ ln2/2; degree-6 polynomial (relative error ~2e-7).
// NaN propagates; the argument is clamped to the float32 range of the result.
template <class V>
inline V exp_(V x) {
  x = x < -87.3f ? splat<V>(-87.3f) : x;
  x = x > 88.3f ? splat<V>(88.3f) : x;
  V n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest integer
  V r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
  V p = splat<V>(1.3981999507e-3f);
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * bits_to_float((to_int(n) + 127) << 23);
}

template <class V>
inline V sigmoid_(V x) { return 1.0f / (1.0f + exp_(-x)); }

// tanh(x) = sign(x) (1 - e)/(1 + e), e = exp(-2|x|); a Taylor polynomial near 0, where
// 1 - e would cancel.
template <class V>
inline V tanh_(V x) {
  V ax = x < 0.0f ? -x : x;
  V e = exp_(-2.0f * ax);
  V t = (1.0f - e) / (1.0f + e);
  t = x < 0.0f ? -t : t;
  V x2 = x * x;
  V small = x * (1.0f + x2 * (-0.333333333f + x2 * (0.133333333f - x2 * 0.0539682540f)));
  return ax < 0.0625f ? small : t;
}

template <class V>
inline V relu_(V x) { return (x > 0.0f) | (x != x) ? x : splat<V>(0.0f); }

// ---- z[B][N] += h[B][K] · W[K][N] ----------------------------------------------------------
//
// W is packed in column panels: panels of 32 columns, then one of 16, then the remaining
// columns, each panel a contiguous row-major (K, width) block. Unpacked, the rows of a wide W
// would sit one page apart and alias in the L1 cache (measured: half speed at H = 512).

inline int panel_width(int N, int j) { return N - j >= 32 ? 32 : (N - j >= 16 ? 16 : N - j); }

// One tile: R rows × NV·16 columns of z kept in registers over K rows of a panel, starting
// from `z0` (rows `ld0` apart: z itself, or 0 for one row of biases that every row starts
// from). With kPrefetch, it meanwhile prefetches `pf_lines` cache lines from `pf` into L2
// (`gemm_acc`: its share of the next block of W), spread over the k loop, a few every 4 k.
// Row r of the left operand is h[r · ldh + k], or with kT (`gemm_acc_t`) h[k · ldh + r].
// The tiles' sums are vectors of one register: `v16` with AVX-512 (F and BW); without it,
// `v8` (8 lanes, one AVX2 register). GCC lowers a `v16` there into pieces passed through the
// stack (each scalar of h splatted by 16 stores, each sum stored and reloaded every k): built
// for x86-64-v3, Elman B16 T256 H128 forward took 71 ms with `v16` tiles, 6.7 with `v8` ones.
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define JAXRNN_AVX512 1
using Lanes = v16;
#else
using Lanes = v8;
#endif
constexpr int kLanes = sizeof(Lanes) / sizeof(float);

template <int R, int NV, bool kPrefetch, bool kT = false>
inline void tile(const float* h, int ldh, const float* W, int K, const float* z0, int ld0,
                 float* z, int ldz, const char* pf, int pf_lines) {
  constexpr int ldw = 16 * NV, NL = ldw / kLanes;  // NL vectors of kLanes a row
  Lanes acc[R][NL];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NL; ++v) acc[r][v] = load<Lanes>(z0 + r * ld0 + kLanes * v);
  auto step = [&](int k) {
    Lanes w[NL];
    for (int v = 0; v < NL; ++v) w[v] = load<Lanes>(W + k * ldw + kLanes * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      float x = kT ? h[k * ldh + r] : h[r * ldh + k];
      for (int v = 0; v < NL; ++v) acc[r][v] += x * w[v];
    }
  };
  int k = 0;
  if constexpr (kPrefetch) {
    const int per = K >= 4 ? (pf_lines + K / 4 - 1) / (K / 4) : 0;  // lines every 4 k
    for (int issued = 0; k + 4 <= K; k += 4) {
      for (int q = 0; q < per && issued < pf_lines; ++q, ++issued)
        __builtin_prefetch(pf + 64 * static_cast<size_t>(issued), 0, 2);
#pragma GCC unroll 4
      for (int kk = k; kk < k + 4; ++kk) step(kk);
    }
  }
  for (; k < K; ++k) step(k);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NL; ++v) store(z + r * ldz + kLanes * v, acc[r][v]);
}

// The most rows of a tile, and of `row_panels`' panels at once. With AVX-512 a tile of 8 rows
// × 32 columns keeps its 16 sums in 16 of the 32 registers. With AVX2 (16 registers of 8
// lanes) a tile of 3 rows keeps its 12 sums in registers, and 3 of the 4 vectors of a row of
// W and the broadcast of h in the other 4 (GCC reads the fourth vector from memory). Measured
// on a 2-core Intel Xeon built for x86-64-v3, the quick grid's kernel ms with tiles of 2 / 3
// / 4 rows (a run of 7 rounds each; fwd, fwd+bwd): LSTM B64 T128 H512 213 / 184 / 226, 590 /
// 553 / 639; LSTM B16 T256 H128 7.7 / 6.8 / 8.6, 24.5 / 20.8 / 27.2 (4 rows spill sums to
// the stack).
#if defined(JAXRNN_AVX512)
constexpr int kTileRows = 8;
constexpr int kRowPanels = 4;
#else
constexpr int kTileRows = 3;
constexpr int kRowPanels = 2;
#endif

// The row tiles of one block of a panel (`kTileRows` rows at a time, then 4, 2 and 1 of what
// is left), which share out the prefetching of `pf_lines` lines from `pf`.
template <int NV, bool kPrefetch, bool kT = false>
inline void panel(const float* h, int ldh, const float* W, int K, const float* z0, int ld0,
                  float* z, int ldz, int B, const char* pf, int pf_lines) {
  const int step = kT ? 1 : ldh;  // from one row of the left operand to the next
  int share = 0, done = 0;
  if constexpr (kPrefetch) {
    const int tiles = kTileRows == 8 ? B / 8 + (B % 8 >= 4) + (B % 4 >= 2) + (B % 2)
                                     : B / 3 + (B % 3 != 0);
    share = tiles > 0 ? (pf_lines + tiles - 1) / tiles : 0;
  }
  auto lines = [&] {  // the next tile's share of the lines: its first one and how many
    const int n = std::min(share, pf_lines - done);
    const char* p = pf + 64 * static_cast<size_t>(done);
    done += n;
    return std::make_pair(p, n);
  };
  int b = 0;
  if constexpr (kTileRows == 8) {
    for (; b + 8 <= B; b += 8) {
      auto [p, n] = lines();
      tile<8, NV, kPrefetch, kT>(h + b * step, ldh, W, K, z0 + b * ld0, ld0, z + b * ldz, ldz,
                                 p, n);
    }
    if (b + 4 <= B) {
      auto [p, n] = lines();
      tile<4, NV, kPrefetch, kT>(h + b * step, ldh, W, K, z0 + b * ld0, ld0, z + b * ldz, ldz,
                                 p, n);
      b += 4;
    }
  }
  if constexpr (kTileRows == 3) {
    for (; b + 3 <= B; b += 3) {
      auto [p, n] = lines();
      tile<3, NV, kPrefetch, kT>(h + b * step, ldh, W, K, z0 + b * ld0, ld0, z + b * ldz, ldz,
                                 p, n);
    }
  }
  for (; b + 2 <= B; b += 2) {  // with kTileRows of 8 or 3, once at most
    auto [p, n] = lines();
    tile<2, NV, kPrefetch, kT>(h + b * step, ldh, W, K, z0 + b * ld0, ld0, z + b * ldz, ldz, p,
                               n);
  }
  if (b < B) {
    auto [p, n] = lines();
    tile<1, NV, kPrefetch, kT>(h + b * step, ldh, W, K, z0 + b * ld0, ld0, z + b * ldz, ldz, p,
                               n);
  }
}

// One row across P consecutive 32-column panels at once, over all K rows: 2·P independent
// sums. Alone, a panel gives a row two, and the latency of a multiply-add (4 cycles, 2 issued
// per cycle) holds them to a quarter of the peak rate. The order of each sum's terms is that
// of the tiles (k ascending), so the results are the same bit for bit. The row's k-th value
// is h[k], or with kT h[k · ldh].
template <int P, bool kT = false>
inline void row_panels(const float* h, int ldh, const float* W, int K, const float* z0,
                       float* z) {
  const size_t panel = static_cast<size_t>(K) * 32;
  constexpr int NL = 32 / kLanes;
  Lanes acc[P][NL];
  for (int q = 0; q < P; ++q)
    for (int v = 0; v < NL; ++v) acc[q][v] = load<Lanes>(z0 + 32 * q + kLanes * v);
  for (int k = 0; k < K; ++k) {
    const float x = kT ? h[static_cast<size_t>(k) * ldh] : h[k];
    for (int q = 0; q < P; ++q)
      for (int v = 0; v < NL; ++v)
        acc[q][v] += x * load<Lanes>(W + q * panel + k * 32 + kLanes * v);
  }
  for (int q = 0; q < P; ++q)
    for (int v = 0; v < NL; ++v) store(z + 32 * q + kLanes * v, acc[q][v]);
}

// In blocks of `rows` rows of a panel: 256 (32 KiB), which stay in L1 while the row tiles
// pass over, where L1 has room for them beside the rows of h (48 KiB or more; Intel Sapphire
// Rapids). Where it has less, all K rows at once (`panel_rows`): on a 2-core AMD EPYC
// (Zen 4, 32 KiB of L1) the tiles then ran 1-9 % faster, one thread, B × K × N (multiply-adds
// a second, blocks of 256 / all rows, G): 64 × 512 × 1024 54.6 / 56.8, 64 × 1024 × 2048 54.6
// / 55.6, 64 × 1024 × 256 53.2 / 57.9, 64 × 2048 × 256 56.2 / 57.6, 8 × 512 × 1024 56.3 /
// 57.2, 4 × 1024 × 1024 39.2 / 40.3, 2 × 1024 × 2048 30.4 / 32.4 (blocks of 128 rows: 52.6
// at 64 × 512 × 1024). The sums are the same either way (each tile adds k in order).
// An odd last row goes across the 32-column panels four at a time instead (`row_panels`).
// While the tiles run over a block, they prefetch the next one (the packed panels are one
// array): where W does not fit in L2, the first tile over each block would otherwise wait for
// it from L3. Measured on a 2-core Intel Xeon (Sapphire Rapids, 2 MiB of L2 a core, about 11
// bytes a cycle from L3), B64 K1024 N1024 (a thread's 4 MiB of an LSTM B64 H512 step): the
// first tile over a block took twice as long as the other seven (4100 against 2100 cycles);
// with one prefetch every 4 k the tiles took 2079 cycles on average instead of 2414, while in
// one burst before each tile the other tiles took as much longer instead. Only for a W of at
// least kPrefetchBytes: where it stays in L2 the prefetches only cost (LSTM B8 T100 H128 6 %
// slower, GRU B16 T256 H128 fwd+bwd up to 18 %), and the tiles run without them.
constexpr int64_t kPrefetchBytes = int64_t{1} << 20;
constexpr int kAllRows = std::numeric_limits<int>::max();

// The rows of a panel block on this CPU (its L1, asked once), or `forced` where positive
// (tests).
int panel_rows(int forced) {
  static const int rows = [] {
#if defined(__linux__) && defined(_SC_LEVEL1_DCACHE_SIZE)
    const long l1 = sysconf(_SC_LEVEL1_DCACHE_SIZE);  // 0 or -1 where unknown
    if (l1 > 0 && l1 < 48 * 1024) return kAllRows;
#endif
    return 256;
  }();
  return forced > 0 ? forced : rows;
}

template <bool kPrefetch, bool kT = false>
void gemm_acc_(const float* h, int ldh, const float* W, int N, int K, float* z, int ldz, int B,
               int rows, const float* bias) {
  if (K == 0) {  // no terms: z keeps its values, or takes the biases
    for (int b = 0; bias != nullptr && b < B; ++b)
      std::memcpy(z + static_cast<size_t>(b) * ldz, bias, N * sizeof(float));
    return;
  }
  const int kBlock = std::min(rows, K);
  const int tiled = B & ~1;  // rows the tiles of the 32-column panels take
  const float* W0 = W;
  for (int j = 0; j < N;) {
    const int width = panel_width(N, j);
    for (int k0 = 0; k0 < K; k0 += kBlock) {
      const int kn = std::min(kBlock, K - k0);
      const float* Wk = W + static_cast<size_t>(k0) * width;
      // The first block starts from the biases, if given; the others from z.
      const bool from_bias = bias != nullptr && k0 == 0;
      const float* z0 = from_bias ? bias + j : z + j;
      const int ld0 = from_bias ? 0 : ldz;
      // The next block: this panel's next rows, or the next panel's first ones.
      const bool last = k0 + kn >= K;
      const int next_width = last ? (j + width < N ? panel_width(N, j + width) : 0) : width;
      const int next_rows = last ? std::min(kBlock, K) : std::min(kBlock, K - k0 - kn);
      const int next_lines = static_cast<int>((int64_t{next_rows} * next_width * 4 + 63) / 64);
      const char* next = reinterpret_cast<const char*>(Wk + static_cast<size_t>(kn) * width);
      const float* hk = kT ? h + static_cast<size_t>(k0) * ldh : h + k0;  // from row k0
      if (width == 32) {
        panel<2, kPrefetch, kT>(hk, ldh, Wk, kn, z0, ld0, z + j, ldz, tiled, next, next_lines);
      } else if (width == 16) {
        panel<1, kPrefetch, kT>(hk, ldh, Wk, kn, z0, ld0, z + j, ldz, B, next, next_lines);
      } else {
        for (int b = 0; b < B; ++b)
          for (int c = 0; c < width; ++c) {
            float acc = z0[b * ld0 + c];
            for (int k = 0; k < kn; ++k)
              acc += (kT ? hk[k * ldh + b] : hk[b * ldh + k]) * Wk[k * width + c];
            z[static_cast<size_t>(b) * ldz + j + c] = acc;
          }
      }
    }
    W += static_cast<size_t>(K) * width;
    j += width;
  }
  if (tiled == B) return;
  const float* row = kT ? h + tiled : h + static_cast<size_t>(tiled) * ldh;
  float* out = z + static_cast<size_t>(tiled) * ldz;
  const float* out0 = bias != nullptr ? bias : out;
  const size_t panel = static_cast<size_t>(K) * 32;
  int j = 0;
  for (; j + 32 * kRowPanels <= N; j += 32 * kRowPanels)
    row_panels<kRowPanels, kT>(row, ldh, W0 + j / 32 * panel, K, out0 + j, out + j);
  for (; j + 32 <= N; j += 32)
    row_panels<1, kT>(row, ldh, W0 + j / 32 * panel, K, out0 + j, out + j);
}

// z[B][N] += h[B][K] · W[K][N] (h's rows ldh apart, W in panels, blocks of `rows` rows:
// `panel_rows`, z's rows `ldz` apart, 0: N), or, given `bias` (N values), z = bias + h · W
// without reading z.
void gemm_acc(const float* h, int ldh, const float* W, int N, int K, float* z, int B, int rows,
              const float* bias = nullptr, int ldz = 0) {
  ldz = ldz > 0 ? ldz : N;
  if (int64_t{4} * N * K >= kPrefetchBytes) {
    gemm_acc_<true>(h, ldh, W, N, K, z, ldz, B, rows, bias);
  } else {
    gemm_acc_<false>(h, ldh, W, N, K, z, ldz, B, rows, bias);
  }
}

// z[B][N] += aᵀ · W for a (K, B) matrix (rows lda apart): `gemm_acc` with the left operand
// transposed, B rows of z from B columns of a.
void gemm_acc_t(const float* a, int lda, const float* W, int N, int K, float* z, int ldz,
                int B, int rows) {
  if (int64_t{4} * N * K >= kPrefetchBytes) {
    gemm_acc_<true, true>(a, lda, W, N, K, z, ldz, B, rows, nullptr);
  } else {
    gemm_acc_<false, true>(a, lda, W, N, K, z, ldz, B, rows, nullptr);
  }
}

// ---- z[B][N] += bf16(a)[B][K] · bf16(W)[K][N] on AMX tiles (matmul_dtype=bfloat16) ----------
//
// The products of bfloat16 operands, summed in float32: `matmul_dtype=bfloat16`'s matmuls
// (fastpath._dot), each product exact in float32 as XLA's, the sums in another order (and
// operands under bfloat16's normal range, 1.2e-38, count as zero on the tiles). One
// TDPBF16PS multiplies a 16 × 32 tile of the left operand by a 32 × 16 one of the right into
// 16 × 16 float32 sums. Measured on a 2-core Intel Xeon (Sapphire Rapids): 550 multiply-adds
// per TSC cycle with the operands in tile registers, 496 loading the right ones from L1,
// against 42 for AVX-512 float32 multiply-adds (and 21 for AVX512-BF16's VDPBF16PS, which is
// why the bf16 path uses tiles or nothing).
//
// Layouts: the left operand `a` bfloat16 in blocks of kBlock16 columns, each block Bp rows of
// its width (Bp a multiple of 16, the width a multiple of 32, zero past the real rows and
// columns), so that a block of all rows (32 KiB at B = 64) stays in L1 while the column
// blocks of W pass; z float32, Bp rows of stride ldz; W (Kp × Np) packed in column blocks of
// 16, each Kp / 2 rows of 16 pairs (k even, k odd) (the tiles' "VNNI" layout, `vnni_index`),
// zero past the real ones. (Packed block of rows by block of rows, so that the matmul reads W
// from start to end, it measured no faster alone and slower in the kernel: LSTM B16 T256 H128
// forward 2.85-3.32 against 2.44-2.70 ms.)

inline int round_up(int n, int m) { return (n + m - 1) / m * m; }

constexpr int kBlock16 = 256;

// Where element (k, j) of a Kp × Np matrix lies in `gemm_bf16`'s packing of it.
inline size_t vnni_index(int k, int j, int Kp) {
  return static_cast<size_t>(j / 16) * Kp * 16 + (k / 2) * 32 + (j % 16) * 2 + k % 2;
}

// float32 to bfloat16, rounding to nearest even (NaN stays NaN), as XLA converts.
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded);
}

// `to_bf16`'s value back in float32: f rounded to bfloat16's precision.
inline float bf16_rounded(float f) {
  const uint32_t u = uint32_t{to_bf16(f)} << 16;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// `to_bf16` of 16 floats' bits, each in the low half of its 32-bit lane.
inline __m512i to_bf16_lanes(__m512i u) {
  const __m512i high = _mm512_srli_epi32(u, 16);
  const __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)),
                       _mm512_and_si512(high, _mm512_set1_epi32(1))),
      16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(
      _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  return _mm512_mask_or_epi32(rounded, nan, high, _mm512_set1_epi32(0x40));
}
#endif

// n floats to bfloat16 (`to_bf16`), 16 at a time with AVX-512 (the compiler left the scalar
// loop unvectorized: 0.9 cycles an element at B64 K300).
inline void to_bf16_row(const float* src, uint16_t* dst, int n) {
  int k = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  for (; k + 16 <= n; k += 16) {
    const __m512i out = to_bf16_lanes(_mm512_loadu_si512(src + k));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k), _mm512_cvtepi32_epi16(out));
  }
#endif
  for (; k < n; ++k) dst[k] = to_bf16(src[k]);
}

// n floats rounded to bfloat16's precision (`bf16_rounded`), kept in float32.
inline void bf16_rounded_row(const float* src, float* dst, int n) {
  int k = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  for (; k + 16 <= n; k += 16)
    _mm512_storeu_si512(dst + k,
                        _mm512_slli_epi32(to_bf16_lanes(_mm512_loadu_si512(src + k)), 16));
#endif
  for (; k < n; ++k) dst[k] = bf16_rounded(src[k]);
}

// Rows [0, B) of a float32 matrix (rows at `row(b)`, K wide) as P left operands of
// `gemm_bf16`, `size` elements apart: each Bp × Kp bfloat16 in blocks of kBlock16 columns,
// zero past B rows and K columns. `convert(src, dst, n)` writes n elements of a row's P parts
// (dst[0..P)).
template <int P, class RowFn, class Convert>
void left_operands(RowFn row, int B, int K, int Bp, int Kp, uint16_t* out, size_t size,
                   Convert convert) {
  for (int k0 = 0; k0 < Kp; k0 += kBlock16) {
    const int kn = std::min(kBlock16, Kp - k0), real = std::clamp(K - k0, 0, kn);
    const size_t block = static_cast<size_t>(k0) * Bp;
    for (int b = 0; b < B; ++b) {
      const size_t at = block + static_cast<size_t>(b) * kn;
      uint16_t* dst[P];
      for (int q = 0; q < P; ++q) dst[q] = out + q * size + at;
      convert(row(b) + k0, dst, real);
      for (int q = 0; q < P; ++q) std::fill(dst[q] + real, dst[q] + kn, uint16_t{0});
    }
    for (int q = 0; q < P; ++q)
      std::fill(out + q * size + block + static_cast<size_t>(B) * kn,
                out + q * size + block + static_cast<size_t>(Bp) * kn, uint16_t{0});
  }
}

// The rows as one left operand of `gemm_bf16`, rounded to bfloat16 (`to_bf16`).
template <class RowFn>
void to_bf16_rows(RowFn row, int B, int K, int Bp, int Kp, uint16_t* out) {
  left_operands<1>(row, B, K, Bp, Kp, out, 0,
                   [](const float* src, uint16_t* const* dst, int n) { to_bf16_row(src, dst[0], n); });
}

// A float32 x as three bfloat16 parts whose sum is x exactly: x's top, middle and low 8 bits
// of significand, each cut off toward zero (x - p1 and (x - p1) - p2 are exact in float32, and
// the last has at most 8 bits). So a float32 operand times a bfloat16 one is three tile
// products summed in float32 (`gemm_bf16`), each product exact: the backward kernel's
// ct_v W_hᵀ in bf16 mode. Infinities and NaN go whole into the first part.
inline void split3(float x, uint16_t* p1, uint16_t* p2, uint16_t* p3) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const bool special = (u & 0x7f800000u) == 0x7f800000u;
  const uint32_t hi = (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : u >> 16;
  *p1 = static_cast<uint16_t>(hi);
  const uint32_t hi_bits = hi << 16;
  float top, r1, r2;
  std::memcpy(&top, &hi_bits, 4);
  r1 = special ? 0.0f : x - top;
  std::memcpy(&u, &r1, 4);
  *p2 = static_cast<uint16_t>(u >> 16);
  const uint32_t mid_bits = (u >> 16) << 16;
  float mid;
  std::memcpy(&mid, &mid_bits, 4);
  r2 = r1 - mid;
  std::memcpy(&u, &r2, 4);
  *p3 = static_cast<uint16_t>(u >> 16);
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// `split3` of 16 floats (their bits `u`): the parts in the low 16 bits of each 32-bit lane.
inline void split3_v(__m512i u, __m512i* p) {
  const __m512i expo = _mm512_set1_epi32(0x7f800000), abs = _mm512_set1_epi32(0x7fffffff);
  const __m512i qnan = _mm512_set1_epi32(0x7fc0), high = _mm512_set1_epi32(-65536);
  const __mmask16 special = _mm512_cmpeq_epi32_mask(_mm512_and_si512(u, expo), expo);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, abs), expo);
  const __m512i hi = _mm512_mask_mov_epi32(_mm512_srli_epi32(u, 16), nan, qnan);
  const __m512 x = _mm512_castsi512_ps(u);
  const __m512 top = _mm512_castsi512_ps(_mm512_slli_epi32(hi, 16));
  const __m512 r1 = _mm512_maskz_sub_ps(static_cast<__mmask16>(~special), x, top);
  const __m512i u1 = _mm512_castps_si512(r1);
  const __m512 r2 = _mm512_sub_ps(r1, _mm512_castsi512_ps(_mm512_and_si512(u1, high)));
  p[0] = hi;
  p[1] = _mm512_srli_epi32(u1, 16);
  p[2] = _mm512_srli_epi32(_mm512_castps_si512(r2), 16);
}
#endif

// n floats as three rows of parts (`split3`), 16 at a time with AVX-512.
inline void split3_row(const float* src, uint16_t* d1, uint16_t* d2, uint16_t* d3, int n) {
  int k = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  for (; k + 16 <= n; k += 16) {
    __m512i p[3];
    split3_v(_mm512_loadu_si512(src + k), p);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d1 + k), _mm512_cvtepi32_epi16(p[0]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d2 + k), _mm512_cvtepi32_epi16(p[1]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d3 + k), _mm512_cvtepi32_epi16(p[2]));
  }
#endif
  for (; k < n; ++k) split3(src[k], d1 + k, d2 + k, d3 + k);
}

// The rows as their three parts (`split3`), three left operands `size` elements apart.
template <class RowFn>
void split3_rows(RowFn row, int B, int K, int Bp, int Kp, uint16_t* out, size_t size) {
  left_operands<3>(row, B, K, Bp, Kp, out, size, [](const float* src, uint16_t* const* dst, int n) {
    split3_row(src, dst[0], dst[1], dst[2], n);
  });
}

// Per chunk c of `chunks` (units [start[c], start[c+1])), a K × N_c matrix packed as
// `gemm_bf16` takes it (N_c = `per_unit` columns a unit), one after another: Kp · round_up(N_c,
// 16) elements each at (*offsets)[c], zero past the real ones. `row(c, k, dst)` writes row k
// of chunk c's matrix (N_c floats) to dst. Two rows at a time, each converted in one pass
// (`to_bf16_row`), then interleaved into the tiles' pairs. Measured when the forward call
// packed its weights on one thread: LSTM B64 T128 H512 took 26.8 M cycles for it element
// by element down the columns (a quarter of the call), 15.9 M element by element along the
// rows, 5.8 M two rows at a time as here. The forward went from 37.5–38.8 to 31.1–32.4 ms,
// LSTM B64 T100 H1024's from 137–148 to 89–93 (alternating processes).
// `bf16_layout` sizes `out` (zeroed) and sets the offsets; `pack_chunk_bf16` writes one
// chunk (N_c columns) at its offset, or into a buffer of its own (a forward call's spare).
inline void bf16_layout(const std::vector<int>& start, int chunks, int per_unit, int K,
                        Halves* out, std::vector<size_t>* offsets) {
  const size_t Kp = round_up(K, 32);
  offsets->resize(chunks);
  size_t size = 0;
  for (int c = 0; c < chunks; ++c) {
    (*offsets)[c] = size;
    size += Kp * round_up(per_unit * (start[c + 1] - start[c]), 16);
  }
  out->assign(size, 0);
}

template <class Row>
void pack_chunk_bf16(int c, int N, int K, Row row, uint16_t* out) {
  const int Kp = round_up(K, 32);
  std::vector<float> floats(N);
  Halves pair(2 * static_cast<size_t>(N));
  uint16_t *first = pair.data(), *second = first + N;
  for (int k = 0; k < K; k += 2) {
    row(c, k, floats.data());
    to_bf16_row(floats.data(), first, N);
    if (k + 1 < K) {
      row(c, k + 1, floats.data());
      to_bf16_row(floats.data(), second, N);
    } else {
      std::fill_n(second, N, 0);
    }
    for (int j0 = 0; j0 < N; j0 += 16) {  // (k, j0) to (k + 1, j0 + 15): 32 in a row
      uint16_t* dst = out + vnni_index(k, j0, Kp);
      for (int j = j0; j < std::min(N, j0 + 16); ++j) {
        dst[(j - j0) * 2] = first[j];
        dst[(j - j0) * 2 + 1] = second[j];
      }
    }
  }
}

template <class Row>
void pack_chunks_bf16(const std::vector<int>& start, int chunks, int per_unit, int K, Row row,
                      Halves* out, std::vector<size_t>* offsets) {
  bf16_layout(start, chunks, per_unit, K, out, offsets);
  for (int c = 0; c < chunks; ++c)
    pack_chunk_bf16(c, per_unit * (start[c + 1] - start[c]), K, row, out->data() + (*offsets)[c]);
}

#ifdef JAXRNN_AMX
// Linux gives a process the tiles' 8 KiB of state only once asked (arch_prctl).
bool amx_ready() {
  static const bool ready = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                    18 /* XFEATURE_XTILEDATA */) == 0;
  return ready;
}

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Every tile 16 rows of 64 bytes, for this thread.
void set_tiles() {
  TileConfig cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// RB × NB output tiles (16 × 16 each, tiles 0-3) of z (stride ldz floats) += a (rows of
// stride K bfloat16, K a multiple of 32) · Σ_q W_q over K: P right operands `ldq` elements
// apart, each packed as `gemm_bf16` takes it (column blocks `ldw` apart). Left tiles 4-5,
// right 6-7; the k loop loads each left tile once for all P parts (the gradient kernel's
// three parts of a float32 cotangent, `gemm_parts3`).
template <int RB, int NB, int P = 1>
inline void amx_block(const uint16_t* a, int K, const uint16_t* W, size_t ldw, size_t ldq,
                      float* z, int ldz) {
  const int sa = K * 2, sz = ldz * 4;
  float* z1 = z + static_cast<size_t>(16) * ldz;
  _tile_loadd(0, z, sz);
  if constexpr (NB > 1) _tile_loadd(1, z + 16, sz);
  if constexpr (RB > 1) _tile_loadd(2, z1, sz);
  if constexpr (RB > 1 && NB > 1) _tile_loadd(3, z1 + 16, sz);
  for (int k = 0; k < K; k += 32) {
    _tile_loadd(4, a + k, sa);
    if constexpr (RB > 1) _tile_loadd(5, a + static_cast<size_t>(16) * K + k, sa);
    for (int q = 0; q < P; ++q) {
      const uint16_t* Wq = W + q * ldq + static_cast<size_t>(k) * 16;
      _tile_loadd(6, Wq, 64);
      if constexpr (NB > 1) _tile_loadd(7, Wq + ldw, 64);
      _tile_dpbf16ps(0, 4, 6);
      if constexpr (NB > 1) _tile_dpbf16ps(1, 4, 7);
      if constexpr (RB > 1) _tile_dpbf16ps(2, 5, 6);
      if constexpr (RB > 1 && NB > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, z, sz);
  if constexpr (NB > 1) _tile_stored(1, z + 16, sz);
  if constexpr (RB > 1) _tile_stored(2, z1, sz);
  if constexpr (RB > 1 && NB > 1) _tile_stored(3, z1 + 16, sz);
}

// z (Bp × Np of stride ldz) += a (Bp × Kp, `to_bf16_rows`) · W (Kp × Np packed): per block of
// columns of `a`, two column blocks of W at a time, two row blocks at a time. Measured alone
// on the Intel machine (medians of 400 calls, multiply-adds per TSC cycle), against all of Kp
// at once: B64 K512 N1024 256–281 against 241–247, B64 K1024 N2048 189–206 against 166–173;
// B16 K128 N512 (one block) 203–240 either way. Software prefetching of W's next column
// blocks made it slower (B64 K1024 N2048 147, K512 224).
void gemm_bf16(const uint16_t* a, int Kp, const uint16_t* W, int Np, float* z, int ldz,
               int Bp, size_t ldw = 0, int /*rows: the tiles take 16 at once*/ = 0) {
  set_tiles();
  // Between W's column blocks: Kp · 16, or more where W is rows of a taller packed matrix.
  if (ldw == 0) ldw = static_cast<size_t>(Kp) * 16;
  for (int k0 = 0; k0 < Kp; k0 += kBlock16) {
    const int kn = std::min(kBlock16, Kp - k0);
    const uint16_t* ak = a + static_cast<size_t>(k0) * Bp;
    for (int j = 0; j < Np; j += 32) {
      const bool two = j + 32 <= Np;
      const uint16_t* Wj = W + (j / 16) * ldw + static_cast<size_t>(k0) * 16;
      for (int b = 0; b < Bp; b += 32) {
        const uint16_t* ab = ak + static_cast<size_t>(b) * kn;
        float* zb = z + static_cast<size_t>(b) * ldz + j;
        if (b + 32 <= Bp) {
          if (two) amx_block<2, 2>(ab, kn, Wj, ldw, 0, zb, ldz);
          else amx_block<2, 1>(ab, kn, Wj, ldw, 0, zb, ldz);
        } else {
          if (two) amx_block<1, 2>(ab, kn, Wj, ldw, 0, zb, ldz);
          else amx_block<1, 1>(ab, kn, Wj, ldw, 0, zb, ldz);
        }
      }
    }
  }
  _tile_release();
}
#elif defined(__AVX512BF16__)
bool amx_ready() { return false; }

// Without AMX, with AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake): the same products on
// VDPBF16PS, which adds a pair of bfloat16 products to each float32 lane, W's (k, k + 1) pairs
// of 16 columns being one 64-byte row of its packing. R rows × NV·16 columns of z in
// registers, `a`'s pair for a row broadcast to every lane. Measured on a 2-core AMD EPYC (Zen
// 4): a register-only loop of VDPBF16PS reaches 115 G multiply-adds per second on one core,
// its float32 multiply-adds 57.
template <int R, int NV>
inline void bf16_tile(const uint16_t* a, int kn, const uint16_t* W, size_t ldw, float* z,
                      int ldz) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_loadu_ps(z + r * ldz + 16 * v);
  for (int k = 0; k < kn; k += 2) {
    __m512bh w[NV];
    for (int v = 0; v < NV; ++v)
      w[v] = (__m512bh)_mm512_loadu_si512(W + v * ldw + static_cast<size_t>(k) * 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      uint32_t pair;
      std::memcpy(&pair, a + static_cast<size_t>(r) * kn + k, 4);
      const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], x, w[v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(z + r * ldz + 16 * v, acc[r][v]);
}

template <int R>
inline void bf16_tiles(const uint16_t* a, int kn, const uint16_t* W, size_t ldw, float* z,
                       int ldz, bool two) {
  if (two) bf16_tile<R, 2>(a, kn, W, ldw, z, ldz);
  else bf16_tile<R, 1>(a, kn, W, ldw, z, ldz);
}

// `gemm_bf16`'s contract (above) on VDPBF16PS: per block of `a`'s columns, 32 columns of W at
// a time (16 at the end), 8 rows at a time, then 4, 2 and 1, over the first `rows` of the Bp
// (the rows past them are padding, whose sums no caller reads: the tiles take 16 rows at
// once, but here they would cost as much as real ones; LSTM B1 T100 H1024 forward took 97 ms
// with them against 24 for the float32 kernel).
void gemm_bf16(const uint16_t* a, int Kp, const uint16_t* W, int Np, float* z, int ldz,
               int Bp, size_t ldw = 0, int rows = 0) {
  if (ldw == 0) ldw = static_cast<size_t>(Kp) * 16;
  if (rows <= 0) rows = Bp;
  for (int k0 = 0; k0 < Kp; k0 += kBlock16) {
    const int kn = std::min(kBlock16, Kp - k0);
    const uint16_t* ak = a + static_cast<size_t>(k0) * Bp;
    for (int j = 0; j < Np; j += 32) {
      const uint16_t* Wj = W + (j / 16) * ldw + static_cast<size_t>(k0) * 16;
      const bool two = j + 32 <= Np;
      auto at = [&](int b) { return ak + static_cast<size_t>(b) * kn; };
      auto out = [&](int b) { return z + static_cast<size_t>(b) * ldz + j; };
      int b = 0;
      for (; b + 8 <= rows; b += 8) bf16_tiles<8>(at(b), kn, Wj, ldw, out(b), ldz, two);
      if (b + 4 <= rows) bf16_tiles<4>(at(b), kn, Wj, ldw, out(b), ldz, two), b += 4;
      if (b + 2 <= rows) bf16_tiles<2>(at(b), kn, Wj, ldw, out(b), ldz, two), b += 2;
      if (b < rows) bf16_tiles<1>(at(b), kn, Wj, ldw, out(b), ldz, two);
    }
  }
}
#else
bool amx_ready() { return false; }
void gemm_bf16(const uint16_t*, int, const uint16_t*, int, float*, int, int, size_t = 0,
               int = 0) {
  std::abort();
}
#endif

// Whether `gemm_bf16` runs here: on AMX tiles (compiled for them, and granted by the OS), or
// on AVX512-BF16 (compiled for it, without AMX).
bool bf16_ready() {
#if defined(JAXRNN_AMX)
  return amx_ready();
#elif defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

// ---- the gates of one row of units ---------------------------------------------------------

struct Row {
  const float* zx;  // x_t W_x + b_x for this chunk's units, gate g of unit u at zx[g*U + u]
  const float* z;   // h_{t-1} W_h + b_in, the same layout
  const float *h_in, *c_in;  // c: the LSTM cell state
  float *h_out, *c_out, *y;
  float* res;  // null, or the residuals of the gradient pass: residual j of unit u at res[j*U + u]
  int U;
  bool take, zero_after;
};

template <int kind, class V>
inline void units(const Row& w, int u) {
  const int U = w.U;
  V h_in = load<V>(w.h_in + u);
  V h, c_new{};
  if (kind == kElmanTanh || kind == kElmanRelu) {
    V a = load<V>(w.zx + u) + load<V>(w.z + u);
    h = kind == kElmanTanh ? tanh_(a) : relu_(a);
    if (w.res) store(w.res + u, h);
  } else if (kind == kLstm) {
    V i = sigmoid_(load<V>(w.zx + u) + load<V>(w.z + u));
    V f = sigmoid_(load<V>(w.zx + U + u) + load<V>(w.z + U + u));
    V g = tanh_(load<V>(w.zx + 2 * U + u) + load<V>(w.z + 2 * U + u));
    V o = sigmoid_(load<V>(w.zx + 3 * U + u) + load<V>(w.z + 3 * U + u));
    V c_in = load<V>(w.c_in + u);
    c_new = f * c_in + i * g;
    const V tc = tanh_(c_new);
    h = o * tc;
    if (w.res) {  // fastpath.lstm_residuals: the gates' slopes, f, o·tanh'(c)
      store(w.res + u, g * i * (1.0f - i));
      store(w.res + U + u, c_in * f * (1.0f - f));
      store(w.res + 2 * U + u, i * (1.0f - g * g));
      store(w.res + 3 * U + u, o * (1.0f - o) * tc);
      store(w.res + 4 * U + u, f);
      store(w.res + 5 * U + u, o * (1.0f - tc * tc));
    }
    if (!w.take) c_new = c_in;
    store(w.c_out + u, w.zero_after ? splat<V>(0.0f) : c_new);
  } else {
    V r = sigmoid_(load<V>(w.zx + u) + load<V>(w.z + u));
    V up = sigmoid_(load<V>(w.zx + U + u) + load<V>(w.z + U + u));
    const V hn = load<V>(w.z + 2 * U + u);
    V n = tanh_(load<V>(w.zx + 2 * U + u) + r * hn);
    h = (1.0f - up) * n + up * h_in;
    if (w.res) {  // fastpath._gru_primal's (r, z, n, hn)
      store(w.res + u, r);
      store(w.res + U + u, up);
      store(w.res + 2 * U + u, n);
      store(w.res + 3 * U + u, hn);
    }
  }
  store(w.y + u, w.take ? h : splat<V>(0.0f));
  V carry = w.take ? h : h_in;
  store(w.h_out + u, w.zero_after ? splat<V>(0.0f) : carry);
}

// The units of one row: `kLanes` at a time (one register: 16 with AVX-512, else 8), then one
// at a time.
template <class R, void (*Vector)(const R&, int), void (*Scalar)(const R&, int)>
void over_units(const R& w) {
  int u = 0;
  for (; u + kLanes <= w.U; u += kLanes) Vector(w, u);
  for (; u < w.U; ++u) Scalar(w, u);
}

template <int kind>
struct ForwardRow {
  static void run(const Row& w) { over_units<Row, units<kind, Lanes>, units<kind, float>>(w); }
};

// A per-row function of the kind: `Rows<kind>::run` for a row type R.
template <template <int> class Rows, class R>
void (*row_fn(int kind))(const R&) {
  switch (kind) {
    case kElmanTanh: return Rows<kElmanTanh>::run;
    case kElmanRelu: return Rows<kElmanRelu>::run;
    case kLstm: return Rows<kLstm>::run;
    default: return Rows<kGru>::run;
  }
}

// ---- threads -------------------------------------------------------------------------------

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

int cpu_count() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

// Threads for a problem: the calling one plus what XLA's intra-op pool adds, at most one per
// available core; one when a step's matmuls are too small to pay for the per-step hand-off
// (under 2^16 multiply-adds: B·G·H·(H + I), I the width of the inputs the kernel projects
// itself, 0 where they come projected). Counting the projection too, measured on a 2-core
// AMD EPYC (Zen 4), forward, two threads / one, interleaved, two to six runs: GRU B1 H128
// 0.61-0.87, H112 0.67, LSTM B1 H96 0.64-0.97, Elman B2 H128 0.74-0.85 (1.43 in one run),
// LSTM B2 H64 0.69-1.15, Elman B1 H192 0.67-1.07; below it GRU B1 H96 1.06, Elman B1 H128
// 1.15-1.40 (0.73 in one later run: the second core's availability on the host decides).
int thread_count(int requested, int pool_threads, int B, int G, int H, int I = 0) {
  int n = requested > 0 ? requested : std::min(cpu_count(), pool_threads + 1);
  if (requested <= 0 && static_cast<int64_t>(B) * G * H * (H + I) < (1 << 16)) n = 1;
  return std::max(1, std::min(n, std::max(1, H / 16)));
}

// How many independent groups of rows a call runs, one thread each (1: all rows together,
// the hidden units cut into one chunk per thread). A group needs no other group's h, so its
// steps take no hand-off between threads, but each thread reads all of W_x and W_h (I = 0:
// the kernel does not multiply by W_x; the backward loop reads W_hᵀ alone). Groups when all
// n threads get at least kGroupRows rows (a full row tile of `gemm_acc`) and the weights are
// at most kGroupWeightBytes. Measured on 2 cores (each variant compiled apart, interleaved
// medians), fwd+bwd, the rows in one group (chunks of units) against the groups: B16 T256
// H128 LSTM 1.03, GRU 1.34, Elman 1.12; T100: LSTM B64 H128 1.29, GRU B256 H128 1.36, LSTM
// B16 H256 0.94-1.03, GRU B16 H256 1.05, LSTM B32 H256 1.10, LSTM B64 H256 1.09; the
// forward-only pass unchanged (0.97-1.02). Against them (with the groups switched at call
// time, fwd / fwd+bwd): LSTM B8 H128 (4 rows a group) 0.80 / 1.00, GRU B8 H128 0.67 / 0.83,
// LSTM B16 H512 (8 MiB of weights) 0.93 / 0.99, LSTM B64 T128 H512 0.91 / 0.98. Up to
// kGroupWeightBytesLarge, from kGroupRowsLarge rows a thread and for the gated cells, which
// is where the backward loop (W_hᵀ alone) gets them: its kernel alone, LSTM B64 T128 H512
// (4 MiB) 1.09, LSTM B256 H512 1.21, GRU B64 H512 1.22; against them LSTM B16 H512 0.93 (8
// rows a thread), Elman B64 H1024 0.94. With the 4-row tiles of `panel`, also from
// kGroupRowsSmall rows a thread where the weights are at most kGroupWeightBytesSmall;
// measured on a 2-core Intel Xeon (Sapphire Rapids), T100, groups of 4 rows against chunks
// of units, fwd / fwd+bwd: LSTM B8 H128 1.12 / 1.15, GRU B8 H128 1.04 / 1.17, Elman B8 H128
// 1.38 / 1.08, Elman B8 H256 1.20 / 1.07, LSTM B8 H160 0.96 / 1.11, GRU B8 H192 0.98 / 1.07;
// past it LSTM B8 H256 (2 MiB) 0.73 / 0.92, B12 0.71 / 0.89; at 2 rows a thread GRU B4 H128
// 0.85 / 1.07. On a 2-core AMD EPYC (Zen 4, 1 MiB of L2 a core) those 4-row groups lose
// instead (interleaved in one process, groups of 4-6 rows against chunks of units, fwd /
// fwd+bwd): LSTM B8 H128 0.77-0.82 / 0.90-0.93, GRU B8 H128 0.79-0.82 / 0.90-0.92, Elman B8
// H128 0.90 / 0.97-1.03, Elman B8 H256 0.82 / 0.92, LSTM B8 H96 0.86 / 0.97, LSTM B8 H64
// 0.89 / 0.92, GRU B8 H64 0.89 / 1.09, GRU B8 H160 0.80 / 0.89, LSTM B12 H128 0.89 / 0.96;
// while the groups of the other two rules still win or tie there: LSTM B16 H128 1.07 /
// 1.07, GRU B16 H128 1.07 / 1.09, Elman B16 H128 1.17 / 1.05, LSTM B32 H128 1.05 / 1.05,
// LSTM B64 H128 1.04 / 1.08, LSTM B64 H256 0.97 / 1.14, LSTM B16 H256 0.99 / 0.99. So the
// 4-row groups run only where `small_groups` (the caller's choice by the size of L2:
// native.SMALL_GROUPS). `forced` > 0 (tests): that many groups, at most B.
constexpr int kGroupRows = 8;
constexpr int64_t kGroupWeightBytes = int64_t{2} << 20;
constexpr int kGroupRowsLarge = 32;
constexpr int64_t kGroupWeightBytesLarge = int64_t{4} << 20;
constexpr int kGroupRowsSmall = 4;
constexpr int64_t kGroupWeightBytesSmall = int64_t{1} << 20;

int row_groups(int forced, int n, int B, int I, int H, int G, bool small_groups) {
  if (forced > 0) return std::min(forced, std::max(B, 1));
  const int64_t weight_bytes = int64_t{4} * G * H * (I + H);
  // The 4-row groups count the weights as if the input were H wide, as measured, whatever
  // the call reads (the backward loop W_hᵀ alone: LSTM B8 H256 fwd+bwd 0.91 with its groups).
  const int64_t square_bytes = int64_t{8} * G * H * H;
  const bool small = (B >= kGroupRows * n && weight_bytes <= kGroupWeightBytes) ||
                     (small_groups && B >= kGroupRowsSmall * n &&
                      square_bytes <= kGroupWeightBytesSmall);
  const bool large =
      G > 1 && B >= kGroupRowsLarge * n && weight_bytes <= kGroupWeightBytesLarge;
  return n > 1 && (small || large) ? n : 1;
}

// The first row of group k of `groups` over B rows (group k covers [start(k), start(k + 1))).
inline int group_start(int k, int groups, int B) {
  return static_cast<int>(static_cast<int64_t>(B) * k / groups);
}

// The shared state of group k's problem: the call's `base` problem cut to the group's rows.
template <class S, class P>
std::shared_ptr<S> group_part(const P& base, int k, int groups, bool duplicate) {
  auto sh = std::make_shared<S>();
  sh->p = base;
  sh->p.b0 = base.b0 + group_start(k, groups, base.B);
  sh->p.B = group_start(k + 1, groups, base.B) - group_start(k, groups, base.B);
  sh->duplicate = duplicate;
  return sh;
}

// The index of row b (of B = N·inner) at time t among the rows of an (N, T, inner, ·) array.
inline size_t step_row(int T, int inner, int t, int b) {
  return (static_cast<size_t>(b / inner) * T + t) * inner + b % inner;
}

// A call's rows may run as several independent groups (`row_groups`): a problem then covers
// rows [b0, b0 + B) of the arrays. `row_of` is the index of its row b at time t.
template <class P>
inline size_t row_of(const P& p, int t, int b) {
  return step_row(p.T, p.inner, t, p.b0 + b);
}

// Whether a problem's rows of a step are one block (they lie in one run).
template <class P>
inline bool rows_contiguous(const P& p) {
  return p.b0 % p.inner + p.B <= p.inner;
}

struct Problem {
  int kind, T, B, I, H, G;
  int inner;  // rows per run: the per-step arrays are (B / inner, T, inner, ·)
  bool projected;  // xs is already x_t W_x + b_x, (.., G·H), gate-major (w_x has no rows)
  bool reverse;
  const float *xs, *w_x, *b_x, *w_h, *b_in;
  const bool *mask, *resets;  // (N, T, inner) or null
  float* ys;
  // The gradient pass's residuals, each null where not asked for: h_in (N, T, inner, H), the
  // carry each step starts from, and up to four per-kind arrays (`residual_layout`).
  float* h_in;
  float* res[4];
  int b0 = 0;  // the first row of the call's arrays this problem covers (`row_of`)
  bool bf16 = false;  // matmul_dtype=bfloat16: the matmuls on AMX tiles (`gemm_bf16`)
  int panel_rows = kAllRows;  // `gemm_acc`'s blocks (`panel_rows`)
};

// Residual j of a kind goes to output array out[j] at gate column gate[j] (of width H).
struct ResidualLayout {
  int count;
  int out[6], gate[6], width[4];  // width: each output's gate columns
};

ResidualLayout residual_layout(int kind) {
  switch (kind) {
    case kLstm:  // (slopes of i, f, g, o as one (T, B, 4H) array; f; o·tanh'(c))
      return {6, {0, 0, 0, 0, 1, 2}, {0, 1, 2, 3, 0, 0}, {4, 1, 1, 0}};
    case kGru:  // (r, z, n as one (T, B, 3H) array; hn)
      return {4, {0, 0, 0, 1}, {0, 1, 2, 0}, {3, 1, 0, 0}};
    default:  // (h,)
      return {1, {0}, {0}, {1, 0, 0, 0}};
  }
}

// The state the participating threads share.
//
// Chunk c covers units [start[c], start[c+1]) and has its own packed weights. Each step, a
// thread computes its own chunks, then any chunk nobody has claimed; step s + 1 starts once
// every chunk of step s is published. A thread computes a chunk into its own buffers, then
// publishes it: the first to win the chunk's state for the step copies out the carry the next
// step reads, marks the chunk published, and only then writes the outputs and residuals no
// step reads (measured on 2 cores, fwd+bwd B16 T256 H128, interleaved: LSTM 3.5-4.5%, GRU
// 5-5.5% faster than with those writes before the mark; 1-1.6% at B64 T100 H128 and B64 T128
// H512).
// Whoever finds a chunk claimed but still unpublished after a while computes it too: its
// owner may have been preempted by the OS in the middle of it, and the results are the same.
// So no thread ever waits for another to start or to resume (a pool task that starts late,
// or never, cannot stall the call: the others do its share), only for a publisher's copy.
// A duplicate that loses reads inputs a later step may be overwriting; it is discarded.
// `Chunks` is this hand-off, shared by the forward (`Shared`) and backward (`BackShared`) calls.
struct Chunks {
  int chunks;
  std::vector<int> start;
  std::atomic<int64_t> done{0};                    // chunks published, over all steps
  std::unique_ptr<std::atomic<int>[]> claimed;     // per chunk: the last step claimed
  std::unique_ptr<std::atomic<int>[]> state;       // per chunk: 2s ready for step s, 2s+1 publishing
  std::atomic<int> active{0};                      // threads inside `participate`
  bool duplicate = false;  // tests: compute every unpublished chunk at once, without waiting,
                           // and every chunk from the spare copy of its weights
  // Per chunk, its packed weights (`pack_chunk`): how many copies were begun (the chunk's own
  // place, then at most one spare, 0-2), and which one is finished and used (-1: none yet,
  // 0: its own, 1: the spare), set once.
  std::unique_ptr<std::atomic<int>[]> pack_claims;
  std::unique_ptr<std::atomic<int>[]> packed;
  size_t pack_bytes = 0;  // the most bytes one chunk's packed weights take

  // Cuts H units into at most n chunks of whole vectors (multiples of 16 units), the
  // remainder to the last one, none claimed yet.
  void split(int n, int H) {
    int C = n;
    const int width = C > 1 ? (H / C) / 16 * 16 : H;
    while (C > 1 && (C - 1) * width >= H) --C;
    chunks = C;
    start.assign(C + 1, H);
    for (int c = 0; c < C; ++c) start[c] = c * width;
    claimed.reset(new std::atomic<int>[C]);
    state.reset(new std::atomic<int>[C]);
    pack_claims.reset(new std::atomic<int>[C]);
    packed.reset(new std::atomic<int>[C]);
    for (int c = 0; c < C; ++c) {
      claimed[c].store(-1, std::memory_order_relaxed);
      state[c].store(0, std::memory_order_relaxed);
      pack_claims[c].store(0, std::memory_order_relaxed);
      packed[c].store(-1, std::memory_order_relaxed);
    }
  }

  // Every chunk's weights packed already (by the caller, before any thread starts).
  void all_packed() {
    for (int c = 0; c < chunks; ++c) {
      pack_claims[c].store(2, std::memory_order_relaxed);
      packed[c].store(0, std::memory_order_relaxed);
    }
  }

  // Whether chunk c's weights are in its spare copy (once packed; `await_packed`).
  bool spare(int c) const { return packed[c].load(std::memory_order_acquire) == 1; }

  // The most units any chunk has: what a thread's buffers (`make_local`) must hold.
  int widest() const {
    int w = 0;
    for (int c = 0; c < chunks; ++c) w = std::max(w, start[c + 1] - start[c]);
    return w;
  }

  // Whether this thread publishes chunk c of step s (false: another one already is); if so,
  // it copies its results out, then calls `published`.
  bool begin_publish(int c, int s) {
    int expected = 2 * s;
    return state[c].compare_exchange_strong(expected, 2 * s + 1, std::memory_order_acq_rel);
  }
  void published(int c, int s) {
    state[c].store(2 * s + 2, std::memory_order_release);
    done.fetch_add(1, std::memory_order_release);
  }
};

struct Shared : Chunks {
  Problem p;
  std::vector<size_t> wx_offset, w_offset;
  Packed wx, w;
  std::vector<Packed> spare_wx, spare_w;  // per chunk: its spare copy, where one was made
  Floats bias_x, bias;
  Halves wx16, w16;  // bf16: the packed weights instead of wx and w (same offsets)
  std::vector<Halves> spare_wx16, spare_w16;
  Floats h_ring, c_ring;  // (2, B, H): step s reads slot s % 2
  ResidualLayout layout;

  // Chunk c's packed W_x and W_h (float32), once packed.
  const float* packed_x(int c) const {
    return spare(c) ? spare_wx[c].data() : wx.data() + wx_offset[c];
  }
  const float* packed_h(int c) const {
    return spare(c) ? spare_w[c].data() : w.data() + w_offset[c];
  }
  const uint16_t* packed_x16(int c) const {
    return spare(c) ? spare_wx16[c].data() : wx16.data() + wx_offset[c];
  }
  const uint16_t* packed_h16(int c) const {
    return spare(c) ? spare_w16[c].data() : w16.data() + w_offset[c];
  }
};

// One thread's buffers: the chunk's matmul results and its new h, c and outputs.
// For chunks of up to U units. In bf16 mode, zx and z have their rows and columns rounded up
// to the tiles' 16, and a16 holds the left operand of a matmul (`gemm_bf16`), at most K wide.
// With a block of S > 1 steps (`projection_block`), xb holds a block's inputs (S·B rows) and
// zxb their projection for one chunk (`block_chunk`) from step `block_first` on.
struct Local {
  Floats zx, z, h, c, y, res, x;  // x: the step's inputs, gathered when there are several runs
  Floats xb, zxb;
  int block_chunk = -1, block_first = -1;
  Halves a16;
  Local(int B, int G, int U, int R, int X, bool bf16 = false, int K = 0, int S = 1, int I = 0)
      : h(B * U), c(B * U), y(B * U), res(B * R * U), x(X) {
    const size_t ldz = bf16 ? round_up(G * U, 16) : G * U;
    const size_t rows = bf16 ? round_up(B, 16) : B;
    zx.assign(rows * ldz, 0.0f);
    z.assign(rows * ldz, 0.0f);
    if (bf16) a16.resize(rows * round_up(K, 32));
    if (S > 1) {
      xb.assign(static_cast<size_t>(S) * B * I, 0.0f);
      zxb.assign(static_cast<size_t>(S) * B * G * U, 0.0f);
    }
  }
};

// How many steps' input projections a chunk computes at once, in the kernel (float32, not
// hoisted): 16 rows' worth where a step has at most 4 rows. One step's product of B rows
// reads every weight of W_x for B multiply-adds (`row_panels` at B = 1, bound by what L2
// delivers); a block of S steps reads it once for S·B rows, in the full 8-row tiles of
// `gemm_acc`. Measured on a 2-core AMD EPYC (Zen 4), forward, interleaved medians, blocked in
// the kernel against hoisted before it (`native.HOIST_TABLE`), T100 / T1000: Elman B1 H128
// 0.78 / 0.94, H512 0.80 / 0.99; LSTM B1 H64 0.59 / 0.93, H128 0.87 / 0.85, H512 1.00 /
// 1.00; GRU B1 H128 0.86 / 0.85, H256 - / 0.65, H512 0.99 / 0.95; LSTM B4 H256 0.70 / -, B4
// H512 0.99 / 0.87; at B1 H1024 hoisting still wins (Elman 1.17 / 0.99, LSTM 1.34 / 1.11,
// GRU 1.49 / -). Against the per-step product (this kernel before the blocks, alternating
// processes, T100): LSTM B2 H128 0.41-0.45 against 0.46-0.53 ms; at B6 (blocks of 2 steps)
// within the noise, so from 5 rows a step not at all.
constexpr int kBlockRows = 16;
inline int projection_block(const Problem& p) {
  if (p.bf16 || p.projected || p.B > 4) return 1;
  return std::max(1, std::min(kBlockRows / std::max(p.B, 1), p.T));
}

void step_chunk(const Shared& sh, int chunk, int s, Local& out) {
  const Problem& p = sh.p;
  const int T = p.T, B = p.B, I = p.I, H = p.H, G = p.G;
  const int u0 = sh.start[chunk], U = sh.start[chunk + 1] - u0, N = G * U;
  const int t = p.reverse ? T - 1 - s : s;
  const size_t BH = static_cast<size_t>(B) * H;
  const float* h_in = sh.h_ring.data() + (s & 1) * BH;
  const float* c_in = sh.c_ring.data() + (s & 1) * BH;
  const float* bias = sh.bias.data() + static_cast<size_t>(G) * u0;
  float* zx = out.zx.data();
  float* z = out.z.data();
  const int ldz = p.bf16 ? round_up(N, 16) : N;  // the rows of zx and z (`Local`)
  if (p.projected) {  // the chunk's columns of the projected inputs
    for (int b = 0; b < B; ++b) {
      const float* row = p.xs + row_of(p, t, b) * I + u0;
      for (int g = 0; g < G; ++g)
        std::memcpy(zx + static_cast<size_t>(b) * ldz + g * U, row + static_cast<size_t>(g) * H,
                    U * sizeof(float));
    }
  } else if (p.bf16) {
    const float* bias_x = sh.bias_x.data() + static_cast<size_t>(G) * u0;
    for (int b = 0; b < B; ++b)
      std::memcpy(zx + static_cast<size_t>(b) * ldz, bias_x, N * sizeof(float));
    const int Bp = round_up(B, 16), Ip = round_up(I, 32);
    to_bf16_rows([&](int b) { return p.xs + row_of(p, t, b) * I; }, B, I, Bp, Ip,
                 out.a16.data());
    gemm_bf16(out.a16.data(), Ip, sh.packed_x16(chunk), ldz, zx, ldz, Bp, 0, B);
  } else if (const int S = projection_block(p); S > 1) {
    // The projections of the block of steps [first, first + S) (fewer at the end), for this
    // chunk: computed at its first step, or where this thread last computed another chunk
    // or block (helping another thread).
    const int first = s / S * S, steps = std::min(S, T - first);
    if (out.block_chunk != chunk || out.block_first != first) {
      const float* bias_x = sh.bias_x.data() + static_cast<size_t>(G) * u0;
      for (int j = 0; j < steps; ++j) {
        const int tj = p.reverse ? T - 1 - (first + j) : first + j;
        for (int b = 0; b < B; ++b) {
          const size_t r = static_cast<size_t>(j) * B + b;
          std::memcpy(out.xb.data() + r * I, p.xs + row_of(p, tj, b) * I, I * sizeof(float));
        }
      }
      gemm_acc(out.xb.data(), I, sh.packed_x(chunk), N, I, out.zxb.data(), steps * B,
               p.panel_rows, bias_x);
      out.block_chunk = chunk;
      out.block_first = first;
    }
    zx = out.zxb.data() + static_cast<size_t>(s - first) * B * N;
  } else {
    const float* bias_x = sh.bias_x.data() + static_cast<size_t>(G) * u0;
    const float* x = p.xs + row_of(p, t, 0) * I;  // one run: the step's rows, a block
    if (!rows_contiguous(p)) {  // gathered, a run's block at a time
      for (int b = 0, len; b < B; b += len) {
        len = std::min(B - b, p.inner - (p.b0 + b) % p.inner);
        std::memcpy(out.x.data() + static_cast<size_t>(b) * I, p.xs + row_of(p, t, b) * I,
                    static_cast<size_t>(len) * I * sizeof(float));
      }
      x = out.x.data();
    }
    gemm_acc(x, I, sh.packed_x(chunk), N, I, zx, B, p.panel_rows, bias_x);
  }
  if (p.bf16) {
    for (int b = 0; b < B; ++b)
      std::memcpy(z + static_cast<size_t>(b) * ldz, bias, N * sizeof(float));
    const int Bp = round_up(B, 16), Hp = round_up(H, 32);
    to_bf16_rows([&](int b) { return h_in + static_cast<size_t>(b) * H; }, B, H, Bp, Hp,
                 out.a16.data());
    gemm_bf16(out.a16.data(), Hp, sh.packed_h16(chunk), ldz, z, ldz, Bp, 0, B);
  } else {
    gemm_acc(h_in, H, sh.packed_h(chunk), N, H, z, B, p.panel_rows, bias);
  }
  const auto fn = row_fn<ForwardRow, Row>(p.kind);
  for (int b = 0; b < B; ++b) {
    const size_t at = static_cast<size_t>(b) * H + u0, local = static_cast<size_t>(b) * U;
    Row row;
    row.zx = zx + static_cast<size_t>(b) * ldz;
    row.z = z + static_cast<size_t>(b) * ldz;
    row.h_in = h_in + at;
    row.c_in = c_in + at;
    row.h_out = out.h.data() + local;
    row.c_out = out.c.data() + local;
    row.y = out.y.data() + local;
    row.res = p.res[0] ? out.res.data() + static_cast<size_t>(b) * sh.layout.count * U : nullptr;
    row.U = U;
    row.take = p.mask == nullptr || p.mask[row_of(p, t, b)];
    // Resets zero the carry before a step: the next one's in forward order, this one's
    // (after it) in reverse.
    const int reset_t = p.reverse ? t : t + 1;
    row.zero_after =
        p.resets != nullptr && reset_t < T && p.resets[row_of(p, reset_t, b)];
    fn(row);
  }
}

// Publishes a computed chunk unless another thread already has (or is doing so).
void publish(Shared& sh, int chunk, int s, const Local& out) {
  if (!sh.begin_publish(chunk, s)) return;
  const Problem& p = sh.p;
  const int B = p.B, H = p.H, u0 = sh.start[chunk], U = sh.start[chunk + 1] - u0;
  const int t = p.reverse ? p.T - 1 - s : s;
  const size_t BH = static_cast<size_t>(B) * H, slot = ((s + 1) & 1) * BH;
  const bool lstm = p.kind == kLstm;
  const ResidualLayout& layout = sh.layout;
  for (int b = 0; b < B; ++b) {
    const size_t at = static_cast<size_t>(b) * H + u0, local = static_cast<size_t>(b) * U;
    std::memcpy(sh.h_ring.data() + slot + at, out.h.data() + local, U * sizeof(float));
    if (lstm) std::memcpy(sh.c_ring.data() + slot + at, out.c.data() + local, U * sizeof(float));
    if (p.h_in == nullptr) continue;
    // The step's input carry: slot s % 2, which no one overwrites before this step is complete.
    std::memcpy(p.h_in + row_of(p, t, b) * H + u0,
                sh.h_ring.data() + (s & 1) * BH + at, U * sizeof(float));
  }
  sh.published(chunk, s);
  // The outputs and residuals, which no step reads, from this thread's own buffers: after the
  // publication, while other threads may start the next step.
  for (int b = 0; b < B; ++b) {
    const size_t row = row_of(p, t, b), local = static_cast<size_t>(b) * U;
    std::memcpy(p.ys + row * H + u0, out.y.data() + local, U * sizeof(float));
    if (p.res[0] == nullptr) continue;
    const float* res = out.res.data() + static_cast<size_t>(b) * layout.count * U;
    for (int j = 0; j < layout.count; ++j) {
      const int k = layout.out[j], width = layout.width[k] * H;
      std::memcpy(p.res[k] + row * width + layout.gate[j] * H + u0, res + j * U, U * sizeof(float));
    }
  }
}

// Each chunk's biases (G·U,) into bias_out, and the place of its packed columns of w in out,
// which `pack_chunk` writes: float32, `gemm_acc`'s panels; in bf16 mode (`out16`) as
// `gemm_bf16` takes them instead: Kp rows (rows rounded up to 32) by Np columns (G·U rounded
// up to 16), zero past the real ones.
void pack(const Shared& sh, const float* w, int rows, const float* bias, Packed* out,
          std::vector<size_t>* offsets, Floats* bias_out, Halves* out16) {
  const int G = sh.p.G, H = sh.p.H;
  bias_out->resize(static_cast<size_t>(G) * H);
  offsets->resize(sh.chunks);
  for (int c = 0; c < sh.chunks; ++c) {
    const int u0 = sh.start[c], U = sh.start[c + 1] - u0;
    for (int g = 0; g < G; ++g)
      std::memcpy(bias_out->data() + static_cast<size_t>(G) * u0 + g * U, bias + g * H + u0,
                  U * sizeof(float));
  }
  if (out16 != nullptr) {
    bf16_layout(sh.start, sh.chunks, G, rows, out16, offsets);
    return;
  }
  out->resize(static_cast<size_t>(rows) * G * H);  // float32: packed by `pack_chunk`
  for (int c = 0, columns = 0; c < sh.chunks; ++c) {
    (*offsets)[c] = static_cast<size_t>(columns) * rows;
    columns += G * (sh.start[c + 1] - sh.start[c]);
  }
}

// Chunk c's columns of w (rows × G·H) as `gemm_acc`'s panels, to `block`.
void pack_columns(const Shared& sh, const float* w, int rows, int c, float* block) {
  const int G = sh.p.G, H = sh.p.H;
  const int u0 = sh.start[c], U = sh.start[c + 1] - u0, N = G * U;
  for (int j = 0; j < N;) {
    const int width = panel_width(N, j);
    for (int k = 0; k < rows; ++k)
      for (int i = 0; i < width;) {  // runs of columns within one gate
        const int g = (j + i) / U, u = (j + i) % U, run = std::min(width - i, U - u);
        std::memcpy(block + static_cast<size_t>(k) * width + i,
                    w + static_cast<size_t>(k) * G * H + g * H + u0 + u, run * sizeof(float));
        i += run;
      }
    block += static_cast<size_t>(rows) * width;
    j += width;
  }
}

// Chunk c's columns of w (rows × G·H) as `gemm_bf16` takes them, to `out` (zeroed).
void pack_columns_bf16(const Shared& sh, const float* w, int rows, int c, uint16_t* out) {
  const int G = sh.p.G, H = sh.p.H;
  pack_chunk_bf16(c, G * (sh.start[c + 1] - sh.start[c]), rows, [&](int c, int k, float* dst) {
    const int u0 = sh.start[c], U = sh.start[c + 1] - u0;  // gate g's units at g·U
    for (int g = 0; g < G; ++g)
      std::memcpy(dst + g * U, w + static_cast<size_t>(k) * G * H + g * H + u0,
                  U * sizeof(float));
  }, out);
}

// Packs chunk c's W_x (unless projected) and W_h: copy 0 in their place, 1 as its spare.
void pack_chunk(Shared& sh, int c, int copy) {
  const Problem& p = sh.p;
  const size_t N = static_cast<size_t>(p.G) * (sh.start[c + 1] - sh.start[c]);
  if (p.bf16) {
    const size_t Np = round_up(static_cast<int>(N), 16);
    uint16_t *x = nullptr, *h;
    if (copy == 0) {
      x = p.projected ? nullptr : sh.wx16.data() + sh.wx_offset[c];
      h = sh.w16.data() + sh.w_offset[c];
    } else {
      if (!p.projected) sh.spare_wx16[c].assign(round_up(p.I, 32) * Np, 0);
      sh.spare_w16[c].assign(round_up(p.H, 32) * Np, 0);
      x = p.projected ? nullptr : sh.spare_wx16[c].data();
      h = sh.spare_w16[c].data();
    }
    if (x != nullptr) pack_columns_bf16(sh, p.w_x, p.I, c, x);
    pack_columns_bf16(sh, p.w_h, p.H, c, h);
    return;
  }
  float *x = nullptr, *h;
  if (copy == 0) {
    x = p.projected ? nullptr : sh.wx.data() + sh.wx_offset[c];
    h = sh.w.data() + sh.w_offset[c];
  } else {
    if (!p.projected) sh.spare_wx[c].resize(p.I * N);
    sh.spare_w[c].resize(p.H * N);
    x = p.projected ? nullptr : sh.spare_wx[c].data();
    h = sh.spare_w[c].data();
  }
  if (x != nullptr) pack_columns(sh, p.w_x, p.I, c, x);
  pack_columns(sh, p.w_h, p.H, c, h);
}

// A thread computes a chunk claimed by another one too once it has waited for it twice as long
// as its own last chunk took (and at least this long): long enough not to duplicate work that
// is merely a little late, short against an OS time slice.
constexpr auto kMinHelpWait = std::chrono::microseconds(50);

Local make_local(const Shared& sh, int widest) {
  const Problem& p = sh.p;
  const bool gather = !p.bf16 && !p.projected && !rows_contiguous(p);
  return Local(p.B, p.G, widest, p.res[0] ? sh.layout.count : 0, gather ? p.B * p.I : 0,
               p.bf16, std::max(p.H, p.projected ? 0 : p.I), projection_block(p), p.I);
}

// The chunks' weights are packed every call (their panels, `gemm_acc`) by the threads as they
// arrive: each packs those no thread has begun, in its order of chunks. Before it computes a
// chunk, a thread waits for the chunk's packing; where that takes 4 times as long as the
// thread's own packing of a chunk, and at least kMinPackWait and a nanosecond a byte (a
// thread that packed none), the packer may have been preempted, and it packs a spare copy
// itself (one spare at most); the first copy finished is the one used. Packed by the calling
// thread alone, before the others started, LSTM B1 T100 H1024's forward spent 2.3-3.4 ms of
// 8-24 ms packing its 16 MiB of W_h on a 2-core AMD EPYC (Zen 4).
constexpr auto kMinPackWait = std::chrono::microseconds(500);
using Clock = std::chrono::steady_clock;

template <class S>
Clock::duration pack_unclaimed(S& sh, const std::vector<int>& order) {
  Clock::duration took{};
  for (const int c : order) {
    int none = 0;
    if (sh.pack_claims[c].load(std::memory_order_relaxed) == 0 &&
        sh.pack_claims[c].compare_exchange_strong(none, 1, std::memory_order_acq_rel)) {
      const auto begin = Clock::now();
      pack_chunk(sh, c, 0);
      took = std::max(took, Clock::now() - begin);
      int unset = -1;
      if (!sh.duplicate) sh.packed[c].compare_exchange_strong(unset, 0, std::memory_order_acq_rel);
    }
  }
  return took;
}

template <class S>
void await_packed(S& sh, int c, Clock::duration took) {
  if (sh.packed[c].load(std::memory_order_acquire) >= 0) return;
  const auto since = Clock::now();
  const Clock::duration patience = std::max<Clock::duration>(
      {4 * took, kMinPackWait, std::chrono::nanoseconds(sh.pack_bytes)});
  for (int spins = 1; sh.packed[c].load(std::memory_order_acquire) < 0; ++spins) {
    if (sh.duplicate || (spins % 64 == 0 && Clock::now() - since > patience)) {
      int begun = 1;
      if (sh.pack_claims[c].compare_exchange_strong(begun, 2, std::memory_order_acq_rel)) {
        pack_chunk(sh, c, 1);
        int unset = -1;
        sh.packed[c].compare_exchange_strong(unset, 1, std::memory_order_acq_rel);
      }
    }
    if (spins < 4096) cpu_relax(); else std::this_thread::yield();
  }
}

// Thread k of n works on its own chunks first (k, k + n, ...), then on the others. `S` is the
// shared state of a forward (`Shared`) or backward (`BackShared`) call, with its `make_local`,
// `pack_chunk`, `step_chunk` and `publish`.
template <class S>
void participate(S& sh, int k, int n) {
  sh.active.fetch_add(1, std::memory_order_acq_rel);
  const int C = sh.chunks, T = sh.p.T;
  if (sh.done.load(std::memory_order_acquire) >= static_cast<int64_t>(T) * C) {
    sh.active.fetch_sub(1, std::memory_order_acq_rel);  // started after the call's end
    return;
  }
  std::vector<int> order;
  for (int c = k; c < C; c += n) order.push_back(c);
  for (int c = 0; c < C; ++c)
    if (c % n != k) order.push_back(c);
  const Clock::duration pack_time = pack_unclaimed(sh, order);
  auto out = make_local(sh, sh.widest());
  Clock::duration chunk_time{};
  for (;;) {
    const int s = static_cast<int>(sh.done.load(std::memory_order_acquire) / C);
    if (s >= T) break;
    for (const int c : order) {
      int expected = s - 1;
      if (sh.claimed[c].load(std::memory_order_relaxed) == expected &&
          sh.claimed[c].compare_exchange_strong(expected, s, std::memory_order_acq_rel)) {
        await_packed(sh, c, pack_time);
        // A chunk's time, read every 16 steps: a read of the clock (about 20 ns) costs as much
        // as the gates of a step at B1 H128 (perf, Elman B1 T1000 H128 forward: 4 % of the
        // samples in clock_gettime when read around every chunk and every wait).
        const bool timed = s % 16 == 0;
        const auto begin = timed ? Clock::now() : Clock::time_point{};
        step_chunk(sh, c, s, out);
        if (timed) chunk_time = Clock::now() - begin;
        publish(sh, c, s, out);
      }
    }
    // The wait's start, read at its 64th spin (most waits end before it).
    Clock::time_point waiting_since{};
    auto waited_long = [&](int spins) {
      if (spins % 64 != 0) return false;
      const auto now = Clock::now();
      if (spins == 64) waiting_since = now;
      return now - waiting_since > std::max<Clock::duration>(2 * chunk_time, kMinHelpWait);
    };
    bool helped = false;
    for (int spins = 1; sh.done.load(std::memory_order_acquire) / C == s; ++spins) {
      if (!helped && (sh.duplicate || waited_long(spins))) {
        helped = true;
        for (const int c : order)
          if (sh.state[c].load(std::memory_order_acquire) == 2 * s) {
            await_packed(sh, c, pack_time);
            step_chunk(sh, c, s, out);
            publish(sh, c, s, out);
          }
      }
      if (spins < 4096) cpu_relax(); else std::this_thread::yield();
    }
  }
  sh.active.fetch_sub(1, std::memory_order_acq_rel);
}

// Spins (then yields) until `count` (threads still inside some work) drops to zero.
inline void wait_for_none(const std::atomic<int>& count) {
  for (int spins = 0; count.load(std::memory_order_acquire) > 0; ++spins)
    if (spins < 1000) cpu_relax(); else std::this_thread::yield();
}

// Waits for the threads still inside a call's `participate`: one may be finishing a duplicate
// and read the inputs, which XLA owns again once the call returns. Then checks that every
// chunk of every step was published once.
template <class S>
ffi::Error settle(const S& sh) {
  wait_for_none(sh.active);
  if (sh.done.load() != static_cast<int64_t>(sh.p.T) * sh.chunks)  // once per step each
    return ffi::Error::Internal("jaxrnn native kernel: a chunk was published more than once");
  return ffi::Error::Success();
}

// Runs `participate` on n threads (this one and n - 1 pool tasks) until every chunk of every
// step is published.
template <class S>
ffi::Error run_threads(const std::shared_ptr<S>& sh, ffi::ThreadPool& pool, int n) {
  for (int k = 1; k < n; ++k) pool.Schedule([sh, k, n] { participate(*sh, k, n); });
  participate(*sh, 0, n);
  return settle(*sh);
}

// Runs independent problems (the groups of a call's rows) on as many threads, this one and
// one pool task per other group: thread k runs group k, then visits the others, where it
// returns at once if they are done and otherwise shares them as `participate` does (so a pool
// task that starts late, or never, still cannot stall the call).
template <class S>
ffi::Error run_groups(const std::vector<std::shared_ptr<S>>& parts, ffi::ThreadPool& pool) {
  const int n = static_cast<int>(parts.size());
  auto all = std::make_shared<std::vector<std::shared_ptr<S>>>(parts);
  for (int k = 1; k < n; ++k)
    pool.Schedule([all, k, n] {
      for (int j = 0; j < n; ++j) participate(*(*all)[(k + j) % n], 0, 1);
    });
  for (int j = 0; j < n; ++j) participate(*parts[j], 0, 1);
  for (const auto& sh : parts)
    if (ffi::Error err = settle(*sh); err.failure()) return err;
  return ffi::Error::Success();
}

// Runs independent problems on n threads (this one and n - 1 pool tasks), each taken whole by
// the next free thread; a thread with none left shares those still running, as
// `run_groups` does.
template <class S>
ffi::Error run_parts(const std::vector<std::shared_ptr<S>>& parts, ffi::ThreadPool& pool,
                     int n) {
  auto all = std::make_shared<std::vector<std::shared_ptr<S>>>(parts);
  auto next = std::make_shared<std::atomic<int>>(0);
  auto work = [all, next] {
    const int count = static_cast<int>(all->size());
    for (int j; (j = next->fetch_add(1, std::memory_order_acq_rel)) < count;)
      participate(*(*all)[j], 0, 1);
    for (int j = 0; j < count; ++j) participate(*(*all)[j], 0, 1);
  };
  for (int k = 1; k < n; ++k) pool.Schedule([work] { work(); });
  work();
  for (const auto& sh : parts)
    if (ffi::Error err = settle(*sh); err.failure()) return err;
  return ffi::Error::Success();
}

// A call's members (the ensemble of a vmap over weights: `members` sets of weights, each for
// its own block of B / members rows) and, within each, its groups of rows (`groups` parts per
// member, in order). The members spread over the threads, each thread taking whole problems
// (`run_parts`: no hand-off between threads), where there are at least as many as threads and
// their problems can be made a multiple of the threads in count: each member cut into
// n / gcd(members, n) groups of rows (3 members on 2 threads: 6 halves), unless that cuts
// members of kGroupRows rows or more into groups of fewer (a full row tile of `gemm_acc`).
// Otherwise the members run one after another, each on all threads. Measured on 2 cores,
// against one call per member, LSTM T256 H128 forward: 3 members of 16 rows as 3 problems
// 0.84, as 6 1.21; GRU 5 members of 8 rows as 10 problems of 4 rows 0.81.
// The plan: whether the members spread over the threads, and each member's groups of rows
// (`row_groups` over its rows where they do not; tests may force a count).
struct MemberPlan {
  bool spread;
  int groups;
};

inline MemberPlan plan_members(int forced, int members, int n, int rows, int I, int H, int G,
                               bool small_groups) {
  const int cut = n / std::gcd(members, n);
  const bool spread = members > 1 && members >= n &&
                      (cut == 1 || rows < kGroupRows || rows / cut >= kGroupRows);
  if (!spread) return {false, row_groups(forced, n, rows, I, H, G, small_groups)};
  return {true, std::max(1, std::min(forced > 0 ? forced : cut, rows))};
}

template <class S>
ffi::Error run_members(const std::vector<std::shared_ptr<S>>& parts, int members, int groups,
                       bool spread, ffi::ThreadPool& pool, int n) {
  if (spread) return run_parts(parts, pool, n);
  for (int m = 0; m < members; ++m) {
    std::vector<std::shared_ptr<S>> own(parts.begin() + m * groups,
                                        parts.begin() + (m + 1) * groups);
    ffi::Error err = groups > 1 ? run_groups(own, pool) : run_threads(own[0], pool, n);
    if (err.failure()) return err;
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> w_x,
                   ffi::Buffer<ffi::F32> b_x, ffi::Buffer<ffi::F32> w_h, ffi::Buffer<ffi::F32> b_in,
                   ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                   ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::PRED> resets,
                   ffi::ResultBuffer<ffi::F32> ys, ffi::ResultBuffer<ffi::F32> h_last,
                   ffi::ResultBuffer<ffi::F32> c_last, ffi::ResultBuffer<ffi::F32> h_in,
                   ffi::ResultBuffer<ffi::F32> res0, ffi::ResultBuffer<ffi::F32> res1,
                   ffi::ResultBuffer<ffi::F32> res2, ffi::ResultBuffer<ffi::F32> res3,
                   int32_t kind, bool reverse, int32_t threads, bool duplicate,
                   int32_t forced_groups, bool small_groups, bool huge_pages,
                   bool bf16, int32_t forced_panel_rows) {
  if (bf16 && !bf16_ready())
    return ffi::Error::InvalidArgument(
        "jaxrnn native kernel: bf16 matmuls need AMX or AVX512-BF16 (jaxrnn_bf16_available() "
        "is 0)");
  auto xd = xs.dimensions();
  auto vd = w_x.dimensions();
  auto wd = w_h.dimensions();
  const size_t rank = wd.size();  // 3: a leading axis of members
  if (xd.size() != 4 || (rank != 2 && rank != 3) || vd.size() != rank)
    return ffi::Error::InvalidArgument(
        "jaxrnn native kernel: xs must be (N, T, B, I), w_x ([E,] I, G*H) or ([E,] 0, G*H), "
        "w_h ([E,] H, G*H)");
  const int T = static_cast<int>(xd[1]), inner = std::max(static_cast<int>(xd[2]), 1);
  const int B = static_cast<int>(xd[0] * xd[2]), I = static_cast<int>(xd[3]);
  const int H = static_cast<int>(wd[rank - 2]);
  const int members = rank == 3 ? static_cast<int>(wd[0]) : 1;
  const int G = kind == kLstm ? 4 : (kind == kGru ? 3 : 1);
  const size_t BH = static_cast<size_t>(B) * H, GH = static_cast<size_t>(G) * H;
  const bool projected = vd[rank - 2] == 0;  // xs holds x_t W_x + b_x already
  if (kind < kElmanTanh || kind > kGru || wd[rank - 1] != G * H || vd[rank - 1] != G * H ||
      (projected ? I != G * H : vd[rank - 2] != I) || members < 1 ||
      (rank == 3 && vd[0] != members) || xd[0] % members != 0 ||
      b_x.element_count() != members * GH || b_in.element_count() != members * GH ||
      h0.element_count() != BH || c0.element_count() != BH)
    return ffi::Error::InvalidArgument("jaxrnn native kernel: inconsistent shapes");
  const size_t flags = static_cast<size_t>(T) * B;
  if ((mask.element_count() != 0 && mask.element_count() != flags) ||
      (resets.element_count() != 0 && resets.element_count() != flags))
    return ffi::Error::InvalidArgument("jaxrnn native kernel: mask/resets must be (N, T, B') or empty");

  Problem base{kind, T, B, I, H, G, inner, projected, reverse, xs.typed_data(),
               w_x.typed_data(), b_x.typed_data(), w_h.typed_data(), b_in.typed_data(),
               mask.element_count() ? mask.typed_data() : nullptr,
               resets.element_count() ? resets.typed_data() : nullptr, ys->typed_data(),
               nullptr, {nullptr, nullptr, nullptr, nullptr}};
  base.bf16 = bf16;
  base.panel_rows = panel_rows(forced_panel_rows);
  const ResidualLayout layout = residual_layout(kind);
  if (res0->element_count() != 0) {  // the gradient pass: residuals, unless empty
    ffi::Result<ffi::Buffer<ffi::F32>>* outs[4] = {&res0, &res1, &res2, &res3};
    for (int k = 0; k < 4; ++k) {
      if ((*outs[k])->element_count() != flags * H * layout.width[k])
        return ffi::Error::InvalidArgument("jaxrnn native kernel: residual shapes");
      base.res[k] = layout.width[k] ? (*outs[k])->typed_data() : nullptr;
    }
  }
  if (h_in->element_count() != 0) {  // the gradient pass: h_in, unless empty
    if (h_in->element_count() != flags * H)
      return ffi::Error::InvalidArgument("jaxrnn native kernel: h_in must be (N, T, B', H)");
    base.h_in = h_in->typed_data();
  }
  if (huge_pages) {
    advise_huge_pages(ys->typed_data(), flags * H * sizeof(float));
    if (base.h_in != nullptr) advise_huge_pages(base.h_in, flags * H * sizeof(float));
    for (int k = 0; k < 4; ++k)
      if (base.res[k] != nullptr)
        advise_huge_pages(base.res[k], flags * H * layout.width[k] * sizeof(float));
  }

  const int x_rows = projected ? 0 : I;
  const int n = thread_count(threads, static_cast<int>(pool.num_threads()), B, G, H, x_rows);
  const int rows = B / members;
  const auto [spread, groups] =
      plan_members(forced_groups, members, n, rows, x_rows, H, G, small_groups);
  const bool whole = spread || groups > 1;  // one thread per problem
  // One problem per member and group of rows, each cut into chunks of units for the threads
  // that share it (all n of them when a member's rows form one group and the members do not
  // spread over the threads).
  std::vector<std::shared_ptr<Shared>> parts;
  for (int m = 0; m < members; ++m) {
    Problem member = base;
    member.B = rows;
    member.b0 = m * rows;
    member.w_x += static_cast<size_t>(m) * x_rows * GH;
    member.b_x += m * GH;
    member.w_h += static_cast<size_t>(m) * H * GH;
    member.b_in += m * GH;
    for (int k = 0; k < groups; ++k) {
      auto sh = group_part<Shared>(member, k, groups, duplicate);
      sh->layout = layout;
      const Problem& p = sh->p;
      const size_t rows_h = static_cast<size_t>(p.B) * H, first = static_cast<size_t>(p.b0) * H;
      sh->h_ring.resize(2 * rows_h);
      sh->c_ring.resize(2 * rows_h);
      std::memcpy(sh->h_ring.data(), h0.typed_data() + first, rows_h * sizeof(float));
      std::memcpy(sh->c_ring.data(), c0.typed_data() + first, rows_h * sizeof(float));
      if (p.resets != nullptr && !reverse && T > 0)  // the first step's reset, before it
        for (int b = 0; b < p.B; ++b)
          if (p.resets[row_of(p, 0, b)]) {
            std::fill_n(sh->h_ring.data() + static_cast<size_t>(b) * H, H, 0.0f);
            std::fill_n(sh->c_ring.data() + static_cast<size_t>(b) * H, H, 0.0f);
          }
      sh->split(whole ? 1 : n, H);
      // Each chunk's W_x and W_h columns (all gates of its units) as panels of (I, G·U) and
      // (H, G·U), its biases as (G·U,); the columns by the threads (`pack_chunk`).
      if (!projected)
        pack(*sh, p.w_x, I, p.b_x, &sh->wx, &sh->wx_offset, &sh->bias_x, bf16 ? &sh->wx16 : nullptr);
      pack(*sh, p.w_h, H, p.b_in, &sh->w, &sh->w_offset, &sh->bias, bf16 ? &sh->w16 : nullptr);
      sh->spare_wx.resize(sh->chunks);
      sh->spare_w.resize(sh->chunks);
      sh->spare_wx16.resize(sh->chunks);
      sh->spare_w16.resize(sh->chunks);
      sh->pack_bytes = sizeof(float) * (x_rows + H) * G * sh->widest();
      parts.push_back(std::move(sh));
    }
  }

  if (ffi::Error err = run_members(parts, members, groups, spread, pool, n); err.failure())
    return err;
  const size_t last = T & 1;
  for (const auto& sh : parts) {
    const size_t rows_h = static_cast<size_t>(sh->p.B) * H;
    const size_t first = static_cast<size_t>(sh->p.b0) * H;
    std::memcpy(h_last->typed_data() + first, sh->h_ring.data() + last * rows_h,
                rows_h * sizeof(float));
    std::memcpy(c_last->typed_data() + first,
                sh->c_ring.data() + (kind == kLstm ? last * rows_h : 0), rows_h * sizeof(float));
  }
  return ffi::Error::Success();
}

// ---- the backward loop: the transpose of fastpath's linear tangent loop ----------------------
//
// The tangent loop (fastpath._recurrence_jvp) runs, per step, for the carry's tangent d:
//   v_t = u_t + d_h,in W_h;  (d_new, dy_t) = linear step(v_t, d_in, coefficients_t)
// (the GRU keeps the input part u_t and the recurrent part apart: its reset gate multiplies the
// latter). Its transpose runs the steps in the opposite order with the carry's cotangent λ:
//   elman: g = λ_h + ct_y;  ct_v = slope g (1 - h², or [h > 0]);  λ_h,in = ct_v W_hᵀ
//   lstm:  g = λ_h + ct_y;  g_c = λ_c + (o tanh'(c)) g;  ct_v = slopes · [g_c, g_c, g_c, g]
//          λ_c,in = f g_c;  λ_h,in = ct_v W_hᵀ
//   gru:   g = λ_h + ct_y;  a = n_slope g;  (r_slope = r(1-r), z_slope = z(1-z)(h_in - n),
//          n_slope = (1-z)(1-n²));  ct_v = [r_slope hn a, z_slope g, r a] (recurrent)
//          ct_u = [r_slope hn a, z_slope g, a] (input);  λ_h,in = z g + ct_v W_hᵀ
// with masks (a skipped step passes λ through and takes no cotangent) and resets (they zero
// λ where the forward loop zeroed the carry). The step's matmul λ_h,in = ct_v W_hᵀ needs
// ct_v of all units, so a chunk task at backward step s first finishes λ of its units with the
// matmul of step s - 1's published ct_v, then computes step s's ct_v for its units.

struct BackProblem {
  int kind, T, B, H, G;
  int inner;  // rows per run, as in `Problem`; "(T, B, ·)" below is (B / inner, T, inner, ·)
  bool reverse;
  const float* ct_ys;     // (T, B, H)
  const float* coef[6];   // elman (h,); lstm (slopes (T, B, 4H), f, o·tanh'(c)); gru
                          // ([r, z, n] (T, B, 3H), hn, h_in); (T, B, H) unless noted. The
                          // Elman and GRU steps make their coefficients from these residuals.
  const float* w_h;       // (H, G*H)
  const bool *mask, *resets;
  float* ct_u;            // (T, B, G*H): the cotangent of the loop's input per step. It may
                          // be coef[0]'s buffer (native.backward aliases them): each element
                          // is read at its step before the chunk's publication writes it, and
                          // a duplicate copy reading it later loses the publication.
  float* ct_v;            // the GRU: (T, B, 3H), the cotangent of its recurrent input; else null
  int b0 = 0;             // the first row this problem covers, as in `Problem`
  bool bf16 = false;      // W_h is bfloat16: ct_v W_hᵀ on AMX tiles, ct_v in three parts
                          // (from 16 rows; below, the float32 matmul gives the same)
  int panel_rows = kAllRows;  // `gemm_acc`'s blocks (`panel_rows`)
};

struct BackShared : Chunks {
  BackProblem p;
  std::vector<size_t> wt_offset;
  Packed wt;  // per chunk: W_hᵀ's columns of its units, packed
  std::vector<Packed> spare_wt;  // per chunk: its spare copy, where one was made
  Halves wt16;  // bf16: the same, packed for `gemm_bf16` instead
  Floats v_ring, lh_ring, lc_ring;  // (2, B, G*H), (2, B, H), (2, B, H)

  // Chunk c's packed block of W_hᵀ (float32), once packed.
  const float* packed_t(int c) const {
    return spare(c) ? spare_wt[c].data() : wt.data() + wt_offset[c];
  }
};

// The row stride of λ entering a step (`BackLocal`'s lh_in, lc_in) for a chunk of U units: in
// bf16 mode the tiles' columns, 16, with rows rounded up to 16 too.
inline int lambda_stride(const BackProblem& p, int U) { return p.bf16 ? round_up(U, 16) : U; }

struct BackLocal {
  Floats lh_in, lc_in;  // λ entering the step: (B, U) each (`lambda_stride`)
  Floats lh, lc, v, u;  // (B, U), (B, U), (B, G*U), (B, G*U)
  Halves parts;         // bf16: ct_v's three parts (`split3_rows`)
  BackLocal(int B, int G, int U, bool bf16 = false, int H = 0)
      : lh(B * U), lc(B * U), v(B * G * U), u(B * G * U) {
    const size_t rows = bf16 ? round_up(B, 16) : B, ldl = bf16 ? round_up(U, 16) : U;
    lh_in.assign(rows * ldl, 0.0f);
    lc_in.assign(rows * ldl, 0.0f);
    if (bf16) parts.resize(3 * rows * round_up(G * H, 32));
  }
};

BackLocal make_local(const BackShared& sh, int widest) {
  return BackLocal(sh.p.B, sh.p.G, widest, sh.p.bf16, sh.p.H);
}

struct BackRow {
  const float *lh, *lc, *ct_y;  // λ of this chunk's units (after the matmul), ct_ys[t]
  const float* coef[6];  // at this row and unit 0 of the chunk (coef[0] of the LSTM and GRU:
                         // gate stride H)
  float *v, *u, *lh_out, *lc_out;  // v, u: gate g of unit j at [g*U + j]
  int U, H;
  bool take;
};

template <int kind, class V>
inline void back_units(const BackRow& w, int j) {
  const int U = w.U;
  const V zero = splat<V>(0.0f);
  const V lh = load<V>(w.lh + j);
  const V lam_h = w.take ? lh : zero, pass_h = w.take ? zero : lh;
  const V g = lam_h + (w.take ? load<V>(w.ct_y + j) : zero);
  if (kind == kElmanTanh || kind == kElmanRelu) {
    const V h = load<V>(w.coef[0] + j);  // the step's output: tanh′ = 1 - h², relu′ = [h > 0]
    const V slope = kind == kElmanTanh ? 1.0f - h * h : ((h > 0.0f) ? splat<V>(1.0f) : zero);
    const V v = slope * g;
    store(w.v + j, v);
    store(w.u + j, v);
    store(w.lh_out + j, pass_h);
  } else if (kind == kLstm) {
    const V lc = load<V>(w.lc + j);
    const V lam_c = w.take ? lc : zero, pass_c = w.take ? zero : lc;
    const V gc = lam_c + load<V>(w.coef[2] + j) * g;
    const float* slopes = w.coef[0];
    for (int k = 0; k < 4; ++k) {
      const V v = load<V>(slopes + k * w.H + j) * (k == 3 ? g : gc);
      store(w.v + k * U + j, v);
      store(w.u + k * U + j, v);
    }
    store(w.lc_out + j, load<V>(w.coef[1] + j) * gc + pass_c);
    store(w.lh_out + j, pass_h);
  } else {
    // The tangent's coefficients from the residuals ([r, z, n], hn, h_in), as fastpath's
    // _gru_coefficients: r(1 - r), z(1 - z)(h_in - n), (1 - z)(1 - n²).
    const float* rzn = w.coef[0];
    const V r = load<V>(rzn + j), z = load<V>(rzn + w.H + j), n = load<V>(rzn + 2 * w.H + j);
    const V hn = load<V>(w.coef[1] + j), h_in = load<V>(w.coef[2] + j);
    const V a = (1.0f - z) * (1.0f - n * n) * g;
    const V vr = r * (1.0f - r) * hn * a;
    const V vz = z * (1.0f - z) * (h_in - n) * g;
    store(w.v + j, vr);
    store(w.v + U + j, vz);
    store(w.v + 2 * U + j, r * a);
    store(w.u + j, vr);
    store(w.u + U + j, vz);
    store(w.u + 2 * U + j, a);
    store(w.lh_out + j, z * g + pass_h);
  }
}

template <int kind>
struct BackwardRow {
  static void run(const BackRow& w) {
    over_units<BackRow, back_units<kind, Lanes>, back_units<kind, float>>(w);
  }
};

// The time of backward step s: the forward loop's steps in the opposite order.
inline int back_time(const BackProblem& p, int s) { return p.reverse ? s : p.T - 1 - s; }

// λ of a chunk's units entering backward step s: what the chunk left in the rings (the
// pass-through, the GRU's z g, λ_c) plus step s - 1's ct_v W_hᵀ, zeroed where the forward
// loop reset the carry before step s - 1's time.
// lh and lc have rows of stride `lambda_stride`; in bf16 mode `parts` takes ct_v's parts.
void finish_lambda(const BackShared& sh, int chunk, int s, float* lh, float* lc,
                   uint16_t* parts) {
  const BackProblem& p = sh.p;
  const int B = p.B, H = p.H, GH = p.G * H, u0 = sh.start[chunk];
  const int U = sh.start[chunk + 1] - u0, ldl = lambda_stride(p, U);
  const size_t slot = static_cast<size_t>(s & 1);
  for (int b = 0; b < B; ++b) {
    std::memcpy(lh + b * ldl, sh.lh_ring.data() + (slot * B + b) * H + u0, U * sizeof(float));
    std::memcpy(lc + b * ldl, sh.lc_ring.data() + (slot * B + b) * H + u0, U * sizeof(float));
  }
  if (s == 0) return;
  const float* v = sh.v_ring.data() + slot * B * GH;
  if (p.bf16) {
    const int Bp = round_up(B, 16), Kp = round_up(GH, 32);
    const size_t size = static_cast<size_t>(Bp) * Kp;
    split3_rows([&](int b) { return v + static_cast<size_t>(b) * GH; }, B, GH, Bp, Kp, parts,
                size);
    for (int q = 0; q < 3; ++q)
      gemm_bf16(parts + q * size, Kp, sh.wt16.data() + sh.wt_offset[chunk], ldl, lh, ldl, Bp, 0,
                B);
  } else {
    gemm_acc(v, GH, sh.packed_t(chunk), U, GH, lh, B, p.panel_rows);
  }
  if (p.resets != nullptr && !p.reverse) {
    const int t_prev = back_time(p, s - 1);
    for (int b = 0; b < B; ++b)
      if (p.resets[row_of(p, t_prev, b)]) {
        std::fill_n(lh + b * ldl, U, 0.0f);
        std::fill_n(lc + b * ldl, U, 0.0f);
      }
  }
}

void step_chunk(const BackShared& sh, int chunk, int s, BackLocal& out) {
  const BackProblem& p = sh.p;
  const int B = p.B, H = p.H, G = p.G, u0 = sh.start[chunk];
  const int U = sh.start[chunk + 1] - u0;
  const int t = back_time(p, s);
  float *lh = out.lh_in.data(), *lc = out.lc_in.data();
  const int ldl = lambda_stride(p, U);
  finish_lambda(sh, chunk, s, lh, lc, out.parts.data());
  const auto fn = row_fn<BackwardRow, BackRow>(p.kind);
  const int widths[6] = {G, 1, 1, 1, 1, 1};  // coef[0]: all gates (the Elman's one)
  for (int b = 0; b < B; ++b) {
    const size_t row = row_of(p, t, b);
    if (p.reverse && p.resets != nullptr && p.resets[row]) {  // zeroed after the step
      std::fill_n(lh + b * ldl, U, 0.0f);
      std::fill_n(lc + b * ldl, U, 0.0f);
    }
    BackRow w;
    w.lh = lh + b * ldl;
    w.lc = lc + b * ldl;
    w.ct_y = p.ct_ys + row * H + u0;
    for (int k = 0; k < 6; ++k)
      w.coef[k] = p.coef[k] ? p.coef[k] + row * widths[k] * H + u0 : nullptr;
    w.v = out.v.data() + static_cast<size_t>(b) * G * U;
    w.u = out.u.data() + static_cast<size_t>(b) * G * U;
    w.lh_out = out.lh.data() + static_cast<size_t>(b) * U;
    w.lc_out = out.lc.data() + static_cast<size_t>(b) * U;
    w.U = U;
    w.H = H;
    w.take = p.mask == nullptr || p.mask[row];
    fn(w);
  }
}

void publish(BackShared& sh, int chunk, int s, const BackLocal& out) {
  if (!sh.begin_publish(chunk, s)) return;
  const BackProblem& p = sh.p;
  const int B = p.B, H = p.H, G = p.G, GH = G * H, u0 = sh.start[chunk];
  const int U = sh.start[chunk + 1] - u0;
  const int t = back_time(p, s);
  const size_t slot = static_cast<size_t>((s + 1) & 1);
  for (int b = 0; b < B; ++b) {
    const float* v = out.v.data() + static_cast<size_t>(b) * G * U;
    for (int g = 0; g < G; ++g) {
      const size_t col = static_cast<size_t>(g) * H + u0;
      std::memcpy(sh.v_ring.data() + (slot * B + b) * GH + col, v + g * U, U * sizeof(float));
    }
    std::memcpy(sh.lh_ring.data() + (slot * B + b) * H + u0, out.lh.data() + b * U,
                U * sizeof(float));
    if (p.kind == kLstm)
      std::memcpy(sh.lc_ring.data() + (slot * B + b) * H + u0, out.lc.data() + b * U,
                  U * sizeof(float));
  }
  sh.published(chunk, s);
  // The cotangents of the loop's inputs, which no step reads, from this thread's own buffers:
  // after the publication, while other threads may start the next step.
  for (int b = 0; b < B; ++b) {
    const size_t row = row_of(p, t, b);
    const float* v = out.v.data() + static_cast<size_t>(b) * G * U;
    const float* u = out.u.data() + static_cast<size_t>(b) * G * U;
    for (int g = 0; g < G; ++g) {
      const size_t col = static_cast<size_t>(g) * H + u0;
      std::memcpy(p.ct_u + row * GH + col, u + g * U, U * sizeof(float));
      if (p.ct_v) std::memcpy(p.ct_v + row * GH + col, v + g * U, U * sizeof(float));
    }
  }
}

// Per chunk, the place of the (G·H, U) block of W_hᵀ for its units: float32, in the panels of
// `gemm_acc`, written by `pack_chunk`; in bf16 mode packed here, as `gemm_bf16` takes it.
void pack_transposed(BackShared& sh) {
  const int H = sh.p.H, GH = sh.p.G * H;
  sh.wt_offset.resize(sh.chunks);
  sh.spare_wt.resize(sh.chunks);
  if (sh.p.bf16) {  // W_hᵀ[k][j] = W_h[u0 + j][k]
    pack_chunks_bf16(sh.start, sh.chunks, 1, GH, [&](int c, int k, float* dst) {
      const float* column = sh.p.w_h + static_cast<size_t>(sh.start[c]) * GH + k;
      for (int j = 0; j < sh.start[c + 1] - sh.start[c]; ++j)
        dst[j] = column[static_cast<size_t>(j) * GH];
    }, &sh.wt16, &sh.wt_offset);
    sh.all_packed();
    return;
  }
  sh.wt.resize(static_cast<size_t>(GH) * H);
  sh.pack_bytes = sizeof(float) * GH * sh.widest();
  for (int c = 0, columns = 0; c < sh.chunks; ++c) {
    sh.wt_offset[c] = static_cast<size_t>(columns) * GH;
    columns += sh.start[c + 1] - sh.start[c];
  }
}

// Packs chunk c's block of W_hᵀ: copy 0 in its place, 1 as its spare. A panel's rows k are
// W_h's columns: 16 of them at a time, from each of the panel's (up to 32) rows of W_h one
// 64-byte run into L1, then written out transposed. Element by element down W_h's rows
// instead, measured alone on a 2-core AMD EPYC (Zen 4), warm: LSTM H = 512 1.9-2.1 ms, H =
// 1024 7.1-7.8 ms; 16 at a time 0.6 and 3.3-3.6 ms.
void pack_chunk(BackShared& sh, int c, int copy) {
  const int GH = sh.p.G * sh.p.H;
  const int u0 = sh.start[c], U = sh.start[c + 1] - u0;
  float* block;
  if (copy == 0) {
    block = sh.wt.data() + sh.wt_offset[c];
  } else {
    sh.spare_wt[c].resize(static_cast<size_t>(GH) * U);
    block = sh.spare_wt[c].data();
  }
  for (int j = 0; j < U;) {
    const int width = panel_width(U, j);
    const float* rows = sh.p.w_h + static_cast<size_t>(u0 + j) * GH;
    int k0 = 0;
    for (float run[32][16]; k0 + 16 <= GH; k0 += 16) {
      for (int i = 0; i < width; ++i)
        std::memcpy(run[i], rows + static_cast<size_t>(i) * GH + k0, sizeof(run[i]));
      for (int k = 0; k < 16; ++k)
        for (int i = 0; i < width; ++i) block[static_cast<size_t>(k0 + k) * width + i] = run[i][k];
    }
    for (int k = k0; k < GH; ++k)
      for (int i = 0; i < width; ++i)
        block[static_cast<size_t>(k) * width + i] = rows[static_cast<size_t>(i) * GH + k];
    block += static_cast<size_t>(GH) * width;
    j += width;
  }
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> ct_ys, ffi::Buffer<ffi::F32> ct_h,
                    ffi::Buffer<ffi::F32> ct_c, ffi::Buffer<ffi::F32> coef0,
                    ffi::Buffer<ffi::F32> coef1, ffi::Buffer<ffi::F32> coef2,
                    ffi::Buffer<ffi::F32> coef3, ffi::Buffer<ffi::F32> coef4,
                    ffi::Buffer<ffi::F32> coef5, ffi::Buffer<ffi::F32> w_h,
                    ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::PRED> resets,
                    ffi::ResultBuffer<ffi::F32> ct_u, ffi::ResultBuffer<ffi::F32> ct_v,
                    ffi::ResultBuffer<ffi::F32> ct_h0, ffi::ResultBuffer<ffi::F32> ct_c0,
                    int32_t kind, bool reverse, int32_t threads, bool duplicate,
                    int32_t forced_groups, bool small_groups, bool huge_pages,
                    bool bf16, int32_t forced_panel_rows) {
  if (bf16 && !bf16_ready())
    return ffi::Error::InvalidArgument(
        "jaxrnn native backward: bf16 matmuls need AMX or AVX512-BF16 "
        "(jaxrnn_bf16_available() is 0)");
  auto yd = ct_ys.dimensions();
  auto wd = w_h.dimensions();
  const size_t rank = wd.size();  // 3: a leading axis of members
  if (yd.size() != 4 || (rank != 2 && rank != 3) || kind < kElmanTanh || kind > kGru)
    return ffi::Error::InvalidArgument(
        "jaxrnn native backward: ct_ys must be (N, T, B, H), w_h ([E,] H, G*H)");
  const int members = rank == 3 ? static_cast<int>(wd[0]) : 1;
  const int T = static_cast<int>(yd[1]), inner = std::max(static_cast<int>(yd[2]), 1);
  const int B = static_cast<int>(yd[0] * yd[2]), H = static_cast<int>(yd[3]);
  const int G = kind == kLstm ? 4 : (kind == kGru ? 3 : 1);
  const size_t BH = static_cast<size_t>(B) * H, flags = static_cast<size_t>(T) * B;
  const size_t GH = static_cast<size_t>(G) * H;
  const int n_coef = G > 1 ? 3 : 1;
  const ffi::Buffer<ffi::F32>* coefs[6] = {&coef0, &coef1, &coef2, &coef3, &coef4, &coef5};
  bool ok = wd[rank - 2] == H && wd[rank - 1] == static_cast<int64_t>(GH) && members >= 1 &&
            yd[0] % members == 0 && ct_h.element_count() == BH &&
            ct_c.element_count() == BH && ct_u->element_count() == flags * GH &&
            ct_v->element_count() == (kind == kGru ? flags * GH : 0) &&
            ct_h0->element_count() == BH && ct_c0->element_count() == BH;
  for (int k = 0; k < 6; ++k) {
    const size_t want = k >= n_coef ? 0 : flags * H * (k == 0 ? G : 1);  // coef[0]: all gates
    ok = ok && coefs[k]->element_count() == want;
  }
  if (!ok) return ffi::Error::InvalidArgument("jaxrnn native backward: inconsistent shapes");
  if ((mask.element_count() != 0 && mask.element_count() != flags) ||
      (resets.element_count() != 0 && resets.element_count() != flags))
    return ffi::Error::InvalidArgument("jaxrnn native backward: mask/resets must be (N, T, B') or empty");

  BackProblem base{kind, T, B, H, G, inner, reverse, ct_ys.typed_data(), {}, w_h.typed_data(),
                   mask.element_count() ? mask.typed_data() : nullptr,
                   resets.element_count() ? resets.typed_data() : nullptr, ct_u->typed_data(),
                   kind == kGru ? ct_v->typed_data() : nullptr};
  for (int k = 0; k < 6; ++k) base.coef[k] = k < n_coef ? coefs[k]->typed_data() : nullptr;
  base.bf16 = bf16;
  base.panel_rows = panel_rows(forced_panel_rows);
  // ct_u takes coef[0]'s buffer (written by the forward kernel; the Elman's, ct_ys's); ct_v is
  // new.
  if (huge_pages && base.ct_v != nullptr)
    advise_huge_pages(base.ct_v, flags * GH * sizeof(float));

  const int n = thread_count(threads, static_cast<int>(pool.num_threads()), B, G, H);
  const int rows_m = B / members;
  const auto [spread, groups] =
      plan_members(forced_groups, members, n, rows_m, 0, H, G, small_groups);
  const bool whole = spread || groups > 1;
  std::vector<std::shared_ptr<BackShared>> parts;  // as in `Forward`
  for (int m = 0; m < members; ++m) {
    BackProblem member = base;
    member.B = rows_m;
    member.b0 = m * rows_m;
    member.w_h += static_cast<size_t>(m) * H * GH;
    for (int k = 0; k < groups; ++k) {
      auto sh = group_part<BackShared>(member, k, groups, duplicate);
      const size_t rows = sh->p.B, first = static_cast<size_t>(sh->p.b0) * H;
      sh->v_ring.assign(2 * rows * GH, 0.0f);
      sh->lh_ring.assign(2 * rows * H, 0.0f);
      sh->lc_ring.assign(2 * rows * H, 0.0f);
      std::memcpy(sh->lh_ring.data(), ct_h.typed_data() + first, rows * H * sizeof(float));
      if (kind == kLstm)
        std::memcpy(sh->lc_ring.data(), ct_c.typed_data() + first, rows * H * sizeof(float));
      sh->split(whole ? 1 : n, H);
      // The tiles only for at least a tile's 16 rows: below, W_hᵀ (bfloat16-valued) stays in
      // float32. Measured (bf16 fwd+bwd, 2 cores, 3-5 alternating runs, ms, float32 / tiles):
      // LSTM B64 T128 H512 362-372 / 343-351, B64 T100 H1024 1058-1094 / 1008-1025, B64 T100
      // H128 (groups of 32 rows) 24.6-25.3 / 23.0-24.8, B16 T100 H512 82-86 / 77-84; in groups
      // of 8 rows LSTM B16 T100 H256 22.6-24.6 / 24.9-25.0, GRU B16 T256 H128 median 13.5 /
      // 15.3; LSTM B8 T100 H128 median 3.9 / 4.0.
      sh->p.bf16 = bf16 && sh->p.B >= 16;
      pack_transposed(*sh);
      parts.push_back(std::move(sh));
    }
  }
  if (ffi::Error err = run_members(parts, members, groups, spread, pool, n); err.failure())
    return err;
  // λ entering the first forward step: the last backward step's matmul and resets.
  for (const auto& sh : parts) {
    const int rows = sh->p.B, b0 = sh->p.b0;
    BackLocal scratch = make_local(*sh, sh->widest());
    for (int c = 0; c < sh->chunks; ++c) {
      const int u0 = sh->start[c], U = sh->start[c + 1] - u0, ldl = lambda_stride(sh->p, U);
      float *lh = scratch.lh_in.data(), *lc = scratch.lc_in.data();
      finish_lambda(*sh, c, T, lh, lc, scratch.parts.data());
      for (int b = 0; b < rows; ++b) {
        const size_t at = static_cast<size_t>(b0 + b) * H + u0;
        std::memcpy(ct_h0->typed_data() + at, lh + b * ldl, U * sizeof(float));
        std::memcpy(ct_c0->typed_data() + at, lc + b * ldl, U * sizeof(float));
      }
    }
  }
  return ffi::Error::Success();
}

// ---- the gradient pass's input and weight gradients in bf16 mode ---------------------------
//
// `matmul_dtype=bfloat16`'s tangent rule multiplies the float32 tangents by the bfloat16
// operands, in float32 (fastpath._dot); its transpose, the three matmuls after the backward
// loop, over all R rows (steps × batch) at once:
//
//   dx = ct_x · bf16(W_x)ᵀ,   dW_x = bf16(x)ᵀ · ct_x,   dW_h = bf16(h_in)ᵀ · ct_h
//
// (ct_h = ct_x but for the GRU), and the bias gradients db_x = Σ_rows ct_x, db_h = Σ_rows
// ct_h. Each matmul runs on the tiles with the float32 cotangent as its three exact bfloat16
// parts (`split3`), so each product is float32's and the sums are float32 sums in another
// order. The rows go in blocks of at most kGradRows, as many as a multiple of the threads,
// of equal size (`grad_block_rows`), each padded to the tiles' 32 rows only; each block's
// cotangent is read and split once for all three matmuls and the sums (XLA's float32 dots
// and reduction read it four times). The blocks go in runs, one per thread at most
// (`over_slots`), each run's weight and bias gradients summed in float32 accumulators of its
// own, added up at the end in a fixed order; dx's rows are each block's own. Blocks of 256
// rows padded with zeros before (2026-12-06, Intel Xeon, XLA's time / the kernel's, the
// products alone, rows × I × H × G·H): 800 × 128 × 128 × 384 1.01, now 2.17 (a fourth block
// of 32 rows took as long as a full one); 200 × 128 × 128 × 512 1.23, now 2.05; 100 × 512 ×
// 512 × 2048 0.33, now 0.45 (where the rows are few, `native.tile_gradients` leaves the
// products to XLA's dots).

constexpr int kGradRows = 256;
// Columns of the cotangent split and multiplied at a time: a slice's parts (3 × 256 × 256 in
// both layouts, 768 KiB) stay in L2 between the split and the matmuls.
constexpr int kGradSlice = kBlock16;

struct GradShared {
  int R, I, H, GH, Ip, Hp, GHp;
  const float *x, *h, *ct_x, *ct_h;  // ct_h null: ct_x
  float* dx;                         // null: not wanted
  float *dw_x, *dw_h, *db_x, *db_h;  // the results (I × GH, H × GH, GH, GH or null)
  const uint16_t* wxt;               // bf16(W_x)ᵀ packed for `gemm_bf16` (GHp × Ip), or null
  const float* wxt32 = nullptr;      // f32: W_xᵀ packed for `gemm_acc`, slice by slice
  bool rounded = false;              // f32: x and h_in (and W_x) rounded to bfloat16 first
  int block_rows = kGradRows;        // rows a block (`grad_block_rows`)
  int blocks = 0, slots = 0;         // blocks of rows; slots, each a run of them (`over_slots`)
  std::atomic<int> next{0}, active{0};  // the next slot to claim; threads at work
  std::atomic<int> next_rows{0}, summing{0};
  // Per slot, rows of GHp: dW_x (Ip rows), dW_h (Hp rows), then the column sums of ct_x and
  // of ct_h (the bias gradients).
  std::vector<Floats> acc;
};

// The slots one after another as a thread claims them, each slot's blocks in order:
// `block(b, acc)` for each block b of the slot, into the slot's accumulators (zeroed first,
// `size` floats). The slots are runs of blocks as even as can be, fixed by their count, and
// `sum_slots` adds them up in order: the sums do not depend on which thread ran which slot,
// so the results are the same from call to call.
template <class Block>
void over_slots(GradShared& sh, size_t size, Block&& block) {
  for (int s; (s = sh.next.fetch_add(1, std::memory_order_acq_rel)) < sh.slots;) {
    Floats& acc = sh.acc[s];
    acc.assign(size, 0.0f);
    const int first = static_cast<int>(int64_t{s} * sh.blocks / sh.slots);
    const int end = static_cast<int>(int64_t{s + 1} * sh.blocks / sh.slots);
    for (int b = first; b < end; ++b) block(b, acc.data());
  }
}

// Whether a slot is left to claim; if not, the thread leaves (`active` counted it first).
bool slots_left(GradShared& sh) {
  if (sh.next.load(std::memory_order_acquire) < sh.slots) return true;
  sh.active.fetch_sub(1, std::memory_order_acq_rel);
  return false;
}

// Accumulator slots at most, so that a many-core machine does not hold one (I + H) × G·H
// float32 copy of the weight gradients per core: kGradSlotBytes in all.
constexpr size_t kGradSlotBytes = size_t{512} << 20;
constexpr int kSumRows = 16;  // rows of the weight gradients summed at a time

// The weight and bias gradients: the slots' sums added up, padding dropped, kSumRows rows of
// [dW_x; dW_h; db_x; db_h] at a time, claimed as `grad_blocks` claims blocks.
void sum_slots(GradShared& sh) {
  sh.summing.fetch_add(1, std::memory_order_acq_rel);
  const int I = sh.I, H = sh.H, GH = sh.GH, rows = I + H + (sh.db_h ? 2 : 1);
  for (int c; (c = sh.next_rows.fetch_add(1, std::memory_order_acq_rel)) * kSumRows < rows;)
    for (int i = c * kSumRows; i < std::min(rows, (c + 1) * kSumRows); ++i) {
      float* out = i < I       ? sh.dw_x + static_cast<size_t>(i) * GH
                   : i < I + H ? sh.dw_h + static_cast<size_t>(i - I) * GH
                   : i == I + H ? sh.db_x
                                : sh.db_h;
      const int row = i < I ? i : i < I + H ? sh.Ip + i - I : sh.Ip + sh.Hp + i - I - H;
      const size_t at = static_cast<size_t>(row) * sh.GHp;
      if (sh.slots == 0) {
        std::fill_n(out, GH, 0.0f);
        continue;
      }
      std::memcpy(out, sh.acc[0].data() + at, GH * sizeof(float));
      for (int s = 1; s < sh.slots; ++s) {
        const float* add = sh.acc[s].data() + at;
        for (int j = 0; j < GH; ++j) out[j] += add[j];
      }
    }
  sh.summing.fetch_sub(1, std::memory_order_acq_rel);
}

#ifdef JAXRNN_AMX
// C (Mp × Np, stride ldc) += A (Mp × Kp bf16, row-major) · (B_0 + B_1 + B_2) (each Kp × Np
// packed, `ldq` apart): two column blocks of 16 at a time, then two row blocks of 16.
void gemm_parts3(const uint16_t* A, int Mp, int Kp, const uint16_t* B, size_t ldq, int Np,
                 float* C, int ldc) {
  const size_t ldw = static_cast<size_t>(Kp) * 16;
  for (int j = 0; j < Np; j += 32) {
    const bool two = j + 32 <= Np;
    const uint16_t* Bj = B + (j / 16) * ldw;
    for (int m = 0; m < Mp; m += 32) {
      const uint16_t* am = A + static_cast<size_t>(m) * Kp;
      float* cm = C + static_cast<size_t>(m) * ldc + j;
      if (m + 32 <= Mp) {
        if (two) amx_block<2, 2, 3>(am, Kp, Bj, ldw, ldq, cm, ldc);
        else amx_block<2, 1, 3>(am, Kp, Bj, ldw, ldq, cm, ldc);
      } else {
        if (two) amx_block<1, 2, 3>(am, Kp, Bj, ldw, ldq, cm, ldc);
        else amx_block<1, 1, 3>(am, Kp, Bj, ldw, ldq, cm, ldc);
      }
    }
  }
}

#else
void gemm_parts3(const uint16_t*, int, int, const uint16_t*, size_t, int, float*, int) {
  std::abort();
}
void set_tiles() {}
#endif

// Rows [r0, r0 + n) of a float32 (R, K) matrix, rounded to bfloat16 and transposed: a K × Kp
// row-major left operand (Kp a multiple of 32, zero past n rows), rows past K untouched. 32
// rows at a time are converted into `rows` (32 × K, in L1), then each of their K columns
// written as one 64-byte run (element by element down the columns of all rows, LSTM B64
// H512 took 6 cycles an element: a column of 1024 rows spans more lines than L1 holds).
void transposed_bf16(const float* src, int K, int r0, int n, int Kp, uint16_t* dst,
                     uint16_t* rows) {
  for (int b = 0; b < Kp; b += 32) {
    const int m = std::clamp(n - b, 0, 32);
    for (int r = 0; r < m; ++r)
      to_bf16_row(src + static_cast<size_t>(r0 + b + r) * K, rows + static_cast<size_t>(r) * K, K);
    for (int k = 0; k < K; ++k) {
      uint16_t* out = dst + static_cast<size_t>(k) * Kp + b;
      for (int r = 0; r < m; ++r) out[r] = rows[static_cast<size_t>(r) * K + k];
      std::fill(out + m, out + 32, uint16_t{0});
    }
  }
}

// Rows [r0, r0 + n) of a slice of the cotangent (row r at ct + r · ld, `real` columns, zero
// past them up to `width`, a multiple of 16) as its three bfloat16 parts: each a Kp × width
// right operand of `gemm_parts3` (`ldq` elements apart, zero past n rows), and with `left`
// also a Kp × width left operand of `gemm_bf16` (width at most kBlock16: one block). Two rows
// at a time: with AVX-512, 16 columns of both rows are split together and each part's pairs
// (row r in the low half of a 32-bit lane, r + 1 in the high) stored as one 64-byte row of
// the tiles' layout. Also adds the rows, in order, to `sums` (`width` floats): the bias
// gradient.
void split_block(const float* ct, size_t ld, int real, int width, int r0, int n, int Kp,
                 uint16_t* right, size_t ldq, uint16_t* left, uint16_t* scratch, float* sums) {
  for (int r = 0; r < Kp; r += 2) {
    const float* rows[2] = {r < n ? ct + (r0 + r) * ld : nullptr,
                            r + 1 < n ? ct + (r0 + r + 1) * ld : nullptr};
#if defined(__AVX512F__) && defined(__AVX512BW__)
    (void)scratch;
    for (int j0 = 0; j0 < width; j0 += 16) {
      const __mmask16 mask = j0 + 16 <= real ? 0xffff : j0 < real ? (1u << (real - j0)) - 1 : 0;
      __m512i p[2][3], u[2];
      for (int s = 0; s < 2; ++s) {
        u[s] = rows[s] ? _mm512_maskz_loadu_epi32(mask, rows[s] + j0) : _mm512_setzero_si512();
        split3_v(u[s], p[s]);
      }
      if (rows[0])
        _mm512_storeu_ps(sums + j0, _mm512_add_ps(_mm512_add_ps(_mm512_loadu_ps(sums + j0),
                                                                _mm512_castsi512_ps(u[0])),
                                                  _mm512_castsi512_ps(u[1])));
      for (int q = 0; q < 3; ++q) {
        _mm512_storeu_si512(right + q * ldq + vnni_index(r, j0, Kp),
                            _mm512_or_si512(p[0][q], _mm512_slli_epi32(p[1][q], 16)));
        if (!left) continue;
        for (int s = 0; s < 2; ++s)
          _mm256_storeu_si256(
              reinterpret_cast<__m256i*>(left + q * ldq + static_cast<size_t>(r + s) * width + j0),
              _mm512_cvtepi32_epi16(p[s][q]));
      }
    }
#else
    uint16_t* p[2][3];
    for (int s = 0; s < 2; ++s)
      for (int q = 0; q < 3; ++q) {
        p[s][q] = scratch + (s * 3 + q) * static_cast<size_t>(width);
        std::fill_n(p[s][q], width, uint16_t{0});
      }
    for (int s = 0; s < 2; ++s)
      if (rows[s]) {
        split3_row(rows[s], p[s][0], p[s][1], p[s][2], real);
        for (int j = 0; j < real; ++j) sums[j] += rows[s][j];
      }
    for (int q = 0; q < 3; ++q) {
      for (int j0 = 0; j0 < width; j0 += 16) {
        uint16_t* dst = right + q * ldq + vnni_index(r, j0, Kp);
        for (int j = 0; j < 16; ++j) {
          dst[2 * j] = p[0][q][j0 + j];
          dst[2 * j + 1] = p[1][q][j0 + j];
        }
      }
      if (!left) continue;
      for (int s = 0; s < 2; ++s)
        std::memcpy(left + q * ldq + static_cast<size_t>(r + s) * width, p[s][q],
                    width * sizeof(uint16_t));
    }
#endif
  }
}

void grad_blocks(GradShared& sh) {
  sh.active.fetch_add(1, std::memory_order_acq_rel);
  if (!slots_left(sh)) return;
  if (!amx_ready()) std::abort();  // the caller checked
  const int I = sh.I, H = sh.H, GH = sh.GH, Ip = sh.Ip, Hp = sh.Hp, GHp = sh.GHp;
  const int per = sh.block_rows;  // a multiple of 32 (`grad_block_rows`)
  const int S = std::min(kGradSlice, GHp);
  const size_t most_q = static_cast<size_t>(per) * S;
  Halves ax(static_cast<size_t>(Ip) * per, 0), ah(static_cast<size_t>(Hp) * per, 0);
  Halves right(3 * most_q), right_h(sh.ct_h ? 3 * most_q : 0), left(sh.dx ? 3 * most_q : 0);
  Halves scratch(6 * static_cast<size_t>(S)), rows(32 * static_cast<size_t>(std::max(I, H)));
  Floats z(sh.dx ? static_cast<size_t>(per) * Ip : 0);
  set_tiles();
  over_slots(sh, static_cast<size_t>(Ip + Hp + 2) * GHp, [&](int block, float* acc) {
    float* sums = acc + static_cast<size_t>(Ip + Hp) * GHp;
    // The block's rows padded to the tiles' 32 (its K), not to kGradRows.
    const int r0 = block * per, n = std::min(per, sh.R - r0), Kp = round_up(n, 32);
    const size_t ldq = static_cast<size_t>(Kp) * S;
    transposed_bf16(sh.x, I, r0, n, Kp, ax.data(), rows.data());
    transposed_bf16(sh.h, H, r0, n, Kp, ah.data(), rows.data());
    if (sh.dx) std::fill_n(z.begin(), static_cast<size_t>(Kp) * Ip, 0.0f);
    for (int s0 = 0; s0 < GHp; s0 += S) {  // a slice of the cotangent's columns
      const int width = std::min(S, GHp - s0), real = std::clamp(GH - s0, 0, width);
      split_block(sh.ct_x + s0, GH, real, width, r0, n, Kp, right.data(), ldq,
                  sh.dx ? left.data() : nullptr, scratch.data(), sums + s0);
      if (sh.ct_h)
        split_block(sh.ct_h + s0, GH, real, width, r0, n, Kp, right_h.data(), ldq, nullptr,
                    scratch.data(), sums + GHp + s0);
      gemm_parts3(ax.data(), Ip, Kp, right.data(), ldq, width, acc + s0, GHp);
      gemm_parts3(ah.data(), Hp, Kp, sh.ct_h ? right_h.data() : right.data(), ldq, width,
                  acc + static_cast<size_t>(Ip) * GHp + s0, GHp);
      if (sh.dx) {  // rows s0.. of bf16(W_x)ᵀ: the packed matrix's column blocks GHp · 16 apart
        for (int q = 0; q < 3; ++q)
          gemm_bf16(left.data() + q * ldq, width, sh.wxt + static_cast<size_t>(s0) * 16, Ip,
                    z.data(), Ip, Kp, static_cast<size_t>(GHp) * 16);
        set_tiles();  // gemm_bf16 released them
      }
    }
    if (sh.dx)
      for (int r = 0; r < n; ++r)
        std::memcpy(sh.dx + static_cast<size_t>(r0 + r) * I, z.data() + static_cast<size_t>(r) * Ip,
                    I * sizeof(float));
  });
#ifdef JAXRNN_AMX
  _tile_release();
#endif
  sh.active.fetch_sub(1, std::memory_order_acq_rel);
}

// ---- the same in float32 (the default computation) ----------------------------------------
//
// The transpose of the float32 tangent rule's input terms (`fastpath._input_terms`), after the
// backward loop, over all R rows at once:
//
//   dx = ct_x · W_xᵀ,   dW_x = xᵀ · ct_x,   dW_h = h_inᵀ · ct_h,   db_x = Σ_rows ct_x,
//   db_h = Σ_rows ct_h
//
// on `gemm_acc`'s tiles, in the runs of blocks of rows and the slices of columns of the bf16
// mode: each slice of a block's cotangent read once from memory and packed into panels (the
// right operand of both weight gradients, summed into the bias gradients on the way; the
// left operand of dx, which stays in L2 meanwhile), x and h_in read as the left operands
// of the weight gradients as they lie, transposed by the tiles (`gemm_acc_t`). A run's
// weight gradients accumulate in its slot, added up at the end (`sum_slots`); dx's rows are
// each block's own. The sums are float32 sums in another order than XLA's dots: each
// product's terms in order of rows within a block, the blocks of a run in order, then the
// runs in order, the same in every call. The blocks are as many as a multiple of the
// threads, of equal size (`grad_block_rows`), so each thread gets an equal run. Measured
// against XLA's dots: `native.kernel_gradients`. With `rounded` (`matmul_dtype=bfloat16`
// without AMX) the products are those of bf16(x), bf16(h_in) and bf16(W_x) with the float32
// cotangents, as XLA's dots of `fastpath._dot` take them: a block's rows of x and h_in are
// rounded into a buffer of the thread's (no array of the call's size, which could push
// XLA's temporaries past what glibc keeps between calls), W_x as it is packed.

// Rows [r0, r0 + n) and columns [s0, s0 + w) of a row-major matrix (rows `ld` apart) as
// `gemm_acc`'s panels (K = n rows); adds the rows' column sums (in row order, from zero) to
// `sums` (w values).
void packed_slice(const float* src, size_t ld, int r0, int n, int s0, int w, float* out,
                  float* block_sums, float* sums) {
  std::fill_n(block_sums, w, 0.0f);
  for (int r = 0; r < n; ++r) {
    const float* row = src + static_cast<size_t>(r0 + r) * ld + s0;
    for (int j = 0; j < w;) {
      const int width = panel_width(w, j);
      std::memcpy(out + static_cast<size_t>(n) * j + static_cast<size_t>(r) * width, row + j,
                  width * sizeof(float));
      j += width;
    }
    for (int j = 0; j < w; ++j) block_sums[j] += row[j];
  }
  for (int j = 0; j < w; ++j) sums[j] += block_sums[j];
}

// W_xᵀ (GH × I, from W_x: I × GH) as `gemm_acc`'s panels, one slice of kGradSlice rows after
// another (slice s at s0 · I, its K = the slice's rows); each element `bf16_rounded` where
// `rounded`.
void packed_transpose(const float* w, int I, int GH, float* out, bool rounded) {
  for (int s0 = 0; s0 < GH; s0 += kGradSlice) {
    const int rows = std::min(kGradSlice, GH - s0);
    float* slice = out + static_cast<size_t>(s0) * I;
    for (int j = 0; j < I;) {
      const int width = panel_width(I, j);
      for (int c = 0; c < width; ++c) {
        const float* col = w + static_cast<size_t>(j + c) * GH + s0;  // W_x's row j + c
        for (int k = 0; k < rows; ++k)
          slice[static_cast<size_t>(rows) * j + static_cast<size_t>(k) * width + c] =
              rounded ? bf16_rounded(col[k]) : col[k];
      }
      j += width;
    }
  }
}

// Rows a block: at most kGradRows, as many blocks as a multiple of the n threads, of equal
// size, a multiple of `multiple` rows (float32's tiles take 8; the bf16 tiles' K is 32).
int grad_block_rows(int R, int n, int multiple) {
  if (R <= 0) return multiple;
  const int blocks = round_up((R + kGradRows - 1) / kGradRows, n);
  return std::min(kGradRows, round_up((R + blocks - 1) / blocks, multiple));
}

void grad_blocks_f32(GradShared& sh) {
  sh.active.fetch_add(1, std::memory_order_acq_rel);
  if (!slots_left(sh)) return;
  const int I = sh.I, H = sh.H, GH = sh.GH, rows = panel_rows(0), per = sh.block_rows;
  const int S = std::min(kGradSlice, GH);
  Floats right(static_cast<size_t>(kGradRows) * S), right_h(sh.ct_h ? right.size() : 0);
  Floats block_sums(S), zeros(sh.dx ? I : 0, 0.0f);
  // The block's rows of x and h_in rounded to bfloat16 (`rounded`), read from L2 after.
  Floats x_rounded(sh.rounded ? static_cast<size_t>(per) * I : 0);
  Floats h_rounded(sh.rounded ? static_cast<size_t>(per) * H : 0);
  over_slots(sh, static_cast<size_t>(I + H + 2) * GH, [&](int block, float* acc) {
    float* dw_x = acc;
    float* dw_h = dw_x + static_cast<size_t>(I) * GH;
    float* sums = dw_h + static_cast<size_t>(H) * GH;
    const int r0 = block * per, n = std::min(per, sh.R - r0);
    float* dx = sh.dx ? sh.dx + static_cast<size_t>(r0) * I : nullptr;
    const float* x = sh.x + static_cast<size_t>(r0) * I;
    const float* h = sh.h + static_cast<size_t>(r0) * H;
    if (sh.rounded) {
      bf16_rounded_row(x, x_rounded.data(), n * I);
      bf16_rounded_row(h, h_rounded.data(), n * H);
      x = x_rounded.data(), h = h_rounded.data();
    }
    for (int s0 = 0; s0 < GH; s0 += S) {  // a slice of the cotangent's columns
      const int w = std::min(S, GH - s0);
      packed_slice(sh.ct_x, GH, r0, n, s0, w, right.data(), block_sums.data(), sums + s0);
      const float* right_of_h = right.data();
      if (sh.ct_h) {
        packed_slice(sh.ct_h, GH, r0, n, s0, w, right_h.data(), block_sums.data(),
                     sums + GH + s0);
        right_of_h = right_h.data();
      }
      gemm_acc_t(x, I, right.data(), w, n, dw_x + s0, GH, I, rows);
      gemm_acc_t(h, H, right_of_h, w, n, dw_h + s0, GH, H, rows);
      if (dx)  // the slice's rows of W_xᵀ; the first slice starts from zero
        gemm_acc(sh.ct_x + static_cast<size_t>(r0) * GH + s0, GH,
                 sh.wxt32 + static_cast<size_t>(s0) * I, I, w, dx, n, rows,
                 s0 == 0 ? zeros.data() : nullptr);
    }
  });
  sh.active.fetch_sub(1, std::memory_order_acq_rel);
}

ffi::Error Gradients(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> h_in,
                     ffi::Buffer<ffi::F32> w_x, ffi::Buffer<ffi::F32> ct_x,
                     ffi::Buffer<ffi::F32> ct_h, ffi::ResultBuffer<ffi::F32> dx,
                     ffi::ResultBuffer<ffi::F32> dw_x, ffi::ResultBuffer<ffi::F32> dw_h,
                     ffi::ResultBuffer<ffi::F32> db_x, ffi::ResultBuffer<ffi::F32> db_h,
                     int32_t threads, bool f32, bool rounded) {
  if (!f32 && !amx_ready())
    return ffi::Error::InvalidArgument("jaxrnn gradient kernel: no AMX tiles on this CPU");
  const auto xd = xs.dimensions(), hd = h_in.dimensions(), wd = w_x.dimensions();
  const auto cd = ct_x.dimensions();
  if (xd.size() != 3 || hd.size() != 3 || wd.size() != 3 || cd.size() != 3)
    return ffi::Error::InvalidArgument("jaxrnn gradient kernel: operands must be 3-D");
  const int E = static_cast<int>(xd[0]), R = static_cast<int>(xd[1]);
  const int I = static_cast<int>(xd[2]), H = static_cast<int>(hd[2]);
  const int GH = static_cast<int>(cd[2]), Ew = static_cast<int>(wd[0]);
  const bool merged = ct_h.element_count() == 0, want_dx = dx->element_count() > 0;
  if (hd[0] != E || hd[1] != R || cd[0] != E || cd[1] != R || (Ew != 1 && Ew != E) ||
      wd[1] != I || wd[2] != GH || (!merged && ct_h.element_count() != ct_x.element_count()) ||
      (want_dx && dx->element_count() != xs.element_count()) ||
      dw_x->element_count() != static_cast<size_t>(E) * I * GH ||
      dw_h->element_count() != static_cast<size_t>(E) * H * GH ||
      db_x->element_count() != static_cast<size_t>(E) * GH ||
      db_h->element_count() != (merged ? 0 : static_cast<size_t>(E) * GH))
    return ffi::Error::InvalidArgument("jaxrnn gradient kernel: inconsistent shapes");
  const int n = threads > 0 ? threads
                            : std::min(cpu_count(), static_cast<int>(pool.num_threads()) + 1);
  // The bf16 parts' operands are padded to the tiles' multiples; float32's are not.
  const int Ip = f32 ? I : round_up(std::max(I, 1), 16), Hp = f32 ? H : round_up(H, 16);
  const int GHp = f32 ? GH : round_up(GH, 32);
  Halves wxt;
  Floats wxt32(f32 && want_dx ? static_cast<size_t>(I) * GH : 0);
  std::vector<size_t> offsets;
  for (int m = 0; m < E; ++m) {
    const size_t per = static_cast<size_t>(R);
    auto sh = std::make_shared<GradShared>();
    sh->R = R, sh->I = I, sh->H = H, sh->GH = GH, sh->Ip = Ip, sh->Hp = Hp, sh->GHp = GHp;
    sh->x = xs.typed_data() + m * per * I;
    sh->h = h_in.typed_data() + m * per * H;
    sh->ct_x = ct_x.typed_data() + m * per * GH;
    sh->ct_h = merged ? nullptr : ct_h.typed_data() + m * per * GH;
    sh->dx = want_dx ? dx->typed_data() + m * per * I : nullptr;
    if (want_dx && (m == 0 || Ew > 1)) {  // bf16(W_x)ᵀ[k][i] = W_x[i][k]
      const float* w = w_x.typed_data() + static_cast<size_t>(Ew > 1 ? m : 0) * I * GH;
      if (f32) {
        packed_transpose(w, I, GH, wxt32.data(), rounded);
      } else {
        pack_chunks_bf16({0, I}, 1, 1, GH, [&](int, int k, float* dst) {
          for (int i = 0; i < I; ++i) dst[i] = w[static_cast<size_t>(i) * GH + k];
        }, &wxt, &offsets);
      }
    }
    sh->wxt = want_dx && !f32 ? wxt.data() : nullptr;
    sh->wxt32 = want_dx && f32 ? wxt32.data() : nullptr;
    sh->rounded = f32 && rounded;
    sh->dw_x = dw_x->typed_data() + static_cast<size_t>(m) * I * GH;
    sh->dw_h = dw_h->typed_data() + static_cast<size_t>(m) * H * GH;
    sh->db_x = db_x->typed_data() + static_cast<size_t>(m) * GH;
    sh->db_h = merged ? nullptr : db_h->typed_data() + static_cast<size_t>(m) * GH;
    sh->block_rows = grad_block_rows(R, n, f32 ? 8 : 32);
    sh->blocks = (R + sh->block_rows - 1) / sh->block_rows;
    const size_t slot_bytes = static_cast<size_t>(Ip + Hp) * GHp * sizeof(float);
    const int t = static_cast<int>(std::max<size_t>(
        1, std::min<size_t>(std::min(n, sh->blocks), kGradSlotBytes / slot_bytes)));
    sh->slots = R > 0 ? t : 0;
    sh->acc.resize(t);
    void (*blocks_of)(GradShared&) = f32 ? grad_blocks_f32 : grad_blocks;
    for (int k = 1; k < t; ++k) pool.Schedule([sh, blocks_of] { blocks_of(*sh); });
    blocks_of(*sh);
    // Every slot is claimed once this thread's claims run out; a thread that claimed one
    // counted itself active first.
    wait_for_none(sh->active);
    const int sums = std::min(n, (I + H + 2 + kSumRows - 1) / kSumRows);
    for (int k = 1; k < sums; ++k) pool.Schedule([sh] { sum_slots(*sh); });
    sum_slots(*sh);
    wait_for_none(sh->summing);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxrnnRnnForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // xs (N, T, B', I); B = N·B'
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_x (I, G*H); (0, G*H):
                                                                  // xs is x W_x + b_x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b_x (G*H,)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_h (H, G*H)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b_in (G*H,)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h0 (B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // c0 (B, H)
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask (N, T, B') or empty
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // resets (N, T, B') or empty
                                  .Ret<ffi::Buffer<ffi::F32>>()   // ys (N, T, B', H)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // h_T (B, H)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // c_T (B, H)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // h_in (N, T, B', H) or empty
                                  .Ret<ffi::Buffer<ffi::F32>>()   // residuals, or empty
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("kind")
                                  .Attr<bool>("reverse")
                                  .Attr<int32_t>("threads")
                                  .Attr<bool>("duplicate")
                                  .Attr<int32_t>("groups")
                                  .Attr<bool>("small_groups")  // groups of 4 rows a thread
                                  .Attr<bool>("huge_pages")
                                  .Attr<bool>("bf16")  // matmuls of bf16 operands (AMX)
                                  .Attr<int32_t>("panel_rows"));  // tests: `panel_rows`

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxrnnRnnBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // ct_ys (N, T, B', H)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // ct_h (B, H): final carry
                                  .Arg<ffi::Buffer<ffi::F32>>()   // ct_c (B, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // coefficients, or empty
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_h (H, G*H)
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask (N, T, B') or empty
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // resets (N, T, B') or empty
                                  .Ret<ffi::Buffer<ffi::F32>>()   // ct_u (N, T, B', G*H)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // ct_v (N, T, B', 3H) or empty
                                  .Ret<ffi::Buffer<ffi::F32>>()   // ct_h0 (B, H)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // ct_c0 (B, H)
                                  .Attr<int32_t>("kind")
                                  .Attr<bool>("reverse")
                                  .Attr<int32_t>("threads")
                                  .Attr<bool>("duplicate")
                                  .Attr<int32_t>("groups")
                                  .Attr<bool>("small_groups")  // groups of 4 rows a thread
                                  .Attr<bool>("huge_pages")
                                  .Attr<bool>("bf16")  // W_h is bfloat16 (AMX)
                                  .Attr<int32_t>("panel_rows"));  // tests: `panel_rows`

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxrnnRnnGradients, Gradients,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // xs (E, R, I)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // h_in (E, R, H)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_x (E or 1, I, G*H)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // ct_x (E, R, G*H)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // ct_h (E, R, G*H) or empty
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dx (E, R, I) or empty
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dW_x (E, I, G*H)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dW_h (E, H, G*H)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // db_x (E, G*H): Σ ct_x
                                  .Ret<ffi::Buffer<ffi::F32>>()   // db_h (E, G*H) or empty
                                  .Attr<int32_t>("threads")
                                  .Attr<bool>("f32")       // float32 products, not bf16 parts
                                  .Attr<bool>("rounded"));  // f32: of operands rounded to bf16

// Whether AMX tiles run here (compiled with AMX, and the OS grants the tiles' state), as the
// gradient kernel and the backward kernel's bf16 products need to be worth it: 1 or 0. Called
// from Python through ctypes, as is the next one.
extern "C" int jaxrnn_amx_available() { return amx_ready() ? 1 : 0; }

// Whether the forward and backward kernels' bf16 matmuls can run here (`bf16_ready`: AMX
// tiles, or AVX512-BF16): 1 or 0.
extern "C" int jaxrnn_bf16_available() { return bf16_ready() ? 1 : 0; }

// The lanes of this build's vectors where they are one register, else 0: 16 built with
// AVX-512 (F and BW), 8 with AVX2 and FMA (`Lanes`). Built without either (x86-64's SSE2, or
// ARM), 0: there `native.available` keeps XLA's loop, as GCC splits the vectors through the
// stack. Measured on a 2-core Intel Xeon built for x86-64-v3 with the elementwise code still
// in 16 lanes: every cell 13-28 times slower than XLA's loop (Elman B16 T256 H128 forward 71
// against 3.2 ms; LSTM B64 T128 H512 5551 against 227).
extern "C" int jaxrnn_vector_lanes() {
#if defined(JAXRNN_AVX512)
  return 16;
#elif defined(__AVX2__) && defined(__FMA__)
  return 8;
#else
  return 0;
#endif
}
