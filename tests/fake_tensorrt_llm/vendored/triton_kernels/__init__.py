"""FAKE for unit tests; not OpenAI's triton_kernels. Its presence on sys.path is what the MoE backend probe looks for
(`engine.executors.moe_backends.triton_kernels_available`); nothing imports it."""
