"""scripts/bundle.py: a pair becomes the bundled models only if it fits the bundled config and the
size limits; what it writes is the input in fp16 on the CPU, configs kept; a refused pair writes nothing."""
import os
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import bundle  # noqa: E402
from utils.cli import UserError  # noqa: E402
from utils.config import load_maskgit_config  # noqa: E402

VQ = os.path.join(ROOT, "checkpoints", "vqgan_small_fp16.pt")
TR = os.path.join(ROOT, "checkpoints", "transformer_small_fp16.pth")


def _tensors(path):
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def test_bundling_an_fp32_pair_writes_fp16_copies_that_build_the_bundled_model(tmp_path):
    """The bundled pair, the tokenizer made fp32 with a stored config (as train_vqgan.py writes
    vqgan.pt): the outputs are the inputs in fp16, the config kept, and the bundled model loads them."""
    from utils.build import BUNDLED_CONFIG, build_maskgit, load_transformer_checkpoint, load_vqgan_weights
    from utils.checkpoint import lab_state_dict, stored_config
    from utils.config import load_maskgit_config
    model = build_maskgit(load_maskgit_config(os.path.join(ROOT, BUNDLED_CONFIG)), load_vqgan=False)
    load_vqgan_weights(model.vqgan, VQ)
    vq32 = tmp_path / "vqgan.pt"
    torch.save(lab_state_dict(model.vqgan, model.vqgan.cfg.to_dict()), vq32)  # fp32 + stored config
    out = tmp_path / "out"
    s = bundle.main(["--vqgan", str(vq32), "--transformer", TR, "--out-dir", str(out)])
    assert sorted(os.listdir(out)) == sorted(bundle.NAMES.values()) and len(s["written"]) == 2
    got = _tensors(out / bundle.NAMES["vqgan"])
    want = _tensors(vq32)
    assert got.keys() == want.keys() and all(got[k].dtype == torch.float16 and got[k].device.type == "cpu"
                                             for k in got if want[k].is_floating_point())
    for k in got:
        torch.testing.assert_close(got[k], want[k].half() if want[k].is_floating_point() else want[k], atol=0, rtol=0)
    stored = stored_config(torch.load(out / bundle.NAMES["vqgan"], map_location="cpu", weights_only=True))
    assert stored == model.vqgan.cfg.to_dict()  # the stored config kept
    got_t, want_t = _tensors(out / bundle.NAMES["transformer"]), _tensors(TR)
    assert got_t.keys() == want_t.keys() and all(torch.equal(got_t[k], want_t[k]) for k in got_t)
    fresh = build_maskgit(load_maskgit_config(os.path.join(ROOT, BUNDLED_CONFIG)), load_vqgan=False)
    load_vqgan_weights(fresh.vqgan, str(out / bundle.NAMES["vqgan"]))
    load_transformer_checkpoint(fresh, str(out / bundle.NAMES["transformer"]))
    # the transformer's stored config names its bundled partner: built from that config alone, the tokenizer loads
    cfg_t = stored_config(torch.load(out / bundle.NAMES["transformer"], map_location="cpu", weights_only=True))
    orig = stored_config(torch.load(TR, map_location="cpu", weights_only=True))
    orig["model_param"]["VQ_Configs"]["VQ_CKPT_path"] = str(out / bundle.NAMES["vqgan"])
    bundled_mp = load_maskgit_config(os.path.join(ROOT, BUNDLED_CONFIG))["model_param"]
    orig["model_param"].update({k: bundled_mp[k] for k in ("token_choice", "sample_temperature",
                                                           "choice_temperature")})
    assert cfg_t == orig  # those keys set, nothing else (VQ_config_path kept)
    alone = build_maskgit(cfg_t)
    for k, v in alone.vqgan.state_dict().items():
        torch.testing.assert_close(v, want[k].half().float(), atol=0, rtol=0)


def test_the_bundled_transformer_by_path_decodes_as_bundled():
    """The repository's bundled transformer file, loaded by its path alone (its stored config), decodes with
    the same defaults as --bundled (config/MaskGit_small.yml): a stored config without them meant argmax."""
    import inpainting
    from utils.build import BUNDLED_CONFIG

    def decoding(argv):  # what inpainting.py would decode with
        args = inpainting.parse_args(argv)
        cfg, _, path = inpainting.load_config(args)
        return {**inpainting.token_choice(args, cfg, path),
                "choice_temperature": cfg["model_param"]["choice_temperature"]}
    by_path, bundled = decoding(["--load-transformer-ckpt-path", TR]), decoding(["--bundled"])
    assert by_path == bundled
    mp = load_maskgit_config(os.path.join(ROOT, BUNDLED_CONFIG))["model_param"]
    assert bundled == {"token_choice": mp["token_choice"], "sample_temperature": mp["sample_temperature"],
                       "choice_temperature": mp["choice_temperature"]}


def test_into_the_repository_the_tokenizer_path_is_relative(tmp_path, monkeypatch):
    """Bundled into the repository's checkpoints/ (the default), the stored tokenizer path is
    checkpoints/vqgan_small_fp16.pt, which resolves against the repository from any directory."""
    from utils.checkpoint import stored_config
    sd = torch.load(TR, map_location="cpu", weights_only=True)
    stored_config(sd)["model_param"]["VQ_Configs"]["VQ_CKPT_path"] = "/tmp/gpu_session/pipeline/tokenizer/vqgan.pt"
    torch.save(sd, tmp_path / "run_transformer.pth")  # as a pipeline run's transformer names its tokenizer
    monkeypatch.setattr(bundle, "DEFAULT_OUT", tmp_path / "checkpoints")
    bundle.main(["--vqgan", VQ, "--transformer", str(tmp_path / "run_transformer.pth")])
    cfg_t = stored_config(torch.load(tmp_path / "checkpoints" / bundle.NAMES["transformer"], map_location="cpu",
                                     weights_only=True))
    assert cfg_t["model_param"]["VQ_Configs"]["VQ_CKPT_path"] == os.path.join("checkpoints", bundle.NAMES["vqgan"])


def test_a_tokenizer_with_a_new_decoder_is_bundled_with_its_config_in_the_transformers(tmp_path, monkeypatch):
    """The bundled tokenizer's tokens with a wider decoder (train_vqgan.py --new-decoder) and the bundled
    transformer, bundled under a config whose tokenizer YAML names that decoder: the transformer's stored
    config then names the new tokenizer config, so the pair builds from the transformer file alone."""
    import yaml
    from models import VQGAN
    from utils.build import TOKEN_PARTS, build_maskgit, load_vqgan_weights
    from utils.checkpoint import lab_state_dict, stored_config
    from utils.config import load_vqgan_config
    wide = {**load_vqgan_config(os.path.join(ROOT, "models/VQGAN/config/VQGAN_small_dec1.5x.yml")).to_dict(),
            "dec_channels": [64, 96, 192]}
    (tmp_path / "vq.yml").write_text(yaml.safe_dump({"model_param": wide}))
    maskgit = yaml.safe_load(open(os.path.join(ROOT, "config", "MaskGit_small.yml")))
    maskgit["model_param"]["VQ_Configs"]["VQ_config_path"] = str(tmp_path / "vq.yml")
    (tmp_path / "maskgit.yml").write_text(yaml.safe_dump(maskgit))
    monkeypatch.setattr(bundle, "BUNDLED_CONFIG", str(tmp_path / "maskgit.yml"))
    vq = VQGAN(wide)
    load_vqgan_weights(vq, VQ, parts=TOKEN_PARTS)  # the bundled tokens, a new (here untrained) decoder
    torch.save(lab_state_dict(vq, wide), tmp_path / "vqgan.pt")
    out = tmp_path / "out"
    bundle.main(["--vqgan", str(tmp_path / "vqgan.pt"), "--transformer", TR, "--out-dir", str(out)])
    cfg_t = stored_config(torch.load(out / bundle.NAMES["transformer"], map_location="cpu", weights_only=True))
    assert cfg_t["vqgan"] == wide and stored_config(torch.load(TR, weights_only=True))["vqgan"] != wide
    alone = build_maskgit(cfg_t)
    assert alone.vqgan.cfg.to_dict() == wide
    for k, v in alone.vqgan.state_dict().items():
        torch.testing.assert_close(v, vq.state_dict()[k].half().float(), atol=0, rtol=0)


def test_a_pair_that_does_not_fit_is_refused_and_nothing_is_written(tiny_world, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="do not fit the bundled config") as e:
        bundle.main(["--vqgan", tiny_world["vqgan"], "--transformer", TR, "--out-dir", str(out)])
    assert tiny_world["vqgan"] in str(e.value) and "swapped" in str(e.value)  # names the input, not a temp file
    assert not out.exists()
    with pytest.raises(UserError, match="do not fit"):  # a dry run checks the same way
        bundle.main(["--vqgan", VQ, "--transformer", tiny_world["vqgan"], "--out-dir", str(out), "--dry-run"])
    assert not out.exists()


def test_dry_run_writes_nothing(tmp_path):
    s = bundle.main(["--vqgan", VQ, "--transformer", TR, "--out-dir", str(tmp_path / "out"), "--dry-run"])
    assert s["written"] == [] and not (tmp_path / "out").exists()
    # every tensor of either bundled file is a parameter (no buffers are stored)
    assert (s["vqgan_params"], s["transformer_params"]) == tuple(
        sum(v.numel() for v in _tensors(path).values()) for path in (VQ, TR))


def test_size_limits():
    bundle.check_sizes({"a": 24 * 2**20, "b": 40_000_000 - 24 * 2**20})  # at the limits: allowed
    with pytest.raises(UserError, match="over the 24 MiB"):
        bundle.check_sizes({"a": 24 * 2**20 + 1})
    with pytest.raises(UserError, match="over 40 MB"):
        bundle.check_sizes({"a": 20_000_000, "b": 20_000_001})


def test_missing_file_is_one_line_naming_it(tmp_path, capsys):
    from utils.cli import run_cli
    with pytest.raises(SystemExit) as e:
        run_cli(bundle.main, ["--vqgan", str(tmp_path / "nope.pt"), "--transformer", TR, "--out-dir", str(tmp_path)])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.pt" in err[0] and "not found" in err[0]
