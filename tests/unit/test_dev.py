"""``nerv dev``'s pure parts: finding the app's module and files, noticing their changes, ``--ui``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nerv_cluster import cli
from nerv_cluster.dev import Watcher, locate
from nerv_cluster.errors import ConfigurationError


def _bump(path: Path, text: str) -> None:
    """Write ``text`` and move the modification time on (a coarse clock may not have ticked)."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(before + 10**9, before + 10**9))


def test_locate_a_module_name_a_file_and_a_package_module(tmp_path: Path):
    (tmp_path / "flows.py").write_text("X = 1\n")
    pkg = tmp_path / "mypkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "tasks.py").write_text("")

    by_name = locate("flows", tmp_path)
    assert (by_name.module, by_name.root, by_name.files()) == ("flows", tmp_path, [tmp_path / "flows.py"])
    by_file = locate("flows.py", tmp_path)
    assert (by_file.module, by_file.root, by_file.package) == ("flows", tmp_path, False)
    sub = locate("mypkg.sub.tasks", tmp_path)
    assert (sub.module, sub.root, sub.path) == ("mypkg.sub.tasks", tmp_path, pkg / "sub" / "tasks.py")
    whole = locate("mypkg", tmp_path)
    assert whole.package and whole.root == tmp_path
    assert whole.files() == sorted(
        [pkg / "__init__.py", pkg / "sub" / "__init__.py", pkg / "sub" / "tasks.py"]
    )


@pytest.mark.parametrize("spec", ["nosuchmodule_xyz", "flows.nothing", "no-such.py", "bad name"])
def test_locate_refuses_what_cannot_be_imported(tmp_path: Path, spec: str):
    (tmp_path / "flows.py").write_text("")
    with pytest.raises(ConfigurationError):
        locate(spec, tmp_path)


def test_the_watcher_reports_changed_added_and_removed_files_once(tmp_path: Path):
    pkg = tmp_path / "app"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tasks.py").write_text("A = 1\n")
    w = Watcher(locate("app", tmp_path), settle=0.01)
    assert w.changed() == []
    _bump(pkg / "tasks.py", "A = 2\n")  # same size: the modification time tells
    assert w.changed() == [pkg / "tasks.py"]
    assert w.changed() == [], "a change is reported once"
    (pkg / "more.py").write_text("")
    assert w.changed() == [pkg / "more.py"]
    (pkg / "more.py").unlink()
    assert w.changed() == [pkg / "more.py"]
    (pkg / "notes.txt").write_text("not code")
    assert w.changed() == []


def test_dev_ui_without_the_console_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    assert cli.has_command("dev") and cli.has_command("submit") and not cli.has_command("no-such")
    monkeypatch.setattr(cli, "has_command", lambda name: False)
    result = CliRunner().invoke(cli.app, ["dev", "--app", str(tmp_path / "x.py"), "--ui"])
    assert result.exit_code == 2
    assert "the console is not installed" in result.output
