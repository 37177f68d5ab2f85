"""Model sources (PLAN_SPEC.md §12): where the MODEL argument of a command comes from.

- `builtin:<name>` (or nothing: the default built-in model), from `registry.py`;
- a planlang checkpoint `.pt`, written by `export_checkpoint`, read with
  `torch.load(weights_only=True)`, so reading it never runs code from the file;
- the same checkpoint as `.safetensors` (written by `export_safetensors`: the tensors, and
  the config in the file's metadata), read with the `safetensors` library;
- a Hugging Face model folder (config.json + weights), through `transformers`;
- a pickled `nn.Module`, only with `trust_pickle=True`, because unpickling runs code.

Every failure is a `ModelLoadError` naming the file, with a hint; torch's own exceptions
stay in `__cause__` for debugging and never reach the user as a traceback.
"""
from __future__ import annotations

import json
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from .llama import ARCHS, ModelConfig, Transformer
from .registry import BUILTIN_MODELS, DEFAULT_MODEL, build_builtin, suggest, unknown_name_message

CHECKPOINT_FORMAT = "planlang-checkpoint"
CHECKPOINT_VERSION = 1
BUILTIN_PREFIX = "builtin:"
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"  # torch's legacy (pre-zip) format is a pickle stream
_SOURCES_HINT = "pass builtin:<name>, a .pt written by planlang, or a Hugging Face model folder"


class ModelLoadError(Exception):
    """A model could not be loaded. `path` names the file (or the spec), `hint` what to do."""

    def __init__(self, message: str, *, path: Union[str, Path, None] = None, hint: Optional[str] = None):
        self.message, self.path, self.hint = message, None if path is None else str(path), hint
        where = f"{self.path}: " if self.path else ""
        super().__init__(where + message + (f" (hint: {hint})" if hint else ""))


@dataclass
class LoadedModel:
    """A loaded model and where it came from."""

    model: nn.Module
    kind: str  # "builtin" | "checkpoint" | "hf" | "pickle"
    name: str
    config: Optional[dict]
    source: str  # "builtin:<name>", or the path that was read


def export_checkpoint(model: Transformer, path: Union[str, Path], *, name: Optional[str] = None) -> Path:
    """Write `model` (a built-in `Transformer`) as a planlang checkpoint that `load_model`
    reads back to identical outputs. The tied LM head is stored once (as the embedding).
    The file is written beside `path` and then renamed, so a crash never leaves half a file."""
    if not isinstance(model, Transformer):
        raise TypeError(f"export_checkpoint takes a planlang Transformer, not {type(model).__name__}")
    config = model.config
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()
             if not (config.tie_embeddings and k == "lm_head.weight")}
    payload = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "arch": config.arch,
        "name": name, "config": config.to_dict(), "state_dict": state,
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def export_safetensors(model: Transformer, path: Union[str, Path], *, name: Optional[str] = None) -> Path:
    """Write `model` as a planlang checkpoint in safetensors form: the tensors as they are
    (dtype kept; the tied LM head once, as the embedding), and format, version, arch, name
    and config as JSON strings in the metadata. `load_model` reads it back to identical
    outputs. Written beside `path` and renamed, like `export_checkpoint`."""
    if not isinstance(model, Transformer):
        raise TypeError(f"export_safetensors takes a planlang Transformer, not {type(model).__name__}")
    from safetensors.torch import save_file
    config = model.config
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if not (config.tie_embeddings and k == "lm_head.weight")}
    metadata = {"format": CHECKPOINT_FORMAT, "version": str(CHECKPOINT_VERSION), "arch": config.arch,
                "name": name or "", "config": json.dumps(config.to_dict(), sort_keys=True)}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    _umask = os.umask(0)
    os.umask(_umask)
    os.chmod(tmp, 0o666 & ~_umask)  # as torch.save's files are (safetensors writes 0600)
    os.replace(tmp, path)
    return path


def load_model(spec: Union[str, Path, None], *, trust_pickle: bool = False, device="cpu",
               dtype: Optional[torch.dtype] = None) -> LoadedModel:
    """Load the model that `spec` names (see the module docstring) onto `device`, cast to
    `dtype` when given, in eval mode. Raises ModelLoadError, never anything else, for a
    spec or file that cannot be loaded."""
    spec = str(spec).strip() if spec is not None else ""
    if not spec:
        spec = BUILTIN_PREFIX + DEFAULT_MODEL
    if spec.startswith(BUILTIN_PREFIX):
        return _load_builtin(spec[len(BUILTIN_PREFIX):], device, dtype)
    path = Path(spec).expanduser()
    if not path.exists():
        close = spec if spec in BUILTIN_MODELS else suggest(spec)
        hint = f"built-in models are written builtin:<name>; did you mean builtin:{close}?" if close else _SOURCES_HINT
        raise ModelLoadError("no such file or folder", path=path, hint=hint)
    if path.is_dir():
        return _load_hf(path, device, dtype)
    if path.suffix == ".safetensors":
        return _load_safetensors(path, device, dtype)
    return _load_torch_file(path, trust_pickle, device, dtype)


def _load_builtin(name: str, device, dtype) -> LoadedModel:
    if name not in BUILTIN_MODELS:
        raise ModelLoadError(unknown_name_message(name), path=BUILTIN_PREFIX + name,
                             hint="write builtin:<name> with one of the known names")
    model = build_builtin(name, device=device, dtype=dtype)
    return LoadedModel(model, "builtin", name, model.config.to_dict(), BUILTIN_PREFIX + name)


def _load_torch_file(path: Path, trust_pickle: bool, device, dtype) -> LoadedModel:
    unsafe = _unsafe_globals(path)
    if unsafe and not trust_pickle:
        raise _pickle_refused(path, unsafe)
    if unsafe:
        return _load_pickle(path, device, dtype)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if _is_unsafe_global_error(exc):  # a legacy-format pickle, which the zip probe cannot read
            if not trust_pickle:
                raise _pickle_refused(path, []) from exc
            return _load_pickle(path, device, dtype)
        raise ModelLoadError("truncated or corrupt PyTorch file (torch.load could not read it)", path=path,
                             hint="write or download the file again") from exc
    return _from_checkpoint(obj, path, device, dtype)


def _load_safetensors(path: Path, device, dtype) -> LoadedModel:
    """A planlang checkpoint in safetensors form; safetensors never runs code from the file."""
    try:
        from safetensors import safe_open
    except ImportError as exc:
        raise ModelLoadError("reading .safetensors needs the safetensors package, which is not installed",
                             path=path, hint="pip install 'planlang[runtime]'") from exc
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors' own error type differs between versions
        raise ModelLoadError(f"not a readable safetensors file ({_first_sentence(exc)})", path=path,
                             hint="write or download the file again") from exc
    if meta.get("format") != CHECKPOINT_FORMAT:
        found = f"its 'format' is {meta['format']!r}" if meta.get("format") else "no 'format' in its metadata"
        raise ModelLoadError(f"a safetensors file without planlang metadata ({found})",
                             path=path, hint="a Hugging Face model is loaded from its folder; "
                                             "write planlang checkpoints with export_safetensors")
    try:
        obj = {"format": meta["format"], "version": int(meta.get("version", "")), "arch": meta.get("arch"),
               "name": meta.get("name") or None, "config": json.loads(meta.get("config", "")),
               "state_dict": state}
    except ValueError as exc:
        raise ModelLoadError(f"invalid planlang metadata ({exc})", path=path,
                             hint="export the checkpoint again") from exc
    return _from_checkpoint(obj, path, device, dtype)


def _unsafe_globals(path: Path) -> list[str]:
    """The Python objects (beyond tensors and plain containers) a torch file would unpickle.

    Also the first check of the file's bytes: one that is neither a zip archive nor a
    pickle, or a zip archive with its end missing, is refused here with the reason.
    """
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise ModelLoadError("empty file", path=path, hint=_SOURCES_HINT)
    if head.startswith(_PICKLE_PROTO):
        return []  # legacy format: torch.load below tells a pickled object apart
    if head != _ZIP_MAGIC:
        raise ModelLoadError("not a PyTorch file (neither a zip archive nor a pickle)", path=path, hint=_SOURCES_HINT)
    if not zipfile.is_zipfile(path):
        raise ModelLoadError("truncated or corrupt: the zip archive has no end record", path=path,
                             hint="write or download the file again")
    probe = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.5
    if probe is None:
        return []
    try:
        return list(probe(str(path)))
    except Exception:
        return []  # not readable as a torch archive; torch.load reports it as corrupt


def _is_unsafe_global_error(exc: Exception) -> bool:
    return "Unsupported global" in str(exc) or "Unsupported class" in str(exc)


def _pickle_refused(path: Path, unsafe: list[str]) -> ModelLoadError:
    unsafe = sorted(unsafe, key=lambda g: g.startswith("torch."))  # the user's own classes first
    what = f" ({', '.join(unsafe[:3])}{', ...' if len(unsafe) > 3 else ''})" if unsafe else ""
    return ModelLoadError(f"holds pickled Python objects{what}; loading it would run code from the file",
                          path=path, hint="pass --trust-pickle (trust_pickle=True) only if you trust its source, "
                                          "or export it with planlang's export_checkpoint")


def _load_pickle(path: Path, device, dtype) -> LoadedModel:
    warnings.warn(f"loading {path} with trust_pickle: unpickling executes code from the file",
                  UserWarning, stacklevel=4)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelLoadError(f"could not unpickle the file ({_first_sentence(exc)})", path=path,
                             hint="a pickled module needs its class importable under the same name") from exc
    if isinstance(obj, dict):
        return _from_checkpoint(obj, path, device, dtype)
    if not isinstance(obj, nn.Module):
        raise ModelLoadError(f"holds a {type(obj).__name__}, not an nn.Module", path=path, hint=_SOURCES_HINT)
    model = obj.to(device=device, dtype=dtype) if dtype is not None else obj.to(device)
    config = model.config.to_dict() if isinstance(model, Transformer) else None
    return LoadedModel(model.eval(), "pickle", path.stem, config, str(path))


def _from_checkpoint(obj: Any, path: Path, device, dtype) -> LoadedModel:
    """Check a loaded planlang checkpoint's keys and rebuild its model."""
    config = _checkpoint_config(obj, path)
    with torch.device("meta"):
        model = Transformer(config)
    state = obj.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError("the 'state_dict' entry is not a mapping of tensors", path=path,
                             hint="write the checkpoint with export_checkpoint")
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except Exception as exc:  # shape mismatches
        raise ModelLoadError(f"weights do not fit the config ({str(exc).splitlines()[-1].strip()[:200]})",
                             path=path, hint="the config and the weights come from different models") from exc
    missing = [k for k in result.missing_keys if not (config.tie_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        problems = [f"missing {k}" for k in missing[:3]] + [f"unexpected {k}" for k in result.unexpected_keys[:3]]
        raise ModelLoadError(f"weights do not match the {config.arch} config: {', '.join(problems)}", path=path,
                             hint="the config and the weights come from different models")
    model.tie_weights()
    model.init_rope(config.max_seq_len, "cpu")  # the RoPE tables are still on meta; .to cannot move those
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    model.init_rope(config.max_seq_len, device)  # float32 again after a dtype cast
    name = obj.get("name") or path.stem
    return LoadedModel(model.eval(), "checkpoint", str(name), config.to_dict(), str(path))


def _checkpoint_config(obj: Any, path: Path) -> ModelConfig:
    if not isinstance(obj, dict):
        raise ModelLoadError(f"holds a {type(obj).__name__}, not a planlang checkpoint", path=path, hint=_SOURCES_HINT)
    fmt = obj.get("format")
    if fmt != CHECKPOINT_FORMAT:
        bare = obj and all(isinstance(v, torch.Tensor) for v in obj.values())
        hint = ("this looks like a bare state_dict: load it into the model and write it with export_checkpoint"
                if bare else "write the checkpoint with planlang's export_checkpoint")
        what = "a dict of tensors" if bare else (f"its 'format' is {fmt!r}" if fmt is not None
                                                  else f"a dict without 'format' (keys: {', '.join(map(str, list(obj)[:4]))})")
        raise ModelLoadError(f"not a planlang checkpoint ({what}; planlang writes format {CHECKPOINT_FORMAT!r})",
                             path=path, hint=hint)
    version = obj.get("version")
    if not isinstance(version, int) or not 1 <= version <= CHECKPOINT_VERSION:
        raise ModelLoadError(f"checkpoint version {version!r}; this planlang reads version {CHECKPOINT_VERSION}",
                             path=path, hint="upgrade planlang, or export the checkpoint again")
    arch = obj.get("arch")
    if arch not in ARCHS:
        raise ModelLoadError(f"unknown arch {arch!r}", path=path, hint=f"known archs: {', '.join(ARCHS)}")
    try:
        config = ModelConfig.from_dict(dict(obj.get("config") or {}))
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"invalid config ({exc})", path=path, hint="export the checkpoint again") from exc
    if config.arch != arch:
        raise ModelLoadError(f"arch {arch!r} disagrees with the config's {config.arch!r}", path=path,
                             hint="export the checkpoint again")
    return config


def _load_hf(path: Path, device, dtype) -> LoadedModel:
    if not (path / "config.json").is_file():
        raise ModelLoadError("a folder without config.json, so not a Hugging Face model", path=path,
                             hint=_SOURCES_HINT)
    try:
        import transformers
    except ImportError as exc:
        raise ModelLoadError("loading a Hugging Face model needs transformers, which is not installed",
                             path=path, hint="pip install 'planlang[hf]'") from exc
    kwargs = {} if dtype is None else {_hf_dtype_keyword(transformers.__version__): dtype}
    try:
        # trust_remote_code stays off: a model folder must not run code either.
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"transformers could not load it ({_first_sentence(exc)})", path=path,
                             hint="check config.json and the weight files (*.safetensors)") from exc
    config = model.config.to_dict()
    name = config.get("_name_or_path") or path.name
    return LoadedModel(model.to(device).eval(), "hf", str(name), config, str(path))


def _first_sentence(exc: Exception, limit: int = 200) -> str:
    """The gist of a library's exception, for a one-line message."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = text.split(". ")[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _hf_dtype_keyword(version: str) -> str:
    """transformers 4.56 renamed from_pretrained's `torch_dtype` to `dtype`."""
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return "torch_dtype"
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
