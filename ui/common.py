"""What every tab's Gradio adapters share: running a handler so that errors become one clear message.

A tab's handler proper is plain Python that raises ``UserError`` for bad input. ``attempt`` runs it and turns
a ``UserError`` into its message and anything unexpected into a one-line summary (the traceback goes to the
server log), so no tab ever shows a traceback. ``error_markdown`` formats the message for a Markdown box.
"""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetuners.errors import UserError
from finetuners.generate import LIMITS

log = logging.getLogger("finetuners.ui")

# What the prompt boxes start with, so that a first click shows something; the Shapes world draws them
DEMO_PROMPT = "a red circle above a blue square"
DEMO_PAIR = ("a red circle", "a blue square")  # Superpose: two prompts naming different objects


def md_escape(text: str) -> str:
    """``text`` shown as it is inside Markdown: its Markdown and HTML characters escaped."""
    return "".join("\\" + c if c in "\\`*_[]<>#|" else c for c in text)


def error_markdown(message: str, title: str = "Cannot generate") -> str:
    return f"⚠️ **{title}:** {md_escape(message)}"


def unexpected_message(e: BaseException, action: str = "generation") -> str:
    """One line for an error nobody planned for; the full traceback is logged."""
    log.error("unexpected error during %s", action, exc_info=e)
    first = (str(e).strip().splitlines() or [""])[0][:200]
    if type(e).__name__ == "OutOfMemoryError":
        return "the device ran out of memory: lower the batch or the number of steps"
    return f"{action} failed ({type(e).__name__}: {first}); details are in the server log"


def attempt(action: str, fn: Callable, *args, **kwargs) -> tuple[Any, str | None]:
    """``(fn(*args, **kwargs), None)``, or ``(None, message)`` when it raised."""
    try:
        return fn(*args, **kwargs), None
    except UserError as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001 - the app shows a message, never a traceback
        return None, unexpected_message(e, action)


def random_seed() -> int:
    """A seed for the "Random" buttons, within the samplers' range."""
    return random.randrange(LIMITS["seed"][1] + 1)


def launch_alone(build_tab: Callable, title: str) -> None:
    """One tab on its own, for working on it: ``python -m ui.<name>_tab [model] [data_dir]``."""
    import gradio as gr

    from .backend import Backend, Settings

    args = sys.argv[1:]
    backend = Backend(
        Settings(model=args[0] if args else "shapes", data_dir=Path(args[1] if len(args) > 1 else "data"))
    )
    backend.preload()
    with gr.Blocks(title=f"finetuners · {title}") as demo:
        build_tab(backend)
    demo.queue().launch()


def count(n: int, noun: str) -> str:
    """ "1 step", "2 steps": a number with its noun in the right number."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def typed_prompt(text) -> str:
    """A prompt typed into a box, stripped; ``UserError`` when it is empty or too long."""
    from finetuners.generate import MAX_PROMPT_CHARS

    text = (text or "").strip() if isinstance(text, str | None) else None
    if text is None:
        raise UserError("the prompt must be text")
    if not text:
        raise UserError("the prompt is empty: type what the image should show")
    if len(text) > MAX_PROMPT_CHARS:
        raise UserError(f"the prompt is too long ({len(text)} characters; at most {MAX_PROMPT_CHARS})")
    return text


def typed_prompts(text, most: int, what: str, distinct: bool = False) -> list[str]:
    """The non-empty lines of ``text``, stripped (repeats dropped if ``distinct``), each a valid prompt; at most
    ``most`` of them."""
    if not isinstance(text, str | None):
        raise UserError(f"the {what} must be text, one per line")
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if distinct:
        lines = list(dict.fromkeys(lines))
    if len(lines) > most:
        raise UserError(f"at most {most} {what}, got {len(lines)}")
    return [typed_prompt(p) for p in lines]
