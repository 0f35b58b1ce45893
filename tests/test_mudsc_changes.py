"""``python -m fedmerge.bench.mudsc_changes``: MuDSC's matching as run before and as its code
runs it, on the same trained pairs in one run."""

from __future__ import annotations

import torch
from test_old_cost import BN_MODEL, run_small_bn_experiment

from fedmerge.bench import mudsc_changes
from fedmerge.experiments import one_shot
from fedmerge.experiments.one_shot import MergeSite
from fedmerge.merging import BETA_GRID


def _site(tmp_path) -> MergeSite:
    import importlib.util

    path = tmp_path / "bn_model.py"
    path.write_text(BN_MODEL)
    spec = importlib.util.spec_from_file_location("bn_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    a, b = module.SmallBN(), module.SmallBN()
    g = torch.Generator().manual_seed(0)
    for m in (a, b):  # statistics of their own (different) data
        m.train()
        with torch.no_grad():
            m(torch.randn(64, 1, 8, 8, generator=g) * (2.0 if m is b else 0.5) + 1.0)
    x, y = torch.randn(40, 1, 8, 8, generator=g), torch.arange(40) % 10
    return MergeSite(a, a.state_dict(), b.state_dict(), x, y, seed=0)


def test_the_earlier_rows_read_own_statistics_and_the_default_rows_recompute_them(tmp_path):
    site = _site(tmp_path)
    rows = mudsc_changes.earlier_rows([0.5])
    assert sorted(rows) == sorted(
        [
            "activation matching (own BN stats)",
            "dual (MuDSC) beta=0.5 (own BN stats)",
            "dual (MuDSC) beta=auto (5 betas, loss, own BN stats)",
            "dual (MuDSC) beta=auto (9 betas, loss)",
        ]
    )
    now = one_shot.merge_methods([0.5])["activation matching"](site)
    before = rows["activation matching (own BN stats)"](site)
    assert any(not torch.equal(now[k], before[k]) for k in now)  # the statistics matter
    # The default row is the recomputing one (deterministic: the same merge again).
    again = one_shot._aligned_average(site, "activation", reset_batchnorm=True)
    assert all(torch.equal(now[k], again[k]) for k in now)
    assert mudsc_changes.EARLIER_GRID != BETA_GRID


def test_the_run_adds_the_rows_to_the_table_and_leaves_no_extra_method(tmp_path):
    summary = run_small_bn_experiment(mudsc_changes.main, tmp_path)
    methods = [r["method"] for r in summary]
    assert "activation matching" in methods and "activation matching (own BN stats)" in methods
    assert "dual (MuDSC) beta=auto (5 betas, loss, own BN stats)" in methods
    assert all(0 <= r["accuracy-mean"] <= 1 for r in summary)
    assert one_shot.EXTRA_METHODS == {}
