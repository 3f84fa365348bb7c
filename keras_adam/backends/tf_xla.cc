// One variable's Adam step as rows.c's loop inside the programs that XLA
// compiles for TensorFlow on a CPU (keras_adam/backends/tf_rows.py compiles
// this file against TensorFlow's headers once per TensorFlow and compiler,
// and keeps it in the cache directory, libraries.py: XLA's headers take
// about a minute).
//
// KerasAdamStepValues(scalars, keys, gradient, written) -> results is a pure
// op that only XLA compiles (it has no kernel of its own): one HLO
// custom-call "keras_adam_step" (Step, below), whose results alias the tensors
// written (theta, then the moments' tensors in rows.c's order), so that
// where those are the variables' buffers, given up for their new values,
// the step writes them in place, one pass over each row or block.
// `scalars` (float32[10]) and `keys` (int32[4]) are those of tf_rows.cc's
// KerasAdamStep. `configuration`: the integers version, elements, 8-bit block
// length, threads, then the loop's layout (rows.py's macros' values),
// separated by spaces: the custom call's opaque text.

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "absl/strings/str_join.h"
#include "tensorflow/compiler/tf2xla/xla_op_kernel.h"
#include "tensorflow/compiler/tf2xla/xla_op_registry.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "xla/hlo/builder/xla_builder.h"
#include "xla/layout_util.h"
#include "xla/service/custom_call_status_internal.h"
#include "xla/service/custom_call_target_registry.h"
#include "xla/shape_util.h"
#include "tf_loops.h"

namespace {

using keras_adam::every_thread_lock;
using keras_adam::kLongestBlock;
using keras_adam::kOneThreadBelow;
using keras_adam::kVersion;
using keras_adam::Loop;
using keras_adam::registered;

// The integers of a configuration, in order.
std::vector<int64_t> Parse(const std::string &text) {
  std::vector<int64_t> values;
  const char *at = text.c_str();
  char *end = nullptr;
  for (long long value = std::strtoll(at, &end, 10); end != at;
       value = std::strtoll(at, &end, 10)) {
    values.push_back(value);
    at = end;
  }
  return values;
}

// XLA's failure of a custom call: the status's message (the exported
// XlaCustomCallStatusSetFailure is not in TensorFlow's libraries' symbols).
void Fail(XlaCustomCallStatus *status, const std::string &message) {
  status->message = message;
}

void Step(void *out, const void **in, const char *opaque, size_t opaque_length,
          XlaCustomCallStatus *status) {
  const std::string text(opaque, opaque_length);
  const std::vector<int64_t> values = Parse(text);
  // (The op's kernel checked the configuration against the program's
  // arguments when XLA compiled it.)
  if (values.size() != 4 + 11 || values[0] != kVersion) {
    Fail(status, "keras_adam_step: a program of another keras_adam (its configuration \"" +
                     text + "\")");
    return;
  }
  const int64_t size = values[1], length = values[2];
  const std::vector<int64_t> layout(values.begin() + 4, values.end());
  const Loop loop = registered(layout);
  if (loop == nullptr) {
    Fail(status, "keras_adam_step: keras_adam has not compiled its loop for layout [" +
                     absl::StrJoin(layout, ",") +
                     "] in this process: run one step of an optimizer with the same options "
                     "under XLA here first");
    return;
  }
  const bool eight_bit = layout[0] != 0;
  int written = 1;
  for (int slot = 3; slot < 6; slot++) written += layout[slot] == 0 ? 0 : (eight_bit ? 2 : 1);
  // rows.c's order: theta, the gradient, then the moments' tensors.
  void *pointers[8] = {nullptr}, *sources[8] = {nullptr};
  void **results = static_cast<void **>(out);
  pointers[1] = sources[1] = const_cast<void *>(in[2]);
  for (int i = 0; i < written; i++) {
    pointers[i == 0 ? 0 : i + 1] = results[i];
    sources[i == 0 ? 0 : i + 1] = const_cast<void *>(in[3 + i]);
  }
  if (size == 0) return;
  int64_t sizes = size, offset = 0;
  const int threads = size < kOneThreadBelow ? 1 : static_cast<int>(values[3]);
  std::unique_lock<std::mutex> alone(every_thread_lock, std::defer_lock);
  if (threads > 1) alone.lock();
  if (!loop(1, &sizes, length, pointers, sources, static_cast<const int32_t *>(in[1]), &offset,
            static_cast<const float *>(in[0]), threads))
    Fail(status, "keras_adam_step: out of memory");
}

// The element type of rows.py's dtype code (1: float32, 2: bfloat16).
xla::PrimitiveType Element(int64_t code) { return code == 2 ? xla::BF16 : xla::F32; }

class KerasAdamStepValuesOp : public tensorflow::XlaOpKernel {
 public:
  explicit KerasAdamStepValuesOp(tensorflow::OpKernelConstruction *c) : XlaOpKernel(c) {
    OP_REQUIRES_OK(c, c->GetAttr("configuration", &configuration_));
  }

  void Compile(tensorflow::XlaOpKernelContext *ctx) override {
    const int n = ctx->num_inputs();
    std::vector<xla::XlaOp> operands(n);
    std::vector<xla::Shape> shapes(n);
    for (int i = 0; i < n; i++) {
      operands[i] = ctx->Input(i);
      auto shape = ctx->InputXlaShape(i);
      OP_REQUIRES_OK(ctx, shape.status());
      shapes[i] = *shape;
      xla::LayoutUtil::SetToDefaultLayout(&shapes[i]);  // (row-major, as the loop reads)
    }
    // What the configuration says must be what the program gives: the loop
    // trusts it (a graph loaded from elsewhere fails here, compiling).
    const std::vector<int64_t> values = Parse(configuration_);
    OP_REQUIRES(ctx, values.size() == 4 + 11 && values[0] == kVersion,
                tensorflow::errors::FailedPrecondition(
                    "KerasAdamStepValues: a program of another keras_adam (configuration \"",
                    configuration_, "\"; this keras_adam's version is ", kVersion, ")"));
    const int64_t size = values[1], length = values[2];
    const std::vector<int64_t> layout(values.begin() + 4, values.end());
    const bool eight_bit = layout[0] != 0;
    std::vector<std::pair<xla::PrimitiveType, int64_t>> wanted = {
        {xla::F32, 10}, {xla::S32, 4}, {Element(layout[2]), size}, {Element(layout[1]), size}};
    for (int slot = 3; slot < 6; slot++) {
      if (layout[slot] == 0) continue;
      if (eight_bit) {
        wanted.push_back({slot == 3 ? xla::S8 : xla::U8, size});
        wanted.push_back({xla::F32, length > 0 ? size / length : -1});
      } else {
        wanted.push_back({Element(layout[slot]), size});
      }
    }
    OP_REQUIRES(ctx, values[3] >= 1 && (!eight_bit || (length >= 1 && length <= kLongestBlock &&
                                                       size % length == 0)),
                tensorflow::errors::InvalidArgument(
                    "KerasAdamStepValues: threads ", values[3], " and 8-bit blocks of ", length,
                    " elements (1 to ", kLongestBlock, ", dividing ", size, ")"));
    OP_REQUIRES(ctx, static_cast<int>(wanted.size()) == n,
                tensorflow::errors::InvalidArgument("KerasAdamStepValues: ", n - 3,
                                                    " tensors written; the layout has ",
                                                    wanted.size() - 3));
    for (int i = 0; i < n; i++) {
      OP_REQUIRES(ctx, shapes[i].IsArray() && shapes[i].element_type() == wanted[i].first &&
                           xla::ShapeUtil::ElementsIn(shapes[i]) == wanted[i].second,
                  tensorflow::errors::InvalidArgument(
                      "KerasAdamStepValues: argument ", i, " is ",
                      xla::ShapeUtil::HumanString(shapes[i]), "; the configuration needs ",
                      wanted[i].second, " elements of ",
                      xla::PrimitiveType_Name(wanted[i].first)));
    }
    std::vector<xla::Shape> results(shapes.begin() + 3, shapes.end());
    std::vector<std::pair<xla::ShapeIndex, std::pair<int64_t, xla::ShapeIndex>>> aliasing;
    for (int i = 0; i < n - 3; i++) aliasing.push_back({{i}, {3 + i, {}}});
    xla::XlaOp call = xla::CustomCallWithLayout(
        ctx->builder(), "keras_adam_step", operands, xla::ShapeUtil::MakeTupleShape(results),
        shapes, configuration_, /*has_side_effect=*/false, aliasing, /*literal=*/nullptr,
        xla::CustomCallSchedule::SCHEDULE_NONE,
        xla::CustomCallApiVersion::API_VERSION_STATUS_RETURNING_UNIFIED);
    for (int i = 0; i < n - 3; i++) ctx->SetOutput(i, xla::GetTupleElement(call, i));
  }

 private:
  std::string configuration_;
};

}  // namespace

REGISTER_OP("KerasAdamStepValues")
    .Input("scalars: float")
    .Input("keys: int32")
    .Input("gradient: T")
    .Input("written: W")
    .Output("results: W")
    .Attr("T: {float, bfloat16}")
    .Attr("W: list(type)")
    .Attr("configuration: string")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext *c) {
      for (int i = 0; i < c->num_outputs(); i++) c->set_output(i, c->input(3 + i));
      return absl::OkStatus();
    });

REGISTER_XLA_OP(Name("KerasAdamStepValues").Device(tensorflow::DEVICE_CPU_XLA_JIT),
                KerasAdamStepValuesOp);

// Registers Step with XLA as the host's custom call "keras_adam_step", and the
// op's kernel for XLA's CPU device.
extern "C" void keras_adam_xla_register() {
  xla::CustomCallTargetRegistry::Global()->Register(
      "keras_adam_step", reinterpret_cast<void *>(&Step), "Host");
  // XLA's devices' kernels are made once per process from the ops registered
  // for XLA by then: where that was done before this library was loaded (as
  // TensorFlow does when it starts), the op's kernel is registered here.
  tensorflow::XlaOpRegistry::RegisterCompilationKernels();
  if (tensorflow::KernelsRegisteredForOp("KerasAdamStepValues")
          .find(tensorflow::DEVICE_CPU_XLA_JIT) == std::string::npos) {
    static tensorflow::kernel_factory::OpKernelRegistrar registrar(
        tensorflow::KernelDefBuilder("KerasAdamStepValues")
            .Device(tensorflow::DEVICE_CPU_XLA_JIT)
            .Build(),
        "KerasAdamStepValuesOp",
        [](tensorflow::OpKernelConstruction *c) -> tensorflow::OpKernel * {
          return new KerasAdamStepValuesOp(c);
        });
  }
}

// Registers rows.c's loop `loop` for the layout of `count` values.
extern "C" void keras_adam_xla_register_loop(const int64_t *layout, int64_t count, void *loop) {
  keras_adam::register_loop(layout, count, loop);
}
