"""Data-parallel training (torch.distributed, gloo on CPU): two ranks reach the parameters of
one process drawing both shards, every rank the same; ``torchrun`` runs of bgflow-train
write one run folder, refuse indivisible batches and resume exactly after a SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from test_train_script import TINY as TRAIN_SCRIPT_TINY
from test_train_script import assert_same_checkpoint

from bgflow_mini import BoltzmannGenerator, DiagonalNormal, distributed
from bgflow_mini.energies import DoubleWell
from bgflow_mini.evaluation import generator_samples
from bgflow_mini.flows import coupling_flow
from bgflow_mini.training import Phase, Trainer, check_global_batches

ROOT = Path(__file__).parents[1]

PHASES = [  # 50 steps: ML only, reverse KL only, ML + KL + weighted ML, weighted ML
    Phase(15, w_ml=1.0, lr=3e-3, name="ml"),
    Phase(10, w_ml=0.0, w_kl=1.0, name="kl"),
    Phase(15, w_ml=0.5, w_kl=1.0, w_iw=0.5, lr=1e-3, resample_every=5, name="mixed"),
    Phase(10, w_ml=0.0, w_iw=1.0, temperature=2.0, resample_every=5, name="iw"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toy_data(n: int = 2048) -> torch.Tensor:
    """Both wells of the double well (x1 ~ -1.7 and +1.7), float64."""
    g = torch.Generator().manual_seed(1)
    x = 0.3 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    x[:, 0] += torch.where(torch.rand(n, generator=g) < 0.8, -1.7, 1.7).double()
    return x


def model(seed: int = 0) -> BoltzmannGenerator:
    torch.manual_seed(seed)
    prior = DiagonalNormal(2, scale=torch.tensor([1.5, 1.0], dtype=torch.float64))
    flow = coupling_flow(2, n_blocks=2, hidden=(32, 32), kind="rnvp").double()
    return BoltzmannGenerator(prior, flow, DoubleWell())


def fresh_params() -> list[torch.Tensor]:
    return [p.detach() for p in model().parameters()]


def fit(shards: int | None, model_seed: int = 0) -> Trainer:
    bg = model(model_seed)
    data = toy_data()
    trainer = Trainer(
        bg,
        batch_size=64,
        kl_batch_size=64,
        clip_grad_norm=100.0,
        ess_every=10,
        ess_samples=101,  # not a multiple of the shards: split unevenly
        val_data=data[:301],
        eval_every=10,
        ema_decay=0.9,
        buffer_size=256,
        seed=7,
        progress=False,
        shards=shards,
    )
    trainer.fit_phases(PHASES, data=data)
    return trainer


def summary(trainer: Trainer) -> dict:
    return {
        "params": [p.detach().clone() for p in trainer.generator.parameters()],
        "ema": trainer.ema,
        "history": trainer.history,
        "best_step": trainer.best["step"],
        "energy_evaluations": trainer.n_energy_evaluations,
    }


def rank_environment(rank: int, world: int, port: int) -> None:
    """What torchrun would set for ``rank`` of ``world`` processes on this host; 1 thread."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)


def rank_worker(rank: int, world: int, port: int, out: str) -> None:
    rank_environment(rank, world, port)
    with distributed.init_from_env("cpu") as ctx:
        assert (ctx.rank, ctx.world_size, ctx.backend) == (rank, world, "gloo")
        # rank 1 builds different weights: the trainer starts every rank from rank 0's
        trainer = fit(shards=None, model_seed=rank)
        assert trainer.shards == world
        torch.save(summary(trainer), Path(out) / f"rank{rank}.pt")
        ctx.barrier()


def test_two_ranks_match_one_process_drawing_both_shards(tmp_path):
    t = time.time()
    mp.spawn(rank_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    spawned = time.time() - t
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    single = summary(fit(shards=2))
    # every rank holds the same parameters, average and history, bit for bit
    for key in ("params", "ema"):
        assert all(torch.equal(a, b) for a, b in zip(*(r[key] for r in ranks), strict=True))
    assert ranks[0]["history"] == ranks[1]["history"]
    # ... and those of one process that draws both shards, to float tolerance
    for a, b in zip(ranks[0]["params"], single["params"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    diff = max(float((a - b).abs().max()) for a, b in zip(ranks[0]["params"], single["params"]))
    moved = max(float((a - b).abs().max()) for a, b in zip(single["params"], fresh_params()))
    assert moved > 1e-2  # it trained
    hist, ref = ranks[0]["history"], single["history"]
    assert len(hist) == len(ref) == 50 and not any(r["skipped"] for r in ref)
    for key in ("loss", "nll", "kl", "nll_iw", "ess", "ess_eval", "val_nll", "ess_buffer"):
        got = [r[key] for r in hist if key in r]
        want = [r[key] for r in ref if key in r]
        assert len(got) == len(want) > 0, key
        assert got == pytest.approx(want, rel=1e-9, abs=1e-10), key
    for key in ("n_nonfinite", "n_capped", "skipped"):
        assert [r.get(key) for r in hist] == [r.get(key) for r in ref], key
    assert ranks[0]["best_step"] == single["best_step"]
    # global counts: 25 KL steps x 64, 5 refills x 256 (3 in "mixed", 2 in "iw"), 5 ESS
    # estimates x 101
    assert ranks[0]["energy_evaluations"] == single["energy_evaluations"] == 25 * 64 + 5 * 256 + 505
    # the shards are what matters, not the processes: one shard is another run
    other = summary(fit(shards=None))
    assert not torch.allclose(other["params"][0], single["params"][0])
    print(f"2 ranks x 50 steps: {spawned:.1f} s; max |2 ranks - 1 process| {diff:.1e}")


def sampling_worker(rank: int, world: int, port: int, out: str) -> None:
    rank_environment(rank, world, port)
    with distributed.init_from_env("cpu"):
        torch.manual_seed(100 + rank)  # the global RNG differs per rank: not used
        got = generator_samples(model(seed=3), 1001, batch_size=128, seed=7, shards=4)
        torch.save(got, Path(out) / f"samples{rank}.pt")


def test_evaluation_samples_are_spread_over_ranks(tmp_path):
    """2 ranks each draw and weight 2 of 4 shards; both get the union, which equals what
    one process drawing all 4 shards gets (and another seed gives other samples)."""
    mp.spawn(sampling_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"samples{r}.pt", weights_only=False) for r in (0, 1)]
    single = generator_samples(model(seed=3), 1001, batch_size=128, seed=7, shards=4)
    for got in ranks:
        assert got[0].shape == (1001, 2)
        for a, b in zip(got, single, strict=True):
            np.testing.assert_array_equal(a, b)
    other = generator_samples(model(seed=3), 1001, batch_size=128, seed=8, shards=4)
    assert not np.allclose(other[0], single[0])
    with pytest.raises(ValueError, match="multiple"):
        generator_samples(model(seed=3), 10, seed=7, shards=0)


def test_indivisible_global_batches_are_refused():
    with pytest.raises(ValueError, match="kl_batch_size=63 .* divisible by the 2"):
        check_global_batches([Phase(1, w_ml=0, w_kl=1)], 64, 63, 2)
    with pytest.raises(ValueError, match="phase 1 \\(b\\): batch_size=65"):
        check_global_batches([Phase(1, name="a"), Phase(1, batch_size=65, name="b")], 64, 64, 2)
    check_global_batches([Phase(1, w_ml=0, w_kl=1)], 63, 64, 2)  # ML batch unused: fine
    with pytest.raises(ValueError, match="multiple of the 1 processes"):
        Trainer(BoltzmannGenerator(DiagonalNormal(2), coupling_flow(2, 1)), shards=0)


def test_checkpoint_remembers_its_shards(tmp_path):
    torch.manual_seed(0)
    bg = BoltzmannGenerator(DiagonalNormal(2), coupling_flow(2, 1), DoubleWell())
    path = Trainer(bg, shards=2, progress=False).save_checkpoint(tmp_path / "c.pt")
    with pytest.raises(ValueError, match="2 shard.*nproc_per_node=2"):
        Trainer(bg, progress=False).load_checkpoint(path)
    assert Trainer(bg, shards=2, progress=False).load_checkpoint(path) == {}


def test_without_torchrun_nothing_starts():
    ctx = distributed.init_from_env("cpu", env={})
    assert (ctx.rank, ctx.world_size, ctx.backend) == (0, 1, None)
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.init_from_env("cpu", env={"WORLD_SIZE": "1"}).backend is None
    x = torch.arange(6.0).reshape(3, 2)
    assert distributed.all_gather_cat(x) is x
    # the streams: reproducible, distinct per shard, step and purpose
    seeds = {
        distributed.stream_seed(0, s, t, p) for s in range(3) for t in range(3) for p in (0, 1)
    }
    assert len(seeds) == 18 and distributed.stream_seed(0, 1, 2, 0) in seeds
    with distributed.rng_stream(5):
        a = torch.randn(3)
    before = torch.get_rng_state()
    with distributed.rng_stream(5):
        b = torch.randn(3)
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), before)


# ------------------------------------------------------------------ bgflow-train via torchrun
TINY = [  # the tiny toy run of tests/test_train_script.py, with its phases
    *TRAIN_SCRIPT_TINY,
    "training.phases=[{name: ml, steps: 100, w_ml: 1.0},{name: mixed, steps: 100, w_ml: 0.5, "
    "w_kl: 1.0}]",
]


def torchrun(*args: str, n: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={n}",
        f"--master_port={free_port()}",
        "-m",
        "bgflow_mini.apps.train",
        *args,
    ]


def environment(tmp: Path) -> dict[str, str]:
    (tmp / "tmp").mkdir(exist_ok=True)
    return {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp / "tmp")}


def run(args: list[str], cwd: Path, code: int = 0) -> subprocess.CompletedProcess:
    res = subprocess.run(
        args, cwd=cwd, env=environment(cwd), capture_output=True, text=True, timeout=600
    )
    assert res.returncode == code, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to find ranks")
def kill_after_first_checkpoint(args: list[str], run_dir: Path, cwd: Path | None = None) -> int:
    """Start ``args``, SIGKILL it (torchrun and every rank) as soon as the run folder's
    first checkpoint exists; returns the checkpoint's step."""
    cwd = cwd or run_dir.parent
    proc = subprocess.Popen(
        args, cwd=cwd, env=environment(cwd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt = run_dir / "checkpoints" / "latest.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    pids = descendants(proc.pid) + [proc.pid]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    while not all(gone(p) for p in pids) and time.time() < deadline:
        time.sleep(0.05)
    return int(torch.load(ckpt, weights_only=True)["step"])


def test_torchrun_two_ranks_write_one_folder_and_resume_after_sigkill(tmp_path):
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    t = time.time()
    res = run(torchrun(*TINY, f"hydra.run.dir={ref_dir}"), tmp_path)
    t_run = time.time() - t
    assert res.stdout.count("ESS (normalised)") == 1  # one summary: rank 0's
    for name in ["config.yaml", "model.pt", "metrics.csv", "metrics.json", "samples.npy"]:
        assert (ref_dir / name).is_file(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref", "tmp"]  # one run folder
    assert not list((tmp_path / "tmp").glob("bgflow-train-*"))  # rank 1's Hydra folder is gone
    metrics = json.loads((ref_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["distributed"]["backend"] == "gloo"
    assert metrics["global_batch_sizes"]["kl_batch_size"] == 128 and metrics["steps"] == 200
    # 100 mixed steps of 128 samples (all ranks), 5 ESS estimates of 256
    assert metrics["energy_evaluations"]["training"] == 100 * 128 + 5 * 256
    rows = (ref_dir / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 20

    # the same run, killed (every rank and torchrun) after its first checkpoint
    killed_at = kill_after_first_checkpoint(torchrun(*TINY, f"hydra.run.dir={cut_dir}"), cut_dir)
    assert 0 < killed_at < 200, "the run was not interrupted mid-way"
    assert not (cut_dir / "metrics.json").exists()
    ckpt = cut_dir / "checkpoints" / "latest.pt"

    # a plain (one-process) resume would draw other random streams: refused
    plain = [sys.executable, str(ROOT / "scripts" / "train.py"), f"resume={cut_dir}"]
    res = run([*plain, f"hydra.run.dir={tmp_path / 'log1'}"], tmp_path, code=2)
    assert "nproc_per_node=2" in res.stderr

    run(
        torchrun(f"resume={cut_dir}", "progress=false", f"hydra.run.dir={tmp_path / 'log2'}"),
        tmp_path,
    )
    assert_same_checkpoint(ref_dir / "checkpoints" / "latest.pt", ckpt, 200)
    m_got = json.loads((cut_dir / "metrics.json").read_text())
    assert m_got["ess"] == pytest.approx(metrics["ess"], rel=1e-12)
    print(f"2-rank bgflow-train, 200 steps + evaluation: {t_run:.1f} s")


def test_torchrun_refuses_a_batch_the_ranks_cannot_share(tmp_path):
    res = run(
        torchrun(*TINY, "training.kl_batch_size=127", f"hydra.run.dir={tmp_path / 'run'}"),
        tmp_path,
        code=1,  # torchrun's own exit code when a rank fails; each rank exits with 2
    )
    assert res.stderr.count("error: phase 1 (mixed): kl_batch_size=127 is the global batch") == 2
    assert "exitcode: 2" in res.stderr and "bgflow_mini/" not in res.stderr  # no traceback of ours
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_torchrun_two_ranks_on_alanine_dipeptide(tmp_path):
    """A few steps on ALDP with an OpenMM energy per rank; rank 0 makes the MD data first."""
    args = [
        "system=aldp_vacuum",
        "md=plain",
        "md.n_frames=300",
        "md.save_every=20",
        "md.equilibration_steps=200",
        f"data_dir={tmp_path / 'data'}",
        "progress=false",
        "evaluation.n_samples=512",
        "evaluation.batch_size=256",
        "evaluation.n_bootstrap=10",
        "flow.n_blocks=2",
        "flow.hidden=[32,32]",
        "training.batch_size=32",
        "training.kl_batch_size=32",
        "training.ess_every=5",
        "training.ess_samples=64",
        "training.eval_every=5",
        "training.metrics_every=5",
        "training.checkpoint_every=5",
        "training.phases=[{name: ml, steps: 10, w_ml: 1.0},{name: mixed, steps: 10, w_ml: 1.0, "
        "w_kl: 1.0}]",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    # killed after its first checkpoint (rank 0 made the MD data first), then resumed
    killed_at = kill_after_first_checkpoint(torchrun(*args), tmp_path / "run", tmp_path)
    assert 0 < killed_at < 20 and not (tmp_path / "run" / "metrics.json").exists()
    resume = [f"resume={tmp_path / 'run'}", "progress=false", f"hydra.run.dir={tmp_path / 'log'}"]
    res = run(torchrun(*resume), tmp_path)
    assert res.stdout.count("cache hit") == 2 and "cache miss" not in res.stdout  # both ranks
    assert "resumed from" in res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "log", "run", "tmp"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 20
    assert metrics["energy_evaluations"]["training"] == 10 * 32 + 4 * 64
    assert metrics["finite_energy_fraction"] == 1.0


def test_shard_counts_and_rank_shards_split_everything_once():
    assert distributed.shard_counts(10, 4) == [3, 3, 2, 2]
    assert distributed.shard_counts(2, 4) == [1, 1, 0, 0]
    parts = [distributed.rank_shards(6, r, 3) for r in range(3)]
    assert [list(p) for p in parts] == [[0, 1], [2, 3], [4, 5]]
    assert distributed.rank_shards(3) == range(0, 3)  # one process draws every shard
