"""Build time: the zoo, torch builders, ONNX export, int8 quantisation and the model repository.

The only layer that needs torch (builders, export); the repository and the zoo are plain Python so
that the server can read them.
"""
