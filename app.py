"""The inpainting page: draw a hole on a cat in the browser and watch MaskGIT fill it.

    pip install -r requirements-app.txt
    python app.py                                    # bundled small models, http://127.0.0.1:7860
    python app.py --transformer PATH [--config YML] [--vqgan PATH] [--device cuda] [--port 8000]

A FastAPI server with a page of its own (``web/``, served locally: the page works offline).
Every inpainting goes through ``utils.inpaint.inpaint_batch``, the function ``inpainting.py``
runs, and every generation through ``utils.inpaint.generate_images``: for the same image, mask,
options and seed the page shows ``inpainting.py``'s output for a folder holding only that image
(image index 0). One request at a time uses the model (a lock); the server answers in worker
threads, so the page stays responsive. Bad input comes back as a one-line message, never a traceback.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import io
import os
import secrets
import threading
import time
from collections import OrderedDict

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel, ConfigDict, Field, field_validator
    from starlette.concurrency import run_in_threadpool
except ImportError as e:  # the core install stays the lab's packages
    raise SystemExit(f"app.py needs the web packages ({e.name} is missing): pip install -r requirements-app.txt")

from models import SCHEDULES
from models.decoding import CONFIDENCES, ORDERS, TOKEN_CHOICES
from utils.build import BUNDLED_CONFIG, BUNDLED_TRANSFORMER, checkpoint_config, load_inference_model
from utils.config import REPO_ROOT, resolve_path
from utils.data import (HOLE_GRAY, TEST_MEAN, TEST_STD, DataError, default_data_root, find_lab_layout, list_images,
                        load_mask, normalize, pil_to_tensor01, pixel_to_token_mask, read_image, to_uint8)
from utils.inpaint import InpaintOptions, generate_images, inpaint_batch, latent_mask_images, token_choice_options
from utils.runtime import create_logger, get_device, keep_freed_memory, resolve_precision

WEB_DIR = REPO_ROOT / "web"
EXAMPLES_DIR = WEB_DIR / "examples"
MAX_PIXELS = 50_000_000  # uploads with more pixels are refused before decoding
STORE_SIZE = 256  # uploaded and result images kept in memory (64x64x3 bytes each)

log = create_logger()


class AppError(Exception):
    """A problem with the request that the page shows as it is."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class DecodeRequest(BaseModel):
    """Decoding options of the page (the rest of :class:`InpaintOptions` keeps its defaults)."""
    model_config = ConfigDict(extra="forbid")
    mask_func: str = "cosine"
    total_iter: int = Field(10, ge=1, le=64)
    token_choice: str | None = None  # None: the model config's (inpainting.py's default too)
    confidence: str = "prob"
    order: str = "confidence"
    choice_temperature: float | None = Field(None, ge=0, le=100)
    sample_temperature: float | None = Field(None, gt=0, le=100)  # None: the model config's (with sample)
    paste_known: bool = False
    refine: int = Field(0, ge=0, le=200)  # steps of fitting the final decode to the known pixels (--refine)
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @field_validator("mask_func", "token_choice", "confidence", "order")
    @classmethod
    def _one_of(cls, v, info):
        if v is None and info.field_name == "token_choice":
            return v
        choices = {"mask_func": SCHEDULES, "token_choice": TOKEN_CHOICES, "confidence": CONFIDENCES,
                   "order": ORDERS}[info.field_name]
        if v not in choices:
            raise ValueError(f"{info.field_name} must be one of {', '.join(choices)}, got {v!r}")
        return v


class InpaintRequest(DecodeRequest):
    source: str  # "lab:12", "example:cat_1" or "img:<id>" (an upload or an earlier result)
    hole: str  # H*W characters in raster order, "1" = hole, "0" = known


class HoleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hole: str


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="MaskGIT inpainting in the browser")
    p.add_argument("--transformer", "--load-transformer-ckpt-path", dest="transformer", default=None,
                   help="transformer checkpoint, lab raw or ours (default: the bundled small model)")
    p.add_argument("--config", "--MaskGitConfig", dest="config", default=None,
                   help="config YAML (default: the one stored in our checkpoints, else config/MaskGit.yml; "
                        f"{BUNDLED_CONFIG} for the bundled model)")
    p.add_argument("--vqgan", "--vqgan-ckpt", dest="vqgan", default=None,
                   help="tokenizer weights (default: VQ_CKPT_path of the config)")
    p.add_argument("--device", default="auto", help="cuda | cpu | auto (CUDA when present)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--data", default=None, help="lab dataset root for the test images (default: found beside us)")
    p.add_argument("--gt-path", default=None, help="originals of the test images (default: lab3_test_gt beside "
                                                   "the dataset, when present)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="larger uploads are refused")
    return p.parse_args(argv)


def load_model(args, device):
    """MaskGit from the checkpoint and its config (the bundled pair by default), as inpainting.py."""
    ckpt = args.transformer or str(REPO_ROOT / BUNDLED_TRANSFORMER)
    config = args.config or (None if args.transformer else str(REPO_ROOT / BUNDLED_CONFIG))
    cfg, obj = checkpoint_config(ckpt, config)
    return load_inference_model(cfg, obj, resolve_path(ckpt), args.vqgan).to(device), os.path.basename(ckpt)


def png_data_url(arr: np.ndarray) -> str:
    """uint8 (H,W,3) or (H,W) -> a PNG data URL."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def fit_upload(data: bytes, size: int) -> np.ndarray:
    """Any picture PIL reads -> (size, size, 3) uint8: EXIF-rotated, transparency on white,
    centre-cropped to a square and resized."""
    if not data:
        raise AppError("the file is empty")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise AppError(f"the picture has {im.width}x{im.height} pixels; at most {MAX_PIXELS // 10**6} "
                               f"million are accepted")
            im.draft("RGB", (size * 4, size * 4))  # JPEG: decode at a reduced scale
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                rgba = im.convert("RGBA")
                im = Image.new("RGB", rgba.size, "white")
                im.paste(rgba, mask=rgba.getchannel("A"))
            im = ImageOps.fit(im.convert("RGB"), (size, size), Image.LANCZOS)
    except UnidentifiedImageError as e:
        raise AppError("the file is not an image (PNG, JPEG, WebP, GIF, BMP, TIFF and the like are accepted)") from e
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        raise AppError(f"the image cannot be read ({' '.join(str(e).split()) or type(e).__name__})") from e
    return np.asarray(im, dtype=np.uint8).copy()


class LabImages:
    """The lab's test images (masked_image/ paired with mask64/ by sorted order) and, when
    present, their originals (same file name in ``gt_dir``)."""

    def __init__(self, root: str, gt_dir: str | None, size: int):
        lay = find_lab_layout(root)
        self.images, self.masks = list_images(lay.masked_image, "masked image"), list_images(lay.mask64, "mask")
        if len(self.images) != len(self.masks):
            raise DataError(f"{len(self.images)} masked images but {len(self.masks)} masks under {root}")
        self.gt_dir, self.size = gt_dir, size
        self.with_originals = sum(self.original(i) is not None for i in range(len(self.images)))

    def original(self, i: int) -> str | None:
        p = os.path.join(self.gt_dir, os.path.basename(self.images[i])) if self.gt_dir else None
        return p if p and os.path.isfile(p) else None

    def get(self, i: int):
        """(image (H,W,3) uint8: the original when known, else the masked image; lab hole (H,W) bool; note)."""
        if not 0 <= i < len(self.images):
            raise AppError(f"lab test images are numbered 0..{len(self.images) - 1}, got {i}")
        hole = load_mask(self.masks[i], self.size)[0].numpy() < 0.5  # (H, W) True = hole
        orig = self.original(i)
        img = read_image(orig or self.images[i], self.size)
        note = (f"the original of {os.path.basename(self.images[i])}, with the lab's hole to start from" if orig else
                f"{os.path.basename(self.images[i])}: original unknown, its hole is gray (keep it in the mask)")
        return np.asarray(img, dtype=np.uint8).copy(), hole, note


class Engine:
    """The model, the images the page can pick, and one lock: one request at a time uses the model."""

    def __init__(self, model, name: str, device, precision: str, lab: LabImages | None, max_upload_bytes: int):
        self.model, self.name, self.device, self.precision = model, name, device, precision
        self.size = model.vqgan.cfg.img_resolution
        self.res = model.vqgan.cfg.latent_resolution
        self.lab, self.max_upload_bytes = lab, max_upload_bytes
        self.examples = sorted(os.path.splitext(f)[0] for f in os.listdir(EXAMPLES_DIR) if f.endswith(".png"))
        self.store: OrderedDict[str, np.ndarray] = OrderedDict()
        self.store_lock, self.model_lock = threading.Lock(), threading.Lock()

    def info(self) -> dict:
        n_params = sum(p.numel() for p in self.model.transformer.parameters())
        return {"model": f"{self.name} ({n_params / 1e6:.2f} M parameters) on {self.device}/{self.precision}",
                "image_size": self.size, "latent_resolution": self.res, "schedules": list(SCHEDULES),
                "token_choices": list(TOKEN_CHOICES), "confidences": list(CONFIDENCES), "orders": list(ORDERS),
                "examples": self.examples,
                "defaults": {"mask_func": self.model.gamma_type, "total_iter": 10, **self.model.decoding,
                             "confidence": "prob", "order": "confidence",
                             "choice_temperature": self.model.choice_temperature, "paste_known": False, "refine": 0,
                             "seed": 0},
                "lab": None if self.lab is None else {"count": len(self.lab.images),
                                                      "with_originals": self.lab.with_originals},
                "max_upload_bytes": self.max_upload_bytes}

    def remember(self, img: np.ndarray) -> str:
        key = "img:" + secrets.token_hex(8)
        with self.store_lock:
            self.store[key] = img
            while len(self.store) > STORE_SIZE:
                self.store.popitem(last=False)
        return key

    def source(self, key: str):
        """(image (H,W,3) uint8, initial hole (H,W) bool, note) of a source id."""
        kind, _, name = key.partition(":")
        empty = np.zeros((self.size, self.size), bool)
        if kind == "lab" and self.lab is not None and name.isdigit():
            return self.lab.get(int(name))
        if kind == "example" and name in self.examples:
            img = read_image(str(EXAMPLES_DIR / f"{name}.png"), self.size, resize=True)
            return np.asarray(img, dtype=np.uint8).copy(), empty, "generated by the bundled model"
        if kind == "img":
            with self.store_lock:
                img = self.store.get(key)
            if img is not None:
                return img, empty, ""
        raise AppError(f"unknown image {key!r} (the server may have restarted): pick or upload an image again")

    def describe(self, key: str) -> dict:
        img, hole, note = self.source(key)
        return {"id": key, "image": png_data_url(img), "hole": self.hole_string(hole), "note": note}

    def upload(self, data: bytes) -> dict:
        key = self.remember(fit_upload(data, self.size))
        return {**self.describe(key), "note": f"your picture, centre-cropped and resized to {self.size}x{self.size}"}

    def parse_hole(self, s: str) -> np.ndarray:
        n = self.size * self.size
        if len(s) != n or s.strip("01"):
            raise AppError(f"the hole must be {n} characters of 0 and 1, got {len(s)}")
        return (np.frombuffer(s.encode("ascii"), np.uint8) == ord("1")).reshape(self.size, self.size)  # (H, W)

    @staticmethod
    def hole_string(hole: np.ndarray) -> str:
        return "".join("1" if v else "0" for v in hole.ravel())

    def token_mask(self, hole: np.ndarray) -> torch.Tensor:
        """The lab's rule, as inpaint_batch applies it: a token is known only if all its pixels are."""
        pm = torch.from_numpy((~hole).astype(np.float32))[None, None]  # (1, 1, H, W) 1 = known
        return pixel_to_token_mask(pm, self.res, "lab")  # (1, N) True = masked

    def token_mask_image(self, token_mask: torch.Tensor) -> str:
        """(1, N) True = masked -> a res x res PNG, white = known, black = masked (as mask_scheduling/)."""
        return png_data_url(to_uint8(latent_mask_images(token_mask.cpu(), self.res)[0]))

    def options(self, req: DecodeRequest) -> InpaintOptions:
        # the page sends its temperature field with argmax too, where it changes nothing
        sampled = (req.token_choice or self.model.decoding["token_choice"]) == "sample"
        choice = token_choice_options(self.model.decoding, req.token_choice,
                                      req.sample_temperature if sampled else None)
        chosen = {"total_iter": req.total_iter, "mask_func": req.mask_func, "seed": req.seed, **choice,
                  "choice_temperature": req.choice_temperature, "confidence": req.confidence, "order": req.order,
                  "paste_known": req.paste_known, "refine": req.refine, "visualize": True,
                  "precision": self.precision}
        return InpaintOptions(**chosen)  # every other option keeps inpainting.py's default

    @contextlib.contextmanager
    def model_turn(self, wait_s: float = 120.0):
        """Hold the model for one request: requests decode one at a time (memory stays that of one), and one
        that waits longer than ``wait_s`` is refused."""
        if not self.model_lock.acquire(timeout=wait_s):
            raise AppError("the model is busy with other requests; try again in a moment", 503)
        try:
            yield
        finally:
            self.model_lock.release()

    def steps_payload(self, result, steps: torch.Tensor) -> dict:
        """steps (S, 3, H, W) in [0,1] and the latent mask after each step, as the CLI's imga/ and mask_scheduling/."""
        masks = latent_mask_images(torch.stack([m[0] for m in result.mask_per_step]).cpu(), self.res)  # (S,3,h,w)
        return {"steps": [png_data_url(to_uint8(s)) for s in steps.cpu()],
                "step_masks": [png_data_url(to_uint8(m)) for m in masks]}

    def inpaint(self, req: InpaintRequest) -> dict:
        base, _, _ = self.source(req.source)
        hole = self.parse_hole(req.hole)  # (H, W) True = hole
        if not hole.any():
            raise AppError("the hole is empty: paint over the image with the brush or drag a box first")
        masked = base.copy()
        masked[hole] = HOLE_GRAY  # what the lab's masked_image/ files look like
        x = normalize(pil_to_tensor01(Image.fromarray(masked)), TEST_MEAN, TEST_STD)[None]  # (1, 3, H, W)
        pm = torch.from_numpy((~hole).astype(np.float32))[None, None]  # (1, 1, H, W) 1 = known
        opts = self.options(req)
        with self.model_turn():
            t0 = time.perf_counter()
            out, result, token_mask, steps = inpaint_batch(self.model, x.to(self.device), pm.to(self.device), [0],
                                                           opts, self.device, with_steps=True)
            seconds = time.perf_counter() - t0
        out_u8 = to_uint8(out[0])
        log.info("inpainted %s: %d masked tokens, %s T=%d, %.2f s", req.source, int(token_mask.sum()),
                 opts.mask_func, opts.total_iter, seconds)
        return {"input": png_data_url(masked), "result": png_data_url(out_u8), "result_id": self.remember(out_u8),
                "mask": png_data_url(np.where(hole, 0, 255).astype(np.uint8)),  # the lab's mask64 format
                "token_mask": self.token_mask_image(token_mask), "masked_tokens": int(token_mask.sum()),
                "seconds": seconds, **self.steps_payload(result, steps[0])}

    def generate(self, req: DecodeRequest) -> dict:
        opts = self.options(req)
        with self.model_turn():
            t0 = time.perf_counter()
            imgs, result, steps = generate_images(self.model, 1, opts, self.device, with_steps=True)
            seconds = time.perf_counter() - t0
        out_u8 = to_uint8(imgs[0])
        gray = np.full((self.size, self.size, 3), HOLE_GRAY, np.uint8)
        all_masked = torch.ones(1, self.res ** 2, dtype=torch.bool)  # (1, N)
        log.info("generated an image: %s T=%d, seed %d, %.2f s", opts.mask_func, opts.total_iter, opts.seed, seconds)
        return {"input": png_data_url(gray), "result": png_data_url(out_u8), "result_id": self.remember(out_u8),
                "mask": png_data_url(np.zeros((self.size, self.size), np.uint8)),
                "token_mask": self.token_mask_image(all_masked), "masked_tokens": self.res ** 2,
                "seconds": seconds, **self.steps_payload(result, steps[0])}

    def warm_up(self) -> None:
        """One small decode, so that the first request does not pay for the first call of each kernel."""
        hole = np.zeros((self.size, self.size), bool)
        hole[self.size // 4: self.size // 2, self.size // 4: self.size // 2] = True
        key = self.remember(np.full((self.size, self.size, 3), HOLE_GRAY, np.uint8))
        self.inpaint(InpaintRequest(source=key, hole=self.hole_string(hole), total_iter=2))


def validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(p for p in err.get("loc", ()) if isinstance(p, str) and p != "body")  # a field's name
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", "invalid"))
    return "bad request: " + "; ".join(parts)


def add_error_handlers(app: FastAPI) -> None:
    """Every failure becomes {"error": one line} for the page; tracebacks stay in the server's log."""

    @app.exception_handler(AppError)
    async def _app_error(_, exc: AppError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(DataError)
    async def _data_error(_, exc: DataError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_, exc: RequestValidationError):
        return JSONResponse({"error": validation_message(exc)}, status_code=422)

    @app.exception_handler(Exception)
    async def _internal(_, exc: Exception):
        log.exception("request failed")
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); details are in the server's log"},
                            status_code=500)


def create_app(engine: Engine) -> FastAPI:
    app = FastAPI(title="MaskGIT inpainting", docs_url=None, redoc_url=None, openapi_url=None)
    add_error_handlers(app)

    @app.get("/")
    def index():
        return FileResponse(WEB_DIR / "index.html")

    @app.get("/api/info")
    def info():
        return engine.info()

    @app.get("/api/source")
    def source(id: str):
        return engine.describe(id)

    @app.post("/api/upload")
    async def upload(request: Request):
        limit = engine.max_upload_bytes
        too_big = AppError(f"the file is larger than {limit / 2**20:.0f} MB", 413)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise too_big
        return await run_in_threadpool(engine.upload, bytes(data))

    @app.post("/api/token-mask")
    def token_mask(req: HoleRequest):
        tm = engine.token_mask(engine.parse_hole(req.hole))  # (1, N) True = masked
        return {"token_mask": engine.token_mask_image(tm), "masked_tokens": int(tm.sum()), "tokens": tm.shape[1]}

    @app.post("/api/inpaint")
    def inpaint(req: InpaintRequest):  # a plain def: FastAPI runs it in a worker thread
        return engine.inpaint(req)

    @app.post("/api/generate")
    def generate(req: DecodeRequest):
        return engine.generate(req)

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


def find_lab(args, size: int) -> LabImages | None:
    root = args.data or default_data_root()
    if root is None:
        log.info("no lab dataset found (pass --data): the page offers the examples and uploads")
        return None
    gt = args.gt_path or os.path.join(os.path.dirname(os.path.abspath(root)), "lab3_test_gt")
    lab = LabImages(resolve_path(root), gt if os.path.isdir(gt) else None, size)
    log.info("lab test images: %d from %s (%d with originals)", len(lab.images), root, lab.with_originals)
    return lab


def main(argv=None) -> None:
    args = parse_args(argv)
    keep_freed_memory()  # CPU decoding without page faults on its large tensors
    device = get_device(args.device)
    try:
        precision = resolve_precision(args.precision, device)
        model, name = load_model(args, device)
        lab = find_lab(args, model.vqgan.cfg.img_resolution)
    except (ValueError, OSError) as e:  # a missing or unfit checkpoint, config or dataset: one line
        raise SystemExit(f"app.py: error: {' '.join(str(e).split())}") from e
    engine = Engine(model, name, device, precision, lab, int(args.max_upload_mb * 2**20))
    t0 = time.perf_counter()
    engine.warm_up()
    log.info("model %s on %s/%s, warmed up in %.1f s", name, device, precision, time.perf_counter() - t0)
    log.info("the inpainting page: http://%s:%d/", args.host, args.port)
    uvicorn.run(create_app(engine), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
