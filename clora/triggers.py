"""Trigger words for asymmetric orthogonal prompting.

Each effect gets one trigger word that the student sees instead of the teacher's prompt. Triggers
are "orthogonal": no trigger equals, contains or is contained in another (so no two share a
sub-word token), and none overlaps a word of any registered prompt or caption. A trigger, once
allocated, never changes and is never reused, so prompts users wrote keep their meaning.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable

from clora.errors import TriggerError

TRIGGER_RE = re.compile(r"[a-z][a-z0-9]{3,23}")
_WORD_RE = re.compile(r"[a-z0-9]+")
#: words this short are ignored for containment (they are sub-words of almost everything)
MIN_WORD = 3
_CONSONANTS = "bdfgklmnprstvxz"
_VOWELS = "aeiou"


def words(text: str) -> set[str]:
    """Lower-case alphanumeric words of ``text``."""
    return set(_WORD_RE.findall(text.lower()))


def collision(trigger: str, triggers: Iterable[str], reserved_words: Iterable[str]) -> str | None:
    """Why ``trigger`` may not be used, or None if it is free."""
    for other in triggers:
        if trigger == other:
            return f"trigger '{trigger}' is already allocated"
        if trigger in other or other in trigger:
            return f"trigger '{trigger}' overlaps trigger '{other}'"
    for word in reserved_words:
        if word == trigger or (len(word) >= MIN_WORD and (word in trigger or trigger in word)):
            return f"trigger '{trigger}' overlaps the prompt/caption word '{word}'"
    return None


def validate_trigger(trigger: str, triggers: Iterable[str], reserved_words: Iterable[str]) -> None:
    """Raise :class:`TriggerError` unless ``trigger`` is well-formed and free."""
    if not TRIGGER_RE.fullmatch(trigger):
        raise TriggerError(
            f"invalid trigger '{trigger}': use one lower-case word of 4-24 letters/digits starting "
            "with a letter"
        )
    why = collision(trigger, triggers, reserved_words)
    if why:
        raise TriggerError(f"{why}; choose another with --trigger or omit it to allocate one")


def allocate_trigger(name: str, triggers: Iterable[str], reserved_words: Iterable[str]) -> str:
    """A free trigger for effect ``name``: a pronounceable nonsense word, seeded by the name."""
    taken = list(triggers)
    reserved = list(reserved_words)
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    rng = random.Random(seed)
    for attempt in range(10_000):
        syllables = 3 + attempt // 2000
        candidate = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))
        if collision(candidate, taken, reserved) is None:
            return candidate
    raise TriggerError("could not allocate a free trigger; pass one with --trigger")
