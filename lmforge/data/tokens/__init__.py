"""Tokens: the BPE tokenizer, packing documents into rows, and the shard format."""
