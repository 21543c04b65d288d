"""``tokred viz``: a PNG of which input patches every token covers, per layer, for one image.

Runs one image through a model patched with one reducer and draws the trace with
:func:`tokred.viz.save_sources`: the input, then one panel per layer where every group of patches
that one token stands for is filled with its mean colour (white borders between tokens) and
pruned patches are dark grey.

Default: the embedded reference ViT on digit ``--index`` of its held-out split, ``tome:r=4``.
With ``--model`` (a timm name; random weights unless ``--pretrained``): ``--image``, default
``assets/sample.jpg``, resized to the model's input size, and ``tome:r=16``.
"""
from __future__ import annotations

from pathlib import Path

DEFAULT_OUT = Path("results/viz/tokred_viz.png")
REFERENCE_REDUCER = "tome:r=4"
TIMM_REDUCER = "tome:r=16"
#: displayed pixels per patch in each panel
PATCH_PIXELS = 16


def parse_layers(text: str | None) -> list[int] | None:
    """``"2,5,-1"`` -> [2, 5, -1]; None or ``"all"`` -> None (every layer)."""
    if text is None or text.strip().lower() == "all":
        return None
    try:
        layers = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--layers must be comma-separated block indices such as 2,5 or 'all', got '{text}'") from None
    return layers


def _default_image() -> Path:
    from tokred.reference import assets_dir

    return assets_dir() / "sample.jpg"


def _reference_input(args):
    """(normalised batch of one, display image in [0, 1], description) for the reference model."""
    import numpy as np
    import torch
    from PIL import Image

    from tokred.cli import checks
    from tokred.reference import load_reference_config, load_reference_data, normalise

    config = load_reference_config()
    norm, size = config["normalisation"], config["input_size"][-1]
    if args.image is not None:
        grey = np.asarray(checks.image(args.image, "L").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255
        unit = torch.from_numpy(grey)[None]
        return normalise(unit, norm["mean"], norm["std"])[None], unit, f"{args.image} (grey, {size}x{size})"
    images, labels = load_reference_data()
    index = 0 if args.index is None else args.index
    if not 0 <= index < len(images):
        raise ValueError(f"--index must be in 0..{len(images) - 1} (the held-out digits), got {index}")
    unit = images[index] * norm["std"] + norm["mean"]  # undo the normalisation for display
    return images[index:index + 1], unit.clamp(0, 1), f"held-out digit {index} (label {int(labels[index])})"


def _timm_input(model, path: Path):
    import numpy as np
    import torch
    from PIL import Image
    from timm.data import resolve_data_config

    from tokred.cli import checks

    config = resolve_data_config({}, model=model)
    channels, height, width = config["input_size"]
    picture = checks.image(path, "RGB" if channels == 3 else "L").resize((width, height), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32).copy()) / 255
    unit = pixels.permute(2, 0, 1) if pixels.dim() == 3 else pixels[None]
    mean = torch.tensor(config["mean"][:channels]).view(-1, 1, 1)
    std = torch.tensor(config["std"][:channels]).view(-1, 1, 1)
    return ((unit - mean) / std)[None], unit, f"{path} ({width}x{height})"


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=None,
                        help="timm ViT name (default: the embedded reference ViT on a held-out digit)")
    parser.add_argument("--pretrained", action="store_true",
                        help="download pretrained weights for --model (without it its weights are random)")
    parser.add_argument("--image", type=Path, default=None,
                        help="input image (default with --model: assets/sample.jpg; with the reference model "
                             "a held-out digit, or this image in grey)")
    parser.add_argument("--index", type=int, default=None, help="which held-out digit (reference model; default 0)")
    parser.add_argument("--reducer", default=None,
                        help=f"reducer spec (tokred.parse_spec), e.g. tome:r=4/prop_attn=false (default: "
                             f"{REFERENCE_REDUCER} on the reference model, {TIMM_REDUCER} with --model)")
    parser.add_argument("--layers", default=None, help="comma-separated block indices to draw, e.g. 2,5 (default: all)")
    parser.add_argument("--tint", type=float, default=0.0,
                        help="0..1: blend each token's fill with a distinct hue (helps on flat images)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"PNG to write (default: {DEFAULT_OUT})")


def main(args) -> int:
    import torch

    import tokred
    from tokred import viz

    from tokred.cli import checks, vlm

    if vlm.is_checkpoint(args.model):
        raise ValueError("tokred viz draws vision-tower merges of timm ViTs; a VLM checkpoint is not supported yet "
                         "(use tokred bench --model DIR for its FLOPs and answer agreement)")
    checks.model(args.model)
    if args.pretrained and args.model is None:
        raise ValueError("--pretrained needs --model (the embedded reference model is always trained)")
    if args.index is not None and args.model is not None:
        raise ValueError("--index picks a held-out digit of the reference model; with --model use --image")
    if args.index is not None and args.image is not None:
        raise ValueError("give either --index (a held-out digit) or --image, not both")
    if not 0.0 <= args.tint <= 1.0:
        raise ValueError(f"--tint must be in [0, 1], got {args.tint}")
    spec = args.reducer or (REFERENCE_REDUCER if args.model is None else TIMM_REDUCER)
    reducers = tokred.parse_spec(spec)
    layers = parse_layers(args.layers)
    if args.image is not None:
        checks.image(args.image)  # missing or not an image: say so before the model loads

    if args.model is None:
        from tokred.reference import load_reference_model

        model = load_reference_model()
        batch, display, described = _reference_input(args)
        name = "tokred reference ViT (digits)"
    else:
        torch.manual_seed(0)
        model = checks.timm_model(args.model, args.pretrained)
        batch, display, described = _timm_input(model, args.image or _default_image())
        name = args.model + ("" if args.pretrained else " (random weights: merges are not meaningful)")

    depth = len(getattr(model, "blocks", []))
    if layers is not None:
        bad = [layer for layer in layers if not -depth <= layer < depth]
        if bad:
            raise ValueError(f"--layers {bad} out of range: the model has {depth} blocks (0..{depth - 1})")
    else:
        layers = list(range(depth)) if depth else None

    tokred.apply(model, *reducers)
    with torch.no_grad():
        model(batch)
    trace = tokred.last_trace(model)
    tokred.remove(model)
    viz.save_sources(args.out, display, trace, layers=layers, patch_size=PATCH_PIXELS, tint=args.tint)
    print(f"{name}, {described}, {spec}: tokens after each block {trace.tokens()}")
    for note in trace.notes[:3]:
        print(f"note: {note}")
    print(args.out)
    return 0
