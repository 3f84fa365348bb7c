// One variable's Adam step as rows.c's loop, as a TensorFlow op on a CPU
// (keras_adam/backends/tf_rows.py compiles this file against TensorFlow's
// headers, and rows.c per layout, once per machine: libraries.py).
//
// KerasAdamStep(scalars, keys, gradient, written) updates in place the
// resource variables `written`: theta, then the moments' tensors (rows.c's
// order: each slot's codes and scales for 8-bit codes), as
// ResourceApplyAdam updates its variables. `scalars` is the loop's float32[10]
// (rows.c's order), `keys` the variable's four stream keys (zeros where
// nothing is rounded stochastically). Attributes: `version` (tf_rows.py's
// VERSION: what the layout, the inputs and the arithmetic mean), `layout`, the loop's
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
#include "tf_loops.h"

namespace {

using namespace tensorflow;

using keras_adam::every_thread_lock;
using keras_adam::kLongestBlock;
using keras_adam::kOneThreadBelow;
using keras_adam::kVersion;
using keras_adam::Loop;
using keras_adam::registered;

class KerasAdamStepOp : public OpKernel {
 public:
  explicit KerasAdamStepOp(OpKernelConstruction *c) : OpKernel(c) {
    int64_t version;
    OP_REQUIRES_OK(c, c->GetAttr("version", &version));
    OP_REQUIRES(c, version == kVersion,
                errors::FailedPrecondition("KerasAdamStep: a graph of version ", version,
                                           "; this keras_adam's op is version ", kVersion));
    OP_REQUIRES_OK(c, c->GetAttr("layout", &layout_));
    OP_REQUIRES_OK(c, c->GetAttr("length", &length_));
    OP_REQUIRES_OK(c, c->GetAttr("threads", &threads_));
    OP_REQUIRES(c, threads_ > 0,
                errors::InvalidArgument("KerasAdamStep: threads ", threads_, " is not positive"));
    // rows.py's MACROS: EIGHT_BIT, THETA, GRADIENT, M, V, V_MAX, then 5 options.
    OP_REQUIRES(c, layout_.size() == 11,
                errors::InvalidArgument("KerasAdamStep: a layout has 11 values"));
    eight_bit_ = layout_[0] != 0;
    OP_REQUIRES(c, !eight_bit_ || (length_ >= 1 && length_ <= kLongestBlock),
                errors::InvalidArgument("KerasAdamStep: 8-bit blocks of 1 to ", kLongestBlock,
                                        " elements, not ", length_));
    // The variables written, in rows.c's order after theta, and their dtypes.
    written_.push_back(Dtype(layout_[1]));
    for (int slot = 3; slot < 6; slot++) {
      if (layout_[slot] == 0) continue;
      if (eight_bit_) {
        written_.push_back(slot == 3 ? DT_INT8 : DT_UINT8);
        written_.push_back(DT_FLOAT);
      } else {
        written_.push_back(Dtype(layout_[slot]));
      }
    }
    OP_REQUIRES(c, c->num_inputs() == 3 + static_cast<int>(written_.size()) &&
                       written_.size() <= 7 && c->input_type(2) == Dtype(layout_[2]),
                errors::InvalidArgument("KerasAdamStep: the inputs do not match the layout"));
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
    const int64_t size = gradient.NumElements();
    OP_REQUIRES(ctx, ctx->input(0).NumElements() == 10 && ctx->input(1).NumElements() == 4,
                errors::InvalidArgument("KerasAdamStep: 10 scalars and 4 keys"));
    OP_REQUIRES(ctx, !eight_bit_ || size % length_ == 0,
                errors::InvalidArgument("KerasAdamStep: ", size, " elements in blocks of ",
                                        length_));
    void *pointers[8] = {nullptr};  // rows.c's order: theta, the gradient, the moments'
    pointers[1] = const_cast<char *>(gradient.tensor_data().data());
    for (int i = 0; i < n; i++) {
      Tensor *tensor = vars[i]->tensor();
      OP_REQUIRES(ctx, tensor->IsInitialized(),
                  errors::FailedPrecondition("KerasAdamStep: variable ", i, " is uninitialized"));
      // An 8-bit slot's scales: one per block; every other tensor: one per element.
      const bool scales = eight_bit_ && i % 2 == 0 && i > 0;
      OP_REQUIRES(ctx, tensor->dtype() == written_[i] &&
                           tensor->NumElements() == (scales ? size / length_ : size),
                  errors::InvalidArgument("KerasAdamStep: variable ", i, " is ",
                                          DataTypeString(tensor->dtype()), " of ",
                                          tensor->NumElements(), " elements; the layout needs ",
                                          DataTypeString(written_[i])));
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
    int64_t sizes = size, offset = 0;
    if (size == 0) return;
    const int threads = size < kOneThreadBelow ? 1 : static_cast<int>(threads_);
    std::unique_lock<std::mutex> alone(every_thread_lock, std::defer_lock);
    if (threads > 1) alone.lock();
    OP_REQUIRES(ctx,
                loop(1, &sizes, length_, pointers, nullptr, ctx->input(1).flat<int32>().data(),
                     &offset,
                     ctx->input(0).flat<float>().data(), threads),
                errors::ResourceExhausted("KerasAdamStep: out of memory"));
  }

 private:
  static DataType Dtype(int64_t code) { return code == 2 ? DT_BFLOAT16 : DT_FLOAT; }

  std::vector<int64_t> layout_;
  std::vector<DataType> written_;
  bool eight_bit_;
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
    .Attr("version: int")
    .Attr("layout: list(int)")
    .Attr("length: int")
    .Attr("threads: int")
    .SetIsStateful()
    .SetShapeFn(tensorflow::shape_inference::NoOutputs);

REGISTER_KERNEL_BUILDER(Name("KerasAdamStep").Device(tensorflow::DEVICE_CPU), KerasAdamStepOp);

// Registers rows.c's loop `loop` for the layout of `count` values.
extern "C" void keras_adam_tf_register(const int64_t *layout, int64_t count, void *loop) {
  keras_adam::register_loop(layout, count, loop);
}
