"""The node pack inside a real ComfyUI: registration, workflows end to end, and numerical agreement with drm_core.

Skipped (with the reason shown) unless ComfyUI is available: set COMFYUI_PATH to a ComfyUI checkout and run
with a Python that runs it, e.g. `COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest
tests/test_comfyui.py`. Models are tiny random SD3-shaped stand-ins; the text encoders are replaced by random
CONDITIONING of the right shapes.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid

import pytest

import comfy_env
from comfy_env import CHECKPOINT, DINA_FOLDER, DRM_FILE, LORA_FILE, conditioning

COMFYUI, WHY = comfy_env.find_comfyui()
pytestmark = pytest.mark.skipif(COMFYUI is None, reason=WHY)

NODE_IDS = ["DRMLoader", "DRMScoreLatent", "DRMScoreImage", "DRMSelectBest", "DRMStepwiseSampler",
            "DRMStepwiseKSampler"]


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    return comfy_env.start_in_process(COMFYUI, tmp_path_factory.mktemp("comfy_base"))


@pytest.fixture(scope="session")
def torch():
    import torch

    return torch


@pytest.fixture(autouse=True)
def inference_mode():
    import torch

    with torch.inference_mode():  # ComfyUI runs every node under inference mode
        yield


@pytest.fixture(scope="session")
def model(env, torch):
    unet = env.node("UNETLoader").load_unet(CHECKPOINT, "default")[0]
    return env.node("ModelSamplingSD3").patch(unet, 3.0)[0]


@pytest.fixture(scope="session")
def drm(env, torch):
    return env.node("DRMLoader").load(DRM_FILE, "fp32")[0]


@pytest.fixture(scope="session")
def prompts():
    return conditioning("a red fox in the snow"), conditioning("blurry")


def empty_latent(env, batch=1, size=64):
    return env.node("EmptySD3LatentImage").generate(size, size, batch)[0]


def stepwise_sampler(env, drm, cond, k=3, noise_level=0.7, start=0.0, end=1.0, every=1, outside="sde"):
    return env.node("DRMStepwiseSampler").get_sampler(drm, cond, k, noise_level, start, end, every, outside)[0]


def sample_custom(env, model, sampler, prompts, latent, seed=7, cfg=2.5, steps=4, denoise=1.0, scheduler="simple"):
    sigmas = env.node("BasicScheduler").get_sigmas(model, scheduler, steps, denoise)[0]
    pos, neg = prompts
    return env.node("SamplerCustom").sample(model, True, seed, cfg, pos, neg, sampler, sigmas, latent)[0]["samples"]


# ------------------------------------------------------------------------------------------ registration

def test_pack_loads_through_comfyui_loader(env):
    assert env.load_ok, "nodes.load_custom_node reported an import failure"
    for node_id in NODE_IDS:
        assert node_id in env.nodes.NODE_CLASS_MAPPINGS, node_id
        assert env.nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id]


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_every_node_has_a_description_and_tooltips(env, node_id):
    cls = env.nodes.NODE_CLASS_MAPPINGS[node_id]
    assert len(cls.DESCRIPTION) > 40 and cls.CATEGORY == "DRM"
    spec = cls.INPUT_TYPES()
    for name, conf in [*spec["required"].items(), *spec.get("optional", {}).items()]:
        assert len(conf) == 2 and conf[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) and all(cls.OUTPUT_TOOLTIPS)


@pytest.mark.parametrize("node_id", ["DRMStepwiseSampler", "DRMStepwiseKSampler"])
def test_search_widgets_default_to_the_measured_defaults(env, node_id):
    from drm_core import DEFAULT_BRANCH_RANGE, DEFAULT_K, DEFAULT_PLAIN_NOISE_LEVEL

    required = env.nodes.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()["required"]
    assert required["k"][1]["default"] == DEFAULT_K
    assert (required["branch_start"][1]["default"], required["branch_end"][1]["default"]) == DEFAULT_BRANCH_RANGE
    assert required["outside_range"][1]["default"] == ("ode" if DEFAULT_PLAIN_NOISE_LEVEL == 0 else "sde")


def test_drm_folder_is_registered(env):
    import folder_paths

    assert DRM_FILE in folder_paths.get_filename_list("drm")
    paths, extensions = folder_paths.folder_names_and_paths["drm"]
    assert any(p.endswith("models/drm") for p in paths) and ".safetensors" in extensions


@pytest.mark.parametrize("name", comfy_env.workflow_names())
def test_ui_workflow_matches_its_api_twin_and_lists_models(env, name):
    """The API twin is what the frontend queues (tests/test_frontend.py checks that in a browser); ComfyUI's
    missing-models dialog can offer every models[] entry; the files it cannot offer are explained in the note."""
    ui, api = comfy_env.load_workflow(name)
    classes = env.nodes.NODE_CLASS_MAPPINGS

    def declared(kind):
        spec = classes[kind].INPUT_TYPES()
        return {*spec.get("required", {}), *spec.get("optional", {})}

    # The frontend also sends its own display widgets (PreviewAny's "preview"), which the node does not declare.
    expected = {k: {"class_type": v["class_type"], "inputs": {i: x for i, x in v["inputs"].items()
                                                              if i in declared(v["class_type"])}}
                for k, v in api.items()}
    assert comfy_env.ui_to_api(ui, classes) == expected
    listed = [m for node in ui["nodes"] for m in node.get("properties", {}).get("models", [])]
    names = {m["name"] for m in listed}
    assert {CHECKPOINT, "clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"} <= names
    sd35 = "https://huggingface.co/stabilityai/stable-diffusion-3.5-medium/resolve/main/"
    for m in listed:  # huggingface.co is an allowed source; the dialog keeps one entry per URL
        assert m["directory"] in ("checkpoints", "text_encoders") and m["name"].endswith(".safetensors"), m
        assert m["url"] == sd35 + ("text_encoders/" if m["directory"] == "text_encoders" else "") + m["name"], m
    assert len({m["url"] for m in listed}) == len(listed)
    note = next(n for n in ui["nodes"] if n["type"] == "MarkdownNote")["widgets_values"][0]
    loader = next(n for n in ui["nodes"] if n["type"] == "DRMLoader")
    assert loader["widgets_values"] == [DINA_FOLDER, "auto", CHECKPOINT] and DINA_FOLDER not in names
    for line in (f"`drm/{DINA_FOLDER}/`", f"https://huggingface.co/liuhuohuo/{DINA_FOLDER}",
                 f"`hf download liuhuohuo/{DINA_FOLDER} --local-dir models/drm/{DINA_FOLDER}`"):
        assert line in note, line
    for node in ui["nodes"]:
        if node["type"] == "LoraLoaderModelOnly":  # trained by the user: no download, the note says where from
            assert node["widgets_values"][0] == LORA_FILE and LORA_FILE not in names
            assert f"`loras/{LORA_FILE}`" in note and "train-grpo" in note and ".alpha" in note
        if node["type"] in ("DRMScoreLatent", "DRMScoreImage"):
            assert node["widgets_values"][0] == -1.0  # auto: the reward model's recommended sigma
    assert 0.5 <= ui["extra"]["ds"]["scale"] <= 1.0  # opens zoomed to the whole graph (checked in a browser)
    uuid.UUID(ui["id"])  # the front end's schema wants a UUID (or no id)
    assert ui["version"] == 0.4 and ui["last_link_id"] == max(link[0] for link in ui["links"])
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert ui["last_node_id"] == max(nodes)
    for node in ui["nodes"]:
        assert {"id", "type", "pos", "size", "flags", "order", "mode", "properties"} <= node.keys(), node["id"]
    for link in ui["links"]:  # every link is mirrored in the nodes' input / output slots
        link_id, src, src_slot, dst, dst_slot, _ = link
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
    assert (comfy_env.WORKFLOWS / f"{name}.jpg").is_file()  # the template browser's card picture


# ---------------------------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("scheduler", ["simple", "beta", "karras"])
def test_k1_equals_the_same_sde_built_in_process(env, torch, model, drm, prompts, scheduler):
    """DRMStepwiseSampler with k = 1 is exactly plain Flow-GRPO SDE sampling with the same noise stream."""
    import comfy.samplers
    from drm_core import sde_sample

    sde_generator = env.pack_module("nodes.sampler").sde_generator

    def reference(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        s_in = x.new_ones([x.shape[0]])

        def velocity(x_t, sigma):
            return (x_t - model_k(x_t, sigma * s_in, **extra_args)) / sigma

        return sde_sample(velocity, x, sigmas, 0.7, sde_generator(extra_args["seed"]))

    latent = empty_latent(env, batch=2)
    ours = sample_custom(env, model, stepwise_sampler(env, drm, prompts[0], k=1), prompts, latent, scheduler=scheduler)
    ref = sample_custom(env, model, comfy.samplers.KSAMPLER(reference), prompts, latent, scheduler=scheduler)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_k1_ode_all_in_one_equals_stock_euler_ksampler(env, torch, model, drm, prompts):
    latent = empty_latent(env, batch=2)
    pos, neg = prompts
    ours, plot = env.node("DRMStepwiseKSampler").sample(model, drm, pos, neg, latent, 11, 4, 3.0, "simple", 1, 0.0,
                                                        0.0, 1.0, 1, "ode", 1.0)
    stock = env.node("KSampler").sample(model, 11, 4, 3.0, "euler", "simple", pos, neg, latent)[0]
    torch.testing.assert_close(ours["samples"], stock["samples"], rtol=1e-5, atol=1e-5)
    assert plot.shape[0] == 1 and plot.shape[-1] == 3


def test_same_seed_same_latent_other_seed_differs(env, torch, model, drm, prompts):
    sampler = stepwise_sampler(env, drm, prompts[0], k=3, start=0.0, end=0.75, every=2)
    latent = empty_latent(env, batch=2)
    a = sample_custom(env, model, sampler, prompts, latent, seed=3)
    b = sample_custom(env, model, sampler, prompts, latent, seed=3)
    c = sample_custom(env, model, sampler, prompts, latent, seed=4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    plain = sample_custom(env, model, stepwise_sampler(env, drm, prompts[0], k=1), prompts, latent, seed=3)
    assert not torch.allclose(a, plain)  # the DRM's choices changed the path


def test_all_in_one_equals_samplercustom_path(env, torch, model, drm, prompts):
    latent = empty_latent(env, batch=1)
    pos, neg = prompts
    ours, plot = env.node("DRMStepwiseKSampler").sample(model, drm, pos, neg, latent, 5, 4, 2.5, "simple", 3, 0.7,
                                                        0.0, 1.0, 1, "sde", 1.0)
    custom = sample_custom(env, model, stepwise_sampler(env, drm, pos, k=3), prompts, latent, seed=5)
    torch.testing.assert_close(ours["samples"], custom, rtol=0, atol=0)
    assert plot.std() > 0  # something was drawn


def test_samplercustomadvanced_gives_the_samplercustom_result(env, torch, model, drm, prompts):
    sampler = stepwise_sampler(env, drm, prompts[0], k=2)
    latent = empty_latent(env)
    guider = env.node("CFGGuider").get_guider(model, prompts[0], prompts[1], 2.5)[0]
    noise = env.node("RandomNoise").get_noise(7)[0]
    sigmas = env.node("BasicScheduler").get_sigmas(model, "simple", 4, 1.0)[0]
    advanced = env.node("SamplerCustomAdvanced").sample(noise, guider, sampler, sigmas, latent)[0]["samples"]
    torch.testing.assert_close(advanced, sample_custom(env, model, sampler, prompts, latent), rtol=0, atol=0)


def test_lora_denoise_and_batch(env, torch, model, drm, prompts):
    """Works on a LoRA-patched model, img2img (denoise < 1) and batch > 1 with a per-image prompt batch."""
    lora_model = env.node("LoraLoaderModelOnly").load_lora_model_only(model, LORA_FILE, 1.0)[0]
    start = {"samples": torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))}
    other = conditioning("b")
    cond2 = [[torch.cat([prompts[0][0][0], other[0][0]]),
              {"pooled_output": torch.cat([prompts[0][0][1]["pooled_output"], other[0][1]["pooled_output"]])}]]
    sampler = stepwise_sampler(env, drm, cond2, k=2)
    out = sample_custom(env, lora_model, sampler, (cond2, prompts[1]), start, steps=6, denoise=0.5)
    base = sample_custom(env, model, sampler, (cond2, prompts[1]), start, steps=6, denoise=0.5)
    assert out.shape == (2, 16, 8, 8) and torch.isfinite(out).all()
    assert not torch.allclose(out, base)  # the LoRA is applied
    assert not torch.allclose(out, start["samples"])


def test_interrupt_during_sampling_stops_it(env, torch, model, drm, prompts):
    import comfy.model_management as mm

    calls = []

    def wrapper(apply_model, args):
        calls.append(1)
        if len(calls) == 2:
            mm.interrupt_current_processing(True)  # as the UI's Cancel button does
        return apply_model(args["input"], args["timestep"], **args["c"])

    patched = model.clone()
    patched.set_model_unet_function_wrapper(wrapper)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            sample_custom(env, patched, stepwise_sampler(env, drm, prompts[0], k=2), prompts, empty_latent(env),
                          steps=8)
    finally:
        mm.interrupt_current_processing(False)
    assert len(calls) == 2  # stopped right after the interrupt, not at the end of the 8 steps


# ------------------------------------------------------------------------------------------ memory (issue 14)

def record_loads(monkeypatch, torch):
    """Events in order: ("load", models, memory_required) for every load_models_gpu call and ("step", loaded
    patchers) at every generator evaluation."""
    import comfy.model_management as mm
    import comfy.model_patcher

    events = []
    real_load = mm.load_models_gpu

    def load(models, memory_required=0, *args, **kwargs):
        events.append(("load", list(models), memory_required))
        return real_load(models, memory_required, *args, **kwargs)

    real_apply = comfy.model_base.BaseModel.apply_model

    def apply_model(self, *args, **kwargs):
        events.append(("step", list(mm.loaded_models())))
        return real_apply(self, *args, **kwargs)

    import comfy.model_base
    monkeypatch.setattr(mm, "load_models_gpu", load)
    monkeypatch.setattr(comfy.model_base.BaseModel, "apply_model", apply_model)
    mm.unload_all_models()
    return events


def test_drm_is_budgeted_with_the_generator_before_the_first_step(env, torch, model, drm, prompts, monkeypatch):
    """All-in-one: ComfyUI loads MODEL and DRM in one call whose estimate covers the DRM on k * B candidates;
    both are in the loaded-model list at the first step and nothing loads after it."""
    import comfy.sampler_helpers

    events = record_loads(monkeypatch, torch)
    latent, (pos, neg), k = empty_latent(env, batch=2), prompts, 24  # enough candidates to outweigh CFG
    env.node("DRMStepwiseKSampler").sample(model, drm, pos, neg, latent, 5, 4, 2.5, "simple", k, 0.7, 0.0, 1.0, 1,
                                           "sde", 1.0)
    first_step = next(i for i, e in enumerate(events) if e[0] == "step")
    loads = [e for e in events[:first_step] if e[0] == "load" and any(m is drm for m in e[1])]
    assert len(loads) == 1 and any(m.is_clone(model) for m in loads[0][1])
    conds = {"positive": comfy.sampler_helpers.convert_cond(pos)}
    plain = comfy.sampler_helpers.estimate_memory(model, (2, 16, 8, 8), conds)[0]  # ComfyUI's own, for MODEL alone
    activations = drm.model.activation_bytes(k * 2, 8, 8, pos[0][0].shape[1])
    assert loads[0][2] >= activations > plain
    assert all(any(m is drm for m in e[1]) and any(m.is_clone(model) for m in e[1]) for e in events if e[0] == "step")
    assert not [e for e in events[first_step:] if e[0] == "load"]


def test_sampler_node_loads_the_drm_next_to_the_generator_before_the_first_step(env, torch, model, drm, prompts,
                                                                              monkeypatch):
    events = record_loads(monkeypatch, torch)
    sample_custom(env, model, stepwise_sampler(env, drm, prompts[0], k=3), prompts, empty_latent(env))
    first_step = next(i for i, e in enumerate(events) if e[0] == "step")
    loads = [e for e in events[:first_step] if e[0] == "load" and any(m is drm for m in e[1])]
    assert len(loads) == 1 and any(m.is_clone(model) for m in loads[0][1])
    assert not [e for e in events[first_step:] if e[0] == "load"]


def test_partially_loaded_models_sample_the_same_latents(env, torch, model, drm, prompts, monkeypatch):
    """--lowvram on CPU: ComfyUI's own ModelPatcher.load with a budget of a third of each model (generator and DRM),
    so a share of their layers stays on the offload side and is cast per call; latents equal a full load's."""
    import comfy.model_management as mm
    import comfy.model_patcher

    latent, (pos, neg) = empty_latent(env, batch=2), prompts
    args = (5, 4, 2.5, "simple", 3, 0.7, 0.0, 1.0, 1, "sde", 1.0)
    full = env.node("DRMStepwiseKSampler").sample(model, drm, pos, neg, latent, *args)[0]["samples"]
    real_load, partial = comfy.model_patcher.ModelPatcher.load, []

    def lowvram_load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        real_load(self, device_to, max(1, self.model_size() // 3), force_patch_weights, False)
        partial.append((self.model.__class__.__name__, self.model.model_lowvram))

    mm.unload_all_models()
    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "load", lowvram_load)
    low = env.node("DRMStepwiseKSampler").sample(model, drm, pos, neg, latent, *args)[0]["samples"]
    mm.unload_all_models()
    assert ("DRM", True) in partial and any(name != "DRM" and low for name, low in partial)
    torch.testing.assert_close(low, full, rtol=0, atol=0)


def test_partially_loaded_drm_scores_exactly_like_a_full_load(env, torch, prompts):
    """ComfyUI's own partial load (a quarter of the DRM's bytes on the device, the rest cast per call)."""
    import comfy.model_management as mm
    from drm_core import to_model_space

    x = to_model_space(torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(3)))
    context, pooled = prompts[0][0][0], prompts[0][0][1]["pooled_output"]
    loader = env.node("DRMLoader")
    reference = loader.load(DRM_FILE, "fp32")[0].model.score(x, 0.3, context, pooled)
    patcher = loader.load(DRM_FILE, "fp32")[0]
    mm.unload_all_models()
    patcher.patch_model(patcher.load_device, lowvram_model_memory=patcher.model_size() // 4)
    try:
        cast = [m for m in patcher.model.modules() if getattr(m, "comfy_cast_weights", False)]
        assert patcher.model.model_lowvram and len(cast) > 10
        torch.testing.assert_close(patcher.model.score(x, 0.3, context, pooled), reference, rtol=0, atol=0)
    finally:
        patcher.unpatch_model(patcher.offload_device)


def test_fp8_drm_loads_scores_close_to_fp32_and_guides_sampling(env, torch, model, prompts):
    loader, node = env.node("DRMLoader"), env.node("DRMScoreLatent")
    fp8 = loader.load(DRM_FILE, "fp8_e4m3fn")[0]
    matrices = [m.weight for m in fp8.model.modules() if isinstance(m, torch.nn.Linear)]
    assert matrices and all(w.dtype == torch.float8_e4m3fn for w in matrices)
    assert fp8.model_size() < 0.5 * loader.load(DRM_FILE, "fp32")[0].model_size()
    raw = torch.randn(16, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    reference = torch.tensor(node.score(loader.load(DRM_FILE, "fp32")[0], {"samples": raw}, prompts[0], 0.0, 0)[0])
    scores = torch.tensor(node.score(fp8, {"samples": raw}, prompts[0], 0.0, 0)[0])
    assert torch.corrcoef(torch.stack([reference, scores]))[0, 1] > 0.99
    pos, neg = prompts
    out = env.node("DRMStepwiseKSampler").sample(model, fp8, pos, neg, empty_latent(env), 5, 4, 2.5, "simple", 3,
                                                 0.7, 0.0, 1.0, 1, "sde", 1.0)[0]["samples"]
    assert torch.isfinite(out).all()


def test_scoring_runs_in_chunks_sized_from_free_memory(env, torch, drm, prompts, monkeypatch):
    import comfy.model_management as mm

    raw = torch.randn(7, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    node = env.node("DRMScoreLatent")
    whole = node.score(drm, {"samples": raw}, prompts[0], 0.0, 0)[0]
    per_latent = drm.model.activation_bytes(1, 8, 8, prompts[0][0][0].shape[1])
    monkeypatch.setattr(mm, "get_free_memory", lambda *a, **k: 3 * per_latent)
    batches = []
    forward = type(drm.model).forward
    monkeypatch.setattr(type(drm.model), "forward", lambda self, x, *a, **k: batches.append(len(x)) or
                        forward(self, x, *a, **k))
    chunked = node.score(drm, {"samples": raw}, prompts[0], 0.0, 0)[0]
    assert batches == [3, 3, 1]
    torch.testing.assert_close(torch.tensor(chunked), torch.tensor(whole), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ scoring

def test_score_latent_equals_drm_core(env, torch, drm, prompts):
    from drm_core import add_noise, load_drm, to_model_space

    reference = load_drm(env.base / "models" / "drm" / DRM_FILE)
    raw = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    ctx, pooled = prompts[0][0][0], prompts[0][0][1]["pooled_output"]
    node = env.node("DRMScoreLatent")
    scores, summary = node.score(drm, {"samples": raw}, prompts[0], 0.0, 0)
    torch.testing.assert_close(torch.tensor(scores), reference.score(to_model_space(raw), 0.0, ctx, pooled),
                               rtol=1e-6, atol=1e-6)
    assert len(scores) == 3 and "#2" in summary and "best" in summary
    noisy, _ = node.score(drm, {"samples": raw}, prompts[0], 0.4, 9)
    noise = torch.randn(raw.shape, generator=torch.Generator().manual_seed(9))
    expected = reference.score(add_noise(to_model_space(raw), noise, 0.4), 0.4, ctx, pooled)
    torch.testing.assert_close(torch.tensor(noisy), expected, rtol=1e-6, atol=1e-6)
    assert node.score(drm, {"samples": raw}, prompts[0], 0.4, 9)[0] == noisy  # seeded noise: reproducible


def test_score_image_encodes_then_scores(env, torch, drm, prompts):
    vae = env.node("VAELoader").load_vae("taesd3")[0]
    image = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    scores, _ = env.node("DRMScoreImage").score(drm, image, vae, prompts[0], 0.0, 0)
    latent_scores, _ = env.node("DRMScoreLatent").score(drm, {"samples": vae.encode(image)}, prompts[0], 0.0, 0)
    assert scores == pytest.approx(latent_scores, abs=1e-6)


def test_select_best_keeps_latent_image_and_mask_in_step(env, torch):
    samples = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 16, 2, 2)
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 16, 16, 3)
    masks = torch.arange(4.0).view(4, 1, 1).expand(4, 16, 16)
    latent = {"samples": samples, "noise_mask": torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 2, 2),
              "batch_index": [10, 11, 12, 13]}
    out, image, mask, indices, summary = env.node("DRMSelectBest").select(
        [0.1, 0.9, -0.5, 0.7], [latent], [2], image=[images], mask=[masks])
    assert indices == [1, 3] and "#1" in summary
    assert out["samples"][:, 0, 0, 0].tolist() == [1.0, 3.0] and out["noise_mask"][:, 0, 0, 0].tolist() == [1.0, 3.0]
    assert out["batch_index"] == [11, 13]
    assert image[:, 0, 0, 0].tolist() == [1.0, 3.0] and mask[:, 0, 0].tolist() == [1.0, 3.0]
    with pytest.raises(ValueError, match="DRMSelectBest: got 3 scores for a batch of 4"):
        env.node("DRMSelectBest").select([0.1, 0.2, 0.3], [latent], [1])


# ---------------------------------------------------------------------------------- published reward models

def test_loader_lists_drm_files_and_download_folders_only(env):
    """The list is DRM .safetensors files and recognised download folders: no .pt, nothing from inside a folder,
    no half-written temporary; `base` offers none + checkpoints + diffusion_models."""
    import folder_paths

    drm_dir = env.base / "models" / "drm"
    strays = [drm_dir / "stray.pt", drm_dir / ".drm_sd3.5_medium.safetensors.x1.tmp"]
    for stray in strays:
        stray.write_bytes(b"")
    try:
        spec = env.nodes.NODE_CLASS_MAPPINGS["DRMLoader"].INPUT_TYPES()
    finally:
        for stray in strays:
            stray.unlink()
    entries = comfy_env.combo_options(spec["required"]["drm_name"])
    assert DRM_FILE in entries and DINA_FOLDER in entries
    assert [e for e in entries if not e.endswith(".safetensors")] == [DINA_FOLDER]
    assert not [e for e in entries if e.startswith(DINA_FOLDER + os.sep) or e.startswith(".")]
    assert any(f.endswith("rm_head.pt") for f in folder_paths.get_filename_list("drm"))  # ComfyUI's own list would
    choices, options = comfy_env.combo_options(spec["optional"]["base"]), spec["optional"]["base"][1]
    assert options["default"] == "none" and choices[0] == "none" and CHECKPOINT in choices
    assert "ignores this input" in options["tooltip"]


def test_download_folder_loads_on_a_base_converts_once_and_guides_sampling(env, torch, model, prompts, monkeypatch):
    published = env.pack_module("drm_core.published")
    folder = env.base / "models" / "drm" / DINA_FOLDER
    cached = folder / "converted" / "sd3.5_medium.drm.safetensors"
    shutil.rmtree(folder / "converted", ignore_errors=True)
    calls, real = [], published.convert
    monkeypatch.setattr(published, "convert", lambda *a, **k: calls.append(a) or real(*a, **k))
    loader = env.node("DRMLoader")
    with pytest.raises(ValueError, match=rf"^DRMLoader: {DINA_FOLDER} holds only a LoRA and a head; choose your "
                                         r"SD3.5 Medium checkpoint in `base`$"):
        loader.load(DINA_FOLDER, "fp32")
    first = loader.load(DINA_FOLDER, "fp32", CHECKPOINT)[0]
    assert len(calls) == 1 and cached.is_file()
    mtime = cached.stat().st_mtime_ns
    second = loader.load(DINA_FOLDER, "fp32", CHECKPOINT)[0]
    assert len(calls) == 1 and cached.stat().st_mtime_ns == mtime  # the second load read the cached file
    assert [p.name for p in cached.parent.iterdir()] == [cached.name]
    assert second.model.config.head.kind == "dina-lrm" and second.model.provenance["converted_from"]["base"]["name"] \
        == CHECKPOINT
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    ctx, pooled = prompts[0][0][0], prompts[0][0][1]["pooled_output"]
    torch.testing.assert_close(second.model.score(x, 0.5, ctx, pooled), first.model.score(x, 0.5, ctx, pooled),
                               rtol=0, atol=0)
    latent = empty_latent(env)
    guided = sample_custom(env, model, stepwise_sampler(env, second, prompts[0], k=3, end=1.0), prompts, latent)
    plain = sample_custom(env, model, stepwise_sampler(env, second, prompts[0], k=1), prompts, latent)
    assert guided.shape == (1, 16, 8, 8) and torch.isfinite(guided).all()
    assert not torch.allclose(guided, plain)  # the DiNa-LRM's choices changed the path


def test_incomplete_download_names_the_missing_file(env):
    folder = env.base / "models" / "drm" / "DiNa-LRM-incomplete"
    shutil.copytree(env.base / "models" / "drm" / DINA_FOLDER, folder, ignore=shutil.ignore_patterns("converted"))
    (folder / "checkpoint" / "rm_head.pt").unlink()
    try:
        assert "DiNa-LRM-incomplete" in comfy_env.combo_options(env.nodes.NODE_CLASS_MAPPINGS["DRMLoader"].INPUT_TYPES()[
            "required"]["drm_name"])  # listed, so that choosing it says what is missing
        with pytest.raises(ValueError, match=r"DRMLoader: .*DiNa-LRM-incomplete: the DiNa-LRM download is incomplete: "
                                             r"missing checkpoint/rm_head.pt\. Download it again: hf download "
                                             r"liuhuohuo/DiNa-LRM-SD35M-12layers"):
            env.node("DRMLoader").load("DiNa-LRM-incomplete", "auto", CHECKPOINT)
    finally:
        shutil.rmtree(folder)


def test_auto_sigma_is_the_models_recommendation_and_is_reported(env, torch, drm, prompts):
    from drm_core import SigmaTable, add_noise, load_drm, to_model_space

    node = env.node("DRMScoreLatent")
    sigma_spec = node.INPUT_TYPES()["required"]["sigma"][1]
    assert sigma_spec["default"] == -1.0 and sigma_spec["min"] == -1.0 and "auto" in sigma_spec["tooltip"]
    raw = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(6))
    auto, summary = node.score(drm, {"samples": raw}, prompts[0], -1.0, 5)
    assert auto == node.score(drm, {"samples": raw}, prompts[0], 0.0, 5)[0]  # a trained DRM recommends clean
    assert summary.startswith("DRM scores at sigma 0 (model's recommendation), higher is preferred")
    assert node.score(drm, {"samples": raw}, prompts[0], 0.25, 5)[1].startswith("DRM scores at sigma 0.25 (as set)")
    dina = env.node("DRMLoader").load(DINA_FOLDER, "fp32", CHECKPOINT)[0]
    scores, summary = node.score(dina, {"samples": raw}, prompts[0], -1.0, 5)
    assert summary.startswith("DRM scores at sigma 0.100746 (model's recommendation: 0.1 on its timestep table)")
    reference = load_drm(env.base / "models" / "drm" / DINA_FOLDER / "converted" / "sd3.5_medium.drm.safetensors")
    sigma = SigmaTable(steps=1000, shift=3.0).snap(0.1)
    noise = torch.randn(raw.shape, generator=torch.Generator().manual_seed(5))
    ctx, pooled = prompts[0][0][0], prompts[0][0][1]["pooled_output"]
    expected = reference.score(add_noise(to_model_space(raw), noise, sigma), sigma, ctx, pooled)
    torch.testing.assert_close(torch.tensor(scores), expected, rtol=1e-5, atol=1e-5)
    vae = env.node("VAELoader").load_vae("taesd3")[0]
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    assert "sigma 0.100746 (model's recommendation" in env.node("DRMScoreImage").score(dina, image, vae, prompts[0],
                                                                                       -1.0, 0)[1]


# ------------------------------------------------------------------------------------------------- errors

def test_clear_errors(env, torch, model, drm, prompts):
    import comfy.model_base

    no_pooled = [[prompts[0][0][0], {}]]
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    with pytest.raises(ValueError, match="DRMScoreLatent: the CONDITIONING has no 'pooled_output'"):
        env.node("DRMScoreLatent").score(drm, latent, no_pooled, 0.0, 0)
    with pytest.raises(ValueError, match="DRMStepwiseSampler: the CONDITIONING has no 'pooled_output'"):
        stepwise_sampler(env, drm, no_pooled)
    sd15_cond = [[torch.zeros(1, 77, 768), {"pooled_output": torch.zeros(1, 2048)}]]
    with pytest.raises(ValueError, match=r"DRMScoreLatent: the CONDITIONING tokens must be \[B, N, 4096\]"):
        env.node("DRMScoreLatent").score(drm, latent, sd15_cond, 0.0, 0)
    with pytest.raises(ValueError, match="DRMScoreLatent: the LATENT must be an SD3 latent.*4 channels"):
        env.node("DRMScoreLatent").score(drm, {"samples": torch.zeros(1, 4, 8, 8)}, prompts[0], 0.0, 0)
    with pytest.raises(FileNotFoundError, match="DRMLoader: DRM file 'missing.safetensors' not found.*models/drm"):
        env.node("DRMLoader").load("missing.safetensors", "auto")
    with pytest.raises(ValueError, match="the 'drm' input must come from a DRMLoader"):
        env.node("DRMScoreLatent").score(model, latent, prompts[0], 0.0, 0)
    check = env.pack_module("nodes.common").check_model_matches
    with pytest.raises(ValueError, match="DRMStepwiseSampler: the MODEL is a Flux model.*SD3"):
        check(object.__new__(comfy.model_base.Flux), drm.model, "DRMStepwiseSampler")


def test_drm_for_another_architecture_is_refused(env, torch, drm, prompts):
    """An SD3 MMDiT with other text dims (a DRM for another family would not fit): refused before sampling."""
    import comfy.ops
    import comfy.sd
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    net = MMDiT(patch_size=2, in_channels=16, out_channels=16, depth=1, adm_in_channels=32, pos_embed_max_size=16,
                num_patches=256, operations=comfy.ops.disable_weight_init,
                context_embedder_config={"target": "torch.nn.Linear",
                                         "params": {"in_features": 64, "out_features": 64}})
    other = comfy.sd.load_diffusion_model_state_dict({k: torch.zeros_like(v) for k, v in net.state_dict().items()},
                                                     model_options={"dtype": torch.float32})
    small = [[torch.zeros(1, 8, 64), {"pooled_output": torch.zeros(1, 32)}]]
    with pytest.raises(ValueError, match=r"DRMStepwiseKSampler: the DRM does not fit this MODEL: context dim 64 "
                                         r"\(DRM expects 4096\), pooled dim 32"):
        env.node("DRMStepwiseKSampler").sample(other, drm, prompts[0], small, empty_latent(env), 0, 2, 1.0, "simple",
                                               2, 0.7, 0.0, 1.0, 1, "sde", 1.0)
    with pytest.raises(ValueError, match="DRMStepwiseSampler: the DRM does not fit this MODEL"):
        sample_custom(env, other, stepwise_sampler(env, drm, prompts[0]), (small, small), empty_latent(env))


# ------------------------------------------------------------------------------------------------- server

@pytest.fixture(scope="module")
def server(env, tmp_path_factory):
    """A real ComfyUI server over its own base folder (same tiny models), with a DRM also in an extra path."""
    base = tmp_path_factory.mktemp("server_base")
    shutil.copytree(env.base / "models", base / "models")
    extra = base / "elsewhere" / "drm_models"
    extra.mkdir(parents=True)
    shutil.copy(base / "models" / "drm" / DRM_FILE, extra / "extra_drm.safetensors")
    config = base / "extra_model_paths.yaml"
    config.write_text(f"drm_tests:\n    base_path: {base / 'elsewhere'}\n    drm: drm_models/\n")
    srv = comfy_env.ComfyServer(COMFYUI, base, extra_config=config)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_server_loads_the_pack_and_serves_object_info(server):
    log = server.log()
    assert "custom_nodes/drm_pack" in log
    for line in log.splitlines():
        assert not (("Cannot import" in line or "IMPORT FAILED" in line) and "drm_pack" in line), line
    info = server.get("/object_info")
    for node_id in NODE_IDS:
        assert info[node_id]["description"] and info[node_id]["category"] == "DRM", node_id
    options = comfy_env.combo_options(info["DRMLoader"]["input"]["required"]["drm_name"])
    assert DRM_FILE in options and "extra_drm.safetensors" in options  # extra_model_paths.yaml is honoured
    assert DINA_FOLDER in options and not [o for o in options if o.endswith(".pt") or o.startswith(DINA_FOLDER + "/")]
    assert CHECKPOINT in comfy_env.combo_options(info["DRMLoader"]["input"]["optional"]["base"])


# The six nodes' interface as it was before the V3 port (V1): shared workflows depend on ids, input names and
# order (widget values are positional), output types and their order.
V1_INTERFACE = {
    "DRMLoader": (["drm_name", "dtype"], ["base"], ["DRM_MODEL"], ["drm"]),
    "DRMScoreLatent": (["drm", "latent", "conditioning", "sigma", "seed"], [], ["FLOAT", "STRING"],
                       ["scores", "summary"]),
    "DRMScoreImage": (["drm", "image", "vae", "conditioning", "sigma", "seed"], [], ["FLOAT", "STRING"],
                      ["scores", "summary"]),
    "DRMSelectBest": (["scores", "latent", "top_k"], ["image", "mask"], ["LATENT", "IMAGE", "MASK", "INT", "STRING"],
                      ["latent", "image", "mask", "indices", "summary"]),
    "DRMStepwiseSampler": (["drm", "conditioning", "k", "noise_level", "branch_start", "branch_end", "branch_every",
                            "outside_range"], [], ["SAMPLER"], ["sampler"]),
    "DRMStepwiseKSampler": (["model", "drm", "positive", "negative", "latent_image", "seed", "steps", "cfg",
                             "scheduler", "k", "noise_level", "branch_start", "branch_end", "branch_every",
                             "outside_range", "denoise"], ["reward_conditioning"], ["LATENT", "IMAGE"],
                            ["latent", "reward_trace"]),
}


def test_the_six_nodes_are_v3_with_their_v1_interface(env, server):
    from comfy_api.latest import io

    info = server.get("/object_info")
    assert sorted(n for n, v in info.items() if v["category"] == "DRM") == sorted(V1_INTERFACE)
    for node_id, (required, optional, outputs, names) in V1_INTERFACE.items():
        assert issubclass(env.nodes.NODE_CLASS_MAPPINGS[node_id], io.ComfyNode), node_id
        node = info[node_id]
        assert node["input_order"]["required"] == required and node["input_order"].get("optional", []) == optional
        assert node["output"] == outputs and node["output_name"] == names, node_id
    assert info["DRMScoreLatent"]["output_is_list"] == [True, False]
    assert info["DRMSelectBest"]["output_is_list"] == [False, False, False, True, False]
    assert info["DRMStepwiseKSampler"]["input"]["required"]["seed"][1]["control_after_generate"]


@pytest.mark.parametrize("node_id, widgets, message", [
    ("DRMStepwiseKSampler", {"branch_start": 0.8, "branch_end": 0.2}, "branch_start (0.8) must not exceed branch_end"),
    ("DRMStepwiseSampler", {"branch_start": 0.8, "branch_end": 0.2}, "branch_start (0.8) must not exceed branch_end"),
    ("DRMScoreLatent", {"sigma": -0.5}, "sigma must be -1 (auto"),
])
def test_bad_widget_values_are_refused_before_queueing(server, node_id, widgets, message):
    import urllib.error

    name = "drm_stepwise_ksampler" if node_id != "DRMScoreLatent" else "drm_best_of_n"
    graph = comfy_env.for_tiny_models(comfy_env.load_workflow(name)[1])
    if node_id == "DRMStepwiseSampler":
        graph = comfy_env.for_tiny_models(comfy_env.load_workflow("drm_stepwise_sampling")[1])
    node = next(k for k, v in graph.items() if v["class_type"] == node_id)
    graph[node]["inputs"].update(widgets)
    try:  # refused (400), or queued without the outputs that depend on the node (ComfyUI runs the valid rest)
        body = server.post("/prompt", {"prompt": graph, "client_id": "drm-tests"})
        server.wait(body["prompt_id"])
    except urllib.error.HTTPError as refused:
        body = json.loads(refused.read())
    assert message in json.dumps(body["node_errors"][node]), body


def test_scores_and_trace_are_shown_on_the_nodes(server):
    for name, shown in (("drm_best_of_n", ("DRMScoreLatent", "DRMSelectBest")),
                        ("drm_stepwise_ksampler", ("DRMStepwiseKSampler",))):
        graph = comfy_env.for_tiny_models(comfy_env.load_workflow(name)[1])
        outputs = server.run(graph)["outputs"]
        for node_id in shown:
            node = next(k for k, v in graph.items() if v["class_type"] == node_id)
            images = outputs[node]["images"]
            assert images and images[0]["type"] == "temp", (name, node_id)
            assert (server.log_path.parent / "temp" / images[0]["subfolder"] / images[0]["filename"]).is_file()
            assert outputs[node]["text"][0], (name, node_id)


@pytest.mark.parametrize("name", comfy_env.workflow_names())
def test_server_runs_the_workflow(server, name):
    graph = comfy_env.for_tiny_models(comfy_env.load_workflow(name)[1])
    comfy_env.check_workflow_run(server, name, server.run(graph))
    assert "lora key not loaded" not in server.log()


def test_exported_step_grpo_lora_matches_peft_in_comfyui(env, torch, caplog):
    """A LoRA trained with PEFT (scale alpha / rank = 2) and written by export_lora (scale folded into lora_B, no
    `.alpha` tensors) loads through the stock LoraLoaderModelOnly at strength 1.0 with no unloaded key and gives
    the same MMDiT output as the in-memory PEFT model (ComfyUI applies scale 1.0 without `.alpha` tensors)."""
    import logging

    import comfy.model_management
    from safetensors import safe_open

    from training.lora import add_lora, export_lora

    torch.manual_seed(3)
    peft_model = add_lora(comfy_env.tiny_generator(), rank=4, alpha=8.0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.05)
    name = "exported_step_grpo_test.safetensors"
    path = export_lora(peft_model, env.base / "models" / "loras" / name)
    with safe_open(str(path), "pt") as f:
        assert not [k for k in f.keys() if k.endswith(".alpha")]  # diffusers' load_lora_weights refuses those
    unet = env.node("UNETLoader").load_unet(CHECKPOINT, "default")[0]
    with caplog.at_level(logging.WARNING):
        patched = env.node("LoraLoaderModelOnly").load_lora_model_only(unet, name, 1.0)[0]
        comfy.model_management.load_models_gpu([patched])
    assert "lora key not loaded" not in caplog.text
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = conditioning("a lighthouse")
    ctx, pooled = cond[0][0].expand(2, -1, -1), cond[0][1]["pooled_output"].expand(2, -1)
    t = torch.tensor([250.0, 700.0])
    with torch.no_grad():
        got = patched.model.diffusion_model(x, t, context=ctx, y=pooled)
        expected = peft_model(x, ctx, pooled, t).sample
        plain = comfy_env.tiny_generator()(x, ctx, pooled, t).sample
    assert (expected - plain).abs().max() > 1e-3
    torch.testing.assert_close(got.float(), expected, rtol=1e-5, atol=1e-5)


def test_warns_once_when_the_drm_was_trained_on_other_t5_padding(env, torch, caplog):
    """An imported DiNa-LRM expects T5 padded to 256 (77 + 256 tokens); ComfyUI gives 154: warn once, still score."""
    import logging

    common = env.pack_module("nodes.common")
    drm_core = env.pack_module("drm_core")
    from tiny import TINY_HEAD

    drm = drm_core.drm_from_base(comfy_env.tiny_generator().state_dict(), blocks=1, **TINY_HEAD)
    drm.provenance["text_encoding"] = {"scheme": "diffusers-sd3", "t5_max_length": 256}
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            common.drm_conditioning(conditioning("a cat"), drm, "DRMScoreLatent")
    assert caplog.text.count("T5 padded to 256") == 1
