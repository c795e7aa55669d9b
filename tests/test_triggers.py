"""Trigger allocation: unique, orthogonal to each other and to prompt words, stable forever."""

from __future__ import annotations

import pytest
from helpers import add_bare_effect
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clora.errors import TriggerError
from clora.registry import Registry
from clora.triggers import TRIGGER_RE, allocate_trigger, collision, validate_trigger, words

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=20)
prompts = st.lists(
    st.sampled_from(
        [
            "apply",
            "a",
            "sepia",
            "tone",
            "turn",
            "into",
            "pixel",
            "art",
            "bake",
            "zoo",
            "vivid",
            "make",
            "it",
            "look",
            "like",
            "monet",
            "plush",
            "toy",
            "invert",
            "colours",
            "vex",
            "dora",
            "lime",
        ]
    ),
    min_size=1,
    max_size=6,
).map(" ".join)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(names, prompts), min_size=1, max_size=40, unique_by=lambda t: t[0]))
def test_allocated_triggers_are_orthogonal(entries: list[tuple[str, str]]) -> None:
    taken: list[str] = []
    reserved: set[str] = set()
    for _, prompt in entries:
        reserved |= words(prompt)
    for name, _ in entries:
        t = allocate_trigger(name, taken, reserved)
        assert TRIGGER_RE.match(t)
        for other in taken:
            assert t not in other and other not in t
        for w in reserved:
            assert w != t
            if len(w) >= 3:
                assert w not in t and t not in w
        taken.append(t)


def test_allocation_is_deterministic_per_name() -> None:
    assert allocate_trigger("sepia", [], set()) == allocate_trigger("sepia", [], set())
    assert allocate_trigger("sepia", [], set()) != allocate_trigger("invert", [], set())


@pytest.mark.parametrize("bad", ["", "ab", "Upper", "two words", "9lead", "x" * 25, "dash-ed"])
def test_malformed_trigger(bad: str) -> None:
    with pytest.raises(TriggerError, match="invalid trigger"):
        validate_trigger(bad, [], set())


def test_collisions() -> None:
    assert collision("zorb", ["zorblax"], []) is not None
    assert collision("zorblaxqq", ["zorblax"], []) is not None
    assert collision("sepiaz", [], ["sepia"]) is not None
    assert collision("kobata", [], ["a", "it"]) is None  # very short words are ignored


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(names, min_size=2, max_size=15, unique=True))
def test_registry_allocations_hold_across_many_adds(tmp_path_factory, effect_names: list[str]) -> None:  # type: ignore[no-untyped-def]
    db = tmp_path_factory.mktemp("reg") / "r.db"
    with Registry(db) as reg:
        for i, name in enumerate(effect_names):
            add_bare_effect(reg, name, f"apply effect number {i} with style")
        effects = reg.list_effects()
        triggers = [e.trigger for e in effects]
        assert len(set(triggers)) == len(triggers)
        before = {e.name: e.trigger for e in effects}
        reg.remove_effect(effect_names[0])
    with Registry(db) as reg:
        assert {e.name: e.trigger for e in reg.list_effects()} == {
            k: v for k, v in before.items() if k != effect_names[0]
        }


def test_prompt_separation_ranks_the_pairs_the_base_encodes_alike_first() -> None:
    """Two effects learned under the same prompt are the closest pair (cosine 1); a prompt that shares
    no word with the others is further from each of them."""
    from clora_toy.factory import get_factory
    from helpers import plugin_manager, run

    from clora.separation import prompt_separation

    assert run(plugin_manager(), "toy", "build-base", "--tiny").exit_code == 0
    backbone = get_factory(size="tiny").load("cpu")
    prompts = {
        "a": "zorvik apply film grain",
        "b": "zorvik apply film grain",
        "c": "zorvik apply film grain and confetti",
        "d": "mosaic of pixels, blocky",
    }
    sep = prompt_separation(backbone, prompts, top=6)
    assert sep["pairs"] == 6
    assert sep["closest"][0] == {"effects": ["a", "b"], "cosine": 1.0}
    far = {tuple(p["effects"]): p["cosine"] for p in sep["closest"]}
    assert far[("a", "c")] > far[("a", "d")] and far[("b", "c")] > far[("c", "d")]
    assert sep["max_cosine"] == 1.0 and sep["mean_cosine"] < 1.0
