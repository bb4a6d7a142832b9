r"""Command line: ``python -m finetuners <command> …``.

    python -m finetuners sample --prompt "a red circle above a blue square" --steps 4 --out out/
    python -m finetuners sample --model stabilityai/sd-turbo --sampler ddim-trailing --steps 1 \
        --guidance 0 --device cuda --prompt "..."

    # default model shapes-partial (captions that leave objects out), guidance 1 there
    python -m finetuners superpose --prompt-a "a red circle" --prompt-b "a blue square" --mode and --out out/
    python -m finetuners superpose --model shapes --model-b runs/first --prompt "..." --mode or

    python -m finetuners train --method sdpo --reward shapes-probe --model shapes --run runs/first --epochs 10
    python -m finetuners train --run runs/first --resume
    python -m finetuners train --run runs/first --config launch.json   # every setting from a file (the app's way)
    python -m finetuners train --model stabilityai/sd-turbo --device cuda --reward preference:data/rewards/mine \
        --prompt-file my-prompts.txt --run runs/turbo   # your own prompts, one per line

    # data-parallel on N processes (GPUs; on a CPU-only machine gloo): the same trainer, gradients averaged
    accelerate launch --multi_gpu --num_processes 2 -m finetuners train --run runs/multi --epochs 10

    # AdaDiff: a policy that picks the step count per prompt, then sampling with it
    python -m finetuners sample --adaptive shapes --prompt "a red circle above a blue square"   # the shipped policy
    python -m finetuners adapt-train --out data/policies/mine --prompts 600 --candidates 1 2 3 4 6 8
    python -m finetuners sample --adaptive data/policies/mine --prompt "a red circle above a blue square"

    # the Label tab's store (<data-dir>/labels.db): statistics, Pick-a-Pic export / import, the reward model
    python -m finetuners labels stats --data-dir data
    python -m finetuners labels export --data-dir data --out labels-export --format parquet
    python -m finetuners labels import --data-dir data labels-export
    python -m finetuners labels reward --data-dir data --out data/rewards/mine   # then --reward preference:...

Bad input prints one line on stderr and exits with status 2; nothing is written.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

from .errors import UserError
from .names import typed_path

MAX_PROMPT_FILE_BYTES = 50_000_000  # adapt-train --prompt-file


def _add_model_args(p: argparse.ArgumentParser, default: str = "shapes") -> None:
    p.add_argument(
        "--model",
        default=default,
        help=f"pipeline folder, hub id in the local cache, 'shapes' or 'shapes-partial' (default: {default}); or a "
        "fine-tuned checkpoint: runs/NAME (its latest), runs/NAME/checkpoints/step-N or run:NAME/step-N",
    )
    p.add_argument("--runs", default="runs", help="the runs folder that run:NAME/step-N refers to (default: runs)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--allow-download", action="store_true", help="let a hub id be downloaded if not cached")


def cmd_sample(args: argparse.Namespace) -> int:
    from .generate import SampleRequest, generate
    from .imageio import save_png
    from .models import model_defaults
    from .runs import load_pipeline
    from .shapes.probe import read_prompts

    out = typed_path(args.out, "--out folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} exists and is not a folder")
    pipe = load_pipeline(args.model, args.device, args.dtype, runs_root=args.runs, allow_download=args.allow_download)
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
    if args.adaptive:  # AdaDiff: the policy picks the step count (--steps is ignored)
        from .adadiff import generate_adaptive, load_policy, policy_arg

        policy, config, _ = load_policy(policy_arg(args.adaptive))
        result = generate_adaptive(pipe, policy, request, config=config)  # at the policy's sampler and guidance
        probs = ", ".join(f"{u}: {p:.2f}" for u, p in zip(policy.candidates, result.info["adaptive_probs"]))
        print(f"adaptive steps: {result.info['adaptive_steps']} (π = {probs}), sampler {config.sampler}, guidance "
              f"{config.guidance:g}", file=sys.stderr)  # fmt: skip
    else:
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
    if reading := read_prompts(result.images, [request.prompt]):
        (spec,), scenes = reading
        n, followed = len(scenes), sum(spec.satisfied_by(scene) for scene in scenes)
        print(f"Shapes probe: the prompt is followed in {followed} of {n} image{'s' * (n > 1)}", file=sys.stderr)
    return 0


def read_prompt_file(name: str) -> list[str]:
    """The non-empty lines of ``--prompt-file``, stripped, in order (repeats kept); ``UserError`` in words for a file
    that is missing, unreadable, not UTF-8 text or over ``MAX_PROMPT_FILE_BYTES``."""
    path = typed_path(name, "--prompt-file")
    if not path.is_file():
        raise UserError(f"--prompt-file {name!r} is not a file")
    try:
        with open(path, "rb") as f:  # bounded: a size of 0 may be a lie (/dev/zero, /proc files)
            data = f.read(MAX_PROMPT_FILE_BYTES + 1)
        if len(data) > MAX_PROMPT_FILE_BYTES:
            raise UserError(f"--prompt-file is larger than {MAX_PROMPT_FILE_BYTES // 1_000_000} MB")
        lines = data.decode("utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --prompt-file {name!r}: {getattr(e, 'strerror', None) or e}") from e
    return [line.strip() for line in lines if line.strip()]


def cmd_adapt_train(args: argparse.Namespace) -> int:
    """AdaDiff (ALGORITHMS.md §3): render every training prompt's ladder once, then REINFORCE on the cached table."""
    from . import adadiff as ad
    from .names import entries_of_new_folder
    from .runs import load_pipeline

    folder = ad.split_policy_arg(args.out)
    if entries_of_new_folder(folder, "--out"):
        raise UserError(f"--out {str(folder)!r} already holds files: choose a new folder")
    # checked now, before the model loads; what is left unset follows the model (ad.suggested_setup) once loaded
    candidates = tuple(args.candidates) if args.candidates else ad.CANDIDATE_SETS[args.candidate_set or "shapes"]
    config = ad.AdaDiffConfig(candidates=candidates, top_k=args.top_k, quality_weight=args.quality_weight,
                              penalty=args.penalty, flat_rows=args.flat_rows, quality=args.quality,
                              num_seeds=args.seeds, sampler=args.sampler or "ddim", loss=args.loss,
                              guidance=3.0 if args.guidance is None else args.guidance,
                              lr=args.lr, epochs=args.epochs, seed=args.seed)  # fmt: skip
    if args.prompt_file:
        prompts = list(dict.fromkeys(read_prompt_file(args.prompt_file)))
    else:  # Shapes captions in the world's mix, rendered at seeds no evaluation uses
        if not 1 <= args.prompts <= 5000:
            raise UserError(f"--prompts must be between 1 and 5000, got {args.prompts}")
        prompts = ad.training_prompts(args.prompts)
    if not prompts:
        raise UserError("no training prompts: --prompt-file is empty")
    iqs = ad.make_iqs(config.quality, device=args.device)
    ad.check_quality(config.quality, prompts)  # before the model loads
    pipe = load_pipeline(args.model, args.device, args.dtype, runs_root=args.runs, allow_download=args.allow_download)
    ad.check_quality(config.quality, prompts, pipe)
    given = args.candidates or (ad.CANDIDATE_SETS[args.candidate_set] if args.candidate_set else None)
    candidates, sampler, guidance = ad.suggested_setup(pipe, given)
    config = replace(config, candidates=candidates, sampler=args.sampler or sampler,
                     guidance=guidance if args.guidance is None else args.guidance)  # fmt: skip
    print(
        f"candidates {list(config.candidates)}, sampler {config.sampler}, guidance {config.guidance:g}", file=sys.stderr
    )
    last = [0.0]

    def progress(phase, fraction, info):
        if phase == "ladder" and fraction - last[0] >= 0.1 or fraction >= 1:
            last[0] = fraction
            print(f"{phase} {100 * fraction:.0f}%" + (f" ({info['text']})" if "text" in info else
                  f": expected reward {info['expected_reward']:.3f}, mean steps {info['mean_steps']:.2f}"),
                  file=sys.stderr)  # fmt: skip
        if phase == "policy":
            last[0] = 0.0

    result, ladder, _ = ad.fit(pipe, prompts, config, iqs, progress=progress)
    meta = {"model": args.model, "prompts": len(prompts), "ladder_seconds": ladder.seconds, "ladder_nfe": ladder.nfe,
            "final": result.history[-1]}  # fmt: skip
    ad.save_policy(folder, result.policy, config, meta, ladder)
    print(folder)
    return 0


def cmd_superpose(args: argparse.Namespace) -> int:
    """SuperDiff (ALGORITHMS.md §4): two prompts on one model, or two models (--model-b) on one prompt."""
    import json
    from dataclasses import asdict, replace

    from .imageio import atomic_write_bytes, save_png
    from .runs import load_pipeline
    from .shapes.probe import ONE_PROMPT_OUTCOMES, TWO_PROMPT_OUTCOMES, outcome, read_prompts
    from .shapes.world import describe_scene
    from .superdiff import SuperDiffConfig, default_guidance, superpose_models, superpose_prompts

    out = typed_path(args.out, "--out folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} exists and is not a folder")
    prompt_a = args.prompt_a if args.prompt_a is not None else args.prompt
    if prompt_a is None or not prompt_a.strip():
        raise UserError("the prompt is empty: pass --prompt-a (or --prompt) with what the image should show")
    if args.model_b is None and (args.prompt_b is None or not args.prompt_b.strip()):
        raise UserError("two prompts are needed on one model: pass --prompt-b (or --model-b to superpose two models)")
    if args.model_b is not None and args.model_b == args.model:
        raise UserError("--model-b is the same as --model: pick two different models, or superpose two prompts")
    # validated before any model loads; the model's own guidance replaces the placeholder below
    config = SuperDiffConfig(mode=args.mode, temperature=args.temperature, bias=(args.bias, 0.0), steps=args.steps,
                             guidance=args.guidance if args.guidance is not None else 1.0)  # fmt: skip
    pipe = load_pipeline(args.model, args.device, args.dtype, runs_root=args.runs, allow_download=args.allow_download)
    if args.guidance is None:
        config = replace(config, guidance=default_guidance(pipe))
    if args.model_b is None:
        prompts, models = [prompt_a, args.prompt_b], [args.model]
        result = superpose_prompts(pipe, prompt_a, args.prompt_b, config, args.seed, args.batch,
                                   negative_prompt=args.negative_prompt)  # fmt: skip
    else:
        pipe_b = load_pipeline(
            args.model_b, args.device, args.dtype, runs_root=args.runs, allow_download=args.allow_download
        )
        prompts, models = [prompt_a, args.prompt_b or prompt_a], [args.model, args.model_b]
        result = superpose_models(pipe, pipe_b, prompt_a, config, args.seed, args.batch, prompt_b=args.prompt_b,
                                  negative_prompt=args.negative_prompt)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(result.images):
        path = out / f"{args.mode}_seed{args.seed + i}.png"
        save_png(image, path)
        print(path)
    traces = {
        "mode": args.mode, "models": models, "prompts": prompts, "seed": args.seed, "batch": args.batch,
        "config": asdict(config), "nfe": result.nfe, "unet_rows": result.info["unet_rows"],
        "seconds": result.seconds, "timesteps": result.ladder.timesteps.tolist(),
        "sigmas": result.ladder.sigmas.tolist(),  # σ̃_0 … σ̃_N = 0, [N+1]
        "kappa": result.kappa.tolist(),  # [N][B][M]: the weights of each step
        "log_q": result.log_q.tolist(),  # [N+1][B][M]: ℓ_i at σ̃_0 … σ̃_N, nats (0 at the start)
    }  # fmt: skip
    if reading := read_prompts(result.images, prompts if prompts[0] != prompts[1] else prompts[:1]):
        specs, scenes = reading
        traces["probe"] = {"scenes": [describe_scene(s) for s in scenes],
                           "outcomes": [outcome(s, specs) for s in scenes]}  # fmt: skip
    path = out / f"{args.mode}_seed{args.seed}_traces.json"
    atomic_write_bytes(path, json.dumps(traces, indent=1).encode())
    print(path)
    gap = (result.log_q[-1, :, 0] - result.log_q[-1, :, 1]).mean().item()
    print(f"{result.seconds:.3f} s, {result.info['unet_rows'] // (config.steps * args.batch)} UNet rows per step per "
          f"image, final ℓ_A − ℓ_B {gap:+.3g} nats (batch mean)", file=sys.stderr)  # fmt: skip
    if reading:
        kinds = ONE_PROMPT_OUTCOMES if len(specs) == 1 else TWO_PROMPT_OUTCOMES
        counts = ", ".join(f"{k} {traces['probe']['outcomes'].count(k)}" for k in kinds)
        print(f"Shapes probe, of {args.batch} image{'s' * (args.batch > 1)}: {counts}", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .models import is_lcm_model
    from .rlr import RLRConfig
    from .runs import read_json, split_run_arg
    from .sdpo import SDPOConfig, shapes_preset
    from .trainer import TrainConfig, train

    run_dir = split_run_arg(args.run)
    overrides = {k: v for k, v in {
        "model": args.model, "reward": args.reward, "num_epochs": args.epochs, "learning_rate": args.lr,
        "sample_batch_size": args.batch, "num_batches_per_epoch": args.batches, "num_steps": args.train_steps,
        "seed": args.seed, "adapter": args.adapter, "lora_rank": args.lora_rank, "precision": args.precision,
        "train_batch_size": args.train_batch, "grad_accum": args.grad_accum, "eval_sampler": args.eval_sampler,
        "timestep_spacing": args.train_spacing, "train_sampler": args.train_sampler,
    }.items() if v is not None}  # fmt: skip
    extra = {k: v for k, v in {
        "method": args.method, "reward_weights": args.reward_weights, "device": args.device,
        "eval_every": args.eval_every, "checkpoint_every": args.checkpoint_every,
        "num_eval_prompts": args.eval_prompts,
    }.items() if v is not None}  # fmt: skip
    if args.prompt_file is not None:
        extra["prompt_list"] = tuple(read_prompt_file(args.prompt_file))
        if not extra["prompt_list"]:
            raise UserError("no prompts: --prompt-file is empty")
    if args.eval_steps is not None:
        overrides["eval_steps"] = tuple(args.eval_steps)
    rlr = {k: v for k, v in {
        "h": args.rlr_h, "c_fo": args.c_fo, "c_ho": args.c_ho, "c_zo": args.c_zo, "zo_mode": args.zo_mode,
        "s_nu": args.s_nu, "zo_groups": args.zo_groups, "zo_budget": args.zo_budget, "ho_rescale": args.ho_rescale,
        "eta": args.rlr_eta,
        "truncation": args.truncation, "checkpointing": args.checkpointing,
    }.items() if v is not None}  # fmt: skip
    if rlr:
        extra["rlr"] = RLRConfig(**rlr)
    if args.config is not None:  # the whole config from a file (how the app's run manager starts a run)
        if args.resume or overrides or extra or args.preset:
            raise UserError("--config gives every setting: do not combine it with --resume or other settings")
        config = _config_file(args.config)
    elif args.resume:
        config = None
        if overrides or extra or args.preset:  # settings given with --resume must match the stored ones
            stored = TrainConfig.from_dict(read_json(run_dir / "config.json")["config"]) \
                if (run_dir / "config.json").is_file() else None  # fmt: skip
            if stored is not None:
                algo = SDPOConfig(**{**stored.algo.to_dict(), **overrides})
                if "rlr" in extra:
                    extra["rlr"] = RLRConfig(**{**stored.rlr.to_dict(), **rlr})
                config = TrainConfig(**{**{k: getattr(stored, k) for k in ("method", "reward_weights", "device",
                                     "eval_every", "num_eval_prompts", "checkpoint_every", "keep_checkpoints",
                                     "rlr", "prompt_list")}, **extra, "algo": algo})  # fmt: skip
    else:
        overrides.setdefault("model", "shapes")
        if args.method in (None, "sdpo", "ddpo") and is_lcm_model(overrides["model"]):  # trains as it samples
            overrides.setdefault("train_sampler", "lcm")
            overrides.setdefault("eval_sampler", "lcm")
        algo = SDPOConfig.preset(args.preset or shapes_preset(args.train_steps), **overrides)
        config = TrainConfig(algo=algo, **extra)
    status = train(run_dir, config, resume=args.resume)
    print(f"{run_dir}: {status['state']}" + (f" ({status['error']})" if status.get("error") else ""))
    return 0 if status["state"] in ("finished", "stopped") else 1


def _config_file(path: str):
    """A ``TrainConfig`` from a JSON file holding ``{"config": TrainConfig.to_dict()}`` (as config.json does)."""
    from .runs import read_json
    from .trainer import TrainConfig

    record = read_json(path)
    try:
        return TrainConfig.from_dict(record["config"])
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"--config {path!r} does not hold a training config ({type(e).__name__}: {e})") from e


def cmd_sadm(args: argparse.Namespace) -> int:
    """SADM-style structure-guided training (ALGORITHMS.md §5) of the UNet into a run folder; λ = 0: plain."""
    from .runs import read_json, split_run_arg
    from .sadm import SADMConfig, check_resumable, train_sadm

    run_dir = split_run_arg(args.run)
    settings = {k: v for k, v in {
        "model": args.model, "init": args.init, "domain": args.domain, "structure_weight": args.structure_weight,
        "warmup_fraction": args.warmup, "disc_steps": args.disc_steps, "disc_penalty": args.disc_penalty,
        "structure_space": args.space, "batch_size": args.batch, "learning_rate": args.lr, "epochs": args.epochs,
        "steps_per_epoch": args.steps_per_epoch, "n_images": args.images, "seed": args.seed, "device": args.device,
        "eval_every": args.eval_every, "eval_images": args.eval_images, "checkpoint_every": args.checkpoint_every,
        "eval_steps": tuple(args.eval_steps) if args.eval_steps else None,
    }.items() if v is not None}  # fmt: skip
    if args.config is not None:  # every setting from a file: {"config": {"algo": {...}}} (as config.json) or flat
        if args.resume or settings:
            raise UserError("--config gives every setting: do not combine it with --resume or other settings")
        record = read_json(args.config)
        algo = record.get("config") if isinstance(record, dict) and "config" in record else record
        algo = algo.get("algo") if isinstance(algo, dict) and "algo" in algo else algo
        if not isinstance(algo, dict):
            raise UserError(f"--config {args.config!r} does not hold a SADM config")
        config = SADMConfig.from_dict(algo)
    elif args.resume:  # settings given with --resume must equal the stored ones
        config = SADMConfig.from_dict({**check_resumable(run_dir).to_dict(), **settings}) if settings else None
    else:
        config = SADMConfig.from_dict(settings)
    status = train_sadm(run_dir, config, resume=args.resume)
    print(f"{run_dir}: {status['state']}" + (f" ({status['error']})" if status.get("error") else ""))
    return 0 if status["state"] in ("finished", "stopped") else 1


@contextlib.contextmanager
def _label_store(args: argparse.Namespace, create: bool = False):
    """The label database the app keeps in ``--data-dir`` (or ``--labels-db``), open for the block. One that is
    not there is refused, unless ``create`` (an import into a new data folder): then it is made, and removed again
    with the folders made for it if the block fails, so that a refused import leaves nothing behind."""
    from .labels import LabelStore

    data_dir = typed_path(args.data_dir, "--data-dir")
    db = typed_path(args.labels_db, "--labels-db") if args.labels_db else data_dir / "labels.db"
    new = create and not db.exists()
    if not new and not db.is_file():
        raise UserError(f"there is no label database at {str(db)!r}: label pairs in the app first, or import an export")
    made = [d for d in (db.parent, *db.parent.parents) if not d.exists()] if new else []
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the folder {db.parent}: {e.strerror or e}") from e
    try:
        store = LabelStore(db, require_names=False)
    except BaseException:
        if new:  # never an existing file: a foreign or corrupt one is refused and left as it is
            _remove_new(db, None, made)
        raise
    try:
        yield store
    except BaseException:
        store.close()
        if new:
            _remove_new(db, store.images_dir, made)
        raise
    store.close()


def _remove_new(db: Path, images: Path | None, folders: list[Path]) -> None:
    """Undo a label database made for a command that failed: its files, its empty images folder, the folders made."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)
    for folder in ([images] if images is not None else []) + folders:  # innermost first; a non-empty one stays
        with contextlib.suppress(OSError):
            folder.rmdir()


def label_summary(store) -> tuple[list[str], bool]:
    """The Label tab's statistics as lines of text: counts, labels per labeller, agreement, the ranking of models
    (Bradley–Terry, Elo scale) and the integrity check (every image's hash read again); and whether that passed."""
    c = store.counts()
    lines = [f"{store.db_path}: {c['pairs']} pairs, {c['labels']} labels (left {c['left']} · right {c['right']} · "
             f"tie {c['tie']}; {c['skip']} skipped, {c['undone']} undone) from {c['labellers']} labellers; "
             f"{c['unlabelled_pairs']} pairs without a label"]  # fmt: skip
    per = store.labels_per_labeller()
    if per:
        lines.append("labellers: " + " · ".join(f"{name} {d['total']}" for name, d in per.items()))
    agree = store.agreement()
    if agree.n:
        lines.append(f"agreement: {agree.overall:.1%} over {agree.n} comparisons of two labellers on one pair")
    for k, r in enumerate(store.win_rates(), 1):
        lines.append(f"rank {k}: {r.model}  Elo {r.elo:.0f}  (θ {r.strength:+.3f}; {r.wins} wins, {r.losses} losses, "
                     f"{r.ties} ties, win rate {r.win_rate:.1%})")  # fmt: skip
    report = store.integrity_check(verify_hashes=True)
    problems = [f"SQLite: {report.sqlite}"] if report.sqlite != "ok" else []
    problems += [f"{len(report.missing_images)} images missing"] * bool(report.missing_images)
    problems += [f"{len(report.corrupt_images)} images whose content is not their hash"] * bool(report.corrupt_images)
    lines.append("integrity: " + ("; ".join(problems) if problems else "ok (every image present and unchanged)"))
    return lines, report.ok


def cmd_labels(args: argparse.Namespace) -> int:
    """The Label tab's store from the command line: statistics, Pick-a-Pic export and import, the reward model."""
    if args.action == "import":  # the export is read before a new database is made for it
        from .labels import read_export

        export = read_export(typed_path(args.source, "export path"))
    with _label_store(args, create=args.action == "import") as store:
        if args.action == "stats":
            lines, ok = label_summary(store)
            print("\n".join(lines))
            return 0 if ok else 1
        if args.action == "export":
            r = store.export(typed_path(args.out, "--out"), args.format)
            print(f"exported {r.labels} labels ({r.rows} rows, {r.images} images) to {r.table}")
            return 0
        if args.action == "import":
            r = store.import_rows(*export)
            print(f"imported {r.pairs_added} new pairs and {r.labels_added} labels ({r.labels_skipped} already here or "
                  f"superseded), {r.images_added} new images, into {store.db_path}")  # fmt: skip
            return 0
        from .preference import train_from_store

        out = typed_path(args.out or os.path.join(args.data_dir, "rewards", "labels"), "--out")
        clip = typed_path(args.clip, "--clip") if args.clip else None
        _, m = train_from_store(store, out, clip=clip, model=args.reward_model)
        acc = "n/a (only ties held out)" if m["val_accuracy"] is None else f"{m['val_accuracy']:.1%}"
        print(f"held-out pairwise accuracy {acc} on {m['n_val_non_tie']} held-out labels (trained on {m['n_train']} "
              f"labels of {m['n_pairs']} pairs; split by pair); saved in {out}: fine-tune with "
              f"--reward preference:{out.resolve()}")  # fmt: skip
        return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (its usage block would bury them); the subcommands' parsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m finetuners", description=__doc__,
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
    p.add_argument("--adaptive", default=None, metavar="FOLDER",
                   help="an AdaDiff policy folder (or shapes, the shipped one) picks the steps")  # fmt: skip
    p.add_argument("--out", default="out")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("adapt-train", help="train an AdaDiff step-count policy into a folder")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="policy folder (created; must be new or empty)")
    p.add_argument("--prompts", type=int, default=300, help="Shapes training prompts (the world's mix)")
    p.add_argument("--prompt-file", default=None, help="training prompts, one per line (instead of Shapes ones)")
    p.add_argument(
        "--candidate-set",
        choices=("few-step", "shapes", "standard"),
        default=None,
        help="default: the model's (shapes on the Shapes model, few-step on SD-Turbo / LCM, else standard)",
    )
    p.add_argument("--candidates", type=int, nargs="+", default=None, help="step counts (overrides --candidate-set)")
    p.add_argument("--quality", default="shapes-accuracy",
                   help="IQS: a reward name (shapes-probability, the shipped policy's; preference:FOLDER for other "
                   "prompts)")  # fmt: skip
    p.add_argument("--seeds", type=int, default=2, help="seeds per prompt, shared across step counts")
    p.add_argument(
        "--sampler",
        choices=("ddim", "ddim-trailing", "lcm"),
        default=None,
        help="default: trailing DDIM for candidates under 5 steps, LCM on an LCM model, else the model's",
    )
    p.add_argument("--guidance", type=float, default=None, help="default: the model's (a checkpoint's: its run's)")
    p.add_argument("--top-k", type=int, default=None, help="default: 3, or 2 with fewer than 8 candidates")
    p.add_argument("--quality-weight", type=float, default=1.0, help="λ, weight of quality inside the top-k")
    p.add_argument("--penalty", type=float, default=1.0, help="γ, reward −γ outside the top-k")
    p.add_argument(
        "--flat-rows",
        choices=("fewest", "skip"),
        default="fewest",
        help="prompts equally good (or bad) at every step count: reward the fewest steps, or skip them",
    )
    p.add_argument("--loss", choices=("expected", "reinforce_baseline", "reinforce"), default="expected")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_adapt_train)

    p = sub.add_parser("superpose", help="SuperDiff OR / AND of two prompts or two models; PNGs and κ/ℓ traces")
    _add_model_args(p, default="shapes-partial")  # models.COMPOSE_MODEL (not imported: it loads torch)
    p.add_argument("--model-b", default=None, help="a second model: superpose two models on one prompt")
    p.add_argument("--prompt-a", default=None, help="prompt of A (two prompts on one model)")
    p.add_argument("--prompt", default=None, help="the prompt, with --model-b (same as --prompt-a)")
    p.add_argument("--prompt-b", default=None, help="prompt of B (with --model-b: B's own prompt, default the same)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--mode", choices=("and", "or", "avg"), default="and", help="avg: averaged predictions, κ = ½")
    p.add_argument("--temperature", type=float, default=1.0, help="OR: κ = softmax(T·ℓ + b), T > 0")
    p.add_argument("--bias", type=float, default=0.0, help="nats; OR: log-odds of A over B; AND: final ℓ_A − ℓ_B")
    p.add_argument("--steps", type=int, default=100, help="Euler–Maruyama steps, at least 20 (1000: the paper's)")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance, ≤ 1 is off (default: the model's for SuperDiff; shapes-partial: 1)",
    )
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--out", default="out")
    p.set_defaults(func=cmd_superpose)

    p = sub.add_parser("train", help="fine-tune (SDPO, DDPO, RLR, DRaFT-K, full backprop) into a run folder")
    p.add_argument("--run", required=True, help="run folder, runs/NAME (created; must be new unless --resume)")
    p.add_argument(
        "--method",
        choices=("sdpo", "ddpo", "rlr", "draft", "bptt", "reinforce"),
        default=None,
        help="default: sdpo; rlr, draft (DRaFT-K), bptt and reinforce need a differentiable reward",
    )
    p.add_argument("--reward", default=None, help="reward name (default: the preset's)")
    p.add_argument("--reward-weights", default=None, help="local weights path for rewards that need one")
    p.add_argument("--model", default=None, help="pipeline folder, hub id in the local cache, or 'shapes'")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=None)
    p.add_argument("--preset", default=None, help="SDPO preset (default: shapes; shapes-k8 with --train-steps above 2)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate, in (0, 1]")
    p.add_argument("--batch", type=int, default=None, help="prompts per sampling batch")
    p.add_argument("--batches", type=int, default=None, help="sampling batches per epoch")
    p.add_argument("--train-batch", type=int, default=None, help="pairs (SDPO) or samples (DDPO) per minibatch")
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument(
        "--train-steps",
        type=int,
        default=None,
        help="K_train, sampling steps of training trajectories (SDPO: at least 2)",
    )
    p.add_argument("--eval-steps", type=int, nargs="+", default=None)
    p.add_argument(
        "--eval-sampler",
        choices=("ddim", "ddim-trailing", "lcm"),
        default=None,
        help="deterministic evaluation sampler (trailing is needed for a meaningful 1-step eval)",
    )
    p.add_argument("--train-spacing", choices=("leading", "trailing", "pipeline"), default=None)
    p.add_argument(
        "--train-sampler",
        choices=("ddim", "lcm"),
        default=None,
        help="the training policy's steps (SDPO, DDPO): DDIM with η, or LCM steps; default: lcm (and --eval-sampler "
        "lcm) on an LCM model, else ddim",
    )
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--eval-prompts", type=int, default=None, help="prompts of each evaluation (default 8)")
    p.add_argument("--prompt-file", default=None, help="prompts to train on, one per line (default: Shapes captions); "
                   "each evaluation takes the first --eval-prompts of them")  # fmt: skip
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--adapter", choices=("lora", "full"), default=None)
    p.add_argument("--lora-rank", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    g = p.add_argument_group("RLR and the backprop baselines (rlr.py)")
    g.add_argument("--rlr-h", type=int, default=None, help="half-order sub-chain length h (0: FO + ZO only)")
    g.add_argument("--zo-mode", choices=("lr", "spsa", "off"), default=None, help="zeroth-order estimator")
    g.add_argument("--s-nu", type=float, default=None, help="std of the ZO parameter perturbations")
    g.add_argument("--zo-groups", type=int, default=None, help="ZO perturbations per step (0: one per sample)")
    g.add_argument("--zo-budget", type=int, default=None, help="ZO steps per estimate (-1: all; n: n random, rescaled)")
    g.add_argument("--c-fo", type=float, default=None, help="weight of the first-order term")
    g.add_argument("--c-ho", type=float, default=None, help="weight of the half-order term")
    g.add_argument("--c-zo", type=float, default=None, help="weight of the zeroth-order term")
    g.add_argument("--ho-rescale", action="store_true", default=None, help="tile the steps with h-blocks")
    g.add_argument("--rlr-eta", type=float, default=None, help="DDIM η of the stochastic steps")
    g.add_argument("--truncation", type=int, default=None, help="DRaFT-K: backprop through the last K' steps")
    g.add_argument("--checkpointing", action="store_true", default=None, help="gradient checkpointing (baselines)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    p.add_argument("--config", default=None, help='a JSON file {"config": {...}} with every setting (as config.json)')
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sadm", help="SADM-style structure-guided training of the UNet (λ = 0: plain denoising)")
    p.add_argument("--run", required=True, help="run folder, runs/NAME (created; must be new unless --resume)")
    p.add_argument("--model", default=None, help="pipeline folder, hub id in the local cache, or 'shapes' (default)")
    p.add_argument("--init", choices=("pretrained", "scratch"), default=None, help="fine-tune (default) or fresh")
    p.add_argument("--domain", default=None, help="real images: 'shapes' (in-domain, default) or 'large' (shifted)")
    p.add_argument("--lambda", dest="structure_weight", type=float, default=None, help="λ, structure weight (0.1)")
    p.add_argument("--warmup", type=float, default=None, help="fraction of steps over which λ rises from 0 (0.1)")
    p.add_argument("--disc-steps", type=int, default=None, help="n_D discriminator steps per denoiser step (1)")
    p.add_argument("--disc-penalty", type=float, default=None, help="ρ_φ, weight of ‖φ‖² (1e-4)")
    p.add_argument("--space", choices=("pixels", "latents"), default=None, help="encoder input (pixels)")
    p.add_argument("--batch", type=int, default=None, help="batch size, at least 2 (32)")
    p.add_argument("--lr", type=float, default=None, help="learning rate of θ and φ (1e-4)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (20)")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="denoiser steps per epoch (10)")
    p.add_argument("--images", type=int, default=None, help="real training images rendered (4096)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--eval-every", type=int, default=None, help="epochs between evaluations; 0: only at the end")
    p.add_argument("--eval-images", type=int, default=None, help="images for FD-probe and accuracy (64)")
    p.add_argument("--eval-steps", type=int, nargs="+", default=None, help="DDIM step counts evaluated (20)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="epochs between checkpoints (5)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    p.add_argument("--config", default=None, help="a JSON file with every setting (SADMConfig keys, or config.json)")
    p.set_defaults(func=cmd_sadm)

    p = sub.add_parser("labels", help="the app's labels: statistics, export / import (Pick-a-Pic), reward model")
    labels = p.add_subparsers(dest="action", required=True)
    where = _Parser(add_help=False)
    where.add_argument("--data-dir", default="data", help="the app's data folder (default: data)")
    where.add_argument("--labels-db", default=None, help="the label database file (default: <data-dir>/labels.db)")
    q = labels.add_parser("stats", parents=[where], help="counts, labellers, agreement, model ranking, integrity")
    q = labels.add_parser("export", parents=[where], help="a new folder: labels.jsonl or .parquet and images/")
    q.add_argument("--out", required=True, help="the export folder to create (it must not exist)")
    q.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl")
    q = labels.add_parser("import", parents=[where], help="an export folder or table; all or nothing, idempotent")
    q.add_argument("source", help="an export folder, or a .jsonl / .parquet table in the Pick-a-Pic schema")
    q = labels.add_parser("reward", parents=[where], help="train the Bradley–Terry reward model on the labels")
    q.add_argument("--out", default=None, help="where to save it (default: <data-dir>/rewards/labels)")
    q.add_argument("--clip", default=None, metavar="FOLDER", help="a local CLIP folder whose features it reads "
                   "(default: the Shapes probe's)")  # fmt: skip
    q.add_argument("--reward-model", choices=("cells", "mlp"), default=None,
                   help="on probe features: cells (default) or mlp; CLIP features use mlp")  # fmt: skip
    p.set_defaults(func=cmd_labels)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # a bad flag: one line on stderr, exit 2
    if not args.debug:  # as in the app: transformers' notices (e.g. about torchvision) would come before the error
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
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
