"""Compiled tracing kernels against their plain-PyTorch references, on fresh random inputs."""
import pytest
import torch

from rome_fast import _ext, ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]

needs_cpu_ext = pytest.mark.skipif(not _ext.cpu_ext_available(), reason="compiled core not built")


def _noise_case(device, dtype, replace):
    B, T, D, N, L = 7, 9, 33, 5, 3
    x = torch.randn(B, T, D, device=device).to(dtype)
    noise = torch.randn(N, L, D, device=device)
    rows = torch.randint(0, B, (N,), device=device)
    lengths = torch.randint(0, L + 1, (N,), device=device)
    starts = torch.stack([torch.randint(0, T - int(l) + 1, ()) for l in lengths.cpu()]).to(device)
    want = ops.add_noise_ref(x.clone(), noise, rows, starts, lengths, replace)
    return x, noise, rows, starts, lengths, want


@needs_cpu_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("replace", [False, True])
def test_add_noise_matches_reference(device, dtype, replace):
    # distinct rows so the reference's sequential order cannot matter
    x, noise, rows, starts, lengths, want = _noise_case(device, dtype, replace)
    rows = torch.randperm(x.shape[0], device=device)[: noise.shape[0]]
    want = ops.add_noise_ref(x.clone(), noise, rows, starts, lengths, replace)
    got = x.clone()
    torch.ops.rome_fast.add_noise_(got, noise, rows, starts, lengths, replace)
    assert (want != x).any()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_cpu_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_facts", [1, 3])
def test_restore_rows_matches_reference(device, dtype, n_facts):
    B, T, D = 11, 8, 40
    x = torch.randn(B, T, D, device=device).to(dtype)
    clean = torch.randn(n_facts, T, D, device=device).to(dtype)
    row_fact = torch.randint(0, n_facts, (B,), device=device)
    row_tok = torch.randint(-1, T, (B,), device=device)
    row_tok[0] = -1
    row_tok[1] = T - 1
    want = ops.restore_rows_ref(x.clone(), clean, row_fact, row_tok)
    got = x.clone()
    torch.ops.rome_fast.restore_rows_(got, clean, row_fact, row_tok)
    assert not torch.equal(want, x)
    assert torch.equal(got[0], x[0])  # a row with token -1 is untouched
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_wrappers_accept_lists_and_2d_clean():
    x = torch.randn(3, 4, 5)
    clean = torch.randn(4, 5)
    got = ops.restore_rows_(x.clone(), clean, 0, [2, -1, 0])
    assert torch.equal(got[0, 2], clean[2]) and torch.equal(got[1], x[1]) and torch.equal(got[2, 0], clean[0])
    noise = torch.randn(2, 5)
    got = ops.add_noise_(x.clone(), noise, rows=[1], starts=[1])
    torch.testing.assert_close(got[1, 1:3], x[1, 1:3] + noise)
    assert torch.equal(got[0], x[0])


@needs_cpu_ext
def test_bad_input_is_a_clear_error():
    x = torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match="row_tok values must lie in"):
        torch.ops.rome_fast.restore_rows_(x, torch.randn(1, 4, 5), torch.zeros(2, dtype=torch.long),
                              torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="clean width"):
        torch.ops.rome_fast.restore_rows_(x, torch.randn(1, 4, 6), torch.zeros(2, dtype=torch.long),
                              torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="must be 3-D"):
        torch.ops.rome_fast.restore_rows_(x[0], torch.randn(1, 4, 5), torch.zeros(2, dtype=torch.long),
                              torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="runs past the sequence length"):
        torch.ops.rome_fast.add_noise_(x, torch.randn(1, 3, 5), torch.tensor([0]), torch.tensor([2]),
                           torch.tensor([3]), False)
    with pytest.raises(ValueError, match="int64"):
        torch.ops.rome_fast.restore_rows_(x, torch.randn(1, 4, 5), torch.zeros(2, dtype=torch.int32),
                              torch.zeros(2, dtype=torch.long))


def test_backend_info_reports_build():
    info = _ext.backend_info()
    for key in ("cpu_ext", "cuda_ext", "torch", "torch_cuda"):
        assert key in info
    assert isinstance(info["cpu_ext"], bool) and isinstance(info["cuda_ext"], bool)
    if not info["cuda_ext"]:
        assert info.get("why"), "a missing CUDA core must say why"


@needs_cpu_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cos_batch", [1, 4])
def test_rope_heads_matches_reference(device, dtype, cos_batch):
    B, T, H, hd = 4, 7, 3, 16
    x = torch.randn(B, T, H * hd, device=device).to(dtype)
    angle = torch.randn(cos_batch, T, hd, device=device)
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    want = ops.rope_heads_ref(x, cos, sin, H)
    got = torch.ops.rome_fast.rope_heads(x, cos, sin, H)
    assert got.shape == (B, H, T, hd) and got.is_contiguous()
    # the same roundings; CUDA may contract a multiply-add (one rounding fewer)
    tol = 0 if device == "cpu" else (1e-6 if dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@needs_cpu_ext
def test_rope_heads_bad_input_is_a_clear_error():
    x = torch.randn(2, 5, 12)
    cos = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="multiple of 5 heads"):
        torch.ops.rome_fast.rope_heads(x, cos, cos, 5)
    with pytest.raises(ValueError, match="cos/sin must be"):
        torch.ops.rome_fast.rope_heads(x, cos[:, :3], cos[:, :3], 3)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        torch.ops.rome_fast.rope_heads(x, cos.double(), cos.double(), 3)
    with pytest.raises(ValueError, match="dtype"):
        torch.ops.rome_fast.rope_heads(x, cos.half(), cos.half(), 3)
