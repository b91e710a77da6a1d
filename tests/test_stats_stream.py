"""The streamed statistics run on a synthetic stream whose C is known: the convergence rule, a
resume that ends with the same bits, refused checkpoints, and a failed checkpoint write."""
import errno
import json

import numpy as np
import pytest
import torch

from rome_fast.edit import stats_checkpoint
from rome_fast.edit.stats_checkpoint import CheckpointWriteError, checkpoint_path, load_checkpoint
from rome_fast.edit.stats_convergence import ConvergenceTracker, solve_probes
from rome_fast.edit.stats_stream import CHUNK, stream_sums

D = 16


class GaussianStream:
    """A 'text' t is a seed; its keys are 5 draws of A z (z standard normal), so C = A Aᵀ."""

    def __init__(self, d=D, per_text=5):
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(d, d, generator=g, dtype=torch.float64)
        self.A = torch.eye(d, dtype=torch.float64) + 0.5 * noise / d ** 0.5  # well conditioned
        self.C = self.A @ self.A.T
        self.per_text = per_text
        self.probes = {"k": torch.randn(3, d, generator=g, dtype=torch.float64)}

    def __call__(self, texts):
        keys = torch.cat([torch.randn(self.per_text, self.A.shape[0], dtype=torch.float64,
                                      generator=torch.Generator().manual_seed(1000 + t)) for t in texts]) @ self.A.T
        keys = keys.float()  # summed in fp32 per chunk, as the model collector does, then fp64 totals
        return {"k": keys.T @ keys}, len(keys)


class Stop(Exception):
    pass


def stop_after(rounds):
    done = [0]

    def tick():
        done[0] += 1
        if done[0] == rounds:
            raise Stop()
    return tick


def truth_error(stream, sums, count):
    x = solve_probes(sums, count, stream.probes["k"])
    exact = torch.linalg.solve(stream.C, stream.probes["k"].T)
    return float(((x - exact).norm(dim=0) / exact.norm(dim=0)).max())


def test_convergence_rule_stops_on_a_known_stream():
    stream = GaussianStream()
    sample = list(range(128 * CHUNK))
    runs = {}
    for tol in (0.06, 0.02):
        res = stream_sums(stream, sample, ["k"], tracker=ConvergenceTracker(stream.probes, tol), progress=False)
        assert res.converged and res.texts < len(sample)
        changes = [p["max_change"] for p in res.curve]
        assert [p["texts"] for p in res.curve] == [CHUNK * 2 ** i for i in range(len(res.curve))]  # doublings
        assert changes[0] is None and changes[-1] < tol  # stops at the first doubling below tol
        assert all(c >= tol for c in changes[1:-1])
        assert res.count == res.texts * stream.per_text
        # what it estimates: C⁻¹k is within about tol of the truth when it stops
        runs[tol] = (res.texts, truth_error(stream, res.sums["k"], res.count))
        assert runs[tol][1] < 2 * tol, runs
    assert runs[0.02][0] > runs[0.06][0] and runs[0.02][1] < runs[0.06][1]
    # a tolerance it cannot reach: the whole sample, not converged, a final point for the whole
    res = stream_sums(stream, sample[:5 * CHUNK + 7], ["k"], tracker=ConvergenceTracker(stream.probes, 1e-9),
                      progress=False)
    assert not res.converged and res.texts == 5 * CHUNK + 7
    assert [p["texts"] for p in res.curve] == [CHUNK, 2 * CHUNK, 4 * CHUNK, 5 * CHUNK + 7]
    # the sum is the one of all keys (chunk sums in fp32)
    full = torch.cat([stream([t])[0]["k"][None] for t in range(5 * CHUNK + 7)])
    torch.testing.assert_close(res.sums["k"], full.double().sum(0), rtol=1e-5, atol=1e-3)


def test_resume_ends_with_the_same_bits(tmp_path):
    stream = GaussianStream()
    sample = list(range(9 * CHUNK + 30))
    base = tmp_path / ".checkpoints" / "run"
    settings = {"model": "gauss", "corpus": "seeds"}
    kw = dict(settings=settings, every_texts=2 * CHUNK, progress=False)
    whole = stream_sums(stream, sample, ["k"], tracker=ConvergenceTracker(stream.probes), **kw)
    with pytest.raises(Stop):  # killed after 5 rounds: the last checkpoint is at round 4
        stream_sums(stream, sample, ["k"], checkpoint_base=base, tracker=ConvergenceTracker(stream.probes),
                    after_round=stop_after(5), **kw)
    _, meta = load_checkpoint(checkpoint_path(base, 0), dict(settings, names=["k"], n_texts=len(sample),
                                                             chunk=CHUNK, rank=0, world=1, until_converged=None))
    assert meta["rounds"] == 4 and meta["texts"] == 4 * CHUNK and len(meta["curve"]) == 3
    again = stream_sums(stream, sample, ["k"], checkpoint_base=base, tracker=ConvergenceTracker(stream.probes), **kw)
    assert again.sums["k"].dtype == torch.float64 and torch.equal(again.sums["k"], whole.sums["k"])
    assert again.count == whole.count and again.texts == whole.texts == len(sample)
    assert json.dumps(again.curve) == json.dumps(whole.curve)
    assert again.local_tokens == whole.count - 4 * CHUNK * stream.per_text  # only the rest was summed


def test_checkpoint_from_other_settings_is_refused(tmp_path):
    stream = GaussianStream()
    sample = list(range(3 * CHUNK))
    base = tmp_path / "run"
    kw = dict(checkpoint_base=base, every_texts=CHUNK, progress=False)
    with pytest.raises(Stop):
        stream_sums(stream, sample, ["k"], settings={"corpus": "a"}, after_round=stop_after(1), **kw)
    for settings, sample_, what in (({"corpus": "b"}, sample, "corpus: 'a' there, 'b' now"),
                                    ({"corpus": "a"}, sample[:-1], "n_texts: 300 there, 299 now")):
        with pytest.raises(ValueError, match=f"checkpoint .*run.rank0.ckpt.npz was written with other settings "
                                             rf"\({what}\).*--restart"):
            stream_sums(stream, sample_, ["k"], settings=settings, **kw)
    with pytest.raises(ValueError, match="until_converged: None there, 0.1 now"):
        stream_sums(stream, sample, ["k"], settings={"corpus": "a"}, tracker=ConvergenceTracker(stream.probes, 0.1),
                    **kw)
    # the checkpoints of rank 0 of a 2-process run are not taken up by one process
    from rome_fast.distributed import DistInfo
    with pytest.raises(Stop):
        stream_sums(stream, sample, ["k"], settings={"corpus": "a"}, info=DistInfo(rank=0, world=2),
                    after_round=stop_after(1), restart=True, **kw)
    with pytest.raises(ValueError, match="world: 2 there, 1 now"):
        stream_sums(stream, sample, ["k"], settings={"corpus": "a"}, **kw)
    # restart discards it; a damaged file is a clear error too
    res = stream_sums(stream, sample, ["k"], settings={"corpus": "b"}, restart=True, **kw)
    assert res.texts == len(sample)
    checkpoint_path(base, 0).write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="could not be read"):
        stream_sums(stream, sample, ["k"], settings={"corpus": "b"}, **kw)


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    stream = GaussianStream()
    sample = list(range(6 * CHUNK))
    base = tmp_path / "run"
    kw = dict(settings={"corpus": "a"}, checkpoint_base=base, every_texts=CHUNK, progress=False)
    whole = stream_sums(stream, sample, ["k"], settings={"corpus": "a"}, progress=False)
    real, calls = np.savez, []

    def disk_full_on_third(file, **arrays):
        calls.append(1)
        if len(calls) == 3:
            file.write(b"half a checkpoint")  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(file, **arrays)
    monkeypatch.setattr(stats_checkpoint.np, "savez", disk_full_on_third)
    with pytest.raises(CheckpointWriteError, match="No space left on device.*previous checkpoint is intact"):
        stream_sums(stream, sample, ["k"], **kw)
    monkeypatch.setattr(stats_checkpoint.np, "savez", real)
    path = checkpoint_path(base, 0)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left
    arrays, meta = load_checkpoint(path, dict(kw["settings"], names=["k"], n_texts=len(sample), chunk=CHUNK,
                                              rank=0, world=1, until_converged=None))
    assert meta["rounds"] == 2  # the second checkpoint, whole
    res = stream_sums(stream, sample, ["k"], **kw)  # resumes from it
    assert torch.equal(res.sums["k"], whole.sums["k"])


def test_non_finite_keys_name_the_text():
    stream = GaussianStream()

    class Broken:
        def __call__(self, texts):
            sums, n = stream(texts)
            if 237 in texts:
                sums["k"][0, 0] = float("nan")
            return sums, n

        def first_bad(self, texts):
            return texts.index(237)
    with pytest.raises(FloatingPointError, match="text 237 of the sample"):
        stream_sums(Broken(), list(range(4 * CHUNK)), ["k"], progress=False)


def test_progress_bar_shows_tokens_per_second_and_the_convergence_figure(capsys):
    stream = GaussianStream()
    res = stream_sums(stream, list(range(8 * CHUNK)), ["k"], tracker=ConvergenceTracker(stream.probes, 1e-9),
                      progress=True, desc="stats k")
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]  # the bar's final state
    assert bar.startswith("stats k: 100%") and f"{8 * CHUNK}/{8 * CHUNK}" in bar
    assert " tok/s, Δ(C⁻¹k) " in bar
    assert f"Δ(C⁻¹k) {res.curve[-1]['max_change']:.3g}" in bar  # the last doubling's change
