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
#include "common.cuh"

/// \brief Element strides of one tensor of heads (see the layout above).
struct HeadStrides {
  long long outer, inner, head;
};

/// \brief Kernel arguments, passed by value as one struct. Every field is 8 bytes, so the
/// host packs it with a flat format and no padding rules apply; the order is mirrored by
/// POINTER_FIELDS and STATIC_FIELDS in cuqk/_jit.py (a CPU test compares them). Pointers come
/// first so a launch rewrites only the first 64 bytes of a plan's packed struct.
struct QkNormRopeParams {
  long long q_in, k_in, q_out, k_out, positions, cache, q_weight, k_weight;
  HeadStrides q_in_strides, k_in_strides, q_out_strides, k_out_strides;
  long long pos_stride_outer, pos_stride_inner, pos_is_int64;
  long long cache_row_stride, max_position, cache_dtype, weight_dtype;
  long long num_tokens, tokens_inner, num_q_heads, num_k_heads;
  long long head_dim, rotary_dim, norm_mode, lanes_per_head;
  double eps;
};

enum NormMode { NORM_NONE = 0, NORM_RMS = 1, NORM_GEMMA = 2 };

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

/// \brief Per-unit inputs other than the head: weight factors and the cos/sin of its pairs.
template <int VEC>
struct SideInputs {
  float wa[VEC], wb[VEC], c[VEC], s[VEC];
};

/// \brief Loads unit k's weights (as the factor the norm multiplies by, 1 without a weight)
/// and, for rotary units, its cos/sin. Positions outside [0, max_position) read row 0 and turn
/// into NaN factors: loud, and never out of bounds.
template <bool IS_NEOX, int VEC>
__device__ __forceinline__ SideInputs<VEC> load_side(const QkNormRopeParams& p, bool is_q, int k,
                                                     int n_rot_units, long long pos) {
  SideInputs<VEC> side;
  int off_a, off_b;
  unit_offsets<IS_NEOX, VEC>(k, n_rot_units, static_cast<int>(p.rotary_dim), off_a, off_b);
  const long long weight = is_q ? p.q_weight : p.k_weight;
  if (weight != 0 && p.norm_mode != NORM_NONE) {
    const void* w = reinterpret_cast<const void*>(weight);
    const int dtype = static_cast<int>(p.weight_dtype);
    load_as_float_dyn<VEC>(w, off_a, dtype, side.wa);
    load_as_float_dyn<VEC>(w, off_b, dtype, side.wb);
    const float shift = p.norm_mode == NORM_GEMMA ? 1.f : 0.f;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      side.wa[i] += shift;
      side.wb[i] += shift;
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) side.wa[i] = side.wb[i] = 1.f;
  }
  if (k < n_rot_units) {
    const bool pos_ok = pos >= 0 && pos < p.max_position;
    const long long row = (pos_ok ? pos : 0) * p.cache_row_stride;
    const void* cache = reinterpret_cast<const void*>(p.cache);
    const int dtype = static_cast<int>(p.cache_dtype);
    load_as_float_dyn<VEC>(cache, row + k * VEC, dtype, side.c);
    load_as_float_dyn<VEC>(cache, row + p.rotary_dim / 2 + k * VEC, dtype, side.s);
    if (!pos_ok) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) side.c[i] = side.s[i] = __int_as_float(0x7fc00000);
    }
  }
  return side;
}

/// \tparam T_IN      activation storage type (float, bf16_t, f16_t)
/// \tparam IS_NEOX   rotate (i, i + rot/2) pairs if true, (2i, 2i + 1) pairs if false
/// \tparam VEC       elements per vector access: 16 bytes' worth, or 1 for unaligned data
/// \tparam MAX_UNITS units per lane the register arrays hold (ceil(units per head / LANES))
/// \tparam ITEMS     heads per lane group per iteration, all loaded before any is used: more
///                   bytes in flight per thread for large inputs; 1 keeps small inputs spread
template <typename T_IN, bool IS_NEOX, int VEC, int MAX_UNITS, int ITEMS, bool EARLY_SIDE,
          int MIN_BLOCKS>
__global__ void __launch_bounds__(256, MIN_BLOCKS) qk_norm_rope_kernel(const QkNormRopeParams p) {
  const int lanes = static_cast<int>(p.lanes_per_head);
  const int lane = threadIdx.x & (lanes - 1);
  const unsigned groups_per_block = blockDim.x / lanes;
  const unsigned num_q_heads = static_cast<unsigned>(p.num_q_heads);
  const unsigned num_heads = num_q_heads + static_cast<unsigned>(p.num_k_heads);
  const unsigned total = static_cast<unsigned>(p.num_tokens) * num_heads;
  const int head_dim = static_cast<int>(p.head_dim);
  const int rotary_dim = static_cast<int>(p.rotary_dim);
  const int n_units = head_dim / (2 * VEC);
  const int n_rot_units = rotary_dim / (2 * VEC);
  const float eps = static_cast<float>(p.eps);
  const unsigned step = gridDim.x * groups_per_block * ITEMS;

  // The loop condition is uniform over the block, so every lane reaches group_sum.
  for (unsigned block_first = blockIdx.x * groups_per_block * ITEMS; block_first < total;
       block_first += step) {
    // Items j of this lane group are consecutive heads, usually of one token.
    const unsigned first = block_first + (threadIdx.x / lanes) * ITEMS;
    Packed<T_IN, VEC> va[ITEMS][MAX_UNITS], vb[ITEMS][MAX_UNITS];
    T_IN* dst[ITEMS];
    long long pos[ITEMS];
    bool is_q[ITEMS], active[ITEMS];
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) {
      const unsigned item = first + j;
      active[j] = item < total;
      const unsigned token = active[j] ? item / num_heads : 0u;
      const unsigned head = active[j] ? item - token * num_heads : 0u;
      is_q[j] = head < num_q_heads;
      const long long h = is_q[j] ? head : head - num_q_heads;
      long long outer = token, inner = 0;
      if (p.tokens_inner != 1) {
        outer = token / static_cast<unsigned>(p.tokens_inner);
        inner = token - outer * p.tokens_inner;
      }
      // Field-by-field selects: a reference to a kernel parameter would copy it to local memory.
      const HeadStrides in = is_q[j] ? p.q_in_strides : p.k_in_strides;
      const HeadStrides out = is_q[j] ? p.q_out_strides : p.k_out_strides;
      const T_IN* src = reinterpret_cast<const T_IN*>(is_q[j] ? p.q_in : p.k_in) +
                        (outer * in.outer + inner * in.inner + h * in.head);
      dst[j] = reinterpret_cast<T_IN*>(is_q[j] ? p.q_out : p.k_out) +
               (outer * out.outer + inner * out.inner + h * out.head);
      pos[j] = 0;
      if (active[j]) {
        const long long pos_off = outer * p.pos_stride_outer + inner * p.pos_stride_inner;
        pos[j] = p.pos_is_int64 ? reinterpret_cast<const long long*>(p.positions)[pos_off]
                                : reinterpret_cast<const int*>(p.positions)[pos_off];
      }
#pragma unroll
      for (int u = 0; u < MAX_UNITS; ++u) {
        const int k = lane + u * lanes;
        if (active[j] && k < n_units) {
          int off_a, off_b;
          unit_offsets<IS_NEOX, VEC>(k, n_rot_units, rotary_dim, off_a, off_b);
          va[j][u].load(src + off_a);
          vb[j][u].load(src + off_b);
        } else {
          va[j][u].zero();
          vb[j][u].zero();
        }
      }
    }

    // With one item per group, fetch weights and cos/sin now so their latency overlaps the
    // head loads (small inputs are latency-bound); with more, registers go to head data.
    SideInputs<VEC> early[EARLY_SIDE ? MAX_UNITS : 1];
    if constexpr (EARLY_SIDE) {
#pragma unroll
      for (int u = 0; u < MAX_UNITS; ++u) {
        const int k = lane + u * lanes;
        if (active[0] && k < n_units) early[u] = load_side<IS_NEOX, VEC>(p, is_q[0], k,
                                                                        n_rot_units, pos[0]);
      }
    }

    float scale[ITEMS];
#pragma unroll
    for (int j = 0; j < ITEMS; ++j) {
      float sum_sq = 0.f;
#pragma unroll
      for (int u = 0; u < MAX_UNITS; ++u) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const float a = va[j][u].get(i), b = vb[j][u].get(i);
          sum_sq += a * a + b * b;
        }
      }
      scale[j] = 1.f;
      if (p.norm_mode != NORM_NONE) {
        scale[j] = rsqrtf(group_sum(sum_sq, lanes) / static_cast<float>(head_dim) + eps);
      }
    }

#pragma unroll
    for (int j = 0; j < ITEMS; ++j) {
#pragma unroll
      for (int u = 0; u < MAX_UNITS; ++u) {
        const int k = lane + u * lanes;
        if (!active[j] || k >= n_units) continue;
        SideInputs<VEC> side;
        if constexpr (EARLY_SIDE) {
          side = early[u];
        } else {
          side = load_side<IS_NEOX, VEC>(p, is_q[j], k, n_rot_units, pos[j]);
        }
        float ya[VEC], yb[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          ya[i] = va[j][u].get(i) * scale[j] * side.wa[i];
          yb[i] = vb[j][u].get(i) * scale[j] * side.wb[i];
        }
        if (k < n_rot_units) {
          // NeoX pairs are (ya[i], yb[i]); GPT-J pairs are adjacent elements of ya | yb.
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            float& a = IS_NEOX ? ya[i] : (2 * i < VEC ? ya[2 * i] : yb[2 * i - VEC]);
            float& b = IS_NEOX ? yb[i] : (2 * i + 1 < VEC ? ya[2 * i + 1] : yb[2 * i + 1 - VEC]);
            const float x0 = a, x1 = b;
            a = x0 * side.c[i] - x1 * side.s[i];
            b = x1 * side.c[i] + x0 * side.s[i];
          }
        }
        int off_a, off_b;
        unit_offsets<IS_NEOX, VEC>(k, n_rot_units, rotary_dim, off_a, off_b);
        store_from_float<T_IN, VEC>(dst[j] + off_a, ya);
        store_from_float<T_IN, VEC>(dst[j] + off_b, yb);
      }
    }
  }
}
