// Device helpers shared by cuqk kernel families.
//
// The kernels include no CUDA header: 16-bit conversions are single PTX instructions and
// vector accesses use the structs below. NVRTC then needs no toolkit include path (a pip-only
// CUDA install works) and a variant compiles in a fraction of the time cuda_fp16.h costs.
// Requires compute capability 8.0 (cvt.rn.bf16.f32).
#pragma once

typedef unsigned short cuqk_u16;
typedef unsigned int cuqk_u32;

/// \brief Storage tags for 16-bit element types; only their size and conversions matter.
struct bf16_t { cuqk_u16 bits; };
struct f16_t { cuqk_u16 bits; };

/// \brief Runtime dtype codes, shared with cuqk/_jit.py (DTYPE_CODES).
enum DtypeCode { DTYPE_F32 = 0, DTYPE_F16 = 1, DTYPE_BF16 = 2 };

struct alignas(16) U32x4 { cuqk_u32 x, y, z, w; };
struct alignas(8) U32x2 { cuqk_u32 x, y; };

__device__ __forceinline__ float u16_to_float(cuqk_u16 h, bf16_t) {
  return __uint_as_float(static_cast<cuqk_u32>(h) << 16);
}
__device__ __forceinline__ float u16_to_float(cuqk_u16 h, f16_t) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
__device__ __forceinline__ cuqk_u16 float_to_u16(float f, bf16_t) {
  cuqk_u16 h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
__device__ __forceinline__ cuqk_u16 float_to_u16(float f, f16_t) {
  cuqk_u16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

/// \brief Loads N consecutive 32-bit words in accesses of WORDS words (1, 2 or 4, dividing N);
/// the pointer must be aligned to the access width.
template <int N, int WORDS>
__device__ __forceinline__ void load_words_by(const void* ptr, cuqk_u32 (&w)[N]) {
  if constexpr (WORDS == 4) {
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      const U32x4 v = reinterpret_cast<const U32x4*>(ptr)[i];
      w[4 * i] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
    }
  } else if constexpr (WORDS == 2) {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      const U32x2 v = reinterpret_cast<const U32x2*>(ptr)[i];
      w[2 * i] = v.x; w[2 * i + 1] = v.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) w[i] = reinterpret_cast<const cuqk_u32*>(ptr)[i];
  }
}

/// \brief Stores N consecutive 32-bit words in accesses of WORDS words (as load_words_by).
/// \tparam STREAMING mark the written lines evict-first in the caches (st.global.cs): for
/// output nothing in the kernel reads again
template <int N, int WORDS, bool STREAMING = false>
__device__ __forceinline__ void store_words_by(void* ptr, const cuqk_u32 (&w)[N]) {
  if constexpr (STREAMING) {
#pragma unroll
    for (int i = 0; i < N / WORDS; ++i) {
      if constexpr (WORDS == 4) {
        asm volatile("st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};"
                     :
                     : "l"(reinterpret_cast<U32x4*>(ptr) + i), "r"(w[4 * i]), "r"(w[4 * i + 1]),
                       "r"(w[4 * i + 2]), "r"(w[4 * i + 3])
                     : "memory");
      } else if constexpr (WORDS == 2) {
        asm volatile("st.global.cs.v2.u32 [%0], {%1, %2};"
                     :
                     : "l"(reinterpret_cast<U32x2*>(ptr) + i), "r"(w[2 * i]), "r"(w[2 * i + 1])
                     : "memory");
      } else {
        asm volatile("st.global.cs.u32 [%0], %1;"
                     :
                     : "l"(reinterpret_cast<cuqk_u32*>(ptr) + i), "r"(w[i])
                     : "memory");
      }
    }
  } else if constexpr (WORDS == 4) {
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      reinterpret_cast<U32x4*>(ptr)[i] = U32x4{w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]};
    }
  } else if constexpr (WORDS == 2) {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      reinterpret_cast<U32x2*>(ptr)[i] = U32x2{w[2 * i], w[2 * i + 1]};
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) reinterpret_cast<cuqk_u32*>(ptr)[i] = w[i];
  }
}

/// \brief The widest access (in words) that N words allow.
template <int N>
__device__ constexpr int widest_words() {
  return N % 4 == 0 ? 4 : (N % 2 == 0 ? 2 : 1);
}

/// \brief Loads N consecutive 32-bit words.
/// \tparam ALIGNED the pointer is aligned to the widest access N allows (checked on the host);
/// otherwise it is only 2-byte aligned, and the access width follows the address at run time:
/// a pointer 2 bytes past a word boundary reads a 16-bit half, N - 1 words and a 16-bit half.
/// Never a byte outside the N words: the reads stay inside the array.
template <int N, bool ALIGNED = true>
__device__ __forceinline__ void load_words(const void* ptr, cuqk_u32 (&w)[N]) {
  const unsigned addr = static_cast<unsigned>(reinterpret_cast<unsigned long long>(ptr));
  if (ALIGNED || (widest_words<N>() == 4 && (addr & 15u) == 0)) {
    load_words_by<N, widest_words<N>()>(ptr, w);
  } else if (widest_words<N>() >= 2 && (addr & 7u) == 0) {
    load_words_by<N, (widest_words<N>() >= 2 ? 2 : 1)>(ptr, w);
  } else if ((addr & 3u) == 0) {
    load_words_by<N, 1>(ptr, w);
  } else {
    const cuqk_u16* halves = static_cast<const cuqk_u16*>(ptr);
    const cuqk_u32* words = reinterpret_cast<const cuqk_u32*>(halves + 1);
    cuqk_u32 low = halves[0];
#pragma unroll
    for (int i = 0; i < N - 1; ++i) {
      const cuqk_u32 word = words[i];
      w[i] = low | (word << 16);
      low = word >> 16;
    }
    w[N - 1] = low | (static_cast<cuqk_u32>(halves[2 * N - 1]) << 16);
  }
}

/// \brief Stores N consecutive 32-bit words; ALIGNED as in load_words, STREAMING as in
/// store_words_by. Never a byte outside the N words: neighbouring elements, which other
/// threads may be writing, are not touched.
template <int N, bool ALIGNED = true, bool STREAMING = false>
__device__ __forceinline__ void store_words(void* ptr, const cuqk_u32 (&w)[N]) {
  const unsigned addr = static_cast<unsigned>(reinterpret_cast<unsigned long long>(ptr));
  if (ALIGNED || (widest_words<N>() == 4 && (addr & 15u) == 0)) {
    store_words_by<N, widest_words<N>(), STREAMING>(ptr, w);
  } else if (widest_words<N>() >= 2 && (addr & 7u) == 0) {
    store_words_by<N, (widest_words<N>() >= 2 ? 2 : 1), STREAMING>(ptr, w);
  } else if ((addr & 3u) == 0) {
    store_words_by<N, 1, STREAMING>(ptr, w);
  } else {
    cuqk_u16* halves = static_cast<cuqk_u16*>(ptr);
    cuqk_u32* words = reinterpret_cast<cuqk_u32*>(halves + 1);
    halves[0] = static_cast<cuqk_u16>(w[0] & 0xffffu);
#pragma unroll
    for (int i = 0; i < N - 1; ++i) words[i] = (w[i] >> 16) | (w[i + 1] << 16);
    halves[2 * N - 1] = static_cast<cuqk_u16>(w[N - 1] >> 16);
  }
}

/// \brief Widens the 2 * N 16-bit elements packed in N words (low half first) to float32.
template <typename T, int N>
__device__ __forceinline__ void words_to_floats(const cuqk_u32 (&w)[N], float (&out)[2 * N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    out[2 * i] = u16_to_float(static_cast<cuqk_u16>(w[i] & 0xffffu), T{});
    out[2 * i + 1] = u16_to_float(static_cast<cuqk_u16>(w[i] >> 16), T{});
  }
}

/// \brief Rounds 2 * N float32 values to the 16-bit type T once and packs them in N words.
template <typename T, int N>
__device__ __forceinline__ void floats_to_words(const float (&in)[2 * N], cuqk_u32 (&w)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    w[i] = static_cast<cuqk_u32>(float_to_u16(in[2 * i], T{})) |
           (static_cast<cuqk_u32>(float_to_u16(in[2 * i + 1], T{})) << 16);
  }
}

/// \brief Loads N consecutive elements of storage type T and widens them to float32.
/// \tparam T float, bf16_t or f16_t.
/// \tparam ALIGNED the pointer is aligned to N * sizeof(T) bytes (at most 16); otherwise only
/// to the element (see load_words).
template <typename T, int N, bool ALIGNED = true>
__device__ __forceinline__ void load_as_float(const T* ptr, float (&out)[N]) {
  if constexpr (sizeof(T) == 4) {
    cuqk_u32 w[N];
    load_words<N, ALIGNED>(ptr, w);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = __uint_as_float(w[i]);
  } else if constexpr (N % 2 == 0) {
    cuqk_u32 w[N / 2];
    load_words<N / 2, ALIGNED>(ptr, w);
    words_to_floats<T>(w, out);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      out[i] = u16_to_float(reinterpret_cast<const cuqk_u16*>(ptr)[i], T{});
    }
  }
}

/// \brief Rounds N float32 values to storage type T once and stores them (ALIGNED as in
/// load_as_float, STREAMING as in store_words_by).
template <typename T, int N, bool ALIGNED = true, bool STREAMING = false>
__device__ __forceinline__ void store_from_float(T* ptr, const float (&in)[N]) {
  if constexpr (sizeof(T) == 4) {
    cuqk_u32 w[N];
#pragma unroll
    for (int i = 0; i < N; ++i) w[i] = __float_as_uint(in[i]);
    store_words<N, ALIGNED, STREAMING>(ptr, w);
  } else if constexpr (N % 2 == 0) {
    cuqk_u32 w[N / 2];
    floats_to_words<T>(in, w);
    store_words<N / 2, ALIGNED, STREAMING>(ptr, w);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) reinterpret_cast<cuqk_u16*>(ptr)[i] = float_to_u16(in[i], T{});
  }
}

/// \brief Loads the bytes [from, to) of the 16-byte aligned chunk at `chunk` into the words
/// of w that hold them (the other bytes read as 0): from and to are even, and one of them is 0
/// or 16, so each word is whole, a 16-bit half or outside. Never a byte outside the range: the
/// edge chunks of a head that starts mid-chunk hold a neighbour's bytes.
__device__ __forceinline__ void load_chunk_part(const void* chunk, int from, int to,
                                                cuqk_u32 (&w)[4]) {
  const cuqk_u32* words = static_cast<const cuqk_u32*>(chunk);
  const cuqk_u16* halves = static_cast<const cuqk_u16*>(chunk);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int lo = 4 * i, hi = 4 * i + 4;
    w[i] = 0u;
    if (lo >= from && hi <= to) {
      w[i] = words[i];
    } else if (lo + 2 == from && hi <= to) {
      w[i] = static_cast<cuqk_u32>(halves[2 * i + 1]) << 16;
    } else if (lo >= from && lo + 2 == to) {
      w[i] = halves[2 * i];
    }
  }
}

/// \brief Stores the 16-byte aligned chunk at `chunk` in one access. In PTX because NVVM wrote
/// the struct store of store_words_by as four word stores next to the partial stores'
/// branches.
__device__ __forceinline__ void store_chunk(void* chunk, const cuqk_u32 (&w)[4]) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};"
               :
               : "l"(chunk), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
               : "memory");
}

/// \brief Stores the 16-bit elements [EDGE, 8) of w to the 16-byte aligned chunk at `chunk`
/// (0 < EDGE < 8); the chunk's other bytes, which other threads may be writing, are not
/// touched. The edge is a template parameter, so each edge's accesses have fixed offsets and
/// words (store_chunk_edges picks the instance).
template <int EDGE>
__device__ __forceinline__ void store_chunk_from(void* chunk, const cuqk_u32 (&w)[4]) {
  static_assert(0 < EDGE && EDGE < 8, "a partial chunk");
  char* at = static_cast<char*>(chunk);
  // Word j holds elements 2j and 2j + 1: whole words from first on, and the upper half of the
  // word before it where the edge is odd.
  constexpr int first = (EDGE + 1) >> 1;
  if constexpr (first == 1) *reinterpret_cast<cuqk_u32*>(at + 4) = w[1];
  if constexpr (first <= 2) *reinterpret_cast<U32x2*>(at + 8) = U32x2{w[2], w[3]};
  if constexpr (first == 3) *reinterpret_cast<cuqk_u32*>(at + 12) = w[3];
  if constexpr (EDGE & 1) {
    *reinterpret_cast<cuqk_u16*>(at + 2 * EDGE) = static_cast<cuqk_u16>(w[EDGE >> 1] >> 16);
  }
}

/// \brief Stores the 16-bit elements [0, EDGE) of w to the 16-byte aligned chunk at `chunk`
/// (0 < EDGE < 8), as store_chunk_from does the others.
template <int EDGE>
__device__ __forceinline__ void store_chunk_below(void* chunk, const cuqk_u32 (&w)[4]) {
  static_assert(0 < EDGE && EDGE < 8, "a partial chunk");
  char* at = static_cast<char*>(chunk);
  // Whole words below whole, and the lower half of word whole where the edge is odd.
  constexpr int whole = EDGE >> 1;
  if constexpr (whole >= 2) *reinterpret_cast<U32x2*>(at) = U32x2{w[0], w[1]};
  if constexpr (whole == 1) *reinterpret_cast<cuqk_u32*>(at) = w[0];
  if constexpr (whole == 3) *reinterpret_cast<cuqk_u32*>(at + 8) = w[2];
  if constexpr (EDGE & 1) {
    *reinterpret_cast<cuqk_u16*>(at + 4 * whole) = static_cast<cuqk_u16>(w[whole] & 0xffffu);
  }
}

/// \brief Stores the elements [edge, 8) of `first` to the chunk at `first_at` and [0, edge)
/// of `tail` to the chunk at `tail_at` (0 < edge < 8): one branch on the edge, then that
/// edge's two to five fixed accesses (store_chunk_from, store_chunk_below). With the edge read
/// at run time each chunk took four predicated accesses and the predicates and word selects
/// before them, about 40 instructions a warp where these take 10-15; the unaligned Qwen3-8B
/// shape measured 1-4% faster this way at T >= 8192 (H200).
__device__ __forceinline__ void store_chunk_edges(void* first_at, void* tail_at, int edge,
                                                  const cuqk_u32 (&first)[4],
                                                  const cuqk_u32 (&tail)[4]) {
  switch (edge) {
#define CUQK_EDGE_CASE(E)                 \
  case E:                                 \
    store_chunk_from<E>(first_at, first); \
    store_chunk_below<E>(tail_at, tail);  \
    break;
    CUQK_EDGE_CASE(1)
    CUQK_EDGE_CASE(2)
    CUQK_EDGE_CASE(3)
    CUQK_EDGE_CASE(4)
    CUQK_EDGE_CASE(5)
    CUQK_EDGE_CASE(6)
    CUQK_EDGE_CASE(7)
#undef CUQK_EDGE_CASE
  }
}

/// \brief Copies N elements of storage type T bit for bit (NaN payloads included; ALIGNED as
/// in load_as_float).
template <typename T, int N, bool ALIGNED = true>
__device__ __forceinline__ void copy_elements(const T* src, T* dst) {
  if constexpr ((N * sizeof(T)) % 4 == 0) {
    cuqk_u32 w[N * sizeof(T) / 4];
    load_words<N * sizeof(T) / 4, ALIGNED>(src, w);
    store_words<N * sizeof(T) / 4, ALIGNED>(dst, w);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      reinterpret_cast<cuqk_u16*>(dst)[i] = reinterpret_cast<const cuqk_u16*>(src)[i];
    }
  }
}

/// \brief Like load_as_float, with the element type chosen at run time (a DtypeCode).
/// Used for small side inputs (weights, cos/sin rows) whose dtype is independent of the
/// activations, so it costs a uniform branch rather than a template instance per combination.
template <int N>
__device__ __forceinline__ void load_as_float_dyn(const void* ptr, long long elem_offset,
                                                  int dtype, float (&out)[N]) {
  if (dtype == DTYPE_F32) {
    load_as_float<float, N>(static_cast<const float*>(ptr) + elem_offset, out);
  } else if (dtype == DTYPE_BF16) {
    load_as_float<bf16_t, N>(static_cast<const bf16_t*>(ptr) + elem_offset, out);
  } else {
    load_as_float<f16_t, N>(static_cast<const f16_t*>(ptr) + elem_offset, out);
  }
}

/// \brief The smallest k with 2^k >= n (n >= 1), at compile time.
__host__ __device__ constexpr int ceil_log2(int n) {
  return n <= 1 ? 0 : 1 + ceil_log2((n + 1) / 2);
}

/// \brief ptr, as a value the compiler cannot see through: it stays one register pair, and
/// indices added to it are not folded into the arithmetic that produced it.
template <typename T>
__device__ __forceinline__ T* opaque_pointer(T* ptr) {
  asm("mov.b64 %0, %0;" : "+l"(ptr));
  return ptr;
}

/// \brief A float32 load, as ld.global, through a pointer that went through opaque_pointer:
/// the compiler no longer sees its address space there, and plain loads compile to generic ones.
/// Volatile, because the asm names no memory: it must stay after wait_for_prior_grids, whose
/// prior grid may have written what it reads (the kernels' PTX is the same either way).
__device__ __forceinline__ float load_global_f32(const float* ptr) {
  float value;
  asm volatile("ld.global.f32 %0, [%1];" : "=f"(value) : "l"(ptr));
  return value;
}

/// \brief Asks the L2 for the line holding ptr; nothing waits for it and no register holds it.
__device__ __forceinline__ void prefetch_l2(const void* ptr) {
  asm volatile("prefetch.global.L2 [%0];" : : "l"(ptr));
}

/// \brief Programmatic dependent launch (compute capability 9.0+; nothing on older targets).
/// A grid launched with programmatic stream serialization may start while the kernel before it
/// in the stream still runs, so it waits here, before its first global access, until that
/// kernel has finished and its writes are visible; then it lets the next such grid start its
/// launch. The launch and block start-up of consecutive kernels then overlap the previous one.
__device__ __forceinline__ void wait_for_prior_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" : : : "memory");
  asm volatile("griddepcontrol.launch_dependents;" : : : "memory");
#endif
}

/// \brief Sum over aligned groups of GROUP lanes (a power of two, at most 32).
/// Every lane of the warp must call it: shuffles inside a divergent branch are undefined.
__device__ __forceinline__ float group_sum(float v, int group) {
  for (int offset = group >> 1; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}
