"""The forward as a graph: how passes see a model we did not write.

`capture` runs the model once under torch.compile with a recording backend; Dynamo hands
us FX graphs of the whole forward in which every node carries the module path it came
from (`meta["nn_module_stack"]`) and parameters arrive as placeholders bound to the real
tensors. `GraphView` answers the questions passes ask: which module a node belongs to,
which parameter (or caller-passed tensor, such as an external KV cache) a placeholder is,
which nodes a module's scope holds. The helpers below read shapes and dtypes from the
values Dynamo recorded, compare sizes without adding guards (graphs recompiled with
symbolic sizes), and replay a candidate's nodes on random data (`evaluate`) so a pass can
check a site numerically against its kernel's definition.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx as fx

# The traced frame's local that holds the model: `self` as usual, or whatever its forward
# names its first parameter (`def forward(s, x)`), `fn`/`mod` for wrapped callables.
_PREFIX = re.compile(r"^L\[['\"]args['\"]\]\[0\]\.?|^L\[['\"][A-Za-z_]\w*['\"]\]\.?")
_INDEX = re.compile(r"\[(\d+)\]")
_MODULES = re.compile(r"_modules\[['\"]([^'\"]+)['\"]\]")


def module_path(raw: str) -> str:
    """Dynamo's module path ("L['self'].layers[0].attn" or "L['self'].layers.0.attn") ->
    the name `named_modules()` yields ("layers.0.attn")."""
    s = _PREFIX.sub("", raw)
    s = _MODULES.sub(r"\1", s)
    s = _INDEX.sub(r".\1", s)
    return re.sub(r"\.+", ".", s).strip(".")


def node_module(node: fx.Node) -> Optional[str]:
    """The innermost module of the traced model a node was traced in, or None (top-level
    code). Modules Dynamo reached through a global (`G[...]`: e.g. a function transformers
    swaps for a hub kernel module) are not the model's: the module that called them is."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    for raw in reversed(list(stack.values())):
        raw = str(raw[0] if isinstance(raw, tuple) else raw)
        if not raw.startswith("G["):
            return module_path(raw)
    return None


def node_arg(n: fx.Node, i: int, name: str, default: Any = None) -> Any:
    """A call node's argument, given positionally (at i) or by keyword (name)."""
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


LINEAR_TARGETS = {torch._C._nn.linear, torch.nn.functional.linear}
ADD_TARGETS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = ("add", "__add__", "__radd__", "add_", "__iadd__")
MUL_TARGETS = {operator.mul, operator.imul, torch.mul}
MUL_METHODS = ("mul", "__mul__", "__rmul__")


def example(node: Any) -> Any:
    """The value Dynamo recorded for a node (a fake tensor with shape and dtype), or None."""
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


def shape_dtype(node: Any) -> Optional[tuple[tuple, torch.dtype]]:
    """(shape, dtype) of a tensor-valued node, from Dynamo's recorded example value."""
    ev = example(node)
    if isinstance(ev, torch.Tensor):
        return tuple(ev.shape), ev.dtype
    return None


def same_dims(a: Any, b: Any) -> bool:
    """Shape (or single dimension) equality that never adds a guard: symbolic sizes (a
    graph Dynamo recompiled with dynamic shapes) compare by their expression."""
    if isinstance(a, (tuple, list, torch.Size)) or isinstance(b, (tuple, list, torch.Size)):
        if not isinstance(a, (tuple, list, torch.Size)) or not isinstance(b, (tuple, list, torch.Size)):
            return False
        return len(a) == len(b) and all(same_dims(x, y) for x, y in zip(a, b))
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return str(a) == str(b)


def hint(d: Any) -> Optional[int]:
    """A size as an int: itself, or the example value behind a symbolic size."""
    if isinstance(d, int):
        return d
    value = getattr(getattr(d, "node", None), "hint", None)
    return int(value) if value is not None else None


def is_add(node: Any) -> bool:
    """`a + b` in any of its spellings (operator, torch.add without alpha, methods, in place)."""
    if not is_call(node, ADD_TARGETS, ADD_METHODS):
        return False
    return node.kwargs.get("alpha", 1) == 1 and len(node.args) == 2


def is_inplace(node: fx.Node) -> bool:
    """Whether the node writes its first argument (`h += x`, `h.add_(x)`)."""
    if node.op == "call_function":
        return node.target in (operator.iadd, operator.imul)
    name = str(node.target)
    return node.op == "call_method" and (name in ("__iadd__", "__imul__")
                                         or (name.endswith("_") and not name.startswith("__")))


def evaluate(nodes: Iterable[fx.Node], env: dict) -> dict:
    """Run `nodes` (in graph order, all call_function/call_method) on the values in `env`
    (node -> tensor) and return env extended with every node's value. Used to check a
    candidate site numerically against the fused kernel's definition."""
    env = dict(env)
    for n in nodes:
        args = fx.node.map_arg(n.args, lambda a: env[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
        if n.op == "call_function":
            env[n] = n.target(*args, **kwargs)
        elif n.op == "call_method":
            env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
        else:
            raise ValueError(f"cannot evaluate {n.op} node {n.name}")
    return env


def is_call(node: Any, targets: Iterable, methods: Iterable[str] = ()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function" and node.target in set(targets):
        return True
    return node.op == "call_method" and node.target in set(methods)


def model_tensors(model: torch.nn.Module) -> dict[int, tuple[str, str, torch.Tensor]]:
    """id -> (module path, name, tensor) of every parameter and buffer of `model`."""
    by_id: dict[int, tuple[str, str, torch.Tensor]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for pname, p in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if p is not None:
                by_id.setdefault(id(p), (mod_name, pname, p))
    return by_id


def find_tensor(by_id: dict, value: Any) -> Optional[tuple[str, str, torch.Tensor]]:
    """The parameter or buffer (of `model_tensors`) that `value` is: the object itself, or a
    detached alias Dynamo made of it (the same storage and view)."""
    hit = by_id.get(id(value))
    if hit is None and isinstance(value, torch.Tensor):
        for mod_name, pname, p in by_id.values():
            if (isinstance(p, torch.Tensor) and p.data_ptr() == value.data_ptr()
                    and p.shape == value.shape and p.stride() == value.stride()):
                return mod_name, pname, p
    return hit


@dataclass
class GraphView:
    """One captured graph with its bindings to the model."""

    gm: fx.GraphModule
    example_inputs: list
    model: torch.nn.Module
    param_of: dict = field(default_factory=dict)      # placeholder node -> (module path, name, tensor)
    input_of: dict = field(default_factory=dict)      # placeholder node -> the value it was bound to

    def __post_init__(self) -> None:
        by_id = model_tensors(self.model)
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        for node, value in zip(placeholders, self.example_inputs):
            self.input_of[node] = value
            hit = find_tensor(by_id, value)
            if hit is not None:
                self.param_of[node] = hit

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def param(self, node: Any) -> Optional[tuple[str, str, torch.Tensor]]:
        """(module path, name, tensor) when `node` is a placeholder bound to a parameter or
        buffer of the model, else None."""
        return self.param_of.get(node) if isinstance(node, fx.Node) else None

    def input_tensor(self, node: Any) -> Optional[torch.Tensor]:
        """The real tensor a placeholder was bound to when the graph was captured: a
        parameter, a buffer, or a tensor the caller passed (a token batch, a cache that
        lives outside the model such as Hugging Face's StaticCache). None otherwise."""
        if not (isinstance(node, fx.Node) and node.op == "placeholder"):
            return None
        value = self.input_of.get(node)
        return value if isinstance(value, torch.Tensor) else None

    def linear_weight(self, node: fx.Node):
        """(module path, weight tensor, bias tensor or None) of a linear node on parameters."""
        w = self.param(node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
        if w is None:
            return None
        b_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        b = self.param(b_arg) if b_arg is not None else None
        if b_arg is not None and b is None:
            return None
        return w[0], w[2], (b[2] if b else None)

    def scopes(self) -> dict[str, list[fx.Node]]:
        """Module path -> the nodes traced directly in it (innermost), in graph order."""
        out: dict[str, list[fx.Node]] = {}
        for n in self.graph.nodes:
            if n.op in ("call_function", "call_method", "call_module"):
                path = node_module(n)
                if path is not None:
                    out.setdefault(path, []).append(n)
        return out


def adopt(new: fx.Node, old: fx.Node, value: bool = True) -> None:
    """Give a node a rewrite inserted the module path of the node it stands for (so later
    passes and selectors place it) and, when `value`, its recorded example value (so later
    passes read its shape and dtype)."""
    if "nn_module_stack" in old.meta:
        new.meta["nn_module_stack"] = old.meta["nn_module_stack"]
    if value and example(old) is not None:
        new.meta["example_value"] = example(old)


def erase_unused(graph: fx.Graph, nodes: Iterable[fx.Node]) -> None:
    """Erase the given nodes that nothing uses any more, users first."""
    pending = [n for n in nodes if n.graph is graph]
    changed = True
    while changed:
        changed = False
        for n in list(pending):
            if not n.users:
                graph.erase_node(n)
                pending.remove(n)
                changed = True


def capture(model: torch.nn.Module, run: Callable[[Callable], Any]) -> list[GraphView]:
    """The FX graphs of `model`'s forward, as Dynamo traces it when `run(compiled)` calls
    the compiled model. Graph breaks give several graphs; all are returned."""
    graphs: list[GraphView] = []

    def record(gm: fx.GraphModule, example_inputs):
        graphs.append(GraphView(gm, list(example_inputs), model))
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=record, dynamic=False)
    # Float attributes (eps, soft-caps, offsets) must stay constants in the graph: Dynamo
    # otherwise turns them into graph inputs once two modules of one class disagree on
    # them, and a pass cannot bake an input into a fused kernel's arguments.
    with torch.no_grad(), torch._dynamo.config.patch(specialize_float=True):
        run(compiled)
    torch._dynamo.reset()
    return graphs
