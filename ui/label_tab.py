"""The Label tab: two candidates for one prompt side by side, left / right / tie / skip, and what the labels give.

The handlers proper are plain Python over the app's one ``LabelStore`` (``Backend.label_store()``) and raise
``UserError`` for bad input, leaving the store unchanged:

- ``generate_pairs``: the prompt queue (typed, one per line, or a prompt-list file) × the pair source (two
  seeds, two checkpoints, or two step counts of one model) → pairs, each stored (images first, then the row)
  before anyone can be shown it. Sides are shuffled per pair (from its seed), so position bias averages out.
- ``show_next`` / ``record_label`` / ``undo_label``: a labeller is shown the pair with the fewest labels that
  they have not labelled yet; a label is acknowledged only once ``add_label`` has committed it.
- ``statistics``: labels per labeller, agreement between labellers, win rates and a Bradley–Terry ranking.
- ``export_labels`` / ``import_labels``: the Pick-a-Pic schema, inside the app's data folder only.
- ``train_reward``: the Bradley–Terry preference reward on Shapes-probe features, or on CLIP features of a
  local CLIP folder the user names, saved under ``<data_dir>/rewards/<name>/`` and usable in fine-tuning as the
  reward ``preference:<folder>``.

The ``on_*`` adapters turn them into Gradio updates: a message in the tab (and a toast) on failure, with the
other outputs left as they were. Keyboard shortcuts (1 / ← left, 2 / → right, 3 / ↓ tie, 0 / s skip, u undo)
click the buttons from a small script, never while the focus is in a text field.
"""

from __future__ import annotations

import logging
import random
import re
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import gradio as gr
from PIL import Image

from finetuners.errors import UserError
from finetuners.generate import LIMITS, SampleRequest, check_prompt_fits
from finetuners.labels import check_prompt
from finetuners.names import typed_path

from .backend import Backend
from .common import DEMO_PROMPT, attempt, error_markdown

log = logging.getLogger(__name__)

SOURCES = [("two seeds", "seeds"), ("two checkpoints", "checkpoints"), ("two step counts", "steps")]
SOURCE_NAMES = {value: label for label, value in SOURCES}
CHOICE_NAMES = {"left": "left", "right": "right", "tie": "tie", "skip": "skip"}
MAX_QUEUE = 500  # prompts per "Generate pairs" click: bounds how long one click holds the model
MAX_PROMPT_FILE_BYTES = 1_000_000
REWARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
EXPORT_FORMATS = [("JSONL", "jsonl"), ("Parquet", "parquet")]
PALETTE = {"left": "#2563eb", "right": "#dc2626", "tie": "#9ca3af", "skip": "#e5e7eb"}

KEYS_JS = """
() => {
  if (window.__finetunersLabelKeys) return;
  window.__finetunersLabelKeys = true;
  const keys = {"1": "left", "ArrowLeft": "left", "2": "right", "ArrowRight": "right", "3": "tie",
                "ArrowDown": "tie", "0": "skip", "s": "skip", "u": "undo"};
  document.addEventListener("keydown", (e) => {
    if (e.repeat || e.ctrlKey || e.metaKey || e.altKey) return;
    const t = e.target;
    if (t && (t.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(t.tagName))) return;
    const action = keys[e.key];
    if (!action) return;
    const button = document.getElementById("label-" + action);
    if (!button || button.offsetParent === null || button.disabled) return;  // the Label tab is not shown
    e.preventDefault();
    button.click();
  });
}
"""


# -- the prompt queue and the pair source -------------------------------------------------------------------


def parse_queue(text: str | None, file_path: str | None = None) -> list[str]:
    """Prompts, one per line, from the typed text and then the prompt-list file; blank lines and lines
    starting with ``#`` are left out. ``UserError`` if nothing is left, or for an unreadable file."""
    lines = (text or "").splitlines()
    if file_path:
        path = typed_path(file_path, "prompt list")
        try:
            if not path.is_file():
                raise UserError(f"the prompt list {path.name!r} is not a file: upload a text file, one prompt per line")
            with open(path, "rb") as f:  # at most the limit: a size of 0 may be a lie (/dev/zero, /proc files)
                data = f.read(MAX_PROMPT_FILE_BYTES + 1)
            if len(data) > MAX_PROMPT_FILE_BYTES:
                raise UserError(f"the prompt list {path.name} is larger than {MAX_PROMPT_FILE_BYTES // 1000} kB")
            lines += data.decode("utf-8-sig").splitlines()
        except UnicodeDecodeError as e:
            raise UserError(f"the prompt list {path.name} is not UTF-8 text: one prompt per line") from e
        except OSError as e:
            raise UserError(f"cannot read the prompt list {path.name!r}: {e.strerror or e}") from e
    prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise UserError("the prompt queue is empty: type prompts, one per line, or upload a prompt list")
    if len(prompts) > MAX_QUEUE:
        raise UserError(f"the queue holds {len(prompts)} prompts; at most {MAX_QUEUE} per click")
    for n, p in enumerate(prompts, 1):  # the store's own checks, so that no pair is stored before a bad prompt
        try:
            check_prompt(p)
        except UserError as e:
            raise UserError(f"prompt {n}: {e}") from e
    return prompts


@dataclass(frozen=True)
class PairSource:
    """How the two candidates of a pair differ: ``kind`` seeds / checkpoints / steps. Both sides use the
    sampler and guidance of their model (its defaults)."""

    kind: str
    models: tuple[str, str]
    steps: tuple[int, int]
    seed: int  # pair i of a click: seeds (seed + 2i, seed + 2i + 1) for "seeds", seed + i on both sides otherwise

    def seeds(self, i: int) -> tuple[int, int]:
        return (self.seed + 2 * i, self.seed + 2 * i + 1) if self.kind == "seeds" else (self.seed + i,) * 2

    def model_id(self, side: int) -> str:
        """The id a side is ranked under: the checkpoint and its step count."""
        return f"{self.models[side]}@{self.steps[side]}"


def _whole(value, name: str, lo: int, hi: int) -> int:
    if value is None or value == "":
        raise UserError(f"{name} is empty: enter a number")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"{name} must be a whole number, got {value!r}")
    if not lo <= value <= hi:
        raise UserError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def make_source(backend: Backend, kind, model_a, model_b, steps_a, steps_b, seed) -> PairSource:
    """Widget values → a validated ``PairSource`` (no model is loaded here)."""
    if kind not in SOURCE_NAMES:
        raise UserError(f"unknown pair source {kind!r}: two seeds, two checkpoints or two step counts")
    a = backend.check_model(model_a)
    b = backend.check_model(model_b) if kind == "checkpoints" else a
    if kind == "checkpoints" and a == b:
        raise UserError("two checkpoints: choose two different models (or compare two seeds)")
    sa = _whole(steps_a, "steps A", *LIMITS["steps"])
    sb = _whole(steps_b, "steps B", *LIMITS["steps"]) if kind == "steps" else sa
    if kind == "steps" and sa == sb:
        raise UserError("two step counts: choose two different numbers of steps")
    seed = _whole(seed, "seed", LIMITS["seed"][0], LIMITS["seed"][1] - 2 * MAX_QUEUE)
    return PairSource(kind, (a, b), (sa, sb), seed)


def _request(backend: Backend, source: PairSource, side: int, prompt: str, seed: int, batch: int = 1):
    d = backend.defaults(source.models[side])
    return SampleRequest(prompt, steps=source.steps[side], sampler=d.sampler, guidance=d.guidance, seed=seed,
                         batch=batch, record_pred_x0=False)  # fmt: skip


def generate_pairs(backend: Backend, queue_text, queue_file, kind, model_a, model_b, steps_a, steps_b, seed,
                   progress=None) -> str:  # fmt: skip
    """Generate one pair per prompt of the queue and store each (images, then row) as soon as it exists.

    Everything is checked before the first image: the queue, the source, every prompt against both models'
    text encoders. Returns a Markdown summary."""
    prompts = parse_queue(queue_text, queue_file)
    source = make_source(backend, kind, model_a, model_b, steps_a, steps_b, seed)
    store = backend.label_store()
    for side in (0, 1):
        pipe = backend.pipeline(source.models[side])
        for n, p in enumerate(prompts, 1):
            try:
                check_prompt_fits(pipe, p)
            except UserError as e:
                raise UserError(f"prompt {n}: {e}") from e
    ids = []
    for i, prompt in enumerate(prompts):
        if progress is not None:
            progress((i, len(prompts)), desc=f"pair {i + 1}/{len(prompts)}", unit="pairs")
        s0, s1 = source.seeds(i)
        if source.kind == "seeds":  # one batch of two: image k uses seed + k
            images = list(backend.generate(source.models[0], _request(backend, source, 0, prompt, s0, 2)).images)
        else:
            images = [backend.generate(source.models[k], _request(backend, source, k, prompt, s)).images[0]
                      for k, s in ((0, s0), (1, s1))]  # fmt: skip
        sides = [0, 1]
        random.Random(f"{prompt}|{s0}|{s1}").shuffle(sides)  # which candidate goes left: reproducible per pair
        meta = {
            "source": source.kind,
            "seeds": [(s0, s1)[k] for k in sides],
            "steps": [source.steps[k] for k in sides],
            "checkpoints": [source.models[k] for k in sides],
            "swapped": sides != [0, 1],
        }
        ids.append(
            store.add_pair(
                prompt, images[sides[0]], images[sides[1]], source.model_id(sides[0]), source.model_id(sides[1]), meta
            )  # fmt: skip
        )
    log.info("generated %d pairs (%s)", len(ids), source.kind)
    what = {"seeds": "two seeds of", "checkpoints": "two checkpoints,", "steps": "two step counts of"}[source.kind]
    models = " vs ".join(dict.fromkeys(source.model_id(k) for k in (0, 1)))
    return f"✓ Stored **{len(ids)} pair{'s' * (len(ids) > 1)}** ({what} {models}); pairs #{ids[0]}–#{ids[-1]}."


# -- labelling ---------------------------------------------------------------------------------------------

NO_PAIRS_YET = "there are no pairs to label yet: put prompts in the queue and click Generate pairs"


def labeller_name(backend: Backend, typed, username: str | None = None) -> str:
    """The signed-in user (with --auth), else the typed name; "anonymous" only when names are optional."""
    if username:
        return username
    name = typed.strip() if isinstance(typed, str) else ""
    if not name and backend.settings.labeller_names == "required":
        raise UserError("type your name first: every label records who gave it")
    return backend.label_store()._labeller(name)  # the store's checks: length, control characters


@dataclass
class LabelView:
    """What the labelling area shows after a click."""

    pair_id: int | None  # the pair on screen (None: nothing left for this labeller)
    left: Image.Image | None
    right: Image.Image | None
    prompt: str  # Markdown: the prompt and which pair it is
    status: str  # Markdown: the acknowledgement of the last action
    counts: str  # Markdown: this labeller's progress and the store's counts


def _display(path: Path, target_px: int) -> Image.Image:
    with Image.open(path) as im:
        im = im.convert("RGB")
    scale = max(1, target_px // max(1, im.width))
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST) if scale > 1 else im


def counts_markdown(backend: Backend, name: str | None) -> str:
    store = backend.label_store()
    c = store.counts()
    line = (
        f"Store: **{c['pairs']} pair{'s' * (c['pairs'] != 1)}**, **{c['labels']} label{'s' * (c['labels'] != 1)}** "
        f"(left {c['left']} · right {c['right']} · "
        f"tie {c['tie']}; {c['skip']} skipped) from {c['labellers']} labeller{'s' * (c['labellers'] != 1)}"
    )
    if not name:
        return line
    mine = store.labels_per_labeller().get(name, {}).get("total", 0)
    return f"**{name}**: {mine} done · **{c['pairs'] - mine} left** of {c['pairs']}  \n{line}"


def _view(backend: Backend, name: str, pair, status: str) -> LabelView:
    counts = counts_markdown(backend, name)
    if pair is None:
        return LabelView(None, None, None, "**Nothing left to label for you.** Generate more pairs from a "
                         "prompt queue, or come back when others have.", status, counts)  # fmt: skip
    px = backend.settings.display_px
    prompt = f"**“{pair.prompt}”** · pair #{pair.id}"
    return LabelView(pair.id, _display(pair.image_0_path, px), _display(pair.image_1_path, px), prompt, status, counts)


def _nothing_on_screen(store, name: str) -> str:
    """Why a label with no pair on screen was not saved, in the words that fit the labeller's state."""
    if store.counts()["pairs"] == 0:
        return NO_PAIRS_YET
    if store.next_pair_for(name) is None:
        return "no pair on screen: nothing is left to label for you; generate more pairs from a prompt queue"
    return "no pair on screen: click Start labelling first"


def show_next(backend: Backend, typed_name, username: str | None = None) -> LabelView:
    """The next pair for this labeller (fewest labels first), without labelling anything."""
    name = labeller_name(backend, typed_name, username)
    store = backend.label_store()
    pair = store.next_pair_for(name)
    if pair is None and store.counts()["pairs"] == 0:
        raise UserError(NO_PAIRS_YET)
    return _view(backend, name, pair, f"Labelling as **{name}**.")


def record_label(backend: Backend, typed_name, pair_id, choice, username: str | None = None) -> LabelView:
    """Store ``choice`` on the pair on screen (one committed transaction), then show the next pair."""
    name = labeller_name(backend, typed_name, username)
    if choice not in CHOICE_NAMES:
        raise UserError(f"unknown choice {choice!r}: left, right, tie or skip")
    if pair_id is None:
        raise UserError(_nothing_on_screen(backend.label_store(), name))
    pair_id = _whole(pair_id, "the pair id", 1, 2**63 - 1)
    store = backend.label_store()
    label_id = store.add_label(pair_id, name, choice)  # returns once committed (and fsynced)
    status = f"✓ Saved label #{label_id}: **{choice}** on pair #{pair_id} by {name}."
    return _view(backend, name, store.next_pair_for(name), status)


def undo_label(backend: Backend, typed_name, username: str | None = None) -> LabelView:
    """Withdraw this labeller's own last label and show that pair again."""
    name = labeller_name(backend, typed_name, username)
    store = backend.label_store()
    pair_id = store.undo_last(name)
    if pair_id is None:
        raise UserError(f"{name} has no label to undo")
    return _view(backend, name, store.get_pair(pair_id), f"↶ Undid your last label on pair #{pair_id}; label it again.")


# -- statistics --------------------------------------------------------------------------------------------


@dataclass
class StatsView:
    per_labeller: object  # plotly figures
    agreement: object
    ranking: object
    table: str  # Markdown: the ranking as a table


def _empty(fig, text: str):
    fig.add_annotation(text=text, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font=dict(size=14))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def _layout(fig, title: str):
    fig.update_layout(title=dict(text=title, font=dict(size=14)), template="plotly_white", height=320,
                      margin=dict(l=48, r=16, t=48, b=48), legend=dict(orientation="h", y=-0.2))  # fmt: skip
    return fig


def statistics(backend: Backend) -> StatsView:
    import plotly.graph_objects as go

    store = backend.label_store()
    per = store.labels_per_labeller()
    fig_per = go.Figure()
    for choice in ("left", "right", "tie", "skip"):
        fig_per.add_bar(x=list(per), y=[d[choice] for d in per.values()], name=choice,
                        marker_color=PALETTE[choice])  # fmt: skip
    fig_per.update_layout(barmode="stack")
    _layout(fig_per, "Labels per labeller")
    if not per:
        _empty(fig_per, "no labels yet")

    agree = store.agreement()
    fig_agree = go.Figure()
    if agree.n:
        keys = list(agree.by_labellers)
        fig_agree.add_bar(
            x=[f"{a} · {b}" for a, b in keys],
            y=[agree.by_labellers[k][1] for k in keys],
            text=[f"{agree.by_labellers[k][1]:.0%} of {agree.by_labellers[k][0]}" for k in keys],
            marker_color="#0d9488",
        )
        fig_agree.update_yaxes(range=[0, 1], tickformat=".0%")
        title = f"Agreement on pairs both labelled: {agree.overall:.0%} of {agree.n} comparisons"
    else:
        title = "Agreement between labellers"
        _empty(fig_agree, "no pair labelled by two people yet")
    _layout(fig_agree, title)

    ranks = store.win_rates()
    fig_rank = go.Figure()
    if ranks:
        fig_rank.add_bar(
            x=[r.model for r in ranks],
            y=[r.elo for r in ranks],
            text=[f"win {r.win_rate:.0%} ({r.comparisons})" for r in ranks],
            marker_color="#7c3aed",
            name="Bradley–Terry (Elo scale)",
        )
        fig_rank.update_yaxes(title_text="Elo (1500 = average)")
        table = "| rank | checkpoint@steps | wins | losses | ties | win rate | Bradley–Terry θ | Elo |\n"
        table += "|---|---|---|---|---|---|---|---|\n"
        table += "\n".join(
            f"| {k} | `{r.model}` | {r.wins} | {r.losses} | {r.ties} | {r.win_rate:.1%} | {r.strength:+.3f} | "
            f"{r.elo:.0f} |"
            for k, r in enumerate(ranks, 1)
        )
    else:
        _empty(fig_rank, "no labels on pairs of two different checkpoints or step counts yet")
        table = "No ranking yet: it needs labels on pairs from two checkpoints or two step counts."
    _layout(fig_rank, "Ranking of checkpoints / step counts (Bradley–Terry)")
    return StatsView(fig_per, fig_agree, fig_rank, table)


# -- export, import --------------------------------------------------------------------------------------


def inside_data_dir(backend: Backend, typed, what: str) -> Path:
    """A path the user typed, relative to the data folder (or absolute but inside it), resolved; anything that
    leaves the data folder ('..', another absolute path, a symlink out) is a ``UserError``."""
    root = backend.settings.data_dir.resolve()
    text = typed.strip() if isinstance(typed, str) else ""
    if not text:
        raise UserError(f"the {what} path is empty: type a folder name inside the data folder")
    path = typed_path(text, f"{what} path")
    try:
        full = (path if path.is_absolute() else root / path).resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise UserError(f"the {what} path {text!r} cannot be resolved: {e}") from e
    typed_path(str(full), f"{what} path")  # the data folder and the typed part together: not over-long
    if full == root or not full.is_relative_to(root):
        raise UserError(f"the {what} path must stay inside the data folder {root}: {text!r} leaves it")
    return full


def default_export_name() -> str:
    return f"exports/labels-{datetime.now(UTC):%Y%m%d-%H%M%S}"


def export_labels(backend: Backend, typed_path, fmt) -> str:
    """Write a new export folder (table + images) inside the data folder; an existing path is refused."""
    if fmt not in dict(EXPORT_FORMATS).values():
        raise UserError(f"unknown export format {fmt!r}: jsonl or parquet")
    store = backend.label_store()
    path = inside_data_dir(backend, typed_path, "export")
    if path.exists():
        raise UserError(f"{path} already exists: choose a new name for the export")
    root = backend.settings.data_dir.resolve()
    for parent in reversed(path.relative_to(root).parents[:-1]):  # folders between the data folder and path
        if (root / parent).exists() and not (root / parent).is_dir():
            raise UserError(f"cannot export there: {root / parent} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the folder {path.parent}: {e.strerror or e}") from e
    result = store.export(path, fmt)
    return f"✓ Exported **{result.labels} labels** ({result.rows} rows, {result.images} images) to `{result.table}`"


def import_labels(backend: Backend, typed_path, uploaded) -> str:
    """Import an export: an uploaded ``.zip`` of an export folder, ``.jsonl`` or ``.parquet`` table (with
    ``jpg_0``/``jpg_1`` bytes when it has no images folder), or a folder or table inside the data folder.
    All or nothing: a bad row or a missing image leaves the store unchanged."""
    store = backend.label_store()
    if uploaded:
        source = Path(uploaded)
        if source.suffix.lower() == ".zip":
            with tempfile.TemporaryDirectory(prefix="finetuners-import-") as tmp:
                return _import(store, _unzip(source, Path(tmp)))
        if source.suffix.lower() not in (".jsonl", ".parquet"):
            raise UserError(f"{source.name}: upload a .zip of an export folder, or a .jsonl or .parquet table")
        return _import(store, source)
    return _import(store, inside_data_dir(backend, typed_path, "import"))


def _unzip(archive: Path, dest: Path) -> Path:
    """Extract an export folder's zip, refusing members that would land outside ``dest``."""
    try:
        with zipfile.ZipFile(archive) as z:
            for member in z.infolist():
                target = (dest / member.filename).resolve()
                if not target.is_relative_to(dest.resolve()):
                    raise UserError(f"{archive.name}: the entry {member.filename!r} leaves the archive's folder")
            z.extractall(dest)
    except zipfile.BadZipFile as e:
        raise UserError(f"{archive.name} is not a readable zip file") from e
    entries = [p for p in dest.iterdir() if not p.name.startswith(("__MACOSX", "."))]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else dest


def _import(store, path: Path) -> str:
    r = store.import_export(path)
    return (
        f"✓ Imported {r.pairs_added} new pairs and **{r.labels_added} labels** ({r.labels_skipped} already here "
        f"or superseded), {r.images_added} new images."
    )


# -- the preference reward -----------------------------------------------------------------------------------


def train_reward(backend: Backend, name, clip_folder=None, progress=None) -> str:
    """Train the Bradley–Terry reward on every live label, save it to ``<data_dir>/rewards/<name>/``.

    ``clip_folder``: a local CLIP weights folder (transformers, safetensors) whose features the reward reads;
    empty: the Shapes probe's. A bad folder is a UserError before anything is written."""
    from finetuners.preference import train_from_store

    name = name.strip() if isinstance(name, str) else ""
    if not REWARD_NAME.match(name):
        raise UserError(
            "the reward name must be 1–64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    clip = clip_folder.strip() if isinstance(clip_folder, str) else ""
    store = backend.label_store()
    folder = backend.settings.data_dir / "rewards" / name
    replaced = folder.exists()
    if progress is not None:
        progress(0, desc="reading the labelled images")

    def on_step(step, metrics):
        if progress is not None:
            progress((step, None), desc=f"step {step}: held-out log-loss {metrics['val_loss']:.3f}")

    clip_path = typed_path(clip, "CLIP weights folder") if clip else None
    reward, m = train_from_store(store, folder, clip=clip_path, progress=on_step)
    acc = m["val_accuracy"]
    acc_text = "n/a (only ties held out)" if acc is None else f"**{acc:.1%}**"
    on = f"CLIP features of `{reward.features.folder}`" if clip else "Shapes-probe features"
    return (
        f"✓ Held-out pairwise accuracy {acc_text} on {m['n_val_non_tie']} held-out labels "
        f"(trained on {m['n_train']} labels of {m['n_pairs']} pairs, {on}; split by pair).  \n"
        f"{'Replaced' if replaced else 'Saved'} in `{folder}`; in fine-tuning use the reward "
        f"`preference:{folder.resolve()}`."
    )


# -- Gradio adapters ---------------------------------------------------------------------------------------


def _username(request: gr.Request | None) -> str | None:
    return getattr(request, "username", None) if request is not None else None


def _label_outputs(view: LabelView | None, message: str | None, title: str) -> tuple:
    """Updates for (left, right, prompt, status, counts, error, pair state)."""
    if message is None:
        return view.left, view.right, view.prompt, view.status, view.counts, "", view.pair_id
    gr.Warning(message)
    return (*[gr.skip()] * 5, error_markdown(message, title), gr.skip())


def on_start(backend: Backend, name, request: gr.Request | None = None) -> tuple:
    view, message = attempt("labelling", show_next, backend, name, _username(request))
    return _label_outputs(view, message, "Cannot start labelling")


def on_label(backend: Backend, name, pair_id, choice, request: gr.Request | None = None) -> tuple:
    view, message = attempt("labelling", record_label, backend, name, pair_id, choice, _username(request))
    return _label_outputs(view, message, "Label not saved")


def on_undo(backend: Backend, name, request: gr.Request | None = None) -> tuple:
    view, message = attempt("undo", undo_label, backend, name, _username(request))
    return _label_outputs(view, message, "Cannot undo")


def _message(action: str, title: str, fn, *args) -> tuple[str, str]:
    """(result Markdown, error Markdown) for the admin buttons."""
    text, message = attempt(action, fn, *args)
    if message is None:
        return text, ""
    gr.Warning(message)
    return gr.skip(), error_markdown(message, title)


def on_generate_pairs(backend: Backend, *values, progress=None) -> tuple:
    return _message("generating pairs", "Cannot generate pairs", generate_pairs, backend, *values, progress)


def on_stats(backend: Backend) -> tuple:
    view, message = attempt("statistics", statistics, backend)
    if message is None:
        return view.per_labeller, view.agreement, view.ranking, view.table, ""
    return (*[gr.skip()] * 4, error_markdown(message, "Cannot compute statistics"))


def on_export(backend: Backend, path, fmt) -> tuple:
    return _message("export", "Export failed", export_labels, backend, path, fmt)


def on_import(backend: Backend, path, uploaded) -> tuple:
    return _message("import", "Nothing imported", import_labels, backend, path, uploaded)


def on_train(backend: Backend, name, clip_folder=None, progress=None) -> tuple:
    return _message("training the reward", "Cannot train the reward", train_reward, backend, name, clip_folder,
                    progress)  # fmt: skip


def on_tab_select(backend: Backend, name, request: gr.Request | None = None) -> tuple:
    """Updates for (name, counts, error, model A, model B) when the tab is opened: the signed-in user's name,
    fresh counts, and the model lists (fine-tuning may have added checkpoints since the page loaded)."""
    username = _username(request)
    text, message = attempt("reading the labels", counts_markdown, backend, username or (name or "").strip() or None)
    name_update = gr.update(value=username, interactive=False) if username else gr.skip()
    choices, _ = attempt("listing the models", backend.model_choices)
    models = gr.update(choices=choices) if choices else gr.skip()
    if message is None:
        return name_update, text, "", models, models
    return name_update, gr.skip(), error_markdown(message, "Labels unavailable"), models, models


def on_source_change(kind: str) -> tuple:
    """Model B only for two checkpoints; steps B only for two step counts."""
    return gr.update(visible=kind == "checkpoints"), gr.update(visible=kind == "steps")


# -- layout ------------------------------------------------------------------------------------------------


def _steps0(backend: Backend) -> tuple[int, int]:
    d = backend.defaults(backend.settings.model)
    return d.steps, 1 if d.steps > 1 else 4


def build_label_tab(backend: Backend) -> gr.Tab:
    """Add the Label tab to the enclosing ``gr.Blocks``."""
    settings = backend.settings
    choices = backend.model_choices()
    steps_a0, steps_b0 = _steps0(backend)
    custom = dict(allow_custom_value=settings.custom_models)
    with gr.Tab("Label", id="label", elem_id="label-tab") as tab:
        pair_state = gr.State(None)  # per session: the id of the pair on screen
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=480):
                with gr.Row(equal_height=True):
                    name = gr.Textbox(
                        label="Your name",
                        placeholder="recorded with every label",
                        elem_id="label-name",
                        scale=3,
                        max_length=64,
                    )
                    start = gr.Button("Start labelling", variant="primary", elem_id="label-start", scale=1)
                prompt = gr.Markdown("", elem_id="label-prompt")
                with gr.Row(equal_height=True):
                    left = gr.Image(label="Left (1 / ←)", type="pil", format="png", interactive=False,
                                    elem_id="label-left-image", elem_classes=["pixel-gallery"], height=300,
                                    buttons=["fullscreen"])  # fmt: skip
                    right = gr.Image(label="Right (2 / →)", type="pil", format="png", interactive=False,
                                     elem_id="label-right-image", elem_classes=["pixel-gallery"], height=300,
                                     buttons=["fullscreen"])  # fmt: skip
                with gr.Row():
                    b_left = gr.Button("◀ Left is better (1)", elem_id="label-left")
                    b_tie = gr.Button("Tie (3)", elem_id="label-tie")
                    b_right = gr.Button("Right is better (2) ▶", elem_id="label-right")
                with gr.Row():
                    b_skip = gr.Button("Skip (0)", size="sm", elem_id="label-skip")
                    b_undo = gr.Button("↶ Undo my last label (u)", size="sm", elem_id="label-undo")
                gr.HTML(
                    "<small>Keys: <kbd>1</kbd>/<kbd>←</kbd> left · <kbd>2</kbd>/<kbd>→</kbd> right · "
                    "<kbd>3</kbd>/<kbd>↓</kbd> tie · <kbd>0</kbd>/<kbd>s</kbd> skip · <kbd>u</kbd> undo "
                    "(not while typing in a text field)</small>",
                    js_on_load=KEYS_JS.strip().removeprefix("() => {").removesuffix("}"),
                    elem_id="label-keys",
                )
                status = gr.Markdown("", elem_id="label-status")
                counts = gr.Markdown("", elem_id="label-counts")
                error = gr.Markdown("", elem_id="label-error", elem_classes=["error-text"])
            with gr.Column(scale=2, min_width=320):
                with gr.Accordion("Prompt queue and pair source", open=True):
                    queue = gr.Textbox(label="Prompts, one per line", lines=4, max_lines=12, elem_id="label-queue",
                                       placeholder=DEMO_PROMPT)  # fmt: skip
                    queue_file = gr.File(label="…or a prompt list (.txt, one per line)", file_types=[".txt"],
                                         type="filepath", elem_id="label-queue-file", height=130)  # fmt: skip
                    kind = gr.Radio(SOURCES, value="seeds", label="The two candidates differ by",
                                    elem_id="label-source")  # fmt: skip
                    with gr.Row():
                        model_a = gr.Dropdown(choices=choices, value=settings.model, label="Model A",
                                              elem_id="label-model-a", **custom)  # fmt: skip
                        model_b = gr.Dropdown(choices=choices, value=None, label="Model B", visible=False,
                                              elem_id="label-model-b", **custom)  # fmt: skip
                    with gr.Row():
                        steps_a = gr.Number(value=steps_a0, precision=0, label="Steps (A)", elem_id="label-steps-a",
                                            minimum=LIMITS["steps"][0], maximum=LIMITS["steps"][1])  # fmt: skip
                        steps_b = gr.Number(value=steps_b0, precision=0, label="Steps B", visible=False,
                                            elem_id="label-steps-b", minimum=LIMITS["steps"][0],
                                            maximum=LIMITS["steps"][1])  # fmt: skip
                        seed = gr.Number(value=0, precision=0, label="First seed", elem_id="label-seed")
                    make = gr.Button("Generate pairs", elem_id="label-generate")
                    made = gr.Markdown("", elem_id="label-generated")
                    make_error = gr.Markdown("", elem_id="label-generate-error", elem_classes=["error-text"])
                with gr.Accordion("Export / import (Pick-a-Pic schema)", open=False):
                    export_path = gr.Textbox(value=default_export_name, label="Export to (inside the data folder)",
                                             elem_id="label-export-path")  # fmt: skip
                    export_fmt = gr.Radio(EXPORT_FORMATS, value="jsonl", label="Format", elem_id="label-export-format")
                    export = gr.Button("Export", elem_id="label-export")
                    import_path = gr.Textbox(label="Import from a folder or table inside the data folder",
                                             elem_id="label-import-path")  # fmt: skip
                    import_file = gr.File(label="…or upload a .zip of an export, or a .jsonl / .parquet table",
                                          file_types=[".zip", ".jsonl", ".parquet"], type="filepath",
                                          elem_id="label-import-file", height=130)  # fmt: skip
                    do_import = gr.Button("Import", elem_id="label-import")
                    io_result = gr.Markdown("", elem_id="label-io-result")
                    io_error = gr.Markdown("", elem_id="label-io-error", elem_classes=["error-text"])
                with gr.Accordion("Preference reward (Bradley–Terry)", open=False):
                    reward_name = gr.Textbox(value="labels", label="Name", elem_id="label-reward-name",
                                             info=f"saved in {settings.data_dir / 'rewards'}/<name>/")  # fmt: skip
                    clip_folder = gr.Textbox(label="CLIP weights folder (optional)", elem_id="label-reward-clip",
                                             placeholder="empty: Shapes-probe features",
                                             info="a local transformers CLIP folder with safetensors weights, "
                                             "e.g. a download of openai/clip-vit-large-patch14")  # fmt: skip
                    train = gr.Button("Train preference reward", elem_id="label-train")
                    trained = gr.Markdown("", elem_id="label-trained")
                    train_error = gr.Markdown("", elem_id="label-train-error", elem_classes=["error-text"])
        with gr.Accordion("Statistics", open=False) as stats_box:
            refresh = gr.Button("Refresh statistics", size="sm", elem_id="label-stats-refresh")
            stats_error = gr.Markdown("", elem_id="label-stats-error", elem_classes=["error-text"])
            with gr.Row(equal_height=True):
                per_plot = gr.Plot(elem_id="label-per-labeller", show_label=False)
                agree_plot = gr.Plot(elem_id="label-agreement", show_label=False)
            rank_plot = gr.Plot(elem_id="label-ranking", show_label=False)
            rank_table = gr.Markdown("", elem_id="label-ranking-table")

        view_outputs = [left, right, prompt, status, counts, error, pair_state]
        labels = dict(concurrency_id="label", concurrency_limit=16, trigger_mode="once")

        def start_fn(name, request: gr.Request):
            return on_start(backend, name, request)

        start.click(start_fn, [name], view_outputs, api_name="label_start", **labels)
        name.submit(start_fn, [name], view_outputs, api_visibility="private", **labels)
        for button, choice in ((b_left, "left"), (b_right, "right"), (b_tie, "tie"), (b_skip, "skip")):

            def label_fn(name, pair_id, request: gr.Request, choice=choice):
                return on_label(backend, name, pair_id, choice, request)

            button.click(label_fn, [name, pair_state], view_outputs, api_name=f"label_{choice}", **labels)

        def undo_fn(name, request: gr.Request):
            return on_undo(backend, name, request)

        b_undo.click(undo_fn, [name], view_outputs, api_name="label_undo", **labels)

        def generate_fn(*values, progress=gr.Progress()):
            return on_generate_pairs(backend, *values, progress=progress)

        make.click(generate_fn, [queue, queue_file, kind, model_a, model_b, steps_a, steps_b, seed],
                   [made, make_error], api_name="label_generate_pairs", concurrency_id="generate",
                   concurrency_limit=settings.concurrency)  # fmt: skip
        kind.change(on_source_change, [kind], [model_b, steps_b], queue=False)

        def stats_fn():
            return on_stats(backend)

        stats_outputs = [per_plot, agree_plot, rank_plot, rank_table, stats_error]
        refresh.click(stats_fn, None, stats_outputs, api_name="label_statistics", concurrency_id="label-admin")
        stats_box.expand(stats_fn, None, stats_outputs, api_visibility="private", concurrency_id="label-admin")
        export.click(lambda p, f: on_export(backend, p, f), [export_path, export_fmt], [io_result, io_error],
                     api_name="label_export", concurrency_id="label-admin")  # fmt: skip
        do_import.click(lambda p, f: on_import(backend, p, f), [import_path, import_file], [io_result, io_error],
                        api_name="label_import", concurrency_id="label-admin")  # fmt: skip

        def train_fn(name, clip, progress=gr.Progress()):
            return on_train(backend, name, clip, progress)

        train.click(train_fn, [reward_name, clip_folder], [trained, train_error], api_name="label_train_reward",
                    concurrency_id="label-admin")  # fmt: skip

        def select_fn(name, request: gr.Request):
            return on_tab_select(backend, name, request)

        tab.select(select_fn, [name], [name, counts, error, model_a, model_b], api_visibility="private")
    return tab


if __name__ == "__main__":  # this tab alone: python -m ui.label_tab [model] [data_dir]
    from .common import launch_alone

    launch_alone(build_label_tab, "Label")
