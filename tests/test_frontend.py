"""The shipped workflows in the real ComfyUI frontend (headless Chromium driven by playwright).

A user drops a workflow on the canvas: no node is missing; the missing-models dialog offers a download for every
model file the workflow lists; the note and every node are in view in a 1440x810 window; the prompt the frontend
builds is the API twin; and, queued from the page with the Run button, the workflow runs to the end (on tiny
stand-in models, the text encoders swapped for random conditioning through the frontend's graph API). The pack's
template list serves each workflow's thumbnail.

Skipped (with the reason shown) unless ComfyUI, playwright and Chromium are available: run with ComfyUI's Python,
`COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest tests/test_frontend.py`.
"""

from __future__ import annotations

import urllib.request

import pytest

import comfy_env
import frontend_env
from frontend_env import MISSING_MODELS

COMFYUI, WHY = comfy_env.find_comfyui()
CHROMIUM, NO_BROWSER = frontend_env.find_browser()
pytestmark = [pytest.mark.skipif(COMFYUI is None, reason=WHY), pytest.mark.skipif(CHROMIUM is None, reason=NO_BROWSER)]
PACK = "drm_pack"  # the folder name ComfyServer gives the pack in custom_nodes/


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """ComfyUI with the tiny models: the MMDiT in diffusion_models/ and no checkpoint or text encoder files, so
    every SD3.5 file a workflow lists is missing, as on a fresh install."""
    base = tmp_path_factory.mktemp("frontend_base")
    srv = comfy_env.ComfyServer(COMFYUI, base)
    try:
        frontend_env.write_models(COMFYUI, base / "models")  # while the server starts (it lists models per request)
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def ui(server):
    with frontend_env.frontend(server.url, CHROMIUM) as frontend:
        yield frontend


def api_twin(name: str) -> dict:
    """workflows/api/<name>.json without the titles (class types, widget values and links)."""
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]}
            for k, v in comfy_env.load_workflow(name)[1].items()}


def test_template_list_serves_every_workflow_and_its_thumbnail(server):
    assert sorted(server.get("/workflow_templates")[PACK]) == comfy_env.workflow_names()
    for name in comfy_env.workflow_names():  # the URL the template browser shows as the card picture
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/{PACK}/{name}.jpg", timeout=10) as r:
            data = r.read()
            assert r.status == 200 and r.headers["Content-Type"] == "image/jpeg", name
        assert data[:3] == b"\xff\xd8\xff" and 5_000 < len(data) < 200_000, (name, len(data))


@pytest.mark.parametrize("name", comfy_env.workflow_names())
def test_dropped_workflow_offers_every_download_and_opens_in_view(ui, name):
    ui.drop(frontend_env.workflow_path(name))
    ui.wait_for_dialog(MISSING_MODELS)
    assert ui.dialogs() == [MISSING_MODELS]  # and no "Some Nodes Are Missing" dialog
    listed = frontend_env.models_listed(comfy_env.load_workflow(name)[0])
    rows = ui.missing_models()
    assert [(r["label"], r["url"]) for r in rows] == [(f"{m['directory']} / {m['name']}", m["url"]) for m in listed]
    assert [r for r in rows if r["errors"] or r["disabled"]] == []  # no "download not allowed", no disabled button
    ui.close_dialogs()
    assert ui.hidden_nodes() == []
    assert ui.clipped_notes() == []  # the note reads without scrolling


PREVIEWING_NODES = ("DRMScoreLatent", "DRMScoreImage", "DRMSelectBest", "DRMStepwiseKSampler")


@pytest.mark.parametrize("name", comfy_env.workflow_names())
def test_frontend_prompt_is_the_api_twin_and_runs_from_the_run_button(server, ui, name):
    ui.drop(frontend_env.workflow_path(name))
    ui.wait_for_dialog(MISSING_MODELS)
    ui.close_dialogs()
    prompt = ui.prompt()
    assert {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()} == api_twin(name)
    ui.use_tiny_models()
    comfy_env.check_workflow_run(server, name, server.wait(ui.run()))
    shown = [n["id"] for n in comfy_env.load_workflow(name)[0]["nodes"] if n["type"] in PREVIEWING_NODES]
    for urls in ui.node_images(shown).values():  # scores / reward trace drawn on the node itself
        assert all("type=temp" in url for url in urls), urls
