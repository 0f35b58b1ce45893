"""docs/flower-apps.md shows the example app's code as it is, and its hand-written spec works."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

from fedmerge.models import model_spec
from fedmerge.spec_inference import infer_spec

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "flower-apps.md"
TASK = ROOT / "examples" / "quickstart-fedmerge" / "quickstart_fedmerge" / "task.py"
EXAMPLE_BLOCK = re.compile(r"<!-- example: (\S+) -->\n```python\n(.*?)```", re.S)


def _page() -> str:
    return PAGE.read_text()


def _net_class():
    spec = importlib.util.spec_from_file_location("_quickstart_task", TASK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Net


def test_the_page_shows_the_example_files_exactly():
    blocks = EXAMPLE_BLOCK.findall(_page())
    assert {path for path, _ in blocks} >= {
        "examples/quickstart-fedmerge/quickstart_fedmerge/server_app.py",
        "examples/quickstart-fedmerge/quickstart_fedmerge/client_app.py",
    }
    for path, code in blocks:
        assert code == (ROOT / path).read_text(), f"docs/flower-apps.md is out of date: {path}"


def test_the_training_line_shown_is_the_examples():
    line = re.search(r"```python\n(loss = .*?)\n```", _page()).group(1)
    assert line in TASK.read_text()


def test_the_hand_written_spec_is_the_inferred_one():
    code = re.search(r"<!-- hand-written-spec -->\n```python\n(.*?)```", _page(), re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "flower-apps.md", "exec"), namespace)  # the page's code, as a user runs it
    Net = _net_class()
    torch.manual_seed(0)
    net = Net()
    written = namespace["net_spec"](net)
    Net.permutation_spec = lambda self: namespace["net_spec"](self)
    try:
        assert model_spec(net) == written  # checked against the state dict
    finally:
        del Net.permutation_spec
    inferred = infer_spec(net, torch.zeros(2, 1, 28, 28))
    assert written.axes == inferred.axes
    assert {k: p.size for k, p in written.perms.items()} == {
        k: p.size for k, p in inferred.perms.items()
    }
