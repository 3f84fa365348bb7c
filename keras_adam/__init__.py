"""keras_adam: Kingma & Ba's Adam for Keras 3.

Public API: `Adam`, `AdamW`, `LazyAdam`, `from_keras`, `to_keras`,
`layerwise_decay` (groups for layer-wise learning-rate decay), `__version__`.
The float64 NumPy oracle is `keras_adam.reference`; diagnostics are in
`keras_adam.callbacks` (`AdamMonitor`).
"""

from keras_adam import callbacks
from keras_adam._groups import layerwise_decay
from keras_adam.migration import from_keras, to_keras
from keras_adam.optimizer import Adam, AdamW, LazyAdam

__version__ = "0.2.0"

__all__ = ["Adam", "AdamW", "LazyAdam", "callbacks", "from_keras", "to_keras",
           "layerwise_decay", "__version__"]
