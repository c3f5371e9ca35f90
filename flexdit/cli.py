"""The `flexdit` command: thin wrappers that parse, call the library and print (a table or --json)."""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from flexdit.checkpoints import LoadedCheckpoint, load_checkpoint, retarget
from flexdit.cpu import tune_for_cpu_inference
from flexdit.demo import run_demo
from flexdit.distributed import DTYPE_CHOICES, DTYPES, init_from_env, resolve_device, resolve_dtype, shutdown
from flexdit.errors import FlexDiTError
from flexdit.io import atomic_write, check_output, check_png_output, check_writable
from flexdit.measure.bench import bench
from flexdit.measure.flops import flops_report
from flexdit.models.core import BackboneConfig, FlexDiTCore
from flexdit.models.families import PIXART_NAMES, build_model, named_config
from flexdit.models.from_dense import ConversionReport
from flexdit.models.layout import Layout
from flexdit.nn.blocks import GEN
from flexdit.sampling import MAX_SEED, MODEL_DEFAULT, SAMPLERS, check_request, decode, image_grid, plan, sample, select
from flexdit.schedule import parse_density
from flexdit.vae import load_vae
from flexdit.video import decode_video, mp4_available, save_gif, save_mp4, save_png, video_grid

SUMMARY_TIMESTEPS = (0, 249, 500, 750, 999)
# integer arguments of every command that count something (checked once, at parsing)
AT_LEAST_ONE = {"num_heads", "depth", "hidden_size", "image_size", "input_size", "sparse_grid", "steps", "batch",
                "frames", "batch_size", "num", "grid_max", "repeats", "per_class", "intervals", "keep", "ckpt_every",
                "log_every", "shard_size"}
AT_LEAST_ZERO = {"warmup", "lr_warmup"}
ALLOCATION_FAILURES = ("can't allocate memory", "out of memory", "Storage size calculation overflowed")
MAX_COUNT = 10**8  # far beyond any sensible count, far below an integer overflow or a label list filling memory
PATHS = {"out", "data", "init", "ckpt", "teacher", "vae", "npz", "images", "dense", "flexdit", "inception", "src",
         "text_encoder", "captions", "captions_file", "videos",
         "dst", "samples", "reference"}  # an empty string for these is a slip, never a path
FLAGS = {"num": "--num-samples"}  # argument names whose flag is not --name
AUTO_DTYPE_HELP = ("auto (default): bf16 on a GPU that supports it and on a CPU that runs it natively (AVX512-BF16 or "
                   "AMX), fp32 elsewhere (an AVX2 CPU emulates bf16, about 5x slower)")


# --- summaries ------------------------------------------------------------------------------------------
def model_summary(model: FlexDiTCore) -> dict:
    c = model.config
    summary = {
        "family": model.FAMILY, "kind": _kind(model), "condition": model.condition_kind,
        "input_size": list(c.input_size), "patch_size": c.patch_size, "tokens": model.token_grid[0] * model.token_grid[1],
        "in_channels": c.in_channels, "hidden_size": c.hidden_size, "depth": c.depth, "num_heads": c.num_heads,
        "learn_sigma": c.learn_sigma, "layout": str(model.layout), "parameters": model.num_parameters(),
        "density": c.density,
    }
    if model.condition_kind == "caption":
        summary.update(caption_channels=c.caption_channels, learned_null_caption=c.learned_null_caption,
                       micro_conditions=getattr(c, "micro_conditions", False),
                       interpolation_scale=c.interpolation_scale)
    elif model.condition_kind == "class":
        summary.update(num_classes=c.num_classes, null_class=model.has_null_class)
    if hasattr(c, "frames"):
        summary["frames"] = c.frames
    if model.layout.has_sparse_tokens and model.density is not None:
        summary["grids"] = {t: "x".join(map(str, model.density.grid(t, model.token_grid))) for t in SUMMARY_TIMESTEPS}
    return summary


def print_summary(summary: dict, conversion: ConversionReport | None = None) -> None:
    rows = [
        ("model", f"{summary['kind']}  hidden {summary['hidden_size']}, depth {summary['depth']}, "
                  f"{summary['num_heads']} heads, patch {summary['patch_size']}"),
        ("input", f"{summary['in_channels']} x {summary['input_size'][0]} x {summary['input_size'][1]} latent, "
                  f"{summary['tokens']} tokens"),
        ("condition", _condition_summary(summary)),
        ("layout", summary["layout"]),
        ("parameters", f"{summary['parameters'] / 1e6:.2f} M"),
    ]
    if summary.get("density"):
        rows.append(("density", ", ".join(f"{k}={v}" for k, v in summary["density"].items())))
    if summary.get("grids"):
        rows.append(("grid at t", ", ".join(f"{t}: {g}" for t, g in summary["grids"].items())))
    if conversion is not None:
        rows.append(("new params", ", ".join(conversion.new) or "none"))
        rows.append(("unused", ", ".join(conversion.unused) or "none"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def _kind(model: FlexDiTCore) -> str:
    """DiT / FlexDiT, PixArt / FlexDiT-PixArt, Latte / FlexDiT-Latte."""
    if model.FAMILY == "dit":
        return "FlexDiT" if model.is_flexdit else "DiT"
    return ("FlexDiT-" if model.is_flexdit else "") + {"pixart": "PixArt", "latte": "Latte"}[model.FAMILY]


def _condition_summary(summary: dict) -> str:
    frames = f"{summary['frames']}-frame videos; " if "frames" in summary else ""
    return frames + _what_conditions(summary)


def _what_conditions(summary: dict) -> str:
    if summary["condition"] == "none":
        return "unconditional"
    if summary["condition"] == "caption":
        return (f"captions of {summary['caption_channels']}-channel T5 embeddings"
                + (", learned null caption" if summary["learned_null_caption"] else "")
                + (", resolution and aspect-ratio micro-conditions" if summary["micro_conditions"] else ""))
    return f"{summary['num_classes']} classes" + (" + null class (guidance)" if summary["null_class"] else "")


# --- commands -----------------------------------------------------------------------------------------
def _load_options(args) -> dict:
    return dict(num_heads=args.num_heads, input_size=args.input_size, sparse_grid=args.sparse_grid,
                weights=args.weights, timestep_freq_shift=args.timestep_freq_shift,
                density=args.density, grid=args.grid, frames=args.frames)


def cmd_info(args) -> None:
    loaded = load_checkpoint(args.ckpt, **_load_options(args))
    summary = {"path": args.ckpt, "format": loaded.format, "notes": loaded.notes, **model_summary(loaded.model)}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{args.ckpt} ({loaded.format})")
    print_summary(summary)
    for note in loaded.notes:
        print(f"  note: {note}")


def cmd_convert(args) -> None:
    options = _load_options(args)
    density = parse_density(options.pop("density"), options.pop("grid"))  # bad values fail before the load
    check_output(args.dst, source=args.src)
    loaded = load_checkpoint(args.src, **options)
    layout = args.layout or ("default" if loaded.model.layout.is_dense else None)
    loaded = retarget(loaded, layout, density)  # validates layout and density: nothing is written if they fail
    loaded.model.save(args.dst)
    summary = {"source": args.src, "source_format": loaded.format, "output": args.dst,
               "output_bytes": os.path.getsize(args.dst), "notes": loaded.notes, **model_summary(loaded.model)}
    if loaded.conversion is not None:
        summary["conversion"] = loaded.conversion.to_dict()
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    what = "dense -> FlexDiT" if loaded.conversion is not None else "format conversion"
    print(f"{args.src} ({loaded.format}) -> {args.dst} ({what}, {summary['output_bytes'] / 2**20:.1f} MiB)")
    print_summary(summary, loaded.conversion)
    for note in loaded.notes:
        print(f"  note: {note}")


def cmd_demo(args) -> None:
    """The shipped Fashion-MNIST dense DiT and FlexDiT, side by side: one PNG, GFLOPs, images/s, speedup."""
    run_demo(args.out, args.dense, args.flexdit, args.per_class, args.sampler, args.steps, args.cfg, args.seed,
             args.repeats, args.device, args.dtype, args.cpu_tuning)


def cmd_extract_latents(args) -> None:
    from flexdit.training.extract import extract_latents

    start = time.perf_counter()
    if args.videos is not None:
        from flexdit.training.video_data import extract_video_latents

        meta = extract_video_latents(args.videos, args.vae, args.out, args.frames, args.image_size, args.batch,
                                     args.flip, args.shard_size, args.device)
    elif args.image_size is None:
        raise FlexDiTError("--images needs --image-size (the side images are centre-cropped to)")
    elif args.frames is not None:
        raise FlexDiTError("--frames goes with --videos; an image folder has no frames")
    else:
        meta = extract_latents(args.images, args.vae, args.out, args.image_size, args.batch, args.flip,
                               args.shard_size, args.device)
    n, elapsed = meta["num_samples"], time.perf_counter() - start
    print(f"wrote {n} latents {'x'.join(map(str, meta['latent_shape']))} ({meta['num_classes']} classes"
          f"{', with mirrored images' if meta['flip'] else ''}) to {args.out} in {elapsed:.1f} s "
          f"({n / elapsed:.1f} {'videos' if args.videos else 'images'}/s)")


def cmd_extract_captions(args) -> None:
    from flexdit.training.extract import extract_data_captions

    table = extract_data_captions(args.data, args.text_encoder, args.out, args.template, args.captions_file,
                                  args.batch, args.device)
    print(f"wrote {args.out}: {len(table.captions)} distinct captions of {table.max_length} tokens x "
          f"{table.channels} channels, one per {table.per} ({len(table)} {table.per} rows), e.g. {table.captions[0]!r}")


def _target_config(args, flexdit: bool = False) -> BackboneConfig:
    """The model a measurement is about: --ckpt, or a standard size at --image-size (latent = size / 8).
    A dense name or checkpoint becomes the FlexDiT of that size with --density/--grid/--layout, or always
    when `flexdit` is set (bench compares the two)."""
    density = parse_density(args.density, args.grid)
    if args.ckpt and (args.model or args.image_size):
        raise FlexDiTError("--ckpt measures the checkpoint's own size; drop --model and --image-size, or drop --ckpt")
    args.model, args.image_size = args.model or "DiT-XL/2", args.image_size or 256
    if args.ckpt and args.frames:
        raise FlexDiTError("--frames goes with --model; a checkpoint records its own frames")
    if args.ckpt:
        model = load_checkpoint(args.ckpt, num_heads=args.num_heads).model
        layout = args.layout or ("default" if (flexdit or density is not None) and model.layout.is_dense else None)
        return retarget(LoadedCheckpoint(model, "", args.ckpt), layout, density).model.config
    if args.image_size < 8 or args.image_size % 8:
        raise FlexDiTError(f"--image-size {args.image_size} must be a positive multiple of 8 (the VAE's downsampling)")
    layout = args.layout or ("default" if flexdit else None)
    return named_config(args.model, args.image_size, layout=layout, density=density, frames=args.frames)


def _latent(config: BackboneConfig) -> str:
    """'32x32', or '16 frames x 32x32' for a video model."""
    size = f"{config.input_size[0]}x{config.input_size[1]}"
    return f"{config.frames} frames x {size}" if hasattr(config, "frames") else size


def _flexdit_gflops_table(report) -> None:
    print(f"  {'grid':<8} {'steps':>6} {'GFLOPs':>9}")
    for grid, gflops in sorted(report.per_grid.items(), key=lambda kv: -kv[1]):
        print(f"  {grid:<8} {report.steps_per_grid[grid]:>6} {gflops:>9.2f}")


def cmd_flops(args) -> None:
    config = _target_config(args)
    the_plan = plan(args.sampler, args.steps)
    report = flops_report(config, the_plan.timesteps)
    result = {"model": args.ckpt or args.model, "layout": str(Layout(config.layout)), "density": config.density,
              "input_size": list(config.input_size), "frames": getattr(config, "frames", None),
              "sampler": args.sampler, "steps": the_plan.steps,
              **report.to_dict()}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['model']}  layout {result['layout']}  latent {_latent(config)}  "
          f"{args.sampler} {the_plan.steps} steps")
    print(f"  GFLOPs (multiply-adds, one forward, one sample): {report.gflops:.2f}   "
          f"dense: {report.dense_gflops:.2f}   "
          f"ratio {report.dense_gflops / report.gflops:.2f}x   saving {100 * report.saving:.1f}%")
    if GEN in config.layout:
        _flexdit_gflops_table(report)


def cmd_bench(args) -> None:
    config = _target_config(args, flexdit=True)
    if GEN not in config.layout:
        raise FlexDiTError("bench compares dense with a FlexDiT; give a FlexDiT layout, not --layout dense")
    flex = build_model(config)
    the_plan = plan(args.sampler, args.steps)
    timesteps = the_plan.timesteps
    units = args.warmup + args.repeats + 2  # timing rounds over every (model, grid), then memory of each model

    def progress(message: str) -> None:
        bar.set_description(message)
        bar.update(1)

    with tqdm(total=units, disable=args.json, leave=False) as bar:
        result = bench(flex, timesteps, args.device, args.dtype, args.batch, args.repeats, args.warmup, args.compile,
                       args.cpu_tuning, progress=progress)
    result.update(model=args.ckpt or args.model, layout=str(flex.layout), density=config.density,
                  input_size=list(config.input_size), frames=getattr(config, "frames", None), sampler=args.sampler,
                  steps=the_plan.steps)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    dtype = result["dtype"] + (" (--dtype auto)" if args.dtype == "auto" else "")
    print(f"{result['model']}  latent {_latent(config)}  {result['device']}  {dtype}  "
          f"batch {args.batch}  {'compiled' if args.compile else 'eager'}  median of {args.repeats}")
    print(f"  {'model':<8} {'GFLOPs':>8} {'ms/forward':>11} {'images/s':>9} {'peak MiB':>9} {'train-fwd MiB':>14}")
    for key in ("dense", "flexdit"):
        r = result[key]
        print(f"  {key:<8} {r['gflops']:>8.2f} {r['ms']:>11.1f} {r['images_per_s']:>9.2f} "
              f"{r['peak_memory_bytes'] / 2**20:>9.1f} {r['training_memory_bytes'] / 2**20:>14.1f}")
    print(f"  speedup {result['speedup']:.2f}x   FLOPs ratio {result['flops_ratio']:.2f}x   memory ratio "
          f"{result['memory_ratio']:.2f}x (inference), {result['training_memory_ratio']:.2f}x (training forward)")
    steps = result["steps_per_grid"]
    print("  FlexDiT per grid: " + ", ".join(f"{g} {ms:.1f} ms ({steps[g]} steps)"
                                           for g, ms in result["flexdit"]["per_grid_ms"].items()))


def cmd_eval(args) -> None:
    from flexdit.measure.evaluate import check_results_path, evaluate  # scipy: imported when needed only

    if args.inception and args.features != "inception":
        raise FlexDiTError(f"--inception gives the FID Inception's weights, which --features {args.features} does "
                           "not use; drop one of them")
    to_stdout = args.json == "-"
    if args.json and not to_stdout:
        check_results_path(args.json, (args.samples, args.reference))
        check_writable(args.json)
    result = evaluate(args.samples, args.reference, args.features, args.inception, args.batch_size,
                      resolve_device(args.device), progress=not to_stdout)
    text = json.dumps(result, indent=2)
    if to_stdout:
        print(text)
        return
    if args.json:
        atomic_write(args.json, lambda tmp: tmp.write_text(text + "\n"))
    fm = result["features"] == "fmnist"
    n_ref = result["num_reference"]
    print(f"{result['samples']} ({result['num_samples']} images) vs {result['reference']} "
          f"({'statistics only' if n_ref is None else f'{n_ref} images'}"
          f"{', precomputed statistics' if result['reference_statistics'] == 'precomputed' else ''}), "
          f"{'Fashion-MNIST classifier' if fm else 'Inception'} features")
    is_value = result["inception_score"]
    rows = [("FID-FM", result["fid"])] if fm else [("FID", result["fid"]), ("sFID", result["sfid"])]
    rows += [("IS-FM" if fm else "IS", None if is_value is None else f"{is_value:.4f} +- {result['inception_score_std']:.4f}"),
             ("precision", result["precision"]), ("recall", result["recall"])]
    if fm:
        rows.append(("class accuracy", result["class_accuracy"]))
    print(f"  {'metric':<15} {'value':>20}")
    for name, value in rows:
        shown = "n/a" if value is None else value if isinstance(value, str) else f"{value:.4f}"
        print(f"  {name:<15} {shown:>20}")
    for note in result["notes"]:
        print(f"  note: {note}")
    if args.json:
        print(f"wrote {args.json}")


def _sample_labels(args, num_classes: int) -> list[int]:
    if args.classes is not None:
        try:
            return [int(c) for c in args.classes.split(",")]
        except ValueError:
            raise FlexDiTError(f"cannot read --classes {args.classes!r}; expected ids such as 1,2,3") from None
    return [i % num_classes for i in range(args.num or 16)]  # balanced classes


def _sample_condition(args, model: FlexDiTCore, device: torch.device) -> tuple[object, list[int], dict]:
    """What conditions each requested sample, the ids written to the npz beside the images, and extra npz arrays:
    class ids for a DiT; for a PixArt the prompts (encoded by --text-encoder) or a caption table's captions,
    cycled over --num-samples, with the prompt index as the id."""
    text_options = [flag for flag, value in (("--prompt", args.prompt), ("--captions", args.captions),
                                             ("--text-encoder", args.text_encoder),
                                             ("--negative-prompt", args.negative_prompt)) if value is not None]
    if model.condition_kind != "caption":
        if text_options:
            takes = "--classes or --num-samples" if model.condition_kind == "class" else "--num-samples only"
            raise FlexDiTError(f"{text_options[0]} conditions a text-conditional model; this "
                               f"{'class-conditional' if model.condition_kind == 'class' else 'unconditional'} one "
                               f"takes {takes}")
        if model.condition_kind == "none":
            if args.classes is not None:
                raise FlexDiTError("--classes conditions a class-conditional model; this unconditional one takes "
                                   "--num-samples only")
            labels = [0] * (args.num or 16)
        else:
            labels = _sample_labels(args, model.config.num_classes)
        return labels, labels, {}
    if args.classes is not None:
        raise FlexDiTError("--classes is for class-conditional models; a text-conditional one takes --prompt (with "
                           "--text-encoder) or --captions")
    if (args.prompt is None) == (args.captions is None):
        raise FlexDiTError("a text-conditional model samples from captions: give --prompt TEXT (repeatable) with "
                           "--text-encoder T5_FOLDER, or --captions TABLE (written by flexdit extract-captions)")
    from flexdit.text import TextEncoder, caption_condition

    encoder = None if args.text_encoder is None else TextEncoder.load(
        args.text_encoder, device, torch.bfloat16 if model.dtype == torch.bfloat16 else torch.float32)
    needs_negative = args.cfg != 1 and (args.negative_prompt is not None or not model.can_guide)
    condition, ids, prompts = caption_condition(encoder, args.prompt, args.captions, args.num,
                                                (args.negative_prompt or "") if needs_negative else None)
    return condition, ids, {"prompts": np.array(prompts)}


def cmd_sample(args) -> None:
    for flag, path in (("--out", args.out), ("--npz", args.npz)):
        if path == "":
            raise FlexDiTError(f"{flag} is an empty path; give a file name")
    if args.vae == "none" and (args.out or not args.npz):
        raise FlexDiTError("--vae none keeps latents, which only an npz can hold, not a PNG: give --npz PATH "
                           "without --out")
    if not 0 < args.fps <= 50:
        raise FlexDiTError(f"--fps {args.fps}: give a frame rate in (0, 50] (GIF frames last whole centiseconds)")
    if args.mp4 and not mp4_available():
        raise FlexDiTError("--mp4 needs ffmpeg: pip install imageio-ffmpeg, or put ffmpeg on PATH; or drop --mp4 for "
                           "GIFs")
    if args.eta != 0 and args.sampler != "ddim":
        raise FlexDiTError(f"--eta is the DDIM noise; the {args.sampler} sampler has none: drop --eta or use "
                           "--sampler ddim")
    if args.npz and not args.npz.endswith(".npz"):
        args.npz += ".npz"  # numpy would add it to the file anyway
    out_png = args.out or (None if args.npz else "samples.png")
    if out_png:
        check_png_output(out_png, "--out", source=args.ckpt)
    if args.npz:
        check_writable(args.npz, source=args.ckpt)
    for name in ("batch", "grid_max"):
        if getattr(args, name) < 1:
            raise FlexDiTError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.num is not None and args.num < 1:
        raise FlexDiTError(f"--num-samples must be at least 1, got {args.num}")
    ctx, device = init_from_env(args.device)
    try:
        options = _load_options(args)
        dtype = resolve_dtype(args.dtype, device)
        model = load_checkpoint(args.ckpt, **options).model.to(device, DTYPES[dtype])
        if args.cpu_tuning:
            tune_for_cpu_inference(model, device)
        if ctx.is_main:
            tqdm.write(f"sampling in {dtype} on {device}" + (" (--dtype auto)" if args.dtype == "auto" else ""))
        condition, labels, extra = _sample_condition(args, model, device)
        condition = check_request(model, condition, args.cfg, args.eta, args.seed)  # before the progress bar starts
        if len(labels) < ctx.world_size:
            raise FlexDiTError(f"{len(labels)} samples cannot be shared by {ctx.world_size} processes; ask for at "
                               "least one sample per process")
        the_plan = plan(args.sampler, args.steps)
        vae = None
        if args.vae and args.vae != "none":
            vae = load_vae(args.vae, device)
        elif args.vae is None and model.in_channels not in (1, 3):
            raise FlexDiTError(f"this model makes {model.in_channels}-channel latents; pass --vae PATH "
                               "(a local sd-vae-ft-ema folder) or --vae none to keep the latents")
        mine = list(range(ctx.rank, len(labels), ctx.world_size))
        guided = {None: MODEL_DEFAULT, "all": None, "3": 3}[args.cfg_channels]
        results, start = [], time.perf_counter()
        with tqdm(total=len(mine), desc="samples", disable=not ctx.is_main) as bar:
            for k in range(0, len(mine), args.batch):
                idx = mine[k:k + args.batch]
                latents = sample(model, select(condition, idx), args.sampler, the_plan.steps, args.cfg, guided,
                                 args.eta, args.seed, idx, progress=ctx.is_main)
                decoded = decode_video(latents, vae) if latents.dim() == 5 else decode(latents, vae)
                results.append(latents.float().cpu() if args.vae == "none" else decoded)
                bar.update(len(idx))
        elapsed = time.perf_counter() - start
        arrays = torch.cat(results).numpy() if args.vae == "none" else np.concatenate(results)
        _gather_and_write(ctx, args, arrays, mine, labels, out_png, extra)
        if ctx.is_main:
            flops = flops_report(model, the_plan.timesteps)
            print(f"{len(labels)} samples, {args.sampler} {the_plan.steps} steps, cfg {args.cfg}: "
                  f"{len(mine) / elapsed:.2f} images/s on rank 0 ({ctx.world_size} process(es)); "
                  f"{flops.gflops:.2f} GFLOPs per forward (dense {flops.dense_gflops:.2f})")
    finally:
        shutdown()


def _gather_and_write(ctx, args, arrays: np.ndarray, mine: list[int], labels: list[int], out_png: str | None,
                      extra: dict[str, np.ndarray]) -> None:
    """Each rank writes its shard beside the output; rank 0 merges them in sample order."""
    if ctx.world_size > 1:
        shard = f"{args.npz or out_png}.rank{ctx.rank}.npz"
        atomic_write(shard, lambda tmp: np.savez(tmp, arr=arrays, idx=np.array(mine)))
        ctx.barrier()
        if not ctx.is_main:
            return
        parts = [np.load(f"{args.npz or out_png}.rank{r}.npz") for r in range(ctx.world_size)]
        order = np.argsort(np.concatenate([p["idx"] for p in parts]))
        arrays = np.concatenate([p["arr"] for p in parts])[order]
        for r in range(ctx.world_size):
            os.remove(f"{args.npz or out_png}.rank{r}.npz")
    label_array = np.array(labels, dtype=np.int64)
    if args.npz:
        key = "latents" if args.vae == "none" else "arr_0"
        labels_key = "labels" if key == "latents" else "arr_1"
        atomic_write(args.npz, lambda tmp: np.savez(tmp, **{key: arrays, labels_key: label_array}, **extra))
        print(f"wrote {args.npz}: {key} {arrays.dtype} {tuple(arrays.shape)}, "
              + ("prompt ids, prompts" if extra else "labels"))
    if out_png and args.vae != "none":
        shown = arrays[: args.grid_max]
        save_png(video_grid(shown) if shown.ndim == 5 else image_grid(shown), out_png)
        what = "videos, one per row" if shown.ndim == 5 else "images"
        print(f"wrote {out_png}: a grid of {len(shown)} {what}")
        if shown.ndim == 5:  # videos: each also as an animation a person can play
            save, suffix = (save_mp4, "mp4") if args.mp4 else (save_gif, "gif")
            stem = out_png[: -len(".png")]
            for i, video in enumerate(shown):
                save(video, f"{stem}-{i:03d}.{suffix}", args.fps)
            print(f"wrote {stem}-000.{suffix} .. {stem}-{len(shown) - 1:03d}.{suffix}: one per video, {args.fps} fps")


def cmd_train(args) -> None:
    from flexdit.training.trainer import TrainArgs, train

    fields = TrainArgs.__dataclass_fields__
    train(TrainArgs(**{k: v for k, v in vars(args).items() if k in fields}))


# --- parser -------------------------------------------------------------------------------------------
def _add_load_options(p: argparse.ArgumentParser, density_help: str) -> None:
    p.add_argument("--num-heads", type=int, help="heads, for hidden sizes outside the standard table")
    p.add_argument("--input-size", type=int, help="latent side (H = W), for files that do not record it")
    p.add_argument("--sparse-grid", type=int, help="SparseDiT files: the released code's fixed grid (default 8)")
    p.add_argument("--weights", choices=("ema", "model"), help="training checkpoints: which weights (default ema)")
    p.add_argument("--timestep-freq-shift", type=int, choices=(0, 1),
                   help="1 reproduces diffusers' DiT port exactly (default 0: the original DiT)")
    p.add_argument("--frames", type=int, help="diffusers Latte folders: frames to run at (original files record it)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--density", metavar="R_MIN,R_MAX", help=density_help)
    group.add_argument("--grid", metavar="G", help="a fixed sparse grid, G or HxW, at every timestep")


class Parser(argparse.ArgumentParser):
    """argparse with flexdit's one-line errors (`flexdit: error: ...`, exit 2) and the checks every command shares:
    float arguments are finite, counts are positive, seeds are in the samplers' range."""

    def error(self, message: str):
        command = self.prog.removeprefix("flexdit").strip()
        self.exit(2, f"flexdit: error: {command + ': ' if command else ''}{message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        parsed, extra = super().parse_known_args(args, namespace)
        for name, value in vars(parsed).items():
            flag = FLAGS.get(name, "--" + name.replace("_", "-"))
            if value == "" and name in PATHS:
                self.error(f"{flag} is an empty path; give a file or folder name")
            if isinstance(value, float) and not math.isfinite(value):
                self.error(f"{flag} {value}: give a finite number")
            if name in AT_LEAST_ONE and value is not None and value < 1:
                self.error(f"{flag} {value}: give a number of at least 1")
            if name in AT_LEAST_ZERO and value is not None and value < 0:
                self.error(f"{flag} {value}: give a number of at least 0")
            if name in AT_LEAST_ONE and value is not None and value > MAX_COUNT:
                self.error(f"{flag} {value} is too large; give at most {MAX_COUNT}")
        seed = getattr(parsed, "seed", 0)
        if not 0 <= seed <= MAX_SEED:
            self.error(f"--seed {seed} is out of range; give a seed from 0 to {MAX_SEED}")
        return parsed, extra


def _add_cpu_tuning(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpu-tuning", action=argparse.BooleanOptionalAction, default=True,
                   help="on the CPU: linear weights packed once for oneDNN, freed memory kept mapped (flexdit.cpu); "
                        "--no-cpu-tuning runs PyTorch's default kernels")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="flexdit", description="FlexDiT: dynamic token density for DiTs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="any supported checkpoint -> our format; dense DiT or PixArt -> FlexDiT")
    p.add_argument("src", help="DiT .pt/.safetensors, PixArt-alpha .pth, SparseDiT .pt, diffusers folder (DiT or "
                               "PixArt transformer, or its pipeline), or flexdit .safetensors")
    p.add_argument("dst", help="output .safetensors")
    p.add_argument("--layout", help="'default' (paper's layout for the depth), 'dense', or a spec such as "
                                    "2+4x1-3-1-1+2 (pool + SDTMs x gen-sparse-recover-dense + top); "
                                    "default: FlexDiT for a dense source, the source's layout otherwise")
    _add_load_options(p, "pruning rate range of the temporal schedule (default 0.61,0.86)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="describe a checkpoint: format, size, layout, density")
    p.add_argument("ckpt")
    _add_load_options(p, "show the grids of this schedule instead of the saved one")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    for name, func, help_ in (("flops", cmd_flops, "GFLOPs of a model, dense vs FlexDiT, averaged over a sampler"),
                              ("bench", cmd_bench, "time dense vs FlexDiT forward passes side by side")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--model", help=f"standard size, e.g. DiT-XL/2 (default), FlexDiT-B/2 or {PIXART_NAMES[0]} "
                                       "(256, 512 or 1024 px)")
        p.add_argument("--image-size", type=int, help="image pixels (latent = size / 8; default 256)")
        p.add_argument("--ckpt", help="measure a checkpoint's own config instead of --model")
        p.add_argument("--num-heads", type=int, help="with --ckpt: heads, for non-standard sizes")
        p.add_argument("--layout", help="FlexDiT layout ('default', 'dense' or a spec like 2+4x1-3-1-1+2)")
        p.add_argument("--frames", type=int, help="video models (Latte-*): frames per sample (default 16)")
        group = p.add_mutually_exclusive_group()
        group.add_argument("--density", metavar="R_MIN,R_MAX", help="temporal schedule (FlexDiT default 0.61,0.86)")
        group.add_argument("--grid", metavar="G", help="a fixed sparse grid, G or HxW")
        p.add_argument("--sampler", choices=SAMPLERS, default="ddpm", help="whose timesteps to average over")
        p.add_argument("--steps", type=int, help="default: ddpm 250, ddim 50, dpm 20")
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.set_defaults(func=func)
        if name == "bench":
            p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
            p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=AUTO_DTYPE_HELP)
            p.add_argument("--batch", type=int, default=1)
            p.add_argument("--repeats", type=int, default=5, help="timed forward passes per grid (median)")
            p.add_argument("--warmup", type=int, default=2)
            p.add_argument("--compile", action="store_true", help="torch.compile each grid's forward")
            _add_cpu_tuning(p)

    p = sub.add_parser("sample", help="generate images (DDPM, DDIM, DPM-Solver++), PNG grid and/or ADM npz")
    p.add_argument("--ckpt", required=True, help="any supported checkpoint")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--classes", help="class ids, e.g. 207,360,387")
    who.add_argument("--num-samples", "--num", dest="num", type=int,
                     help="number of samples, classes cycling 0..K-1 (default 16) or prompts cycling (default one "
                          "each); under torchrun write --num-samples (torchrun reads --num as its own --numa-binding)")
    p.add_argument("--prompt", action="append", help="PixArt: a prompt (repeat for several), with --text-encoder")
    p.add_argument("--text-encoder", help="PixArt: local T5 encoder folder (a model folder, or a pipeline folder "
                                          "with text_encoder/ and tokenizer/); nothing is downloaded")
    p.add_argument("--captions", help="PixArt: precomputed caption embeddings (flexdit extract-captions) instead of "
                                      "--prompt; each distinct caption once, cycled")
    p.add_argument("--negative-prompt", help="PixArt: the unconditional caption of guidance (default: the learned "
                                             "null caption, or T5 of \"\" for diffusers models, as their pipeline)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddpm")
    p.add_argument("--steps", type=int, help="default: ddpm 250, ddim 50, dpm 20")
    p.add_argument("--cfg", type=float, default=1.0, help="guidance scale (1 = off, no doubled batch)")
    p.add_argument("--cfg-channels", choices=("3", "all"),
                   help="guide the first 3 channels or all noise channels (default: the original's rule: DiT 3, "
                        "PixArt all)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0 = deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", help="PNG grid (default samples.png unless only --npz is given)")
    p.add_argument("--grid-max", type=int, default=64, help="at most this many images (videos) in the PNG grid")
    p.add_argument("--fps", type=float, default=8.0, help="videos: frames per second of the GIF/MP4 of each video")
    p.add_argument("--mp4", action="store_true", help="videos: MP4 (needs ffmpeg or imageio-ffmpeg) instead of GIF")
    p.add_argument("--npz", help="ADM evaluation npz: arr_0 uint8 NHWC, arr_1 labels")
    p.add_argument("--vae", help="local diffusers AutoencoderKL folder for latent models, or 'none' to keep latents")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=AUTO_DTYPE_HELP)
    _add_cpu_tuning(p)
    _add_load_options(p, "override the checkpoint's temporal schedule")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("train", help="fine-tune a FlexDiT from a dense DiT (or train any layout from scratch)")
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--init", help="checkpoint to start from; a dense DiT becomes a FlexDiT unless --layout dense")
    start.add_argument("--model", help="standard size trained from scratch, e.g. DiT-S/2 or FlexDiT-S/2")
    p.add_argument("--data", required=True, help="latent shards (flexdit extract-latents), an image folder with "
                                                 "one subfolder per class, or Fashion-MNIST idx files")
    p.add_argument("--out", default="runs/train", help="folder for checkpoints, log.jsonl and ema.safetensors")
    p.add_argument("--layout", help="'default', 'dense' or a spec such as 2+4x1-3-1-1+2")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--density", metavar="R_MIN,R_MAX", help="temporal schedule (default 0.61,0.86)")
    group.add_argument("--grid", metavar="G", help="a fixed sparse grid at every timestep")
    p.add_argument("--intervals", type=int, default=4, help="timestep intervals K (paper: 4)")
    p.add_argument("--mix-intervals", action="store_true",
                   help="every batch covers all K intervals (K forwards, gradients accumulated) instead of one "
                        "interval per process and step; for fewer processes than intervals")
    p.add_argument("--steps", type=int, default=1000, help="total optimiser steps (including resumed ones)")
    p.add_argument("--batch", type=int, default=32, help="global batch, split over torchrun processes")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, in (0, 1] (default 1e-4)")
    p.add_argument("--lr-warmup", type=int, default=0, help="steps of linear learning-rate warm-up (default none)")
    p.add_argument("--lr-schedule", default="constant",
                   help="after the warm-up: constant (default; the paper, DiT) or cosine (decay to 0 at --steps)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema", type=float, default=0.9999, help="EMA decay, in [0, 1) (default 0.9999)")
    p.add_argument("--ema-warmup", action="store_true",
                   help="EMA decay min(--ema, (1 + step) / (10 + step)): the average forgets the initialisation")
    p.add_argument("--teacher", metavar="CKPT", help="also learn to match this model's predictions (distillation; "
                                                     "usually the dense checkpoint of --init)")
    p.add_argument("--distill", type=float, default=1.0, help="weight of the distillation term (with --teacher)")
    p.add_argument("--label-dropout", type=float, default=0.1, help="null-class probability (guidance), in [0, 1)")
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept on disk")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out, with the settings recorded at its first start "
                        "(train_args.json); only --steps (not of a cosine run), --out, --device, --dtype, "
                        "--ckpt-every, --log-every, --keep and speed options may change")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="autocast dtype; " + AUTO_DTYPE_HELP)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--fsdp", action="store_true", help="shard the model over processes (XL)")
    p.add_argument("--flip", action="store_true", help="random horizontal flips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--num-heads", type=int, help="heads: of --init for non-standard sizes, or of a custom --model")
    p.add_argument("--hidden-size", type=int, help="--model: a custom width (e.g. 128)")
    p.add_argument("--depth", type=int, help="--model: a custom depth (e.g. 12)")
    p.add_argument("--image-size", type=int, help="image folders: crop size in pixels")
    p.add_argument("--vae", help="image folders: encode on the fly with this local VAE")
    p.add_argument("--frames", type=int, help="video data (Latte): frames per video (evenly spaced); an npz file "
                                              "of videos (N, F, H, W[, C]) is read as video data anyway")
    p.add_argument("--captions", help="PixArt: the caption table of --data (flexdit extract-captions); "
                                      "--label-dropout is then the probability of the null caption")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="FID, sFID, IS, precision/recall of an ADM sample npz against a reference npz")
    p.add_argument("samples", help="ADM npz: arr_0 uint8 NHWC images (flexdit sample --npz), optional arr_1 labels")
    p.add_argument("reference", help="ADM reference npz: arr_0 images and/or precomputed mu, sigma, mu_s, sigma_s")
    p.add_argument("--features", choices=("inception", "fmnist"), default="inception",
                   help="inception: FID Inception (ImageNet-style FID, sFID, IS); fmnist: the shipped "
                        "Fashion-MNIST classifier (FID-FM, IS-FM, class accuracy) for 1-channel 28/32 px images")
    p.add_argument("--inception", metavar="PATH", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                                                       "(default $FLEXDIT_INCEPTION, then torch hub's cache)")
    p.add_argument("--batch-size", type=int, help="images per forward (default inception 64, fmnist 500)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="print one JSON object; with PATH, write it there and print the table")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="the shipped Fashion-MNIST DiT and FlexDiT side by side: PNG, GFLOPs, speed")
    p.add_argument("--out", default="flexdit-demo.png", help="the side-by-side PNG (default flexdit-demo.png)")
    p.add_argument("--dense", help="dense DiT weights (default: the shipped Fashion-MNIST model)")
    p.add_argument("--flexdit", help="FlexDiT weights (default: the shipped Fashion-MNIST FlexDiT)")
    p.add_argument("--per-class", type=int, default=2, help="images per class (default 2)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=1.0, help="guidance scale (default 1: none, as the experiment)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="timed sampling runs per model after the PNG run (median)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=AUTO_DTYPE_HELP)
    _add_cpu_tuning(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("extract-latents", help="encode an image folder (or videos, frame by frame) with a VAE once, "
                                               "for fast training")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="image folder with one subfolder per class")
    source.add_argument("--videos", help="videos: an npz (N, F, H, W[, C]) with labels, or a folder with one "
                                         "subfolder per class and one subfolder of frame images per video")
    p.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder (e.g. sd-vae-ft-ema)")
    p.add_argument("--out", required=True, help="output folder: latents-NNNNN.safetensors shards + meta.json")
    p.add_argument("--image-size", type=int, help="images (and video frames in folders) are centre-cropped to this "
                                                  "side; required for --images")
    p.add_argument("--frames", type=int, help="--videos: frames per video (evenly spaced; default all)")
    p.add_argument("--batch", type=int, default=32, help="images (videos) per VAE forward")
    p.add_argument("--flip", action="store_true", help="also store the latents of the mirrored images")
    p.add_argument("--shard-size", type=int, default=10000, help="images per shard")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=cmd_extract_latents)

    p = sub.add_parser("extract-captions", help="encode a data source's captions with a local T5 once, for PixArt "
                                                "fine-tuning")
    p.add_argument("--data", required=True, help="the --data of training: latents, image folder or Fashion-MNIST")
    p.add_argument("--text-encoder", required=True, help="local T5 folder (model folder, or pipeline folder with "
                                                         "text_encoder/ and tokenizer/)")
    p.add_argument("--out", required=True, help="output caption table (.safetensors)")
    p.add_argument("--template", default="a photo of a {}", help="caption of each class, {} = its name (default "
                                                                  "'a photo of a {}')")
    p.add_argument("--captions-file", help="UTF-8 text, one caption per line: per class (label order) or per "
                                           "sample (sample order), instead of --template")
    p.add_argument("--batch", type=int, default=64, help="captions per T5 forward")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=cmd_extract_captions)
    return parser


def fail(message: str) -> None:
    """The one-line error every command ends with (a path holding a newline stays on one line)."""
    print(f"flexdit: error: {message}".replace("\n", "\\n"), file=sys.stderr)
    sys.exit(2)


class _PipeSafeStdout:
    """stdout that outlives its reader: once `| head` has closed the pipe, further output is dropped quietly and
    the command goes on (a sample or training run must still write its files)."""

    def __init__(self, stream):
        self._stream, self._closed = stream, False

    def write(self, text: str) -> int:
        if not self._closed:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self._closed:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._drop()

    def _drop(self) -> None:
        self._closed = True
        os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())  # the interpreter's last flush too

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not isinstance(sys.stdout, _PipeSafeStdout):
        sys.stdout = _PipeSafeStdout(sys.stdout)
    try:
        args.func(args)
        sys.stdout.flush()
    except FlexDiTError as e:
        fail(str(e))
    except OSError as e:  # the filesystem's word on a path (a name too long, a read-only disk, ...)
        fail(f"cannot use {e.filename or 'a file'}: {e.strerror or e}")
    except (MemoryError, RuntimeError) as e:
        # a size far beyond this machine: torch reports a failed CPU allocation as a RuntimeError
        if not isinstance(e, MemoryError) and not any(s in str(e) for s in ALLOCATION_FAILURES):
            raise
        fail("out of memory: the sizes asked for need more memory than this machine has; ask for smaller sizes "
             "or batches")
