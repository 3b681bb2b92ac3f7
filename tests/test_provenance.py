"""What a run records of the code that made it: the git commit and dirty flag of a checkout,
nothing (and no error) elsewhere."""

import subprocess

from altgrad.provenance import SOURCE, checkout


def _git(folder, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=folder,
                          check=True, capture_output=True, text=True).stdout.strip()


def test_a_checkout_gives_its_commit_and_whether_it_has_uncommitted_changes(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "__init__.py").write_text("")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "one")
    head = _git(repo, "rev-parse", "HEAD")
    assert checkout(repo / "pkg") == (head, False)
    (repo / "pkg" / "__init__.py").write_text("changed = True\n")
    assert checkout(repo / "pkg") == (head, True)
    installed = repo / ".venv" / "lib" / "site-packages" / "pkg"  # a copy installed inside a repository
    installed.mkdir(parents=True)
    assert checkout(installed) == (None, None)


def test_outside_a_checkout_or_without_git_the_commit_is_none(tmp_path, monkeypatch):
    assert checkout(tmp_path) == (None, None)
    monkeypatch.setenv("PATH", str(tmp_path))  # no git to run
    assert checkout(SOURCE) == (None, None)
