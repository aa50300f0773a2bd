"""slimpack: SlimPajama -> Llama 3 tokens -> MDS shards -> packed, resumable batches -> training."""

__version__ = "0.1.0"
