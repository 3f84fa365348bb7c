/* One Adam step over rows of tensors, as one C loop: keras_adam._whole's step
 * function for 8-bit codes and for what is written with stochastic rounding
 * (keras_adam/backends/rows.py compiles this file; torch_rows.py calls it on
 * CPU tensors, jax_rows.cc and tf_xla.cc from XLA's programs on a CPU, and
 * tf_rows.cc's op from TensorFlow's graphs).
 *
 * Per element, in the order of keras_adam._rule.rule and keras_adam._whole's
 * step, each operation one IEEE float32 rounding (compiled with
 * -ffp-contract=off: no multiply-add is fused), so that the results are
 * those of the same operations run one by one:
 *
 *     g      = float(gradient)
 *     m      = beta_1 * m + (1 - beta_1) * g
 *     v      = beta_2 * v + (1 - beta_2) * (g * g)
 *     v_max  = v_max > v ? v_max : v                            (V_MAX)
 *     c1m    = m,  or  nesterov_momentum * m + (1 - beta_1) * g   (NESTEROV)
 *     step   = alpha * c1m / (sqrt(v or v_max) + epsilon')
 *              (0 where sqrt is 0, with epsilon = 0: EPSILON_ZERO)
 *     theta  = theta - step                                      (float32 theta)
 *         or   SR(theta - (step + theta * rate * lr))            (ROUNDS; RATE)
 *
 * Two layouts, by the macro EIGHT_BIT:
 *
 * - element-wise (0): each moment read and stored as float32, or as bfloat16
 *   written SR(moment);
 * - 8-bit codes (1), one block per row (keras_adam._quantize): m and v read as
 *   q(code) * s_b, raised to m^2 / K where K is given (BOUND; keras_adam._state's
 *   Blockwise8bit), and stored as each block's absmax s_b and codes rounded
 *   in the table's law: j = sign(m) rint(127 (|m| / s_b)^(1/4)),
 *   k = rint(255 (v / s_b)^(1/8)), with 1 / s_b formed once per block.
 *
 * SR(x) is keras_adam._rounding.stochastic_bfloat16: the 16 high bits of the
 * element's random_bits added to x's float32 bits, the low 16 cut off (an
 * infinity kept, NaN written as 0x7FC0). random_bits(i) = mix((i ^ key) * 0x9E3779B9), i the
 * element's position in its own variable (its row's first position plus its
 * place in the row), key its row's key for the stream (0: the variable,
 * 1-3: m, v, v_max): keras_adam._rounding.random_bits, in unsigned 32-bit
 * arithmetic (the same bits as its wrapping int32).
 *
 * The layout is fixed when compiling, by macros: THETA and GRADIENT are F32 or
 * BF16; element-wise, M, V and V_MAX are F32 or BF16 (V_MAX 0 without
 * amsgrad); 8-bit, M, V, V_MAX are 1 where the slot exists. ROUNDS, RATE,
 * NESTEROV, EPSILON_ZERO and BOUND are 0 or 1. A bfloat16 theta is written
 * only with ROUNDS.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define F32 1
#define BF16 2

/* A row's or block's step, inlined into each loop that runs it: a call per
   row of 16 costs about as much as the row. */
#define INLINE static inline __attribute__((always_inline))

/* Each row's step first asks for the cache lines AHEAD bytes past its own, of
   every tensor it reads or writes: on Intel's Xeons the CPU's own
   prefetchers fell behind (pure bfloat16, 4 variables of 4 million
   elements in turn: 4.7 ms a variable without, 2.1 with; the same on one
   variable, hot in cache). On a 2-core AMD EPYC (Zen 3) the same requests
   cost time instead, at every distance from 1 to 16 KB (4 variables of 4
   million elements, the two loops alternating in one process: bfloat16
   moments 1.08-1.12 times as long, 8-bit ones 1.00-1.04), so rows.py
   compiles AHEAD 0, no request, for AMD's CPUs.
   Rows shorter than a line are asked for more than once, which costs
   little. A prefetch never faults, past a tensor's end too. */
#ifndef AHEAD
#define AHEAD 4096
#endif
#if AHEAD
#define PREFETCH(pointer, bytes, write)                                            \
  for (int64_t line = 0; line < (int64_t)(bytes); line += 64)                    \
    __builtin_prefetch((const char *)(pointer) + AHEAD + line, (write))
#else
#define PREFETCH(pointer, bytes, write) ((void)(pointer), (void)(bytes))
#endif

/* The element-wise loop of several variables takes each in rows of CHUNK
   (each row's step prefetching for the next, where AHEAD is not 0). */
#define CHUNK 256

/* The longest piece of a row that one row step takes (the tests set less). */
#ifndef PIECE
#define PIECE ((int64_t)1 << 30)
#endif

/* Several variables' work in units (rows of CHUNK, or 8-bit blocks) shared
   among the threads as one range, whatever their sizes: units[k] is
   variable k's first unit, units[count] the total. */
static int64_t *first_units(int64_t count, const int64_t *sizes, int64_t unit) {
  int64_t *units = malloc((count + 1) * sizeof(int64_t));
  if (units) {
    units[0] = 0;
    for (int64_t k = 0; k < count; k++) units[k + 1] = units[k] + (sizes[k] + unit - 1) / unit;
  }
  return units;
}

/* The variable of unit u: the last k with units[k] <= u. */
static inline int64_t owner(const int64_t *units, int64_t count, int64_t u) {
  int64_t low = 0, high = count - 1;
  while (low < high) {
    const int64_t middle = (low + high + 1) / 2;
    if (units[middle] <= u) low = middle;
    else high = middle - 1;
  }
  return low;
}

/* The step's scalars, in this order (keras_adam/backends/rows.py, `scalars`). */
enum { BETA_1, ONE_MINUS_BETA_1, BETA_2, ONE_MINUS_BETA_2, NESTEROV_MOMENTUM, ALPHA,
       EPSILON, DECAY_RATE, LR, MOMENT_BOUND, SCALARS };

static inline float from_bf16(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float x;
  memcpy(&x, &bits, 4);
  return x;
}

/* keras_adam._rounding._mix: a bijective 32-bit hash. */
static inline uint32_t mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

/* The 16 high bits of random_bits(index, key) = mix((index ^ key) * 0x9E3779B9),
   all that stochastic rounding adds: mix's last step, x ^= x >> 16, leaves
   them as they are, so it is left out (two vector instructions of some
   twenty an element's stream). */
static inline uint32_t random_high_bits(uint32_t index, uint32_t key) {
  uint32_t x = (index ^ key) * 0x9E3779B9u;
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x >> 16;
}

/* keras_adam._rounding.stream_key of streams 0 .. count - 1 at step t, with
   `seed` (t and seed as int32 bits): mix(seed ^ mix(t * 0x9E3779B9 + stream)). */
void keras_adam_stream_keys(int64_t count, int64_t seed, int64_t t, int32_t *keys) {
  for (int64_t stream = 0; stream < count; stream++)
    keys[stream] = (int32_t)mix((uint32_t)seed ^ mix((uint32_t)t * 0x9E3779B9u + (uint32_t)stream));
}

/* keras_adam._rounding.stochastic_bfloat16. A value that is not finite is cast
   as a cast does: infinities keep their bits, NaN is written as the quiet
   NaN 0x7FC0 (torch.compile's step may write another NaN's sign and
   payload: a NaN either way). An infinity needs no case of its own: its
   low 16 bits are 0, so adding `high` (below 2^16) carries nothing. */
static inline uint16_t stochastic_bf16(float x, uint32_t high) {
  uint32_t u;
  memcpy(&u, &x, 4);
  return (uint16_t)(x != x ? 0x7FC0u : (u + high) >> 16);
}

/* torch.maximum: NaN if either is NaN. Written as three selections, each of
   values already computed: GCC took the nested form for control flow and
   left the whole 8-bit block loop scalar (a moment bound's 8-bit step in
   2.3 times the time on a 2-core AMD EPYC). */
static inline float maximum(float a, float b) {
  const float larger = a > b ? a : b;
  const float unordered = b != b ? b : larger;
  return a != a ? a : unordered;
}

#if THETA == BF16
typedef uint16_t theta_t;
#define THETA_IN(x) from_bf16(x)
#else
typedef float theta_t;
#define THETA_IN(x) (x)
#endif
#if GRADIENT == BF16
typedef uint16_t gradient_t;
#define GRADIENT_IN(x) from_bf16(x)
#else
typedef float gradient_t;
#define GRADIENT_IN(x) (x)
#endif

/* The rule on one element's float32 g, m, v (and v_max): the new moments in
   place, the step returned. */
static inline float rule(float g, float *m, float *v, float *v_max, const float *s) {
  *m = s[BETA_1] * *m + s[ONE_MINUS_BETA_1] * g;
  *v = s[BETA_2] * *v + s[ONE_MINUS_BETA_2] * (g * g);
#if V_MAX
  *v_max = *v_max > *v ? *v_max : *v;
  const float sqrt_v = sqrtf(*v_max);
#else
  (void)v_max;
  const float sqrt_v = sqrtf(*v);
#endif
#if NESTEROV
  const float c1_m_hat = s[NESTEROV_MOMENTUM] * *m + s[ONE_MINUS_BETA_1] * g;
#else
  const float c1_m_hat = *m;
#endif
  float step = s[ALPHA] * c1_m_hat / (sqrt_v + s[EPSILON]);
#if EPSILON_ZERO
  step = sqrt_v > 0.0f ? step : 0.0f;
#endif
  return step;
}

/* theta written: theta - step, or by its stochastic rounding after its decay. */
static inline theta_t new_theta(theta_t theta, float step, uint32_t index, uint32_t key,
                                const float *s) {
#if ROUNDS
  const float old = THETA_IN(theta);
#if RATE
  step = step + old * s[DECAY_RATE] * s[LR];
#endif
  return stochastic_bf16(old - step, random_high_bits(index, key));
#else
  (void)index, (void)key, (void)s;
  return theta - step;
#endif
}

#if !EIGHT_BIT

#if M == BF16
typedef uint16_t m_t;
#define M_IN(x) from_bf16(x)
#define M_OUT(x, i, key) stochastic_bf16((x), random_high_bits((i), (key)))
#else
typedef float m_t;
#define M_IN(x) (x)
#define M_OUT(x, i, key) (x)
#endif
#if V == BF16
typedef uint16_t v_t;
#define V_IN(x) from_bf16(x)
#define V_OUT(x, i, key) stochastic_bf16((x), random_high_bits((i), (key)))
#else
typedef float v_t;
#define V_IN(x) (x)
#define V_OUT(x, i, key) (x)
#endif
#if V_MAX == BF16
typedef uint16_t v_max_t;
#define V_MAX_IN(x) from_bf16(x)
#define V_MAX_OUT(x, i, key) stochastic_bf16((x), random_high_bits((i), (key)))
#else
typedef float v_max_t;
#define V_MAX_IN(x) (x)
#define V_MAX_OUT(x, i, key) (x)
#endif

/* One row of `length` elements, the first at position `first` of its variable,
   with its four stream keys `key`: theta and the moments read from `*_in`
   (the same addresses where the step writes in place). */
INLINE void row_step(int32_t length, theta_t *theta, const gradient_t *gradient, m_t *m,
                     v_t *v, v_max_t *v_max, const theta_t *theta_in, const m_t *m_in,
                     const v_t *v_in, const v_max_t *v_max_in, const uint32_t *key,
                     uint32_t first, const float *s) {
  (void)v_max, (void)v_max_in;
  if (theta_in != theta) {
    PREFETCH(theta_in, length * sizeof(theta_t), 0);
    PREFETCH(m_in, length * sizeof(m_t), 0);
    PREFETCH(v_in, length * sizeof(v_t), 0);
#if V_MAX
    PREFETCH(v_max_in, length * sizeof(v_max_t), 0);
#endif
  }
  PREFETCH(theta, length * sizeof(theta_t), 1);
  PREFETCH(gradient, length * sizeof(gradient_t), 0);
  PREFETCH(m, length * sizeof(m_t), 1);
  PREFETCH(v, length * sizeof(v_t), 1);
#if V_MAX
  PREFETCH(v_max, length * sizeof(v_max_t), 1);
#endif
  /* A 32-bit j: each element's position is then one 32-bit vector add, not
     64-bit ones narrowed (some 14 instructions of 200 for 16 elements). */
#pragma omp simd
  for (int32_t j = 0; j < length; j++) {
    const uint32_t index = first + (uint32_t)j;
    float m_j = M_IN(m_in[j]), v_j = V_IN(v_in[j]), v_max_j = 0.0f;
#if V_MAX
    v_max_j = V_MAX_IN(v_max_in[j]);
#endif
    const float step = rule(GRADIENT_IN(gradient[j]), &m_j, &v_j, &v_max_j, s);
    m[j] = M_OUT(m_j, index, key[1]);
    v[j] = V_OUT(v_j, index, key[2]);
#if V_MAX
    v_max[j] = V_MAX_OUT(v_max_j, index, key[3]);
#endif
    theta[j] = new_theta(theta_in[j], step, index, key[0], s);
  }
}

/* `size` elements in rows of `length`; `keys` holds each row's four stream
   keys and `firsts` each row's first element's position in its own variable. */
void keras_adam_rows(int64_t size, int64_t length, theta_t *theta, const gradient_t *gradient,
                     m_t *m, v_t *v, v_max_t *v_max, const int32_t *keys,
                     const int32_t *firsts, const float *s, int threads) {
  const int64_t rows = size / length;
  (void)v_max;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t row = 0; row < rows; row++) {
    /* (a row of over 2^30 elements in pieces: row_step counts in 32 bits) */
    for (int64_t start = row * length; start < (row + 1) * length; start += PIECE) {
      const int32_t n = (int32_t)((row + 1) * length - start < PIECE
                                  ? (row + 1) * length - start : PIECE);
      v_max_t *v_max_row = V_MAX ? v_max + start : v_max;
      row_step(n, theta + start, gradient + start, m + start, v + start, v_max_row,
               theta + start, m + start, v + start, v_max_row,
               (const uint32_t *)keys + 4 * row,
               (uint32_t)firsts[row] + (uint32_t)(start - row * length), s);
    }
  }
}

/* `count` variables where they lie (no copy into one buffer): variable k has
   sizes[k] elements and its tensors' addresses at pointers[5 k ...] (theta,
   gradient, m, v, v_max), and its four stream keys at row offsets[k] of
   `keys`; its elements are one row, each at its position in the variable
   (its rows one after another). Theta and the moments are read from
   `sources`, in the same order (its gradients' places unused), or, where it
   is NULL, from `pointers` (in place). Returns 0, having written nothing,
   where the units' table (8 bytes a variable) cannot be allocated; else 1. */
int keras_adam_rows_many(int64_t count, const int64_t *sizes, int64_t length,
                         void *const *pointers, void *const *sources, const int32_t *keys,
                         const int64_t *offsets, const float *s, int threads) {
  (void)length;
  int64_t *units = first_units(count, sizes, CHUNK);
  if (!units) return 0;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t u = 0; u < units[count]; u++) {
    const int64_t k = owner(units, count, u);
    void *const *p = pointers + 5 * k, *const *q = (sources ? sources : pointers) + 5 * k;
    const int64_t start = (u - units[k]) * CHUNK;
    const int64_t n = sizes[k] - start < CHUNK ? sizes[k] - start : CHUNK;
    row_step((int32_t)n, (theta_t *)p[0] + start, (const gradient_t *)p[1] + start,
             (m_t *)p[2] + start, (v_t *)p[3] + start,
             V_MAX ? (v_max_t *)p[4] + start : (v_max_t *)p[4],
             (const theta_t *)q[0] + start, (const m_t *)q[2] + start,
             (const v_t *)q[3] + start,
             V_MAX ? (const v_max_t *)q[4] + start : (const v_max_t *)q[4],
             (const uint32_t *)keys + 4 * offsets[k], (uint32_t)start, s);
  }
  free(units);
  return 1;
}

#else /* EIGHT_BIT */

/* keras_adam._quantize's tables as their float32 formulas. */
static const float M_UNIT = (float)(1.0 / (127.0 * 127.0));
static const float V_UNIT = (float)(1.0 / (255.0 * 255.0));

static inline float m_table(int8_t code) {
  const float j = (float)code;
  const float half = j * fabsf(j) * M_UNIT;
  return half * fabsf(half);
}

static inline float v_table(uint8_t code) {
  const float k = (float)code;
  const float square = k * k * V_UNIT;
  const float fourth = square * square;
  return fourth * fourth;
}

/* One over a block's scale, 1 where it is not positive (keras_adam._quantize). */
static inline float inverse(float scale) { return 1.0f / (scale > 0.0f ? scale : 1.0f); }

/* The codes; a NaN moment (its block's scale NaN too) is written as code 0,
   since C leaves NaN's conversion to an integer undefined. */
static inline int8_t m_code(float x, float inverse_scale) {
  const float j = rintf(sqrtf(sqrtf(fabsf(x) * inverse_scale)) * 127.0f);
  return (int8_t)(j == j ? (x < 0.0f ? -j : j) : 0.0f);
}

static inline uint8_t v_code(float x, float inverse_scale) {
  const float k = rintf(sqrtf(sqrtf(sqrtf(fabsf(x) * inverse_scale))) * 255.0f);
  return (uint8_t)(k == k ? k : 0.0f);
}

/* A block's absmax as torch.amax and NumPy's amax find it: NaN if any element is NaN
   (XLA's maximum on a CPU passes over NaN: a NaN moment poisons its block here). */
static inline float absmax(const float *values, int64_t count) {
  float largest = 0.0f;
  int nan = 0;
#pragma omp simd reduction(max : largest) reduction(| : nan)
  for (int64_t j = 0; j < count; j++) {
    const float a = fabsf(values[j]);
    largest = a > largest ? a : largest;
    nan |= a != a;
  }
  return nan ? NAN : largest;
}

/* A block's tensors at one place: theta, the gradient, then each slot's codes
   and scale (keras_adam_blocks_many's order). */
typedef struct {
  theta_t *theta;
  const gradient_t *gradient;
  int8_t *m;
  float *m_scale;
  uint8_t *v;
  float *v_scale;
  uint8_t *v_max;
  float *v_max_scale;
} block_t;

/* Variable k's block `row` of `length` elements in the pointers' table
   (8 addresses a variable). */
static inline block_t block_at(void *const *p, int64_t row, int64_t length) {
  const int64_t start = row * length;
  block_t b = {(theta_t *)p[0] + start, (const gradient_t *)p[1] + start,
               (int8_t *)p[2] + start, (float *)p[3] + row, (uint8_t *)p[4] + start,
               (float *)p[5] + row, V_MAX ? (uint8_t *)p[6] + start : (uint8_t *)p[6],
               V_MAX ? (float *)p[7] + row : (float *)p[7]};
  return b;
}

/* The 8-bit loops run over whole multiples of LANES elements: a block's last
   few (250 = 192 + 58) in copies padded to LANES. GCC vectorizes a loop
   that reads 8-bit codes in as many elements as a vector holds codes (64
   with 512-bit vectors, 32 with 256) and leaves the rest to a scalar
   loop, where each element's chain of roots and a division waits on the
   last: in blocks of 250 that remainder took 60% of the step's time (one
   thread of a 2-core AMD EPYC with AVX-512, 4 x 2000 x 2000: 34 ms a step,
   18 ms with the padded copies). */
#define LANES 64

/* The 8-bit loops' threads take blocks CLAIM at a time, as each is free, not
   an equal share each: the loop is bound by arithmetic, and where one core
   is slower than the other (a cloud machine's cores shared with another's
   work) an equal share waits for the slower one. On a 2-core AMD EPYC
   whose cores ran unevenly (4 variables of 4 million elements: one thread
   19-22 ms a step, two 13-17 ms), the builds alternating in one process:
   13.5-15.1 ms with claims against 15.6-16.7 with equal shares; claims of 16 blocks were no faster
   than equal shares, claims of 256 as fast as of 64. The element-wise
   loops, bound by memory, keep equal shares. */
#define CLAIM 64

/* Decoded, the rule, theta written: `count` elements (a multiple of LANES),
   the first at position `first` of its variable, from the codes m_in,
   v_in, v_max_in and their blocks' scales; the new moments into m_new,
   v_new, v_max_new. */
INLINE void decoded_step(int32_t count, theta_t *theta, const theta_t *theta_in,
                         const gradient_t *gradient, const int8_t *m_in, const uint8_t *v_in,
                         const uint8_t *v_max_in, float m_s, float v_s, float v_max_s,
                         uint32_t key, uint32_t first, const float *s, float *m_new,
                         float *v_new, float *v_max_new) {
  (void)v_max_in, (void)v_max_s, (void)v_max_new;
#pragma omp simd  /* (j in 32 bits, as in row_step; a block has at most 4096) */
  for (int32_t j = 0; j < count; j++) {
    float m_j = m_table(m_in[j]) * m_s, v_j = v_table(v_in[j]) * v_s, v_max_j = 0.0f;
#if V_MAX
    v_max_j = v_table(v_max_in[j]) * v_max_s;
#endif
#if BOUND
    const float floor = m_j * m_j / s[MOMENT_BOUND];
    v_j = maximum(v_j, floor);
#if V_MAX
    v_max_j = maximum(v_max_j, floor);
#endif
#endif
    const float step = rule(GRADIENT_IN(gradient[j]), &m_j, &v_j, &v_max_j, s);
    m_new[j] = m_j;
    v_new[j] = v_j;
#if V_MAX
    v_max_new[j] = v_max_j;
#endif
    theta[j] = new_theta(theta_in[j], step, first + (uint32_t)j, key, s);
  }
}

/* The codes of `count` moments (a multiple of LANES). */
INLINE void m_codes(int32_t count, const float *values, float inverse_scale, int8_t *codes) {
#pragma omp simd
  for (int32_t j = 0; j < count; j++) codes[j] = m_code(values[j], inverse_scale);
}

INLINE void v_codes(int32_t count, const float *values, float inverse_scale, uint8_t *codes) {
#pragma omp simd
  for (int32_t j = 0; j < count; j++) codes[j] = v_code(values[j], inverse_scale);
}

/* One block of `length` elements (a row), the first at position `first` of its
   variable, theta drawn from stream key `key`, written into `out` from theta
   and the codes and scales of `in` (the same block where the step writes
   in place) and the gradient of `out`; m_new, v_new and v_max_new hold
   `length` rounded up to LANES floats for the new moments before they are
   encoded. */
INLINE void block_step(int64_t length, block_t out, block_t in, uint32_t key, uint32_t first,
                       const float *s, float *m_new, float *v_new, float *v_max_new) {
  (void)v_max_new;
  if (in.theta != out.theta) {
    PREFETCH(in.theta, length * sizeof(theta_t), 0);
    PREFETCH(in.m, length, 0);
    PREFETCH(in.v, length, 0);
#if V_MAX
    PREFETCH(in.v_max, length, 0);
#endif
  }
  PREFETCH(out.theta, length * sizeof(theta_t), 1);
  PREFETCH(out.gradient, length * sizeof(gradient_t), 0);
  PREFETCH(out.m, length, 1);
  PREFETCH(out.v, length, 1);
#if V_MAX
  PREFETCH(out.v_max, length, 1);
#endif
  const float m_s = *in.m_scale, v_s = *in.v_scale, v_max_s = V_MAX ? *in.v_max_scale : 0.0f;
  const int32_t whole = (int32_t)length & -LANES, left = (int32_t)length - whole;
  const int32_t padded = whole + (left ? LANES : 0);
  decoded_step(whole, out.theta, in.theta, out.gradient, in.m, in.v, in.v_max, m_s, v_s,
               v_max_s, key, first, s, m_new, v_new, v_max_new);
  if (left) {
    /* The copies' other lanes hold zeros; their moments are set to 0 below. */
    theta_t theta[LANES] = {0}, theta_in[LANES] = {0};
    gradient_t gradient[LANES] = {0};
    int8_t m_in[LANES] = {0};
    uint8_t v_in[LANES] = {0}, v_max_in[LANES] = {0};
    memcpy(theta_in, in.theta + whole, left * sizeof(theta_t));
    memcpy(gradient, out.gradient + whole, left * sizeof(gradient_t));
    memcpy(m_in, in.m + whole, left);
    memcpy(v_in, in.v + whole, left);
#if V_MAX
    memcpy(v_max_in, in.v_max + whole, left);
#endif
    decoded_step(LANES, theta, theta_in, gradient, m_in, v_in, v_max_in, m_s, v_s, v_max_s,
                 key, first + (uint32_t)whole, s, m_new + whole, v_new + whole,
                 v_max_new + whole);
    memcpy(out.theta + whole, theta, left * sizeof(theta_t));
    /* 0 past the block's end, whatever the scalars (a NaN or infinite one):
       the absmax of all `padded` is then the block's own. */
    memset(m_new + length, 0, (padded - length) * sizeof(float));
    memset(v_new + length, 0, (padded - length) * sizeof(float));
#if V_MAX
    memset(v_max_new + length, 0, (padded - length) * sizeof(float));
#endif
  }
  *out.m_scale = absmax(m_new, padded);
  *out.v_scale = absmax(v_new, padded);
  const float m_inverse = inverse(*out.m_scale), v_inverse = inverse(*out.v_scale);
  int8_t m_left[LANES];
  uint8_t v_left[LANES];
  m_codes(whole, m_new, m_inverse, out.m);
  v_codes(whole, v_new, v_inverse, out.v);
  if (left) {
    m_codes(LANES, m_new + whole, m_inverse, m_left);
    v_codes(LANES, v_new + whole, v_inverse, v_left);
    memcpy(out.m + whole, m_left, left);
    memcpy(out.v + whole, v_left, left);
  }
#if V_MAX
  *out.v_max_scale = absmax(v_max_new, padded);
  const float v_max_inverse = inverse(*out.v_max_scale);
  v_codes(whole, v_max_new, v_max_inverse, out.v_max);
  if (left) {
    v_codes(LANES, v_max_new + whole, v_max_inverse, v_left);
    memcpy(out.v_max + whole, v_left, left);
  }
#endif
}

/* `size` elements in blocks of `length`, one per row, each with its scale
   (`*_scale`); keys and firsts as for the element-wise loop, or NULL where
   nothing is written with stochastic rounding. */
void keras_adam_blocks(int64_t size, int64_t length, theta_t *theta,
                       const gradient_t *gradient, int8_t *m, float *m_scale, uint8_t *v,
                       float *v_scale, uint8_t *v_max, float *v_max_scale,
                       const int32_t *keys, const int32_t *firsts, const float *s,
                       int threads) {
  const int64_t rows = size / length;
#pragma omp parallel num_threads(threads)
  {
    float m_new[(length + LANES - 1) & -LANES], v_new[(length + LANES - 1) & -LANES],
        v_max_new[(length + LANES - 1) & -LANES];
    void *const p[8] = {theta, (void *)gradient, m, m_scale, v, v_scale, v_max, v_max_scale};
#pragma omp for schedule(dynamic, CLAIM)
    for (int64_t row = 0; row < rows; row++) {
      const block_t block = block_at(p, row, length);
      block_step(length, block, block, keys ? (uint32_t)keys[4 * row] : 0u,
                 firsts ? (uint32_t)firsts[row] : 0u, s, m_new, v_new, v_max_new);
    }
  }
}

/* `count` variables in blocks of `length` where they lie: variable k has
   sizes[k] elements and its tensors' addresses at pointers[8 k ...] (theta,
   gradient, m, m's scales, v, v's scales, v_max, v_max's scales); keys and
   offsets as for keras_adam_rows_many, or keys NULL where nothing is
   written with stochastic rounding; `sources` as for keras_adam_rows_many.
   Returns as keras_adam_rows_many. */
int keras_adam_blocks_many(int64_t count, const int64_t *sizes, int64_t length,
                           void *const *pointers, void *const *sources, const int32_t *keys,
                           const int64_t *offsets, const float *s, int threads) {
  int64_t *units = first_units(count, sizes, length);
  if (!units) return 0;
#pragma omp parallel num_threads(threads)
  {
    float m_new[(length + LANES - 1) & -LANES], v_new[(length + LANES - 1) & -LANES],
        v_max_new[(length + LANES - 1) & -LANES];
#pragma omp for schedule(dynamic, CLAIM)
    for (int64_t u = 0; u < units[count]; u++) {
      const int64_t k = owner(units, count, u);
      const int64_t row = u - units[k];
      block_step(length, block_at(pointers + 8 * k, row, length),
                 block_at((sources ? sources : pointers) + 8 * k, row, length),
                 keys ? (uint32_t)keys[4 * offsets[k]] : 0u, (uint32_t)(row * length), s,
                 m_new, v_new, v_max_new);
    }
  }
  free(units);
  return 1;
}

#endif /* EIGHT_BIT */
