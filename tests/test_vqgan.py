import os

import pytest
import torch

from conftest import ROOT, SPEC, TINY_VQ
from models import VQGAN, VQGANConfig
from utils.build import load_vqgan_weights
from utils.config import load_vqgan_config


def test_lab_config_matches_spec_key_for_key():
    cfg = load_vqgan_config(os.path.join(ROOT, "models", "VQGAN", "config", "VQGAN.yml"))
    sd = VQGAN(cfg).state_dict()
    assert sum(v.numel() for v in sd.values()) == 70_775_299  # the lab's VQGAN.pt
    ours = [f"{k} {tuple(v.shape)}" for k, v in sd.items()]
    spec = os.path.join(SPEC, "vqgan_state_dict_keys.txt")
    if not os.path.exists(spec):
        pytest.skip(f"state-dict key list not found at {spec}")
    with open(spec) as f:
        ref = f.read().split("\n")
    ref = [line for line in ref if line.strip()]
    assert ours == ref
    assert len(ours) == 315
    assert sum(v.numel() for v in sd.values()) == 70_775_299
    assert not list(VQGAN(cfg).buffers())


def test_random_state_dict_roundtrip_strict(tmp_path):
    torch.manual_seed(0)
    a, b = VQGAN(TINY_VQ), VQGAN(TINY_VQ)
    for p in a.parameters():
        p.data.normal_()
    path = tmp_path / "VQGAN.pt"
    torch.save(a.state_dict(), path)  # a plain fp32 state_dict, as the lab ships
    load_vqgan_weights(b, str(path))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(a(x)[0], b(x)[0])


def test_encode_contract_raster_order_and_nearest_code():
    torch.manual_seed(1)
    m = VQGAN(TINY_VQ).eval()
    x = torch.randn(3, 3, 16, 16)
    z_q, idx, loss = m.encode(x)
    assert z_q.shape == (3, 8, 4, 4) and idx.shape == (3 * 16,) and idx.dtype == torch.int64
    z = m.quant_conv(m.encoder(x))  # (B, D, h, w)
    e = m.codebook.embedding.weight
    for b, i, j in [(0, 0, 0), (1, 2, 3), (2, 3, 1)]:
        d = ((z[b, :, i, j][None] - e) ** 2).sum(1)
        assert idx[b * 16 + i * 4 + j] == d.argmin()
    # token ids decode through the embedding, reshaped (B,h,w,D) -> (B,D,h,w)
    zq_ids = e[idx].view(3, 4, 4, 8).permute(0, 3, 1, 2)
    torch.testing.assert_close(zq_ids, z_q)
    # z_q is z + (e - z) (straight-through): equal to e up to float32 rounding, amplified by the decoder
    torch.testing.assert_close(m.decode_indices(idx.view(3, 16)), m.decode(z_q), atol=1e-4, rtol=1e-4)
    assert torch.isfinite(loss)


def test_small_config_other_shapes():
    cfg = VQGANConfig(enc_channels=[32, 64, 128], dec_channels=[32, 64, 128], latent_dim=64, enc_num_res_blocks=1,
                      dec_num_res_blocks=1)
    m = VQGAN(cfg)
    z_q, idx, _ = m.encode(torch.randn(1, 3, 64, 64))
    assert z_q.shape == (1, 64, 16, 16) and idx.shape == (256,)
    assert m.decode(z_q).shape == (1, 3, 64, 64)


def test_wrong_checkpoint_names_the_problem(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"encoder.model.0.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="missing"):
        load_vqgan_weights(VQGAN(TINY_VQ), str(path))
    with pytest.raises(FileNotFoundError, match="VQGAN checkpoint not found"):
        load_vqgan_weights(VQGAN(TINY_VQ), str(tmp_path / "nope.pt"))


def _groupnorm_closed_form(gn, x):
    g = x.view(x.shape[0], gn.gn.num_groups, -1).double()  # per sample and group of channels
    y = ((g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-6)).view_as(x)
    return y * gn.gn.weight.double().view(1, -1, 1, 1) + gn.gn.bias.double().view(1, -1, 1, 1)


def _random_groupnorm(c):
    from models.VQGAN.vqgan import GroupNorm
    gn = GroupNorm(c)
    with torch.no_grad():
        gn.gn.weight.normal_()
        gn.gn.bias.normal_()
    return gn


def test_groupnorm_and_swish_match_closed_forms():
    from models.VQGAN.vqgan import Swish
    torch.manual_seed(0)
    x = torch.randn(3, 64, 8, 8) * 3 + 1
    assert torch.allclose(Swish()(x), x * torch.sigmoid(x), atol=1e-6)
    gn = _random_groupnorm(64)
    torch.testing.assert_close(gn(x).double(), _groupnorm_closed_form(gn, x), atol=1e-5, rtol=1e-5)


def test_norm_group_channels_sets_the_groups_and_keeps_the_layout():
    """norm_group_channels N: every GroupNorm has >= N channels per group (halving the lab rule's
    groups), the lab's channel widths keep their 32 groups, the state_dict layout does not change,
    and the norm computes the closed form of its groups: 1 channel per group is an instance norm."""
    import torch.nn.functional as F
    from models.VQGAN.vqgan import GroupNorm, _groups
    for c in (128, 256, 512):  # the lab's widths: 32 groups whatever N <= 4
        assert _groups(c) == _groups(c, 4) == 32
    assert [_groups(c) for c in (16, 24, 32, 64)] == [16, 8, 32, 32]  # the lab's rule (N = 1), unchanged
    assert [_groups(c, 4) for c in (16, 24, 32, 64)] == [4, 4, 8, 16]
    assert [_groups(c, 3) for c in (16, 24, 48)] == [4, 8, 16]  # powers of two that divide C
    small = load_vqgan_config(os.path.join(ROOT, "models", "VQGAN", "config", "VQGAN_small.yml")).to_dict()
    one = VQGAN(small)
    four = VQGAN({**small, "enc_norm_group_channels": 4, "dec_norm_group_channels": 4})
    assert {k: v.shape for k, v in one.state_dict().items()} == {k: v.shape for k, v in four.state_dict().items()}
    per_group = {m.gn.num_channels // m.gn.num_groups for m in four.modules() if isinstance(m, GroupNorm)}
    assert min(per_group) == 4 and min(m.gn.num_channels // m.gn.num_groups
                                       for m in one.modules() if isinstance(m, GroupNorm)) == 1
    torch.manual_seed(0)
    x = torch.randn(2, 32, 8, 8) * 3 + 1
    inst = GroupNorm(32)  # 32 channels, N = 1: one channel per group
    torch.testing.assert_close(inst(x), F.instance_norm(x, eps=1e-6), atol=1e-5, rtol=1e-5)
    gn = GroupNorm(32, 4)
    with torch.no_grad():
        gn.gn.weight.normal_()
        gn.gn.bias.normal_()
    assert gn.gn.num_groups == 8
    torch.testing.assert_close(gn(x).double(), _groupnorm_closed_form(gn, x), atol=1e-5, rtol=1e-5)
    for k in ("enc_norm_group_channels", "dec_norm_group_channels"):
        with pytest.raises(ValueError, match=f"{k} must be >= 1"):
            VQGANConfig(**{k: 0})
    dec_only = VQGAN({**small, "dec_norm_group_channels": 4})  # the encoder keeps the lab's rule
    assert [m.gn.num_groups for m in dec_only.encoder.modules() if isinstance(m, GroupNorm)] == \
        [m.gn.num_groups for m in one.encoder.modules() if isinstance(m, GroupNorm)]
    assert [m.gn.num_groups for m in dec_only.decoder.modules() if isinstance(m, GroupNorm)] == \
        [m.gn.num_groups for m in four.decoder.modules() if isinstance(m, GroupNorm)]


def test_a_tokenizer_file_from_before_norm_group_channels_reads_as_its_default(tmp_path):
    """A vqgan.pt written before the keys existed stores no *_norm_group_channels: it reads back with
    the default (the behaviour it was trained with), equal to the same YAML's config today, so the
    transformer's trainer sees no difference to report. A file whose stored config differs in a key
    that keeps the layout (the norm groups, codebook_norm) is refused by a tokenizer built otherwise."""
    from utils.build import tokenizer_file_config
    from utils.checkpoint import lab_state_dict
    small = load_vqgan_config(os.path.join(ROOT, "models", "VQGAN", "config", "VQGAN_small.yml")).to_dict()
    old = {k: v for k, v in small.items() if not k.endswith("norm_group_channels")}
    torch.save(lab_state_dict(VQGAN(small), old), tmp_path / "vqgan.pt")
    assert tokenizer_file_config(str(tmp_path / "vqgan.pt")) == small and small["dec_norm_group_channels"] == 1
    new = {**small, "dec_norm_group_channels": 4}
    torch.save(lab_state_dict(VQGAN(new), new), tmp_path / "vqgan4.pt")
    assert tokenizer_file_config(str(tmp_path / "vqgan4.pt")) == new
    # the same layout, another computation: loading it into the YAML's tokenizer is refused, naming the key
    assert load_vqgan_weights(VQGAN(new), str(tmp_path / "vqgan4.pt")) == []
    assert load_vqgan_weights(VQGAN(small), str(tmp_path / "vqgan.pt")) == []
    changed = load_vqgan_weights(VQGAN(small), str(tmp_path / "vqgan4.pt"), may_differ=("dec_norm_group_channels",))
    assert changed == [f"dec_norm_group_channels: 4 in {tmp_path / 'vqgan4.pt'}, 1 here"]  # on purpose: said, not refused
    from models.convert import CheckpointLayoutError
    with pytest.raises(CheckpointLayoutError, match=r"vqgan4.pt was trained with .*dec_norm_group_channels \(4 in the file, 1 here\)"):
        load_vqgan_weights(VQGAN(small), str(tmp_path / "vqgan4.pt"))
    cos = {**small, "codebook_norm": True}
    torch.save(lab_state_dict(VQGAN(cos), cos), tmp_path / "vqgan_cos.pt")
    with pytest.raises(CheckpointLayoutError, match=r"codebook_norm \(True in the file, False here\)"):
        load_vqgan_weights(VQGAN(small), str(tmp_path / "vqgan_cos.pt"))
    torch.save(dict(VQGAN(new).state_dict()), tmp_path / "bare.pt")  # no stored config (the lab's VQGAN.pt): trusted
    load_vqgan_weights(VQGAN(small), str(tmp_path / "bare.pt"))


@pytest.mark.gpu
def test_cuda_bf16_groupnorm_stays_in_activation_dtype():
    """CUDA autocast would run GroupNorm in fp32 and hand fp32 on; ours stays bf16, near the closed form."""
    torch.manual_seed(0)
    x = (torch.randn(3, 64, 8, 8) * 3 + 1).cuda()
    gn = _random_groupnorm(64).cuda()
    with torch.autocast("cuda", torch.bfloat16):
        y = gn(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), _groupnorm_closed_form(gn, x), atol=0.05, rtol=0.02)


def test_one_path_from_images_to_tokens(tiny_cfg):
    """encode_indices (token cache, inpainting) names the same codes as the lab's encode, and
    MaskGit.encode_to_z returns the z_q of those codes."""
    from models import MaskGit
    from utils.tokens import encode_images
    torch.manual_seed(0)
    model = MaskGit(tiny_cfg["model_param"], tiny_cfg["vqgan"]).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        z_q, idx, _ = model.vqgan.encode(x)
        ids = model.vqgan.encode_indices(x)
        z_q2, ids2 = model.encode_to_z(x)
    assert ids.shape == (3, 16) and torch.equal(ids.flatten(), idx)
    assert torch.equal(ids2, ids) and torch.allclose(z_q2, z_q, atol=1e-6)
    u8 = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    from utils.data import uint8_to_normalized
    with torch.no_grad():
        ref = model.vqgan.encode(uint8_to_normalized(u8))[1].view(3, -1)
    assert torch.equal(encode_images(model.vqgan, u8, "cpu", progress=False).long(), ref)
