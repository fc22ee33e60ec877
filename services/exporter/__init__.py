"""exporter: packages the chosen weights as a Hugging Face directory and a checked ONNX graph."""
