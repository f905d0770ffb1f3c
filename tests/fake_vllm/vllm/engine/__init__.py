"""FAKE for unit tests; not vLLM."""
