"""The model presets: named decoder shapes, the one list of them (lmforge.model.decoder builds its configs
from it; params validation reads the names). Plain numbers, no torch, so params load fast.
"""

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # A few hundred thousand params: the CPU default for tests and the built-in corpus.
    "tiny": {"dim": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 256},
    # nanoGPT's "small CPU" shape.
    "small": {"dim": 256, "n_layers": 4, "n_heads": 4, "max_seq_len": 256},
    "124m": {"dim": 768, "n_layers": 12, "n_heads": 12, "max_seq_len": 1024, "multiple_of": 256},
    "350m": {"dim": 1024, "n_layers": 24, "n_heads": 16, "max_seq_len": 1024, "multiple_of": 256},
    # Llama-3.2-1B's shape (GQA 32/8, FFN 8192).
    "1b": {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "ffn_dim_multiplier": 1.5,
           "multiple_of": 256, "max_seq_len": 2048, "rope_theta": 500000.0},
}
