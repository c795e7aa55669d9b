"""Adapter switching of the distiller (AdapterSet.use) on the tiny toy base, against diffusers' own."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from clora_toy.build import build_base, build_teacher
from clora_toy.factory import get_factory
from helpers import plugin_manager

from clora.backbone import Backbone, PromptEmbeds
from clora.distill.adapters import CRITIC, STUDENT, UNKNOWN, AdapterSet
from clora.plugins import Components

EFFECTS = ("sepia", "invert")
ROWS = 6


@dataclass
class Setup:
    """The tiny base with student and critic (both moved off zero), two teacher files, and a batch."""

    backbone: Backbone
    adapters: AdapterSet
    components: Components
    loras: list[str]
    noisy: torch.Tensor
    sigma: torch.Tensor
    source: torch.Tensor
    prompts: PromptEmbeds

    def velocity(self) -> torch.Tensor:
        """The velocity with whatever adapter is active."""
        with torch.no_grad():
            return self.backbone.predict_velocity(self.noisy, self.sigma, self.source, self.prompts)


@pytest.fixture
def setup() -> Iterator[Setup]:
    build_base(tiny=True, show_progress=False)
    loras = [str(build_teacher(name, tiny=True, show_progress=False).path) for name in EFFECTS]
    torch.manual_seed(0)
    bb = get_factory(tiny=True).load("cpu")
    comps = Components.collect(plugin_manager())
    # fewer modules than the teachers adapt: a teacher's load wraps more layers
    adapters = AdapterSet(bb, 4, 4.0, ["to_q", "to_v", "img_in", "proj_out"], 8, comps)
    with torch.no_grad():  # student and critic start as the base (B = 0): make them differ from it
        for name in (STUDENT, CRITIC):
            for p in adapters.params[name]:
                p.add_(torch.randn_like(p) * 0.05)
    g = torch.Generator().manual_seed(1)
    source = bb.encode_images(bb.sample_sources(ROWS, 3))
    texts = ["make it sepia", "invert the colours", "a third prompt"] * (ROWS // 3)
    yield Setup(
        bb,
        adapters,
        comps,
        loras,
        torch.randn(source.shape, generator=g),
        torch.linspace(0.2, 0.95, ROWS),
        source,
        bb.encode_prompts(texts),
    )


def _diffusers_switch(setup: Setup, adapter: str | None) -> torch.Tensor:
    """The velocity under ``adapter`` as diffusers' model-level calls switch to it (the old way)."""
    tr = setup.adapters.transformer
    if adapter is None:
        tr.disable_adapters()
    else:
        tr.enable_adapters()
        tr.set_adapter(adapter)
    setup.adapters.active = UNKNOWN  # the set no longer knows what is active
    return setup.velocity()


def test_use_runs_the_adapter_diffusers_would(setup: Setup) -> None:
    ad = setup.adapters
    ad.use(STUDENT)
    for path in setup.loras:
        ad.use_teacher(path)
        ad.use(STUDENT)
    t1, t2 = ad._teachers.values()
    expected = {name: _diffusers_switch(setup, name) for name in (STUDENT, CRITIC, t1, t2, None)}
    assert not torch.allclose(expected[STUDENT], expected[CRITIC])
    assert not torch.allclose(expected[t1], expected[t2])
    for name in (STUDENT, STUDENT, CRITIC, t1, None, None, t2, STUDENT, None, CRITIC, t2, t1, STUDENT):
        ad.use(name)
        torch.testing.assert_close(setup.velocity(), expected[name], rtol=0, atol=0)
        # the trained adapters stay trainable; a teacher is not, but while it runs (as peft sets it)
        assert all(p.requires_grad for a in (STUDENT, CRITIC) for p in ad.params[a])
        trainable = {n.split(".")[-2] for n, p in ad.transformer.named_parameters() if p.requires_grad}
        assert trainable - {STUDENT, CRITIC} == ({name} if name in (t1, t2) else set())
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        ad.use("nope")


def test_use_switches_after_a_teacher_is_loaded_or_evicted(setup: Setup) -> None:
    ad = setup.adapters
    ad.max_teachers = 1
    ad.use(STUDENT)
    student = setup.velocity()
    # loading a teacher (and evicting one) may leave peft with another adapter active
    for path in [*setup.loras, setup.loras[0]]:
        ad.use(STUDENT)
        ad.use_teacher(path)
        teacher = setup.velocity()
        ad.use(STUDENT)
        torch.testing.assert_close(setup.velocity(), student, rtol=0, atol=0)
        assert not torch.allclose(teacher, student)
    assert ad.teacher_loads == 3 and len(ad._teachers) == 1


def test_a_growing_student_is_its_fixed_parent_and_new_components(setup: Setup) -> None:
    """A student that grows runs as one rank-6 LoRA whose first 2 components are its parent's; only the
    4 new ones get gradients (and so optimizer state), and it reads and writes as that one LoRA."""
    modules = ["to_q", "to_v", "img_in", "proj_out"]

    def on_fresh_base(frozen_rank: int) -> Setup:
        ad = AdapterSet(
            get_factory(tiny=True).load("cpu"), 6, 6.0, modules, 8, setup.components, False, frozen_rank
        )
        return Setup(
            ad.backbone,
            ad,
            setup.components,
            setup.loras,
            setup.noisy,
            setup.sigma,
            setup.source,
            setup.prompts,
        )

    grown, plain = on_fresh_base(2), on_fresh_base(0)  # plain: the same LoRA as one adapter
    ad = grown.adapters
    assert {p.shape[0] for n, p in ad._named(STUDENT) if ".lora_A." in n} == {4}
    torch.manual_seed(3)
    parent = {
        k: torch.randn(v.shape[0], 2) if ".lora_B." in k else torch.randn(2, v.shape[1])
        for k, v in ad.state_dict(STUDENT).items()
    }
    ad.load_leading(STUDENT, parent, scale=2.0)  # the parent's alpha/rank is twice the student's
    with torch.no_grad():  # move the new components off their zero B
        for p in ad.params[STUDENT]:
            p.add_(torch.randn_like(p) * 0.05)
    merged = ad.state_dict(STUDENT)
    for k, v in parent.items():
        head = merged[k][:2] if ".lora_A." in k else merged[k][:, :2] / 2.0
        torch.testing.assert_close(head, v)
    plain.adapters.load_state_dict(STUDENT, merged)
    plain.adapters.use(STUDENT)
    ad.use_teacher(setup.loras[0])
    ad.use(STUDENT)
    torch.testing.assert_close(grown.velocity(), plain.velocity(), rtol=1e-4, atol=1e-4)  # summed apart
    out = grown.backbone.predict_velocity(grown.noisy, grown.sigma, grown.source, grown.prompts)
    out.square().mean().backward()
    fixed = [p for n, p in ad.transformer.named_parameters() if ".parent." in n]
    assert fixed and all(p.grad is None and not p.requires_grad for p in fixed)
    assert all(p.grad is not None for p in ad.params[STUDENT])
    ad.load_state_dict(STUDENT, merged)  # a checkpoint's round trip
    torch.testing.assert_close(ad.state_dict(STUDENT), merged)
