"""The `memory` section of a plan: layer-wise offload with async prefetch (`offload.py`)
and activation recompute (`recompute.py`). `apply` calls both; `planlang train-step`
(`runtime/train.py`) drives a training step with them."""


def outermost_owners(model, rules) -> dict:
    """Module path -> index of the rule that takes it, for the outermost modules the rules'
    selectors name, in model order (a module two rules name belongs to the later one).
    Offload and recompute both act on whole modules this way."""
    from planlang.selectors import Selector, SelectorError, resolve
    names = [n for n, _ in model.named_modules()]
    owner: dict = {}
    for i, rule in enumerate(rules):
        try:
            hits = resolve(Selector.parse(rule.at), names)
        except SelectorError:
            continue  # apply reported it already
        for h in hits:
            if h:
                owner[h] = i
    chosen = [n for n in names if n in owner]
    return {n: owner[n] for n in chosen if not any(n.startswith(o + ".") for o in chosen if o != n)}
