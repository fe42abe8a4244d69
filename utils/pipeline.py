"""The whole chain in one command (``pipeline.py``): tokenizer training -> token cache ->
transformer training -> (optionally) decoder training on the frozen tokens -> inpainting of the test
images -> FID, into one folder.

Every stage calls its script's ``main(argv)`` in-process with an argument list built from a recipe
YAML (``config/pipeline.yml``), so the pipeline trains and decodes nothing itself:

    tokenizer    train_vqgan.py                              <out>/tokenizer/   vqgan.pt, last.pt, loss.png
    tokens       training_transformer.py's token cache       <out>/tokens/cache/
    transformer  training_transformer.py                     <out>/transformer/ transformer_best.pth, loss.png
    decoder      train_vqgan.py --init <out>/tokenizer/vqgan.pt <out>/decoder/  vqgan.pt, loss.png
                 --train-part decoder: the tokenizer's decoder trained on, its tokens unchanged (so the
                 transformer stays valid); skipped while the recipe gives it no minutes and no steps
    inpaint      inpainting.py twice: as the lab scores it    <out>/inpaint/lab/, report.png
                 (no pasting, no --refine) and with           <out>/inpaint/composited/
                 --paste-known (and the recipe's --refine)
    fid          the tokenizer's reconstructions of the       <out>/fid/recon/
                 originals, then fid_score_gpu.py --match-names on them, on lab/ and on composited/

With ``--tokenizer FILE`` the tokenizer stage trains nothing: it copies a trained tokenizer (one of
ours, or the lab's ``VQGAN.pt``) to ``<out>/tokenizer/vqgan.pt`` and the chain goes on from there.

The inpaint and fid stages use the decoder stage's ``vqgan.pt`` when that stage trains (or has trained)
one, else the tokenizer's.

A finished stage writes ``<stage>/done.json`` (figures, wall time, the commands it ran); a rerun
skips it, resumes an unfinished trainer from its ``last.pt`` (``--resume``) and redoes any other
unfinished stage. A stage that runs makes the folders of the later stages made from it stale: they
are removed (every later stage, except that the decoder is not made from the token cache or the
transformer). ``summary.json`` and ``summary.md`` are rewritten after every stage.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import difflib
import functools
import importlib
import importlib.util
import io
import json
import logging
import os
import shlex
import shutil
import signal
import time

import torch
import yaml
from PIL import Image

from models import VQGAN
from models.VQGAN import VQGANConfig

from .build import build_maskgit, load_vqgan_weights, tokenizer_file_config
from .checkpoint import atomic_write, atomic_write_text, load_checkpoint
from .cli import Interrupted, ParserCaptured, UserError, capture_parser, one_line
from .config import REPO_ROOT, ConfigError, load_maskgit_config, load_yaml, resolve_path
from .data import (TEST_MEAN, TEST_STD, LabLayout, default_data_root, denormalize, find_lab_layout, list_images,
                   normalize, pil_to_tensor01, read_image, to_uint8)
from .inpaint import token_choice_label
from .metrics import psnr
from .runtime import create_logger, get_device

STAGES = ("tokenizer", "tokens", "transformer", "decoder", "inpaint", "fid")
ARG_STAGES = tuple(s for s in STAGES if s != "tokens")  # the stages with args (the token cache uses the transformer's)
TRAINERS = ("tokenizer", "transformer", "decoder")  # resumable from <stage>/last.pt
NEEDS = {"tokens": ("tokenizer",), "transformer": ("tokenizer",), "decoder": ("tokenizer",),
         "inpaint": ("tokenizer", "transformer"), "fid": ("tokenizer", "inpaint")}  # the finished stages whose outputs
# a stage reads (inpaint and fid also read the decoder stage's when it trains one: needs())
MADE_FROM = {**NEEDS, "transformer": ("tokenizer", "tokens"), "inpaint": ("tokenizer", "transformer", "decoder"),
             "fid": ("tokenizer", "decoder", "inpaint")}  # what a stage's outputs depend on: stale when one reruns
FID_SCRIPT = "faster-pytorch-fid/fid_score_gpu.py"
SCRIPTS = {"tokenizer": "train_vqgan.py", "tokens": "training_transformer.py",
           "transformer": "training_transformer.py", "decoder": "train_vqgan.py", "inpaint": "inpainting.py",
           "fid": FID_SCRIPT}
# options the pipeline sets itself (each option by its first spelling in the script's --help)
OWNED = {"train_vqgan.py": {"--data", "--val-data", "--out-dir", "--device", "--resume", "--time-budget-min"},
         "training_transformer.py": {"--train_d_path", "--val_d_path", "--out_d_path", "--vqgan-ckpt", "--cache-dir",
                                     "--device", "--resume", "--time-budget-min"},
         "inpainting.py": {"--load-transformer-ckpt-path", "--vqgan-ckpt", "--data", "--test-maskedimage-path",
                           "--test-mask-path", "--out-dir", "--paste-known", "--gt-path", "--device", "--bundled"},
         FID_SCRIPT: {"--predicted-path", "--gtcsv-path", "--match-names", "--save-stats", "--device"}}
STAGE_OWNED = {"decoder": {"--init", "--train-part"}}  # and these per stage (the decoder stage starts from the tokenizer's)
LAB_ONLY = ("--report-ids", "--gif", "--unconditional")  # inpainting's extras: made by the lab-protocol run only
COMPOSITED_ONLY = ("--refine",)  # the decode fitted to the known pixels: the lab's protocol scores the plain decode
DEFAULT_GT = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data", "lab3_test_gt"))
RERUN_HINT = "rerun the same command to continue"


# ---------------------------------------------------------------------------------------------- recipe


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A recipe YAML: per stage the minutes of its time budget and its script's options."""
    path: str
    minutes: dict  # stage -> float (0: no budget)
    args: dict  # stage -> {key: value} as written in the YAML, then with pipeline.py's --arg applied
    given: tuple = ()  # pipeline.py's --arg words as typed ("stage.key=value")

    def source(self, stage: str | None = None) -> str:
        """The recipe file, and --arg where it changed (this stage's) options: for error messages."""
        changed = any(stage is None or g.startswith(f"{stage}.") for g in self.given)
        return self.path + (" and --arg" if changed else "")

    def where(self, stage: str, key: str | None = None) -> str:
        """Where a stage's (or one option's) value comes from, for error messages."""
        if key is not None and f"{stage}.{key}" in {g.partition("=")[0] for g in self.given}:
            return f"--arg {stage}.{key}"
        return f"{self.source(stage)}: {stage}" + (f".args.{key}" if key is not None else "")


def load_recipe(path: str) -> Recipe:
    """Read and check a recipe; unknown keys raise :class:`UserError` naming the file and the key."""
    raw = load_yaml(path)  # one-line ConfigError: missing file, invalid YAML, not a mapping
    for key in raw:
        if key not in STAGES:
            raise UserError(f"{path}: unknown key {key!r}; the stages are {', '.join(STAGES)}")
    minutes, args = {}, {}
    for stage in STAGES:
        section = raw.get(stage) or {}
        if not isinstance(section, dict):
            raise UserError(f"{path}: {stage}: expected a mapping with 'minutes' and 'args'")
        for key in section:
            if key not in ("minutes", "args") or (stage == "tokens" and key == "args"):
                known = "'minutes' (it uses the transformer's args)" if stage == "tokens" else "'minutes', 'args'"
                raise UserError(f"{path}: unknown key {stage}.{key}; known: {known}")
        m = section.get("minutes") or 0
        if isinstance(m, bool) or not isinstance(m, (int, float)) or m < 0:
            raise UserError(f"{path}: {stage}.minutes must be a number >= 0, got {m!r}")
        if not isinstance(section.get("args") or {}, dict):
            raise UserError(f"{path}: {stage}.args must be a mapping of option: value")
        minutes[stage], args[stage] = float(m), dict(section.get("args") or {})
    return Recipe(path, minutes, args)


def with_recipe_args(recipe: Recipe, given: tuple) -> Recipe:
    """The recipe with pipeline.py's ``--arg STAGE.KEY=VALUE`` applied in order: VALUE read as YAML replaces
    the recipe's value (``false`` / ``null`` drop a flag); a ``set`` item is added to the stage's set list."""
    args = {stage: dict(a) for stage, a in recipe.args.items()}
    for stage, key, value in given:
        if key == "set":  # KEY=VALUE words of the script's --set, kept as text
            old = args[stage].get("set") or []
            args[stage]["set"] = [*(old if isinstance(old, list) else [old]), value]
            continue
        try:
            args[stage][key] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as e:
            raise UserError(f"--arg {stage}.{key}={value}: not a YAML value ({one_line(e)})") from e
    return dataclasses.replace(recipe, args=args, given=tuple(f"{st}.{k}={v}" for st, k, v in given))


@dataclasses.dataclass(frozen=True)
class Flag:
    name: str  # as the script spells it
    option: str  # the option's first spelling (aliases share it)
    takes_value: bool
    many: bool  # nargs: several values


def parser_flags(parser: argparse.ArgumentParser) -> dict:
    """{flag: Flag} of every option string of an argparse parser (aliases share their first spelling)."""
    flags = {}
    for action in parser._actions:  # argparse keeps no public list of its actions
        nargs = action.nargs
        takes_value = nargs != 0
        many = nargs in ("*", "+", argparse.REMAINDER) or (isinstance(nargs, int) and nargs > 1)
        for name in action.option_strings:
            flags[name] = Flag(name, action.option_strings[0], takes_value, many)
    return flags


@functools.lru_cache(maxsize=None)
def script_module(script: str):
    """The module of a script (the FID script lives in a folder that is not a package)."""
    if script == FID_SCRIPT:
        spec = importlib.util.spec_from_file_location("fid_score_gpu", REPO_ROOT / FID_SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(script[:-len(".py")])


def _parse(script: str, argv: list):
    module = script_module(script)
    return (module.parse_options if script == "training_transformer.py" else module.parse_args)(argv)


@functools.lru_cache(maxsize=None)
def script_flags(script: str) -> dict:
    """{flag: Flag} of a script's own parser (caught as it is about to parse)."""
    try:
        with capture_parser():
            _parse(script, [])
    except ParserCaptured as e:
        return parser_flags(e.parser)
    raise RuntimeError(f"{script} parsed its options without utils.cli.ArgumentParser")


def check_argv(script: str, argv: list, where: str) -> None:
    """Parse ``argv`` with the script's own parser; its error becomes one :class:`UserError` line."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            _parse(script, argv)
            return
        except SystemExit:
            pass
    raise UserError(f"{where}: {err.getvalue().strip().split(': error: ', 1)[-1]}")


def recipe_argv(recipe: Recipe, stage: str, leave_out: tuple = ()) -> list:
    """A stage's ``args`` as command-line arguments of its script (without the options ``leave_out``)."""
    script, flags, argv = SCRIPTS[stage], script_flags(SCRIPTS[stage]), []
    for key, value in recipe.args[stage].items():
        where = recipe.where(stage, key)
        flag = flags.get(f"--{key}") or flags.get(f"--{str(key).replace('_', '-')}")
        if flag is None:
            close = difflib.get_close_matches(f"--{str(key).replace('_', '-')}", list(flags), n=1, cutoff=0.75)
            hint = f"did you mean {close[0].lstrip('-').replace('-', '_')}? " if close else ""
            raise UserError(f"{where}: {script} has no option --{str(key).replace('_', '-')} ({hint}see python {script} "
                            f"--help)")
        if flag.option in OWNED[script] | STAGE_OWNED.get(stage, set()):
            what = {"--time-budget-min": f"{stage}.minutes", "--init": "the tokenizer stage's vqgan.pt",
                    "--train-part": "the stage: decoder"}.get(flag.option, "--out, --data, --gt, --device")
            raise UserError(f"{where}: {flag.name} is set by the pipeline (from {what})")
        if flag.option not in leave_out:
            argv += flag_values(flag, value, where)
    return argv


def flag_values(flag: Flag, value, where: str) -> list:
    if not flag.takes_value:
        if not isinstance(value, bool):
            raise UserError(f"{where}: {flag.name} is a switch: write true or false, not {value!r}")
        return [flag.name] if value else []
    if value is None:
        return []
    if isinstance(value, (bool, dict)) or (isinstance(value, list) and not flag.many):
        raise UserError(f"{where}: {flag.name} takes {'values' if flag.many else 'one value'}, not {value!r}")
    return [flag.name, *map(str, value if isinstance(value, list) else [value])]


# ---------------------------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """``pipeline.py``'s command line, read once."""
    recipe: str = "config/pipeline.yml"
    out: str = "runs/pipeline"
    data: str | None = None
    gt: str | None = None
    device: str = "auto"
    budget_minutes: float | None = None
    minutes: tuple = ()  # ((stage, minutes), ...): replace the recipe's minutes of these stages
    stages: tuple = STAGES
    force: str | None = None
    dry_run: bool = False
    tokenizer: str | None = None  # a trained tokenizer file: the tokenizer stage copies it instead of training
    recipe_args: tuple = ()  # ((stage, key, value text), ...): --arg, applied to the recipe's args in order


@dataclasses.dataclass(frozen=True)
class Context:
    """Where everything is; the commands of every stage derive from it."""
    recipe: Recipe
    out: str
    data: str
    layout: LabLayout
    gt: str | None
    device: str
    scale: float  # --budget-minutes / the recipe's minutes
    tokenizer: str | None = None  # --tokenizer FILE (absolute), or None: the tokenizer stage trains one

    def dir(self, stage: str, *parts: str) -> str:
        return os.path.join(self.out, stage, *parts)

    def minutes(self, stage: str) -> float:
        return self.recipe.minutes[stage] * self.scale

    def budget(self, stage: str) -> list:
        m = self.minutes(stage)
        return ["--time-budget-min", f"{m:.4g}"] if m > 0 else []


def make_context(opts: PipelineOptions) -> Context:
    recipe = with_recipe_args(load_recipe(opts.recipe), opts.recipe_args)
    if opts.minutes:
        recipe = dataclasses.replace(recipe, minutes={**recipe.minutes, **dict(opts.minutes)})
    tokenizer = None
    if opts.tokenizer is not None:
        tokenizer = os.path.abspath(resolve_path(opts.tokenizer))
        if not os.path.isfile(tokenizer):
            raise UserError(f"--tokenizer {opts.tokenizer}: no such file (a trained tokenizer: a pipeline run's "
                            "tokenizer/vqgan.pt, checkpoints/vqgan_small_fp16.pt or the lab's VQGAN.pt)")
        if os.path.dirname(tokenizer) == os.path.join(os.path.abspath(opts.out), "tokenizer"):
            raise UserError(f"--tokenizer {opts.tokenizer}: that is this run's own tokenizer folder; leave out "
                            "--tokenizer to go on with it, or copy the file elsewhere first")
        recipe = dataclasses.replace(recipe, minutes={**recipe.minutes, "tokenizer": 0.0})  # nothing to train
    root = opts.data or default_data_root()
    if root is None:
        raise UserError("no lab dataset found (./lab3_dataset, ./lab5_dataset, ../shared/data/lab3_dataset): pass "
                        "--data ROOT")
    gt = opts.gt if opts.gt is not None else (DEFAULT_GT if os.path.isdir(DEFAULT_GT) else None)  # '': none
    if gt and not os.path.isdir(gt):
        raise UserError(f"--gt {gt}: not a folder of originals (image_XXX.png named like the masked test images)")
    scale = 1.0
    if opts.budget_minutes is not None:
        total = sum(recipe.minutes.values())
        if total <= 0:
            raise UserError(f"--budget-minutes: {opts.recipe} gives no stage any minutes to scale")
        scale = opts.budget_minutes / total
    root = os.path.abspath(resolve_path(root))
    # resolved once: without CUDA, --device cuda warns here once and every stage gets --device cpu
    device = str(get_device(opts.device))
    return Context(recipe, os.path.abspath(opts.out), root, find_lab_layout(root),
                   os.path.abspath(gt) if gt else None, device, scale, tokenizer)


def cpu_warning(ctx: Context, stages: tuple = STAGES) -> str | None:
    """One line when a recipe whose trainers are timed (made for a GPU) is about to train on the CPU:
    they stop after the same minutes, having seen hundreds of times fewer images (the trainers among
    ``stages``, the selected ones)."""
    timed = sum(ctx.minutes(s) for s in TRAINERS if s in stages)
    if timed <= 0 or get_device(ctx.device).type != "cpu":
        return None
    return (f"warning: training on the CPU with {ctx.recipe.path}, whose trainers get {timed:.3g} minutes timed for "
            "a GPU (an H100 trains these models hundreds of times faster): expect far weaker models, and about "
            "15 minutes more for inpainting and FID. To check the whole chain on a CPU: --recipe "
            "config/pipeline_smoke.yml --device cpu")


def tokenizer_commands(ctx: Context, resume: bool = False) -> list:
    if ctx.tokenizer:
        return []  # copied by run_tokenizer, no script
    return [("train_vqgan.py", ["--data", ctx.layout.train, "--val-data", ctx.layout.val, "--out-dir",
                                ctx.dir("tokenizer"), "--device", ctx.device, *ctx.budget("tokenizer"),
                                *(["--resume"] if resume else []), *recipe_argv(ctx.recipe, "tokenizer")])]


def transformer_commands(ctx: Context, resume: bool = False, budget: bool = True) -> list:
    return [("training_transformer.py", [
        "--train_d_path", ctx.layout.train, "--val_d_path", ctx.layout.val, "--out_d_path", ctx.dir("transformer"),
        "--vqgan-ckpt", ctx.dir("tokenizer", "vqgan.pt"), "--cache-dir", ctx.dir("tokens", "cache"),
        "--device", ctx.device, *(ctx.budget("transformer") if budget else []), *(["--resume"] if resume else []),
        *with_overrides(recipe_argv(ctx.recipe, "transformer"), tokenizer_overrides(ctx))])]


def tokenizer_overrides(ctx: Context) -> list:
    """The tokenizer stage's ``set`` overrides as overrides of the transformer's resolved tokenizer
    config (``vqgan.KEY=VALUE``): the transformer builds the very tokenizer that was trained. None for
    a tokenizer given with --tokenizer: its own config (or, for the lab's VQGAN.pt, the transformer
    YAML's) describes it."""
    if adopted_source(ctx):
        return []
    sets = ctx.recipe.args["tokenizer"].get("set") or []
    return [f"vqgan.{item}" for item in ([sets] if isinstance(sets, str) else sets)]


def with_overrides(argv: list, overrides: list) -> list:
    """``argv`` with ``overrides`` added to its ``--set`` values (one --set: a second would replace the first)."""
    if not overrides:
        return argv
    if "--set" not in argv:
        return [*argv, "--set", *overrides]
    i = argv.index("--set") + 1
    return [*argv[:i], *overrides, *argv[i:]]


def tokens_commands(ctx: Context, resume: bool = False) -> list:
    return transformer_commands(ctx, budget=False)  # the transformer's options, so the same cache keys


def decoder_trains(ctx: Context) -> bool:
    """Whether the recipe trains a decoder: the decoder stage has minutes, or its args fix the steps."""
    return ctx.minutes("decoder") > 0 or ctx.recipe.args["decoder"].get("steps") is not None


def decoder_commands(ctx: Context, resume: bool = False) -> list:
    if not decoder_trains(ctx):
        return []
    return [("train_vqgan.py", ["--data", ctx.layout.train, "--val-data", ctx.layout.val, "--out-dir", ctx.dir("decoder"),
                                "--device", ctx.device, "--init", ctx.dir("tokenizer", "vqgan.pt"), "--train-part",
                                "decoder", *ctx.budget("decoder"), *(["--resume"] if resume else []),
                                *recipe_argv(ctx.recipe, "decoder")])]


def tokenizer_stage(ctx: Context) -> str:
    """The stage whose vqgan.pt the inpaint and fid stages use: the decoder's when the recipe trains one or
    that stage has finished, else the tokenizer's."""
    return "decoder" if decoder_trains(ctx) or os.path.isfile(ctx.dir("decoder", "done.json")) else "tokenizer"


def needs(ctx: Context, stage: str) -> tuple:
    """The finished stages a stage reads (NEEDS), with the decoder for the stages that use its vqgan.pt."""
    extra = ("decoder",) if stage in ("inpaint", "fid") and tokenizer_stage(ctx) == "decoder" else ()
    return NEEDS.get(stage, ()) + extra


def made_from(stage: str) -> list:
    """The later stages whose outputs depend on ``stage``'s, directly or through another (MADE_FROM)."""
    out = []
    for later in STAGES[STAGES.index(stage) + 1:]:
        if any(s == stage or s in out for s in MADE_FROM.get(later, ())):
            out.append(later)
    return out


def inpaint_commands(ctx: Context, resume: bool = False) -> list:
    lab_args = recipe_argv(ctx.recipe, "inpaint", leave_out=COMPOSITED_ONLY)
    paired = ctx.gt and "--resize" not in lab_args  # inpainting.py compares with originals of the model's size only
    base = ["--load-transformer-ckpt-path", ctx.dir("transformer", "transformer_best.pth"),
            "--vqgan-ckpt", ctx.dir(tokenizer_stage(ctx), "vqgan.pt"), "--data", ctx.data, "--device", ctx.device,
            *(["--gt-path", ctx.gt] if paired else [])]
    return [("inpainting.py", [*base, "--out-dir", ctx.dir("inpaint", "lab"), *lab_args]),
            ("inpainting.py", [*base, "--out-dir", ctx.dir("inpaint", "composited"),
                               *recipe_argv(ctx.recipe, "inpaint", leave_out=LAB_ONLY), "--paste-known", "--no-vis"])]


def fid_commands(ctx: Context, resume: bool = False) -> list:
    args = ["--gtcsv-path", ctx.gt or "", "--match-names", "--device", ctx.device, *recipe_argv(ctx.recipe, "fid")]
    return [(FID_SCRIPT, ["--predicted-path", d, *args]) for d in
            (ctx.dir("fid", "recon"), ctx.dir("inpaint", "lab", "test_results"),
             ctx.dir("inpaint", "composited", "test_results"))]


COMMANDS = {"tokenizer": tokenizer_commands, "tokens": tokens_commands, "transformer": transformer_commands,
            "decoder": decoder_commands, "inpaint": inpaint_commands, "fid": fid_commands}


def check_context(ctx: Context, stages: tuple, force: str | None = None) -> None:
    """Before any work: every selected stage's arguments parse, both configs load, and the transformer's
    token interface (sequence length, vocabulary) is the one the tokenizer stage trains. The tokenizer's
    architecture itself comes with its vqgan.pt (training_transformer.py reads the config stored in it)."""
    for stage in stages:
        for script, argv in COMMANDS[stage](ctx):
            check_argv(script, argv, ctx.recipe.where(stage))
    tt = script_module("training_transformer.py")
    opts = tt.parse_options(transformer_commands(ctx)[0][1])
    try:
        if ctx.tokenizer:
            vq_path, vq_cfg = ctx.tokenizer, check_tokenizer_file(ctx)
        elif adopted_source(ctx) and force != "tokenizer":  # a copied tokenizer, kept: the copy is what runs
            vq_path, vq_cfg = ctx.dir("tokenizer", "vqgan.pt"), tokenizer_config(ctx)
        else:
            vq_path, vq_cfg = recipe_tokenizer(ctx)
        trained = VQGANConfig.from_dict(vq_cfg)
        mp = load_maskgit_config(opts.MaskGitConfig, list(opts.set))["model_param"]
    except ConfigError as e:
        raise UserError(f"{ctx.recipe.source()}: {e}") from e
    tokens, codes = trained.latent_resolution ** 2, trained.num_codebook_vectors
    for where, part in (("model_param", mp), ("model_param.Transformer_param", mp.get("Transformer_param") or {})):
        if (part.get("num_image_tokens"), part.get("num_codebook_vectors")) != (tokens, codes):
            raise UserError(f"{ctx.recipe.source()}: the tokenizer ({vq_path}) makes {tokens} tokens of {codes} codes "
                            f"per image but the transformer's {opts.MaskGitConfig} expects "
                            f"{part.get('num_image_tokens')} of {part.get('num_codebook_vectors')}: set "
                            f"{where}.num_image_tokens and num_codebook_vectors to match")


def adopted_source(ctx: Context) -> str | None:
    """The file the tokenizer stage copied or will copy (--tokenizer, else the one its done.json
    names), or None: a tokenizer trained by this run."""
    done = read_json(ctx.dir("tokenizer", "done.json")) or {}
    return ctx.tokenizer or (done.get("figures") or {}).get("source")


def check_adopted(ctx: Context) -> None:
    """A finished tokenizer stage must be the one asked for: --tokenizer FILE over a tokenizer trained
    in this folder, or copied from another file, stops here instead of mixing the two."""
    done = read_json(ctx.dir("tokenizer", "done.json"))
    if done is None or ctx.tokenizer is None:
        return
    had = (done.get("figures") or {}).get("source")
    if had != ctx.tokenizer:
        what = f"copied from {had}" if had else "trained by this pipeline"
        raise UserError(f"--tokenizer {ctx.tokenizer}: {ctx.dir('tokenizer')} already holds a tokenizer {what}; "
                        "add --force tokenizer to replace it (every later stage runs again) or choose another --out")


def check_tokenizer_file(ctx: Context) -> dict:
    """--tokenizer FILE's config, once its weights have loaded strictly into the tokenizer it describes."""
    try:
        cfg = adopted_config(ctx, ctx.tokenizer)
        load_vqgan_weights(VQGAN(cfg), ctx.tokenizer)
    except (OSError, ValueError) as e:  # CheckpointError, CheckpointLayoutError: the file and what is wrong
        raise UserError(f"--tokenizer {ctx.tokenizer}: {one_line(e)}") from e
    return cfg


def adopted_config(ctx: Context, path: str) -> dict:
    """The config of a given tokenizer file as the transformer stage will build it: the one the file
    stores, else (the lab's VQGAN.pt) the transformer YAML's tokenizer config (VQ_config_path)."""
    tt = script_module("training_transformer.py")
    argv = transformer_commands(ctx)[0][1]
    argv[argv.index("--vqgan-ckpt") + 1] = path
    return tt.model_config(tt.parse_options(argv))["vqgan"]


def recipe_tokenizer(ctx: Context) -> tuple:
    """(config path, config dict with the recipe's ``set`` overrides) of the tokenizer stage, as
    train_vqgan.py reads its command."""
    tv = script_module("train_vqgan.py")
    return tv.tokenizer_config(tv.parse_args(tokenizer_commands(ctx)[0][1]))


def command_line(script: str, argv: list) -> str:
    return shlex.join(["python", script, *argv])


def shown_commands(ctx: Context, stage: str, commands: list) -> list:
    """The command lines a user can run by hand for a stage (summary.md, --dry-run)."""
    if stage == "tokenizer" and ctx.tokenizer:
        return [shlex.join(["cp", ctx.tokenizer, ctx.dir("tokenizer", "vqgan.pt")])
                + "  # pipeline.py --tokenizer: a trained tokenizer, not trained here"]
    if stage == "decoder" and not commands:
        return ["# not run: the recipe gives the decoder stage no minutes and no steps (e.g. --minutes decoder=5)"]
    if stage == "tokens":  # no script of its own: the transformer's command makes the cache on its start
        given = ["--arg", *ctx.recipe.given] if ctx.recipe.given else []
        return [command_line("pipeline.py", ["--recipe", ctx.recipe.path, *given, "--out", ctx.out, "--data",
                                             ctx.data, "--device", ctx.device, "--stages", "tokens"])
                + "  # or the transformer's command, which encodes the images on its start"]
    return [command_line(script, argv) for script, argv in commands]


# ---------------------------------------------------------------------------------------------- stages


def run_tokenizer(ctx: Context, commands: list) -> dict:
    if ctx.tokenizer:  # its weights were checked against its config before any stage ran (check_context)
        atomic_write(ctx.dir("tokenizer", "vqgan.pt"), lambda tmp: shutil.copyfile(ctx.tokenizer, tmp))
        vq = VQGAN(adopted_config(ctx, ctx.tokenizer))
        return {"source": ctx.tokenizer, "parameters": sum(p.numel() for p in vq.parameters())}
    r = script_module("train_vqgan.py").main(commands[0][1])
    return {"steps": r["step"], "val_psnr": r["val_psnr"], "code_usage": r["code_usage"]}


def run_tokens(ctx: Context, commands: list) -> dict:
    """Encode the transformer's training and val images once (its cache; its own start then hits it)."""
    tt = script_module("training_transformer.py")
    opts = tt.parse_options(commands[0][1])
    create_logger("maskgit", ctx.dir("tokens", "tokens.log"))
    folders, device = tt.data_folders(opts), get_device(opts.device)
    model = build_maskgit(tt.model_config(opts)).to(device).eval()
    train, val, unseen = tt.load_tokens(opts, model, device, folders, 0, 1)
    return {"train_sequences": len(train), "val_sequences": len(val), "val_unseen": len(unseen)}


def run_transformer(ctx: Context, commands: list) -> dict:
    r = script_module("training_transformer.py").main(commands[0][1])
    with open(ctx.dir("transformer", "metrics.csv")) as f:
        val = [row for row in csv.DictReader(f) if row.get("val_loss")]
    figures = {"steps": r["step"], "images_per_s": r["images_per_s"]}
    if val:
        figures.update({k: float(val[-1][k]) for k in ("val_loss", "val_acc", "val_unseen_loss", "val_unseen_acc")})
        figures["best_val_loss"] = min(float(row["val_loss"]) for row in val)
    return figures


def run_decoder(ctx: Context, commands: list) -> dict:
    r = script_module("train_vqgan.py").main(commands[0][1])
    figures = {"steps": r["step"], "init_val_psnr": r["init_val_psnr"], "val_psnr": r["val_psnr"]}
    return {k: v for k, v in figures.items() if v is not None}  # a resumed run measured no step 0 (its log has it)


def run_inpaint(ctx: Context, commands: list) -> dict:
    if not os.path.isfile(ctx.dir("transformer", "transformer_best.pth")):
        raise UserError(f"no {ctx.dir('transformer', 'transformer_best.pth')}: the transformer stage ended before "
                        "its first epoch (raise its minutes or --stop-after-steps)")
    main = script_module("inpainting.py").main
    lab, comp = (main(argv) for _, argv in commands)
    figures = {"images": lab["images"], "seconds": lab["seconds"] + comp["seconds"],
               # the transformer config's choice, unless the recipe sets one
               "tokens": token_choice_label(lab["token_choice"], lab["sample_temperature"])}
    for name, r in (("lab", lab), ("composited", comp)):
        figures.update({f"{name}_{k}": r[k] for k in ("psnr_hole", "ssim_hole") if k in r})
    return figures


def run_fid(ctx: Context, commands: list) -> dict:
    """The tokenizer's reconstructions of the originals that have an inpainted image, then the FID
    script on them, on the lab-protocol images and on the composited ones (same image set)."""
    lab = ctx.dir("inpaint", "lab", "test_results")
    names = sorted({os.path.basename(p) for p in list_images(lab)} & {os.path.basename(p) for p in
                                                                       list_images(ctx.gt)})
    if not names:
        raise UserError(f"none of the inpainted images in {lab} has an original in {ctx.gt}")
    recon_psnr = reconstruct(ctx, names)
    fid_main = script_module(FID_SCRIPT).main
    recon, fid_lab, fid_comp = (fid_main(argv)["fid"] for _, argv in commands)
    return {"images": len(names), "recon_psnr": recon_psnr, "recon_fid": recon, "fid_lab": fid_lab,
            "fid_composited": fid_comp}


def tokenizer_config(ctx: Context, stage: str = "tokenizer") -> dict:
    """The config of the tokenizer a stage trained (tokenizer or decoder): the one its vqgan.pt stores
    (train_vqgan.py writes it there), else (a file of an older version) from its last.pt; for the
    decoder stage then the tokenizer stage's; else (only vqgan.pt came back from a run on another
    machine) the recipe's config with its overrides."""
    own = tokenizer_file_config(ctx.dir(stage, "vqgan.pt"))
    if own is not None:
        return own
    last = ctx.dir(stage, "last.pt")
    if os.path.isfile(last):
        return load_checkpoint(last, "VQGAN training checkpoint")["config"]
    if stage != "tokenizer":
        return tokenizer_config(ctx)
    if adopted_source(ctx):  # the lab's VQGAN.pt, given with --tokenizer
        return adopted_config(ctx, ctx.dir("tokenizer", "vqgan.pt"))
    return recipe_tokenizer(ctx)[1]


def reconstruct(ctx: Context, names: list) -> float:
    """The trained tokenizer's encode -> decode of the originals ``names`` of --gt into <out>/fid/recon/
    (the decoder stage's tokenizer when it trains one: the one the inpaint stage used)."""
    device, stage = get_device(ctx.device), tokenizer_stage(ctx)
    vq = VQGAN(tokenizer_config(ctx, stage))
    load_vqgan_weights(vq, ctx.dir(stage, "vqgan.pt"))
    return reconstruct_images(vq.to(device).eval(), ctx.gt, names, ctx.dir("fid", "recon"), device)


@torch.no_grad()
def reconstruct_images(vq: VQGAN, src: str, names: list, dst: str, device, batch_size: int = 64) -> float:
    """Encode -> decode the images ``names`` of folder ``src`` (test normalization, as inpainting
    sees them; resized to the tokenizer's size) into ``dst``; returns their mean PSNR (dB): the
    tokenizer's reconstruction, the floor of every inpainting result under the lab protocol."""
    os.makedirs(dst, exist_ok=True)
    size, psnrs = vq.cfg.img_resolution, []
    for i in range(0, len(names), batch_size):
        chunk = names[i:i + batch_size]
        x = torch.stack([pil_to_tensor01(read_image(os.path.join(src, n), size, resize=True))
                         for n in chunk])  # (B,3,H,W) at the tokenizer's size
        ids = vq.encode_indices(normalize(x, TEST_MEAN, TEST_STD).to(device))  # (B, h*w)
        rec = denormalize(vq.decode_indices(ids).float(), TEST_MEAN, TEST_STD).cpu()  # (B,3,H,W) in [0,1]
        for n, r in zip(chunk, rec):
            Image.fromarray(to_uint8(r)).save(os.path.join(dst, n))
        psnrs += psnr(rec, x).tolist()
    return sum(psnrs) / len(psnrs)


RUNNERS = {"tokenizer": run_tokenizer, "tokens": run_tokens, "transformer": run_transformer,
           "decoder": run_decoder, "inpaint": run_inpaint, "fid": run_fid}


# ---------------------------------------------------------------------------------------------- bookkeeping


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def read_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{seconds:.1f} s"


FIGURES = {  # stage -> (key, label, format) shown in summary.md
    "tokenizer": [("source", "given (--tokenizer)", "`{}`"), ("parameters", "parameters", "{:,.0f}"),
                  ("steps", "steps", "{:,.0f}"), ("val_psnr", "val PSNR", "{:.2f} dB"),
                  ("code_usage", "codebook usage", "{:.1%}")],
    "tokens": [("train_sequences", "train sequences", "{:,.0f}"), ("val_sequences", "val", "{:,.0f}"),
               ("val_unseen", "val unseen in train", "{:,.0f}")],
    "transformer": [("steps", "steps", "{:,.0f}"), ("val_loss", "val loss", "{:.3f}"),
                    ("val_acc", "masked-token accuracy", "{:.1%}"), ("val_unseen_loss", "unseen val loss", "{:.3f}"),
                    ("best_val_loss", "best val loss", "{:.3f}"), ("images_per_s", "images/s", "{:,.0f}")],
    "decoder": [("steps", "steps", "{:,.0f}"), ("init_val_psnr", "val PSNR before", "{:.2f} dB"),
                ("val_psnr", "after", "{:.2f} dB")],
    "inpaint": [("images", "images", "{:,.0f}"), ("tokens", "token choice", "{}"),
                ("lab_psnr_hole", "hole PSNR", "{:.2f} dB"),
                ("composited_psnr_hole", "composited", "{:.2f} dB")],
    "fid": [("images", "originals", "{:,.0f}"), ("recon_psnr", "tokenizer recon PSNR", "{:.2f} dB"),
            ("recon_fid", "recon FID", "{:.2f}"), ("fid_lab", "FID lab protocol (no paste)", "{:.2f}"),
            ("fid_composited", "FID composited (--paste-known)", "{:.2f}")],
}


RAN_WITH = ("device", "budget_minutes", "minutes")  # per stage in attempts.json / done.json / summary.json


def stage_record(ctx: Context, stage: str, note: str | None) -> dict:
    """A stage's entry of summary.json, from its files: done.json, else its attempts so far. Each entry
    keeps the device and budget that stage ran with: a later invocation (e.g. ``--stages fid`` on
    another machine) does not rewrite them."""
    done = read_json(ctx.dir(stage, "done.json"))
    if done is not None:
        rec = {k: done[k] for k in ("done_at", "wall_s", "attempts", "figures", "commands")}
        rec["status"] = "done"
        last = done
    else:
        attempts = read_json(ctx.dir(stage, "attempts.json")) or []
        rec = {"status": attempts[-1]["outcome"] if attempts else "not run", "attempts": len(attempts),
               "wall_s": sum(a["wall_s"] for a in attempts), "figures": {},
               "commands": attempts[-1]["commands"] if attempts else []}
        last = attempts[-1] if attempts else {}
    rec.update({k: last.get(k) for k in RAN_WITH})  # None for runs recorded before these keys existed
    if note:
        rec["note"] = note
    return rec


def write_summary(ctx: Context, opts: PipelineOptions, notes: dict) -> dict:
    stages = {s: stage_record(ctx, s, notes.get(s)) for s in STAGES}
    summary = {"updated": now(), "recipe": ctx.recipe.path, "recipe_args": list(ctx.recipe.given), "out": ctx.out,
               "data": ctx.data, "gt": ctx.gt, "device": ctx.device, "budget_minutes": opts.budget_minutes,
               "budget_scale": ctx.scale,
               "wall_s": sum(r["wall_s"] for r in stages.values()), "stages": stages}
    write_json(os.path.join(ctx.out, "summary.json"), summary)
    atomic_write_text(os.path.join(ctx.out, "summary.md"), summary_markdown(summary))
    return summary


def summary_markdown(s: dict) -> str:
    budget = f", budget {s['budget_minutes']:g} min (recipe minutes x{s['budget_scale']:.3g})" \
        if s["budget_minutes"] else ""
    lines = ["# Pipeline summary", "",
             f"Recipe `{s['recipe']}`" + "".join(f" `--arg {g}`" for g in s.get("recipe_args") or []) +
             f", data `{s['data']}`, originals `{s['gt'] or 'none (FID skipped)'}`; last "
             f"invoked with device `{s['device']}`{budget}. Updated {s['updated']}; total wall time "
             f"{duration(s['wall_s'])}. Each stage's row shows the device and the minutes it ran with.", "",
             "| stage | status | ran on | wall time | key figures |", "| --- | --- | --- | --- | --- |"]
    for stage, rec in s["stages"].items():
        shown = [f"{label} {fmt.format(rec['figures'][k])}" for k, label, fmt in FIGURES[stage]
                 if isinstance(rec["figures"].get(k), (int, float, str))]
        status = rec["status"] + (f" ({rec['note']})" if rec.get("note") else "")
        if rec.get("attempts", 0) > 1:
            status += f", {rec['attempts']} attempts"
        ran_on = rec.get("device") or ""
        if ran_on and rec.get("minutes"):
            ran_on += f", {rec['minutes']:.3g} min planned" + (f" of budget {rec['budget_minutes']:g}"
                                                        if rec.get("budget_minutes") else "")
        lines.append(f"| {stage} | {status} | {ran_on} | {duration(rec['wall_s']) if rec['wall_s'] else ''} | "
                     f"{' · '.join(shown)} |")
    lines += ["", "FID and PSNR of the fid stage are on the test images whose originals are in the --gt folder; "
              "lab protocol = the decoded images as the lab scores them (no pixels pasted, no refinement), "
              "composited = `inpainting.py --paste-known` (with the recipe's `--refine`, if any).", "",
              "## Commands (run from the repository root)", ""]
    for stage, rec in s["stages"].items():
        if rec["commands"]:
            lines += [f"{stage}:", "", "```bash", *rec["commands"], "```", ""]
    return "\n".join(lines)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt outside the trainers (which handle it themselves and save)."""
    def handle(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    try:
        old = signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not in the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def detach_stage_logs() -> None:
    """Close the log files a stage attached to the 'maskgit' logger (the next stage gets its own)."""
    logger = logging.getLogger("maskgit")
    for h in list(logger.handlers):
        if isinstance(h, logging.FileHandler):
            logger.removeHandler(h)
            h.close()


# ---------------------------------------------------------------------------------------------- the run


def remove_made_from(ctx: Context, stage: str, log, why: str) -> None:
    for later in made_from(stage):
        if os.path.isdir(ctx.dir(later)):
            log.info("removing %s: it was made from the %s stage, which %s", ctx.dir(later), stage, why)
            shutil.rmtree(ctx.dir(later))


def run_stage(ctx: Context, opts: PipelineOptions, stage: str, log, t_start: float, notes: dict) -> None:
    """Run one stage (resumed when it is a trainer with a last.pt), record it, write the summary."""
    folder = ctx.dir(stage)
    resume = stage in TRAINERS and os.path.isfile(os.path.join(folder, "last.pt"))
    if not resume:
        shutil.rmtree(folder, ignore_errors=True)
    remove_made_from(ctx, stage, log, "runs again")
    os.makedirs(folder, exist_ok=True)
    commands = COMMANDS[stage](ctx, resume)
    shown = shown_commands(ctx, stage, commands)
    log.info("%s: %s (elapsed %s)", stage, f"resuming from {folder}/last.pt" if resume else "start",
             duration(time.time() - t_start))
    attempts = read_json(os.path.join(folder, "attempts.json")) or []
    t0, outcome, figures = time.time(), "failed", None
    try:
        figures = RUNNERS[stage](ctx, commands)
        outcome = "done"
    except (Interrupted, KeyboardInterrupt) as e:
        outcome = "interrupted"
        raise Interrupted(f"the {stage} stage was interrupted ({one_line(e) if str(e) else 'Ctrl-C'}); "
                          f"{RERUN_HINT}") from e
    finally:
        detach_stage_logs()
        ran_with = {"device": ctx.device, "budget_minutes": opts.budget_minutes,
                    "minutes": round(ctx.minutes(stage), 4)}
        attempts.append({"started": now(), "wall_s": time.time() - t0, "outcome": outcome, "commands": shown,
                         **ran_with})
        write_json(os.path.join(folder, "attempts.json"), attempts)
        if outcome == "done":
            write_json(os.path.join(folder, "done.json"),
                       {"stage": stage, "done_at": now(), "wall_s": sum(a["wall_s"] for a in attempts),
                        "attempts": len(attempts), "figures": figures, "commands": shown, **ran_with})
        write_summary(ctx, opts, notes)
        log.info("%s: %s in %s (elapsed %s)%s", stage, outcome, duration(time.time() - t0),
                 duration(time.time() - t_start), f" | {json.dumps(figures)}" if figures else "")


def run_pipeline(opts: PipelineOptions) -> dict:
    """Run the selected stages in order: skip the finished ones, resume or redo the others."""
    ctx = make_context(opts)
    selected = tuple(s for s in STAGES if s in opts.stages)
    if opts.force != "tokenizer":
        check_adopted(ctx)
    check_context(ctx, selected, opts.force)
    warning = cpu_warning(ctx, selected)
    if opts.dry_run:
        if warning:
            print(f"# {warning}")
        cmds = {s: shown_commands(ctx, s, COMMANDS[s](ctx, os.path.isfile(ctx.dir(s, "last.pt")))) for s in selected}
        for stage, lines in cmds.items():
            print(f"# {stage}\n" + "\n".join(lines))
        return {"commands": cmds}
    os.makedirs(ctx.out, exist_ok=True)
    log = create_logger("pipeline", os.path.join(ctx.out, "pipeline.log"))
    log.info("pipeline: recipe %s%s -> %s (stages %s%s%s)", ctx.recipe.path,
             "".join(f" --arg {g}" for g in ctx.recipe.given), ctx.out, ",".join(selected),
             "".join(f", {s} {m:g} min" for s, m in opts.minutes),
             f", budget {opts.budget_minutes:g} min" if opts.budget_minutes else "")
    if warning:
        log.warning(warning)
    notes, t_start = {}, time.time()
    try:
        with sigterm_as_interrupt():
            for stage in selected:
                if stage == opts.force and os.path.isdir(ctx.dir(stage)):
                    log.info("%s: --force: removing %s", stage, ctx.dir(stage))
                    shutil.rmtree(ctx.dir(stage))
                    remove_made_from(ctx, stage, log, "was forced")  # also when it is skipped below (a decoder)
                done = read_json(ctx.dir(stage, "done.json"))
                if done is not None:
                    log.info("%s: skipped: done at %s (%s)", stage, done["done_at"], ctx.dir(stage, "done.json"))
                elif stage == "fid" and ctx.gt is None:
                    notes[stage] = "skipped: no originals; pass --gt ROOT (the lab's lab3_test_gt)"
                    log.info("fid: %s", notes[stage])
                elif stage == "decoder" and not decoder_trains(ctx):
                    notes[stage] = "skipped: no minutes and no steps in the recipe; the tokenizer's decoder is used"
                    log.info("decoder: %s", notes[stage])
                else:
                    missing = [d for d in needs(ctx, stage) if not os.path.isfile(ctx.dir(d, "done.json"))]
                    if missing:
                        names = " and ".join([", ".join(missing[:-1]), missing[-1]] if len(missing) > 1 else missing)
                        raise UserError(f"the {stage} stage needs the {names} stage{'s' if len(missing) > 1 else ''} "
                                        f"finished (no {ctx.dir(missing[0], 'done.json')}): run "
                                        f"{'them' if len(missing) > 1 else 'it'} first, e.g. --stages "
                                        f"{','.join(missing + [stage])}")
                    run_stage(ctx, opts, stage, log, t_start, notes)
        log.info("pipeline: finished in %s -> %s", duration(time.time() - t_start),
                 os.path.join(ctx.out, "summary.md"))
    finally:
        summary = write_summary(ctx, opts, notes)
        for h in list(log.handlers):
            log.removeHandler(h)
            h.close()
    return summary
