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

/// \tparam T_IN      activation storage type (float, bf16_t, f16_t)
/// \tparam IS_NEOX   rotate (i, i + rot/2) pairs if true, (2i, 2i + 1) pairs if false
/// \tparam VEC       elements per vector access: 16 bytes' worth, or 1 for unaligned data
/// \tparam MAX_UNITS units per lane the register arrays hold (ceil(units per head / LANES))
template <typename T_IN, bool IS_NEOX, int VEC, int MAX_UNITS>
__global__ void __launch_bounds__(256) qk_norm_rope_kernel(const QkNormRopeParams p) {
  constexpr int UNIT = 2 * VEC;
  const int lanes = static_cast<int>(p.lanes_per_head);
  const int lane = threadIdx.x & (lanes - 1);
  const unsigned heads_per_block = blockDim.x / lanes;
  const unsigned num_q_heads = static_cast<unsigned>(p.num_q_heads);
  const unsigned num_heads = num_q_heads + static_cast<unsigned>(p.num_k_heads);
  const unsigned total = static_cast<unsigned>(p.num_tokens) * num_heads;
  const int head_dim = static_cast<int>(p.head_dim);
  const int rotary_dim = static_cast<int>(p.rotary_dim);
  const int n_units = head_dim / UNIT;
  const int n_rot_units = rotary_dim / UNIT;
  const int norm_mode = static_cast<int>(p.norm_mode);
  const float eps = static_cast<float>(p.eps);
  const float nan = __int_as_float(0x7fc00000);

  // The loop condition is uniform over the block, so every lane reaches group_sum.
  for (unsigned block_item = blockIdx.x * heads_per_block; block_item < total;
       block_item += gridDim.x * heads_per_block) {
    const unsigned item = block_item + threadIdx.x / lanes;
    const bool active = item < total;
    const unsigned token = active ? item / num_heads : 0u;
    const unsigned head = active ? item - token * num_heads : 0u;
    const bool is_q = head < num_q_heads;
    const long long h = is_q ? head : head - num_q_heads;

    long long outer = token, inner = 0;
    if (p.tokens_inner != 1) {
      outer = token / static_cast<unsigned>(p.tokens_inner);
      inner = token - outer * p.tokens_inner;
    }
    // Field-by-field selects: a reference to a kernel parameter would copy it to local memory.
    const HeadStrides in = is_q ? p.q_in_strides : p.k_in_strides;
    const HeadStrides out = is_q ? p.q_out_strides : p.k_out_strides;
    const T_IN* src = reinterpret_cast<const T_IN*>(is_q ? p.q_in : p.k_in) +
                      (outer * in.outer + inner * in.inner + h * in.head);
    T_IN* dst = reinterpret_cast<T_IN*>(is_q ? p.q_out : p.k_out) +
                (outer * out.outer + inner * out.inner + h * out.head);

    long long pos = 0;
    if (active) {
      const long long pos_off = outer * p.pos_stride_outer + inner * p.pos_stride_inner;
      pos = p.pos_is_int64 ? reinterpret_cast<const long long*>(p.positions)[pos_off]
                           : reinterpret_cast<const int*>(p.positions)[pos_off];
    }

    float x[MAX_UNITS][UNIT];
    float sum_sq = 0.f;
#pragma unroll
    for (int u = 0; u < MAX_UNITS; ++u) {
      const int k = lane + u * lanes;
#pragma unroll
      for (int i = 0; i < UNIT; ++i) x[u][i] = 0.f;
      if (active && k < n_units) {
        int off_a, off_b;
        unit_offsets<IS_NEOX, VEC>(k, n_rot_units, rotary_dim, off_a, off_b);
        float va[VEC], vb[VEC];
        load_as_float<T_IN, VEC>(src + off_a, va);
        load_as_float<T_IN, VEC>(src + off_b, vb);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          x[u][i] = va[i];
          x[u][VEC + i] = vb[i];
          sum_sq += va[i] * va[i] + vb[i] * vb[i];
        }
      }
    }

    float scale = 1.f;
    if (norm_mode != NORM_NONE) {
      scale = rsqrtf(group_sum(sum_sq, lanes) / static_cast<float>(head_dim) + eps);
    }
    const long long weight = is_q ? p.q_weight : p.k_weight;
    const bool pos_ok = pos >= 0 && pos < p.max_position;
    const long long cos_row = (pos_ok ? pos : 0) * p.cache_row_stride;
    const int cache_dtype = static_cast<int>(p.cache_dtype);

#pragma unroll
    for (int u = 0; u < MAX_UNITS; ++u) {
      const int k = lane + u * lanes;
      if (!active || k >= n_units) continue;
      int off_a, off_b;
      unit_offsets<IS_NEOX, VEC>(k, n_rot_units, rotary_dim, off_a, off_b);
      float y[UNIT];
#pragma unroll
      for (int i = 0; i < UNIT; ++i) y[i] = x[u][i] * scale;
      if (weight != 0 && norm_mode != NORM_NONE) {
        float wa[VEC], wb[VEC];
        const void* w = reinterpret_cast<const void*>(weight);
        load_as_float_dyn<VEC>(w, off_a, static_cast<int>(p.weight_dtype), wa);
        load_as_float_dyn<VEC>(w, off_b, static_cast<int>(p.weight_dtype), wb);
        const float shift = norm_mode == NORM_GEMMA ? 1.f : 0.f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          y[i] *= wa[i] + shift;
          y[VEC + i] *= wb[i] + shift;
        }
      }
      if (k < n_rot_units) {
        float c[VEC], s[VEC];
        const void* cache = reinterpret_cast<const void*>(p.cache);
        load_as_float_dyn<VEC>(cache, cos_row + k * VEC, cache_dtype, c);
        load_as_float_dyn<VEC>(cache, cos_row + rotary_dim / 2 + k * VEC, cache_dtype, s);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          // Positions outside [0, max_position) read row 0 and yield NaN: loud, never OOB.
          const float ci = pos_ok ? c[i] : nan;
          const float si = pos_ok ? s[i] : nan;
          const int ia = IS_NEOX ? i : 2 * i;
          const int ib = IS_NEOX ? VEC + i : 2 * i + 1;
          const float a = y[ia], b = y[ib];
          y[ia] = a * ci - b * si;
          y[ib] = b * ci + a * si;
        }
      }
      float ya[VEC], yb[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        ya[i] = y[i];
        yb[i] = y[VEC + i];
      }
      store_from_float<T_IN, VEC>(dst + off_a, ya);
      store_from_float<T_IN, VEC>(dst + off_b, yb);
    }
  }
}
