import json

from training.cli import main


def test_quick_bench_writes_overheads_and_bounds(tmp_path, capsys):
    assert main(["bench", "--quick", "--ks", "1", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = result["stepwise"]
    assert [r["k"] for r in rows] == [1, 2] and all({"k", "size", "overhead", "bound"} <= set(r) for r in rows)
    assert rows[0]["overhead"] == 1.0 and rows[1]["bound"] > 1.0 and 0 < rows[1]["drm_to_generator_flops"] < 2
    assert result["grpo_iteration"]["ratio"] > 0 and result["drm_training"]["pairs_per_second_cached"] > 0
    assert "FLOP bound" in capsys.readouterr().out
