"""benchmarks.report on fake rows: speedups, the headline, the breakdown table, what did not run,
report.json and the plots."""
import json
import time

import pytest
import torch

from benchmarks import report
from benchmarks.common import TAKING_TURNS, Ceilings, Row

CEIL = Ceilings(copy_gbps=100.0, matmul_tflops=10.0, matmul_dtype="float32")
ENV = {"device": "fake CPU", "torch": "0", "cuda": None, "triton": None, "iwm": "0", "git_commit": "abc"}


def fake_rows():
    base = "loop"
    return [
        # a memory-bound op: the baseline, ours twice (best one wins), an optional baseline missing
        Row("ema", "vit_base", "loop", 10.0, bytes=1e9, baseline=base, headline=True),
        Row("ema", "vit_base", "torch._foreach_lerp_", 5.0, bytes=1e9, baseline=base, headline=True),
        Row("ema", "vit_base", "ours (native)", 4.0, bytes=1e9, baseline=base, headline=True),
        Row("ema", "vit_base", "ours (triton)", 2.0, bytes=1e9, baseline=base, headline=True),
        Row("ema", "vit_base", "xformers thing", None, note="xformers not importable (ImportError)"),
        Row("ema", "vit_small", "loop", 3.0, bytes=1e8, baseline=base),
        Row("ema", "vit_small", "ours (native)", 1.0, bytes=1e8, baseline=base),
        # a case whose main baseline did not run
        Row("attention", "pred384", "SDPA", None, flops=1e12, note="failed: RuntimeError: no kernel", headline=True),
        Row("attention", "pred384", "ours shared", 50.0, flops=1e12, baseline="SDPA", headline=True),
        # the step, with a breakdown
        Row("step", "tiny", "eager", 100.0, flops=5e11, baseline="eager", headline=True,
            extra={"img/s": 320.0, "breakdown_ms": {"views": 30.0, "forward": 30.0, "backward": 40.0}}),
        Row("step", "tiny", "ours (fused)", 80.0, flops=4e11, baseline="eager", headline=True,
            extra={"img/s": 400.0, "breakdown_ms": {"views": 5.0, "forward": 30.0, "backward": 45.0}}),
        Row("step", "tiny", "ours (fused)", None, note="MISMATCH: loss 1 vs 2"),
    ]


def test_speedups_are_against_the_named_baseline():
    rows = fake_rows()
    ratio = report.speedups(rows)
    assert ratio[2] == pytest.approx(2.5) and ratio[3] == pytest.approx(5.0) and ratio[6] == pytest.approx(3.0)
    assert 4 not in ratio and 8 not in ratio  # not timed / baseline missing


def test_headline_picks_our_best_and_reports_missing_baselines():
    entries = {e["suite"]: e for e in report.headline(fake_rows(), CEIL)}
    ema = entries["ema"]
    assert ema["case"] == "vit_base" and ema["ours"] == "ours (triton)" and ema["baseline"] == "loop"
    assert ema["speedup"] == pytest.approx(5.0)
    assert ema["ceiling_fraction"] == pytest.approx(5.0)  # 1e9 B in 2 ms = 500 GB/s, 5x the fake ceiling
    assert ema["others"] == {"torch._foreach_lerp_": pytest.approx(2.5)}
    att = entries["attention"]
    assert att["speedup"] is None and "baseline did not run: failed: RuntimeError" in att["note"]
    assert att["ceiling_fraction"] == pytest.approx(20.0 / 10.0)  # 1e12 FLOP / 50 ms = 20 TFLOP/s
    step = entries["step"]
    assert step["speedup"] == pytest.approx(1.25) and step["img/s"] == 400.0
    assert step["ceiling_fraction"] == pytest.approx(5.0 / 10.0)  # MFU


def test_markdown_sections():
    md = report.markdown(fake_rows(), ENV, CEIL, 12.0, "python -m benchmarks.report --quick", {"gather": "failed: X"})
    top = md.index("## Headline")
    assert top < md.index("## ema") < md.index("## attention") < md.index("## step")
    assert "| ema | vit_base | ours (triton) | 2 | loop | 10 | **5.00×** |" in md
    assert "5.00× vs loop" in md  # per-row speedup in the suite table
    assert "### step breakdown — tiny" in md
    assert "| ours (fused) | 5 (6%) | 30 (38%) | 45 (56%) | 80 |" in md
    assert "## Correctness warnings" in md and "MISMATCH: loss 1 vs 2" in md
    assert "## Baselines and variants not available" in md
    assert "- **xformers thing** — xformers not importable (ImportError)" in md
    assert "## Suites not run" in md and "- gather: failed: X" in md
    assert "breakdown_ms" not in md  # dict-valued extras are tables, not notes


def test_write_json_and_plots(tmp_path):
    rows = fake_rows()
    report.write(tmp_path, rows, dict(ENV), CEIL, 1.0, "cmd", {})
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["environment"]["device"] == "fake CPU" and data["ceilings"]["copy_gbps"] == 100.0
    assert len(data["rows"]) == len(rows)
    first = data["rows"][2]
    assert first["impl"] == "ours (native)" and first["speedup"] == pytest.approx(2.5)
    assert first["gbps"] == pytest.approx(250.0) and first["ceiling_fraction"] == pytest.approx(2.5)
    assert [e["suite"] for e in data["headline"]] == ["ema", "attention", "step"]
    for name in ("ema.png", "attention.png", "step.png", "step-breakdown.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_breakdown_states_the_augmentation_share():
    md = "\n".join(report.breakdown_markdown(fake_rows()))
    assert "views: 30.0% of the step in eager, 6.2% of the step in ours (fused)" in md


def test_time_fns_takes_turns_keeps_the_best_turn_and_reports_failures():
    from benchmarks.common import time_fns

    calls = []

    def fast():
        calls.append("fast")

    def slow():
        calls.append("slow")
        time.sleep(0.002)

    def broken():
        raise RuntimeError("no kernel for this shape")

    out = time_fns({"fast": fast, "slow": slow, "broken": broken}, torch.device("cpu"), budget_s=0.06, passes=3)
    assert out["fast"] < out["slow"] and out["slow"] >= 2.0
    assert isinstance(out["broken"], RuntimeError)
    # three turns each, interleaved: the slow one ran between the fast one's turns
    first_slow, last_fast = calls.index("slow"), len(calls) - 1 - calls[::-1].index("fast")
    assert first_slow < last_fast


def test_headline_never_picks_a_row_that_does_less_work():
    rows = [Row("attention", "c", "SDPA padded", 10.0, flops=1e9, baseline="SDPA padded", headline=True),
            Row("attention", "c", "ours repeated (native)", 12.0, flops=1e9, baseline="SDPA padded", headline=True),
            Row("attention", "c", "ours shared (native)", 5.0, flops=4e8, baseline="SDPA padded", headline=True,
                same_work=False)]
    (entry,) = report.headline(rows, CEIL)
    assert entry["ours"] == "ours repeated (native)" and entry["speedup"] == pytest.approx(10 / 12)
    assert entry["different_work"] == {"ours shared (native)": {"speedup": pytest.approx(2.0),
                                                                 "differs": "less work by design",
                                                                 "speedup_taking_turns": None}}
    line = report.headline_markdown([entry])[-1]
    assert "ours shared (native) (less work by design): 2.00× the baseline" in line
    assert "taking turns" not in line
    # a model option that took turns with the baseline shows that figure beside its row ratio
    rows[2].extra[TAKING_TURNS] = 1.9
    line = report.headline_markdown(report.headline(rows, CEIL))[-1]
    assert "ours shared (native) (less work by design): 2.00× the baseline (1.90× taking turns)" in line


def test_headline_names_what_it_holds_equal_and_the_best_equal_baseline():
    held = "masks, tokens, layout"
    rows = [Row("step", "c", "I-JEPA", 100.0, baseline="I-JEPA", headline=True),
            Row("step", "c", "I-JEPA + compile", 60.0, baseline="I-JEPA", headline=True),
            Row("step", "c", "other layout", 10.0, baseline="I-JEPA", headline=True, same_work=False),
            Row("step", "c", "ours, equal work", 50.0, baseline="I-JEPA", headline=True, held_equal=held),
            Row("step", "c", "ours, ragged masks", 40.0, baseline="I-JEPA", headline=True, same_work=False,
                differs="ragged masks, more tokens")]
    (entry,) = report.headline(rows, CEIL)
    # a faster row doing other work is never "ours (best)", nor the best baseline
    assert entry["ours"] == "ours, equal work" and entry["speedup"] == pytest.approx(2.0)
    assert entry["best_baseline"] == "I-JEPA + compile" and entry["speedup_vs_best"] == pytest.approx(1.2)
    assert entry["held_equal"] == held and "other layout" not in entry["others"]
    line = report.headline_markdown([entry])[-1]
    assert line.endswith(f"| {held} |") and "1.20× vs I-JEPA + compile" in line
    assert "ours, ragged masks (ragged masks, more tokens): 2.50× the baseline" in line
    md = report.markdown(rows, ENV, CEIL, 1.0, "cmd")
    assert "| c | ours, ragged masks | 40 |" in md and "changes: ragged masks, more tokens" in md
