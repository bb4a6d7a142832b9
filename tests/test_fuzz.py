"""Bad input, fuzzed (hypothesis): every public handler behind the tabs and every CLI command, fed text, unicode,
numbers, huge values, NaN/inf and paths ('..', absolute, '~user', NUL bytes, over-long names).

Each call gives a valid result or a ``UserError`` (the one-line message a tab shows), never another exception; a
refused call changes nothing stored; nothing is ever written outside the app's data folder (the handlers run with
their working folder in a sandbox that must stay empty, beside a sentinel folder that must stay untouched). The
CLI exits 0 or 2 with one line on stderr, and writes only into the --out it was given. No training runs: the
Fine-tune tab's run manager starts a stand-in process, and the CLI's model loader is a cached tiny pipeline.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from finetuners.errors import UserError

# The default run replays the same 30 examples per test; FINETUNERS_FUZZ_EXAMPLES=N draws N fresh ones (a longer hunt).
_HUNT = int(os.environ.get("FINETUNERS_FUZZ_EXAMPLES", "0") or 0)
FUZZ = settings(max_examples=_HUNT or 30, deadline=None, derandomize=not _HUNT,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])  # fmt: skip

# -- strategies ------------------------------------------------------------------------------------------------
NASTY_TEXT = ["", " ", "\n", "\t\r", "\x00", "a\x00b", "\ud800", "\udc80x", "é" * 3, "👍🏽", "‮evil", "a" * 1001,
              "x" * 5000, "<script>alert(1)</script>", "'; DROP TABLE labels; --", "{{7*7}}", "%s%n", "\\", "null",
              "None", "NaN", "-1", "1e309"]  # fmt: skip
NASTY_PATHS = ["..", "../..", "../../../etc/passwd", "/etc/passwd", "/", "/tmp", ".", "./", "~", "~root", "~nobody/x",
               "~no-such-user-xyz/x", "a\x00b", "\x00", "x" * 300, "a/" * 2100, "run:../x/step-1", "run:x/step-1",
               "run:x/step-" + "9" * 400, "C:\\Windows", "..\\..\\x", "%2e%2e/%2e%2e", "\ud800", "data/../../x",
               "exports/../../escape", "/proc/self/environ", "/dev/zero", "a/b", "stabilityai/sd-turbo", "-rf",
               "--help", "run:", " ", "\n"]  # fmt: skip
NASTY_NUMBERS = [None, "", " ", "1", "abc", "nan", "inf", "1e309", True, False, [], {}, 10**100, -(10**100), 2**63,
                 2**64, -1, 0, 1.5, -0.0, float("nan"), float("inf"), float("-inf"), 1e308, 5e-324]  # fmt: skip

texts = st.one_of(st.sampled_from(NASTY_TEXT), st.text(max_size=60))
paths = st.one_of(st.sampled_from(NASTY_PATHS), st.text(max_size=40))
numbers = st.one_of(st.sampled_from(NASTY_NUMBERS), st.integers(), st.floats(), st.text(max_size=6))
small = st.one_of(st.sampled_from(NASTY_NUMBERS), st.integers(-3, 3), st.floats(-3, 3))  # valid ones are cheap


def mutated(base: dict, fields: dict) -> st.SearchStrategy[dict]:
    """``base`` (valid widget values) with one or two of its ``fields`` replaced by a draw from their strategies:
    every field's checks are reached, and a good share of the calls is valid and does the real work."""
    keys = st.lists(st.sampled_from(sorted(fields)), min_size=0, max_size=2, unique=True)
    return keys.flatmap(lambda ks: st.fixed_dictionaries({k: fields[k] for k in ks})).map(lambda ch: {**base, **ch})


# -- the sandbox: a data folder the app may write, a working folder and a sentinel it must not --------------------
def _digest(folder: Path) -> dict[str, str]:
    """relative path → sha256 of every file (SQLite's shared-memory index, rewritten by readers, is left out)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.endswith("-shm"):
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[str(p.relative_to(folder)) + "/"] = ""
    return out


class Sandbox:
    def __init__(self, root: Path):
        self.root, self.data, self.cwd, self.sentinel = root, root / "data", root / "cwd", root / "sentinel"
        for folder in (self.data, self.cwd, self.sentinel):
            folder.mkdir(parents=True, exist_ok=True)
        (self.sentinel / "keep.txt").write_text("must stay")
        self.outside = self._outside()

    def _outside(self, *allowed: str) -> dict:
        """Everything but the data folder (and ``allowed``): the sandbox's other folders, the folders around it."""
        skip = tuple(f"{a.rstrip('/')}/" for a in ("data", *allowed))
        tree = {k: v for k, v in _digest(self.root).items() if not k.startswith(skip)}
        tree["..listing"] = "|".join(sorted(os.listdir(self.root.parent)))
        tree["repo-listing"] = "|".join(sorted(p for p in os.listdir(REPO) if not p.startswith(".")))
        return tree

    def call(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``: a result, or ``None`` after a ``UserError`` that changed nothing stored."""
        before = _digest(self.data)
        try:
            result = fn(*args, **kwargs)
        except UserError as e:
            message = str(e)
            assert message.strip() and "Traceback" not in message and len(message) < 20_000, message
            assert _digest(self.data) == before, f"a refused call changed the data folder ({message})"
            result = None
        finally:
            event(f"{getattr(fn, '__name__', 'call')}: {'refused' if sys.exc_info()[0] or result is None else 'ok'}")
            now = self._outside()
            assert now == self.outside, {k for k in set(now) | set(self.outside) if now.get(k) != self.outside.get(k)}
        return result


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    from finetuners.models import load_model

    return load_model(str(tiny_pipeline_dir), "cpu")


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    sandbox = Sandbox(tmp_path_factory.mktemp("fuzz"))
    old = os.getcwd()
    os.chdir(sandbox.cwd)  # relative paths typed into a handler land here, where nothing may appear
    yield sandbox
    os.chdir(old)


@pytest.fixture(scope="module")
def backend(box, pipe, tiny_pipeline_dir):
    """The app's backend over the sandbox's data folder. Any model id passes the real path checks, then loads the
    one tiny pipeline; the run manager starts a stand-in that exits at once instead of a trainer."""
    from finetuners.jobs import RunManager
    from finetuners.labels import png_bytes
    from finetuners.models import resolve_model_path
    from ui.backend import Backend, Settings

    def loader(model_id, device, dtype):
        resolve_model_path(model_id)
        return pipe

    b = Backend(Settings(model=str(tiny_pipeline_dir), device="cpu", data_dir=box.data, max_batch=2), loader=loader)
    fake = box.root / "fake-python"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    b._run_manager = RunManager(b.runs_root, python=str(fake))
    store = b.label_store()
    gen = torch.Generator().manual_seed(0)
    for i in range(2):
        images = [png_bytes(torch.rand(3, 8, 8, generator=gen)) for _ in range(2)]
        store.add_pair(f"a red circle {i}", *images, "m@1", "m@2", {})
    box.outside = box._outside()  # the sandbox as the fixtures left it
    yield b
    store.close()


# -- Sample tab ---------------------------------------------------------------------------------------------------
SAMPLE = dict(model="default", prompt="a red circle", negative="", steps=2, sampler="ddim-trailing", eta=0.0,
              guidance=1.0, seed=0, batch=1, adaptive=None)  # fmt: skip
SAMPLE_FIELDS = dict(
    model=paths,
    prompt=texts,
    negative=texts,
    steps=small,
    sampler=texts,
    eta=numbers,
    guidance=numbers,
    seed=numbers,
    batch=small,
    adaptive=st.one_of(paths, st.just("fuzz-policy")),
)


@FUZZ
@given(v=mutated(SAMPLE, SAMPLE_FIELDS))
def test_sample_tab(backend, box, policy, v):
    from ui.sample_tab import SampleView, defaults_for, run_sample

    model = backend.settings.model if v["model"] == "default" else v["model"]
    view = box.call(run_sample, backend, model, v["prompt"], v["negative"], v["steps"], v["sampler"], v["eta"],
                    v["guidance"], v["seed"], v["batch"], None, v["adaptive"])  # fmt: skip
    if view is not None:
        assert isinstance(view, SampleView) and 1 <= len(view.images) <= 2 and "s per image" in view.info
        assert (v["adaptive"] == "fuzz-policy") == ("adaptive steps: policy" in view.info)
    defaults = box.call(defaults_for, backend, model)
    assert defaults is None or (isinstance(defaults[0], int) and defaults[1] in ("ddim", "ddim-trailing", "lcm"))


@FUZZ
@given(model=paths)
def test_a_shared_app_loads_none_of_the_models_typed_in(box, model, pipe):
    """With --share or a public --host, nothing but the listed models is ever loaded, whatever is typed."""
    from ui.backend import Backend, Settings

    loaded = []
    b = Backend(Settings(model="m", data_dir=box.data, custom_models=False), loader=lambda *a: loaded.append(a) or pipe)
    assume(model.strip() != "m")
    assert box.call(b.pipeline, model) is None and loaded == []


# -- Label tab ---------------------------------------------------------------------------------------------------
PAIRS = dict(queue="a red circle", queue_file=None, kind="steps", model_a="default", model_b="default", steps_a=1,
             steps_b=2, seed=0)  # fmt: skip
PAIRS_FIELDS = dict(
    queue=st.one_of(texts, st.lists(texts, max_size=2).map("\n".join)),
    queue_file=paths,
    kind=st.one_of(st.sampled_from(["seeds", "checkpoints", "steps"]), texts),
    model_a=paths,
    model_b=st.one_of(st.just("default"), paths),
    steps_a=small,
    steps_b=small,
    seed=numbers,
)


@FUZZ
@given(v=mutated(PAIRS, PAIRS_FIELDS))
def test_label_tab_generate_pairs(backend, box, v):
    from ui.label_tab import generate_pairs

    model_a, model_b = (backend.settings.model if v[m] == "default" else v[m] for m in ("model_a", "model_b"))
    before = backend.label_store().counts()["pairs"]
    text = box.call(generate_pairs, backend, v["queue"], v["queue_file"], v["kind"], model_a, model_b, v["steps_a"],
                    v["steps_b"], v["seed"])  # fmt: skip
    after = backend.label_store().counts()["pairs"]
    if text is None:
        assert after == before
    else:  # one pair per prompt of the queue, each stored before the summary
        n = len([q for q in v["queue"].splitlines() if q.strip() and not q.strip().startswith("#")])
        assert text.startswith(f"✓ Stored **{n} pair") and after == before + n


@FUZZ
@given(
    v=mutated(
        dict(name="ann", pair_id=1, choice="left", username=None),
        dict(name=texts, pair_id=numbers, choice=texts, username=texts),
    )
)
def test_label_tab_labelling(backend, box, v):
    from ui.label_tab import LabelView, record_label, show_next, undo_label

    store = backend.label_store()
    live = lambda: len(store.labels(include_skips=True))  # noqa: E731
    before = live()
    name, username = v["name"], v["username"]
    for fn, args in ((show_next, ()), (record_label, (v["pair_id"], v["choice"])), (undo_label, ())):
        view = box.call(fn, backend, name, *args, username=username)
        assert view is None or isinstance(view, LabelView)
        if fn is record_label:  # acknowledged ⇔ stored (a new label may replace the labeller's own on that pair)
            assert live() in ((before + 1, before) if view is not None else (before,))
            assert view is None or view.status.startswith("✓ Saved label #")


@FUZZ
@given(v=mutated(dict(path="exports/x", fmt="jsonl", uploaded=None),
                 dict(path=paths, fmt=texts, uploaded=paths)), tag=st.integers(0, 10**9))  # fmt: skip
def test_label_tab_export_and_import(backend, box, v, tag):
    from ui.label_tab import export_labels, import_labels

    path = f"{v['path']}-{tag}" if v["path"] == "exports/x" else v["path"]
    text = box.call(export_labels, backend, path, v["fmt"])
    if text is not None:  # a new folder inside the data folder
        assert "✓ Exported" in text and str(box.data.resolve()) in text
    digest = backend.label_store().digest()
    text = box.call(import_labels, backend, path, v["uploaded"])
    if text is not None:  # importing the store's own export adds nothing
        assert "Imported 0 new pairs and **0 labels**" in text and backend.label_store().digest() == digest


@FUZZ
@given(name=st.one_of(texts, st.just("ok-name")), clip=st.one_of(st.none(), paths))
def test_label_tab_train_reward(backend, box, name, clip):
    from ui.label_tab import train_reward

    assert box.call(train_reward, backend, name, clip) is None  # too few labels to train on, or bad input


# -- Fine-tune tab -----------------------------------------------------------------------------------------------
START = dict(method="SDPO", reward="jpeg-compressibility", learning_rate=1e-4, batch=2, epochs=1, train_steps=2,
             eval_steps=[1], adapter="LoRA", lora_rank=2, weights="", batches_per_epoch=1, eval_prompts=2,
             eval_every=1, seed=0)  # fmt: skip
START_FIELDS = dict(
    method=texts,
    reward=texts,
    learning_rate=numbers,
    batch=small,
    epochs=numbers,
    train_steps=small,
    eval_steps=st.lists(st.sampled_from([1, 2, 4, 8, 16])),
    adapter=texts,
    lora_rank=small,
    weights=paths,
    batches_per_epoch=small,
    eval_prompts=small,
    eval_every=numbers,
    seed=numbers,
    prompts=st.one_of(texts, st.lists(texts, max_size=4).map("\n".join), numbers),
)


@FUZZ
@given(v=mutated(START, START_FIELDS), name=st.one_of(paths, st.uuids().map(lambda u: f"fz-{u.hex[:10]}")))
def test_finetune_tab_start(backend, box, v, name):
    from ui.finetune_tab import start_run

    info = box.call(start_run, backend, name, **v)
    if info is not None:  # a new run folder, directly inside the runs folder, started with the settings asked for
        assert info.path.parent == backend.runs_root.resolve() and (info.path / "launch.json").is_file()
        launch = json.loads((info.path / "launch.json").read_text())
        assert launch["config"]["algo"]["num_epochs"] == int(float(v["epochs"]))
        typed = v.get("prompts") or ""
        assert launch["config"]["prompt_list"] == [line.strip() for line in typed.splitlines() if line.strip()]


def test_finetune_tab_evaluation_step_counts_that_are_not_numbers(backend):
    from ui.finetune_tab import make_config

    for steps in (["abc"], [1.5], [3], None, "1 2", [10**30]):
        with pytest.raises(UserError, match="evaluation step counts|no evaluation step counts"):
            make_config(backend, "SDPO", "jpeg-compressibility", 1e-4, 2, 1, 2, steps, "LoRA", 2)


@FUZZ
@given(name=paths)
def test_finetune_tab_run_actions(backend, box, name):
    from ui.finetune_tab import resume_run, run_view, stop_run

    for fn in (stop_run, resume_run, run_view):
        box.call(fn, backend, name)


# -- Adaptive steps tab ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def policy(backend, pipe):
    """An untrained policy saved in the app's policies folder (the handlers only read it)."""
    from finetuners import adadiff as ad
    from ui.adaptive_tab import policies_root

    config = ad.AdaDiffConfig(candidates=(1, 2), quality="shapes-accuracy")
    torch.manual_seed(0)
    policy = ad.StepPolicy(ad.text_features(pipe, ["a red circle"]).shape[-1], config.candidates, config.hidden)
    ad.save_policy(policies_root(backend) / "fuzz-policy", policy, config)
    return "fuzz-policy"


@FUZZ
@given(v=mutated(dict(model="default", policy="fuzz-policy", prompt="a red circle", seed=0, prompts_text="", n=2),
                 dict(model=paths, policy=paths, prompt=texts, seed=numbers, prompts_text=texts, n=small)),
       name=paths, n_prompts=numbers)  # fmt: skip
def test_adaptive_tab(backend, box, policy, v, name, n_prompts):
    from ui.adaptive_tab import PromptView, SetView, run_prompt, run_prompt_set, train_steps

    model = backend.settings.model if v["model"] == "default" else v["model"]
    view = box.call(run_prompt, backend, model, v["policy"], v["prompt"], v["seed"])
    assert view is None or (isinstance(view, PromptView) and view.chosen in (1, 2) and len(view.images) == 2)
    view = box.call(run_prompt_set, backend, model, v["policy"], v["prompts_text"], v["n"])
    assert view is None or (isinstance(view, SetView) and sum(view.histogram) >= 1)
    assume(not (isinstance(n_prompts, int | float) and not isinstance(n_prompts, bool) and math.isfinite(n_prompts)
                and float(n_prompts).is_integer() and 1 <= n_prompts <= 2000))  # a valid count would train  # fmt: skip
    assert box.call(lambda: list(train_steps(backend, model, name, n_prompts, 1, "1 2", 1, 1.0))) is None


@FUZZ
@given(candidates=st.one_of(texts, st.lists(st.integers(-2, 300).map(str), max_size=6).map(" ".join)),
       prompts_text=texts, n=numbers, seeds=numbers, epochs=numbers, weight=numbers)  # fmt: skip
def test_adaptive_tab_settings(box, candidates, prompts_text, n, seeds, epochs, weight):
    from finetuners import adadiff as ad
    from ui.adaptive_tab import _weight, _whole, parse_candidates, set_prompts

    parsed = box.call(parse_candidates, candidates)
    assert parsed is None or (len(parsed) >= 1 and all(isinstance(u, int) and u >= 1 for u in parsed))
    prompts = box.call(set_prompts, prompts_text, n)
    assert prompts is None or 1 <= len(prompts) <= 500
    box.call(
        lambda: ad.AdaDiffConfig(
            candidates=parsed or (1, 2),
            num_seeds=_whole("seeds", seeds, 1, 8),
            epochs=_whole("epochs", epochs, 1, 5000),
            quality_weight=_weight(weight),
        )
    )


# -- Superpose tab -----------------------------------------------------------------------------------------------
SUPERPOSE = dict(source="prompts", model_a="default", model_b=None, prompt_a="a red circle", prompt_b="a blue square",
                 joint="", mode="and", temperature=1.0, bias=0.0, steps=20, guidance=1.0, seed=0, batch=1)  # fmt: skip
SUPERPOSE_FIELDS = dict(source=texts, model_a=paths, model_b=paths, prompt_a=texts, prompt_b=texts, joint=texts,
                        mode=st.one_of(st.sampled_from(["or", "avg", "joint"]), texts), temperature=numbers,
                        bias=numbers, steps=small, guidance=numbers, seed=numbers, batch=small)  # fmt: skip


@FUZZ
@given(v=mutated(SUPERPOSE, SUPERPOSE_FIELDS))
def test_superpose_tab(backend, box, v):
    from ui.superpose_tab import SuperposeView, make_request, run_superpose

    v["model_a"] = backend.settings.model if v["model_a"] == "default" else v["model_a"]
    args = [v[k] for k in SUPERPOSE]
    request = box.call(make_request, *args, 2)
    if request is not None:
        assert request.config.steps == 20 and 1 <= request.batch <= 2
    view = box.call(run_superpose, backend, *args)
    assert view is None or (isinstance(view, SuperposeView) and len(view.images) == request.batch)


# -- the command lines -------------------------------------------------------------------------------------------
def _cli(argv: list[str]) -> tuple[int, str]:
    from finetuners.__main__ import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: --help (0) or a bad flag (2)
            code = e.code
    event(f"{argv[0]}: exit {code}")
    return code, err.getvalue()


@pytest.fixture(scope="module")
def cli_loader(pipe):
    """``load_model`` for the CLI: the real device, dtype and path checks, then the cached tiny pipeline."""
    import finetuners.models as models

    real = models.load_model

    def load_model(id_or_path="shapes", device="cpu", dtype=None, **kwargs):
        dev = models.resolve_device(device)
        models.resolve_dtype(dtype, dev)
        models.resolve_model_path(id_or_path)
        return pipe

    models.load_model = load_model
    yield
    models.load_model = real


def _answer(argv: list[str]) -> tuple[int, str]:
    """The CLI's exit status and stderr: 0 or 2, never a traceback, and an error in one line."""
    code, err = _cli(argv)
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in err, err
    if code == 2:
        assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    return code, err


def _check_cli(box, argv: list[str], out: Path | None = None) -> tuple[int, str]:
    """Run the CLI: exit 0 or 2, one line on stderr for an error, nothing written but PNGs into ``out``."""
    out_before = _digest(out) if out is not None and out.is_dir() else {}
    data_before = _digest(box.data)
    code, err = _answer(argv)
    assert _digest(box.data) == data_before
    assert box._outside("cwd/cli") == {k: v for k, v in box.outside.items() if not k.startswith("cwd/cli/")}
    cli = box.cwd / "cli"
    written = {str(p.relative_to(cli)) for p in cli.rglob("*") if p.is_file()} if cli.is_dir() else set()
    if code == 0 and out is not None:
        assert written and all(Path(cli / w).parent == out and w.endswith(".png") for w in written), written
    else:
        assert (_digest(out) if out is not None and out.is_dir() else {}) == out_before and not written, written
    return code, err


outs = st.one_of(
    st.sampled_from(["out", "out/a", "o\x00", "x" * 300, "\ud800", "~nobody/out", "a/../b", "./c"]),
    st.text(alphabet="abc_-.", min_size=1, max_size=6),
)
SAMPLE_CLI = dict(prompt="a red circle", steps="1", batch="1", seed="0", eta="0", guidance="1", model="shapes",
                  out="out", device="cpu", dtype="float32")  # fmt: skip
SAMPLE_CLI_FIELDS = dict(prompt=texts, steps=st.sampled_from(["2", "0", "-1", "999999999999", "1.5", "nan", "x", ""]),
                         batch=st.sampled_from(["2", "0", "65", "1e3", "-5"]), seed=numbers.map(str),
                         eta=numbers.map(str), guidance=numbers.map(str), model=paths, out=outs,
                         device=st.sampled_from(["cuda", "cuda:7", "mps", "tpu", "x", ""]),
                         dtype=st.sampled_from(["float16", "bfloat16", "int8", ""]))  # fmt: skip


@FUZZ
@given(v=mutated(SAMPLE_CLI, SAMPLE_CLI_FIELDS))
@example(v={**SAMPLE_CLI, "model": "x" * 300})  # found by a 300-example hunt: an OSError (name too long), exit 1
def test_cli_sample(box, cli_loader, v):
    argv = ["sample", "--prompt", v["prompt"], "--steps", v["steps"], "--batch", v["batch"], "--seed", v["seed"],
            "--eta", v["eta"], "--guidance", v["guidance"], "--model", v["model"], "--out", f"cli/{v['out']}",
            "--device", v["device"], "--dtype", v["dtype"]]  # fmt: skip
    try:
        out = (box.cwd / "cli" / v["out"]).resolve() if "\x00" not in v["out"] and v["out"].isprintable() else None
        # "cli/.." names the sandbox's working folder itself, which the CLI rightly writes into: not this test's case
        assume(out is None or out.is_relative_to((box.cwd / "cli").resolve()))
        code, _ = _check_cli(box, argv, out)
    finally:  # the sandbox's working folder must stay empty for the other tests
        shutil.rmtree(box.cwd / "cli", ignore_errors=True)
    if v == SAMPLE_CLI:
        assert code == 0


TRAIN_CLI = dict(
    run="runs/fz", lr="0.0001", epochs="1", batch="2", model="no-such-model", reward="jpeg-compressibility"
)
TRAIN_CLI_FIELDS = dict(run=st.one_of(paths, st.text(alphabet="ab./", min_size=1, max_size=8)), lr=numbers.map(str),
                        epochs=numbers.map(str), batch=small.map(str), model=paths, reward=texts)  # fmt: skip


@FUZZ
@given(v=mutated(TRAIN_CLI, TRAIN_CLI_FIELDS), resume=st.booleans(), config=st.one_of(st.none(), paths))
def test_cli_train(box, cli_loader, v, resume, config):
    """No model here is a pipeline folder, so no training starts: every setting is checked before that."""
    run = v["run"] if v["run"].startswith("/") else str(box.data / v["run"])
    argv = ["train", "--run", run, "--lr", v["lr"], "--epochs", v["epochs"], "--batch", v["batch"], "--model",
            v["model"], "--reward", v["reward"]] + (["--resume"] if resume else [])  # fmt: skip
    argv += ["--config", config] if config is not None else []
    code, _ = _check_cli(box, argv)
    assert code == 2


ADAPT_CLI = dict(
    out="policies/fz", prompts="4", epochs="2", lr="0.01", quality="shapes-accuracy", candidates=["1", "2"]
)
ADAPT_CLI_FIELDS = dict(out=paths, prompts=numbers.map(str), epochs=numbers.map(str), lr=numbers.map(str),
                        quality=texts, candidates=st.lists(numbers.map(str), max_size=3),
                        prompt_file=paths)  # fmt: skip


@FUZZ
@given(v=mutated(ADAPT_CLI, ADAPT_CLI_FIELDS))
@example(v={**ADAPT_CLI, "out": "a/" * 2100})  # found by a 300-example hunt: an OSError (name too long), exit 1
@example(v={**ADAPT_CLI, "out": "/etc/passwd"})  # found by another: NotADirectoryError, exit 1
def test_cli_adapt_train(box, cli_loader, v):
    """The model loader stops the command once every setting has been checked (rendering would take minutes)."""
    import finetuners.models as models

    argv = ["adapt-train", "--out", v["out"], "--prompts", v["prompts"], "--epochs", v["epochs"], "--lr", v["lr"],
            "--quality", v["quality"]]  # fmt: skip
    argv += ["--candidates", *v["candidates"]] if v["candidates"] else []
    argv += ["--prompt-file", v["prompt_file"]] if "prompt_file" in v else []

    def stop(*a, **k):
        raise UserError("fuzzing stops before the ladder is rendered")

    models.load_model, keep = stop, models.load_model
    try:
        code, err = _check_cli(box, argv)
    finally:
        models.load_model = keep
    assert code == 2
    if v == ADAPT_CLI:
        assert "fuzzing stops" in err


SUPERPOSE_CLI = dict(prompt_a="a red circle", prompt_b="a blue square", model_b=None, mode="and", temperature="1",
                     bias="0", steps="20", batch="1", out="out")  # fmt: skip
SUPERPOSE_CLI_FIELDS = dict(prompt_a=texts, prompt_b=texts, model_b=paths, mode=st.sampled_from(["or", "avg", "xor"]),
                            temperature=numbers.map(str), bias=numbers.map(str), steps=numbers.map(str),
                            batch=small.map(str), out=outs)  # fmt: skip


@FUZZ
@given(v=mutated(SUPERPOSE_CLI, SUPERPOSE_CLI_FIELDS))
def test_cli_superpose(box, cli_loader, v):
    """The model loader stops the command once every setting has been checked."""
    import finetuners.models as models

    argv = [
        "superpose",
        "--mode",
        v["mode"],
        "--temperature",
        v["temperature"],
        "--bias",
        v["bias"],
        "--steps",
        v["steps"],
        "--batch",
        v["batch"],
        "--out",
        f"cli/{v['out']}",
        "--prompt-a",
        v["prompt_a"],
        "--prompt-b",
        v["prompt_b"],
    ] + (["--model-b", v["model_b"]] if v["model_b"] is not None else [])

    def stop(*a, **k):
        raise UserError("fuzzing stops before sampling")

    models.load_model, keep = stop, models.load_model
    try:
        code, err = _check_cli(box, argv, None)
    finally:
        models.load_model = keep
        shutil.rmtree(box.cwd / "cli", ignore_errors=True)
    assert code == 2
    if v == SUPERPOSE_CLI:
        assert "fuzzing stops" in err


LABELS_CLI = dict(action="stats", data_dir=None, labels_db=None, out="exp", source=None, clip=None, reward_model=None)
LABELS_CLI_FIELDS = dict(action=st.sampled_from(["stats", "export", "import", "reward"]), data_dir=paths,
                         labels_db=paths, out=outs, source=st.one_of(paths, st.just("EXPORT")), clip=paths,
                         reward_model=st.sampled_from(["cells", "mlp", "svm", ""]))  # fmt: skip


@FUZZ
@given(v=mutated(LABELS_CLI, LABELS_CLI_FIELDS), tag=st.integers(0, 10**9))
def test_cli_labels(backend, box, v, tag):
    """``labels`` on the app's data folder (two pairs, no labels): exit 0 or 2 and one line; a refused command changes
    nothing; exports go only where --out says (inside cli/), and importing the store's own export adds nothing."""
    store = backend.label_store()
    export = box.cwd / "cli" / "own-export"
    if v["source"] == "EXPORT":
        export.parent.mkdir(exist_ok=True)
        store.export(export)
    source = str(export) if v["source"] == "EXPORT" else v["source"]
    # a real export may only be imported into the data folder: anywhere else it would rightly make a new store
    data_dir = str(box.data) if v["data_dir"] is None or source == str(export) else v["data_dir"]
    out = box.cwd / "cli" / f"{v['out']}-{tag}"
    assume("\x00" in v["out"] or not v["out"].isprintable() or out.resolve().parent == (box.cwd / "cli").resolve())
    argv = ["labels", v["action"], "--data-dir", data_dir]
    argv += ["--labels-db", v["labels_db"]] if v["labels_db"] is not None and source != str(export) else []
    reward = ["--clip", v["clip"]] if v["clip"] is not None else []
    reward += ["--reward-model", v["reward_model"]] if v["reward_model"] is not None else []
    argv += {"stats": [], "import": [source or "."], "export": ["--out", f"cli/{v['out']}-{tag}"],
             "reward": reward}[v["action"]]  # fmt: skip
    files, content = _digest(box.data), store.digest()
    try:
        code, err = _answer(argv)
        if code == 2:
            assert _digest(box.data) == files
        else:
            assert store.digest() == content  # stats and export read; the store's own export adds nothing
        assert box._outside("cwd/cli") == {k: w for k, w in box.outside.items() if not k.startswith("cwd/cli/")}
        if code == 0 and v["action"] == "export":
            assert (out / "labels.jsonl").is_file()
    finally:  # the sandbox's working folder must stay empty for the other tests
        shutil.rmtree(box.cwd / "cli", ignore_errors=True)
    if v == LABELS_CLI:
        assert code == 0


APP = dict(model="shapes", device="cpu", dtype=None, host="127.0.0.1", port="7860", data_dir="data", labels_db=None,
           auth=[], max_batch="16")  # fmt: skip
APP_FIELDS = dict(
    model=paths,
    device=texts,
    dtype=texts,
    host=st.one_of(st.sampled_from(["0.0.0.0", "::1", "localhost", "example.com", "127.0.0.2"]), texts),
    port=numbers.map(str),
    data_dir=paths,
    labels_db=paths,
    auth=st.lists(texts, min_size=1, max_size=2),
    max_batch=numbers.map(str),
)


@FUZZ
@given(v=mutated(APP, APP_FIELDS))
def test_app_flags(box, v):
    """``python app.py`` flags: settings or one clear error, checked before anything loads or is written."""
    from app import _is_loopback, parse_args, settings_from_args

    argv = ["--model", v["model"], "--device", v["device"], "--host", v["host"], "--port", v["port"], "--data-dir",
            v["data_dir"], "--max-batch", v["max_batch"]] + [f"--auth={a}" for a in v["auth"]]  # fmt: skip
    argv += ["--dtype", v["dtype"]] if v["dtype"] is not None else []
    argv += ["--labels-db", v["labels_db"]] if v["labels_db"] is not None else []
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = parse_args(argv)
        except SystemExit as e:
            assert e.code == 2 and err.getvalue().startswith("error:") and len(err.getvalue().splitlines()) == 1
            return
    found = box.call(settings_from_args, args)
    if found is not None:
        assert found.custom_models == _is_loopback(v["host"])  # public: only the listed models
        assert 1 <= found.max_batch <= 64 and args.host == v["host"]
    if v == APP:
        assert found is not None and found.custom_models and parse_args([]).host == "127.0.0.1"
