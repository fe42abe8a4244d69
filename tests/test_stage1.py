import numpy as np
import pytest
import torch

import train_vqgan
from conftest import TINY_VQ
from models import VQGAN
from utils.build import load_vqgan_weights
from utils.masks import KINDS, generate_mask, hole_fraction, token_hole_bank


def test_training_lowers_reconstruction_loss_and_roundtrips(tiny_world, tmp_path):
    import yaml
    cfg = tmp_path / "vq.yml"
    cfg.write_text(yaml.safe_dump({"model_param": TINY_VQ}))
    out = tmp_path / "vq"
    res = train_vqgan.main(["--data", tiny_world["train"], "--config", str(cfg), "--out-dir", str(out),
                            "--steps", "60", "--batch-size", "16", "--learning-rate", "2e-3", "--warmup-steps", "5",
                            "--device", "cpu", "--no-progress", "--eval-every", "60", "--restart-every", "20",
                            "--disc-start", "40", "--half"])
    assert res["step"] == 60
    assert res["last_rec"] < 0.7 * res["first_rec"]
    # the plain state_dict loads like the lab's VQGAN.pt (strict), in fp32 and in fp16
    saved = torch.load(out / "vqgan.pt")
    m32, m16 = VQGAN(TINY_VQ), VQGAN(TINY_VQ)
    load_vqgan_weights(m32, str(out / "vqgan.pt"))
    load_vqgan_weights(m16, str(out / "vqgan_fp16.pt"))
    for k, v in m32.state_dict().items():
        assert torch.equal(v, saved[k])
        torch.testing.assert_close(m16.state_dict()[k], v, rtol=1e-3, atol=1e-3)
    assert (out / "loss.png").exists() and list(out.glob("recon_*.png"))
    # resume continues from the saved step
    res2 = train_vqgan.main(["--data", tiny_world["train"], "--config", str(cfg), "--out-dir", str(out),
                             "--steps", "70", "--batch-size", "16", "--device", "cpu", "--no-progress", "--resume",
                             "--eval-every", "1000"])
    assert res2["step"] == 70


def test_dead_code_restart_revives_unused_codes():
    torch.manual_seed(0)
    m = VQGAN(TINY_VQ)
    counts = torch.zeros(32, dtype=torch.long)
    counts[:5] = 10  # only 5 codes used
    z_e = torch.randn(200, TINY_VQ["latent_dim"]) * 3
    with torch.no_grad():
        m.codebook.embedding.weight[5:] += 100.0  # dead codes far from every encoder output
    before = m.codebook.embedding.weight.detach().clone()
    n = train_vqgan.restart_dead_codes(m, counts, z_e, torch.Generator().manual_seed(0))
    after = m.codebook.embedding.weight.detach()
    assert n == 27
    assert torch.equal(after[:5], before[:5]) and not torch.allclose(after[5:], before[5:])
    # restarted codes sit on encoder outputs, so the batch now uses many more codes
    idx_before = torch.cdist(z_e, before).argmin(1).unique().numel()
    idx_after = m.codebook.quantize_indices(z_e).unique().numel()
    assert idx_before <= 5 and idx_after > 3 * idx_before


@pytest.mark.parametrize("kind", KINDS)
def test_mask_generator_coverage_and_determinism(kind):
    fracs = []
    for seed in range(150):
        m = generate_mask(seed, 64, kind)
        assert m.dtype == np.uint8 and m.shape == (64, 64) and set(np.unique(m)) <= {0, 255}
        fracs.append(hole_fraction(m))
    fracs = np.array(fracs)
    assert fracs.min() >= 0.10 and fracs.max() <= 0.30
    assert 0.15 < fracs.mean() < 0.25  # lab test holes: mean 20.8%
    assert np.array_equal(generate_mask(7, 64, kind), generate_mask(7, 64, kind))
    assert not np.array_equal(generate_mask(7, 64, kind), generate_mask(8, 64, kind))
    m = generate_mask(3, 64, kind, coverage=(0.4, 0.5))
    assert 0.4 <= hole_fraction(m) <= 0.5
    with pytest.raises(ValueError):
        generate_mask(0, 64, "triangle")


def test_token_hole_bank_marks_every_token_touching_a_hole():
    bank = token_hole_bank(40, seed=2)
    assert bank.shape == (40, 256) and bank.dtype == torch.bool
    for i in (0, 1, 17):  # walks and mixed shapes alternate
        pix = generate_mask(2 * 1_000_003 + i, 64, ("walk", "mixed")[i % 2])
        any_hole = (pix.reshape(16, 4, 16, 4) == 0).any(axis=(1, 3)).reshape(-1)
        assert np.array_equal(bank[i].numpy(), any_hole)
    assert 0.2 < bank.float().mean().item() < 0.45  # lab test masks: 33% of tokens
