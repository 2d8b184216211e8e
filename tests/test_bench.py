import json

from training.cli import main


def test_quick_bench_writes_overheads_and_bounds(tmp_path, capsys):
    assert main(["bench", "--quick", "--ks", "1", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = result["stepwise"]
    assert [r["k"] for r in rows] == [1, 2] and all({"k", "size", "overhead", "bound"} <= set(r) for r in rows)
    assert rows[0]["overhead"] == 1.0 and rows[1]["bound"] > 1.0 and 0 < rows[1]["drm_to_generator_flops"] < 2
    default = result["stepwise_default"][0]
    assert default["k"] == 4 and default["branch_range"] == [0.0, 0.5] and 1.0 < default["bound"] < rows[1]["bound"] * 2
    (sd35m,) = result["sd35m_flop_model"]  # full-size SD3.5-M at 512 px, counted on meta tensors
    assert sd35m["drm_blocks"] == 21 and 0.85 < sd35m["drm_to_generator_flops"] < 0.95
    assert 3.4 < sd35m["k6_full_range"] < 3.8 and 1.8 < sd35m["default"] < 2.0  # the paper measured 3.4x for k = 6
    assert result["grpo_iteration"]["ratio"] > 0 and result["drm_training"]["pairs_per_second_cached"] > 0
    out = capsys.readouterr().out
    assert "FLOP bound" in out and "| 512 | 21 | 6 | fp8 |" in out
    memory = result["memory_model"]  # quick: 512 px, 21 blocks, k = 2 and 6
    assert [(r["px"], r["drm_blocks"], r["k"]) for r in memory["bf16"]] == [(512, 21, 2), (512, 21, 6)]
    assert memory["bf16"][0]["fits"] == {"8": False, "12": True, "16": True, "24": True}
