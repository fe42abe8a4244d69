import pytest
import torch

from conftest import TINY_T
from models import BidirectionalTransformer, CheckpointLayoutError, load_transformer_state


def _reference(zero_attn_bias: bool):
    torch.manual_seed(0)
    m = BidirectionalTransformer(TINY_T).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
        if zero_attn_bias:
            for blk in m.blocks:
                blk.Attention.qkv.bias.zero_()
                blk.Attention.proj.bias.zero_()
    return m


def _student(sd, qkv_name, out_name, separate=None, bias=True):
    """Rewrite our state_dict into a student layout."""
    out = {}
    for k, v in sd.items():
        if ".Attention." not in k:
            out[k] = v.clone()
            continue
        pre, rest = k.split(".Attention.")
        pre += ".Attention."
        layer, kind = rest.split(".")
        if kind == "bias" and not bias:
            continue
        if layer == "qkv":
            if separate:
                for name, part in zip(separate[:3], v.chunk(3, 0)):
                    out[pre + f"{name}.{kind}"] = part.clone()
            else:
                out[pre + f"{qkv_name}.{kind}"] = v.clone()
        else:
            out[pre + f"{(separate[3] if separate else out_name)}.{kind}"] = v.clone()
    return out


LAYOUTS = [
    ("qkv", "proj", None, True),
    ("to_qkv", "out", None, False),
    ("qkv_layer", "projection", None, True),
    ("qkv_proj", "out_proj", None, False),
    (None, None, ("W_q", "W_k", "W_v", "W_o"), True),
    (None, None, ("query", "key", "value", "proj"), False),
    (None, None, ("linear_q", "linear_k", "linear_v", "linear_out"), True),
    (None, None, ("q_proj", "k_proj", "v_proj", "out_proj"), True),
]
WRAPS = [lambda sd: sd, lambda sd: {"model": sd}, lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}},
         lambda sd: {"transformer": {"_orig_mod." + k: v for k, v in sd.items()}, "epoch": 3},
         lambda sd: {"module._orig_mod." + k: v for k, v in sd.items()}]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: l[0] or l[2][0])
@pytest.mark.parametrize("wrap", range(len(WRAPS)))
def test_student_layouts_give_identical_logits(layout, wrap):
    qkv, out, sep, bias = layout
    ref = _reference(zero_attn_bias=not bias)
    ckpt = WRAPS[wrap](_student(ref.state_dict(), qkv, out, sep, bias))
    torch.manual_seed(123)
    fresh = BidirectionalTransformer(TINY_T).eval()
    load_transformer_state(fresh, ckpt)
    ids = torch.randint(0, 33, (3, 16))
    assert torch.equal(fresh(ids), ref(ids))


def test_unknown_layout_lists_keys():
    sd = _reference(False).state_dict()
    sd = {k.replace("Attention.qkv", "Attention.mystery"): v for k, v in sd.items()}
    with pytest.raises(CheckpointLayoutError, match="mystery"):
        load_transformer_state(BidirectionalTransformer(TINY_T), sd)


def test_wrong_architecture_names_mismatch():
    big = dict(TINY_T, n_layers=3)
    sd = BidirectionalTransformer(big).state_dict()
    with pytest.raises(CheckpointLayoutError, match=r"unexpected keys .*blocks\.2"):
        load_transformer_state(BidirectionalTransformer(TINY_T), sd)
    wide = dict(TINY_T, dim=64, hidden_dim=64)
    with pytest.raises(CheckpointLayoutError, match="shape mismatches"):
        load_transformer_state(BidirectionalTransformer(TINY_T), BidirectionalTransformer(wide).state_dict())
