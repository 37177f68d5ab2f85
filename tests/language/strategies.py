"""hypothesis strategies for plans: canonical documents of every section, and mutations."""
from hypothesis import strategies as st

from planlang import names

word = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
index = st.integers(0, 40)
segment = st.one_of(
    word, st.just("*"), st.just("**"),
    st.builds(lambda w, a, b: f"{w}[{a}:{a + b}]", word, index, st.integers(1, 8)),
    st.builds(lambda w, xs: f"{w}[{','.join(map(str, sorted(set(xs))))}]", word, st.lists(index, min_size=1, max_size=3)),
    st.builds(lambda xs: "{" + ",".join(sorted(set(xs))) + "}", st.lists(word, min_size=2, max_size=3)).filter(lambda s: s.count(",") >= 1),
)
selector = st.builds(
    lambda segs, op: ".".join(segs) + (f":{op}" if op else ""),
    st.lists(segment, min_size=1, max_size=4).filter(lambda s: all(not (a == b == "**") for a, b in zip(s, s[1:]))),
    st.one_of(st.none(), st.sampled_from(names.OP_KINDS)),
)
pos_float = st.floats(min_value=1e-6, max_value=1e4, allow_nan=False, allow_infinity=False)


def _fusion(kind):
    opts = {
        "rmsnorm_residual": st.fixed_dictionaries({}, optional={"eps": pos_float}),
        "qkv": st.just({}),
        "swiglu": st.fixed_dictionaries({}, optional={"act": st.sampled_from(names.ACTIVATIONS)}),
        "rope_kvcache": st.just({}),
        "linear": st.just({}),
        "attention": st.fixed_dictionaries({}, optional={
            "softcap": pos_float, "sink": st.booleans(),
            "mask": st.one_of(st.sampled_from(names.ATTENTION_MASKS),
                              st.builds(lambda n: {"sliding_window": n}, st.integers(1, 1 << 16)))}),
        "sampling": st.fixed_dictionaries({}, optional={
            "temperature": st.floats(0, 5, allow_nan=False), "top_k": st.integers(1, 1000),
            "top_p": st.floats(0.01, 1.0, allow_nan=False)}),
    }[kind]
    where = st.just({}) if kind == "sampling" else st.fixed_dictionaries({}, optional={"at": selector})
    req = st.fixed_dictionaries({}, optional={"required": st.just(False)})

    def build(o, w, r):
        d = {"kind": kind, **o, **w, **r}
        if d.get("at") == "**":
            d.pop("at")
        return kind if len(d) == 1 else d
    return st.builds(build, opts, where, req)


fusion = st.sampled_from(names.FUSION_KINDS).flatmap(_fusion)


def _buckets():
    as_list = st.lists(st.integers(1, 512), min_size=1, max_size=6, unique=True).map(sorted)
    pow2 = st.tuples(st.integers(0, 5), st.integers(0, 4)).map(lambda t: f"pow2:{2 ** t[0]}..{2 ** (t[0] + t[1])}")
    return st.one_of(as_list, pow2)


graphs = st.fixed_dictionaries({}, optional={
    "capture": st.sampled_from(names.CAPTURE_MODES), "buckets": _buckets(),
    "over_max": st.sampled_from(names.OVER_MAX), "warmup": st.integers(0, 10),
    "pdl": st.sampled_from(names.PDL_MODES)})
compile_ = st.fixed_dictionaries({}, optional={
    "mode": st.sampled_from(names.COMPILE_MODES), "fullgraph": st.booleans(), "dynamic": st.booleans()})
rule = st.fixed_dictionaries({"at": selector, "dtype": st.sampled_from(names.DTYPES)}, optional={
    "scaling": st.sampled_from(names.SCALINGS), "block_size": st.sampled_from([32, 64, 128]),
    "activations": st.sampled_from(names.ACTIVATION_QUANT), "emulate": st.booleans()})
precision = st.fixed_dictionaries({}, optional={
    "default": st.sampled_from(names.BASE_DTYPES), "accumulate": st.sampled_from(names.ACCUMULATE_DTYPES),
    "preset": st.sampled_from(names.PRESETS), "rules": st.lists(rule, min_size=1, max_size=3)})
memory = st.fixed_dictionaries({}, optional={
    "offload": st.lists(st.fixed_dictionaries({"at": selector}, optional={"to": st.just("cpu"), "prefetch": st.integers(0, 4)}), min_size=1, max_size=2),
    "recompute": st.lists(st.fixed_dictionaries({"at": selector}, optional={
        "policy": st.sampled_from(names.RECOMPUTE_POLICIES),
        "save": st.lists(st.sampled_from(names.OP_KINDS), min_size=1, max_size=3, unique=True)}), min_size=1, max_size=2)})
parallel = st.fixed_dictionaries({}, optional={
    "tensor": st.integers(1, 8), "sequence": st.booleans(),
    "styles": st.lists(st.fixed_dictionaries({"at": selector, "style": st.sampled_from(names.PARALLEL_STYLES)}), min_size=1, max_size=2)})
limits = st.fixed_dictionaries({}, optional={"max_seq_len": st.integers(1, 1 << 20), "max_batch": st.integers(1, 1024)})
prov_scalar = st.one_of(st.text(min_size=0, max_size=12), st.integers(-10, 10**6), pos_float)
provenance = st.dictionaries(word, st.one_of(prov_scalar, st.dictionaries(st.one_of(word, st.integers(1, 64).map(str)), st.one_of(st.integers(0, 100), pos_float), min_size=1, max_size=3)), min_size=1, max_size=3)

document = st.fixed_dictionaries({"planlang": st.just(1)}, optional={
    "name": word, "target": st.sampled_from(["auto", "h100", "a100-80gb", "cpu", "b200"]),
    "mode": st.sampled_from(names.MODES), "fusions": st.lists(fusion, max_size=4),
    "graphs": graphs, "compile": compile_, "precision": precision, "memory": memory,
    "parallel": parallel, "limits": limits, "provenance": provenance,
}).filter(lambda d: all(v != {} for v in d.values()))
