"""Helper process: a SavedModel training step that holds keras_adam's C-loop op.

Not a test file: tests/test_backend_tensorflow_loop.py runs it in fresh
processes, since the op is registered per process.

    KERAS_BACKEND=tensorflow python tf_saved_step_run.py save DIR OUT.npy
    KERAS_BACKEND=tensorflow python tf_saved_step_run.py load|prepare-load DIR OUT.npy

`save` trains a model with 8-bit moments for 3 steps in a tf.function (the
op runs), saves the module, takes 2 more steps and writes the weights.
`load` loads the module and takes the same 2 steps; `prepare-load` first
runs one step of an optimizer with the same options on another variable
(which compiles the same layout). A load that fails writes nothing and
prints the error's first line.
"""

import sys

import keras
import numpy as np
import tensorflow as tf

import keras_adam

OPTIONS = dict(moment_dtype="8bit", min_8bit_size=1)
rng = np.random.default_rng(0)
X = rng.random((5, 64, 4)).astype("float32")
Y = rng.random((5, 64, 1)).astype("float32")


def main(mode, directory, out):
    if mode == "save":
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(32), keras.layers.Dense(1)])
        optimizer = keras_adam.Adam(**OPTIONS)

        class Trainer(tf.Module):
            def __init__(self):
                super().__init__()
                self.model, self.optimizer = model, optimizer

            @tf.function(input_signature=[tf.TensorSpec([None, 4]), tf.TensorSpec([None, 1])])
            def train(self, x, y):
                with tf.GradientTape() as tape:
                    loss = tf.reduce_mean(tf.square(self.model(x) - y))
                grads = tape.gradient(loss, self.model.trainable_variables)
                self.optimizer.apply(grads, self.model.trainable_variables)
                return loss

            @tf.function(input_signature=[])
            def weights(self):
                return [v.value for v in self.model.trainable_variables]

        trainer = Trainer()
        optimizer.build(model.trainable_variables)
        for step in range(3):
            trainer.train(X[step], Y[step])
        tf.saved_model.save(trainer, directory)
    else:
        if mode == "prepare-load":
            variable = keras.Variable(np.ones((8, 8)), dtype="float32")
            optimizer = keras_adam.Adam(**OPTIONS)
            tf.function(lambda: optimizer.apply([tf.ones((8, 8))], [variable]))()
        try:
            trainer = tf.saved_model.load(directory)
        except Exception as error:  # noqa: BLE001 (reported to the test)
            print("load failed:", str(error).splitlines()[0])
            return
    for step in range(3, 5):
        trainer.train(X[step], Y[step])
    np.save(out, np.concatenate([w.numpy().ravel() for w in trainer.weights()]))


if __name__ == "__main__":
    main(*sys.argv[1:])
