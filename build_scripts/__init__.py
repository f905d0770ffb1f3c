"""`appliance build` (Triton model repositories) and the container recipes."""
