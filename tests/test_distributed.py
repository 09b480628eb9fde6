"""Data-parallel training (gpubp/distributed.py, issue 16), on the numpy backend over MPI.

Jobs of 2 and 3 ranks (`mpiexec -n S python tests/distributed_script.py ...`, each launch under a hard timeout)
train tiny models; this process trains the same models alone with the global batch and compares: parameters
(float64 to 1e-12, float32 to rounding), history, steps, an uneven last batch and one that leaves ranks empty,
every rank bit-identical, a checkpoint written by rank 0 and resumed by all, ranks that differ (an error on every
rank, no hang). With overlap on (init(overlap=True)): the same bits as without, a NaN on one rank skipped by
all. Then the faults: an exception on one rank, a killed rank and a stuck rank each end the job in
bounded time. The command line: `mpiexec -n 2 gpubp train` saves one checkpoint and resumes it. Size 1 (no
mpiexec) runs in this process. The NCCL transport is tested only at size 1, on a GPU (marked gpu)."""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import gpubp
from gpubp import distributed

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed_script as script  # noqa: E402

REPO = Path(gpubp.__file__).resolve().parent.parent
SCRIPT = Path(script.__file__).resolve()
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
LAUNCH_TIMEOUT = 60   # seconds for any one job; the fault tests ask for much less


def mpi_available():
    try:
        import mpi4py
    except ImportError as exc:
        return f"mpi4py is not installed ({exc}): pip install 'gpubp[mpi]'"
    return None if MPIEXEC else f"mpi4py {mpi4py.__version__} is here but no mpiexec on PATH: pip install mpich"


needs_mpi = pytest.mark.skipif(mpi_available() is not None, reason=str(mpi_available()))


def launch(ranks, *args, rank_timeout=LAUNCH_TIMEOUT, command=None):
    """`mpiexec -n ranks` of the script (or `command`), its wall time, output; the ranks' own deadline is
    `rank_timeout` seconds (GPUBP_TEST_TIMEOUT, read by the script)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "MPI_"))}
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), GPUBP_TEST_TIMEOUT=str(rank_timeout),
               PYTHONWARNINGS="error")
    command = command or [sys.executable, str(SCRIPT)]
    started = time.monotonic()
    # a session of its own, so that a job past the timeout is killed whole: mpiexec and every rank
    with subprocess.Popen([MPIEXEC, "-n", str(ranks), *command, *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env, cwd=REPO, start_new_session=True) as job:
        try:
            stdout, stderr = job.communicate(timeout=LAUNCH_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            stdout, stderr = job.communicate()
            pytest.fail(f"mpiexec -n {ranks} {' '.join(map(str, args))}: still running after {LAUNCH_TIMEOUT} s; "
                        f"killed. Its output:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(job.args, job.returncode, stdout, stderr), time.monotonic() - started


# ---- size 1 and the pieces, in this process ------------------------------------------------------------------
def test_without_mpiexec_init_gives_size_one_and_fit_trains_as_alone():
    comm = distributed.init()
    assert (comm.rank, comm.size, comm.local_rank, comm.transport) == (0, 1, 0, None)
    X, y = script.data("mse", 30)
    nets = [script.model("float64", "mse") for _ in range(2)]
    histories = [net.fit(X, y, "mse", script.optimizer(net, "sgd"), epochs=2, batch_size=8, comm=c)
                 for net, c in zip(nets, (None, comm))]
    assert np.array_equal(nets[0].get_params()[0]["W"], nets[1].get_params()[0]["W"])
    assert histories[0] == histories[1]


@pytest.mark.parametrize("overlap", [False, True], ids=["one-shot", "overlap"])
def test_the_data_parallel_path_at_size_one_equals_plain_fit(overlap):
    # the whole path (agreement, broadcast, shares, the weighted reduce of gradients and loss, epoch sums) with a
    # transport whose sum over one rank is the identity; overlapped: a bucket per layer, weighed as it starts
    comm = distributed.Communicator(overlap=overlap, bucket_bytes=0)
    comm.transport = distributed.MpiTransport(comm)
    X, y = script.data("softmax_ce", 45)
    nets = [script.model("float32", "softmax_ce") for _ in range(2)]
    histories = [net.fit(X, y, "softmax_ce", script.optimizer(net, "adam"), epochs=2, batch_size=8, comm=c)
                 for net, c in zip(nets, (None, comm))]
    assert np.array_equal(nets[0].backend.to_numpy(nets[0].params), nets[1].backend.to_numpy(nets[1].params))
    assert histories[0] == histories[1]


def test_a_bad_comm_is_a_type_error_that_leaves_the_model_untouched():
    net = script.model("float64", "mse")
    before = net.backend.to_numpy(net.params)
    with pytest.raises(TypeError, match="comm: expected None or gpubp.distributed.init"):
        net.fit(*script.data("mse", 10), "mse", script.optimizer(net, "sgd"), comm="mpi")
    assert np.array_equal(before, net.backend.to_numpy(net.params)) and net.steps == 0


@pytest.mark.parametrize("bad, error", [({"backend": "gloo"}, "backend: expected 'auto', 'mpi' or 'nccl'"),
                                        ({"timeout": 0}, "timeout: expected a positive number"),
                                        ({"timeout": float("inf")}, "timeout: expected a positive number"),
                                        ({"overlap": "yes"}, "overlap: expected True or False, got 'yes'"),
                                        ({"overlap": 1}, "overlap: expected True or False, got 1"),
                                        ({"bucket_bytes": -1}, r"bucket_bytes: expected a non-negative .* -1$"),
                                        ({"bucket_bytes": 1.5}, r"bucket_bytes: expected a non-negative .* 1.5$"),
                                        ({"bucket_bytes": True}, r"bucket_bytes: expected a non-negative .* True$")])
def test_init_refuses_bad_arguments(bad, error):
    with pytest.raises(ValueError, match=error):
        distributed.init(**bad)


def test_init_without_mpiexec_keeps_the_overlap_settings():
    comm = distributed.init(overlap=True, bucket_bytes=4096)
    assert (comm.overlap, comm.bucket_bytes) == (True, 4096)
    assert distributed.init().overlap is False


@pytest.mark.parametrize("bucket_bytes, layers_per_bucket", [(0, [[2], [1], [0]]),
                                                             (script.DEEP_BUCKET_BYTES, [[2, 1], [0]]),
                                                             (1 << 30, [[2, 1, 0]])])
def test_gradient_buckets_cut_the_reduce_buffer_into_whole_layers_last_first(bucket_bytes, layers_per_bucket):
    net = script.model("float64", "mse", depth=3)
    buckets = distributed.gradient_buckets(net.layout, 8, bucket_bytes)
    starts = {layer: offset for layer, _, _, offset in reversed(net.layout.entries)}   # each layer's first
    # contiguous, from the loss slot at the end down to element 0; each bucket ends where a layer starts
    assert buckets[0][2] == net.reduce_buffer.shape[0] and buckets[-1][1] == 0
    assert all(later[2] == earlier[1] for earlier, later in zip(buckets, buckets[1:]))
    assert [layer for layer, _, _ in buckets] == [layers[-1] for layers in layers_per_bucket]
    assert all(start == starts[layer] for layer, start, _ in buckets)


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("rows, batch", [(50, 8), (45, 6), (3, 4), (48, 4)])
def test_ranks_share_every_global_batch_in_order(size, rows, batch):
    permutation = np.random.default_rng(rows).permutation(rows)
    shares = [distributed.share_batches(permutation, batch, r, size) for r in range(size)]
    global_rows = shares[0][1]
    assert global_rows == [min(batch * size, rows - s) for s in range(0, rows, batch * size)]
    assert all(g == global_rows for _, g in shares)
    # global batch g is rank 0's rows of it, then rank 1's, ...: the permutation again
    rebuilt = []
    for g in range(len(global_rows)):
        for rows_of_rank, _ in shares:
            rebuilt.extend(rows_of_rank[g * batch:(g + 1) * batch])
    assert np.array_equal(rebuilt, permutation)


# ---- jobs of 2 and 3 ranks ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}ranks")
def job(request, tmp_path_factory):
    """One `mpiexec -n S ... train` per size: its results and S."""
    if mpi_available():
        pytest.skip(mpi_available())
    out = tmp_path_factory.mktemp(f"ranks{request.param}") / "results.npz"
    result, _ = launch(request.param, "train", out)
    assert result.returncode == 0, result.stdout + result.stderr
    return dict(np.load(out)), request.param


def single_process(case, size):
    """The case trained by one process with the global batch: (parameters, history, steps)."""
    _, dtype, loss, opt_name, rows, batch = case
    X, y = script.data(loss, rows)
    net = script.model(dtype, loss)
    history = net.fit(X, y, loss, script.optimizer(net, opt_name), epochs=script.EPOCHS,
                      batch_size=script.batch_for(size, batch) * size)
    return net.backend.to_numpy(net.params), history, net.steps


@needs_mpi
@pytest.mark.parametrize("case", script.CASES, ids=[c[0] for c in script.CASES])
def test_ranks_train_the_model_one_process_trains_with_the_global_batch(job, case):
    results, size = job
    name, dtype = case[0], case[1]
    params, history, steps = single_process(case, size)
    per_rank = results[f"{name}.params"]
    assert per_rank.shape[0] == size
    for rank in range(1, size):   # the same bits on every rank
        assert np.array_equal(per_rank[rank], per_rank[0]), f"rank {rank} differs from rank 0"
    rtol, atol = (1e-12, 1e-12) if dtype == "float64" else (2e-5, 2e-6)
    np.testing.assert_allclose(per_rank[0], params, rtol=rtol, atol=atol)
    assert list(results[f"{name}.steps"]) == [steps] * size
    assert sorted(k.split(".history.")[1] for k in results if k.startswith(f"{name}.history.")) == sorted(history)
    for key, values in history.items():   # global metrics: the single process's, to rounding
        np.testing.assert_allclose(results[f"{name}.history.{key}"], values, rtol=1e-6 if dtype == "float32" else 1e-12)


@needs_mpi
@pytest.mark.parametrize("case", [c[0] for c in script.CASES] + list(script.OTHER_MODELS))
def test_overlap_trains_the_same_bits_as_one_shot(job, case):
    # one bucket per layer (the CASES; a rank left without rows in the last global batch starts its buckets in
    # finish), two layers in one bucket (deep), the fused MLP (every bucket after its one backward call);
    # one-shot is the single process's, to 1e-12
    results, size = job
    overlapped, one_shot = results[f"overlap.{case}.params"], results[f"{case}.params"]
    assert overlapped.shape[0] == size
    for rank in range(size):
        assert np.array_equal(overlapped[rank], one_shot[rank]), f"rank {rank}: overlap differs from one-shot"
    for key in (k for k in results if k.startswith(f"{case}.history.")):
        assert np.array_equal(results[f"overlap.{key}"], results[key]), key


@needs_mpi
def test_a_nan_on_one_rank_with_overlap_makes_every_rank_skip_the_step(job):
    results, size = job
    # NaN in rank 1's layer-0 gradient (the last bucket to start) at step 2: every rank skips step 2 and stops,
    # with the parameters of the run stopped after step 1 by a callback
    reasons = list(results["overlap.nan.reason"])
    assert len(set(reasons)) == 1 and "train step 2: the gradient of layer 0" in reasons[0], reasons
    assert list(results["overlap.nan.steps"]) == list(results["overlap.stopped.steps"]) == [2] * size
    for rank in range(size):
        assert np.array_equal(results["overlap.nan.params"][rank], results["overlap.stopped.params"][0])


@needs_mpi
def test_a_checkpoint_by_rank_0_resumed_on_every_rank_continues_the_same_run(job):
    results, size = job
    # one epoch, saved by rank 0, loaded by every rank, one more epoch == two epochs uninterrupted (same job)
    assert results["resumed.params"].shape[0] == size
    for rank in range(size):
        assert np.array_equal(results["resumed.params"][rank], results[f"{script.CASES[0][0]}.params"][0])


@needs_mpi
def test_a_fault_on_one_rank_stops_every_rank_at_the_same_step(job):
    results, size = job
    # rank 1's loss is inf (its gradients finite): every rank skips step 0 and stops with the same reason
    reasons = list(results["fault.stop_reason"])
    assert len(set(reasons)) == 1 and "train step 0: the loss is not finite" in reasons[0], reasons
    for rank in range(size):
        assert np.array_equal(results["fault.params"][rank], results["fault.initial"])


@needs_mpi
def test_a_callback_on_rank_0_alone_stops_every_rank_at_the_same_step(job):
    results, size = job
    # 40 rows, 4 per rank: 40 / (4 × size) global batches an epoch; stopped after batch 2 of epoch 2
    per_epoch = -(-40 // (4 * size))
    assert list(results["stop.steps"]) == [per_epoch + 2] * size
    for rank in range(1, size):
        assert np.array_equal(results["stop.params"][rank], results["stop.params"][0])
    assert int(results["stop.epochs"]) == 2   # the whole first epoch and what ran of the second
    reasons = list(results["stop.reason"])
    assert reasons[0] == "StopAt set model.stop_training in epoch 2, batch 2; the epoch ended there", reasons
    assert reasons[1:] == ["a callback on another rank stopped training in epoch 2, batch 2"] * (size - 1)
    # a stop asked at the end of an epoch, on rank 0 alone: every rank trains that one epoch only
    assert list(results["stop_epoch.epochs"]) == [1] * size
    others = list(results["stop_epoch.reason"])[1:]
    assert others == ["a callback on another rank stopped training in epoch 1"] * (size - 1)


@needs_mpi
@pytest.mark.parametrize("what, message", [
    ("architecture", "has layers=['5->9 tanh', '9->2 identity'] where rank 0 has "
                     "layers=['5->7 tanh', '7->2 identity']"),
    ("dtype", "has dtype='float32' where rank 0 has dtype='float64'"),
    ("precision", "has precision='bf16' where rank 0 has precision='fp32'"),
    ("overlap", "has overlap='on, bucket_bytes=0' where rank 0 has overlap='off'"),
], ids=["architecture", "dtype", "precision", "overlap"])
def test_a_rank_that_differs_is_the_same_error_on_every_rank(job, what, message):
    results, size = job
    messages = list(results[f"mismatch.{what}"])
    assert len(messages) == size and len(set(messages)) == 1, messages
    assert messages[0].startswith("fit(comm=...): every rank must train the same model the same way")
    assert f"rank {size - 1} {message}" in messages[0]
    assert results[f"mismatch.{what}.untouched"].all()


# ---- faults: every job ends, in bounded time -------------------------------------------------------------------
@needs_mpi
def test_an_exception_on_one_rank_ends_the_job_naming_the_rank(tmp_path):
    # the ranks' deadline is 60 s: ending in far less shows the abort did it, not the deadline
    result, wall = launch(2, "raise", tmp_path / "x.npz", rank_timeout=60)
    assert result.returncode != 0 and wall < 20, (wall, result.stderr)
    assert "gpubp: rank 1 of 2 raised an uncaught exception" in result.stderr
    assert "RuntimeError: planted failure on rank 1" in result.stderr


@needs_mpi
def test_a_killed_rank_ends_the_job(tmp_path):
    result, wall = launch(2, "kill", tmp_path / "x.npz", rank_timeout=60)
    assert result.returncode != 0 and wall < 20, (wall, result.stdout + result.stderr)


@needs_mpi
def test_a_stuck_rank_makes_the_others_give_up_after_the_timeout(tmp_path):
    # rank 1 sleeps 120 s instead of calling fit; rank 0 waits 2 s for it, then aborts the job
    result, wall = launch(2, "hang", tmp_path / "x.npz", rank_timeout=2)
    assert result.returncode != 0 and wall < 20, (wall, result.stdout + result.stderr)
    assert "gpubp: rank 0 of 2: timed out after 2 s waiting for the other ranks" in result.stderr


# ---- the bench row (bench/distributed.py), end to end at a tiny size: no timing is asserted ---------------------
@needs_mpi
def test_the_bench_row_checks_every_variant_and_prints_their_ratios():
    command = [sys.executable, "-m", "bench.distributed", "--smoke", "--rounds", "1", "--no-save"]
    result, _ = launch(2, command=command)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if "ms/step" in line]   # rank 0 alone prints
    impls = [re.search(r" ranks\s+(\S+)", line).group(1) for line in rows]
    assert impls == ["gpubp-numpy-mpi", "gpubp-numpy-mpi-one-bucket", "gpubp-numpy-mpi-overlap",
                     "gpubp-numpy-mpi-overlap-per-layer"], result.stdout
    assert all("x gpubp-numpy-mpi" in line for line in rows) and "REFUSED" not in result.stdout


# ---- the command line --------------------------------------------------------------------------------------------
@needs_mpi
def test_gpubp_train_under_mpiexec_saves_one_checkpoint_and_resumes(tmp_path):
    pytest.importorskip("sklearn")
    from gpubp import cli
    folder = tmp_path / "run"
    folder.mkdir()
    checkpoint = folder / "digits.npz"
    command = [sys.executable, "-m", "gpubp.cli", "train", "--data", "digits", "--layers", "16", "--dtype",
               "float64"]
    first, _ = launch(2, "--epochs", 1, "--save", checkpoint, command=command)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "2 ranks, global batch 128" in first.stdout
    assert first.stdout.count("epoch 1/1") == 1 and first.stdout.count("held-out accuracy") == 1   # rank 0 speaks
    assert sorted(os.listdir(folder)) == ["digits.npz"]                 # one file, no temporary left behind
    second, _ = launch(2, "--epochs", 2, "--resume", checkpoint, command=command)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming at epoch 2" in second.stdout and second.stdout.count("epoch 2/2") == 1
    assert sorted(os.listdir(folder)) == ["digits.npz"]
    # one process, 2 epochs with the global batch of 2 × 64 rows: the same model and history
    reference = tmp_path / "reference.npz"
    assert cli.main(["train", "--data", "digits", "--layers", "16", "--dtype", "float64", "--epochs", "2",
                     "--batch-size", "128", "--save", str(reference)]) == 0
    ours, theirs = gpubp.load(checkpoint), gpubp.load(reference)
    np.testing.assert_allclose(ours.backend.to_numpy(ours.params), theirs.backend.to_numpy(theirs.params),
                               rtol=1e-12, atol=1e-12)
    for key, values in theirs.extra["gpubp_cli"]["history"].items():
        np.testing.assert_allclose(ours.extra["gpubp_cli"]["history"][key], values, rtol=1e-12)


# ---- NCCL: size 1, on a GPU only -------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("overlap", [False, True], ids=["one-shot", "overlap"])
def test_nccl_transport_at_size_one_trains_as_plain_fit(overlap):
    pytest.importorskip("cupy")
    # overlap with a bucket per layer: each bucket's all-reduce on the side stream, the update waiting on it
    comm = distributed.Communicator(overlap=overlap, bucket_bytes=0)
    comm.transport = distributed.NcclTransport(comm)
    X, y = script.data("softmax_ce", 45)
    nets = [gpubp.Sequential(gpubp.Dense(5, 7, "tanh"), gpubp.Dense(7, 3), backend="cupy", seed=3)
            for _ in range(2)]
    for net, c in zip(nets, (None, comm)):
        net.fit(X, y, "softmax_ce", gpubp.Adam(net, lr=0.01), epochs=2, batch_size=8, comm=c)
    np.testing.assert_allclose(nets[1].backend.to_numpy(nets[1].params),
                               nets[0].backend.to_numpy(nets[0].params), rtol=1e-6, atol=1e-7)
