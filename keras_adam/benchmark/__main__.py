"""`python -m keras_adam.benchmark`: see `keras_adam.benchmark`."""

from keras_adam.benchmark.cli import main

main()
