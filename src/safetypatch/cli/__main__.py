"""``python -m safetypatch.cli`` (e.g. ``accelerate launch -m safetypatch.cli train ...``)."""

from safetypatch.cli import main

main()
