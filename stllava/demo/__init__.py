"""``make demo``: the embedded, CPU-sized run of the STLLaVA-Med pipeline."""
