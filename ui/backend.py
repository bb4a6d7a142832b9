"""What every session of the app shares: the settings it was started with and a cache of loaded pipelines.

Each model is loaded once, on first use, and kept; a lock per pipeline serialises generation on it (a torch
module is not safe to run from two threads at once). Nothing here imports gradio, so the handlers behind
the tabs can be tested without a browser.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from finetuners.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    model: str = "shapes"  # the model the app starts with (--model): alias, pipeline folder or cached hub id
    device: str = "auto"  # cpu, cuda, cuda:N or auto (CUDA when present)
    dtype: str | None = None  # None: fp16 on CUDA, fp32 on the CPU
    data_dir: Path = Path("data")  # labels, images and runs written by later tabs
    custom_models: bool = True  # may a user type a model path or hub id in the UI; off when the app is shared
    max_batch: int = 16  # images per click: bounds how long one click holds the model
    max_cached_models: int = 2  # pipelines kept in memory at once (the start-up model is never evicted)
    concurrency: int = 1  # generations running at once; one device, so 1 keeps latency fair
    queue_size: int = 32  # clicks waiting in the queue before new ones are refused
    display_px: int = 256  # images smaller than this are upscaled (nearest neighbour) to about this size
    labels_db: Path | None = None  # the label database (--labels-db); None: <data_dir>/labels.db
    labeller_names: str = "required"  # "required": every label records a name; "optional": "anonymous" if none


@dataclass
class _Entry:
    """One cached pipeline; ``load_lock`` makes concurrent first uses load it once, ``run_lock`` serialises use."""

    pipe: object = None
    load_lock: threading.Lock = field(default_factory=threading.Lock)
    run_lock: threading.Lock = field(default_factory=threading.Lock)


class Backend:
    """Settings plus a small thread-safe LRU cache of pipelines.

    ``loader(model_id, device, dtype)`` defaults to ``finetuners.models.load_model``; tests may pass another.
    """

    def __init__(self, settings: Settings | None = None, loader: Callable | None = None):
        self.settings = settings or Settings()
        self._loader = loader
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._label_store = None
        self._label_lock = threading.Lock()

    # -- models --------------------------------------------------------------------------------------------
    def model_choices(self) -> list[str]:
        """Models offered in the model pickers: the start-up model, the other embedded one when it is embedded
        (shapes, shapes-partial), then the fine-tuned checkpoints."""
        return [self.settings.model, *self.embedded_choices(), *self.checkpoint_choices()]

    def embedded_choices(self) -> list[str]:
        """The embedded models other than the start-up model, offered beside it when it is one of them."""
        from finetuners.models import ALIASES

        if self.settings.model not in ALIASES:
            return []
        return [name for name in ALIASES if name != self.settings.model]

    def check_model(self, model_id: str | None) -> str:
        name = (model_id or "").strip()
        if not name:
            raise UserError("no model chosen: pick one from the list")
        if not self.settings.custom_models and name not in self.model_choices():
            raise UserError(f"{name!r} is not one of this app's models: pick one from the list")
        return name

    def pipeline(self, model_id: str | None):
        """The loaded pipeline for ``model_id`` (loading it on first use). Raises ``UserError`` for a bad model."""
        return self._entry(model_id).pipe

    def defaults(self, model_id: str | None):
        """``ModelDefaults`` (sampler, steps, guidance) for a model, loading it if needed."""
        from finetuners.models import model_defaults

        return model_defaults(self.pipeline(model_id))

    def preload(self) -> None:
        """Load the start-up model now, so a bad --model fails at launch rather than at the first click."""
        self.pipeline(self.settings.model)

    def loaded_models(self) -> list[str]:
        with self._lock:
            return [k for k, e in self._cache.items() if e.pipe is not None]

    # -- generation ----------------------------------------------------------------------------------------
    def generate(self, model_id: str | None, request, callback=None):
        """``finetuners.generate.generate`` on the cached pipeline, one call at a time per pipeline."""
        from finetuners.generate import generate

        entry = self._entry(model_id)
        with entry.run_lock:
            return generate(entry.pipe, request, callback=callback)

    def run_with(self, model_ids: Sequence[str | None], fn: Callable):
        """``fn(*pipes)`` on the cached pipelines of ``model_ids`` while holding each one's run lock.

        For work that needs several pipelines at once (SuperDiff of two models). The locks are taken in a
        fixed order (by model name), so two clicks asking for the same pair never deadlock; a model named
        twice is locked once.
        """
        keys = [self.check_model(m) for m in model_ids]
        entries = {key: self._entry(key) for key in dict.fromkeys(keys)}
        with ExitStack() as stack:
            for key in sorted(entries):
                stack.enter_context(entries[key].run_lock)
            return fn(*(entries[key].pipe for key in keys))

    # -- labels (the Label tab) -----------------------------------------------------------------------------
    @property
    def labels_db_path(self) -> Path:
        return self.settings.labels_db or self.settings.data_dir / "labels.db"

    def label_store(self):
        """The app's one ``LabelStore``, opened on first use (so a broken database never stops the app).

        A database that cannot be opened is a ``UserError`` on every call, not cached: the user may restore
        the file and try again without restarting."""
        from finetuners.labels import LabelStore

        with self._label_lock:
            if self._label_store is None:
                path = self.labels_db_path
                if path == self.settings.data_dir / "labels.db":
                    try:
                        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
                    except OSError as e:
                        raise UserError(f"cannot create the data folder {self.settings.data_dir}: {e.strerror}") from e
                try:
                    self._label_store = LabelStore(path, require_names=self.settings.labeller_names == "required")
                except UserError as e:
                    raise UserError(f"the label database is unreadable: {e}") from e
                log.info("label database %s", path)
            return self._label_store

    def preference_rewards(self) -> list[str]:
        """Reward names (``preference:<folder>``) of the preference models trained in the Label tab."""
        root = self.settings.data_dir / "rewards"
        if not root.is_dir():
            return []
        found = [f for f in sorted(root.iterdir()) if not f.name.startswith(".")]
        return [f"preference:{f.resolve()}" for f in found if (f / "model.safetensors").is_file()]

    # -- fine-tuning runs (the Fine-tune tab) ---------------------------------------------------------------
    @property
    def runs_root(self) -> Path:
        return self.settings.data_dir / "runs"

    def run_manager(self):
        """The app's one ``RunManager`` over ``<data_dir>/runs`` (training runs in processes of their own)."""
        from finetuners.jobs import RunManager

        with self._lock:
            if getattr(self, "_run_manager", None) is None:
                self._run_manager = RunManager(self.runs_root)
            return self._run_manager

    def checkpoint_choices(self) -> list[str]:
        """``run:NAME/step-N`` for the checkpoints of finished or stopped runs, newest first."""
        from finetuners.runs import checkpoint_refs

        return checkpoint_refs(self.runs_root)

    def _load_checkpoint(self, key: str):
        from finetuners.runs import load_checkpoint_pipeline

        return load_checkpoint_pipeline(self.runs_root, key, self.settings.device, self.settings.dtype,
                                        loader=self._loader)  # fmt: skip

    # -- cache ---------------------------------------------------------------------------------------------
    def _entry(self, model_id: str | None) -> _Entry:
        key = self.check_model(model_id)
        with self._lock:
            entry = self._cache.setdefault(key, _Entry())
            self._cache.move_to_end(key)
        with entry.load_lock:
            if entry.pipe is None:
                try:
                    entry.pipe = self._load(key)
                except BaseException:
                    with self._lock:
                        if self._cache.get(key) is entry:
                            del self._cache[key]  # a failed load is not cached: the user may fix the folder
                    raise
                log.info("loaded model %s", key)
        self._evict(keep=key)
        return entry

    def _load(self, key: str):
        from finetuners.runs import is_checkpoint_ref

        if is_checkpoint_ref(key):  # a fine-tuned checkpoint: its base model plus the LoRA or UNet
            return self._load_checkpoint(key)
        if self._loader is not None:
            return self._loader(key, self.settings.device, self.settings.dtype)
        from finetuners.models import load_model

        return load_model(key, self.settings.device, self.settings.dtype)

    def _evict(self, keep: str) -> None:
        """Drop least recently used pipelines beyond ``max_cached_models``; a running generation keeps its own."""
        with self._lock:
            evictable = [k for k in self._cache if k not in (self.settings.model, keep)]
            while len(self._cache) > max(1, self.settings.max_cached_models) and evictable:
                key = evictable.pop(0)
                del self._cache[key]
                log.info("unloaded model %s", key)
