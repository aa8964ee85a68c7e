"""Built-in callback plugins, installed as `nnxtrain.plugins`.

Each is written exactly as a user's plugin would be: a `nnxtrain.Callback` subclass using
only the public API of `nnxtrain`.
"""
