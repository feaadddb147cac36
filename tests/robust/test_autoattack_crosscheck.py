"""Outside cross-check: the reference AutoAttack (``pip install pyautoattack``), ``version='rand'``, against
`pni_fast.robust.autoattack_rand` (torchattacks' APGD-CE + APGD-DLR with EOT) on the same small PNI model and data.

Both get AutoAttack-rand's settings (100 steps, 20 EOT passes per gradient, 1 restart); each runs with several
seeds and its adversarial examples are scored the same way (accuracy averaged over many noisy passes). The two
must agree within their seed spread. Slow tier; skipped with the reason when pyautoattack or torchattacks is
absent (neither is a dependency of pni_fast).
"""

from __future__ import annotations

import importlib.util
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pni_fast
from pni_fast import rng
from pni_fast.robust import autoattack_rand

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("pyautoattack") is None,
        reason="the reference AutoAttack is not installed (pip install pyautoattack)",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("torchattacks") is None,
        reason="torchattacks not installed (pip install --no-deps torchattacks)",
    ),
]
EPS = 0.19
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def setup():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    protos = torch.rand(10, 1, 8, 8, generator=g)

    def make(n: int):
        y = torch.arange(n) % 10
        return (protos[y] + 0.15 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1), y

    xt, yt = make(320)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))
    model = pni_fast.convert(model, pni="layerwise", noise="weight", alpha_init=0.25)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = F.cross_entropy(model(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    yield model.eval(), *make(40)
    torch.set_num_threads(before)


def _score(model, x_adv, y, passes: int = 50) -> float:
    with torch.no_grad():
        return sum(float((model(x_adv).argmax(1) == y).float().mean()) for _ in range(passes)) / passes


def test_reference_autoattack_rand_agrees_with_ours(setup):
    from pyautoattack import AutoAttack

    model, x, y = setup
    clean = _score(model, x, y)
    assert clean > 0.8
    ref, ours = [], []
    for seed in SEEDS:
        aa = AutoAttack(model, eps=EPS, norm="Linf", version="rand", seed=seed, device="cpu")
        aa.verbose = False
        assert aa.attacks_to_run == ["apgd-ce", "apgd-dlr"] and aa.apgd.eot_iter == 20 and aa.apgd.n_iter == 100
        with rng.own_generator():  # the reference reseeds torch; keep PNI's noise fresh as our wrapper does
            x_ref, _ = aa.run_standard_evaluation(x, y, batch_size=len(y))
        ref.append(_score(model, x_ref, y))
        x_ours = autoattack_rand(model, x, y, eps=EPS, steps=100, eot_samples=20, seed=seed)
        assert (x_ours - x).abs().max() <= EPS + 1e-6
        ours.append(_score(model, x_ours, y))
    m_ref, m_ours = statistics.fmean(ref), statistics.fmean(ours)
    spread = max(statistics.pstdev(ref), statistics.pstdev(ours))
    msg = f"clean {clean:.3f}; reference {ref} (mean {m_ref:.3f}); ours {ours} (mean {m_ours:.3f})"
    print(msg)
    assert m_ref < clean - 0.2 and m_ours < clean - 0.2, "the attacks did not work: " + msg
    # within the seed spread, with a floor of 3 points for 40 images (one image is 2.5 points)
    assert abs(m_ref - m_ours) <= max(3 * spread, 0.03), msg
