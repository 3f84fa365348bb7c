// What TensorFlow's two libraries of rows.c's loop have alike (tf_rows.cc's op
// and tf_xla.cc's custom call, each a library of its own and each with its
// own copy of these): the loops registered by layout, the constants of
// keras_adam's Python side, and the lock of the steps that take every thread.

#ifndef KERAS_ADAM_TF_LOOPS_H_
#define KERAS_ADAM_TF_LOOPS_H_

#include <cstdint>
#include <map>
#include <mutex>
#include <vector>

namespace keras_adam {

// rows.c's keras_adam_rows_many or keras_adam_blocks_many.
typedef int (*Loop)(int64_t, const int64_t *, int64_t, void *const *, void *const *,
                    const int32_t *, const int64_t *, const float *, int);

// The loops this library registered, by layout (rows.py's macros' values).
static std::mutex registry_lock;
static std::map<std::vector<int64_t>, Loop> *registry = new std::map<std::vector<int64_t>, Loop>;

static inline Loop registered(const std::vector<int64_t> &layout) {
  std::lock_guard<std::mutex> hold(registry_lock);
  auto found = registry->find(layout);
  return found == registry->end() ? nullptr : found->second;
}

static inline void register_loop(const int64_t *layout, int64_t count, void *loop) {
  std::lock_guard<std::mutex> hold(registry_lock);
  (*registry)[std::vector<int64_t>(layout, layout + count)] = reinterpret_cast<Loop>(loop);
}

// A variable of fewer elements is stepped by the calling thread alone (see
// jax_rows.cc: waking OpenMP's team costs more than it saves).
constexpr int64_t kOneThreadBelow = 1 << 16;

// Held by a step that takes every thread: TensorFlow and XLA run independent
// ops and calls at once, and those steps run one at a time rather than each
// with a team of its own sharing the cores.
static std::mutex every_thread_lock;

constexpr int64_t kVersion = 1;          // tf_rows.py's VERSION
constexpr int64_t kLongestBlock = 4096;  // rows.py's LONGEST_BLOCK

}  // namespace keras_adam

#endif  // KERAS_ADAM_TF_LOOPS_H_
