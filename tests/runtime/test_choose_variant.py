"""benchmarks/choose_variant.py: the switches the final GPU call runs with."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("choose_variant", ROOT / "benchmarks" / "choose_variant.py")
cv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cv)


def _rows(plan, ratios):
    return [dict(plan=plan, batch=b, variant=v, env={"V": v}, ratio_paired=r) for (b, v), r in ratios.items()]


def test_the_variant_faster_in_every_plan_and_never_slower_wins():
    fp8 = {"rows": _rows("fp8", {(1, "base"): 1.0, (1, "pdl"): 0.96, (1, "pdlpf"): 0.90})}
    bf16 = {"rows": _rows("bf16", {(1, "base"): 1.0, (1, "pdl"): 0.97, (1, "pdlpf"): 0.95,
                                   (16, "base"): 1.0, (16, "pdl"): 0.99, (16, "pdlpf"): 1.00})}
    assert cv.choose([fp8, bf16]) == ("pdlpf", {"V": "pdlpf"}, {"fp8": 0.90, "bf16": 0.95})


def test_slower_at_any_batch_or_not_faster_in_one_plan_loses():
    fp8 = {"rows": _rows("fp8", {(1, "pdl"): 0.90, (1, "pdlpf"): 0.85})}
    bf16 = {"rows": _rows("bf16", {(1, "pdl"): 0.99, (1, "pdlpf"): 0.90, (16, "pdlpf"): 1.05, (16, "pdl"): 1.0})}
    assert cv.choose([fp8, bf16]) == ("base", {}, {})  # pdl not 2% faster in bf16; pdlpf slower at 16
    assert cv.choose([fp8, bf16], only={"pdl"}, max_ratio=0.995)[0] == "pdl"


def test_cli_prints_exports_and_skips_unreadable_files(tmp_path, capsys):
    import json
    good = tmp_path / "a.json"
    good.write_text(json.dumps({"rows": _rows("p", {(1, "pdl"): 0.9})}))
    assert cv.main([str(good), str(tmp_path / "missing.json")]) == 0
    out = capsys.readouterr()
    assert out.out == "export V=pdl\n"
    assert "skipping" in out.err and "missing.json" in out.err
