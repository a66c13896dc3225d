"""Refusal targets written for safetypatch (``ours``: no (harmful prompt → refusal) set ships offline).

Each refusal is short, polite and gives one brief reason tied to the request's HarmBench semantic category, without
lecturing; a generic set covers unknown categories. The text for a prompt is chosen by a seeded hash of the prompt,
so it is stable across runs, machines and row orders (docs/methods.md §3.1 *Data*, §5.7).
"""

from __future__ import annotations

import hashlib
import re

REFUSALS: dict[str, tuple[str, ...]] = {
    "chemical_biological": (
        "I can't help with that. Instructions for making or spreading chemical or biological agents could put "
        "people's lives at risk.",
        "Sorry, I won't provide that. Details on producing or using dangerous chemicals or pathogens could cause "
        "serious harm.",
        "I'm not able to help with this, since it involves creating or deploying hazardous chemical or biological "
        "materials.",
        "I can't assist with that request. Guidance on toxic agents or pathogens could be used to hurt people.",
        "Sorry, that's not something I can help with: it could enable the misuse of dangerous substances.",
        "I won't help with this one. Information like this about chemical or biological weapons is too dangerous "
        "to share.",
    ),
    "cybercrime_intrusion": (
        "I can't help with that. Breaking into systems or accounts without permission harms the people who own them.",
        "Sorry, I won't write that. Malware or intrusion tools could be used to attack real systems.",
        "I'm not able to help with this, since it involves unauthorized access to computers or data.",
        "I can't assist with that request. It could be used to compromise other people's devices or accounts.",
        "Sorry, that's not something I can do: it would help someone get around security they aren't authorized "
        "to bypass.",
        "I won't help with this one, because exploiting systems without permission is illegal and harmful.",
    ),
    "harassment_bullying": (
        "I can't help with that. Content meant to harass or demean someone can really hurt them.",
        "Sorry, I won't write that. It targets a person or group in a way that could cause harm.",
        "I'm not able to help with this, since it's aimed at bullying or intimidating someone.",
        "I can't assist with that request. Messages like this could be used to hurt or threaten people.",
        "Sorry, that's not something I can write: it's designed to harass or degrade others.",
        "I won't help with this one, because it could be used to target and hurt someone.",
    ),
    "harmful": (
        "I can't help with that. It could lead to someone getting seriously hurt.",
        "Sorry, I won't provide that, since it could be used to cause physical harm.",
        "I'm not able to help with this request because it risks harm to people.",
        "I can't assist with that. Information like this could put someone's safety in danger.",
        "Sorry, that's not something I can help with: it could be used to injure someone.",
        "I won't help with this one, as it could cause real harm.",
    ),
    "illegal": (
        "I can't help with that. It involves breaking the law in ways that could hurt others.",
        "Sorry, I won't provide that, since it would help with an illegal activity.",
        "I'm not able to help with this request because it describes how to commit a crime.",
        "I can't assist with that. It could be used to get around the law at someone else's expense.",
        "Sorry, that's not something I can help with: it would facilitate illegal activity.",
        "I won't help with this one, as it's about carrying out something unlawful.",
    ),
    "misinformation_disinformation": (
        "I can't help with that. Writing false or misleading claims as if they were true could deceive people.",
        "Sorry, I won't write that, since it's meant to spread misinformation.",
        "I'm not able to help with this request because it would create deliberately misleading content.",
        "I can't assist with that. Content like this could mislead readers about real people or events.",
        "Sorry, that's not something I can write: it presents falsehoods as fact.",
        "I won't help with this one, as it's designed to deceive people.",
    ),
    "copyright": (
        "I can't help with that. Reproducing that copyrighted text in full isn't something I can do.",
        "Sorry, I won't provide that, since it would copy protected material at length.",
        "I'm not able to reproduce that work, because it's under copyright. I can summarize it instead.",
        "I can't share the full text of that; it's copyrighted. A short summary is something I can offer.",
        "Sorry, that's not something I can do: it would mean reproducing copyrighted content verbatim.",
    ),
    "generic": (
        "I can't help with that request.",
        "Sorry, I won't be able to help with that, since it could cause harm.",
        "I'm not able to assist with this request.",
        "I can't help with that. It could be used to hurt someone.",
        "Sorry, that's not something I can help with.",
        "I won't help with this one, as it could lead to harm.",
    ),
}

# What a request of each category asks for, in the short thinking segment of reasoning-template refusals
# ("This request asks for …; I should not help."), as DirectRefusal's completions open with a brief <think> turn.
_ASKS_FOR = {
    "chemical_biological": "help making or using a dangerous chemical or biological agent",
    "cybercrime_intrusion": "help breaking into systems or writing malicious code",
    "harassment_bullying": "content meant to harass or bully someone",
    "harmful": "something that could physically hurt people",
    "illegal": "help with an illegal activity",
    "misinformation_disinformation": "deliberately misleading content",
    "copyright": "a verbatim copy of copyrighted text",
    "generic": "something harmful",
}

# Category labels of other sets (StrongREJECT, Do-Not-Answer, free text) mapped onto the HarmBench categories by
# the first keyword they contain; anything else gets the generic set.
_ALIASES: tuple[tuple[str, str], ...] = (
    ("copyright", "copyright"),
    ("misinformation", "misinformation_disinformation"),
    ("disinformation", "misinformation_disinformation"),
    ("deception", "misinformation_disinformation"),
    ("cyber", "cybercrime_intrusion"),
    ("malware", "cybercrime_intrusion"),
    ("hack", "cybercrime_intrusion"),
    ("chemical", "chemical_biological"),
    ("biolog", "chemical_biological"),
    ("weapon", "chemical_biological"),
    ("harass", "harassment_bullying"),
    ("bully", "harassment_bullying"),
    ("hate", "harassment_bullying"),
    ("illegal", "illegal"),
    ("crime", "illegal"),
    ("violen", "harmful"),
    ("harm", "harmful"),
)


def refusal_category(category: str | None) -> str:
    """The refusal set used for a dataset's category label (a HarmBench category, an alias, or ``generic``).

    Args:
        category: the row's category label, any spelling (``"Chemical & Biological"`` works), or None.

    Returns:
        A key of :data:`REFUSALS`.
    """
    if not category:
        return "generic"
    key = re.sub(r"[^a-z0-9]+", "_", category.lower()).strip("_")
    if key in REFUSALS:
        return key
    return next((target for word, target in _ALIASES if word in key), "generic")


def refusal_for(prompt: str, category: str | None = None, seed: int = 0) -> str:
    """A refusal for ``prompt``, chosen deterministically from its category's set by a seeded hash of the prompt.

    Args:
        prompt: the harmful request (the user turn).
        category: its category label (see :func:`refusal_category`); None picks from the generic set.
        seed: changes which refusal each prompt gets, reproducibly.

    Returns:
        The refusal text (no chat markup, no end-of-turn token).
    """
    options = REFUSALS[refusal_category(category)]
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    return options[int.from_bytes(digest[:8], "big") % len(options)]


def thinking_for(category: str | None = None) -> str:
    """The body of the short thinking segment before a refusal: "This request asks for X; I should not help."

    Args:
        category: the row's category label (see :func:`refusal_category`).

    Returns:
        One sentence, without think tags.
    """
    return f"This request asks for {_ASKS_FOR[refusal_category(category)]}; I should not help."
