"""`memory.offload`: the selected modules' weights live in pinned host memory and stream
through a ring of `prefetch + 1` device slots, one layer ahead of the compute.

How it works (docs/memory.md has the picture):

- `prepare_offload` (in `apply`, before the trace) resolves each rule to its *units* (the
  outermost modules its selector names, in model order), pins host memory for them (a clear
  error, before anything moves, when it cannot) and installs hooks that do nothing until the
  ring is armed: the model's forward pre-hook runs `planlang::offload_begin`, each unit's
  pre-hook `planlang::offload_enter`, and in training each unit's forward hook
  `planlang::offload_exit`, whose backward is `planlang::offload_bwd_enter`. They are custom
  ops: Dynamo keeps them in the graph as opaque calls and Inductor orders them by data, since
  each returns a copy of the activation the unit reads (every kernel of the unit depends on
  it), so compiled graphs and CUDA graphs keep the schedule without graph breaks.
- `Offload.arm()` (in `apply`, after the first compiled call built the fused weights and
  before CUDA graphs are captured) copies every storage the unit's tensors live on
  (parameters, persistent buffers and the fused weights they are views of) into the unit's
  pinned host block, then points each of those storages at the unit's place in ring slot
  `unit % depth` (torch >= 2.13: `UntypedStorage._swap_data_ptr_`, which FSDP and CUDA-graph
  trees use; older torch: every live tensor on the storage, found through the garbage
  collector, is `set_` onto the slot). Every tensor on such a storage, base or view, whoever
  holds it (the model, the fused weights, a compiled graph), reads the slot from then on,
  and its address never changes: a captured graph replays the copies. The device memory the
  units held is freed.
- The schedule, ring depth R: `begin` forks the side stream from the compute stream and
  copies units 0..R-1; `enter(j)` releases unit j-1's slot (an event on the compute stream
  that the side stream waits for), copies unit j-1+R into it, and makes the compute stream
  wait for unit j's copy. Training walks the same ring in reverse for the backward pass
  (`bwd_enter(j)` runs before unit j's backward); gradients of offloaded parameters are
  copied to pinned host memory as they are accumulated (a second stream, so they overlap
  the prefetches) and `HostAdamW` updates their FP32 master weights on the host.
- On the CPU there is nothing to move to: the same ring runs with synchronous copies
  between CPU buffers (the bookkeeping path), so outputs stay equal, and the report says so.
"""
from __future__ import annotations

import gc
import itertools
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from planlang.diagnostics import CODES, Diagnostic, at

from ..kernels.backend import register_op

ALIGN = 512  # every storage starts at a multiple of this in its slot (Inductor assumes 16)
# "offload cannot pin host memory": PL316 once diagnostics.py has it (see docs/memory.md).
PIN_CODE = "PL316" if "PL316" in CODES else "PL207"

# The custom ops find their ring by id. The model holds its Offload (`_planlang_offload`),
# which holds the rings and their slots, so slots live exactly as long as the tensors that
# point into them.
_RINGS: "weakref.WeakValueDictionary[int, Ring]" = weakref.WeakValueDictionary()
_RING_IDS = itertools.count(1)
_UNIT_MODULES: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


# ----------------------------------------------------------------------------- custom ops

def _armed(ring: int) -> Optional["Ring"]:
    r = _RINGS.get(ring)
    return r if r is not None and r.armed else None


def _begin(x: torch.Tensor, ring: int) -> torch.Tensor:
    r = _armed(ring)
    if r is not None:
        r.begin()
    return x.clone()


def _enter(x: torch.Tensor, ring: int, unit: int) -> torch.Tensor:
    r = _armed(ring)
    if r is not None:
        r.enter(unit)
    return x.clone()


def _exit(x: torch.Tensor, ring: int, unit: int) -> torch.Tensor:
    return x.clone()


def _bwd_enter(grad: torch.Tensor, ring: int, unit: int) -> torch.Tensor:
    r = _armed(ring)
    if r is not None:
        r.bwd_enter(unit)
    return grad.clone()


def _like(x, *_):
    return torch.empty_like(x)


def _identity_backward(ctx, grad):
    return (grad,) + (None,) * ctx.extra


def _setup_extra(n):
    def setup(ctx, inputs, output):
        ctx.extra = n
    return setup


def _exit_setup(ctx, inputs, output):
    ctx.ring, ctx.unit = inputs[1], inputs[2]


def _exit_backward(ctx, grad):
    return torch.ops.planlang.offload_bwd_enter(grad, ctx.ring, ctx.unit), None, None


def _define_ops() -> None:
    specs = (("offload_begin", _begin, _identity_backward, _setup_extra(1)),
             ("offload_enter", _enter, _identity_backward, _setup_extra(2)),
             ("offload_exit", _exit, _exit_backward, _exit_setup),
             ("offload_bwd_enter", _bwd_enter, None, None))
    for name, fn, backward, setup in specs:
        op = register_op(name, fn, _like)
        if backward is not None and hasattr(op, "register_autograd"):
            op.register_autograd(backward, setup_context=setup)


_define_ops()


@torch._dynamo.disable
def _enter_untraced(ring: int, unit: int) -> None:
    """A unit called without any tensor argument: enter it outside the graph."""
    r = _armed(ring)
    if r is not None:
        r.enter(unit)


# ----------------------------------------------------------------------------- units and rings

def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _unit_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers under `module` (KV caches and other non-persistent
    buffers are state the forward writes: they stay on the device)."""
    out = [(n, p) for n, p in module.named_parameters()]
    for mod_name, mod in module.named_modules():
        for name, b in mod.named_buffers(recurse=False):
            if b is not None and name not in mod._non_persistent_buffers_set:
                out.append((f"{mod_name}.{name}".strip("."), b))
    return out


def _storage_owners(model: nn.Module) -> dict[int, set[str]]:
    """Storage -> the module paths whose parameters or buffers live on it."""
    owners: dict[int, set[str]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        tensors = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
        for _, t in tensors:
            if t is not None and t.device.type != "meta":
                owners.setdefault(_storage_key(t), set()).add(mod_name)
    return owners


def _bytes_of(storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage, 0, (storage.nbytes(),), (1,))


@dataclass
class _Region:
    """One storage of a unit and where it sits in the unit's host block and slot."""

    storage: Optional[torch.UntypedStorage]
    nbytes: int
    offset: int
    tensors: Optional[list] = None   # without pointer swaps: (weakref, storage offset) of each tensor on it


# torch >= 2.13 swaps a storage's data pointer, which every tensor on it follows, whoever
# holds it. Older torch: every live tensor on the storage (found through the garbage
# collector: the model's, the fused weights', a compiled graph's) is `set_` onto the slot.
SWAP = hasattr(torch.UntypedStorage, "_swap_data_ptr_") and hasattr(torch._C, "_construct_storage_from_data_pointer")


def _tensors_on(keys: set[int]) -> dict[int, list[torch.Tensor]]:
    """Every live Python tensor whose storage is one of `keys`, by storage."""
    found: dict[int, list[torch.Tensor]] = {}
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.Tensor):
            continue
        try:
            key = obj.untyped_storage()._cdata
        except (RuntimeError, NotImplementedError, TypeError):  # fake, functional or sparse tensors
            continue
        if key in keys:
            found.setdefault(key, []).append(obj)
    return found


def _repoint(r: _Region, slot: torch.Tensor, holders: Optional[dict]) -> Optional[int]:
    """Point the region's storage (every tensor on it) at its place in `slot`; the device
    memory it had is freed once nothing holds it. Without pointer swaps, returns a weak
    reference to the old storage (to check that it was freed)."""
    dev = slot.device
    if SWAP:
        view = torch._C._construct_storage_from_data_pointer(slot.data_ptr() + r.offset, dev, r.nbytes)
        r.storage._swap_data_ptr_(view)
        del view  # it now owns the unit's old device memory: freed here
        return None
    key = r.storage._cdata
    weak = r.storage._weak_ref()
    r.tensors = []
    with torch.no_grad():
        for t in holders.get(key, []):
            es = t.element_size()
            r.tensors.append((weakref.ref(t), t.storage_offset()))
            t.set_(slot.untyped_storage(), r.offset // es + t.storage_offset(), t.size(), t.stride())
    holders.pop(key, None)
    r.storage = None
    return weak


def _restore(r: _Region, fresh: torch.Tensor) -> None:
    """Undo `_repoint`: the region's tensors live on `fresh` (their own memory) again."""
    if SWAP:
        r.storage._swap_data_ptr_(fresh.untyped_storage())
        return  # fresh's storage now points at the slot and owns nothing
    with torch.no_grad():
        for ref, offset in r.tensors or []:
            t = ref()
            if t is not None:
                t.set_(fresh.untyped_storage(), offset, t.size(), t.stride())
    r.storage = fresh.untyped_storage()


@dataclass
class _HostParam:
    """Training: an offloaded parameter's host side."""

    name: str
    param: nn.Parameter
    mirror: torch.Tensor       # its bytes in the unit's host block (what the ring copies up)
    master: torch.Tensor       # FP32 master weight (the mirror itself for an FP32 parameter)
    grad: torch.Tensor         # pinned staging for its gradient, in the parameter's dtype
    pending: bool = False


class Unit:
    """One offloaded module: its storages, its host block, its place in the ring."""

    def __init__(self, path: str, module: nn.Module, index: int):
        self.path, self.module, self.index = path, module, index
        self.regions: list[_Region] = []
        self.nbytes = 0
        self.host: Optional[torch.Tensor] = None
        self.grad_host: Optional[torch.Tensor] = None
        self.params: list[_HostParam] = []
        self.kept: list[str] = []           # tensors shared with modules outside the unit
        self.ready = None                   # CUDA event: its latest copy into its slot

    def estimate(self) -> int:
        seen, total = set(), 0
        for _, t in _unit_tensors(self.module):
            key = _storage_key(t)
            if key not in seen and t.device.type != "meta":
                seen.add(key)
                total += _align(t.untyped_storage().nbytes())
        return total

    def collect(self, owners: dict[int, set[str]], device: torch.device) -> None:
        """The storages to move, now that fused weights exist (their parts are views)."""
        self.regions, self.kept, offset, seen = [], [], 0, set()
        prefix = self.path + "."
        for name, t in _unit_tensors(self.module):
            key = _storage_key(t)
            if key in seen:
                continue
            seen.add(key)
            outside = [o for o in owners.get(key, ()) if o != self.path and not o.startswith(prefix)]
            if outside or t.device != device:
                self.kept.append(f"{self.path}.{name}" + (f" (shared with {sorted(outside)[0]})" if outside else ""))
                continue
            st = t.untyped_storage()
            self.regions.append(_Region(st, st.nbytes(), offset))
            offset += _align(st.nbytes())
        self.nbytes = offset


class Ring:
    """The slots one offload rule's units share, and the schedule that fills them."""

    def __init__(self, rule: int, units: list[Unit], depth: int, offload: "Offload"):
        self.id = next(_RING_IDS)
        self.rule, self.units = rule, units
        self.depth = depth
        self.offload = offload
        self.slots: list[torch.Tensor] = []
        self.slot_bytes = 0
        self.armed = False
        self.reuse = offload.training    # skip copies a slot already holds (no graph capture in training)
        self.holds: dict[int, int] = {}  # slot -> unit index it holds (reuse only)
        self.seq: list[int] = []
        self.cursor = -1
        self.backward = False
        self.released: list = []
        self.fork = None
        _RINGS[self.id] = self

    # -- the schedule (host side; on CUDA it enqueues stream work, on the CPU it copies)
    def _cuda(self) -> bool:
        return self.offload.device.type == "cuda"

    def _fetch(self, u: int, release: bool) -> None:
        unit, s = self.units[u], u % self.depth
        if self.reuse and self.holds.get(s) == u:
            return
        dst = self.slots[s][:unit.nbytes]
        if self._cuda():
            side = self.offload.side
            if release:
                ev = self.released[s]
                ev.record(torch.cuda.current_stream(self.offload.device))
                side.wait_event(ev)
            with torch.cuda.stream(side):
                dst.copy_(unit.host, non_blocking=True)
                unit.ready.record(side)
        else:
            dst.copy_(unit.host)
        self.holds[s] = u

    def _wait(self, u: int) -> None:
        if self._cuda():
            torch.cuda.current_stream(self.offload.device).wait_event(self.units[u].ready)

    def _restart(self, seq: list[int], backward: bool) -> None:
        self.seq, self.cursor, self.backward = seq, -1, backward
        first = seq[:self.depth]
        todo = [u for u in first if not (self.reuse and self.holds.get(u % self.depth) == u)]
        if todo and self._cuda():
            self.fork.record(torch.cuda.current_stream(self.offload.device))
            self.offload.side.wait_event(self.fork)
        for u in todo:
            self._fetch(u, release=False)

    def _step(self, u: int, backward: bool) -> None:
        nxt = self.cursor + 1
        if self.backward != backward or nxt >= len(self.seq) or self.seq[nxt] != u:
            n = len(self.units)
            self._restart(list(range(u, -1, -1)) if backward else list(range(u, n)), backward)
            nxt = 0
        if self.cursor >= 0 and self.cursor + self.depth < len(self.seq):
            self._fetch(self.seq[self.cursor + self.depth], release=True)
        self.cursor = nxt
        self._wait(u)

    def begin(self) -> None:
        self._restart(list(range(len(self.units))), backward=False)

    def enter(self, u: int) -> None:
        self._step(u, backward=False)

    def bwd_enter(self, u: int) -> None:
        self._step(u, backward=True)

    def invalidate(self) -> None:
        """The host copies changed (an optimizer step): every slot must be fetched again."""
        self.holds.clear()
        self.cursor, self.seq = -1, []


class Offload:
    """What `prepare_offload` set up; `arm()` moves the weights. `stats()` says what the
    rings hold; in training, `params()` are the parameters the host updates
    (`host_optimizer()`), which the device optimizer must leave out."""

    def __init__(self, model: nn.Module, device: torch.device, training: bool, report=None):
        self.model = model
        self.device = device
        self.training = training
        self.report = report
        self.rings: list[Ring] = []
        self.armed = False
        self.side = None
        self.d2h = None
        self.handles: list = []
        self.grad_handles: list = []
        self._host_params: dict[int, _HostParam] = {}
        self._pinned: dict[str, torch.Tensor] = {}
        self._rule_reports: dict[int, Any] = {}
        self.notes: list[str] = []

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    # -- arming
    def _host_block(self, nbytes: int, key: str) -> torch.Tensor:
        block = self._pinned.pop(key, None)
        if block is not None and block.numel() >= nbytes:
            return block[:nbytes]
        return pin_host(nbytes) if self.cuda else torch.empty(nbytes, dtype=torch.uint8)

    def arm(self, weights: Any = None) -> None:
        """Move the units' weights to host memory and point them at the ring slots. Call
        after fused weights exist and before CUDA graphs are captured. The storages are
        found from the model (`weights`, the FusedWeights, is not needed)."""
        if self.armed:
            return
        dev = self.device
        owners = _storage_owners(self.model)
        for ring in self.rings:
            for unit in ring.units:
                unit.collect(owners, dev)
                unit.host = self._host_block(max(unit.nbytes, 1), unit.path)
                for r in unit.regions:
                    unit.host[r.offset:r.offset + r.nbytes].copy_(_bytes_of(r.storage, dev))
            ring.slot_bytes = max([u.nbytes for u in ring.units] + [ALIGN])
        if self.training:
            self._arm_training()
        self._pinned.clear()
        if self.cuda:
            torch.cuda.synchronize(dev)
            self.side = torch.cuda.Stream(dev)
            self.d2h = torch.cuda.Stream(dev)
        holders = None if SWAP else _tensors_on({r.storage._cdata for ring in self.rings
                                                 for u in ring.units for r in u.regions})
        weak = []
        for ring in self.rings:
            ring.slots = [torch.empty(ring.slot_bytes, dtype=torch.uint8, device=dev) for _ in range(ring.depth)]
            if self.cuda:
                ring.released = [torch.cuda.Event() for _ in range(ring.depth)]
                ring.fork = torch.cuda.Event()
            for unit in ring.units:
                if self.cuda:
                    unit.ready = torch.cuda.Event()
                slot = ring.slots[unit.index % ring.depth]
                for r in unit.regions:
                    weak.append(_repoint(r, slot, holders))
            for unit in ring.units[:ring.depth]:  # the slots hold the first units until a forward runs
                ring.slots[unit.index % ring.depth][:unit.nbytes].copy_(unit.host)
                ring.holds[unit.index % ring.depth] = unit.index
        holders = None
        if not SWAP:
            gc.collect()  # what only the garbage collector frees must go before we count
        kept = 0
        for w in weak:
            if w is not None:
                kept += not torch.UntypedStorage._expired(w)
                torch.UntypedStorage._free_weak_ref(w)
        if kept:
            self.notes.append(f"{kept} storage(s) stay allocated on the device: something outside the model "
                              "still holds a tensor on them")
        if self.cuda:
            torch.cuda.synchronize(dev)
        for ring in self.rings:
            ring.armed = True
        self.armed = True
        self._report_armed()

    def _arm_training(self) -> None:
        for ring in self.rings:
            for unit in ring.units:
                regions = {r.storage._cdata: r for r in unit.regions}
                params = [(n, p) for n, p in unit.module.named_parameters()
                          if p.requires_grad and _storage_key(p) in regions]
                size = sum(_align(p.numel() * p.element_size()) for _, p in params)
                unit.grad_host = self._host_block(max(size, 1), unit.path + "#grad")
                off = 0
                for name, p in params:
                    r = regions[_storage_key(p)]
                    region = unit.host[r.offset:r.offset + r.nbytes].view(p.dtype)
                    # as_strided's offset counts from the start of the block's storage
                    mirror = region.as_strided(p.shape, p.stride(), region.storage_offset() + p.storage_offset())
                    master = mirror if p.dtype == torch.float32 else mirror.float()
                    n = p.numel() * p.element_size()
                    grad = unit.grad_host[off:off + n].view(p.dtype).view(p.shape)
                    off += _align(n)
                    hp = _HostParam(f"{unit.path}.{name}", p, mirror, master, grad)
                    unit.params.append(hp)
                    self._host_params[id(p)] = hp
                    self.grad_handles.append(p.register_post_accumulate_grad_hook(self._grad_hook))

    def _grad_hook(self, p: torch.Tensor) -> None:
        hp = self._host_params.get(id(p))
        if hp is None or not self.armed or p.grad is None:
            return
        if hp.pending:
            raise RuntimeError(f"offload: {hp.name} got a second gradient before the host optimizer stepped; "
                               "offloaded parameters take one backward per step (no gradient accumulation)")
        g = p.grad
        if self.cuda:
            self.d2h.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.d2h):
                hp.grad.copy_(g, non_blocking=True)
            g.record_stream(self.d2h)
        else:
            hp.grad.copy_(g)
        p.grad = None
        hp.pending = True

    # -- training API
    def params(self) -> list[nn.Parameter]:
        """The parameters whose gradients and updates live on the host (training)."""
        return [hp.param for hp in self._host_params.values()]

    def synchronize(self) -> None:
        """Wait for every copy in flight (prefetches and gradients)."""
        if self.cuda and self.side is not None:
            self.side.synchronize()
            self.d2h.synchronize()

    def gradients(self) -> dict[str, torch.Tensor]:
        """Host copies of the offloaded gradients of the last backward, by parameter name."""
        self.synchronize()
        return {hp.name: hp.grad for hp in self._host_params.values() if hp.pending}

    def host_optimizer(self, lr: float = 1e-4, betas=(0.9, 0.95), eps: float = 1e-8,
                       weight_decay: float = 0.0) -> "HostAdamW":
        return HostAdamW(self, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def invalidate(self) -> None:
        for ring in self.rings:
            ring.invalidate()

    # -- undoing
    def disarm(self) -> None:
        """Give the units their device memory back (current weights, from the host)."""
        if not self.armed:
            return
        self.synchronize()
        for ring in self.rings:
            ring.armed = False
            for unit in ring.units:
                for r in unit.regions:
                    fresh = torch.empty(r.nbytes, dtype=torch.uint8, device=self.device)
                    fresh.copy_(unit.host[r.offset:r.offset + r.nbytes])
                    _restore(r, fresh)
            ring.invalidate()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        for h in self.grad_handles:
            h.remove()
        self.grad_handles.clear()
        self._host_params.clear()
        for ring in self.rings:
            ring.slots = []
            for unit in ring.units:
                unit.params, unit.host, unit.grad_host = [], None, None
        self.armed = False

    def close(self) -> None:
        """Disarm and remove the hooks: the model is as it was before `prepare_offload`."""
        self.disarm()
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for ring in self.rings:
            _RINGS.pop(ring.id, None)
            for unit in ring.units:
                _UNIT_MODULES.discard(unit.module)
        if self.model.__dict__.get("_planlang_offload") is self:
            del self.model.__dict__["_planlang_offload"]

    # -- reporting
    def stats(self) -> dict:
        """Bytes per ring: what the device holds (the slots) against what the units would."""
        rings = []
        for ring in self.rings:
            layer = sum(u.nbytes for u in ring.units)
            rings.append({"rule": ring.rule, "units": [u.path for u in ring.units], "depth": ring.depth,
                          "slot_bytes": ring.slot_bytes, "ring_bytes": ring.depth * ring.slot_bytes,
                          "layer_bytes": layer,
                          "host_bytes": sum(u.host.numel() for u in ring.units if u.host is not None),
                          "kept_on_device": [k for u in ring.units for k in u.kept]})
        return {"device": str(self.device), "training": self.training, "armed": self.armed, "rings": rings,
                "ring_bytes": sum(r["ring_bytes"] for r in rings), "layer_bytes": sum(r["layer_bytes"] for r in rings)}

    def _report_armed(self) -> None:
        if self.report is None:
            return
        mib = 2 ** 20
        for r in self.stats()["rings"]:
            rule = self._rule_reports.get(r["rule"])
            where = ("host memory (CPU: nothing to free, the ring runs with synchronous copies)"
                     if not self.cuda else "pinned host memory")
            note = (f"device holds {r['ring_bytes'] / mib:.1f} MiB ({r['depth']} slot(s) of {r['slot_bytes'] / mib:.1f} MiB) "
                    f"instead of {r['layer_bytes'] / mib:.1f} MiB for {len(r['units'])} module(s); weights in {where}")
            if r["kept_on_device"]:
                note += f"; kept on the device (shared outside the unit): {', '.join(r['kept_on_device'][:3])}"
            if rule is not None:
                rule.note = note
            self.report.notes.append(f"offload rule {r['rule']}: {note}")
        self.report.notes.extend(f"offload: {n}" for n in self.notes)


class HostAdamW:
    """AdamW on the host for offloaded parameters: one torch AdamW (fused on the CPU where
    this torch has it) per unit over FP32 master weights; after each step the units' host
    blocks take the new weights (in the parameters' dtype) and the rings fetch them again."""

    def __init__(self, offload: Offload, **hp):
        self.offload = offload
        self.units = [u for ring in offload.rings for u in ring.units if u.params]
        self.opts = [adamw([p.master for p in u.params], "cpu", **hp) for u in self.units]

    def step(self) -> None:
        self.offload.synchronize()
        for unit, opt in zip(self.units, self.opts):
            live = [hp for hp in unit.params if hp.pending]
            if not live:
                continue
            for hp in live:
                hp.master.grad = hp.grad if hp.master is hp.mirror else hp.grad.float()
            opt.step()
            for hp in live:
                if hp.master is not hp.mirror:
                    hp.mirror.copy_(hp.master)
                hp.master.grad = None
                hp.pending = False
        self.offload.invalidate()

    def zero_grad(self) -> None:
        for unit in self.units:
            for hp in unit.params:
                hp.pending = False
                hp.master.grad = None

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for opt in self.opts for s in opt.state.values()
                   for t in s.values() if isinstance(t, torch.Tensor))


def adamw(params: list[torch.Tensor], device_type: str, **hp) -> torch.optim.AdamW:
    """torch's AdamW, fused where this torch has it for `device_type`, else foreach."""
    try:
        return torch.optim.AdamW(params, fused=True, **hp)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, foreach=device_type == "cuda", **hp)


# ----------------------------------------------------------------------------- prepare (apply's hook)

def _units_by_rule(model: nn.Module, plan) -> dict[int, list[tuple[str, nn.Module]]]:
    """Rule index -> its units: the outermost modules its selector names, in model order.
    A module two rules name belongs to the later one."""
    from . import outermost_owners
    mods = dict(model.named_modules())
    out: dict[int, list[tuple[str, nn.Module]]] = {}
    for n, i in outermost_owners(model, plan.memory.offload).items():
        out.setdefault(i, []).append((n, mods[n]))
    return out


def _first_tensor(args: tuple, kwargs: dict) -> tuple[Optional[str], Any]:
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            return i, a
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            return k, v
    return None, None


def _replace(args: tuple, kwargs: dict, where, value) -> tuple[tuple, dict]:
    if isinstance(where, int):
        args = args[:where] + (value,) + args[where + 1:]
    else:
        kwargs = dict(kwargs)
        kwargs[where] = value
    return args, kwargs


def _begin_hook(ring_ids: list[int]) -> Callable:
    def hook(module, args, kwargs):
        where, t = _first_tensor(args, kwargs)
        if t is None:
            return None
        for rid in ring_ids:
            t = torch.ops.planlang.offload_begin(t, rid)
        return _replace(args, kwargs, where, t)
    return hook


def _enter_hook(ring_id: int, unit: int) -> Callable:
    def hook(module, args, kwargs):
        where, t = _first_tensor(args, kwargs)
        if t is None:
            _enter_untraced(ring_id, unit)
            return None
        return _replace(args, kwargs, where, torch.ops.planlang.offload_enter(t, ring_id, unit))
    return hook


def _exit_hook(ring_id: int, unit: int) -> Callable:
    def hook(module, args, output):
        if isinstance(output, torch.Tensor):
            return torch.ops.planlang.offload_exit(output, ring_id, unit)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (torch.ops.planlang.offload_exit(output[0], ring_id, unit),) + output[1:]
        return None  # nothing to carry the backward hook: that unit's backward restarts the ring
    return hook


def _error(source, path, msg: str, hint: str) -> Exception:
    from ..apply import ApplyError
    return ApplyError([at(source, path, PIN_CODE, msg, hint=hint, severity="error")])


def pin_host(nbytes: int) -> torch.Tensor:
    """`nbytes` of pinned (page-locked) host memory."""
    return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)


def _grad_estimate(unit: Unit) -> int:
    return sum(_align(p.numel() * p.element_size()) for p in unit.module.parameters() if p.requires_grad)


def _pin_all(off: Offload, plan, source, training: bool) -> None:
    """Pin every unit's host block (and gradient staging in training) now; on failure free
    what was pinned and raise the diagnostic at the rule."""
    for ring in off.rings:
        for u in ring.units:
            try:
                off._pinned[u.path] = pin_host(u.estimate())
                if training:
                    off._pinned[u.path + "#grad"] = pin_host(_grad_estimate(u))
            except RuntimeError as exc:
                off._pinned.clear()
                for r in off.rings:
                    _RINGS.pop(r.id, None)
                rule = plan.memory.offload[ring.rule]
                need = sum(u.estimate() + (_grad_estimate(u) if training else 0) for u in ring.units)
                raise _error(source, ("memory", "offload", ring.rule),
                             f"cannot pin {need / 2**30:.2f} GiB of host memory for offload '{rule.at}' "
                             f"({str(exc).splitlines()[0][:200]})",
                             "free host memory, offload fewer layers, or raise the locked-memory limit (ulimit -l)")


def prepare_offload(model: nn.Module, plan, device, report, source) -> Offload:
    """Validate the offload rules against this model and device and install the (unarmed)
    hooks; raises ApplyError before anything moves when host memory cannot be pinned.
    Returns the Offload that `arm()` later fills."""
    from ..apply import RuleReport
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())  # storages compare devices with their index
    previous = model.__dict__.get("_planlang_offload")
    if previous is not None:
        previous.close()  # a second apply on the same model replaces the first offload
    training = plan.mode == "training"
    off = Offload(model, device, training, report)
    by_rule = _units_by_rule(model, plan)
    if device.type not in ("cuda", "cpu"):
        raise _error(source, ("memory", "offload", 0), f"offload needs a CUDA device or the CPU, not {device.type}",
                     "drop the memory.offload rules for this device")
    for i, units in sorted(by_rule.items()):
        rule = plan.memory.offload[i]
        ring_units = [Unit(path, mod, k) for k, (path, mod) in enumerate(units)]
        depth = max(1, min(rule.prefetch + 1, len(ring_units)))
        off.rings.append(Ring(i, ring_units, depth, off))
    if device.type == "cuda":
        _pin_all(off, plan, source, training)  # before anything moves or any hook is installed
    for ring in off.rings:
        rule = plan.memory.offload[ring.rule]
        kernel = (f"ring of {ring.depth} slot(s), side-stream copies from pinned memory" if device.type == "cuda"
                  else "CPU bookkeeping ring (synchronous copies)")
        rr = RuleReport("memory.offload", ring.rule, "offload", rule.at, [u.path for u in ring.units], kernel)
        off._rule_reports[ring.rule] = rr
        if report is not None:
            report.rules.append(rr)
        for u in ring.units:
            _UNIT_MODULES.add(u.module)
            off.handles.append(u.module.register_forward_pre_hook(_enter_hook(ring.id, u.index), with_kwargs=True))
            if training:
                off.handles.append(u.module.register_forward_hook(_exit_hook(ring.id, u.index)))
    if off.rings:
        off.handles.insert(0, model.register_forward_pre_hook(_begin_hook([r.id for r in off.rings]), with_kwargs=True))
    if report is not None and device.type == "cpu":
        report.notes.append("offload: on the CPU there is no device memory to free; the ring runs with synchronous "
                            "copies so outputs stay equal (bookkeeping path)")
    model.__dict__["_planlang_offload"] = off
    return off


def offloaded_modules() -> set:
    """The modules some live Offload streams through a ring."""
    return set(_UNIT_MODULES)


# ----------------------------------------------------------------------------- lint with a model

def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "bf16")


def _module_cost(module: nn.Module, tokens: int, target, training: bool) -> tuple[float, float]:
    """(bytes of its weights, predicted compute seconds) of one module for `tokens` tokens:
    the larger of its weight bytes over memory bandwidth and 2 * tokens * params FLOPs over
    the dtype's rate (three times that, forward and backward, in training)."""
    params = list(module.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in params)
    n = sum(p.numel() for p in params)
    dtype = params[0].dtype if params else torch.bfloat16
    tflops = (target.tflops.get(_dtype_name(dtype)) or target.tflops.get("bf16") or
              max(target.tflops.values(), default=1.0))
    flops = 2.0 * tokens * n * (3 if training else 1)
    t = max(nbytes / (target.memory_bandwidth_gbs * 1e9), flops / (tflops * 1e12))
    return nbytes, t


def simulate_ring(copy_s: list[Optional[float]], compute_s: list[float], depth: int) -> float:
    """Seconds one forward takes when the modules run in order (`compute_s`) and those with
    a copy time (`copy_s[i]` not None) stream through a ring of `depth` slots over one host
    link, copies issued in order from the forward's start, copy k into the slot of module
    k - depth once that one finished. Compute alone takes sum(compute_s)."""
    pos = [i for i, c in enumerate(copy_s) if c is not None]
    finished: list[float] = []   # finish time of each offloaded module, in order
    ready: list[float] = []      # when each offloaded module's copy has landed
    link = t = 0.0
    for i, c in enumerate(compute_s):
        if copy_s[i] is None:
            t += c
            continue
        k = len(finished)
        while len(ready) <= k:
            j = len(ready)
            link = max(link, finished[j - depth] if j >= depth else 0.0) + copy_s[pos[j]]
            ready.append(link)
        t = max(t, ready[k]) + c
        finished.append(t)
    return t


def offload_diagnostics(model: nn.Module, plan, source, target) -> list[Diagnostic]:
    """`lint --model`: per offload rule, each unit's copy time (bytes over the target's
    host-link bandwidth) against the predicted compute time of the model's modules; PL403
    when the ring cannot hide the copies, with the prefetch depth that would (or why none
    can). The workload: a decode step at limits.max_batch (1 unset) in inference; a step
    over limits.max_batch x limits.max_seq_len tokens (1 x 2048 unset) in training.
    `model` may sit on the meta device; `target` is a hardware catalog record (None, or
    one without host-link or memory figures: no diagnostics)."""
    if target is None or not getattr(target, "host_link_gbs", None) or getattr(target, "is_cpu", False):
        return []
    training = plan.mode == "training"
    batch = plan.limits.max_batch or 1
    tokens = batch * (plan.limits.max_seq_len or 2048) if training else batch
    by_rule = _units_by_rule(model, plan)
    if not by_rule:
        return []
    unit_rule = {path: i for i, units in by_rule.items() for path, _ in units}
    # The forward, in model order: each offloaded unit, and every other leaf with weights.
    order: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        if not name:
            continue
        if name in unit_rule:
            order.append((name, mod))
        elif any(name.startswith(u + ".") for u in unit_rule):
            continue
        elif not list(mod.children()) and any(True for _ in mod.parameters(recurse=False)):
            order.append((name, mod))
    link = target.host_link_gbs * 1e9
    costs = [_module_cost(m, tokens, target, training) for _, m in order]
    compute = [c[1] for c in costs]
    total = sum(compute)
    diags = []
    for i, units in sorted(by_rule.items()):
        rule = plan.memory.offload[i]
        mine = {p for p, _ in units}
        copy = [costs[k][0] / link if name in mine else None for k, (name, _) in enumerate(order)]
        depth = rule.prefetch + 1
        step = simulate_ring(copy, compute, depth)
        stall = step - total
        if stall <= 0.05 * total:
            continue
        copy_total = sum(c for c in copy if c is not None)
        per_unit = copy_total / len(units)
        unit_compute = sum(compute[k] for k, (n, _) in enumerate(order) if n in mine) / len(units)
        better = next((d for d in range(depth + 1, len(units) + 1)
                       if simulate_ring(copy, compute, d) - total <= 0.05 * total), None)
        what = "a decode step" if not training else "a training step's forward"
        msg = (f"offload '{rule.at}': copying a module takes {per_unit * 1e3:.2f} ms over the host link "
               f"({target.host_link_gbs:g} GB/s) against {unit_compute * 1e3:.3f} ms of its compute; in {what} "
               f"(batch {batch}{', ' + str(tokens) + ' tokens' if training else ''}) prefetch {rule.prefetch} stalls "
               f"{stall * 1e3:.2f} ms on {total * 1e3:.2f} ms of compute")
        if better is not None:
            ring_gb = better * max(costs[k][0] for k, (n, _) in enumerate(order) if n in mine) / 1e9
            hint = f"prefetch {better - 1} hides the copies (a ring of {better} modules, {ring_gb:.2f} GB of device memory)"
        else:
            hint = ("no prefetch depth hides them: the link is the bound; offload fewer modules, "
                    "or accept a step of about {:.2f} ms".format(step * 1e3))
        path = ("memory", "offload", i, "prefetch") if source is not None and \
            ("memory", "offload", i, "prefetch") in getattr(source, "values", {}) else ("memory", "offload", i, "at")
        diags.append(at(source, path, "PL403", msg, hint=hint))
    return diags
