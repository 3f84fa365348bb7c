// One variable's Adam step as rows.c's loop, as a TensorFlow op on a CPU
// (keras_adam/backends/tf_rows.py compiles this file once per process
// against TensorFlow's headers, and rows.c once per layout).
//
// KerasAdamStep(scalars, keys, gradient, written) updates in place the
// resource variables `written`: theta, then the moments' tensors (rows.c's
// order: each slot's codes and scales for 8-bit codes), as
// ResourceApplyAdam updates its variables. `scalars` is the loop's float32[10]
// (rows.c's order), `keys` the variable's four stream keys (zeros where
// nothing is rounded stochastically). Attributes: `layout`, the loop's
// layout (rows.py's macros' values), whose loop this process has compiled
// and registered (keras_adam_tf_register); `length`, an 8-bit block's
// elements; `threads`. A graph that holds the op (a saved training step)
// runs in another process once keras_adam has registered the same layout
// there; until then the op fails, naming the layout.

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "absl/strings/str_join.h"

namespace {

using namespace tensorflow;

// rows.c's keras_adam_rows_many or keras_adam_blocks_many.
typedef int (*Loop)(int64_t, const int64_t *, int64_t, void *const *, const int32_t *,
                    const int64_t *, const float *, int);

// The loops this process registered, by layout.
std::mutex registry_lock;
std::map<std::vector<int64_t>, Loop> *registry = new std::map<std::vector<int64_t>, Loop>;

Loop registered(const std::vector<int64_t> &layout) {
  std::lock_guard<std::mutex> hold(registry_lock);
  auto found = registry->find(layout);
  return found == registry->end() ? nullptr : found->second;
}

// A variable of fewer elements is stepped by the calling thread alone (see
// jax_rows.cc: waking OpenMP's team costs more than it saves).
constexpr int64_t kOneThreadBelow = 1 << 16;

class KerasAdamStepOp : public OpKernel {
 public:
  explicit KerasAdamStepOp(OpKernelConstruction *c) : OpKernel(c) {
    OP_REQUIRES_OK(c, c->GetAttr("layout", &layout_));
    OP_REQUIRES_OK(c, c->GetAttr("length", &length_));
    OP_REQUIRES_OK(c, c->GetAttr("threads", &threads_));
    OP_REQUIRES(c, threads_ > 0,
                errors::InvalidArgument("KerasAdamStep: threads ", threads_, " is not positive"));
  }

  void Compute(OpKernelContext *ctx) override {
    const Loop loop = registered(layout_);
    OP_REQUIRES(ctx, loop != nullptr,
                errors::FailedPrecondition(
                    "KerasAdamStep: keras_adam has not compiled its loop for layout [",
                    absl::StrJoin(layout_, ","), "] in this process: run one step of an "
                    "optimizer with the same options here first"));
    const int n = ctx->num_inputs() - 3;
    std::vector<core::RefCountPtr<Var>> vars(n);
    std::vector<Var *> order;
    for (int i = 0; i < n; i++) {
      OP_REQUIRES_OK(ctx, LookupResource(ctx, HandleFromInput(ctx, 3 + i), &vars[i]));
      order.push_back(vars[i].get());
    }
    // The variables' locks, in address order (as TensorFlow's training ops
    // take them), released on return.
    std::sort(order.begin(), order.end());
    order.erase(std::unique(order.begin(), order.end()), order.end());
    struct Locks {
      std::vector<tsl::mutex *> held;
      ~Locks() {
        for (auto *mu : held) mu->unlock();
      }
    } locks;
    for (Var *var : order) {
      var->mu()->lock();
      locks.held.push_back(var->mu());
    }
    const Tensor &gradient = ctx->input(2);
    void *pointers[8] = {nullptr};  // rows.c's order: theta, the gradient, the moments'
    pointers[1] = const_cast<char *>(gradient.tensor_data().data());
    for (int i = 0; i < n; i++) {
      Tensor *tensor = vars[i]->tensor();
      OP_REQUIRES(ctx, tensor->IsInitialized(),
                  errors::FailedPrecondition("KerasAdamStep: variable ", i, " is uninitialized"));
      // A buffer that a read still holds is copied before it is written, as
      // TensorFlow's training ops do (PrepareToUpdateVariable).
      if (vars[i]->copy_on_read_mode.load() || !tensor->RefCountIsOne()) {
        Tensor copy;
        OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensor->dtype(), tensor->shape(), &copy));
        std::memcpy(const_cast<char *>(copy.tensor_data().data()), tensor->tensor_data().data(),
                    tensor->TotalBytes());
        *tensor = copy;
      }
      pointers[i == 0 ? 0 : i + 1] = const_cast<char *>(tensor->tensor_data().data());
    }
    int64_t size = gradient.NumElements(), offset = 0;
    if (size == 0) return;
    const int threads = size < kOneThreadBelow ? 1 : static_cast<int>(threads_);
    OP_REQUIRES(ctx,
                loop(1, &size, length_, pointers, ctx->input(1).flat<int32>().data(), &offset,
                     ctx->input(0).flat<float>().data(), threads),
                errors::ResourceExhausted("KerasAdamStep: out of memory"));
  }

 private:
  std::vector<int64_t> layout_;
  int64_t length_, threads_;
};

}  // namespace

REGISTER_OP("KerasAdamStep")
    .Input("scalars: float")
    .Input("keys: int32")
    .Input("gradient: T")
    .Input("written: N * resource")
    .Attr("T: {float, bfloat16}")
    .Attr("N: int >= 3")
    .Attr("layout: list(int)")
    .Attr("length: int")
    .Attr("threads: int")
    .SetIsStateful()
    .SetShapeFn(tensorflow::shape_inference::NoOutputs);

REGISTER_KERNEL_BUILDER(Name("KerasAdamStep").Device(tensorflow::DEVICE_CPU), KerasAdamStepOp);

// Registers rows.c's loop `loop` for the layout of `count` values.
extern "C" void keras_adam_tf_register(const int64_t *layout, int64_t count, void *loop) {
  std::lock_guard<std::mutex> hold(registry_lock);
  (*registry)[std::vector<int64_t>(layout, layout + count)] = reinterpret_cast<Loop>(loop);
}
