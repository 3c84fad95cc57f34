"""Running and measuring outputs: transformers models that keep quantized layers packed, perplexity,
size, speed, sweeps over settings and their report."""
