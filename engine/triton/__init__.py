"""The Triton side of the serving path: the tensor contract and the python-backend model."""
