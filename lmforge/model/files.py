"""The names of a finished model's files (lmforge.model.export writes and reads them). Apart from
export, which imports torch: promote finds a model by its weights file without loading it, and need
not pay for torch to name it."""

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
ADAPTER_DIR = "adapter"
# What a fine-tuned model's config.json holds beside the ModelConfig fields.
META_KEYS = ("task", "method", "labels", "pooling", "max_length", "prompt_separator", "eos_token", "pad_token")
