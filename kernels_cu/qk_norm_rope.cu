// Fused per-head RMSNorm + rotary embedding for the query and key heads of attention.
//
// Data layout. A "head" is head_dim contiguous elements. Head h of token t lives at
//   q_in + outer * q_in_strides.outer + inner * q_in_strides.inner + h * q_in_strides.head
// (element strides; token t = outer * tokens_inner + inner), likewise k_in, q_out, k_out. In
// place, *_out equal *_in; packed qkv is q | k | v per row, and v is never touched.
//
// Work split. LANES (a power of two <= 32, at run time) consecutive threads own one head. The
// head is cut into units of 2 * VEC elements, each held by one lane as two VEC-element vectors
// a and b chosen so that every rotation pair lies inside one unit:
//   NeoX rotary unit k:  a = [k*VEC, +VEC), b = [rot/2 + k*VEC, +VEC); pairs (a[i], b[i])
//   GPT-J rotary unit k: a, b = [2k*VEC, +2VEC) contiguous;            pairs (e[2i], e[2i+1])
//   unit past rotary_dim: contiguous, normalised only.
// In both rotary layouts pair i of unit k uses frequency k*VEC + i. Lane l owns units
// l, l + LANES, ... (MAX_UNITS at most), so loads are coalesced across the lanes of a head
// and no data is exchanged between lanes except the sum of squares.
//
// Unaligned heads in whole chunks (CHUNKS: 16-bit data, NeoX, rotary_dim = head_dim). A head
// that starts `shift` elements into an aligned 16-byte chunk is read and written as the
// aligned chunks it overlaps, one 16-byte access per vector, where moving the vector itself
// takes up to five narrow ones. Unit k holds the chunks at k*VEC and rot/2 + k*VEC from the
// chunk base; slot i of both holds a rotation pair of frequency k*VEC + i - shift, except in
// unit 0, whose slots i < shift pair the chunk at rot/2 with the tail chunk past the head
// (frequency rot/2 + i - shift). The cos/sin of each slot are gathered at those indices, in
// vectors where the shift keeps runs of slots on aligned frequencies (gather_chunk_cos_sin);
// its weights come from a per-block table of every slot under every shift (up to head_dim
// 256, fill_chunk_weights). Only unit 0's first and tail chunks, which hold a neighbour's
// bytes, are stored in pieces; the packed instances read them whole (load_chunk_unit).
//
// Gated attention. With gate_out set, each q head of q_in is followed by a gate head of the same
// size (q_in's head stride is 2 * head_dim); the gates are extra work items after the k heads,
// copied bit for bit to gate_out, which has q_out's strides.
//
// Multimodal RoPE (IS_MROPE). Each token has three positions (temporal, height, width), one per
// row of positions (pos_stride_section apart); frequency j reads the cache row of position
// mrope_section_of(j). Every head of a token needs the same merged row, so a block gathers the
// merged rows of the tokens of a window of its heads into shared memory (those of the next
// window while it works on the current one); the per-head work then reads them like the 1-D
// path reads its one cache row.
#include "common.cuh"

/// \brief Threads per block: the launch's block size (BLOCK_THREADS in cuqk/_jit.py).
constexpr int BLOCK_THREADS = 256;

/// \brief Floats of one buffer of merged mRoPE rows (MROPE_ROW_FLOATS in cuqk/_jit.py). The
/// host's mrope_rounds is the most rounds whose window's tokens fit (one round always does).
constexpr int MROPE_ROW_FLOATS = 5120;

/// \brief Element strides of one tensor of heads (see the layout above).
struct HeadStrides {
  long long outer, inner, head;
};

/// \brief Kernel arguments, passed by value as one struct. Every field is 8 bytes, or one of
/// two floats that share 8, so the host packs it with a flat format and no padding rules
/// apply; the order is mirrored by POINTER_FIELDS and STATIC_FIELDS in cuqk/_jit.py (a CPU
/// test compares them). Pointers come first so a launch rewrites only the leading bytes of a
/// plan's packed struct; then what every instance reads before a head's first store, so that
/// a small call's first constant loads miss in few cache lines; the fields of other layouts
/// and of mRoPE last. A null positions pointer means token t reads cache row t. inv_head_dim
/// comes from the host because a float division is a dozen instructions and a slow-path
/// check on the chain between a head's reduction and its first store.
struct QkNormRopeParams {
  long long q_in, k_in, q_out, k_out, gate_out, positions, cache, q_weight, k_weight;
  long long num_tokens, num_q_heads, num_k_heads, head_div_magic, head_div_shift;
  long long head_dim, rotary_dim, norm_mode, lanes_log2, rope_first, prefetch_next;
  float eps, inv_head_dim;
  long long pos_stride_outer, pos_is_int64, cache_row_stride, max_position;
  HeadStrides q_in_strides, k_in_strides, q_out_strides, k_out_strides;
  long long pos_stride_inner, pos_stride_section, cache_dtype, weight_dtype, tokens_inner;
  long long mrope_section0, mrope_section1, mrope_section2, mrope_interleaved, mrope_rounds;
};

enum NormMode { NORM_NONE = 0, NORM_RMS = 1, NORM_GEMMA = 2 };

/// \brief n / num_heads for n < 2^31, from the host's magic = ceil(2^shift / num_heads) with
/// shift = 31 + ceil(log2(num_heads)) (cuqk/_jit.py fast_division): a wide multiply instead of
/// a division's twenty-odd dependent instructions at the head of every thread's work, which
/// is most of a small call's latency.
__device__ __forceinline__ unsigned head_token(unsigned n, const QkNormRopeParams& p) {
  return static_cast<unsigned>(
      (static_cast<unsigned long long>(n) * static_cast<unsigned>(p.head_div_magic)) >>
      static_cast<int>(p.head_div_shift));
}

/// \brief The leading indices (outer, inner) of token t (see the layout above).
__device__ __forceinline__ void split_token(unsigned token, const QkNormRopeParams& p,
                                            long long& outer, long long& inner) {
  outer = token;
  inner = 0;
  if (p.tokens_inner != 1) {
    outer = token / static_cast<unsigned>(p.tokens_inner);
    inner = token - outer * p.tokens_inner;
  }
}

/// \brief Head `head` (q heads first, then k heads) of token `token` in an in-place packed qkv
/// whose tokens are one row stride apart (the PACKED instances).
template <typename T_IN>
__device__ __forceinline__ T_IN* packed_head(const QkNormRopeParams& p, long long token,
                                             unsigned head, int head_dim) {
  return reinterpret_cast<T_IN*>(p.q_in) +
         (token * p.q_in_strides.outer + static_cast<long long>(head) * head_dim);
}

/// \brief Element offsets of unit k's two vectors inside its head.
template <bool IS_NEOX, int VEC>
__device__ __forceinline__ void unit_offsets(int k, int n_rot_units, int rotary_dim, int& off_a,
                                             int& off_b) {
  if (k < n_rot_units) {
    if (IS_NEOX) {
      off_a = k * VEC;
      off_b = rotary_dim / 2 + k * VEC;
    } else {
      off_a = 2 * k * VEC;
      off_b = off_a + VEC;
    }
  } else {
    off_a = rotary_dim + 2 * (k - n_rot_units) * VEC;
    off_b = off_a + VEC;
  }
}

/// \brief Asks the L2 for this lane's units of the head at `head` (see the layout above).
template <bool IS_NEOX, int VEC, int MAX_UNITS, typename T_IN>
__device__ __forceinline__ void prefetch_head(const T_IN* head, int lane, int lanes, int n_units,
                                              int n_rot_units, int rotary_dim) {
#pragma unroll
  for (int u = 0; u < MAX_UNITS; ++u) {
    const int k = lane + u * lanes;
    if (k >= n_units) continue;
    int off_a, off_b;
    unit_offsets<IS_NEOX, VEC>(k, n_rot_units, rotary_dim, off_a, off_b);
    prefetch_l2(head + off_a);
    prefetch_l2(head + off_b);
  }
}

/// \brief The position row (0 temporal, 1 height, 2 width) that frequency j reads.
__device__ __forceinline__ int mrope_section_of(int j, const QkNormRopeParams& p) {
  if (p.mrope_interleaved) {
    if (j % 3 == 1 && j < 3 * p.mrope_section1) return 1;
    if (j % 3 == 2 && j < 3 * p.mrope_section2) return 2;
    return 0;
  }
  return j < p.mrope_section0 ? 0 : (j < p.mrope_section0 + p.mrope_section1 ? 1 : 2);
}

/// \brief The frequency of slot i of unit k in the CHUNKS layout (see above), from
/// k * VEC + i; half is rotary_dim / 2.
__device__ __forceinline__ int chunk_freq(int k_vec_i, int shift, int half) {
  // As unsigned, a negative f is past f + half, so the smaller of the two is the wrapped
  // frequency: one add-and-min where a compare and an add took two more.
  const unsigned f = static_cast<unsigned>(k_vec_i - shift);
  return static_cast<int>(min(f, f + static_cast<unsigned>(half)));
}

/// \brief The side inputs of CHUNKS slots [first, first + N): a[i] is element f of the run at
/// element `at` of `base` and b[i] element f + half, for f = chunk_freq(first + i, shift, half)
/// (cos and sin of a cache row, or the two weights of a pair). One load per element.
template <typename T, int N>
__device__ __forceinline__ void gather_chunk_slots(const T* base, long long at, int first,
                                                   int shift, int half, float (&a)[N],
                                                   float (&b)[N]) {
  // The run's address once, then 32-bit indices. Through an opaque move: NVVM folds the
  // row's 64-bit index back into every slot's address, a wide multiply-add each.
  const T* run = opaque_pointer(base + at);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const T* at_f = run + chunk_freq(first + i, shift, half);
    if constexpr (sizeof(T) == 4) {
      a[i] = load_global_f32(at_f);
      b[i] = load_global_f32(at_f + half);
    } else {
      float ai[1], bi[1];
      load_as_float<T, 1>(at_f, ai);
      load_as_float<T, 1>(at_f + half, bi);
      a[i] = ai[0];
      b[i] = bi[0];
    }
  }
}

/// \brief gather_chunk_slots of a run whose dtype is a DtypeCode read at run time.
template <int N>
__device__ __forceinline__ void gather_chunk_slots(const void* base, long long at, int first,
                                                   int shift, int half, int dtype, float (&a)[N],
                                                   float (&b)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const long long f = at + chunk_freq(first + i, shift, half);
    float ai[1], bi[1];
    load_as_float_dyn<1>(base, f, dtype, ai);
    load_as_float_dyn<1>(base, f + half, dtype, bi);
    a[i] = ai[0];
    b[i] = bi[0];
  }
}

/// \brief cos and sin of CHUNKS slots [first, first + N) from a float32 cache row's `run`, in
/// vectors of WORDS: only where the shift keeps each run of WORDS slots on consecutive
/// frequencies from a multiple of WORDS, which wrap together (gather_chunk_cos_sin).
template <int WORDS, int N>
__device__ __forceinline__ void load_chunk_cos_sin_runs(const float* run, int first, int shift,
                                                        int half, float (&c)[N], float (&s)[N]) {
#pragma unroll
  for (int g = 0; g < N; g += WORDS) {
    const float* at = run + chunk_freq(first + g, shift, half);
    cuqk_u32 wc[WORDS], ws[WORDS];
    load_words_by<WORDS, WORDS>(at, wc);
    load_words_by<WORDS, WORDS>(at + half, ws);
#pragma unroll
    for (int i = 0; i < WORDS; ++i) {
      c[g + i] = __uint_as_float(wc[i]);
      s[g + i] = __uint_as_float(ws[i]);
    }
  }
}

/// \brief cos and sin of CHUNKS slots [first, first + N) of float32 cache row `row` (first a
/// multiple of N), as gather_chunk_slots gives them, in the widest accesses the shift allows:
/// a shift that is a multiple of 4 (of 2) takes 4 (8) vector loads where the gather takes 16.
/// The branch is uniform wherever a warp's heads share a token.
template <int N>
__device__ __forceinline__ void gather_chunk_cos_sin(const float* row, int first, int shift,
                                                     int half, float (&c)[N], float (&s)[N]) {
  const float* run = opaque_pointer(row);
  if ((shift & 3) == 0) {
    load_chunk_cos_sin_runs<4>(run, first, shift, half, c, s);
  } else if ((shift & 1) == 0) {
    load_chunk_cos_sin_runs<2>(run, first, shift, half, c, s);
  } else {
    gather_chunk_slots(row, 0, first, shift, half, c, s);
  }
}

/// \brief Units per head that the CHUNKS weight table holds (chunks_fit in cuqk/_jit.py
/// allows head_dim up to 16 times this).
constexpr int CHUNK_TABLE_UNITS = 16;

/// \brief Fills a block's CHUNKS weight table: the weights of every slot under every shift,
/// so that a unit reads its 16 weights in four 16-byte shared-memory loads instead of
/// gathering them one by one. Table (tensor t, 0 for q and 1 for k; shift s) is 16 * n_units
/// floats at (t * VEC + s) * 16 * n_units, in four quarters of n_units * 4 floats: the first
/// weights (wa) of slots 0-3, of slots 4-7, then the second (wb) alike; unit k's four floats
/// of a quarter at k * 4, so that the lanes of a head read consecutive words. Under Gemma's
/// norm an entry holds 1 + w. A null weight's tables stay unwritten and unread.
template <typename T_IN, int VEC, bool PACKED>
__device__ __forceinline__ void fill_chunk_weights(const QkNormRopeParams& p, int n_units,
                                                   int half, float* table) {
  static_assert(2 * VEC * CHUNK_TABLE_UNITS <= BLOCK_THREADS, "one table entry per thread");
  const int entry = static_cast<int>(threadIdx.x);
  if (entry >= 2 * VEC * n_units) return;
  const int table_index = entry / n_units;
  const int k = entry - table_index * n_units;
  const long long weight = table_index < VEC ? p.q_weight : p.k_weight;
  if (weight == 0) return;
  float wa[VEC], wb[VEC];
  if constexpr (PACKED) {
    gather_chunk_slots(reinterpret_cast<const T_IN*>(weight), 0, k * VEC, table_index % VEC,
                       half, wa, wb);
  } else {
    gather_chunk_slots(reinterpret_cast<const void*>(weight), 0, k * VEC, table_index % VEC,
                       half, static_cast<int>(p.weight_dtype), wa, wb);
  }
  const float shift = p.norm_mode == NORM_GEMMA ? 1.f : 0.f;
  float* at = table + table_index * 16 * n_units + k * 4;
#pragma unroll
  for (int quarter = 0; quarter < 4; ++quarter) {
    const float(&from)[VEC] = quarter < 2 ? wa : wb;
    const int first = (quarter % 2) * 4;
    store_from_float<float, 4>(at + quarter * 4 * n_units,
                               {from[first] + shift, from[first + 1] + shift,
                                from[first + 2] + shift, from[first + 3] + shift});
  }
}

/// \brief The weights of unit k's slots from a CHUNKS weight table (fill_chunk_weights).
template <int VEC>
__device__ __forceinline__ void load_chunk_weights(const float* table, bool is_q, int shift,
                                                   int k, int n_units, float (&wa)[VEC],
                                                   float (&wb)[VEC]) {
  static_assert(VEC == 8, "a unit's slots fill two quarters of a table");
  const float* at = table + ((is_q ? 0 : VEC) + shift) * 16 * n_units + k * 4;
  float q[4][4];
#pragma unroll
  for (int quarter = 0; quarter < 4; ++quarter) {
    load_as_float<float, 4>(at + quarter * 4 * n_units, q[quarter]);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    wa[i] = q[0][i];
    wa[4 + i] = q[1][i];
    wb[i] = q[2][i];
    wb[4 + i] = q[3][i];
  }
}

/// \brief Whether position pos has a row in the cache. Positions outside [0, max_position)
/// read row 0 (never out of bounds), and norm_rope_heads makes their rotated pairs NaN: loud.
__device__ __forceinline__ bool position_in_cache(const QkNormRopeParams& p, long long pos) {
  return pos >= 0 && pos < p.max_position;
}

/// \brief cos and sin of frequencies [freq, freq + VEC) for a token at position pos (row 0
/// where position_in_cache is false). half is rotary_dim / 2, the distance from a cos to its
/// sin.
/// \tparam CACHE_F32 the cache is float32 (else its dtype is read at run time)
/// \tparam CHUNKS    frequency freq + i is slot i of the CHUNKS layout, whose frequency is
///                   chunk_freq(freq + i, chunk_shift, half) (gather_chunk_slots)
/// \tparam WIDE_CHUNKS (CHUNKS with CACHE_F32) in vectors where the shift allows
///                   (gather_chunk_cos_sin)
template <int VEC, bool CACHE_F32, bool CHUNKS = false, bool WIDE_CHUNKS = false>
__device__ __forceinline__ void load_cos_sin(const QkNormRopeParams& p, long long pos, int freq,
                                             int half, float (&c)[VEC], float (&s)[VEC],
                                             int chunk_shift = 0) {
  const long long at = (position_in_cache(p, pos) ? pos : 0) * p.cache_row_stride + freq;
  if constexpr (CHUNKS && CACHE_F32 && WIDE_CHUNKS) {
    gather_chunk_cos_sin(reinterpret_cast<const float*>(p.cache) + (at - freq), freq,
                         chunk_shift, half, c, s);
  } else if constexpr (CHUNKS && CACHE_F32) {
    gather_chunk_slots(reinterpret_cast<const float*>(p.cache), at - freq, freq, chunk_shift,
                       half, c, s);
  } else if constexpr (CHUNKS) {
    gather_chunk_slots(reinterpret_cast<const void*>(p.cache), at - freq, freq, chunk_shift, half,
                       static_cast<int>(p.cache_dtype), c, s);
  } else if constexpr (CACHE_F32) {
    const float* cache = reinterpret_cast<const float*>(p.cache) + at;
    load_as_float<float, VEC>(cache, c);
    load_as_float<float, VEC>(cache + half, s);
  } else {
    const void* cache = reinterpret_cast<const void*>(p.cache);
    const int cache_dtype = static_cast<int>(p.cache_dtype);
    load_as_float_dyn<VEC>(cache, at, cache_dtype, c);
    load_as_float_dyn<VEC>(cache, at + half, cache_dtype, s);
  }
}

/// \brief The merged mRoPE rows a block needs for a window of heads (mrope_window): those of
/// the tokens from first_token on, laid out as cache rows. Entry e = t << col_bits | col is
/// column col of token first_token + t; columns are padded to a power of two so that entries
/// need no division, and entries counts them, padding included.
struct MropeWindow {
  unsigned first_token, entries;
  int col_bits;
};

/// \brief The window of heads [first_item, first_item + count) (empty past the last head).
__device__ __forceinline__ MropeWindow mrope_window(const QkNormRopeParams& p, unsigned first_item,
                                                    unsigned count, unsigned total) {
  MropeWindow w{0u, 0u, 32 - __clz(static_cast<int>(p.rotary_dim) - 1)};
  if (first_item < total) {
    w.first_token = head_token(first_item, p);
    const unsigned last_token = head_token(min(first_item + count, total) - 1u, p);
    w.entries = (last_token - w.first_token + 1u) << w.col_bits;
  }
  return w;
}

/// \brief Whether entry e of window w is a real column (not padding) and, if so, its value:
/// column col of the cache row that col's frequency reads for its token; NaN where that
/// position is outside the cache.
__device__ __forceinline__ bool mrope_entry(const QkNormRopeParams& p, const MropeWindow& w,
                                            unsigned e, float& value) {
  const int rotary_dim = static_cast<int>(p.rotary_dim);
  const int col = static_cast<int>(e & ((1u << w.col_bits) - 1u));
  if (e >= w.entries || col >= rotary_dim) return false;
  const int half = rotary_dim / 2;
  long long outer, inner;
  split_token(w.first_token + (e >> w.col_bits), p, outer, inner);
  const long long off = outer * p.pos_stride_outer + inner * p.pos_stride_inner +
                        mrope_section_of(col < half ? col : col - half, p) * p.pos_stride_section;
  const long long pos = p.pos_is_int64 ? reinterpret_cast<const long long*>(p.positions)[off]
                                       : reinterpret_cast<const int*>(p.positions)[off];
  float v[1] = {__int_as_float(0x7fc00000)};
  if (pos >= 0 && pos < p.max_position) {
    load_as_float_dyn<1>(reinterpret_cast<const void*>(p.cache), pos * p.cache_row_stride + col,
                         static_cast<int>(p.cache_dtype), v);
  }
  value = v[0];
  return true;
}

/// \brief Where entry e of window w goes in the rows buffer (rows of rotary_dim floats).
__device__ __forceinline__ unsigned mrope_slot(const QkNormRopeParams& p, const MropeWindow& w,
                                               unsigned e) {
  return (e >> w.col_bits) * static_cast<unsigned>(p.rotary_dim) + (e & ((1u << w.col_bits) - 1u));
}

/// \brief Entries of window w from first_entry on, block-strided, written to rows.
__device__ __forceinline__ void gather_mrope_rows(const QkNormRopeParams& p, const MropeWindow& w,
                                                  unsigned first_entry, float* rows) {
  for (unsigned e = first_entry + threadIdx.x; e < w.entries; e += BLOCK_THREADS) {
    float value;
    if (mrope_entry(p, w, e, value)) rows[mrope_slot(p, w, e)] = value;
  }
}

/// \brief A unit's side inputs: weights for its two vectors, cos and sin of its frequencies.
template <int VEC>
struct SideInputs {
  float wa[VEC], wb[VEC], c[VEC], s[VEC];
};

/// \brief Whether an instance is a wide aligned packed 1-D one of 16-bit data (16-byte
/// vectors). Left alone they take 60 registers, 4 blocks of 256 threads per SM, which hold too
/// few bytes in flight for an H200's bandwidth; they are bounded to 5 blocks (48 registers)
/// and load their side inputs half a vector at a time, which leaves no spills (the same bound
/// with whole vectors spilled and ran slower than 4 blocks).
template <typename T_IN, int VEC, bool IS_MROPE, bool PACKED, bool ALIGNED>
__host__ __device__ constexpr bool five_blocks_per_sm() {
  return PACKED && ALIGNED && !IS_MROPE && sizeof(T_IN) == 2 && VEC * sizeof(T_IN) == 16;
}

/// \brief Rotates pairs [first, first + N) of one rotary unit in place (see the pair layout
/// above), from the cos and sin of their frequencies.
template <bool IS_NEOX, int VEC, int N>
__device__ __forceinline__ void rotate_pairs(float (&y)[2 * VEC], int first, const float (&c)[N],
                                             const float (&s)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const int f = first + i;
    const int ia = IS_NEOX ? f : 2 * f;
    const int ib = IS_NEOX ? VEC + f : 2 * f + 1;
    const float a = y[ia], b = y[ib];
    y[ia] = a * c[i] - b * s[i];
    y[ib] = b * c[i] + a * s[i];
  }
}

/// \brief Masks of the 16-bit elements at or past `edge` in each word of a chunk: word j is
/// all ones where 2j >= edge, its upper half where 2j + 1 = edge, else 0. One logic op a word
/// then merges two chunks at the edge, where a select per element took a compare and a
/// select each (and a conversion more for the third chunk).
__device__ __forceinline__ void chunk_edge_masks(int edge, cuqk_u32 (&m)[4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    // shl.b32 clamps shifts past 31 to 32, giving 0.
    const unsigned bits = static_cast<unsigned>(max(16 * edge - 32 * j, 0));
    asm("shl.b32 %0, %1, %2;" : "=r"(m[j]) : "r"(0xffffffffu), "r"(bits));
  }
}

/// \brief Unit k of a CHUNKS head whose chunks start at `base` (16-byte aligned, `shift`
/// elements before the head): x[i] and x[VEC + i] are the rotation pair of slot i.
/// With whole_edges the two edge chunks are read whole, a neighbour's bytes with them, which
/// the masks below drop: one load each instead of up to four narrow ones and their branches.
/// Only where those bytes lie inside the tensor's span (the caller checks): there they cannot
/// fault and are inside the allocation, and PTX's memory model, unlike C++'s, gives a weak
/// load that races with another warp's store some value, not undefined behaviour.
template <typename T_IN, int VEC>
__device__ __forceinline__ void load_chunk_unit(const T_IN* base, int k, int half, int shift,
                                                bool whole_edges, float (&x)[2 * VEC]) {
  static_assert(VEC == 8, "a unit is two chunks");
  const int edge = k == 0 ? shift : 0;
  cuqk_u32 a[4], b[4], c[4] = {}, m[4];
  if (edge && !whole_edges) {
    load_chunk_part(base + k * VEC, edge * 2, 16, a);
    load_chunk_part(base + 2 * half, 0, edge * 2, c);
  } else {
    load_words_by<4, 4>(base + k * VEC, a);
    if (edge) load_words_by<4, 4>(base + 2 * half, c);
  }
  load_words_by<4, 4>(base + half + k * VEC, b);
  chunk_edge_masks(edge, m);
  cuqk_u32 first[4], second[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    first[j] = (a[j] & m[j]) | (b[j] & ~m[j]);
    second[j] = (b[j] & m[j]) | (c[j] & ~m[j]);
  }
  float fa[VEC], fb[VEC];
  words_to_floats<T_IN>(first, fa);
  words_to_floats<T_IN>(second, fb);
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    x[i] = fa[i];
    x[VEC + i] = fb[i];
  }
}

/// \brief Stores unit k's pairs y (load_chunk_unit's layout) back to their chunks.
template <typename T_IN, int VEC>
__device__ __forceinline__ void store_chunk_unit(T_IN* base, int k, int half, int shift,
                                                 const float (&y)[2 * VEC]) {
  static_assert(VEC == 8, "a unit is two chunks");
  const int edge = k == 0 ? shift : 0;
  float fa[VEC], fb[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    fa[i] = y[i];
    fb[i] = y[VEC + i];
  }
  // a holds the first elements of the pairs and c the second: the first chunk takes a's
  // elements past the edge and the tail chunk c's before it, which the middle chunk b has
  // the other way round.
  cuqk_u32 a[4], b[4], c[4], m[4];
  floats_to_words<T_IN>(fa, a);
  floats_to_words<T_IN>(fb, c);
  chunk_edge_masks(edge, m);
#pragma unroll
  for (int j = 0; j < 4; ++j) b[j] = (c[j] & m[j]) | (a[j] & ~m[j]);
  store_chunk(base + half + k * VEC, b);
  if (edge) {
    store_chunk_edges(base + k * VEC, base + 2 * half, edge, a, c);
  } else {
    store_chunk(base + k * VEC, a);
  }
}

/// \brief The whole op for the heads this thread's group owns (the kernels below).
/// \tparam T_IN      activation storage type (float, bf16_t, f16_t)
/// \tparam IS_NEOX   rotate (i, i + rot/2) pairs if true, (2i, 2i + 1) pairs if false
/// \tparam VEC       elements per vector access: 16 bytes' worth, or 1 for unaligned data
/// \tparam MAX_UNITS units per lane the register arrays hold (ceil(units per head / LANES))
/// \tparam IS_MROPE  three positions per token, frequencies split between them
/// \tparam ALIGNED   q, k and their outputs are 16-byte aligned at every vector; otherwise each
///                   access follows its address's alignment (views that start mid-vector)
/// \tparam PACKED    in place on a packed qkv whose tokens are one stride apart, with a
///                   float32 cache and weights of T_IN (the host checks): head h of token t is
///                   at q_in + t * row stride + h * head_dim, k heads following q's. Half the
///                   address arithmetic before a head's first load, which is most of a small
///                   call's time (Qwen3-8B, T=1: 227 SASS instructions before the load of q in
///                   the general instance, 106 here), and no run-time dtype branches after it
/// \tparam STREAM_STORES (five-block instances only) store with st.global.cs, evict-first
///                   lines in the L2: the twin for heads that the host does not prefetch
///                   (prefetch_next in cuqk/_jit.py says where each measured faster)
/// \tparam CHUNKS    (unaligned 16-bit NeoX instances only) the chunked layout above; the host
///                   takes it where rotary_dim is head_dim and every output head has its
///                   input's offset within 16 bytes
/// \tparam HEAD_DIM  (packed CHUNKS instances only) head_dim and rotary_dim fixed at compile
///                   time, 0 to read them at run time: the lane count, the loop bounds and the
///                   reduction's shuffles then leave each round's instructions (Qwen3-8B's
///                   shape: 583 SASS instructions in the loop against 674)
///
/// The host launches at most as many blocks as are resident at once, and each group strides
/// over the heads: no block slot waits for the slowest warp of a finished block before the
/// next block starts.
template <typename T_IN, bool IS_NEOX, int VEC, int MAX_UNITS, bool IS_MROPE, bool ALIGNED,
          bool PACKED, bool STREAM_STORES, bool CHUNKS, int HEAD_DIM>
__device__ __forceinline__ void norm_rope_heads(const QkNormRopeParams& p) {
  static_assert(!STREAM_STORES || five_blocks_per_sm<T_IN, VEC, IS_MROPE, PACKED, ALIGNED>(),
                "only five-block instances have a streaming twin");
  static_assert(!CHUNKS || (!ALIGNED && IS_NEOX && !IS_MROPE && sizeof(T_IN) == 2 && VEC == 8),
                "chunks are for unaligned 16-bit NeoX heads");
  static_assert(HEAD_DIM == 0 || (CHUNKS && PACKED && HEAD_DIM % (2 * VEC) == 0 &&
                                  HEAD_DIM <= 2 * VEC * CHUNK_TABLE_UNITS),
                "a compile-time head_dim is for packed chunks instances, up to the weight "
                "table's size");
  constexpr int UNIT = 2 * VEC;
  // Narrow packed instances (a warp per head, head_dim = 64 * VEC: the host checks) serve small
  // calls, whose time is one head's chain: the head's geometry is known at compile time, and
  // the side loads go out with the data, before the reduction, where a lane's few elements
  // leave the registers for them.
  constexpr bool NARROW = PACKED && !IS_MROPE && VEC * sizeof(T_IN) < 16;
  // A block works on a window of rounds * heads_per_block consecutive heads between two
  // barriers (mRoPE needs one per window of rows; the 1-D path needs none). Two buffers: the
  // rows of the next window are fetched while the block works on the current one. Each thread
  // carries MROPE_AHEAD entries across in registers, so their loads overlap the work; a window
  // with more entries (few heads per token) gathers the rest after it.
  constexpr int MROPE_AHEAD = 3;
  __shared__ __align__(16) float mrope_rows[IS_MROPE ? 2 : 1][IS_MROPE ? MROPE_ROW_FLOATS : 1];
  __shared__ __align__(16) float chunk_weights[CHUNKS ? 2 * VEC * 16 * CHUNK_TABLE_UNITS : 1];
  const int lanes_log2 =
      NARROW ? 5 : HEAD_DIM ? ceil_log2(HEAD_DIM / UNIT) : static_cast<int>(p.lanes_log2);
  const int lanes = 1 << lanes_log2;
  const int lane = threadIdx.x & (lanes - 1);
  const unsigned heads_per_block = BLOCK_THREADS >> lanes_log2;
  const unsigned num_q_heads = static_cast<unsigned>(p.num_q_heads);
  const unsigned num_qk_heads = num_q_heads + static_cast<unsigned>(p.num_k_heads);
  const unsigned num_heads = num_qk_heads + (p.gate_out ? num_q_heads : 0u);
  const unsigned total = static_cast<unsigned>(p.num_tokens) * num_heads;
  const int head_dim = NARROW ? 64 * VEC : HEAD_DIM ? HEAD_DIM : static_cast<int>(p.head_dim);
  const int rotary_dim = HEAD_DIM ? HEAD_DIM : static_cast<int>(p.rotary_dim);
  const int n_units = head_dim / UNIT;
  const int n_rot_units = rotary_dim / UNIT;
  const int norm_mode = static_cast<int>(p.norm_mode);
  const bool rope_first = p.rope_first != 0;
  const float eps = p.eps;

  // Up to the host's mrope_rounds (what fits the buffer), as many rounds as still leave about
  // one window per block: at small T more rounds would only serialise heads that other blocks
  // could take.
  unsigned rounds = 1;
  if (IS_MROPE) {
    const unsigned windows = (total + heads_per_block - 1) / heads_per_block;
    rounds = max(1u, min(static_cast<unsigned>(p.mrope_rounds), windows * 10u / (gridDim.x * 9u)));
  }
  const unsigned window_heads = rounds * heads_per_block;
  // The five-block instances that prefetch each group's next head (the twin without
  // STREAM_STORES) also send its first head and position to the L2 while the prior grid may
  // still run: a prefetch reads nothing into the SM, and every write of that grid lands in the
  // L2, so nothing stale is read after the wait. Under programmatic dependent launch the first
  // loads then overlap the prior grid's tail (H200, bf16, T=8192: Qwen3-8B 46.2 against
  // 47.2 us). The narrow instances and the streaming twin measured slower with it (GPT-J D=64
  // 25.4 against 25.1 us at T=8192, Qwen3-8B bf16 2.0 against 1.9 us at T=16).
  if constexpr (five_blocks_per_sm<T_IN, VEC, IS_MROPE, PACKED, ALIGNED>() && !STREAM_STORES) {
    const unsigned first = blockIdx.x * heads_per_block + (threadIdx.x >> lanes_log2);
    if (first < total) {
      const unsigned token = head_token(first, p);
      const T_IN* head = packed_head<T_IN>(p, token, first - token * num_heads, head_dim);
      prefetch_head<IS_NEOX, VEC, MAX_UNITS>(head, lane, lanes, n_units, n_rot_units, rotary_dim);
      if (lane == 0 && p.positions) {
        prefetch_l2(reinterpret_cast<const char*>(p.positions) +
                    token * p.pos_stride_outer * (p.pos_is_int64 ? 8 : 4));
      }
    }
  }
  wait_for_prior_grids();
  if constexpr (CHUNKS) {
    fill_chunk_weights<T_IN, VEC, PACKED>(p, n_units, rotary_dim / 2, chunk_weights);
    __syncthreads();
  }
  if constexpr (IS_MROPE) {
    gather_mrope_rows(p, mrope_window(p, blockIdx.x * window_heads, window_heads, total), 0u,
                      mrope_rows[0]);
  }
  // The loop conditions are uniform over the block, so every lane reaches group_sum and every
  // thread the block barrier.
  int buffer = 0;
  for (unsigned window = blockIdx.x * window_heads; window < total;
       window += gridDim.x * window_heads, buffer ^= 1) {
    MropeWindow next{};
    float ahead[MROPE_AHEAD];
    bool ahead_ok[MROPE_AHEAD];
    unsigned window_token = 0;
    if constexpr (IS_MROPE) {
      next = mrope_window(p, window + gridDim.x * window_heads, window_heads, total);
#pragma unroll
      for (int g = 0; g < MROPE_AHEAD; ++g) {
        ahead_ok[g] = mrope_entry(p, next, threadIdx.x + g * BLOCK_THREADS, ahead[g]);
      }
      // This window's rows are complete, and every read of the other buffer is done.
      __syncthreads();
      window_token = head_token(window, p);
    }
    // One round per window without mRoPE: a bound the compiler sees as one pass.
    const unsigned window_end = IS_MROPE ? min(window + window_heads, total) : window + 1u;
    for (unsigned block_item = window; block_item < window_end; block_item += heads_per_block) {
      const unsigned item = block_item + (threadIdx.x >> lanes_log2);
      const bool active = item < total;
      const unsigned token = active ? head_token(item, p) : 0u;
      const unsigned head = active ? item - token * num_heads : 0u;
      const bool is_gate = !PACKED && head >= num_qk_heads;
      const bool is_q = head < num_q_heads || is_gate;
      const long long h = head < num_q_heads ? head : head - (is_gate ? num_qk_heads : num_q_heads);

      long long outer, inner;
      const T_IN* src;
      T_IN* dst;
      if constexpr (PACKED) {
        // In place, k right after q, one row stride, one token index: the head is an offset.
        outer = token;
        inner = 0;
        dst = packed_head<T_IN>(p, outer, head, head_dim);
        src = dst;
        if constexpr (!NARROW && !IS_MROPE && !CHUNKS) {
          // With prefetch_next (the host's choice) the head this group takes one window on
          // goes to the L2 now: at an H200's bandwidth the bytes each thread has in flight (its
          // own head) do not cover the memory latency, and holding the next head in registers
          // would cost occupancy. A run-time switch although only the twin without
          // STREAM_STORES sets it: compiled out, the NeoX twin spilled 8 bytes. The host never
          // sets it for CHUNKS, whose instances left it in spilled 8 bytes.
          const unsigned ahead = item + gridDim.x * heads_per_block;
          if (p.prefetch_next && ahead < total) {
            const unsigned ahead_token = head_token(ahead, p);
            const T_IN* next =
                packed_head<T_IN>(p, ahead_token, ahead - ahead_token * num_heads, head_dim);
            prefetch_head<IS_NEOX, VEC, MAX_UNITS>(next, lane, lanes, n_units, n_rot_units,
                                                   rotary_dim);
          }
        }
      } else {
        split_token(token, p, outer, inner);
        // Field-by-field selects: a reference to a kernel parameter would copy it to local
        // memory.
        const HeadStrides in = is_q ? p.q_in_strides : p.k_in_strides;
        const HeadStrides out = is_q ? p.q_out_strides : p.k_out_strides;
        src = reinterpret_cast<const T_IN*>(is_q ? p.q_in : p.k_in) +
              (outer * in.outer + inner * in.inner + h * in.head) + (is_gate ? head_dim : 0);
        dst = reinterpret_cast<T_IN*>(is_gate ? p.gate_out : (is_q ? p.q_out : p.k_out)) +
              (outer * out.outer + inner * out.inner + h * out.head);
      }

      // CHUNKS: the elements before the head in its first aligned chunk (the host checks that
      // dst has the same offset).
      const int chunk_shift =
          CHUNKS ? static_cast<int>(reinterpret_cast<unsigned long long>(src) & 15u) /
                       static_cast<int>(sizeof(T_IN))
                 : 0;
      // Packed CHUNKS: whether the head's edge chunks lie inside the span of the q and k
      // heads (load_chunk_unit). They do for every head but the first and the last, because
      // the host takes packed CHUNKS only where tokens are at least 16 bytes apart, upwards.
      const bool whole_edges = CHUNKS && PACKED && item != 0u && item + 1u != total;

      long long pos = token;
      if (!IS_MROPE && active && p.positions) {
        const long long off = outer * p.pos_stride_outer + inner * p.pos_stride_inner;
        pos = p.pos_is_int64 ? reinterpret_cast<const long long*>(p.positions)[off]
                             : reinterpret_cast<const int*>(p.positions)[off];
      }

      float x[MAX_UNITS][UNIT];
#pragma unroll
      for (int u = 0; u < MAX_UNITS; ++u) {
        const int k = lane + u * lanes;
#pragma unroll
        for (int i = 0; i < UNIT; ++i) x[u][i] = 0.f;
        if (!active || k >= n_units) continue;
        int off_a, off_b;
        if (is_gate) {
          // Two VEC-wide copies: a unit is only VEC-aligned in the scalar (unaligned) variant.
          unit_offsets<IS_NEOX, VEC>(k, 0, 0, off_a, off_b);
          copy_elements<T_IN, VEC, ALIGNED>(src + off_a, dst + off_a);
          copy_elements<T_IN, VEC, ALIGNED>(src + off_b, dst + off_b);
          continue;
        }
        if constexpr (CHUNKS) {
          load_chunk_unit<T_IN, VEC>(src - chunk_shift, k, rotary_dim / 2, chunk_shift,
                                     whole_edges, x[u]);
        } else {
          unit_offsets<IS_NEOX, VEC>(k, n_rot_units, rotary_dim, off_a, off_b);
          float va[VEC], vb[VEC];
          load_as_float<T_IN, VEC, ALIGNED>(src + off_a, va);
          load_as_float<T_IN, VEC, ALIGNED>(src + off_b, vb);
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            x[u][i] = va[i];
            x[u][VEC + i] = vb[i];
          }
        }
      }

      const float* rows = nullptr;
      if constexpr (IS_MROPE) {
        rows = mrope_rows[buffer] + (active ? token - window_token : 0u) * rotary_dim;
      }
      // Side inputs go in parts of SIDE elements, each loaded just before its use: whole
      // vectors, or half vectors in the five-block instances (see five_blocks_per_sm).
      constexpr bool FIVE_BLOCKS = five_blocks_per_sm<T_IN, VEC, IS_MROPE, PACKED, ALIGNED>();
      constexpr int SIDE = FIVE_BLOCKS ? VEC / 2 : VEC;
      // after_norm: the rotation after the norm, where the per-size chunks instances take cos
      // and sin in vectors where the shift allows; before the norm (rope_first) and in the
      // run-time instance the vectors spilled (32 and 4 bytes at the 48-register bound).
      const auto cos_sin = [&](int freq, float(&c)[SIDE], float(&s)[SIDE], bool after_norm) {
        if constexpr (IS_MROPE) {
          load_as_float<float, SIDE>(rows + freq, c);
          load_as_float<float, SIDE>(rows + rotary_dim / 2 + freq, s);
        } else {
          // The five-block instances take half the rotary size from the kernel's register (12
          // bytes of spills when reread from the parameters); the others reread it (the
          // register copy took the scalar ones from 60 to 124 registers).
          const int half =
              (FIVE_BLOCKS || HEAD_DIM ? rotary_dim : static_cast<int>(p.rotary_dim)) / 2;
          if (HEAD_DIM != 0 && after_norm) {
            load_cos_sin<SIDE, PACKED, CHUNKS, true>(p, pos, freq, half, c, s, chunk_shift);
          } else {
            load_cos_sin<SIDE, PACKED, CHUNKS>(p, pos, freq, half, c, s, chunk_shift);
          }
        }
      };
      const auto rotate_loading_cos_sin = [&](float(&v)[UNIT], int k, bool after_norm) {
#pragma unroll
        for (int part = 0; part < VEC; part += SIDE) {
          float c[SIDE], s[SIDE];
          cos_sin(k * VEC + part, c, s, after_norm);
          rotate_pairs<IS_NEOX, VEC, SIDE>(v, part, c, s);
        }
      };

      const long long weight = is_q ? p.q_weight : p.k_weight;
      const bool has_weight = weight != 0 && norm_mode != NORM_NONE;
      // The weights of head elements [at_a, at_a + SIDE) and [at_b, at_b + SIDE); with CHUNKS,
      // of the slots of unit at_a / VEC, from the block's table (fill_chunk_weights).
      const auto load_weights = [&](int at_a, int at_b, float(&wa)[SIDE], float(&wb)[SIDE]) {
        if constexpr (CHUNKS) {
          static_assert(SIDE == VEC, "a CHUNKS unit's weights come in one piece");
          load_chunk_weights<VEC>(chunk_weights, is_q, chunk_shift, at_a / VEC, n_units, wa, wb);
        } else if constexpr (PACKED) {
          const T_IN* w = reinterpret_cast<const T_IN*>(weight);
          load_as_float<T_IN, SIDE>(w + at_a, wa);
          load_as_float<T_IN, SIDE>(w + at_b, wb);
        } else {
          const void* w = reinterpret_cast<const void*>(weight);
          load_as_float_dyn<SIDE>(w, at_a, static_cast<int>(p.weight_dtype), wa);
          load_as_float_dyn<SIDE>(w, at_b, static_cast<int>(p.weight_dtype), wb);
        }
      };
      SideInputs<VEC> early[NARROW ? MAX_UNITS : 1];
      if constexpr (NARROW) {
#pragma unroll
        for (int u = 0; u < MAX_UNITS; ++u) {
          const int k = lane + u * lanes;
          if (!active || k >= n_units) continue;
          int off_a, off_b;
          unit_offsets<IS_NEOX, VEC>(k, n_rot_units, rotary_dim, off_a, off_b);
          if (has_weight) load_weights(off_a, off_b, early[u].wa, early[u].wb);
          if (!rope_first && k < n_rot_units) cos_sin(k * VEC, early[u].c, early[u].s, true);
        }
      }

      float sum_sq = 0.f;
#pragma unroll
      for (int u = 0; u < MAX_UNITS; ++u) {
        const int k = lane + u * lanes;
        if (!active || k >= n_units || is_gate) continue;
        if (rope_first && k < n_rot_units) rotate_loading_cos_sin(x[u], k, false);
#pragma unroll
        for (int i = 0; i < UNIT; ++i) sum_sq += x[u][i] * x[u][i];
      }

      float scale = 1.f;
      if (norm_mode != NORM_NONE) {
        const float inv_head_dim = NARROW || HEAD_DIM ? 1.f / head_dim : p.inv_head_dim;
        scale = rsqrtf(group_sum(sum_sq, lanes) * inv_head_dim + eps);
      }
      // A position outside the cache makes the rotated pairs NaN through the scale, one
      // select a unit instead of one per cos and sin; with the rotation before the norm, the
      // whole head, whose sum of squares those pairs are part of. (NaN cos and sin for the
      // rotation before the norm, as before, measured slower: Llama 4's shape 62.2 against
      // 61.5 us at T=8192, and the other paths slower by their larger code.)
      const bool pos_ok = IS_MROPE || position_in_cache(p, pos);
      const float rot_scale = pos_ok ? scale : __int_as_float(0x7fc00000);
      const float pass_scale = rope_first && norm_mode != NORM_NONE ? rot_scale : scale;

#pragma unroll
      for (int u = 0; u < MAX_UNITS; ++u) {
        const int k = lane + u * lanes;
        if (!active || k >= n_units || is_gate) continue;
        int off_a, off_b;
        unit_offsets<IS_NEOX, VEC>(k, n_rot_units, rotary_dim, off_a, off_b);
        float y[UNIT];
#pragma unroll
        for (int i = 0; i < UNIT; ++i) y[i] = x[u][i] * (k < n_rot_units ? rot_scale : pass_scale);
        // Other instances load the weights, use them, then load cos and sin: holding both at
        // once took the wide ones from 56 to 90 registers (2 blocks per SM instead of 4).
        const SideInputs<VEC>& side = early[NARROW ? u : 0];
        if (has_weight) {
          // The CHUNKS tables hold Gemma's 1 + w already (fill_chunk_weights).
          const float shift = norm_mode == NORM_GEMMA ? 1.f : 0.f;
#pragma unroll
          for (int part = 0; part < VEC; part += SIDE) {
            float wa[SIDE], wb[SIDE];
            if constexpr (NARROW) {
#pragma unroll
              for (int i = 0; i < SIDE; ++i) {
                wa[i] = side.wa[part + i];
                wb[i] = side.wb[part + i];
              }
            } else {
              load_weights(off_a + part, off_b + part, wa, wb);
            }
#pragma unroll
            for (int i = 0; i < SIDE; ++i) {
              y[part + i] *= CHUNKS ? wa[i] : wa[i] + shift;
              y[VEC + part + i] *= CHUNKS ? wb[i] : wb[i] + shift;
            }
          }
        }
        if (!rope_first && k < n_rot_units) {
          if constexpr (NARROW) {
            rotate_pairs<IS_NEOX, VEC, VEC>(y, 0, side.c, side.s);
          } else {
            rotate_loading_cos_sin(y, k, true);
          }
        }
        if constexpr (CHUNKS) {
          store_chunk_unit<T_IN, VEC>(dst - chunk_shift, k, rotary_dim / 2, chunk_shift, y);
        } else {
          float ya[VEC], yb[VEC];
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            ya[i] = y[i];
            yb[i] = y[VEC + i];
          }
          store_from_float<T_IN, VEC, ALIGNED, STREAM_STORES>(dst + off_a, ya);
          store_from_float<T_IN, VEC, ALIGNED, STREAM_STORES>(dst + off_b, yb);
        }
      }
    }

    if constexpr (IS_MROPE) {
      float* next_rows = mrope_rows[buffer ^ 1];
#pragma unroll
      for (int g = 0; g < MROPE_AHEAD; ++g) {
        if (ahead_ok[g]) next_rows[mrope_slot(p, next, threadIdx.x + g * BLOCK_THREADS)] = ahead[g];
      }
      gather_mrope_rows(p, next, MROPE_AHEAD * BLOCK_THREADS, next_rows);
    }
  }
}

/// \brief Blocks per SM the 1-D kernel is bounded to: 5 for the five-block instances and the
/// packed CHUNKS ones (48 registers and no spills, where unbounded they take 54 and 4 blocks
/// fit), else 0, the default allocation: a minimum of 1 block per SM changed the others'.
template <typename T_IN, int VEC, bool ALIGNED, bool PACKED, bool CHUNKS>
__host__ __device__ constexpr int rope_min_blocks() {
  return five_blocks_per_sm<T_IN, VEC, false, PACKED, ALIGNED>() || (CHUNKS && PACKED) ? 5 : 0;
}

/// \brief 1-D RoPE, bounded as rope_min_blocks says.
template <typename T_IN, bool IS_NEOX, int VEC, int MAX_UNITS, bool ALIGNED, bool PACKED,
          bool STREAM_STORES, bool CHUNKS, int HEAD_DIM>
__global__ void __launch_bounds__(BLOCK_THREADS,
                                  rope_min_blocks<T_IN, VEC, ALIGNED, PACKED, CHUNKS>())
    qk_norm_rope_kernel(const QkNormRopeParams p) {
  norm_rope_heads<T_IN, IS_NEOX, VEC, MAX_UNITS, false, ALIGNED, PACKED, STREAM_STORES,
                  CHUNKS, HEAD_DIM>(p);
}

/// \brief Multimodal RoPE: the 1-D work on rows gathered into shared memory per block. Left
/// alone, the scalar (VEC=1) instances hoist their shared-memory loads and take 125 registers;
/// bounded to 4 blocks per SM the others take 56-62 registers, the scalar GPT-J instances 64
/// with about 100 bytes of spills (the unaligned path, slow for other reasons).
template <typename T_IN, bool IS_NEOX, int VEC, int MAX_UNITS, bool ALIGNED, bool PACKED>
__global__ void __launch_bounds__(BLOCK_THREADS, 4)
    qk_norm_mrope_kernel(const QkNormRopeParams p) {
  norm_rope_heads<T_IN, IS_NEOX, VEC, MAX_UNITS, true, ALIGNED, PACKED, false, false, 0>(p);
}
