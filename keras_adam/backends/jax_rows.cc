// One variable's Adam step as rows.c's loop, called by XLA on a CPU through its
// foreign-function interface (keras_adam/backends/jax_rows.py compiles this
// file with rows.c for one layout and registers the handler).
//
// Arguments: the loop's scalars (float32[10], rows.c's order), the
// variable's four stream keys (int32[4]; zeros where nothing is rounded
// stochastically), the gradient, then the tensors the step writes: theta
// and the moments' (rows.c's order: each slot's codes and scales for 8-bit
// codes). Results: the same tensors written, each aliasing its argument,
// so that with donated buffers the step writes the variables' memory.
// Attribute `length`: an 8-bit block's elements (one block per row).

#include <omp.h>

#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// A variable of fewer elements is stepped by the calling thread alone: waking
// OpenMP's team for each call's tens of microseconds of work cost more than
// it saved
// (200 variables of 20,000 elements with bfloat16 moments: 1.3-1.5 times
// float32's step with every thread, 0.9-1.1 with one). 512 x 512 and larger
// take every thread.
#define ONE_THREAD_BELOW (1 << 16)

extern "C" {
int keras_adam_rows_many(int64_t count, const int64_t *sizes, int64_t length,
                         void *const *pointers, void *const *sources, const int32_t *keys,
                         const int64_t *offsets, const float *s, int threads);
int keras_adam_blocks_many(int64_t count, const int64_t *sizes, int64_t length,
                           void *const *pointers, void *const *sources, const int32_t *keys,
                           const int64_t *offsets, const float *s, int threads);
}

static ffi::Error Step(ffi::AnyBuffer scalars, ffi::AnyBuffer keys, ffi::AnyBuffer gradient,
                       ffi::RemainingArgs written, ffi::RemainingRets results, int64_t length) {
  // rows.c's addresses of one variable: theta, the gradient, then the moments'.
  void *pointers[8] = {nullptr};
  pointers[1] = gradient.untyped_data();
  if (written.size() != results.size() || written.size() > 7)
    return ffi::Error::InvalidArgument("keras_adam step: one result per tensor written");
  for (size_t i = 0; i < written.size(); i++) {
    auto in = written.get<ffi::AnyBuffer>(i);
    auto out = results.get<ffi::AnyBuffer>(i);
    if (!in.has_value() || !out.has_value())
      return ffi::Error::InvalidArgument("keras_adam step: a tensor is not a buffer");
    void *target = (*out)->untyped_data();
    // XLA gives each result its argument's buffer (the aliasing asked for);
    // where it did not, the step starts from a copy.
    if (target != in->untyped_data()) std::memcpy(target, in->untyped_data(), in->size_bytes());
    pointers[i == 0 ? 0 : i + 1] = target;
  }
  int64_t size = static_cast<int64_t>(gradient.element_count()), offset = 0;
  if (size == 0) return ffi::Error::Success();
  const int32_t *key = static_cast<const int32_t *>(keys.untyped_data());
  const float *s = static_cast<const float *>(scalars.untyped_data());
  const int threads = size < ONE_THREAD_BELOW ? 1 : omp_get_max_threads();
#if EIGHT_BIT
  const int done = keras_adam_blocks_many(1, &size, length, pointers, nullptr, key, &offset, s,
                                          threads);
#else
  const int done = keras_adam_rows_many(1, &size, length, pointers, nullptr, key, &offset, s,
                                        threads);
#endif
  if (!done) return ffi::Error::Internal("keras_adam step: out of memory");
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(keras_adam_step, Step,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("length"));
