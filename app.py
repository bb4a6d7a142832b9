"""The finetuners workbench: ``python app.py [--model shapes] [--device auto] [--port 7860] …``.

The composition root: it reads the flags, builds one ``Backend`` shared by every browser session, adds
one tab per ``ui`` module and launches. Binds 127.0.0.1 unless told otherwise; sharing and authentication
only on request. A bad flag prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import socket
import sys
from typing import TYPE_CHECKING

from finetuners.errors import UserError

if TYPE_CHECKING:
    import gradio as gr

log = logging.getLogger("finetuners.app")

CSS = """
#sample-gallery img, #sample-strip img { image-rendering: pixelated; }
#sample-gallery .fixed-height { min-height: 300px; max-height: none; }
#sample-strip .fixed-height { min-height: 120px; max-height: none; }
.pixel-gallery img { image-rendering: pixelated; }
.pixel-gallery .fixed-height { min-height: 240px; max-height: none; }
.error-text p, .error-text strong { color: var(--error-text-color, #b91c1c); }
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(2, f"error: {message} (see python app.py --help)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(prog="python app.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default="shapes", help="pipeline folder, hub id in the local cache, 'shapes' or 'shapes-partial'"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when present)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the app on the network")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    p.add_argument(
        "--auth",
        action="append",
        default=[],
        metavar="USER:PASSWORD",
        help="require this login for the whole app (repeat for more users)",
    )
    p.add_argument("--data-dir", default="data", help="where labels, images and runs are kept")
    p.add_argument("--labels-db", default=None, help="the label database file (default: <data-dir>/labels.db)")
    p.add_argument(
        "--labeller-names",
        default="required",
        choices=("required", "optional"),
        help="must every label record a name (optional: unnamed labels are recorded as 'anonymous')",
    )
    p.add_argument("--max-batch", type=int, default=16, help="most images one click may ask for")
    p.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    return p.parse_args(argv)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_auth(values: list[str]) -> list[tuple[str, str]] | None:
    pairs = []
    for value in values:
        user, sep, password = value.partition(":")
        if not sep or not user or not password:
            raise UserError("--auth must look like USER:PASSWORD with both parts non-empty")
        pairs.append((user, password))
    return pairs or None


def settings_from_args(args: argparse.Namespace):
    """Validate the flags that need no model loaded (device, dtype, folders, ports) → ``Settings``."""
    from finetuners.models import resolve_device, resolve_dtype, resolve_model_path
    from finetuners.names import typed_path
    from ui.backend import Settings

    device = resolve_device(args.device)
    resolve_dtype(args.dtype, device)
    resolve_model_path(args.model)  # a missing folder fails here, before the libraries load
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be between 1 and 65535, got {args.port}")
    if not 1 <= args.max_batch <= 64:
        raise UserError(f"--max-batch must be between 1 and 64, got {args.max_batch}")
    data_dir = typed_path(args.data_dir, "--data-dir")
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"--data-dir {str(data_dir)!r} exists and is not a folder")
    labels_db = typed_path(args.labels_db, "--labels-db") if args.labels_db else None
    if labels_db is not None and (labels_db.is_dir() or not labels_db.parent.is_dir()):
        raise UserError(f"--labels-db {str(labels_db)!r} must be a file in an existing folder")
    parse_auth(args.auth)
    public = args.share or not _is_loopback(args.host)
    return Settings(
        model=args.model,
        device=str(device),
        dtype=args.dtype,
        data_dir=data_dir,
        custom_models=not public,
        max_batch=args.max_batch,
        labels_db=labels_db,
        labeller_names=args.labeller_names,
    )


def build_app(backend) -> gr.Blocks:
    """Every tab, composed over one shared backend. Tabs to come: Label, Fine-tune, Adaptive steps."""
    import gradio as gr

    from ui.adaptive_tab import build_adaptive_tab
    from ui.finetune_tab import build_finetune_tab
    from ui.label_tab import build_label_tab
    from ui.sample_tab import build_sample_tab
    from ui.superpose_tab import build_superpose_tab

    with gr.Blocks(title="finetuners") as demo:
        gr.Markdown("## finetuners · few-step text-to-image workbench")
        with gr.Tabs():
            build_sample_tab(backend)
            build_label_tab(backend)
            build_finetune_tab(backend)
            build_adaptive_tab(backend)
            build_superpose_tab(backend)
    demo.queue(max_size=backend.settings.queue_size, default_concurrency_limit=backend.settings.concurrency)
    return demo


def check_port_free(host: str, port: int) -> None:
    """A ``UserError`` when ``host:port`` cannot be listened on (most often another app on it), said before the models
    load, not after. The server binds as this check does (SO_REUSEADDR); the launch still reports a port taken
    meanwhile."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(address)
    except OSError as e:
        why = "the port is in use (another app?)" if e.errno == errno.EADDRINUSE else e.strerror or e
        raise UserError(f"cannot listen on {host}:{port}: {why}; choose another with --port") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.debug:  # transformers' notices (e.g. about torchvision) are noise for someone starting the app
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    from ui.backend import Backend

    try:
        check_port_free(args.host, args.port)
        backend = Backend(settings_from_args(args))
        backend.preload()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - no tracebacks for the user; --debug shows them
        if args.debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"error: could not start: {type(e).__name__}: {first} (rerun with --debug)", file=sys.stderr)
        return 1
    if args.share and not args.auth:
        print("warning: --share without --auth: anyone with the link can use this app", file=sys.stderr)

    import gradio as gr

    demo = build_app(backend)
    try:
        demo.launch(
            server_name=args.host,
            server_port=args.port,
            share=args.share,
            auth=parse_auth(args.auth),
            theme=gr.themes.Soft(),
            css=CSS,
            footer_links=["api"],
            show_error=False,
        )
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
