import math

import pytest
import torch
import torch.nn.functional as F

from models import BidirectionalTransformer, MaskGit
from utils.build import build_maskgit
from utils.config import ConfigError, load_maskgit_config


def test_exact_masked_counts_per_sample(tiny_cfg):
    model = build_maskgit(tiny_cfg, load_vqgan=False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32, (64, 16))
    inputs, mask = model.mask_tokens(ids, generator=g)
    # replay the generator: first the ratios, then the scores
    g2 = torch.Generator().manual_seed(0)
    r = torch.rand(64, generator=g2, dtype=torch.float32).double()
    expected = torch.ceil(torch.cos(r * math.pi / 2) * 16).long().clamp(1, 16)
    assert torch.equal(mask.sum(1), expected)
    assert (inputs[mask] == 32).all() and torch.equal(inputs[~mask], ids[~mask])


def test_region_masking_confined_with_exact_counts(tiny_cfg):
    model = build_maskgit(tiny_cfg, load_vqgan=False)
    region = torch.rand(64, 16, generator=torch.Generator().manual_seed(5)) < 0.3
    region[:4] = False  # empty rows: masked anywhere, as without a region
    ids = torch.randint(0, 32, (64, 16))
    inputs, mask = model.mask_tokens(ids, torch.Generator().manual_seed(0), region)
    allowed = region.clone()
    allowed[:4] = True
    assert not (mask & ~allowed).any()  # nothing outside the hole is ever masked
    g2 = torch.Generator().manual_seed(0)
    r = torch.rand(64, generator=g2).double()
    size = allowed.sum(1)
    expected = torch.minimum(torch.ceil(torch.cos(r * math.pi / 2) * size).long().clamp(min=1), size)
    assert torch.equal(mask.sum(1), expected)
    assert (inputs[mask] == 32).all() and torch.equal(inputs[~mask], ids[~mask])
    # a region covering everything is the lab's MVTM, draw for draw
    full = model.mask_tokens(ids, torch.Generator().manual_seed(0), torch.ones(64, 16, dtype=torch.bool))
    plain = model.mask_tokens(ids, torch.Generator().manual_seed(0))
    assert torch.equal(full[1], plain[1])


@pytest.mark.parametrize("mode", ["log", "exp"])
def test_mvtm_counts_with_schedules_that_depend_on_n(tiny_cfg, mode):
    """log and exp take N = the tokens that may be masked: 16 without a region, the region's size with one."""
    tiny_cfg["model_param"]["gamma_type"] = mode
    model = build_maskgit(tiny_cfg, load_vqgan=False)
    region = torch.zeros(64, 16, dtype=torch.bool)
    for b in range(64):
        region[b, : 2 + b % 13] = True  # 2..14 tokens
    ids = torch.randint(0, 32, (64, 16))
    for reg, size in ((None, [16] * 64), (region, [2 + b % 13 for b in range(64)])):
        _, mask = model.mask_tokens(ids, torch.Generator().manual_seed(3), reg)
        r = torch.rand(64, generator=torch.Generator().manual_seed(3)).double().tolist()
        official = {"log": lambda a, n: -math.log2(a) / math.log2(n),
                    "exp": lambda a, n: 1 - 2 ** (-math.log2(n) * (1 - a))}[mode]
        expected = [min(max(1, math.ceil(min(max(official(a, n), 1e-6), 1.0) * n)), n) for a, n in zip(r, size)]
        assert mask.sum(1).tolist() == expected


def test_loss_ignores_unmasked_positions(tiny_cfg):
    model = build_maskgit(tiny_cfg, load_vqgan=False).eval()
    ids = torch.randint(0, 32, (4, 16))
    logits, targets = model.forward_tokens(ids, torch.Generator().manual_seed(1))
    masked = targets != -100
    assert torch.equal(targets[masked], ids[masked]) and masked.any() and (~masked).any()
    loss = model.loss(logits, targets)
    manual = F.cross_entropy(logits[masked], ids[masked])
    torch.testing.assert_close(loss, manual)
    # changing the logits of unmasked positions leaves the loss unchanged
    logits2 = logits.clone()
    logits2[~masked] = torch.randn_like(logits2[~masked]) * 100
    torch.testing.assert_close(model.loss(logits2, targets), loss)
    # the lab's own loss call (F.cross_entropy with its default ignore_index) agrees
    torch.testing.assert_close(F.cross_entropy(logits.view(-1, 33), targets.view(-1)), loss)


def test_forward_from_images_and_frozen_vqgan(tiny_cfg):
    model = build_maskgit(tiny_cfg, load_vqgan=False).train()
    assert not model.vqgan.training and not any(p.requires_grad for p in model.vqgan.parameters())
    logits, targets = model(torch.randn(2, 3, 16, 16))
    assert logits.shape == (2, 16, 33) and targets.shape == (2, 16)


def test_lab_transformer_layout():
    m = BidirectionalTransformer()
    sd = m.state_dict()
    assert sd["pos_emb"].shape == (256, 768) and sd["bias"].shape == (256, 1025)
    assert sd["tok_emb.weight"].shape == (1025, 768)
    assert sd["blocks.14.MLP.0.weight"].shape == (1536, 768) and sd["blocks.14.MLP.2.weight"].shape == (768, 1536)
    assert sd["Token_Prediction.0.weight"].shape == (768, 768) and "Token_Prediction.2.weight" in sd
    assert m.LN.eps == 1e-12 and m.blocks[0].LayerNorm1.eps == 1e-12 and m.Token_Prediction[2].eps == 1e-12
    assert m.blocks[0].MLP[1].approximate == "none"
    assert (sd["bias"] == 0).all()
    keys = {k.split(".Attention.")[1] for k in sd if ".Attention." in k}
    assert keys == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}


def test_lab_config_loads_and_checks_consistency(tmp_path):
    cfg = load_maskgit_config("config/MaskGit.yml")
    assert cfg["model_param"]["Transformer_param"]["dim"] == 768 and cfg["vqgan"]["latent_dim"] == 256
    cfg2 = load_maskgit_config("config/MaskGit.yml", ["model_param.Transformer_param.n_layers=2"])
    assert cfg2["model_param"]["Transformer_param"]["n_layers"] == 2
    with pytest.raises(ConfigError, match="no key"):
        load_maskgit_config("config/MaskGit.yml", ["model_param.Transformer_param.nlayers=2"])
    bad = dict(cfg2)
    bad["model_param"] = dict(cfg2["model_param"], num_codebook_vectors=512)
    with pytest.raises(ValueError, match="num_codebook_vectors"):
        MaskGit(bad["model_param"], bad["vqgan"])
    p = tmp_path / "x.yml"
    p.write_text("model_param:\n  VQ_Configs: {VQ_config_path: models/VQGAN/config/VQGAN.yml}\n  typo_key: 1\n")
    with pytest.raises(ValueError, match="typo_key"):
        build_maskgit(load_maskgit_config(str(p)), load_vqgan=False)
    with pytest.raises(FileNotFoundError, match="VQGAN checkpoint not found"):
        build_maskgit(load_maskgit_config("config/MaskGit.yml", ["model_param.Transformer_param.n_layers=1"]),
                      vqgan_ckpt=str(tmp_path / "VQGAN.pt"))


def test_decoding_defaults_come_from_model_param_and_are_checked():
    from models import decoding_defaults
    lab = load_maskgit_config("config/MaskGit.yml")["model_param"]  # names no token choice: the lab's argmax
    assert decoding_defaults(lab) == {"token_choice": "argmax", "sample_temperature": 1.0}
    assert decoding_defaults({"token_choice": "sample", "sample_temperature": 2}) == {
        "token_choice": "sample", "sample_temperature": 2.0}
    for bad, match in (({"token_choice": "greedy"}, "token_choice must be one of argmax, sample, got 'greedy'"),
                       ({"sample_temperature": 0}, "sample_temperature must be a number > 0, got 0"),
                       ({"sample_temperature": -1.5}, "got -1.5"), ({"sample_temperature": "hot"}, "got 'hot'"),
                       ({"sample_temperature": True}, "got True"), ({"sample_temperature": math.inf}, "got inf")):
        with pytest.raises(ValueError, match=match):
            decoding_defaults(bad)
    with pytest.raises(ConfigError, match="token_choice must be one of"):  # as every model_param error: one line
        build_maskgit(load_maskgit_config("config/MaskGit.yml", ["model_param.token_choice=greedy"]), load_vqgan=False)


def test_token_choice_options_take_what_is_given_and_the_rest_from_the_config():
    from utils.inpaint import token_choice_options
    sampled, greedy = {"token_choice": "sample", "sample_temperature": 0.5}, {"token_choice": "argmax",
                                                                              "sample_temperature": 1.0}
    assert token_choice_options(sampled) == sampled
    assert token_choice_options(sampled, "argmax") == greedy  # the temperature of argmax is never used: 1
    assert token_choice_options(sampled, None, 0.8) == {"token_choice": "sample", "sample_temperature": 0.8}
    assert token_choice_options(sampled, "sample", 2.0) == {"token_choice": "sample", "sample_temperature": 2.0}
    assert token_choice_options(greedy) == greedy
    assert token_choice_options(greedy, "sample") == {"token_choice": "sample", "sample_temperature": 1.0}
    assert token_choice_options(dict(greedy, sample_temperature=0.6), "sample")["sample_temperature"] == 0.6
    with pytest.raises(ValueError, match=r"the choice is 'argmax' \(the model config's\)"):
        token_choice_options(greedy, None, 0.8)
    with pytest.raises(ValueError, match="the choice is 'argmax'$"):
        token_choice_options(sampled, "argmax", 0.8)
