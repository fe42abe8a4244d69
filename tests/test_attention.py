"""The hand-written attention (the lab's reference) against torch.nn.MultiheadAttention, and the
opt-in fused path (F.scaled_dot_product_attention) pinned to it: equal in eval, same dropout rate
and same expected output in training, never called unless asked for."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import TINY_T
from models import BidirectionalTransformer, MultiHeadAttention, TransformerConfig


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
        scores = (q @ k.transpose(-2, -1)) * m.scale
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


def _pair(dim, heads, p=0.0, seed=0):
    """A hand-written and a fused attention with the same random weights, large enough for peaked
    (not near-uniform) attention maps at every width."""
    torch.manual_seed(seed)
    ref = MultiHeadAttention(dim, heads, attn_drop=p)
    with torch.no_grad():
        for w in ref.parameters():
            w.normal_(0, 2 * dim ** -0.5)
    fused = MultiHeadAttention(dim, heads, attn_drop=p, fused_attn=True)
    fused.load_state_dict(ref.state_dict())  # same parameter names: a checkpoint serves both paths
    return ref, fused


@pytest.mark.parametrize("B,N,dim,heads", [(1, 1, 32, 4), (2, 7, 96, 16), (3, 64, 64, 2), (2, 256, 768, 16)])
def test_fused_equals_hand_written_in_eval(B, N, dim, heads):
    ref, fused = _pair(dim, heads, p=0.1, seed=B * 1000 + N)  # dropout must be off in eval on both paths
    ref.eval(), fused.eval()
    x = torch.randn(B, N, dim, requires_grad=True)
    out_ref, out_fused = ref(x), fused(x)
    torch.testing.assert_close(out_fused, out_ref, atol=1e-5, rtol=1e-5)
    # backward too: the gradients the fused path trains with are those of the reference
    g = torch.randn_like(out_ref)
    grads_ref = torch.autograd.grad(out_ref, [x, *ref.parameters()], g)
    grads_fused = torch.autograd.grad(out_fused, [x, *fused.parameters()], g)
    for a, b in zip(grads_fused, grads_ref):  # sums over B*N: compare in norm, relative
        assert (a - b).norm() <= 1e-5 * b.norm()
    # return_attention needs the weights, so it takes the hand-written path on a fused module too
    out_w, attn = fused(x, return_attention=True)
    torch.testing.assert_close(out_w, out_ref, atol=1e-5, rtol=1e-5)
    assert attn.shape == (B, heads, N, N)


@pytest.mark.gpu
@pytest.mark.parametrize("B,N,dim,heads", [(2, 64, 96, 16), (4, 256, 768, 16)])
def test_cuda_bf16_fused_equals_hand_written(B, N, dim, heads):
    ref, fused = _pair(dim, heads, seed=N)
    ref.cuda().eval(), fused.cuda().eval()
    x = torch.randn(B, N, dim, device="cuda")
    with torch.no_grad():
        exact = ref(x)  # fp32
        with torch.autocast("cuda", torch.bfloat16):
            out_ref, out_fused = ref(x), fused(x)
    assert out_ref.dtype == out_fused.dtype == torch.bfloat16
    scale = exact.abs().max().item()
    for out in (out_ref, out_fused):  # each path within bf16 rounding of the fp32 reference
        torch.testing.assert_close(out.float(), exact, atol=2e-2 * scale, rtol=2e-2)
    torch.testing.assert_close(out_fused.float(), out_ref.float(), atol=2e-2 * scale, rtol=2e-2)


def _probe(p, fused, heads=4, head_dim=32, device="cpu"):
    """An attention whose output IS its attention weights after dropout: q = k = 0 gives uniform
    weights 1/N; v = x and proj = identity; the input x[b, j, h*D + d] = (j == d) with N = D tokens
    makes v one-hot per head, so out[b, i, h*D + j] = dropout(attn)[b, h, i, j]."""
    dim = heads * head_dim
    m = MultiHeadAttention(dim, heads, attn_drop=p, fused_attn=fused).to(device).train()
    with torch.no_grad():
        m.qkv.weight.zero_()
        m.qkv.bias.zero_()
        m.qkv.weight[2 * dim:].copy_(torch.eye(dim))  # rows [q; k; v]: v = x
        m.proj.weight.copy_(torch.eye(dim))
        m.proj.bias.zero_()
    x = torch.eye(head_dim, device=device).repeat(1, heads)  # (N, H*D), N = D
    return m, x.expand(8, head_dim, dim)  # (B, N, C)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_rate_on_attention_weights(p, fused, device):
    """Both paths drop each attention weight with probability p and scale the kept ones by
    1/(1-p) (8*4*32*32 = 32768 weights: the zero fraction is within 0.01 of p at > 4 sigma)."""
    m, x = _probe(p, fused, device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        dropped = m(x)  # (B, N, H*D): the dropped attention weights
    n = x.shape[1]
    zero = dropped == 0
    assert abs(zero.float().mean().item() - p) < 0.01
    torch.testing.assert_close(dropped[~zero], torch.full_like(dropped[~zero], 1 / (n * (1 - p))))
    m.eval()
    torch.testing.assert_close(m(x), torch.full_like(dropped, 1 / n))  # the probe itself: uniform weights


def test_hand_written_dropout_acts_on_the_softmax_weights():
    """With random weights: the Dropout module sees the softmax maps (rows sum to 1), zeroes a
    fraction p of them and scales the rest by 1/(1-p)."""
    torch.manual_seed(0)
    m = MultiHeadAttention(64, 4, attn_drop=0.1).train()
    seen = {}
    m.attn_drop.register_forward_hook(lambda mod, inp, out: seen.update(attn=inp[0], dropped=out))
    m(torch.randn(8, 32, 64))
    attn, dropped = seen["attn"], seen["dropped"]
    assert attn.shape == (8, 4, 32, 32)
    torch.testing.assert_close(attn.sum(-1), torch.ones(8, 4, 32))
    zero = dropped == 0
    assert abs(zero.float().mean().item() - 0.1) < 0.01
    torch.testing.assert_close(dropped[~zero], attn[~zero] / 0.9)


def test_training_mode_same_expected_output_and_spread():
    """Random weights, 2000 training-mode copies of one input per path (one batch: independent
    dropout masks per copy). Dropout is unbiased, so each path's mean converges to the eval output
    (within 5 standard errors; a missing or wrong 1/(1-p) is off by ~10%), and the spread around
    it, which grows like p/(1-p), is the same for both (the p=0.5 spread is ~9x the p=0.1 one)."""
    S = 2000
    ref, fused = _pair(32, 4, p=0.1, seed=1)
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        expected = ref.eval()(x)
        torch.testing.assert_close(fused.eval()(x), expected, atol=1e-5, rtol=1e-5)
        ref.train(), fused.train()
        spread = {}
        for name, m in (("ref", ref), ("fused", fused)):
            torch.manual_seed(0)
            outs = m(x.repeat(S, 1, 1)).view(S, *x.shape)  # (S*B, N, C) -> (S, B, N, C)
            se = outs.std(0) / S ** 0.5
            assert ((outs.mean(0) - expected).abs() < 5 * se + 1e-6).all(), name
            spread[name] = outs.var(0).mean().item()
    assert 0.9 < spread["fused"] / spread["ref"] < 1.1


def _tiny(fused_attn):
    return BidirectionalTransformer(TransformerConfig(**TINY_T, fused_attn=fused_attn))


def test_transformer_fused_equals_hand_written_logits():
    torch.manual_seed(0)
    ref, fused = _tiny(False), _tiny(True)
    fused.load_state_dict(ref.state_dict())  # strict: the same checkpoint keys
    assert all(b.Attention.fused_attn for b in fused.blocks) and not any(b.Attention.fused_attn for b in ref.blocks)
    ids = torch.randint(0, TINY_T["num_codebook_vectors"] + 1, (3, TINY_T["num_image_tokens"]))
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(ids), ref.eval()(ids), atol=1e-5, rtol=1e-5)


def test_fused_attn_config_key(tiny_cfg):
    from utils.build import build_maskgit
    from utils.config import apply_overrides
    assert TransformerConfig().fused_attn is False  # off by default
    cfg = dict(tiny_cfg)
    cfg["model_param"] = dict(tiny_cfg["model_param"], Transformer_param=dict(TINY_T, fused_attn=False))
    on = apply_overrides(cfg, ["model_param.Transformer_param.fused_attn=true"])
    blocks = build_maskgit(on, load_vqgan=False).transformer.blocks
    assert all(b.Attention.fused_attn for b in blocks)
    with pytest.raises(ValueError, match="fused_attn"):
        TransformerConfig.from_dict(dict(TINY_T, fused_attn="yes"))


def test_ready_made_attention_only_on_the_opt_in_path(monkeypatch):
    """The lab's rule, checked by behaviour: with the default config the model trains and evaluates
    with F.scaled_dot_product_attention (and nn.MultiheadAttention's functional) made to raise; with
    fused_attn=True every layer calls it once per forward."""
    real, calls = F.scaled_dot_product_attention, []

    def forbidden(*args, **kwargs):
        raise AssertionError("ready-made attention called")

    monkeypatch.setattr(F, "scaled_dot_product_attention", forbidden)
    monkeypatch.setattr(F, "multi_head_attention_forward", forbidden)
    torch.manual_seed(0)
    ids = torch.randint(0, TINY_T["num_codebook_vectors"] + 1, (2, TINY_T["num_image_tokens"]))
    model = _tiny(False)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    model.train()(ids).sum().backward()
    with torch.no_grad():
        model.eval()(ids)
    with pytest.raises(AssertionError, match="ready-made attention called"):
        _tiny(True)(ids)

    def counting(*args, **kwargs):
        calls.append(kwargs.get("dropout_p"))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    fused = _tiny(True)
    fused.train()(ids)
    with torch.no_grad():
        fused.eval()(ids)
    assert calls == [0.1] * TINY_T["n_layers"] + [0.0] * TINY_T["n_layers"]


def _saved_shapes(fn):
    """Shapes of every tensor autograd saves for the backward pass while fn() runs."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, shapes


@pytest.mark.parametrize("B,N,dim,heads", [(2, 16, 64, 4), (3, 33, 96, 16)])
def test_recompute_attn_same_outputs_and_gradients_in_training(B, N, dim, heads):
    """recompute_attn=True: with dropout active, the same output and the same gradients (input and
    every parameter) as the default path for the same RNG state; the replayed dropout mask is the
    one of the forward pass (a different mask would change the gradients)."""
    torch.manual_seed(0)
    ref = MultiHeadAttention(dim, heads, attn_drop=0.3).train()
    rec = MultiHeadAttention(dim, heads, attn_drop=0.3, recompute_attn=True).train()
    rec.load_state_dict(ref.state_dict())
    x = torch.randn(B, N, dim, dtype=torch.float64)
    ref.double(), rec.double()
    outs, grads = [], []
    for m in (ref, rec):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(7)
        y = m(xi)
        torch.manual_seed(99)  # the recompute must not draw a fresh mask from the current RNG state
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-12, rtol=1e-12)
    for g_rec, g_ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_rec, g_ref, atol=1e-12, rtol=1e-12)
    with torch.no_grad():  # dropout was active in the compared runs: without it the output differs
        assert not torch.allclose(ref.eval()(x), outs[0])


def test_recompute_attn_keeps_no_attention_maps_for_backward():
    """What the option is for: the default path saves (B, H, N, N) tensors for the backward pass
    (the weights and the dropout mask); with recompute_attn none of that shape is saved."""
    B, N, dim, heads = 2, 24, 32, 4
    x = torch.randn(B, N, dim, requires_grad=True)
    for recompute, expect_maps in ((False, True), (True, False)):
        m = MultiHeadAttention(dim, heads, attn_drop=0.1, recompute_attn=recompute).train()
        _, shapes = _saved_shapes(lambda: m(x))
        assert ((B, heads, N, N) in shapes) == expect_maps, (recompute, shapes)
        assert shapes  # the rest of the layer still saves its inputs


def test_recompute_attn_inactive_without_gradients_and_for_return_attention():
    """In eval / no_grad the layer computes as before (nothing to keep), and return_attention still
    returns the weights."""
    torch.manual_seed(0)
    m = MultiHeadAttention(32, 4, attn_drop=0.1, recompute_attn=True).eval()
    ref = MultiHeadAttention(32, 4, attn_drop=0.1).eval()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x), atol=0, rtol=0)
    out, attn = m(x, return_attention=True)
    assert attn.shape == (2, 4, 10, 10)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4, 10), atol=1e-6, rtol=0)


def test_recompute_attn_config_key_and_transformer_gradients(tiny_cfg):
    """The YAML key reaches every layer; a whole transformer trained one step with it gets the
    gradients of the default one (same seed, dropout on)."""
    from utils.build import build_maskgit
    from utils.config import apply_overrides
    assert TransformerConfig().recompute_attn is False  # off by default
    cfg = dict(tiny_cfg)
    cfg["model_param"] = dict(tiny_cfg["model_param"], Transformer_param=dict(TINY_T, recompute_attn=False))
    on = apply_overrides(cfg, ["model_param.Transformer_param.recompute_attn=true"])
    assert all(b.Attention.recompute_attn for b in build_maskgit(on, load_vqgan=False).transformer.blocks)
    torch.manual_seed(0)
    ref = BidirectionalTransformer(TransformerConfig(**TINY_T)).train()
    rec = BidirectionalTransformer(TransformerConfig(**TINY_T, recompute_attn=True)).train()
    rec.load_state_dict(ref.state_dict())
    ids = torch.randint(0, TINY_T["num_codebook_vectors"] + 1, (3, TINY_T["num_image_tokens"]))
    for m in (ref, rec):
        torch.manual_seed(5)
        torch.nn.functional.cross_entropy(m(ids).flatten(0, 1), ids.flatten()).backward()
    for (name, p_ref), p_rec in zip(ref.named_parameters(), rec.parameters()):
        torch.testing.assert_close(p_rec.grad, p_ref.grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.gpu
def test_cuda_bf16_recompute_attn_same_gradients_less_memory():
    """On CUDA under bf16 autocast (the trainer's setup), a stack of 6 layers: the same gradients as
    the default path for the same CUDA RNG state (dropout on), and a lower peak memory for the forward
    + backward (the default keeps six layers' maps; recomputing holds one layer's at a time)."""
    torch.manual_seed(0)
    B, N, dim, heads, depth = 16, 256, 384, 8, 6
    ref = nn.Sequential(*[MultiHeadAttention(dim, heads, attn_drop=0.1) for _ in range(depth)]).cuda().train()
    rec = nn.Sequential(*[MultiHeadAttention(dim, heads, attn_drop=0.1, recompute_attn=True)
                          for _ in range(depth)]).cuda().train()
    rec.load_state_dict(ref.state_dict())
    x = torch.randn(B, N, dim, device="cuda")
    grads, peaks = [], []
    for m in (ref, rec):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.cuda.manual_seed(3)
        with torch.autocast("cuda", torch.bfloat16):
            y = m(x)
        y.float().square().mean().backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        grads.append([p.grad.clone() for p in m.parameters()])
        m.zero_grad(set_to_none=True)
    for g_rec, g_ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_rec, g_ref, atol=1e-3, rtol=1e-2)
    assert peaks[1] < 0.75 * peaks[0], peaks
