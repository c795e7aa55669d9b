"""The learned metrics (LPIPS, CLIP similarity, DreamSim): found on disk or refused in one line, computed as
defined, and scored by `clora eval --metrics`. No real weights exist here, so the tests write
random ones in the layouts users copy in (torchvision's AlexNet file, the lpips package's linear
weights, a transformers CLIP folder, a dreamsim cache_dir)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import plugin_manager, run
from safetensors.torch import save_file

from clora.errors import CloraError
from clora.paths import clora_home
from clora.plugins import Components

CHANNELS = (64, 192, 384, 256, 256)
TAPS = (1, 4, 7, 9, 11)


def _metric(metric_id: str):  # type: ignore[no-untyped-def]
    return Components.collect(plugin_manager()).get_metric(metric_id)


def _alexnet_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under torchvision's AlexNet keys (with a classifier, which LPIPS ignores)."""
    g = torch.Generator().manual_seed(seed)
    convs = {0: (64, 3, 11), 3: (192, 64, 5), 6: (384, 192, 3), 8: (256, 384, 3), 10: (256, 256, 3)}
    state = {}
    for i, (out, inp, k) in convs.items():
        state[f"features.{i}.weight"] = torch.randn(out, inp, k, k, generator=g) / (inp * k * k) ** 0.5
        state[f"features.{i}.bias"] = 0.1 * torch.randn(out, generator=g)
    state["classifier.1.weight"] = torch.randn(8, 9216, generator=g)
    return state


def _linear_state(seed: int = 1) -> dict[str, torch.Tensor]:
    """Non-negative per-channel weights under the lpips package's keys."""
    g = torch.Generator().manual_seed(seed)
    return {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(CHANNELS)}


def _lpips_by_hand(a, b, alex, lin):  # type: ignore[no-untyped-def]
    """LPIPS v0.1 written out with functional ops on 64x64 images: scale, AlexNet to each ReLU,
    unit-normalise the channels, weigh the squared differences, average over positions, sum."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(x: torch.Tensor) -> list[torch.Tensor]:
        x = ((x * 2 - 1) - shift) / scale
        out = []
        x = F.relu(F.conv2d(x, alex["features.0.weight"], alex["features.0.bias"], stride=4, padding=2))
        out.append(x)
        x = F.max_pool2d(x, 3, 2)
        x = F.relu(F.conv2d(x, alex["features.3.weight"], alex["features.3.bias"], padding=2))
        out.append(x)
        x = F.max_pool2d(x, 3, 2)
        for i in (6, 8, 10):
            x = F.relu(F.conv2d(x, alex[f"features.{i}.weight"], alex[f"features.{i}.bias"], padding=1))
            out.append(x)
        return out

    total = torch.zeros(len(a))
    for i, (fa, fb) in enumerate(zip(taps(a), taps(b), strict=True)):
        fa = fa / (fa.norm(dim=1, keepdim=True) + 1e-10)
        fb = fb / (fb.norm(dim=1, keepdim=True) + 1e-10)
        w = lin[f"lin{i}.model.1.weight"].view(1, -1, 1, 1)
        total += ((fa - fb) ** 2 * w).sum(1).mean((1, 2))
    return total


@pytest.fixture
def weights_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A CLORA_HOME and torch hub folder of this test's own, with no metric weights in them yet."""
    home = tmp_path / "home"
    monkeypatch.setenv("CLORA_HOME", str(home))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("CLORA_CLIP_MODEL", raising=False)
    return home


def _tiny_clip(folder: Path) -> None:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    cfg = CLIPConfig(
        text_config={**small, "vocab_size": 64, "max_position_embeddings": 16, "eos_token_id": 1},
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(folder)


def test_lpips_is_found_or_refused_and_matches_its_definition(weights_home: Path) -> None:
    lpips = _metric("lpips")
    problem = lpips.unavailable()
    assert problem and "alexnet.pth" in problem and "alex.pth" in problem and "\n" not in problem
    a = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with pytest.raises(CloraError, match="metric 'lpips' is not available"):
        lpips(a, a)
    # the AlexNet file where torch.hub caches torchvision's weights; the linear weights as safetensors
    alex, lin = _alexnet_state(), _linear_state()
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(alex, hub / "alexnet-owt-7be5be79.pth")
    (weights_home / "metrics" / "lpips").mkdir(parents=True)
    save_file(lin, str(weights_home / "metrics" / "lpips" / "alex.safetensors"))
    lpips = _metric("lpips")
    assert lpips.unavailable() is None and lpips.higher_is_better is False

    b = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    a64, b64 = (torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(s)) for s in (3, 4))
    assert torch.allclose(lpips(a64, b64), _lpips_by_hand(a64, b64, alex, lin), rtol=1e-4, atol=1e-6)
    # smaller images are upsampled to 64 pixels a side first (the tiny toy world's are 16)
    up = [F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False) for x in (a, b)]
    assert torch.allclose(lpips(a, b), _lpips_by_hand(*up, alex, lin), rtol=1e-4, atol=1e-6)
    assert lpips(a[:, :, :16, :16], b[:, :, :16, :16]).shape == (3,)
    near = (a + 0.02 * torch.randn(a.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    assert torch.equal(lpips(a, a), torch.zeros(3))
    assert torch.allclose(lpips(a, b), lpips(b, a), rtol=1e-4, atol=1e-6)
    assert bool((lpips(a, near) < lpips(a, b)).all())
    # weights of the wrong network are a one-line error, not a traceback
    bad = dict(alex, **{"features.0.weight": torch.zeros(64, 3, 5, 5)})
    torch.save(bad, weights_home / "metrics" / "lpips" / "alexnet.pth")
    with pytest.raises(CloraError, match="LPIPS weights do not fit AlexNet"):
        _metric("lpips")(a, b)
    # so is a file that is not a weights file at all
    (weights_home / "metrics" / "lpips" / "alexnet.pth").write_bytes(b"not a torch file")
    with pytest.raises(CloraError, match=r"cannot read .*alexnet\.pth"):
        _metric("lpips")(a, b)


def test_clip_similarity_is_found_or_refused_and_is_the_cosine_of_image_embeddings(
    weights_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import CLIPModel

    clip = _metric("clip")
    problem = clip.unavailable()
    assert problem and str(weights_home / "metrics" / "clip") in problem
    folder = tmp_path / "my-clip"
    _tiny_clip(folder)
    monkeypatch.setenv("CLORA_CLIP_MODEL", str(folder))
    clip = _metric("clip")
    assert clip.unavailable() is None and clip.higher_is_better is True
    a = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    b = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(clip(a, a), torch.ones(4), atol=1e-5)
    # the vision tower and projection of the whole CLIPModel, not a re-initialised one
    full = CLIPModel.from_pretrained(folder).eval()
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        emb = [full.get_image_features(pixel_values=(x - mean) / std) for x in (a, b)]
    emb = [F.normalize(getattr(e, "pooler_output", e), dim=-1) for e in emb]
    assert torch.allclose(clip(a, b), (emb[0] * emb[1]).sum(-1), atol=1e-5)


def _random_dreamsim(folder: Path, kind: str, width: int = 64, seed: int = 0) -> None:
    """A tiny random dreamsim cache_dir in dreamsim's file and key layout: each branch's ViT (DINO's
    from torch hub's checkpoints/, CLIP's as {"state_dict": ..., "proj": ...}) and the LoRA folder
    peft writes (dreamsim's adapter settings), 2 blocks of ``width`` (2 heads at width 64)."""
    from clora_metrics.dreamsim_net import DREAMSIM_BRANCHES, Branch, DreamSimNet, ViT
    from peft import LoraConfig, get_peft_model

    gen = torch.Generator().manual_seed(seed)
    branches = []
    for name in DREAMSIM_BRANCHES[kind]:
        clip, patch = not name.startswith("dino"), int(name[-2:])
        vit = ViT(width, 2, 2, patch, 4 * width, clip=clip, quick=name.startswith("clip"))
        with torch.no_grad():
            for key, p in vit.named_parameters():  # LayerNorm scales near 1, unit-gain matrices, small rest
                n = torch.randn(p.shape, generator=gen)
                if key.endswith("weight"):
                    p.copy_(1 + 0.1 * n if p.dim() == 1 else n / p[0].numel() ** 0.5)
                else:
                    p.copy_(0.02 * n)
        proj = torch.randn(width, width, generator=gen) / width**0.5 if clip else None
        if clip:
            path = folder / f"{name}_pretrain.pth.tar"
            state: dict[str, object] = {"state_dict": {**vit.state_dict(), "proj": proj}}
        else:
            path, state = folder / "checkpoints" / "dino_vitbase16_pretrain.pth", dict(vit.state_dict())
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
        branches.append(Branch(vit, (0.5,) * 3, (0.5,) * 3, proj))
    settings = LoraConfig(r=16, lora_alpha=0.5, lora_dropout=0.3, bias="none", target_modules=["qkv"])
    model = get_peft_model(DreamSimNet(branches), settings)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lora_" in key:
                std = 0.1 if "lora_B" in key else p.shape[1] ** -0.5
                p.copy_(std * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(folder / ("ensemble_lora" if kind == "ensemble" else f"{kind}_single_lora")))


def test_dreamsim_is_found_or_refused_and_reads_a_dreamsim_cache_dir(
    weights_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CLORA_DREAMSIM_DIR", raising=False)
    monkeypatch.setenv("CLORA_DREAMSIM_TYPE", "open_clip_vitb32")
    folder = weights_home / "metrics" / "dreamsim"
    problem = _metric("dreamsim").unavailable()
    assert problem and str(folder) in problem and "open_clip_vitb32_pretrain.pth.tar" in problem
    _random_dreamsim(folder, "open_clip_vitb32")
    dreamsim = _metric("dreamsim")
    assert dreamsim.unavailable() is None and dreamsim.higher_is_better is False
    a = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    b = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    near = (a + 0.02 * torch.randn(a.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    d = dreamsim(a, b)
    assert d.shape == (3,) and bool(((d > 0) & (d <= 2)).all())
    assert dreamsim(a, a).abs().max() < 1e-5
    assert torch.allclose(d, dreamsim(b, a), atol=1e-5)
    assert bool((dreamsim(a, near) < d).all())
    # the adapter is part of the metric: one that does not fit the model is refused in one line
    adapter = folder / "open_clip_vitb32_single_lora" / "adapter_model.safetensors"
    from safetensors.torch import load_file

    weights = load_file(str(adapter))
    save_file({k.replace("blocks.0", "blocks.7"): v for k, v in weights.items()}, str(adapter))
    with pytest.raises(CloraError, match="LoRA keys do not match"):
        _metric("dreamsim")(a, b)
    monkeypatch.setenv("CLORA_DREAMSIM_TYPE", "dino_vitb8")
    assert "is not one of ensemble" in (_metric("dreamsim").unavailable() or "")


def test_eval_scores_with_learned_metrics_or_refuses_before_sampling(
    tiny_collection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    pm = tiny_collection
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    lpips_dir = clora_home() / "metrics" / "lpips"
    args = ("eval", "--json", "--n-images", "2", "--merge", "none", "--no-progress")
    r = run(pm, *args, "--metrics", "lpips,clip")
    assert r.exit_code == 1 and "metric 'lpips' is not available" in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert json.loads(run(pm, "collections", "--json").stdout)[0]["metrics"].get("eval") is None
    r = run(pm, *args, "--metrics", "dreamy")
    assert r.exit_code == 1 and "no metric 'dreamy' is installed" in r.output

    lpips_dir.mkdir(parents=True)
    try:
        torch.save(_alexnet_state(), lpips_dir / "alexnet.pth")
        torch.save(_linear_state(), lpips_dir / "alex.pth")
        _tiny_clip(tmp_path / "clip")
        monkeypatch.setenv("CLORA_CLIP_MODEL", str(tmp_path / "clip"))
        _random_dreamsim(tmp_path / "dreamsim", "ensemble")
        monkeypatch.setenv("CLORA_DREAMSIM_DIR", str(tmp_path / "dreamsim"))
        monkeypatch.delenv("CLORA_DREAMSIM_TYPE", raising=False)
        r = run(pm, *args, "--metrics", "lpips,clip", "--metrics", "dreamsim", "--report", tmp_path / "rep")
    finally:
        for f in lpips_dir.iterdir():
            f.unlink()
        lpips_dir.rmdir()
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    for key in ("student_vs_truth", "teacher_vs_truth", "student_vs_teacher"):
        # psnr always, ssim not asked for
        assert list(data["overall"][key]) == ["psnr", "lpips", "clip", "dreamsim"]
        for row in data["effects"].values():
            assert row[key]["lpips"] >= 0 and -1 <= row[key]["clip"] <= 1 and 0 < row[key]["psnr"] < 100
            assert 0 <= row[key]["dreamsim"] <= 2
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "student vs truth: lpips" in page and "student vs teacher: clip" in page
