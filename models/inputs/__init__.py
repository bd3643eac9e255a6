"""Files to model inputs: safe decoding of uploaded images (PIL) and the tensor path that
mirrors it on the GPU."""
