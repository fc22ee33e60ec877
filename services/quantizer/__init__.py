"""quantizer: weight-only quantization of the trained model, judged on held-out perplexity."""
