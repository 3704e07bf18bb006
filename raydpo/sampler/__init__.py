"""The sampler role: vLLM engines in Ray actors (`actor`), spread over by a pool (`pool`)."""
