"""Optional fused CUDA (Triton) kernels for the chunked lm_head path, behind one protocol."""
