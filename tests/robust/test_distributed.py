"""Data-parallel training: 2 CPU processes (gloo), DDP, sharded data, rank-0 files, resume, rank noise, torchrun CLI.

All 2-process scenarios run in one spawn of two workers (starting a process and importing pni_fast costs
~8 s each on this machine); each worker returns its parameters, the parent compares them with one-process
runs of the same global batches.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pni_fast.robust.data import Split, iterate_batches, load_digits
from pni_fast.robust.distributed import derived_seed
from pni_fast.robust.train import CHECKPOINT_NAME, TrainConfig, load_checkpoint, train

from repo import ROOT

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

N_TRAIN = 64  # 2 global batches of 32 = 2 steps per epoch, 16 examples per rank per step


def _data():
    tr, te = load_digits()
    return tr.subset(N_TRAIN), te.subset(16)


def _cfg(**kw) -> TrainConfig:
    base = dict(
        epochs=1,
        batch_size=32,
        warmup_epochs=0,
        adversarial=False,
        adv_eps=0.1,
        adv_alpha=0.05,
        adv_steps=1,
        eval_samples=16,
        eval_pgd_steps=1,
        lr=0.1,
        momentum=0.9,
        weight_decay=0.0,
    )
    base.update(kw)
    return TrainConfig(**base)


def _no_bn_plain_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))


def _no_bn_pni_model() -> nn.Module:
    """PNI weight noise, no BatchNorm: a DDP step then equals one process's step over the global batch."""
    from pni_fast.nn.convert import convert

    return convert(_no_bn_plain_model(), pni="layerwise", noise="weight")


def _bn_pni_model() -> nn.Module:
    from pni_fast.models import DigitsCNN
    from pni_fast.nn.convert import convert

    torch.manual_seed(0)
    return convert(DigitsCNN(1, 10, 4), pni="layerwise", noise="weight")


def _params(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank: int, world: int, port: int, tmp: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    out: dict = {}
    try:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
        tr, te = _data()
        for mode in ("same", "independent"):
            model = _no_bn_pni_model()
            train(model, tr, None, _cfg(epochs=1), rank_noise=mode, progress=False)
            out[mode] = _params(model)
        model = _no_bn_plain_model()
        train(model, tr, None, _cfg(epochs=1), progress=False)
        out["plain"] = _params(model)
        model = _bn_pni_model()  # BatchNorm: each rank normalizes its own shard
        train(model, tr, None, _cfg(epochs=1), rank_noise="same", progress=False)
        out["bn_same"] = _params(model)
        for start in (True, False):  # PGD training: random starts come from each rank's PyTorch stream
            model = _no_bn_pni_model()
            train(model, tr, None, _cfg(adversarial=True, adv_random_start=start), rank_noise="same", progress=False)
            out[f"adv_start_{start}"] = _params(model)
        # adversarial training with BatchNorm and noise-free PGD (no_noise on the unwrapped model inside a
        # DDP run), rank-0 evaluation and files; then resume from the epoch-1 checkpoint
        full, part = os.path.join(tmp, "full"), os.path.join(tmp, "resumed")
        snap = os.path.join(tmp, "epoch1.pt")

        def keep_first(rec):
            if rank == 0 and rec["epoch"] == 1:
                shutil.copy(os.path.join(full, CHECKPOINT_NAME), snap)

        cfg = _cfg(epochs=2, adversarial=True, adv_noise=False)
        model = _bn_pni_model()
        out["hist"] = train(model, tr, te, cfg, out_dir=full, on_epoch=keep_first, progress=False)
        out["adv"] = _params(model)
        torch.distributed.barrier()  # the snapshot exists
        torch.manual_seed(123)  # a disturbed generator: resume must restore everything
        model = _bn_pni_model()
        out["resumed_hist"] = train(model, tr, te, cfg, out_dir=part, resume=snap, progress=False)
        out["resumed"] = _params(model)
        out["files"] = sorted(os.listdir(full)) if os.path.isdir(full) else None
        out["no_noise"] = _no_noise_steps(tr)
    except Exception:
        out["error"] = traceback.format_exc()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    # tensors go through a file: a queue would share them with a process that is about to exit
    torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    queue.put(rank)


def _no_noise_steps(tr) -> dict:
    """A user's DDP loop with a ``no_noise`` step: the alphas get no gradient in that step."""
    import torch.nn.functional as F

    from pni_fast import no_noise

    x, y = tr.x[:8], tr.y[:8]
    res = {}
    for unused in (False, True):
        model = _no_bn_pni_model()
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=unused)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        try:
            for step in range(2):
                with no_noise(model) if step == 0 else contextlib.nullcontext():
                    loss = F.cross_entropy(ddp(x), y)
                opt.zero_grad()
                loss.backward()
                if step == 0:
                    res["alpha_grads"] = [p.grad for n, p in model.named_parameters() if "alpha" in n]
                opt.step()
            res[unused] = _params(model)
        except RuntimeError as e:
            res[unused] = str(e)
    return res


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("ddp"))
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, _free_port() if r == 0 else 0, tmp, queue)) for r in range(1)]
    port = procs[0]._args[2]
    procs.append(ctx.Process(target=_worker, args=(1, 2, port, tmp, queue)))
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank = queue.get(timeout=240)
            results[rank] = torch.load(os.path.join(tmp, f"rank{rank}.pt"), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for r, out in results.items():
        assert "error" not in out, f"rank {r}:\n{out['error']}"
    results["seconds"] = time.perf_counter() - t0
    results["tmp"] = tmp
    return results


def _assert_same_params(a: dict, b: dict, exact: bool = True, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


def test_ranks_end_with_identical_parameters(two_ranks):
    for key in ("same", "independent", "plain", "bn_same", "adv_start_True", "adv_start_False", "adv", "resumed"):
        _assert_same_params(two_ranks[0][key], two_ranks[1][key])


# float32 SGD on weights of size ~0.1-1: the two-rank average (g0 + g1) / 2 and the one-process mean over
# 32 examples differ in the last bits (~1e-7 relative per step); two steps with momentum stay far below 1e-5
TOL = dict(rtol=1e-5, atol=1e-6)


def test_same_noise_equals_one_process_over_the_global_batch(two_ranks):
    tr, _ = _data()
    model = _no_bn_pni_model()
    train(model, tr, None, _cfg(epochs=1), rank_noise="same", distributed=False, progress=False)
    ref = _params(model)
    _assert_same_params(two_ranks[0]["same"], ref, exact=False, **TOL)
    # the tolerance separates: independent per-rank noise gives a different step
    far = [k for k in ref if not torch.allclose(two_ranks[0]["independent"][k], ref[k], **TOL)]
    assert far, "independent noise should change the trained parameters"
    # and the reference is a PNI step: without the same noise it would not match either
    model = _no_bn_pni_model()
    train(model, tr, None, _cfg(epochs=1), rank_noise="independent", distributed=False, progress=False)
    assert any(not torch.allclose(model.state_dict()[k], ref[k], **TOL) for k in ref)


class _ShardBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that normalizes each rank's shard ``x[r::world]`` of the global batch with that shard's
    statistics, and keeps rank 0's running statistics: one process computing what ``world`` DDP
    processes with plain BatchNorm compute (DDP broadcasts rank 0's buffers before every forward)."""

    world = 2

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        outs = [
            F.batch_norm(
                x[r :: self.world].contiguous(),
                self.running_mean if r == 0 else None,
                self.running_var if r == 0 else None,
                self.weight,
                self.bias,
                True,
                self.momentum,
                self.eps,
            )
            for r in range(self.world)
        ]
        return torch.stack(outs, 1).reshape(x.shape)  # back in global-batch order: x[0], x[1], ...


def test_same_noise_with_batchnorm_is_one_process_with_per_shard_batchnorm(two_ranks):
    """What README's --rank-noise same claims for BatchNorm models: N ranks compute one process's step over
    the global batch with each rank's shard normalized by its own statistics (not the global batch's), and
    rank 0's running statistics."""
    tr, _ = _data()
    model = _bn_pni_model()
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = _ShardBatchNorm2d
    train(model, tr, None, _cfg(epochs=1), rank_noise="same", distributed=False, progress=False)
    ref = _params(model)
    _assert_same_params(two_ranks[0]["bn_same"], ref, exact=False, **TOL)
    # BatchNorm over the whole global batch (one process's plain run) is another step
    model = _bn_pni_model()
    train(model, tr, None, _cfg(epochs=1), rank_noise="same", distributed=False, progress=False)
    far = [k for k in ref if not torch.allclose(model.state_dict()[k].double(), ref[k].double(), **TOL)]
    assert any(k.endswith(".weight") for k in far), far


def test_pgd_training_equals_one_process_without_random_starts(two_ranks):
    """PGD's random starts are drawn from each rank's PyTorch generator: with them the step is another
    draw than one process's; without them (and without BatchNorm) it is one process's step."""
    tr, _ = _data()
    for start in (True, False):
        model = _no_bn_pni_model()
        cfg = _cfg(adversarial=True, adv_random_start=start)
        train(model, tr, None, cfg, rank_noise="same", distributed=False, progress=False)
        got, ref = two_ranks[0][f"adv_start_{start}"], _params(model)
        if start:
            assert any(not torch.allclose(got[k], ref[k], **TOL) for k in ref)
        else:
            _assert_same_params(got, ref, exact=False, **TOL)


def test_readme_states_what_same_rank_noise_makes_equal():
    """The claims the tests above check, as README.md words them."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = " ".join(f.read().split())
    claim = text[text.index("`--rank-noise same` (the default)") :][:900]
    for needle in ("without BatchNorm", "its own statistics", "rank 0's running statistics", "random starts"):
        assert needle in claim, needle


def test_plain_model_equals_the_default_one_process_path(two_ranks):
    """Without noise the streams play no part: 2 ranks == train()'s usual single-process run."""
    tr, _ = _data()
    model = _no_bn_plain_model()
    train(model, tr, None, _cfg(epochs=1), progress=False)
    ref = _params(model)
    _assert_same_params(two_ranks[0]["plain"], ref, exact=False, **TOL)
    moved = _params(_no_bn_plain_model())
    assert any(not torch.allclose(moved[k], ref[k], **TOL) for k in ref)  # training moved the weights


def test_sharding_covers_each_global_batch():
    tr, _ = _data()
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    one = [y for _, y in iterate_batches(tr, 32, shuffle=True, generator=gen())]
    shards = [
        [y for _, y in iterate_batches(tr, 32, shuffle=True, generator=gen(), rank=r, world_size=2)] for r in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == len(one)
    for k, y in enumerate(one):
        assert torch.equal(torch.stack([shards[0][k], shards[1][k]], 1).reshape(-1), y)
    odd = Split(tr.x[:63], tr.y[:63])
    n = [sum(len(y) for _, y in iterate_batches(odd, 32, rank=r, world_size=2)) for r in range(2)]
    assert n == [31, 31]
    with pytest.raises(ValueError, match="batch_size .* divisible"):
        next(iterate_batches(tr, 31, rank=0, world_size=2))
    with pytest.raises(ValueError, match="rank"):
        next(iterate_batches(tr, 32, rank=2, world_size=2))


def test_rank0_writes_and_resume_is_exact(two_ranks):
    r0, r1 = two_ranks[0], two_ranks[1]
    assert r0["files"] == sorted(["checkpoint.pt", "history.json", "metrics.csv"])
    full = os.path.join(two_ranks["tmp"], "full")
    ck = load_checkpoint(full)
    assert ck["streams"] == {"rank_noise": "same", "world_size": 2}
    assert not any(k.startswith("module.") for k in ck["model"])  # the unwrapped model
    _assert_same_params(ck["model"], r0["adv"])
    on_disk = json.loads(open(os.path.join(full, "history.json")).read())
    strip = lambda h: [{k: v for k, v in e.items() if k != "time_s"} for e in h]  # noqa: E731
    assert strip(on_disk) == strip(r0["hist"]) == strip(r1["hist"])  # every rank returns rank 0's records
    assert [h["adversarial"] for h in r0["hist"]] == [True, True]
    assert all(0 <= h["test_clean_acc"] <= 1 and h["train_clean_acc"] * N_TRAIN % 1 == 0 for h in r0["hist"])
    _assert_same_params(r0["resumed"], r0["adv"])
    assert strip(r0["resumed_hist"]) == strip(r0["hist"])


def test_derived_seeds_are_distinct_and_stable():
    seeds = {derived_seed(0, "pni", e, r) for e in range(3) for r in ("all", 0, 1)}
    assert len(seeds) == 9 and all(0 <= s < 2**63 for s in seeds)
    assert derived_seed(0, "pni", 1, 0) == derived_seed(0, "pni", 1, 0)


def test_rank_noise_is_checked():
    tr, _ = _data()
    with pytest.raises(ValueError, match="rank_noise"):
        train(_no_bn_pni_model(), tr, None, _cfg(), rank_noise="shared", progress=False)
    with pytest.raises(RuntimeError, match="process group"):
        train(_no_bn_pni_model(), tr, None, _cfg(), distributed=True, progress=False)


def test_spawned_run_is_fast_enough(two_ranks):
    assert two_ranks["seconds"] < 120, two_ranks["seconds"]


@pytest.mark.slow  # ~20 s: two fresh interpreters under torchrun
def test_torchrun_cli_two_processes(tmp_path):
    """``torchrun --nproc_per_node 2 -m pni_fast train`` on the digits: one summary line (rank 0), rank 0's files."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.isfile(torchrun):
        pytest.skip(f"torchrun not found next to {sys.executable}")
    out = tmp_path / "run"
    cmd = [
        torchrun,
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "pni_fast",
        "train",
        "--epochs",
        "1",
        "--warmup-epochs",
        "0",
        "--limit-train",
        "64",
        "--batch-size",
        "32",
        "--eval-samples",
        "16",
        "--pgd-steps",
        "1",
        "--pni",
        "layerwise",
        "--device",
        "cpu",
        "--rank-noise",
        "independent",
        "--out",
        str(out),
        "--no-progress",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("checkpoint and logs in") == 1, proc.stdout
    assert sorted(os.listdir(out)) == sorted(["checkpoint.pt", "history.json", "metrics.csv"])
    ck = load_checkpoint(out)
    assert ck["streams"] == {"rank_noise": "independent", "world_size": 2}
    assert ck["epoch"] == 1 and ck["history"][0]["adversarial"]
    assert json.loads((out / "history.json").read_text())[0]["epoch"] == 1


def test_no_noise_step_in_a_users_ddp_loop(two_ranks):
    """Without unused-parameter detection DDP stops at the step after a no_noise forward and names the remedy;
    with find_unused_parameters=True (what train()'s docstring advises, or attacking ddp.module) it trains."""
    for r in (0, 1):
        err = two_ranks[r]["no_noise"][False]
        assert isinstance(err, str) and "find_unused_parameters=True" in err, err
        grads = two_ranks[r]["no_noise"]["alpha_grads"]
        assert grads and all(g is None for g in grads)
    _assert_same_params(two_ranks[0]["no_noise"][True], two_ranks[1]["no_noise"][True])
