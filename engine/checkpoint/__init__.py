"""Checkpoints: configuration, tensor inventory, safetensors I/O, validation, the MXFP4 codec, BF16 expansion,
synthetic checkpoints and the trained smoke model."""
