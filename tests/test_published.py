"""drm_core.published and drm_core.scoring: recognising downloads, naming what is missing, listing, converting once,
and the scoring convention (DiNa-LRM's sigma table) a DRM file carries."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dina_fixture import write_tiny_dina
from drm_core import DRMError, ScoringConvention, SigmaTable, drm_from_base, load_drm, read_backbone_config, save_drm
from drm_core import published
from drm_core.keys import to_stability
from tiny import TINY_HEAD, TINY_SD35, conditioning, tiny_transformer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A models/drm-like folder holding a tiny DiNa-LRM download, and a single-file (Stability-named) base."""
    tmp = tmp_path_factory.mktemp("published")
    sd = tiny_transformer().state_dict()
    base = tmp / "checkpoints" / "tiny_sd35m.safetensors"
    base.parent.mkdir()
    save_file(to_stability(sd, read_backbone_config(sd, blocks=TINY_SD35["num_layers"])[2]), base)  # every block
    drm_root = tmp / "drm"
    write_tiny_dina(drm_root / "DiNa-LRM-tiny", base)
    return dict(tmp=tmp, base=base, root=drm_root, folder=drm_root / "DiNa-LRM-tiny", sd=sd)


# ------------------------------------------------------------------------------------------------ scoring

def test_sigma_table_is_dinas_scheduler_table_and_snaps_01_and_04():
    from diffusers import FlowMatchEulerDiscreteScheduler

    table = SigmaTable(steps=1000, shift=3.0)
    torch.testing.assert_close(table.sigmas(), FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas, rtol=0, atol=0)
    assert round(table.snap(0.1), 6) == 0.100746 and round(table.snap(0.4), 6) == 0.400293
    assert table.snap(1.0) == 1.0 and table.snap(0.0) == pytest.approx(0.002994, abs=1e-6)
    dina = published.DINA_SCORING
    assert round(dina.recommended_sigma, 6) == 0.100746
    assert ScoringConvention().recommended_sigma == 0.0  # trained DRMs: clean latents as they are
    assert ScoringConvention(0.0, table).recommended_sigma == 0.0  # 0 means clean, never snapped to 0.003
    assert ScoringConvention.from_dict(dina.to_dict()) == dina and ScoringConvention.from_dict(None).sigma == 0.0
    for bad, match in (({"sigma": 1.5}, "sigma must lie in"), ({"sigma": "x"}, "numeric 'sigma'"),
                       ({"sigma": 0.1, "sigma_table": {"kind": "karras"}}, "'flow-shift'"),
                       ({"sigma": 0.1, "sigma_table": {"steps": 10, "bogus": 1}}, "unknown fields")):
        with pytest.raises(DRMError, match=match):
            ScoringConvention.from_dict(bad)


def test_scoring_key_is_written_read_and_validated(world, tmp_path):
    drm = drm_from_base(world["sd"], blocks=1, **TINY_HEAD)
    path = save_drm(drm, tmp_path / "trained.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        header, tensors = json.loads(meta["drm"]), {k: f.get_tensor(k) for k in f.keys()}
    assert header["scoring"] == {"sigma": 0.0}
    drm.scoring = published.DINA_SCORING
    assert load_drm(save_drm(drm, tmp_path / "d.safetensors")).scoring == published.DINA_SCORING
    del header["scoring"]  # a file from before the key existed
    save_file(tensors, tmp_path / "old.safetensors", {"drm": json.dumps(header)})
    assert load_drm(tmp_path / "old.safetensors").scoring == ScoringConvention()
    header["scoring"] = {"sigma": 2}
    save_file(tensors, tmp_path / "bad.safetensors", {"drm": json.dumps(header)})
    with pytest.raises(DRMError, match=r"bad.safetensors: DRM metadata: scoring.sigma must lie in \[0, 1\]"):
        load_drm(tmp_path / "bad.safetensors")


# ------------------------------------------------------------------------------------ recognise / complete

def test_recognise_by_file_names(world, tmp_path):
    assert published.recognise(world["folder"]) == "dina-lrm"
    assert published.recognise(world["root"]) is None and published.recognise(tmp_path / "nothing") is None
    download = published.check_complete(world["folder"])
    assert download.root == world["folder"] and download.settings["num_transformer_layers"] == 3
    assert [p.name for p in download.sources()] == ["rm_head.pt", "config.json", "adapter_config.json",
                                                    "adapter_model.safetensors"]
    assert published.check_complete(world["folder"] / "checkpoint").root == world["folder"]  # import-rm accepts it


def copy_download(world, dest, skip=()):
    for file in published.check_complete(world["folder"]).sources():
        rel = file.relative_to(world["folder"])
        if rel.as_posix() not in skip:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(file.read_bytes())
    return dest


def test_incomplete_and_unknown_downloads_are_named(world, tmp_path):
    partial = copy_download(world, tmp_path / "partial", skip=("checkpoint/rm_head.pt",))
    with pytest.raises(DRMError, match=r"partial: the DiNa-LRM download is incomplete: missing checkpoint/rm_head.pt\."
                                       r" Download it again: hf download liuhuohuo/DiNa-LRM-SD35M-12layers"):
        published.check_complete(partial)
    other = copy_download(world, tmp_path / "other")
    (other / "checkpoint" / "full_model.pt").write_bytes(b"never read")
    (other / "checkpoint" / "README.md").write_text("not weights: ignored")
    (other / ".cache" / "huggingface").mkdir(parents=True)
    (other / ".cache" / "huggingface" / "x.safetensors").write_text("hf download's bookkeeping: ignored")
    with pytest.raises(DRMError, match=r"other: checkpoint/full_model.pt is not part of the DiNa-LRM layout.*another "
                                       r"model or variant"):
        published.check_complete(other)
    foreign = tmp_path / "foreign"
    (foreign / "checkpoint").mkdir(parents=True)
    (foreign / "checkpoint" / "model.safetensors").write_bytes(b"")
    with pytest.raises(DRMError, match=r"checkpoint/model.safetensors is not part of the DiNa-LRM layout.*\(also "
                                       r"missing: checkpoint/rm_head.pt"):
        published.check_complete(foreign)
    with pytest.raises(DRMError, match="no checkpoint/ folder in it: not a DiNa-LRM download"):
        published.check_complete(tmp_path)


# ------------------------------------------------------------------------------------------------ listing

def test_listing_offers_only_what_loads(world, tmp_path):
    root = tmp_path / "drm"
    (root / "sub").mkdir(parents=True)
    os.symlink(world["folder"], root / "DiNa-LRM-tiny")
    save_drm(drm_from_base(world["sd"], blocks=1, **TINY_HEAD), root / "mine.safetensors")
    (root / "sub" / "nested.safetensors").write_bytes(b"")
    (root / "loose.pt").write_bytes(b"")
    (root / "notes.txt").write_text("")
    (root / ".mine.safetensors.abc.tmp").write_bytes(b"")  # an atomic save in progress
    (root / ".hidden.safetensors").write_bytes(b"")
    (world["folder"] / "converted").mkdir(exist_ok=True)
    (world["folder"] / "converted" / "x.drm.safetensors").write_bytes(b"")
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "mine.safetensors").write_bytes(b"")  # same name in a later root: the first one wins
    (extra / "far.safetensors").write_bytes(b"")
    entries = published.list_entries([root, extra, tmp_path / "missing"])
    nested = os.path.join("sub", "nested.safetensors")
    assert entries == ["DiNa-LRM-tiny", "far.safetensors", "mine.safetensors", nested]
    assert published.resolve_entry([root, extra], "DiNa-LRM-tiny") == (root / "DiNa-LRM-tiny", "dina-lrm")
    assert published.resolve_entry([root, extra], "far.safetensors") == (extra / "far.safetensors", None)
    assert published.resolve_entry([root, extra], "../extra/far.safetensors") is None  # no escaping the roots
    assert published.resolve_entry([root], "loose.pt") is None
    assert published.resolve_entry([root], "DiNa-LRM-tiny/checkpoint/rm_head.pt") is None


# ------------------------------------------------------------------------------------------- convert once

def test_converts_once_then_reads_the_cache_and_reconverts_on_change(world, tmp_path, monkeypatch):
    folder = copy_download(world, tmp_path / "DiNa-LRM-tiny")
    calls = []
    real = published.convert
    monkeypatch.setattr(published, "convert", lambda *a, **k: calls.append(a) or real(*a, **k))
    first, converted = published.load_published(folder, world["base"])
    target = folder / "converted" / "tiny_sd35m.drm.safetensors"
    assert converted and calls and target.is_file() and published.converted_path(folder, world["base"]) == target
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temporary left behind
    mtime = target.stat().st_mtime_ns
    second, converted = published.load_published(folder, world["base"])
    assert not converted and len(calls) == 1 and target.stat().st_mtime_ns == mtime
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx, pooled = conditioning(1, tokens=5)
    with torch.no_grad():
        torch.testing.assert_close(second.score(x, 0.3, ctx, pooled), first.score(x, 0.3, ctx, pooled), rtol=0, atol=0)
    meta = second.provenance["converted_from"]
    assert meta["base"] == {"name": "tiny_sd35m.safetensors", "size": world["base"].stat().st_size}
    lora = "checkpoint/backbone_lora/"
    assert set(meta["sources"]) == {"config.json", "checkpoint/rm_head.pt", lora + "adapter_config.json",
                                    lora + "adapter_model.safetensors"}
    assert second.scoring == published.DINA_SCORING
    head = folder / "checkpoint" / "rm_head.pt"
    os.utime(head, ns=(head.stat().st_atime_ns, head.stat().st_mtime_ns + 10**9))  # the download changed
    assert published.load_published(folder, world["base"])[1] and len(calls) == 2
    target.write_bytes(b"garbage")  # a corrupt cache is converted again, not read
    assert published.load_published(folder, world["base"])[1] and len(calls) == 3
    assert not published.load_published(folder, world["base"])[1] and len(calls) == 3
