"""The Keras 3 backend (TensorFlow, JAX and torch backends of Keras alike).

`core` walks models, detects and pins BN layers; `train` is what `compare` needs;
`deploy` is what `check` and `export` need; `files` checks `.keras` archives without
importing Keras. Importing this package imports no framework.
"""
