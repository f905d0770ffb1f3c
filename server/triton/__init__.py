"""Talking to Triton: the launcher and supervisor of a local tritonserver, and the client."""
