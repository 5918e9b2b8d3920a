"""Hub ids through the libraries' own loading, offline: a real hub cache layout in a temporary HF_HOME.

Two commits of a tiny random ViT classifier are published as ``org/tiny`` (main -> the second). ``--model org/tiny``
and ``--revision <first>`` go through transformers' ``from_pretrained`` (the cache, ``HF_HUB_OFFLINE=1``) and give
the same summary as the saved folders; the manifest records the commit. A model not in the cache is one line.
timm names (``make test-timm``) load timm's pretrained weights from a prepared ``timm/<name>`` cache the same way.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pandas as pd
import pytest
import torch

transformers = pytest.importorskip("transformers")

from _hub import COMMIT, OTHER, offline_hub, publish  # noqa: E402

from siftlens.errors import ModelLoadError, ModelNotCachedError  # noqa: E402
from siftlens.models import load_backend  # noqa: E402
from siftlens.models.hf import HFBackend  # noqa: E402

DEMO = Path(str(files("siftlens") / "assets" / "demo_images"))
FAST = dict(n_boot=50, limit=4, overlays=0, explore=0)


def _tiny_vit(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=32, patch_size=8, num_labels=10)
    transformers.ViTForImageClassification(cfg).eval().save_pretrained(folder)
    proc = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    proc(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Folders A (commit COMMIT) and B (commit OTHER, main) and a hub cache holding both as org/tiny."""
    root = tmp_path_factory.mktemp("hub")
    a, b = _tiny_vit(root / "a", 0), _tiny_vit(root / "b", 1)
    publish(a, root / "hf", "org/tiny", COMMIT, ref=None)
    publish(b, root / "hf", "org/tiny", OTHER, ref="main")
    return root


def _cli(env, *args):
    return subprocess.run([sys.executable, "-m", "siftlens.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def test_hub_id_and_revision_load_through_from_pretrained(hub, monkeypatch):
    offline_hub(hub / "hf", monkeypatch)
    main = load_backend("org/tiny")
    pinned = load_backend("org/tiny", revision=COMMIT)
    assert isinstance(main, HFBackend) and main.hub == {"repo": "org/tiny", "revision": "main", "commit": OTHER}
    assert pinned.hub["commit"] == COMMIT and pinned.source == f"org/tiny@{COMMIT}"
    assert load_backend(f"org/tiny@{COMMIT}").hub["commit"] == COMMIT
    assert main.describe()["preprocessor"]["from"] == "preprocessor_config.json"
    json.dumps(main.describe())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for be, folder in ((main, hub / "b"), (pinned, hub / "a")):
            torch.testing.assert_close(be.forward(x), load_backend(str(folder)).forward(x), atol=0, rtol=0)
    with pytest.raises(ModelLoadError, match="names revision"):
        load_backend(f"org/tiny@{COMMIT}", revision=OTHER)
    with pytest.raises(ModelLoadError, match="local folder"):
        load_backend(str(hub / "a"), revision=COMMIT)


def test_a_model_missing_from_the_cache_is_one_line_naming_hf_home_and_offline(hub, monkeypatch):
    offline_hub(hub / "hf", monkeypatch)
    for spec, rev in (("org/absent", None), ("org/tiny", "v9")):
        with pytest.raises(ModelNotCachedError) as e:
            load_backend(spec, revision=rev)
        msg = str(e.value)
        assert "\n" not in msg and "not in the local cache" in msg
        assert f"HF_HOME={hub / 'hf'}" in msg and "HF_HUB_OFFLINE" in msg


def test_cli_hub_id_and_revision_give_the_folders_summary(hub, monkeypatch, tmp_path):
    from siftlens.analysis import analyze

    env = offline_hub(hub / "hf", monkeypatch)
    common = ["--images", str(DEMO), "--bootstrap", "50", "--limit", "4", "--overlays", "0", "--explore", "0",
              "--no-progress", "--no-report"]
    r = _cli(env, "analyze", "--model", "org/tiny", "--revision", COMMIT, "--out", str(tmp_path / "pinned"), *common)
    assert r.returncode == 0, r.stderr
    r2 = _cli(env, "analyze", "--model", "org/absent", "--out", str(tmp_path / "x"), *common)
    lines = [ln for ln in r2.stderr.splitlines() if ln.strip()]
    assert r2.returncode == 2 and len(lines) == 1 and "not in the local cache" in lines[0], r2.stderr
    assert "HF_HOME" in lines[0] and "HF_HUB_OFFLINE" in lines[0]

    manifest = json.loads((tmp_path / "pinned" / "manifest.json").read_text())
    text = json.dumps(manifest)
    assert COMMIT in text and '"repo": "org/tiny"' in text
    folder = analyze(str(hub / "a"), str(DEMO), out=tmp_path / "folder", progress=False, **FAST)
    got = pd.read_csv(tmp_path / "pinned" / "summary.csv")
    pd.testing.assert_frame_equal(got, pd.read_csv(tmp_path / "folder" / "summary.csv"))
    assert len(folder.summary) == len(got) > 0
    # main is the other commit: the API on the hub id equals its folder too
    main = analyze("org/tiny", str(DEMO), out=tmp_path / "main", progress=False, **FAST)
    b = analyze(str(hub / "b"), str(DEMO), out=tmp_path / "b", progress=False, **FAST)
    pd.testing.assert_frame_equal(main.summary, b.summary)
    assert not main.summary.equals(folder.summary)


# -- timm -------------------------------------------------------------------------------------------------
TIMM_NAME = "test_vit.r160_in1k"


@pytest.mark.timm
def test_timm_name_loads_pretrained_weights_from_the_hub_cache(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm", reason="timm not installed (needs torchvision); run `make test-timm`")
    from safetensors.torch import save_file

    env = offline_hub(tmp_path / "hf", monkeypatch)
    with pytest.raises(ModelNotCachedError) as e:
        load_backend(f"timm:{TIMM_NAME}")
    assert "\n" not in str(e.value) and "HF_HOME" in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)

    torch.manual_seed(0)
    ref = timm.create_model(TIMM_NAME, pretrained=False).eval()
    (tmp_path / "w").mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w" / "model.safetensors"))
    hub_id = timm.models.get_pretrained_cfg(TIMM_NAME).hf_hub_id
    publish(tmp_path / "w", tmp_path / "hf", hub_id, COMMIT)

    be = load_backend(f"timm:{TIMM_NAME}")
    assert be.hub == {"repo": hub_id, "revision": "main", "commit": COMMIT}
    assert load_backend(f"timm:{TIMM_NAME}", revision=COMMIT).source == f"timm:{TIMM_NAME}@{COMMIT}"
    x = torch.randn(2, 3, *be.input_size)
    with torch.no_grad():
        torch.testing.assert_close(be.forward(x), ref(x), atol=1e-5, rtol=0)
    # --weights keeps working: a local file, no hub
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "local.safetensors"))
    local = load_backend(f"timm:{TIMM_NAME}", weights=str(tmp_path / "local.safetensors"))
    assert local.hub is None
    r = _cli(env, "analyze", "--model", f"timm:{TIMM_NAME}", "--images", str(DEMO), "--out", str(tmp_path / "o"),
             "--limit", "2", "--bootstrap", "20", "--overlays", "0", "--explore", "0", "--no-progress", "--no-report")
    assert r.returncode == 0, r.stderr
    assert COMMIT in (tmp_path / "o" / "manifest.json").read_text()
