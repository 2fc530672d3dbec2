"""torch.ops.turboattn.attention: the operator against the function, under torch.compile, on the CPU
and (where present) the GPU."""
import pytest

torch = pytest.importorskip("torch")
import turboattn  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and turboattn.cuda_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_operator_matches_function_and_compiles(device):
    q, k, v = (torch.randn(2, 200, h, 128, dtype=torch.float16, device=device) for h in (8, 2, 2))
    op = torch.ops.turboattn.attention(q, k, v, True)
    fn = turboattn.attention(q, k, v, causal=True)
    assert torch.equal(op, fn)
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float().repeat_interleave(4, 1),
                                                           v.transpose(1, 2).float().repeat_interleave(4, 1), is_causal=True)
    assert ((op.transpose(1, 2).float() - ref).norm() / ref.norm()).item() < 0.02
    compiled = torch.compile(lambda a, b, c: torch.ops.turboattn.attention(a, b, c, True) * 2, fullgraph=True)
    assert torch.equal(compiled(q, k, v), op * 2)


@pytest.mark.parametrize("device", DEVICES)
def test_operator_errors_name_the_argument(device):
    q = torch.randn(1, 8, 2, 80, dtype=torch.float16, device=device)
    with pytest.raises(NotImplementedError, match="head dim 80"):
        torch.ops.turboattn.attention(q, q, q)
