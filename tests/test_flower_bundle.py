"""The flower engine hands ``flwr run`` the app's own files only (no environment inside it)."""

from __future__ import annotations

import io
import subprocess
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedmerge.config import RunConfig
from fedmerge.engine import flower
from fedmerge.engine.flower import bundle_files, stage_app

PYPROJECT = """\
[project]
name = "bundled"
version = "1.0.0"

[tool.flwr.app]
publisher = "tests"

[tool.flwr.app.components]
serverapp = "pkg.server:app"
clientapp = "pkg.client:app"
"""
DEEP = Path("lib/python3.11/site-packages/a/b/c/d/e/f/g/h/i/deep.py")  # 13 levels


def make_project(root: Path) -> Path:
    """An app folder with a virtualenv named ``venv`` and other things a bundle must not hold."""
    files = {
        "pyproject.toml": PYPROJECT,
        "README.md": "# app\n",
        ".gitignore": "*.log\n",
        "pkg/__init__.py": "",
        "pkg/server.py": "app = None\n",
        "pkg/client.py": "app = None\n",
        "pkg/conf/settings.yaml": "a: 1\n",
        "pkg/test_pkg.py": "",  # a test module: Flower leaves it out
        "venv/pyvenv.cfg": "home = /usr/bin\n",
        f"venv/{DEEP}": "",
        "my-env/pyvenv.cfg": "home = /usr/bin\n",  # an environment under any name
        "my-env/lib/x.py": "",
        "conda/conda-meta/history.json": "{}",
        "conda/lib/y.py": "",
        ".git/info.json": "{}",
        "pkg/__pycache__/server.py": "",
        "tests/conftest.py": "",
        "runs/r1/metrics.json": "[]",
        "bundled.egg-info/x.json": "{}",
        "data.bin": "",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


APP_FILES = {
    ".gitignore",
    "README.md",
    "pyproject.toml",
    "pkg/__init__.py",
    "pkg/client.py",
    "pkg/server.py",
    "pkg/conf/settings.yaml",
}


def test_bundle_files_leave_environments_and_outputs_out(tmp_path):
    app = make_project(tmp_path / "app")
    assert {p.as_posix() for p in bundle_files(app)} == APP_FILES


def test_flowers_own_bundler_accepts_the_staged_copy_not_the_folder(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    app = make_project(tmp_path / "app")
    with pytest.raises(ValueError, match="maximum directory depth"):  # the bug, with Flower's code
        build_fab_from_disk(app)
    staged = stage_app(app, tmp_path / "staged")
    fab = build_fab_from_disk(staged)
    assert len(fab) > 0
    names = set(zipfile.ZipFile(io.BytesIO(fab)).namelist())
    assert {"pkg/server.py", "pkg/client.py", "pyproject.toml"} <= names
    assert not any(n.startswith(("venv/", "my-env/", "tests/", "runs/")) for n in names)


def test_run_flower_gives_flwr_run_the_staged_copy(tmp_path, monkeypatch):
    app = make_project(tmp_path / "app")
    seen: dict[str, object] = {}

    class FakeRun:
        returncode = 0

        def __init__(self, cmd: list[str], cwd: Path, **kwargs: object) -> None:
            target = Path(cmd[2])
            seen.update(cmd=cmd, cwd=Path(cwd), files={
                p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()
            })  # fmt: skip
            self.stdout = io.StringIO("done\n")

        def wait(self) -> int:
            return 0

        def poll(self) -> int:
            return 0

    fake = SimpleNamespace(Popen=FakeRun, PIPE=subprocess.PIPE, STDOUT=subprocess.STDOUT)
    monkeypatch.setattr(flower, "subprocess", fake)  # this module's Popen only
    monkeypatch.setattr(flower, "stop_superlink", lambda home: [])
    lines = flower.run_flower(RunConfig(num_clients=2), app_dir=app)
    assert lines == ["done"]
    assert seen["files"] == APP_FILES
    assert Path(seen["cmd"][2]) != app and seen["cwd"] == Path(seen["cmd"][2])
    assert not Path(seen["cmd"][2]).exists()  # the scratch copy is gone after the run


def test_gitignore_lists_the_usual_environment_names():
    root = Path(__file__).resolve().parents[1]
    lines = set((root / ".gitignore").read_text().splitlines())
    assert {"venv/", "env/", ".venv*/", ".env/"} <= lines
    out = subprocess.run(
        ["git", "check-ignore", "-q", "venv/x", "env/x", ".venv-2/x"],
        cwd=root,
        check=False,
    )
    assert out.returncode in (0, 128)  # 128: not a git checkout (an sdist)


@pytest.mark.slow
def test_flower_engine_runs_a_project_with_a_venv_inside(tmp_path, monkeypatch):
    # The reported bug end to end: a virtualenv named `venv` in the checkout (Flower's bundler
    # used to stop at its deep site-packages paths). Tens of seconds: Flower's engine (Ray).
    import shutil
    import tempfile

    from fedmerge.engine.flower import _processes_mentioning

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the engine's scratch in tmp_path
    from fedmerge.results import read_metrics
    from fedmerge.runner import run

    root = Path(__file__).resolve().parents[1]
    app = tmp_path / "checkout"
    for name in ("fedmerge", "strategies", "clients"):
        shutil.copytree(root / name, app / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(root / "pyproject.toml", app / "pyproject.toml")
    (app / "venv" / DEEP).parent.mkdir(parents=True)
    (app / "venv" / DEEP).write_text("")
    (app / "venv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    cfg = RunConfig(
        num_rounds=1,
        num_clients=3,
        model="mlp",
        mlp_hidden="16",
        output_dir=str(tmp_path / "runs"),
        run_name="venv-inside",
        save_model=False,
    )
    run_dir = run(cfg, "flower", flower_options={"app_dir": app, "timeout": 600})
    assert [r["round"] for r in read_metrics(run_dir)] == [0, 1]
    assert not _processes_mentioning(str(tmp_path))  # this test's processes only
