"""The commit recorded with every result: read from a clone and from a git worktree."""

from __future__ import annotations

import subprocess

from safetypatch.utils import environment


def _git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def test_git_hash_reads_clones_and_worktrees(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "--allow-empty", "-m", "one")
    _git(repo, "worktree", "add", "-q", str(tmp_path / "wt"), "-b", "side")
    _git(tmp_path / "wt", "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "--allow-empty", "-m", "two")
    _git(repo, "pack-refs", "--all")  # branch refs now live only in the common dir's packed-refs
    for checkout in (repo, tmp_path / "wt"):
        module = checkout / "src" / "safetypatch" / "utils" / "environment.py"
        module.parent.mkdir(parents=True)
        monkeypatch.setattr(environment, "__file__", str(module))
        assert environment.git_hash() == _git(checkout, "rev-parse", "HEAD")
    assert _git(repo, "rev-parse", "HEAD") != _git(tmp_path / "wt", "rev-parse", "HEAD")
