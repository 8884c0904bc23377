"""Loading the ``minilm`` compressor: the shipped retention head on the project's MiniLM.

The head (:class:`~lightmem.processors.retention.RetentionHead`) is package data: a small
safetensors file made by ``lightmem train retention`` (:data:`DEFAULT_HEAD`), with a JSON
beside it naming the command, seed and data hash that produced it. The file's metadata
records the encoder it was trained on (a fingerprint of its weights), so a head is never
run over states from another encoder: the loader fails with one line instead.

Exceptions::

    RuntimeError
     └── ModelUnavailableError       (lightmem.streams.models.causal_lm)
          └── RetentionHeadError     the head file is missing, unreadable or does not
                                     match the encoder
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from lightmem.processors.retention import MiniLMRetentionBackend, RetentionHead

from .causal_lm import ModelUnavailableError

__all__ = [
    "DEFAULT_HEAD",
    "RetentionHeadError",
    "encoder_fingerprint",
    "save_head",
    "load_head",
    "load_minilm_backend",
]

#: The head shipped with the package (``lightmem train retention --out`` this path).
DEFAULT_HEAD = Path(__file__).resolve().parent / "data" / "minilm_retention_head.safetensors"

# Version of the head file's layout; a loader refuses files of another format.
_FORMAT = "lightmem-retention-head/1"


class RetentionHeadError(ModelUnavailableError):
    """The retention head file is missing, unreadable or was trained on another encoder."""


def encoder_fingerprint(encoder: Any) -> str:
    """A short fingerprint of an encoder's identity: architecture and a sample of weights.

    Hashes the config's shape fields and the bytes of the first rows of the word
    embeddings and of the last layer's output projection (float32): cheap (no 90 MB hash
    at every start) and different for any other checkpoint or a fine-tuned copy.

    Args:
        encoder: A BERT-style transformers ``AutoModel``.

    Returns:
        16 hex digits.
    """
    config = encoder.config
    digest = hashlib.sha256()
    for field in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
        digest.update(f"{field}={getattr(config, field, None)};".encode())
    state = encoder.state_dict()
    for name in sorted(state):
        if name.endswith("word_embeddings.weight") or (
            name.endswith("output.dense.weight")
            and f".{config.num_hidden_layers - 1}." in name
            and "attention" not in name
        ):
            sample = state[name][:64].detach().to(torch.float32).contiguous().cpu()
            digest.update(name.encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def save_head(
    head: RetentionHead, path: Path, *, encoder: Any, info: dict[str, Any]
) -> tuple[Path, Path]:
    """Write a head as safetensors (metadata: format, widths, encoder) and its JSON beside.

    Args:
        head: The trained head.
        path: The ``.safetensors`` file to write (parents are created).
        encoder: The encoder it was trained on (fingerprinted into the metadata).
        info: Provenance for the JSON (command, seed, data hash, agreement ...).

    Returns:
        ``(safetensors path, json path)``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": _FORMAT,
        "dim": str(head.dim),
        "hidden": str(head.hidden),
        "layers": ",".join(str(x) for x in head.layers),
        "encoder": str(getattr(encoder.config, "_name_or_path", "") or "all-MiniLM-L6-v2"),
        "encoder_fingerprint": encoder_fingerprint(encoder),
    }
    tensors = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    save_file(tensors, str(path), metadata=metadata)
    info_path = path.with_suffix(".json")
    info_path.write_text(json.dumps({**info, "head": metadata}, indent=2) + "\n")
    return path, info_path


def load_head(path: Path, encoder: Any) -> RetentionHead:
    """Read a head file and check that it fits ``encoder``.

    Args:
        path: The ``.safetensors`` file.
        encoder: The encoder the head will run on.

    Returns:
        The head, float32, eval mode.

    Raises:
        RetentionHeadError: missing or unreadable file, another format, another width or
            another encoder (one line, naming the file and the fix).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    retrain = "make one with `lightmem train retention --out <file>`"
    if not path.is_file():
        raise RetentionHeadError(f"retention head file not found: {str(path)!r}; {retrain}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (OSError, SafetensorError, ValueError) as exc:
        raise RetentionHeadError(
            f"retention head file {str(path)!r} is unreadable ({exc}); {retrain}"
        ) from exc
    if metadata.get("format") != _FORMAT:
        raise RetentionHeadError(
            f"retention head file {str(path)!r} has format {metadata.get('format')!r}, "
            f"expected {_FORMAT!r}; {retrain}"
        )
    width = int(getattr(encoder.config, "hidden_size", -1))
    depth = int(getattr(encoder.config, "num_hidden_layers", -1))
    expected = encoder_fingerprint(encoder)
    if metadata.get("encoder_fingerprint") != expected:
        raise RetentionHeadError(
            f"retention head {str(path)!r} does not match the encoder: trained on "
            f"{metadata.get('encoder')!r} (fingerprint {metadata.get('encoder_fingerprint')}), "
            f"the loaded encoder's fingerprint is {expected} ({depth} layers of width "
            f"{width}); retrain it with `lightmem train retention`"
        )
    try:
        layers = [int(x) for x in metadata.get("layers", "").split(",")]
        head = RetentionHead(int(metadata["dim"]), int(metadata["hidden"]), layers)
        if head.dim != width * len(layers) or not all(0 <= x <= depth for x in layers):
            raise ValueError(f"{head.dim}-wide input from layers {layers}")
        head.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()})
    except (KeyError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise RetentionHeadError(
            f"retention head file {str(path)!r} does not fit its own metadata ({first}); {retrain}"
        ) from exc
    return head.eval()


def load_minilm_backend(path: Path | None = None) -> MiniLMRetentionBackend:
    """The ``minilm`` compressor on the process's shared MiniLM (one copy with the segmenter).

    Args:
        path: Head file; default :data:`DEFAULT_HEAD` (shipped with the package).

    Returns:
        A float32, batch-independent :class:`MiniLMRetentionBackend`.

    Raises:
        RetentionHeadError: see :func:`load_head`.
    """
    from .encoder import load_encoder

    encoder = load_encoder()
    model = encoder.attention_model
    head = load_head(Path(path) if path is not None else DEFAULT_HEAD, model)
    return MiniLMRetentionBackend(model, encoder.tokenizer, head)
