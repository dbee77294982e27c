"""Pure tensor math of the divergences: f and f', exact per-token divergences, sampled estimators
and the gradient each (estimator, placement) pair follows, and the chunked lm_head path. No
models, config or I/O here."""
