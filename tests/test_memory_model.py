import torch

from training import memory_model as mm


def test_live_bytes_counts_new_storages_once_and_frees_them():
    def fn(x):  # x: 1000 float32 = 4000 bytes
        a = x * 2  # +4000
        v = a.view(10, 100).t()  # a view: nothing new
        a.add_(1)  # in place: nothing new
        b = v + 1  # +4000 -> live x, a, b = 12000 (the peak)
        del a, v  # a's storage dies with its last view
        c = b.sum()  # +4
        return c

    assert mm.peak_activation_bytes(fn, ((1000,), torch.float32), device="cpu") == 12000
    weight = torch.randn(100, 100)  # made outside the mode: its views are not activations
    assert mm.peak_activation_bytes(lambda x: x @ weight.t(), ((4, 100), torch.float32), device="cpu") == 2 * 1600


def _small_forward(device: str):
    from training.bench import make_models

    gen, drm = make_models(2, 1, 16)
    gen, drm = gen.to(device), drm.to(device)

    def run(x, context, pooled, t):
        gen(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t)
        drm(x, t / 1000, context, pooled)

    return mm.peak_activation_bytes(run, ((2, 16, 16, 16), torch.float32), ((2, 77, 4096), torch.float32),
                                    ((2, 2048), torch.float32), ((2,), torch.float32), device=device)


def test_meta_measurement_equals_cpu_on_a_small_real_model():
    cpu, meta = _small_forward("cpu"), _small_forward("meta")
    assert cpu == meta and cpu > 2 * 16 * 16 * 16 * 4


def test_sd35m_parameter_counts_are_exact():
    counts = mm.parameter_counts((21, 6))
    assert counts["generator_parameters"] == 2_243_171_520 and counts["generator_buffers"] == 226_492_416
    assert counts["generator_parameters"] + counts["generator_buffers"] == 2_469_663_936  # "2.47 B" with pos_embed
    assert counts["drm21_parameters"] == 2_022_757_569 and counts["drm6_parameters"] == 632_361_025
    assert counts["drm21_buffers"] == counts["generator_buffers"]  # the DRM keeps the pos_embed table


def test_table_grows_with_k_px_and_blocks_and_fp8_halves_the_drm():
    rows = mm.memory_table("bf16", sizes_px=(512,), depths=(21, 6), ks=(2, 6))
    by = {(r["drm_blocks"], r["k"]): r for r in rows}
    assert by[21, 6]["drm_activation_gb"] > by[21, 2]["drm_activation_gb"] > 0
    assert by[21, 6]["peak_gb"] > by[21, 2]["peak_gb"] and by[6, 6]["peak_gb"] < by[21, 6]["peak_gb"]
    assert 8.5 < by[21, 2]["weights_gb"] < 9.0  # (2.470 B + 2.249 B elements) x 2 bytes
    for r in rows:
        assert r["fits"] == {card: r["peak_gb"] <= card for card in mm.CARDS_GB}
        assert r["peak_gb"] >= r["weights_gb"] + r["activation_gb"] + mm.OVERHEAD_GB
    fp8 = mm.memory_table("fp8", sizes_px=(512,), depths=(21,), ks=(2,))[0]
    assert fp8["weights_gb"] < by[21, 2]["weights_gb"] - 1.5
    assert mm.generator_activation_bytes(1024) > 3 * mm.generator_activation_bytes(512)
    assert "| 512 | 21 | 2 | fp8 |" in mm.format_memory_table([fp8])


def test_attention_matrix_is_not_counted():
    # 1024 px: 4096 + 154 tokens; one bf16 [2, 24, N, N] score matrix alone would be 1.6 GiB
    assert mm.math_attention_bytes(2, 24, 4250) / 2 / mm.GB > 1.6
    assert mm.generator_activation_bytes(1024) / mm.GB < 0.5


def test_drm_activation_estimate_bounds_the_measured_peak():
    """DRM.activation_bytes (what the nodes reserve in ComfyUI) covers the measured peak without gross excess."""
    drm = mm.sd35m_drm(6)
    saved, drm.compute_dtype = drm.compute_dtype, torch.bfloat16  # the measurement runs in bf16
    try:
        for px, k in ((512, 2), (1024, 1)):
            measured = mm.drm_activation_bytes(px, 6, k)
            estimate = drm.activation_bytes(k, px // 8, px // 8, mm.TEXT_TOKENS)
            assert measured <= estimate <= 1.3 * measured
    finally:
        drm.compute_dtype = saved
