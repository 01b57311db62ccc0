"""The weights on disk and how a rank gets its blocks: Hugging Face checkpoints, tensor-parallel split plans, writing shard files (edgellm shard), reading and fetching them, slicing blocks."""
