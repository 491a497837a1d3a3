"""Per-page set-up hooks for tests/test_docs.py.

A page whose examples would download something (a diffusers ``from_pretrained``, an EDM2 snapshot
URL) shows the code a user writes; its hook makes that code run offline on tiny random components
by monkeypatching the loader.  ``SETUP`` maps a page's path, relative to the repository root and
with forward slashes (``"README.md"``, ``"docs/diffusers.md"``), to a function that takes pytest's
``monkeypatch`` fixture and returns None.  The hook runs after the page's temporary working
directory is entered and its seeds are fixed, before its first block; every patch is undone when
the page ends.

A hook that lives in another module is imported here and named in the dict, e.g.::

    from _tiny_diffusers import offline_pipelines
    SETUP["docs/diffusers.md"] = offline_pipelines

``tests/test_docs.py`` fails when a key names no page.
"""

SETUP = {}

from _tiny_diffusers import docs_setup as _tiny_diffusers_offline  # noqa: E402

SETUP["docs/diffusers.md"] = _tiny_diffusers_offline
SETUP["README.md"] = _tiny_diffusers_offline  # use 3: a diffusers pipeline with a guide model
