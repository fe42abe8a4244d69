"""The whole chain in one command: tokenizer training -> token cache -> transformer training ->
(optionally) decoder training on the frozen tokens -> inpainting of the lab's test images -> FID, into one folder (checkpoints, logs, loss curves, the
decoding report, summary.json and summary.md).

    python pipeline.py                                         # config/pipeline.yml: one H100, 25 minutes
    python pipeline.py --recipe config/pipeline_smoke.yml --out /tmp/pipe_smoke   # CPU smoke run, ~1 min
    python pipeline.py --stages inpaint,fid --force inpaint     # redo the inpainting and the FID only
    python pipeline.py --tokenizer checkpoints/vqgan_small_fp16.pt   # a trained tokenizer: the transformer on it
    python pipeline.py --arg tokenizer.learning_rate=8e-4         # a recipe option changed without editing the YAML
    python pipeline.py --minutes tokenizer=5 decoder=4            # the decoder stage too (0 minutes in the recipe)

Rerun the same command after Ctrl-C: finished stages are skipped, an interrupted trainer resumes.
The stages and the recipe format: ``utils/pipeline.py`` and ``config/pipeline.yml``.
"""
from __future__ import annotations

from utils.cli import ArgumentParser, run_cli
from utils.pipeline import ARG_STAGES, STAGES, PipelineOptions, run_pipeline


def parse_args(argv=None) -> PipelineOptions:
    p = ArgumentParser(description="MaskGIT, the whole chain: tokenizer -> token cache -> transformer -> "
                                   "(decoder on the frozen tokens) -> inpainting -> FID")
    p.add_argument("--recipe", default="config/pipeline.yml",
                   help="the recipe YAML: per stage its minutes and its script's options")
    p.add_argument("--out", default="runs/pipeline", help="the run's folder (one subfolder per stage)")
    p.add_argument("--data", default=None, help="a lab dataset root (lab3_dataset or lab5_dataset layout; default: "
                                                "the first found of ./lab3_dataset, ./lab5_dataset, "
                                                "../shared/data/lab3_dataset)")
    p.add_argument("--gt", default=None, help="folder of the test images' originals for PSNR and FID (default: "
                                              "../shared/data/lab3_test_gt when present; without one, or with "
                                              "--gt '', the FID stage is skipped)")
    p.add_argument("--device", default="auto", help="cuda | cpu | auto, for every stage")
    p.add_argument("--tokenizer", default=None, metavar="FILE",
                   help="a trained tokenizer (a run's tokenizer/vqgan.pt, checkpoints/vqgan_small_fp16.pt, the lab's "
                        "VQGAN.pt with a recipe whose transformer YAML names its config): the tokenizer stage copies "
                        "it instead of training one, and --budget-minutes leaves that stage out")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="scale every stage's minutes in the recipe so that they add up to this")
    p.add_argument("--minutes", nargs="+", default=[], metavar="STAGE=M",
                   help="replace the recipe's minutes of these stages, e.g. --minutes tokenizer=5.5 "
                        "transformer=2.5 (applied before --budget-minutes scales them all)")
    p.add_argument("--arg", nargs="+", default=[], metavar="STAGE.KEY=VALUE", dest="recipe_args",
                   help="set a recipe option of a stage without editing the YAML, e.g. --arg "
                        "tokenizer.learning_rate=8e-4 transformer.hflip=false "
                        "'tokenizer.set=dec_channels=[64,128,256]' (KEY as in the recipe's args, VALUE read as "
                        "YAML; a `set` item is added to the recipe's set list)")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated subset of {','.join(STAGES)} to run (in that order)")
    p.add_argument("--force", default=None, choices=STAGES,
                   help="rerun this stage even if it finished (the stages after it run again too)")
    p.add_argument("--dry-run", action="store_true", help="print every selected stage's command and exit")
    args = p.parse_args(argv)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        p.error(f"--stages: {args.stages!r}: choose from {','.join(STAGES)}")
    if args.force and args.force not in stages:
        p.error(f"--force {args.force}: not among --stages {args.stages}")
    if args.budget_minutes is not None and args.budget_minutes <= 0:
        p.error("--budget-minutes must be positive")
    minutes = {}
    for item in args.minutes:
        stage, _, value = item.partition("=")
        try:
            m = float(value)
        except ValueError:
            m = -1.0
        if stage not in STAGES or not (m >= 0 and m != float("inf")):
            p.error(f"--minutes {item}: expected STAGE=MINUTES with STAGE one of {','.join(STAGES)} and "
                    f"MINUTES a number >= 0")
        minutes[stage] = m
    recipe_args = []
    for item in args.recipe_args:
        target, sep, value = item.partition("=")
        stage, dot, key = target.partition(".")
        if not sep or not dot or not key or stage not in ARG_STAGES:
            p.error(f"--arg {item}: expected STAGE.KEY=VALUE with STAGE one of {','.join(ARG_STAGES)}")
        recipe_args.append((stage, key, value))
    return PipelineOptions(args.recipe, args.out, args.data, args.gt, args.device, args.budget_minutes,
                           tuple(minutes.items()), stages, args.force, args.dry_run, args.tokenizer,
                           tuple(recipe_args))


def main(argv=None) -> dict:
    return run_pipeline(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
