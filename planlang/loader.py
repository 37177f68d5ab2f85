"""From a path to a resolved plan: read either syntax, follow `extends`, validate the schema.

`load(path)` is the Python API's entry point (spec §13); `load_with_source` also returns
where everything was written, which lint and explain need for their diagnostics.
"""
from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .diagnostics import Diagnostic, at, has_errors
from .plan import Plan
from .source import LayeredSourceMap, SourceError, SourceMap
from .yaml_reader import MAX_BYTES, decode, read_yaml

PLAN_SUFFIXES = (".yaml", ".yml", ".plan")


class PlanError(Exception):
    """A plan that could not be read or is invalid; `.diagnostics` says where and why."""

    def __init__(self, diagnostics: list[Diagnostic]):
        self.diagnostics = diagnostics
        first = next((d for d in diagnostics if d.severity == "error"), diagnostics[0] if diagnostics else None)
        super().__init__(f"{first.file}:{first.line}:{first.column}: {first.message}" if first else "invalid plan")


@dataclass
class LoadedPlan:
    """A plan resolved against its bases, with the documents and sources it came from."""

    plan: Plan | None
    file: str
    source: SourceMap
    document: dict | None = None          # this file's own document (what `fmt` prints)
    merged: dict | None = None            # after `extends`
    bases: list[str] = field(default_factory=list)
    diagnostics: list[Diagnostic] = field(default_factory=list)


def read_document(path: str | Path, data: bytes | None = None) -> tuple[object, SourceMap]:
    """Read one file in the syntax its suffix names; raises SourceError."""
    path = Path(path)
    file = str(path)
    if path.suffix not in PLAN_SUFFIXES:
        if data is None and path.is_dir():
            raise SourceError("PL100", f"{file}: is a folder, not a plan file", None,
                              f"name the plans, e.g. {path / '*.yaml'}")
        if file.startswith("builtin:") or path.suffix in (".pt", ".pth", ".safetensors"):
            raise SourceError("PL100", f"{file}: a model, not a plan file", None,
                              "pass the model with --model (lint, explain) or after the plan (apply, bench)")
        raise SourceError("PL100", f"{file}: unknown plan syntax '{path.suffix or '(no suffix)'}'", None,
                          "plan files end in .yaml, .yml or .plan")
    if data is None:
        try:
            size = path.stat().st_size
            if size > MAX_BYTES:
                raise SourceError("PL100", f"{file} is larger than 1 MiB ({size} bytes)", None,
                                  "a plan is a few hundred lines; split it with `extends`")
            data = path.read_bytes()
        except FileNotFoundError:
            raise SourceError("PL100", f"{file}: no such file", None, None) from None
        except IsADirectoryError:
            raise SourceError("PL100", f"{file} is a directory, not a plan file", None, None) from None
        except OSError as exc:
            raise SourceError("PL100", f"{file}: cannot read ({exc.strerror})", None, None) from None
    if path.suffix == ".plan":
        from .text_reader import read_text  # the lark grammar loads only for .plan files
        return read_text(decode(data, file), file)
    return read_yaml(data, file)


def _text_of(path: Path) -> SourceMap | None:
    """The file's text for showing the offending line of a read error (if it decodes)."""
    try:
        data = path.read_bytes()
        if len(data) > MAX_BYTES:
            return None
        return SourceMap(file=str(path), text=data.decode("utf-8"))
    except (OSError, UnicodeDecodeError):
        return None


def _source_error(exc: SourceError, file: str, source: SourceMap | None = None) -> Diagnostic:
    text = source.line_text(exc.span.line) if (source and exc.span) else None
    message = exc.message
    if message.startswith(f"{file}: ") and exc.span is None:  # the place already names the file
        message = message[len(file) + 2:]
    return Diagnostic(exc.code, message, "", file, exc.span, exc.hint, text)


def _merge(base: dict, over: dict) -> dict:
    """Mappings merge key by key, lists and scalars replace (spec §2)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "provenance":
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _inside(path: Path, roots: list[Path]) -> bool:
    for root in roots:
        try:
            path.relative_to(root)
            return True
        except ValueError:
            pass
    return False


def _read_chain(path: Path, cwd: Path, seen: list[Path], diags: list[Diagnostic]):
    """Documents of `path` and its bases, nearest first; problems go to `diags`."""
    file = str(path)
    try:
        doc, source = read_document(path)
    except SourceError as exc:
        diags.append(_source_error(exc, file, _text_of(path)))
        return []
    layers = [(doc, source)]
    if not isinstance(doc, dict) or "extends" not in doc:
        return layers
    ext = doc["extends"]
    if not isinstance(ext, str) or not ext.strip():
        diags.append(at(source, ("extends",), "PL105", "extends must be a relative path to a plan file"))
        return layers
    target = Path(ext)
    if target.is_absolute() or (os.name == "nt" and ext[:1] in "/\\"):
        diags.append(at(source, ("extends",), "PL111", f"extends must be a relative path, found '{ext}'",
                        hint="name the base plan relative to this file"))
        return layers
    resolved = (path.parent / target).resolve()
    roots = [path.parent.resolve(), cwd.resolve()]
    if not _inside(resolved, roots):
        diags.append(at(source, ("extends",), "PL111",
                        f"extends '{ext}' points outside the project (outside {path.parent} and the working directory)",
                        hint="base plans must live in this plan's directory tree or the working directory's"))
        return layers
    if resolved in seen:
        chain = " -> ".join(str(p.name) for p in seen + [resolved])
        diags.append(at(source, ("extends",), "PL112", f"extends cycle: {chain}",
                        hint="a plan cannot extend itself, directly or through its bases"))
        return layers
    if not resolved.is_file():
        diags.append(at(source, ("extends",), "PL113", f"extended plan '{ext}' not found",
                        hint=f"looked for {resolved.relative_to(roots[0]) if _inside(resolved, roots[:1]) else ext}"))
        return layers
    n_before = len(diags)
    base_layers = _read_chain(resolved, cwd, seen + [resolved], diags)
    if len(diags) > n_before and not any(d.file == file for d in diags[n_before:]):
        diags.append(at(source, ("extends",), "PL113", f"extended plan '{ext}' has errors (reported above)"))
    return layers + base_layers


def name_from_stem(stem: str) -> str:
    """A plan's default name: its file stem, made an identifier."""
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", stem)
    return name if re.match(r"[A-Za-z_]", name) else "_" + name


def load_with_source(path: str | Path, cwd: str | Path | None = None) -> LoadedPlan:
    """Read, resolve `extends`, and validate the schema. Never raises for bad input: the
    diagnostics say what is wrong, and `.plan` is None when there are errors."""
    path = Path(path)
    cwd = Path(cwd) if cwd is not None else Path.cwd()
    diags: list[Diagnostic] = []
    layers = _read_chain(path, cwd, [path.resolve()], diags)
    if not layers:
        return LoadedPlan(None, str(path), SourceMap(file=str(path)), diagnostics=diags)
    own_doc, own_source = layers[0]
    # Each file must be a valid plan on its own (errors then land in the right file).
    for doc, source in layers:
        _, errs = Plan.from_document(doc, source)
        diags.extend(errs)
    source = LayeredSourceMap([s for _, s in layers]) if len(layers) > 1 else own_source
    if has_errors(diags):
        return LoadedPlan(None, str(path), source, own_doc if isinstance(own_doc, dict) else None,
                          diagnostics=diags)
    merged: dict = {}
    for doc, _ in reversed(layers):
        merged = _merge(merged, doc)
    merged.pop("extends", None)
    merged.setdefault("name", name_from_stem(path.stem))
    plan, errs = Plan.from_document(merged, source)
    diags.extend(errs)
    return LoadedPlan(plan, str(path), source, own_doc, merged, [str(s.file) for _, s in layers[1:]], diags)


def load(path: str | Path) -> Plan:
    """The resolved plan at `path`; raises PlanError carrying the diagnostics."""
    loaded = load_with_source(path)
    if loaded.plan is None:
        raise PlanError(loaded.diagnostics)
    return loaded.plan
