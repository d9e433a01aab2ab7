"""``patchslim.train_bundled``: the window-aware token dropping that trains ``fashion-swin`` for slimming."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patchslim import bundled
from patchslim.train_bundled import build_model, main, window_drop_forward


@pytest.fixture
def swin():
    torch.manual_seed(0)
    return build_model(0.0, 0.0, bundled.SWIN_NAME)  # no drop-path: train mode computes what eval mode does


def _canvases(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 1, bundled.CANVAS_SIZE, bundled.CANVAS_SIZE)


def test_a_keep_ratio_of_one_is_the_plain_forward(swin):
    x = _canvases()
    forward = window_drop_forward(swin, 1.0)
    assert swin.training  # wrapping for the engine leaves the module in train mode
    with torch.no_grad():
        assert torch.equal(forward(x, np.random.default_rng(0), seed=0), swin(x))


def test_dropping_tokens_changes_the_logits_and_trains_every_block(swin):
    x = _canvases()
    forward = window_drop_forward(swin, 0.3)
    rng = np.random.default_rng(0)
    logits = forward(x, rng, seed=1)
    with torch.no_grad():
        plain = swin(x)
    assert logits.shape == plain.shape and not torch.allclose(logits, plain)  # tokens sat blocks out
    logits.sum().backward()
    for stage in swin.layers:
        for block in stage.blocks:
            assert block.mlp.fc1.weight.grad is not None and block.mlp.fc1.weight.grad.abs().sum() > 0


def test_the_drawn_keep_ratio_stays_in_its_range_and_the_draws_repeat(swin, monkeypatch):
    import patchslim.plan as plan_module

    seen = []
    single = plan_module.SlimPlan.single

    def spy(method, keep_ratio=1.0, *args, **kwargs):
        seen.append((method, keep_ratio, kwargs.get("stages"), kwargs.get("seed")))
        return single(method, keep_ratio, *args, **kwargs)

    monkeypatch.setattr(plan_module.SlimPlan, "single", staticmethod(spy))
    forward = window_drop_forward(swin, 0.4)
    x = _canvases(2)
    with torch.no_grad():
        first = [forward(x, np.random.default_rng(7), seed=s) for s in range(3)]
        again = forward(x, np.random.default_rng(7), seed=0)
    assert all(m == "random" and 0.4 <= k <= 1.0 and st == bundled.SWIN_DEFAULT_STAGES for m, k, st, _ in seen)
    assert seen[0][1] == seen[3][1] and torch.equal(first[0], again)  # same rng and seed: same plan, same logits


@pytest.mark.parametrize("argv, message", [
    (["--window-keep-min", "0"], "--window-keep-min must be in (0, 1]"),
    (["--window-keep-min", "1.5", "--model", bundled.SWIN_NAME], "--window-keep-min must be in (0, 1]"),
    (["--window-keep-min", "0.5"], "applies to fashion-swin"),
])
def test_bad_window_keep_min_is_refused_before_any_work(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(argv + ["--out", str(tmp_path), "--work", str(tmp_path)])
    assert message in capsys.readouterr().err
