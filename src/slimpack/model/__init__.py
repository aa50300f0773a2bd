"""The model layer, below training and evaluation: the Transformer and its attention backends,
STRING, KV-cache inference, and reading a checkpoint's weights. It imports nothing of pipeline,
shards, train or eval (tests/test_layout.py holds it to that)."""
