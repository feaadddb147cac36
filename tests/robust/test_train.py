"""PGD adversarial training: recipe defaults, optimizer groups, eval-mode attacks, logs, atomic checkpoints, resume."""

from __future__ import annotations

import csv
import json
import os
import shutil

import pytest
import torch
from torch import nn

from pni_fast.models import DigitsCNN
from pni_fast.robust.data import load_digits
from pni_fast.robust.train import (
    CHECKPOINT_NAME,
    TrainConfig,
    load_checkpoint,
    make_optimizer,
    make_scheduler,
    train,
)


@pytest.fixture(scope="module")
def digits():
    tr, te = load_digits()
    return tr.subset(192), te.subset(48)


def _cfg(**kw) -> TrainConfig:
    base = dict(
        epochs=2,
        batch_size=64,
        warmup_epochs=1,
        adv_eps=0.1,
        adv_alpha=0.025,
        adv_steps=2,
        eval_samples=48,
        eval_pgd_steps=2,
        lr=0.05,
    )
    base.update(kw)
    return TrainConfig(**base)


def _pni_model(seed: int = 0) -> nn.Module:
    from pni_fast.nn.convert import convert

    torch.manual_seed(seed)
    return convert(DigitsCNN(1, 10, 4), pni="layerwise", noise="weight")


def _strip_time(hist):
    return [{k: v for k, v in h.items() if k != "time_s"} for h in hist]


def test_defaults_are_the_paper_recipe():
    c = TrainConfig()
    assert (c.epochs, c.batch_size, c.lr, c.momentum, c.nesterov) == (160, 128, 0.1, 0.9, True)
    assert c.lr_milestones == (0.5, 0.75) and c.lr_gamma == 0.1
    assert (c.adv_steps, c.adv_eps, c.adv_alpha, c.adv_random_start) == (7, 8 / 255, 2 / 255, True)
    assert (c.clean_weight, c.adv_weight) == (0.5, 0.5)
    assert c.warmup_epochs == 5 and c.weight_decay == 3e-4
    sched = make_scheduler(make_optimizer(nn.Linear(2, 2), c), c)
    assert sorted(sched.milestones) == [80, 120]


def test_alphas_get_no_weight_decay():
    model = _pni_model()
    opt = make_optimizer(model, TrainConfig(weight_decay=5e-4))
    alpha_ids = {id(p) for n, p in model.named_parameters() if "alpha" in n}
    assert alpha_ids
    for g in opt.param_groups:
        ids = {id(p) for p in g["params"]}
        if ids & alpha_ids:
            assert ids <= alpha_ids and g["weight_decay"] == 0
        else:
            assert g["weight_decay"] == 5e-4
    assert opt.defaults["nesterov"] is True and opt.defaults["momentum"] == 0.9
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(model.parameters()))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(epochs=0), "epochs"),
        (dict(lr=0), "lr"),
        (dict(adv_eps=-1.0), "adv_eps"),
        (dict(lr_milestones=(0.5, 1.5)), "lr_milestones"),
        (dict(adv_targets="true"), "adv_targets"),
        (dict(clean_weight=0, adv_weight=0), "both 0"),
        (dict(batch_size=2.0), "batch_size"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_adversarial_batch_is_made_in_eval_mode(digits):
    """BatchNorm counts only train-mode forwards: 2 per batch (clean + adv), none from the 2 PGD steps."""
    tr, _ = digits
    torch.manual_seed(0)
    model = DigitsCNN(1, 10, 4)
    train(model, tr, None, _cfg(epochs=1, warmup_epochs=0), progress=False)
    bn = model.features[1]
    n_batches = -(-len(tr) // 64)
    assert int(bn.num_batches_tracked) == 2 * n_batches
    torch.manual_seed(0)
    model = DigitsCNN(1, 10, 4)
    train(model, tr, None, _cfg(epochs=1, warmup_epochs=1), progress=False)  # clean warm-up epoch only
    assert int(model.features[1].num_batches_tracked) == n_batches


def test_training_learns_and_logs(digits, tmp_path):
    tr, te = digits
    model = _pni_model()
    hist = train(
        model,
        tr,
        te,
        _cfg(epochs=3),
        out_dir=tmp_path,
        progress=False,
        model_spec={"arch": "digits_cnn", "width": 4, "pni": "layerwise"},
    )
    assert [h["adversarial"] for h in hist] == [False, True, True]
    assert hist[0]["train_adv_acc"] is None and hist[1]["train_adv_acc"] is not None
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert all(0 <= h["test_clean_acc"] <= 1 and 0 <= h["test_adv_acc"] <= 1 for h in hist)
    assert len(hist[0]["alpha"]) == 4  # three convs + classifier
    # the logs on disk match the returned history
    on_disk = json.loads((tmp_path / "history.json").read_text())
    assert _strip_time(on_disk) == _strip_time(hist)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert any(k.startswith("alpha[") for k in rows[0])
    # checkpoint: complete, atomic (no temp files left), loadable with weights_only
    files = sorted(os.listdir(tmp_path))
    assert files == sorted(["checkpoint.pt", "history.json", "metrics.csv"]), files
    ck = load_checkpoint(tmp_path)
    assert ck["epoch"] == 3 and set(ck) >= {"model", "optimizer", "scheduler", "rng", "config", "history", "model_spec"}
    assert ck["config"]["adv_steps"] == 2 and ck["model_spec"]["pni"] == "layerwise"


def test_resume_reproduces_the_next_epoch(digits, tmp_path):
    """A run interrupted after epoch 1 and resumed gives bit-identical epoch-2 metrics and weights."""
    tr, te = digits
    cfg = _cfg(epochs=2)
    snap = tmp_path / "after_epoch1.pt"
    full_dir = tmp_path / "full"

    def keep_first(rec):
        if rec["epoch"] == 1:
            shutil.copy(full_dir / CHECKPOINT_NAME, snap)

    full = train(_pni_model(0), tr, te, cfg, out_dir=full_dir, progress=False, on_epoch=keep_first)
    # a different init and a disturbed global RNG: resume must restore everything from the checkpoint
    torch.manual_seed(12345)
    resumed_model = _pni_model(99)
    resumed = train(resumed_model, tr, te, cfg, out_dir=tmp_path / "resumed", resume=snap, progress=False)
    assert len(resumed) == 2
    assert _strip_time(resumed) == _strip_time(full)
    full_state = load_checkpoint(full_dir)["model"]
    for k, v in resumed_model.state_dict().items():
        assert torch.equal(v, full_state[k]), k


def test_resume_errors(digits, tmp_path):
    tr, _ = digits
    with pytest.raises(FileNotFoundError, match="not found"):
        train(DigitsCNN(1, 10, 4), tr, None, _cfg(), resume=tmp_path / "nope.pt", progress=False)
    bad = tmp_path / "bad.pt"
    torch.save({"weights": 1}, bad)
    with pytest.raises(ValueError, match="not a pni_fast training checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(TypeError, match="Split"):
        train(DigitsCNN(1, 10, 4), (tr.x, tr.y), None, _cfg(), progress=False)


def test_resume_with_more_epochs_stretches_the_schedule(digits, tmp_path):
    tr, _ = digits
    model = DigitsCNN(1, 10, 4)
    train(model, tr, None, _cfg(epochs=2, adversarial=False), out_dir=tmp_path, progress=False)
    hist = train(
        DigitsCNN(1, 10, 4),
        tr,
        None,
        _cfg(epochs=4, adversarial=False),
        out_dir=tmp_path,
        resume=tmp_path,
        progress=False,
    )
    # 2-epoch schedule decayed at epoch 1 (and 2); the 4-epoch one decays at epochs 2 and 3
    assert [h["lr"] for h in hist] == pytest.approx([0.05, 0.005, 0.005, 0.0005])


class _SplitAsIterable:
    """Re-iterable (x, y) batches that reproduce train()'s own Split batching, one epoch per iter()."""

    def __init__(self, split, cfg):
        self.split, self.cfg, self.epoch = split, cfg, 0

    def __iter__(self):
        from pni_fast.robust.data import iterate_batches

        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        return iterate_batches(self.split, self.cfg.batch_size, shuffle=True, generator=gen)


def test_iterable_batches_train_exactly_like_the_split(digits):
    """The iterable path runs the same steps: the same batches give bit-identical weights and records."""
    tr, te = digits
    cfg = _cfg(epochs=2)
    a = _pni_model()
    ha = train(a, tr, te, cfg, progress=False)
    b = _pni_model()
    hb = train(b, _SplitAsIterable(tr, cfg), te, cfg, progress=False)
    assert _strip_time(ha) == _strip_time(hb)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_dataloader_with_own_augmentation(digits):
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    tr, te = digits
    uint8 = (tr.x * 255).round().to(torch.uint8)  # uint8 batches are scaled to [0, 1]
    flips = []

    def collate(items):
        x = torch.stack([i[0] for i in items])
        y = torch.stack([i[1] for i in items])
        flips.append(1)
        return x.flip(3), y  # the user's augmentation

    ds = TensorDataset(uint8, tr.y)
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
    loader = DataLoader(ds, batch_size=64, sampler=sampler, collate_fn=collate)
    torch.manual_seed(0)
    model = DigitsCNN(1, 10, 4)
    hist = train(
        model,
        loader,
        DataLoader(TensorDataset(te.x, te.y), batch_size=7),
        _cfg(epochs=3, adversarial=False),
        progress=False,
    )
    assert len(hist) == 3 and hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert sampler.epoch == 2  # set_epoch(epoch) before every epoch
    assert len(flips) == 3 * 3
    # the test loader is evaluated on its first eval_samples images, like a Split (deterministic plain model)
    from pni_fast.robust.epoch import evaluate_epoch

    cfg = _cfg(adversarial=False, eval_samples=20)
    ref = evaluate_epoch(model, te, cfg, torch.device("cpu"))
    got = evaluate_epoch(model, DataLoader(TensorDataset(te.x, te.y), batch_size=7), cfg, torch.device("cpu"))
    assert got == ref and ref[0] * 20 % 1 == 0


def test_iterable_errors(digits):
    tr, _ = digits
    batches = [(tr.x[:32], tr.y[:32]), (tr.x[32:64], tr.y[32:64])]
    with pytest.raises(ValueError, match="augment"):
        train(DigitsCNN(1, 10, 4), batches, None, _cfg(augment=True), progress=False)
    with pytest.raises(ValueError, match="one-shot iterator"):
        train(DigitsCNN(1, 10, 4), iter(batches), None, _cfg(epochs=2), progress=False)
    hist = train(DigitsCNN(1, 10, 4), iter(batches), None, _cfg(epochs=1, adversarial=False), progress=False)
    assert len(hist) == 1  # a generator is fine for one epoch
    with pytest.raises(TypeError, match="pairs"):
        train(DigitsCNN(1, 10, 4), [(tr.x[:4], tr.y[:4], None)], None, _cfg(epochs=1), progress=False)
    with pytest.raises(TypeError, match="integer class labels"):
        train(DigitsCNN(1, 10, 4), [(tr.x[:4], tr.y[:4].float())], None, _cfg(epochs=1), progress=False)
    with pytest.raises(ValueError, match="y \\[N\\]"):
        train(DigitsCNN(1, 10, 4), [(tr.x[:4], tr.y[:3])], None, _cfg(epochs=1), progress=False)
    with pytest.raises(TypeError, match="DataLoader"):
        train(DigitsCNN(1, 10, 4), torch.utils.data.TensorDataset(tr.x, tr.y), None, _cfg(), progress=False)
    with pytest.raises(TypeError, match="test_data"):
        train(DigitsCNN(1, 10, 4), batches, 5, _cfg(), progress=False)
    with pytest.raises(ValueError, match="no batches"):
        train(DigitsCNN(1, 10, 4), [], None, _cfg(epochs=1), progress=False)


def test_rank_noise_streams_resume_exactly_and_are_recorded(digits, tmp_path):
    """With rank_noise (the streams of a data-parallel run, here in one process) PNI draws from its own
    generator, reseeded per epoch: resuming is bit-exact, the checkpoint records the streams, and resuming
    with other streams warns."""
    import pni_fast

    tr, te = digits
    cfg = _cfg(epochs=2)
    snap = tmp_path / "e1.pt"
    full_dir = tmp_path / "full"

    def keep_first(rec):
        if rec["epoch"] == 1:
            shutil.copy(full_dir / CHECKPOINT_NAME, snap)

    a = _pni_model(0)
    full = train(a, tr, te, cfg, out_dir=full_dir, progress=False, on_epoch=keep_first, rank_noise="same")
    seeds = []
    for _ in range(2):
        torch.manual_seed(7)
        seeds.append(pni_fast.draw_seed())
    assert seeds[0] == seeds[1]  # afterwards PNI draws from torch's generator again (its previous source)
    assert load_checkpoint(full_dir)["streams"] == {"rank_noise": "same", "world_size": 1}
    plain = train(_pni_model(0), tr, te, cfg, progress=False)
    assert _strip_time(plain) != _strip_time(full)  # a different noise stream than the default one
    torch.manual_seed(12345)
    b = _pni_model(99)
    resumed = train(b, tr, te, cfg, out_dir=tmp_path / "resumed", resume=snap, progress=False, rank_noise="same")
    assert _strip_time(resumed) == _strip_time(full)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    with pytest.warns(UserWarning, match="noise streams"):
        train(_pni_model(0), tr, te, cfg, out_dir=tmp_path / "other", resume=snap, progress=False)
