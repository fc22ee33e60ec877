"""The engines that turn a prompt into pieces of text: local PyTorch (one request at a
time, or continuous batching in an engine process), onnxruntime, a remote Triton."""
