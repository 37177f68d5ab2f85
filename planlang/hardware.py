"""The hardware capability model (PLAN_SPEC.md §10).

- `hardware.yaml`, shipped with the package, is the catalog: one record per target, every
  figure beside the datasheet it comes from. `load_catalog` reads it (once) and merges the
  user's `--hardware FILE`s over it; a bad user file raises `HardwareFileError` carrying
  PL130 diagnostics at the offending line and column.
- The capability checks (`dtype_support`, `scaling_support`, `cuda_graphs_support`,
  `triton_support`) answer what lint asks of a target, each as a `Capability` whose reason
  and hint are ready to print.
- `detect` finds the GPU of this machine for `target: auto` and `planlang detect` through
  NVML or `nvidia-smi`, without importing torch (only `detect(use_torch=True)` may).

This module is part of the language and never imports torch at import time.
"""
from __future__ import annotations

import functools
import importlib.resources
import platform
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, field_validator

from planlang.names import ACTIVATION_QUANT, BLOCK_DTYPES, DTYPES, FP8_DTYPES, SCALINGS
from planlang.source import SourceError, Span

HARDWARE_FILE_CODE = "PL130"
MAX_HARDWARE_FILE_BYTES = 1 << 20  # the same bound as for plans: a hardware file is tiny

Arch = Literal["volta", "turing", "ampere", "ada", "hopper", "blackwell", "cpu"]
Dtype = Literal[DTYPES]
Scaling = Literal[SCALINGS]
ActivationQuant = Literal[ACTIVATION_QUANT]

# Gating on CUDA targets (spec §10): the oldest compute capability that runs each dtype.
# fp32 and fp16 run everywhere. Consumer Blackwell (sm_120) is newer than sm_100, so the
# MX/NVFP4 rule includes it.
MIN_COMPUTE_CAPABILITY: dict[str, tuple[int, int]] = {
    "tf32": (8, 0),
    "bf16": (8, 0),
    "fp8_e4m3": (8, 9),
    "fp8_e5m2": (8, 9),
    "mxfp8": (10, 0),
    "nvfp4": (10, 0),
    "mxfp4": (10, 0),
}
# What a CPU runs without emulation (spec §10): no tf32, no low-precision formats.
CPU_DTYPES = ("fp32", "bf16", "fp16")
# What a hint proposes instead of a dtype the target lacks, best first.
_FALLBACK_DTYPES = {
    "tf32": ("fp32",),
    "bf16": ("fp16", "fp32"),
    "fp16": ("fp32",),
    "fp8_e4m3": ("bf16", "fp16"),
    "fp8_e5m2": ("bf16", "fp16"),
    "mxfp8": ("fp8_e4m3", "bf16", "fp16"),
    "nvfp4": ("fp8_e4m3", "bf16", "fp16"),
    "mxfp4": ("fp8_e4m3", "bf16", "fp16"),
}


# --------------------------------------------------------------------------- the records
# Empty defaults are `lambda: {}`, not `dict`: pydantic reads every factory's signature, and
# a builtin's is parsed from text (a start-up cost of every command).
class GemmSupport(BaseModel):
    """How a target runs GEMMs in one dtype: the weight scalings and activation
    quantizations planlang can run there, and notes on library gaps (keyed by activation
    quantization) that become a kernel choice at apply time, never a lint error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight_scalings: tuple[Scaling, ...] = ()
    activations: tuple[ActivationQuant, ...] = ("keep",)
    kernel_notes: dict[ActivationQuant, str] = Field(default_factory=lambda: {})


_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"


class Target(BaseModel):
    """One hardware target of the catalog. `tflops` are dense (no sparsity); `gemm` lists
    the GEMM dtypes the chip runs (empty: derive them from the compute capability)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=_NAME_PATTERN)
    aliases: tuple[str, ...] = ()
    name: str
    vendor: str
    arch: Arch
    compute_capability: Optional[str] = Field(default=None, pattern=r"^\d+\.\d+$")
    match: tuple[str, ...] = ()
    memory_gb: PositiveFloat
    memory_bandwidth_gbs: PositiveFloat
    host_link: Optional[str] = None
    host_link_gbs: Optional[PositiveFloat] = None
    sm_count: Optional[PositiveInt] = None
    l2_mb: Optional[PositiveFloat] = None
    tflops: dict[Dtype, PositiveFloat] = Field(default_factory=lambda: {})
    gemm: dict[Dtype, GemmSupport] = Field(default_factory=lambda: {})
    cuda_graphs: bool
    triton: bool
    launch_us: PositiveFloat

    @field_validator("compute_capability", mode="before")
    @classmethod
    def _number_to_text(cls, value: Any) -> Any:
        # `compute_capability: 9.0` unquoted is a YAML float; accept it as "9.0".
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)):
            return f"{float(value):.1f}"
        return value

    @field_validator("aliases")
    @classmethod
    def _aliases_are_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for alias in value:
            if not re.match(_NAME_PATTERN, alias):
                raise ValueError(f"alias {alias!r} must be lower-case letters, digits, '.', '_' or '-'")
        return value

    def __hash__(self) -> int:
        # Frozen models hash all fields, and dicts do not hash: a target's id and
        # figures identify it well enough for caches keyed by target.
        return hash((self.id, self.compute_capability, self.memory_gb, self.launch_us))

    @property
    def is_cpu(self) -> bool:
        return self.arch == "cpu"

    @property
    def cc(self) -> tuple[int, int] | None:
        """The compute capability as a comparable (major, minor), None for a CPU."""
        return _parse_cc(self.compute_capability) if self.compute_capability else None

    @property
    def names(self) -> tuple[str, ...]:
        """The id, then the aliases: every name a plan may write for this target."""
        return (self.id, *self.aliases)

    def gemm_support(self, dtype: str) -> GemmSupport | None:
        """How this target runs `dtype` GEMMs natively, None where it does not."""
        if not _gated_in(self, dtype):
            return None
        if self.gemm:
            return self.gemm.get(dtype)
        return _derived_gemm_support(dtype)

    def peak_tflops(self, dtype: str) -> float | None:
        """The dense peak in TFLOP/s for `dtype`, None where the catalog gives none."""
        return self.tflops.get(dtype)


def _parse_cc(text: str) -> tuple[int, int]:
    major, minor = text.split(".")
    return int(major), int(minor)


def _derived_gemm_support(dtype: str) -> GemmSupport:
    """The GEMM support a record without a `gemm` list gets for a dtype its chip runs."""
    if dtype in FP8_DTYPES:
        return GemmSupport(weight_scalings=SCALINGS, activations=ACTIVATION_QUANT)
    if dtype in BLOCK_DTYPES:
        return GemmSupport(weight_scalings=("block",), activations=("keep", "per_block"))
    return GemmSupport()


def _gated_in(target: Target, dtype: str) -> bool:
    """The spec's gating rule alone: does the chip's architecture run `dtype`?"""
    if target.is_cpu:
        return dtype in CPU_DTYPES
    cc = target.cc
    return cc is not None and cc >= MIN_COMPUTE_CAPABILITY.get(dtype, (0, 0))


def _contradictions(target: Target) -> list[tuple[tuple, str, str | None]]:
    """Facts of a record that contradict each other or the gating rules, as
    (path in the record, message, hint): a record claiming fp8 on sm_80 is a typo."""
    problems: list[tuple[tuple, str, str | None]] = []
    me = f"target `{target.id}`"
    if target.is_cpu:
        if target.compute_capability is not None:
            problems.append((("compute_capability",), f"{me} is a cpu and has no compute capability",
                             "write `compute_capability: null`"))
        if target.cuda_graphs:
            problems.append((("cuda_graphs",), f"{me} is a cpu and has no CUDA graphs", "write `cuda_graphs: false`"))
    elif target.compute_capability is None:
        problems.append((("compute_capability",), f"GPU {me} needs a compute capability",
                         'write it as text, e.g. `compute_capability: "9.0"`'))
        return problems
    for section in ("tflops", "gemm"):
        for dtype in getattr(target, section):
            if not _gated_in(target, dtype):
                hint = f"remove `{dtype}` from `{section}`"
                problems.append(((section, dtype), _gating_failure(target, dtype), hint))
    for dtype, support in target.gemm.items():
        if dtype not in FP8_DTYPES + BLOCK_DTYPES and support.weight_scalings:
            problems.append((("gemm", dtype, "weight_scalings"), f"{dtype} GEMMs take no weight scales",
                             "remove `weight_scalings`"))
    return problems


# --------------------------------------------------------------------------- the catalog
class Catalog:
    """The hardware targets, in catalog order, looked up by id or alias (case-insensitive)."""

    def __init__(self, targets: Sequence[Target], hint_targets: Sequence[str] = ()):
        self._targets = tuple(targets)
        self._by_name: dict[str, Target] = {}
        for target in self._targets:
            for name in target.names:
                other = self._by_name.setdefault(name.lower(), target)
                if other.id != target.id:
                    raise ValueError(f"hardware name `{name}` names both `{other.id}` and `{target.id}`")
        self.hint_targets = tuple(hint_targets)

    def get(self, name: str | None) -> Target | None:
        """The target with this id or alias, None if there is none."""
        if not isinstance(name, str):
            return None
        return self._by_name.get(name.strip().lower())

    def ids(self) -> list[str]:
        """The target ids, in catalog order."""
        return [t.id for t in self._targets]

    def names(self) -> list[str]:
        """Every id and alias, in catalog order."""
        return [n for t in self._targets for n in t.names]

    def suggest(self, name: str) -> str | None:
        """The id or alias closest to `name` ("did you mean"), None if none is close."""
        if not isinstance(name, str) or not name.strip():
            return None
        # Compare without case, spaces and dashes ("RTX 4090" is rtx4090). A name the
        # query begins ("a100" of a100-40gb) beats a merely similar one (h100).
        by_key = {}
        for known in self.names():
            by_key.setdefault(re.sub(r"[\s_-]", "", known.lower()), known)
        query = re.sub(r"[\s_-]", "", name.lower())
        prefixed = [k for k in by_key if k.startswith(query)]
        if prefixed:
            return by_key[min(prefixed, key=len)]
        import difflib  # only an unknown target name gets here
        matches = difflib.get_close_matches(query, list(by_key), n=1, cutoff=0.6)
        return by_key[matches[0]] if matches else None

    def hint_target(self, dtype: str, *, exclude: Target | None = None) -> str | None:
        """The name a hint proposes for a target that runs `dtype` natively: the first of
        `hint_targets` that does, else the first such target in catalog order."""
        ordered = [(n, self.get(n)) for n in self.hint_targets] + [(t.id, t) for t in self._targets]
        for name, target in ordered:
            if target is None or (exclude is not None and target.id == exclude.id):
                continue
            if not target.is_cpu and _native(target, dtype):
                return name
        return None

    def __iter__(self) -> Iterator[Target]:
        return iter(self._targets)

    def __len__(self) -> int:
        return len(self._targets)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None


class HardwareFileError(Exception):
    """A hardware file that cannot be used: `diagnostics` are PL130 `SourceError`s, each
    with a span in `file` where one could be found."""

    def __init__(self, diagnostics: list[SourceError], file: str):
        self.diagnostics = list(diagnostics)
        self.file = file
        super().__init__("\n".join(self._line(d) for d in self.diagnostics))

    def _line(self, d: SourceError) -> str:
        where = f"{self.file}:{d.span.line}:{d.span.column}" if d.span else self.file
        hint = f" (hint: {d.hint})" if d.hint else ""
        return f"{where}: error[{d.code}]: {d.message}{hint}"


@functools.lru_cache(maxsize=1)
def _shipped_catalog() -> Catalog:
    resource = importlib.resources.files("planlang") / "hardware.yaml"
    text = resource.read_text(encoding="utf-8")
    return _catalog_from_text(text, "planlang/hardware.yaml", Catalog(()), shipped=True)


def load_catalog(extra_files: Sequence[Union[str, Path]] = ()) -> Catalog:
    """The shipped catalog with each user hardware file merged over it, in order.

    A user file holds a list of target records, or `{targets: [...]}`. A record whose id
    is already in the catalog overrides that target (mappings merge, lists replace, so
    `{id: h100-sxm, launch_us: 1.8}` changes one figure); any other record adds a target.
    Raises `HardwareFileError` for an unreadable file, a YAML error or a bad record.
    """
    catalog = _shipped_catalog()
    for file in extra_files:
        path = Path(file)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise HardwareFileError([_error(f"cannot read hardware file: {reason}", None)], str(path)) from None
        if len(raw) > MAX_HARDWARE_FILE_BYTES:
            raise HardwareFileError([_error("hardware file is larger than 1 MiB", None)], str(path))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise HardwareFileError([_error("hardware file is not UTF-8 text", None)], str(path)) from None
        catalog = _catalog_from_text(text, str(path), catalog, shipped=False)
    return catalog


def _error(message: str, node: yaml.Node | None, hint: str | None = None) -> SourceError:
    return SourceError(HARDWARE_FILE_CODE, message, _span(node) if node is not None else None, hint)


def _span(node: yaml.Node) -> Span:
    start, end = node.start_mark, node.end_mark
    if isinstance(node, yaml.ScalarNode) and start.line == end.line and end.column > start.column:
        return Span(start.line + 1, start.column + 1, end.line + 1, end.column + 1)
    return Span.point(start.line + 1, start.column + 1)


def _did_you_mean(word: object, options: Sequence[str]) -> str | None:
    import difflib  # only a bad hardware file or name gets here
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`?" if close else None


def _read_document(text: str, file: str) -> tuple[Any, yaml.Node | None]:
    """The document and its node tree, read with the safe loader (no tags, no objects)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)  # libyaml when present: ~5x faster
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        span = Span.point(mark.line + 1, mark.column + 1) if mark else None
        problem = exc.problem or exc.context or "cannot parse"
        raise HardwareFileError([SourceError(HARDWARE_FILE_CODE, f"YAML error: {problem}", span)], file) from None
    except yaml.YAMLError as exc:
        raise HardwareFileError([_error(f"YAML error: {exc}", None)], file) from None
    finally:
        loader.dispose()
    return data, node


def _duplicate_keys(root: yaml.Node) -> list[SourceError]:
    """Keys written twice in one mapping: the safe loader would silently keep the last."""
    errors, seen_nodes, stack = [], set(), [root]
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:  # aliases share nodes: visit each once
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: set[str] = set()
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in keys:
                        errors.append(_error(f"duplicate key `{key.value}`", key, "write each key once"))
                    keys.add(key.value)
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return errors


def _node_at(root: yaml.Node | None, path: Sequence[Any], *, key: bool = False) -> yaml.Node | None:
    """The node at `path` (its key node when `key`), else the nearest ancestor written."""
    node = root
    for depth, item in enumerate(path):
        last = depth == len(path) - 1
        if isinstance(node, yaml.MappingNode):
            entries = ((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(item))
            entry = next(entries, None)
            if entry is None:
                return node
            node = entry[0] if key and last else entry[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(item, int) and 0 <= item < len(node.value):
            node = node.value[item]
        else:
            return node
    return node


def _catalog_from_text(text: str, file: str, base: Catalog, *, shipped: bool) -> Catalog:
    """`base` with the records of one hardware file merged over it, or HardwareFileError."""
    data, root = _read_document(text, file)
    errors = _duplicate_keys(root) if root is not None else []
    records, prefix, hint_targets = _split_file(data, root, shipped=shipped, errors=errors)
    targets = list(base)
    hint_targets = hint_targets if shipped else base.hint_targets
    defined_here: set[str] = set()
    for index, record in enumerate(records):
        path = (*prefix, index)
        target = _record_to_target(record, path, root, base, defined_here, errors)
        if target is None:
            continue
        replaced = next((i for i, t in enumerate(targets) if t.id == target.id), None)
        if replaced is None:
            targets.append(target)
        else:
            targets[replaced] = target
    errors.extend(_name_collisions(targets, records, prefix, root))
    if errors:
        raise HardwareFileError(errors, file)
    return Catalog(targets, hint_targets)


def _split_file(data: Any, root: yaml.Node | None, *, shipped: bool, errors: list) -> tuple[list, tuple, tuple]:
    """The target records of a file, the path that holds them, and `hint_targets`."""
    shape_hint = "a hardware file holds a list of targets, or a mapping with a `targets:` list"
    if isinstance(data, list):
        return data, (), ()
    if not isinstance(data, dict):
        errors.append(_error("hardware file holds no targets", root, shape_hint))
        return [], (), ()
    allowed = ("targets", "hint_targets") if shipped else ("targets",)
    for name in data:
        if name not in allowed:
            hint = _did_you_mean(name, allowed) or shape_hint
            errors.append(_error(f"unknown key `{name}` in hardware file", _node_at(root, (name,), key=True), hint))
    records = data.get("targets")
    if not isinstance(records, list):
        errors.append(_error("`targets` must be a list of target records", _node_at(root, ("targets",)), shape_hint))
        records = []
    hint_targets = data.get("hint_targets") or ()
    return records, ("targets",), tuple(str(n) for n in hint_targets)


def _record_to_target(
    record: Any, path: tuple, root: yaml.Node | None, base: Catalog, defined_here: set, errors: list
) -> Target | None:
    """One validated target (an override merged over its base record), or None with
    errors appended."""
    if not isinstance(record, dict):
        errors.append(_error("a hardware target must be a mapping of keys", _node_at(root, path)))
        return None
    target_id = record.get("id")
    id_node = _node_at(root, (*path, "id"))
    if not isinstance(target_id, str):
        errors.append(_error("a hardware target needs an `id` (text)", id_node, "e.g. `id: my-gpu`"))
        return None
    if target_id in defined_here:
        errors.append(_error(f"target `{target_id}` is defined twice in this file", id_node))
        return None
    defined_here.add(target_id)
    existing = base.get(target_id)
    if existing is not None and existing.id != target_id:
        hint = f"write `id: {existing.id}` to override it"
        errors.append(_error(f"`{target_id}` is an alias of `{existing.id}`", id_node, hint))
        return None
    merged = _merge(existing.model_dump(mode="json"), record) if existing is not None else record
    try:
        target = Target.model_validate(merged)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            errors.append(_validation_error(err, target_id, path, root))
        return None
    found = _contradictions(target)
    for loc, message, hint in found:
        at_dtype_key = loc[0] in ("tflops", "gemm") and len(loc) == 2
        errors.append(_error(message, _node_at(root, (*path, *loc), key=at_dtype_key), hint))
    return None if found else target


def _merge(base: dict, override: dict) -> dict:
    """`override` over `base`: mappings merge, everything else replaces."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _validation_error(err: dict, target_id: str, path: tuple, root) -> SourceError:
    """A pydantic error as a PL130 diagnostic that names the field, at its place."""
    loc = tuple(err["loc"])
    who = f"hardware target `{target_id}`"
    if err["type"] == "extra_forbidden":
        hint = _did_you_mean(loc[-1], _fields_at(loc[:-1]))
        return _error(f"unknown key `{loc[-1]}` in {who}", _node_at(root, (*path, *loc), key=True), hint)
    if loc and loc[-1] == "[key]":  # a mapping key that is not a dtype
        key_loc = loc[:-1]
        section = ".".join(str(x) for x in key_loc[:-1])
        hint = _did_you_mean(key_loc[-1], DTYPES) or f"dtypes: {', '.join(DTYPES)}"
        node = _node_at(root, (*path, *key_loc), key=True)
        return _error(f"`{key_loc[-1]}` in `{section}` of {who} is not a dtype", node, hint)
    field = ".".join(str(x) for x in loc) or "record"
    if err["type"] == "missing":
        return _error(f"{who} lacks the required key `{field}`", _node_at(root, (*path, *loc)))
    message = err["msg"][:1].lower() + err["msg"][1:]
    return _error(f"`{field}` of {who}: {message}", _node_at(root, (*path, *loc)))


def _fields_at(loc: tuple) -> list[str]:
    """The keys allowed at a place in a record, for "did you mean"."""
    if not loc:
        return list(Target.model_fields)
    if len(loc) == 2 and loc[0] == "gemm":
        return list(GemmSupport.model_fields)
    return []


def _name_collisions(
    targets: list[Target], records: list, prefix: tuple, root: yaml.Node | None
) -> list[SourceError]:
    """Ids and aliases that would name two targets, reported where this file writes them."""
    in_file = {r.get("id"): i for i, r in enumerate(records) if isinstance(r, dict)}
    errors, owner = [], {}
    for target in targets:
        for name in target.names:
            first = owner.setdefault(name.lower(), target)
            if first.id == target.id:
                continue
            # Point at the record of this file: the later one, unless only the first is ours.
            here, other = (first, target) if target.id not in in_file and first.id in in_file else (target, first)
            node = None
            if here.id in in_file:
                where = ("id",) if name == here.id else ("aliases", list(here.aliases).index(name))
                node = _node_at(root, (*prefix, in_file[here.id], *where))
            message = f"hardware name `{name}` already names target `{other.id}`"
            errors.append(_error(message, node, "choose another alias"))
    return errors


# --------------------------------------------------------------------------- capabilities
@dataclass(frozen=True)
class Capability:
    """The answer of a capability check: truthy when `ok`. `reason` says why, `hint` what
    to do instead (refusals), `note` a kernel choice the report will name (library gaps)."""

    ok: bool
    reason: str
    hint: str | None = None
    note: str | None = None

    def __bool__(self) -> bool:
        return self.ok


def format_cc(compute_capability: str) -> str:
    """`"9.0"` -> `"compute capability 9.0 (sm_90)"`."""
    return f"compute capability {cc_text(compute_capability)}"


def cc_text(compute_capability: str) -> str:
    major, minor = _parse_cc(compute_capability)
    return f"{compute_capability} (sm_{major}{minor})"


def _native(target: Target, dtype: str) -> bool:
    """Does the target run `dtype` without emulation: gating, and its own `gemm` list."""
    return target.gemm_support(dtype) is not None


def _gating_failure(target: Target, dtype: str) -> str:
    """Why the gating rules refuse `dtype` on `target`, in the spec's words."""
    if target.is_cpu:
        if dtype == "tf32":
            return f"tf32 is a tensor-core format; target {target.id} has none"
        return f"{dtype} runs on target {target.id} only emulated"
    major, minor = MIN_COMPUTE_CAPABILITY[dtype]
    has = cc_text(target.compute_capability)
    return f"{dtype} needs {format_cc(f'{major}.{minor}')} or newer; target {target.id} has {has}"


def _fallback_dtype(target: Target, dtype: str) -> str | None:
    return next((d for d in _FALLBACK_DTYPES.get(dtype, ()) if _native(target, d)), None)


def _refusal_hint(target: Target, dtype: str, catalog: Catalog) -> str | None:
    """"use bf16 here, or target h100": the nearest dtype this target runs, and the most
    common target that runs the asked one (or emulation, on a CPU)."""
    parts = []
    fallback = _fallback_dtype(target, dtype)
    if fallback:
        parts.append(f"use {fallback} here")
    if target.is_cpu:
        if dtype != "tf32":
            parts.append("add `emulate: true` to run it as quantize-dequantize")
    else:
        other = catalog.hint_target(dtype, exclude=target)
        if other:
            parts.append(f"target {other}")
    return ", or ".join(parts) or None


def dtype_support(target: Target, dtype: str, *, emulate: bool = False, catalog: Catalog | None = None) -> Capability:
    """Can `target` run `dtype`? On CUDA targets tf32/bf16 need sm_80+, fp8_* sm_89+,
    mxfp8/nvfp4/mxfp4 sm_100+ (sm_120 included); fp16/fp32 run everywhere. A CPU runs
    fp32/bf16/fp16. With `emulate` every dtype is ok, run as quantize-dequantize.
    `catalog` (default: the shipped one) supplies the target a refusal's hint proposes."""
    if dtype not in DTYPES:
        return _unknown("dtype", dtype, DTYPES)
    if emulate:
        also = "; the target also runs it natively" if _native(target, dtype) else ""
        how = "as quantize-dequantize (for accuracy studies, not speed)"
        return Capability(True, f"{dtype} is emulated on target {target.id} {how}{also}")
    if _native(target, dtype):
        if target.is_cpu:
            where = "on the CPU" if dtype == "fp32" else "slowly, on the CPU"
        else:
            where = f"on {cc_text(target.compute_capability)}"
        return Capability(True, f"target {target.id} runs {dtype} {where}")
    catalog = catalog or load_catalog()
    if _gated_in(target, dtype):  # the chip could, but its own record lists no such GEMM
        reason = f"target {target.id} lists no {dtype} GEMM in its hardware record"
    else:
        reason = _gating_failure(target, dtype)
    return Capability(False, reason, _refusal_hint(target, dtype, catalog))


def _unknown(kind: str, word: str, options: Sequence[str]) -> Capability:
    hint = _did_you_mean(word, options) or f"{kind}s: {', '.join(options)}"
    return Capability(False, f"unknown {kind} `{word}`", hint)


def _default_scaling(dtype: str) -> str | None:
    if dtype in FP8_DTYPES:
        return "channel"
    if dtype in BLOCK_DTYPES:
        return "block"  # MX and NVFP4 always scale in their own blocks
    return None


def scaling_support(
    target: Target,
    dtype: str,
    scaling: str | None = None,
    activations: str | None = None,
    *,
    emulate: bool = False,
    catalog: Catalog | None = None,
) -> Capability:
    """Can `target` run `dtype` GEMMs with these weight scales (`tensor`/`channel`/`block`;
    None: the dtype's default) and activations (`keep`/`per_token`/`per_tensor`/
    `per_block`; None: keep)? Fails as `dtype_support` does for a dtype the target lacks;
    for a dtype it runs, every scaling the catalog lists is ok, and `note` names a library
    gap the runtime works around with its own kernel (e.g. per-token FP8 on sm_100/sm_120)."""
    supported = dtype_support(target, dtype, emulate=emulate, catalog=catalog)
    if not supported:
        return supported
    scaling = scaling or _default_scaling(dtype)
    activations = activations or "keep"
    if scaling is not None and scaling not in SCALINGS:
        return _unknown("scaling", scaling, SCALINGS)
    if activations not in ACTIVATION_QUANT:
        return _unknown("activation quantization", activations, ACTIVATION_QUANT)
    gemm = target.gemm_support(dtype)
    if gemm is None:  # only an emulated dtype gets here: quantize-dequantize takes any scales
        return Capability(True, f"{supported.reason}; quantize-dequantize takes any scaling")
    if scaling is not None and scaling not in gemm.weight_scalings:
        if not gemm.weight_scalings:
            return Capability(False, f"{dtype} takes no weight scales", "remove `scaling`")
        takes = ", ".join(gemm.weight_scalings)
        reason = f"{dtype} weights on target {target.id} scale by {takes}, not `{scaling}`"
        return Capability(False, reason, f"use scaling: {gemm.weight_scalings[0]}")
    if activations not in gemm.activations:
        if gemm.activations == ("keep",):
            reason = f"{dtype} leaves activations as they are (`keep`), not `{activations}`"
            return Capability(False, reason, "remove `activations`")
        takes = ", ".join(gemm.activations)
        reason = f"{dtype} on target {target.id} takes activations {takes}, not `{activations}`"
        return Capability(False, reason, f"use activations: {gemm.activations[0]}")
    what = f"{dtype} with {scaling or 'no'} weight scales and activations {activations}"
    return Capability(True, f"target {target.id} runs {what}", note=gemm.kernel_notes.get(activations))


def cuda_graphs_support(target: Target) -> Capability:
    """Can `target` capture CUDA graphs?"""
    if target.cuda_graphs:
        return Capability(True, f"target {target.id} captures CUDA graphs")
    return Capability(False, f"target {target.id} has no CUDA graphs", "use `graphs: {capture: none}` here")


def triton_support(target: Target) -> Capability:
    """Does `target` run planlang's Triton kernels?"""
    if target.triton:
        return Capability(True, f"target {target.id} runs Triton kernels")
    hint = "the runtime uses its plain PyTorch kernels here"
    return Capability(False, f"target {target.id} does not run Triton kernels", hint)


# --------------------------------------------------------------------------- detection
@dataclass(frozen=True)
class DetectResult:
    """What `detect` found: the catalog target (None: a GPU no catalog target fits),
    the device name as the driver reports it, how it was found, and what it reported."""

    target_id: str | None
    name: str
    how: str
    compute_capability: str | None
    memory_gb: float | None = None
    gpu_count: int = 1


@dataclass(frozen=True)
class _Gpu:
    name: str
    compute_capability: str | None
    memory_gb: float | None  # GiB, as drivers count it; "80GB" cards report ~79.6


def detect(*, use_torch: bool = False, catalog: Catalog | None = None) -> DetectResult | None:
    """The GPU of this machine as a catalog target, found through NVML (`pynvml`) or
    `nvidia-smi` without importing torch; the first GPU speaks for all. None when neither
    finds a GPU (the caller says so and runs no hardware checks). With `use_torch`, torch
    is asked last and a machine without a CUDA GPU is the `cpu` target."""
    catalog = catalog or load_catalog()
    for how, query in (("NVML", _query_nvml), ("nvidia-smi", _query_nvidia_smi)):
        gpus = query()
        if gpus:
            return _detected(gpus, how, catalog)
    if not use_torch:
        return None
    gpus = _query_torch()
    if gpus:
        return _detected(gpus, "torch", catalog)
    host = platform.processor() or platform.machine() or "cpu"
    return DetectResult("cpu", host, "no CUDA GPU found", None)


def _detected(gpus: list[_Gpu], how: str, catalog: Catalog) -> DetectResult:
    gpu = gpus[0]
    target, why = match_gpu(gpu.name, gpu.compute_capability, gpu.memory_gb, catalog=catalog)
    target_id = target.id if target else None
    return DetectResult(target_id, gpu.name, f"{how}: {why}", gpu.compute_capability, gpu.memory_gb, len(gpus))


def _norm(text: str) -> str:
    return " ".join(re.split(r"[\s_-]+", text.lower())).strip()


def _memory_distance(target: Target, memory_gb: float | None) -> float:
    return abs(target.memory_gb - memory_gb) if memory_gb else 0.0


def match_gpu(
    name: str,
    compute_capability: str | None = None,
    memory_gb: float | None = None,
    *,
    catalog: Catalog | None = None,
) -> tuple[Target | None, str]:
    """The catalog target for a GPU, and why: by the targets' `match` substrings (whole
    words of the name, case and dashes ignored; the longest wins, ties go to the closest
    memory), else by compute capability (the same, else the newest of the same major
    below it, closest memory first). (None, why) when nothing fits."""
    catalog = catalog or load_catalog()
    gpu = _norm(name)
    scored = []
    for order, target in enumerate(catalog):
        for pattern in target.match:
            if re.search(rf"(?<![a-z0-9]){re.escape(_norm(pattern))}(?![a-z0-9])", gpu):
                scored.append((-len(_norm(pattern)), _memory_distance(target, memory_gb), order, pattern, target))
    if scored:
        _, _, _, pattern, target = min(scored, key=lambda s: s[:3])
        return target, f"'{name}' matches '{pattern}' of {target.id}"
    if not compute_capability or not re.match(r"^\d+\.\d+$", compute_capability):
        return None, f"'{name}' matches no catalog target"
    cc = _parse_cc(compute_capability)
    gpus = [t for t in catalog if t.cc is not None]
    exact = [t for t in gpus if t.cc == cc]
    below = [t for t in gpus if t.cc[0] == cc[0] and t.cc < cc]
    if not exact and below:
        newest = max(t.cc for t in below)
        exact = [t for t in below if t.cc == newest]
    if not exact:
        return None, f"'{name}' ({format_cc(compute_capability)}) matches no catalog target"
    order = {t.id: i for i, t in enumerate(catalog)}
    target = min(exact, key=lambda t: (_memory_distance(t, memory_gb), order[t.id]))
    return target, f"'{name}' taken as {target.id} by {format_cc(compute_capability)}"


def _query_nvml() -> list[_Gpu] | None:
    """The GPUs NVML reports, None when pynvml or the driver is missing."""
    try:
        with warnings.catch_warnings():  # some pynvml releases warn on import
            warnings.simplefilter("ignore")
            import pynvml  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - any import failure means: no NVML here
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver, no GPU
        return None
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            cc = memory = None
            try:
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
                cc = f"{major}.{minor}"
            except Exception:  # noqa: BLE001 - old drivers lack the call
                pass
            try:
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30
            except Exception:  # noqa: BLE001
                pass
            gpus.append(_Gpu(name, cc, memory))
        return gpus
    except Exception:  # noqa: BLE001 - a broken NVML is no NVML
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def _run_nvidia_smi(executable: str, fields: str) -> str | None:
    import subprocess  # here, not at the top: only a machine with nvidia-smi needs it
    try:
        proc = subprocess.run(
            [executable, f"--query-gpu={fields}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):  # missing, not executable, hung driver
        return None
    return proc.stdout if proc.returncode == 0 else None


def _query_nvidia_smi() -> list[_Gpu] | None:
    """The GPUs `nvidia-smi` lists, None when it is missing or fails. Drivers older than
    the `compute_cap` field get a second query without it."""
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return None
    for fields in ("name,compute_cap,memory.total", "name,memory.total"):
        out = _run_nvidia_smi(executable, fields)
        if out is None:
            continue
        gpus = [_parse_smi_line(line, "compute_cap" in fields) for line in out.splitlines() if line.strip()]
        gpus = [g for g in gpus if g is not None]
        if gpus:
            return gpus
    return None


def _parse_smi_line(line: str, with_cc: bool) -> _Gpu | None:
    cells = [c.strip() for c in line.split(",")]
    if len(cells) != (3 if with_cc else 2) or not cells[0]:
        return None
    cc = cells[1] if with_cc and re.match(r"^\d+\.\d+$", cells[1]) else None
    memory = re.match(r"^([\d.]+)\s*MiB$", cells[-1])
    return _Gpu(cells[0], cc, float(memory.group(1)) / 1024 if memory else None)


def _query_torch() -> list[_Gpu] | None:
    """The CUDA GPUs torch sees (imported here only); None without torch or a GPU."""
    try:
        import torch  # noqa: PLC0415 - only `planlang detect` comes here
    except Exception:  # noqa: BLE001
        return None
    try:
        if not torch.cuda.is_available():
            return None
        gpus = []
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            # ROCm reports its gfx version as a "capability": no CUDA target fits it.
            cc = None if getattr(torch.version, "hip", None) else f"{props.major}.{props.minor}"
            gpus.append(_Gpu(props.name, cc, props.total_memory / 2**30))
        return gpus
    except Exception:  # noqa: BLE001 - a broken CUDA setup is no GPU
        return None


__all__ = [
    "Capability", "Catalog", "DetectResult", "GemmSupport", "HardwareFileError", "Target",
    "CPU_DTYPES", "MIN_COMPUTE_CAPABILITY", "cuda_graphs_support", "detect", "dtype_support",
    "format_cc", "load_catalog", "match_gpu", "scaling_support", "triton_support",
]
