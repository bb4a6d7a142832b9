"""Command line: ``python -m finetuners <command> …``.

    python -m finetuners sample --prompt "a red circle above a blue square" --steps 4 --out out/
    python -m finetuners sample --model stabilityai/sd-turbo --sampler ddim-trailing --steps 1 \
        --guidance 0 --device cuda --prompt "..."

Bad input prints one line on stderr and exits with status 2; nothing is written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import UserError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="shapes", help="pipeline folder, hub id in the local cache, or 'shapes'")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--allow-download", action="store_true", help="let a hub id be downloaded if not cached")


def cmd_sample(args: argparse.Namespace) -> int:
    from .generate import SampleRequest, generate
    from .imageio import save_png
    from .models import load_model, model_defaults

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} exists and is not a folder")
    pipe = load_model(args.model, args.device, args.dtype, allow_download=args.allow_download)
    defaults = model_defaults(pipe)
    request = SampleRequest(
        prompt=args.prompt,
        steps=args.steps if args.steps is not None else defaults.steps,
        sampler=args.sampler or defaults.sampler,
        eta=args.eta,
        guidance=args.guidance if args.guidance is not None else defaults.guidance,
        seed=args.seed,
        batch=args.batch,
        negative_prompt=args.negative_prompt,
        record_pred_x0=args.strip,
    )
    result = generate(pipe, request)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(result.images):
        path = out / f"seed{request.seed + i}.png"
        save_png(image, path)
        print(path)
    if args.strip:
        for i, strip in enumerate(result.pred_x0_images):
            save_png(strip, out / f"seed{request.seed + i}_pred_x0.png")
    print(f"{result.seconds_per_image:.3f} s/image, timesteps {result.timesteps}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m finetuners", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="generate images and write PNGs")
    _add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--sampler", choices=("ddim", "ddim-trailing", "lcm"), default=None)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity in [0, 1]")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance; ≤ 1 is off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--strip", action="store_true", help="also write the per-step x̂0 strip")
    p.add_argument("--out", default="out")
    p.set_defaults(func=cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 with a one-line usage error
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI promises no tracebacks; --debug shows them
        if args.debug:
            raise
        print(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (rerun with --debug)",
              file=sys.stderr)  # fmt: skip
        return 1


if __name__ == "__main__":
    sys.exit(main())
