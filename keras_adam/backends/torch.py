"""PyTorch's fused multi-tensor Adam kernel, used for all eligible variables at once.

`torch._fused_adam_` updates lists of params, exp_avgs (m), exp_avg_sqs (v)
and max_exp_avg_sqs (v_max) in one call. For each element, with the step
count t it is given and weight_decay = 0:

    m <- m + (g - m) * (1 - beta_1)          (= beta_1 * m + (1 - beta_1) * g)
    v <- beta_2 * v + (1 - beta_2) * g^2
    [v_max <- max(v_max, v), used as v below]
    theta <- theta - lr / (1 - beta_1^t) * m / (sqrt(v) / sqrt(1 - beta_2^t) + eps)

That is our rule with epsilon_placement="paper". For "hat",
D = (sqrt(v) + eps) / sqrt(c2) = sqrt(v) / sqrt(c2) + eps / sqrt(c2), so the
same kernel with eps' = eps / sqrt(c2) is exact. Without bias correction,
t = 2^40 makes beta^t = 0 in double precision for every beta < 1 - 1e-11, so
c1 = c2 = 1. The kernel takes the betas as Python floats (double), so unlike
TensorFlow's kernel it forms 1 - beta_2 exactly. It has no Nesterov option:
those variables use the portable path. Decoupled weight decay is applied by
Keras before this step, so the kernel's own is 0.
"""

import math

import torch
from keras import ops

from keras_adam import backends

# beta^(2^40) underflows to 0 in double for beta < 1 - 1e-11.
_NO_BIAS_CORRECTION_STEP = 2.0**40


def eligible(optimizer, variable):
    # Under torch.compile (Keras's jit_compile=True on torch) the in-place
    # multi-tensor kernel fails Inductor's functionalization; the compiler
    # fuses the portable ops itself, so those steps take the portable path.
    return (
        not optimizer.nesterov
        and optimizer.epsilon > 0
        and not torch.compiler.is_compiling()
        and backends.unsupported_dtype_reason(variable, optimizer.moment_dtype) is None
    )


def fused_update(optimizer, grads, variables, learning_rate):
    """One fused Adam step on `variables` (all eligible, see `eligible`)."""
    t = int(ops.convert_to_numpy(optimizer.iterations)) + 1
    if optimizer.bias_correction:
        c2 = -math.expm1(t * math.log(optimizer.beta_2)) if optimizer.beta_2 > 0 else 1.0
        step = float(t)
    else:
        c2, step = 1.0, _NO_BIAS_CORRECTION_STEP
    epsilon = optimizer.epsilon
    if optimizer.epsilon_placement == "hat":
        epsilon = epsilon / math.sqrt(c2)
    lr = float(ops.convert_to_numpy(learning_rate))

    groups = {}
    for g, variable in zip(grads, variables):
        param = variable.value
        m, v, v_max = optimizer.slots(variable)
        group = groups.setdefault((param.device, param.dtype), ([], [], [], [], []))
        group[0].append(param)
        group[1].append(g.to(param.dtype).contiguous())
        group[2].append(m.value)
        group[3].append(v.value)
        if v_max is not None:
            group[4].append(v_max.value)
    with torch.no_grad():
        for (device, _), (params, gs, ms, vs, v_maxes) in groups.items():
            steps = [torch.tensor(step, dtype=torch.float32, device=device)] * len(params)
            torch._fused_adam_(
                params, gs, ms, vs, v_maxes, steps,
                lr=lr, beta1=optimizer.beta_1, beta2=optimizer.beta_2,
                weight_decay=0.0, eps=epsilon, amsgrad=optimizer.amsgrad, maximize=False,
            )
