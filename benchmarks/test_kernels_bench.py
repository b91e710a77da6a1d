"""Micro-benchmarks of the tracing and block ops (restore, noise, rotary): the compiled op called
through the dispatcher (torch.ops.rome_fast) vs its plain-PyTorch reference (rome_fast.ops).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest benchmarks/test_kernels_bench.py \
        --benchmark-json benchmarks/results/kernels_cpu.json
"""
import pytest
import torch

from rome_fast import _ext, ops

B, T, D, F = 256, 16, 1600, 8


@pytest.fixture(scope="module")
def restore_case():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, D, generator=g)
    clean = torch.randn(F, T, D, generator=g)
    row_fact = torch.randint(0, F, (B,), generator=g)
    row_tok = torch.randint(-1, T, (B,), generator=g)
    return x, clean, row_fact, row_tok


@pytest.mark.benchmark(group="restore_rows")
@pytest.mark.skipif(not _ext.cpu_ext_available(), reason="compiled core not built")
def test_restore_rows_compiled(benchmark, restore_case):
    x, clean, row_fact, row_tok = restore_case
    benchmark(torch.ops.rome_fast.restore_rows_, x, clean, row_fact, row_tok)


@pytest.mark.benchmark(group="restore_rows")
def test_restore_rows_pytorch(benchmark, restore_case):
    x, clean, row_fact, row_tok = restore_case
    benchmark(ops.restore_rows_ref, x, clean, row_fact, row_tok)


@pytest.fixture(scope="module")
def noise_case():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, D, generator=g)
    noise = torch.randn(B, 4, D, generator=g)
    rows = torch.arange(B)
    starts = torch.randint(0, T - 4, (B,), generator=g)
    lengths = torch.full((B,), 4)
    return x, noise, rows, starts, lengths


@pytest.mark.benchmark(group="add_noise")
@pytest.mark.skipif(not _ext.cpu_ext_available(), reason="compiled core not built")
def test_add_noise_compiled(benchmark, noise_case):
    benchmark(torch.ops.rome_fast.add_noise_, *noise_case, False)


@pytest.mark.benchmark(group="add_noise")
def test_add_noise_pytorch(benchmark, noise_case):
    benchmark(ops.add_noise_ref, *noise_case, False)


@pytest.fixture(scope="module")
def rope_case():
    # SmolLM2's query projection for a chunk of engine rows: 9 heads of 64, [rows, tokens, 576]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, 6, 9 * 64, generator=g)
    angle = torch.randn(512, 6, 64, generator=g)
    return x, angle.cos(), angle.sin(), 9


@pytest.mark.benchmark(group="rope_heads")
@pytest.mark.skipif(not _ext.cpu_ext_available(), reason="compiled core not built")
def test_rope_heads_compiled(benchmark, rope_case):
    benchmark(torch.ops.rome_fast.rope_heads, *rope_case)


@pytest.mark.benchmark(group="rope_heads")
def test_rope_heads_pytorch(benchmark, rope_case):
    benchmark(ops.rope_heads_ref, *rope_case)
