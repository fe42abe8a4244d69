import pytest
import torch
import torch.nn as nn

from models import MultiHeadAttention


@pytest.mark.parametrize("B,N", [(1, 1), (2, 7), (3, 64), (5, 256)])
def test_matches_torch_multihead_attention(B, N):
    torch.manual_seed(B * 1000 + N)
    dim, heads = 96, 16
    ours = MultiHeadAttention(dim, heads, attn_drop=0.0).eval()
    ref = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.2)
        ref.in_proj_weight.copy_(ours.qkv.weight)  # rows [q; k; v]
        ref.in_proj_bias.copy_(ours.qkv.bias)
        ref.out_proj.weight.copy_(ours.proj.weight)
        ref.out_proj.bias.copy_(ours.proj.bias)
    x = torch.randn(B, N, dim)
    out, attn = ours(x, return_attention=True)
    ref_out, ref_attn = ref(x, x, x, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn, ref_attn, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn.sum(-1), torch.ones(B, heads, N), atol=1e-5, rtol=0)


@pytest.mark.gpu
def test_cuda_bf16_autocast_keeps_maps_in_bf16_and_matches_fp64():
    """CUDA autocast would write the softmax in fp32; ours keeps the maps in the matmul's dtype
    (half the bytes and the memory kept for backward) and they agree with a float64 softmax of the
    same bf16 scores to bf16 rounding."""
    torch.manual_seed(0)
    m = MultiHeadAttention(96, 16, attn_drop=0.0).cuda().eval()
    x = torch.randn(2, 64, 96, device="cuda")
    with torch.autocast("cuda", torch.bfloat16):
        out, attn = m(x, return_attention=True)
        q, k, _ = m.qkv(x).view(2, 64, 3, 16, 6).permute(2, 0, 3, 1, 4).unbind(0)
        scores = (q * m.scale) @ k.transpose(-2, -1)
    assert attn.dtype == torch.bfloat16 and scores.dtype == torch.bfloat16
    torch.testing.assert_close(attn.double(), torch.softmax(scores.double(), dim=-1), atol=4e-3, rtol=8e-3)
    torch.testing.assert_close(out.float(), m(x), atol=0.05, rtol=0.05)  # the block stays near fp32
    out.float().sum().backward()  # backward through the bf16 maps
    assert torch.isfinite(m.qkv.weight.grad).all()


def test_lab_size_layout_and_dropout_active_in_train():
    m = MultiHeadAttention(768, 16, attn_drop=0.1)
    assert m.qkv.weight.shape == (2304, 768) and m.proj.weight.shape == (768, 768) and m.head_dim == 48
    x = torch.randn(2, 16, 768)
    m.train()
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(1)
    b = m(x)
    assert not torch.allclose(a, b)  # dropout on the attention weights
    m.eval()
    assert torch.equal(m(x), m(x))


def test_no_ready_made_attention_in_model_code():
    import inspect

    import models.Transformer.modules.layers as layers
    src = inspect.getsource(layers)
    assert "scaled_dot_product_attention" not in src and "nn.MultiheadAttention" not in src
