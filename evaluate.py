"""FID of teacher and DMD2 checkpoints with clean-fid (or an FD with another feature network).

    python evaluate.py checkpoint=./checkpoints/dmd2/dmd2_final.pt            # one-step generator
    python evaluate.py checkpoint=./checkpoints/teacher/teacher_final.pt sampler.steps=18
    python evaluate.py checkpoint_dir=./checkpoints/dmd2                      # every checkpoint, by step
    python evaluate.py checkpoint=hf://owner/dmd2-cifar10                     # an export (dmd2.io.export)

A checkpoint trained on data=gaussian_mixture gets the mixture's exact scores instead (no feature network): pixel FD
to the true moments, mode coverage, the fraction of samples on a mode and, for a teacher, its denoising error
against the exact denoiser per noise level.

Images made elsewhere, and reference files (the same feature and distance code as checkpoints):

    python evaluate.py images=generated/ reference.name=folder reference.folder=data/cifar10/train
    python evaluate.py images=generated/samples.npz protocol=edm reference.path=fid-refs/cifar10-32x32.npz
    python evaluate.py write_reference=refs/faces-64.npz reference.name=folder reference.folder=data/faces
    python evaluate.py write_reference=refs/train.npz checkpoint=...   # the checkpoint's training data

The default reference (reference.name=auto) is the checkpoint's own training data. A reference whose resolution,
feature network or resize differs from what is measured, or fewer samples than the feature dimension
(allow_few_samples), is refused before any sample is generated. Every value comes with its bootstrap standard
deviation (uncertainty_resamples) and is named with its sample count (fid@50k).

Writes <output_dir>/results.json (one row per checkpoint) and logs each row to W&B at the checkpoint's step.

Under torchrun (``torchrun --standalone --nproc_per_node N evaluate.py ...``) each process samples its share of
the samples and rank 0 computes the distance and writes: the same value as one process.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig

import dmd2.config.settings  # noqa: F401  (registers the config schemas that conf/ builds on)
from dmd2.config.cli import eval_group_overrides, quiet_hydra_on_other_ranks, run_script
from dmd2.config.errors import ConfigError
from dmd2.config.validate import check_fid, check_settings, fail, fail_file, to_container
from dmd2.io.files import atomic_write
from dmd2.runtime.devices import check_device, resolve_device

if TYPE_CHECKING:
    from dmd2.eval.measure import Measurement
    from dmd2.io.sampler import CheckpointSampler
    from dmd2.method.mixture import GaussianMixture
    from dmd2.runtime.distributed import Dist

# Only torch-free modules are imported above: --help and tab completion compose the config without torch. The
# functions below import what they need (torch, clean-fid, the generator) when they run.

log = logging.getLogger("evaluate")

def validate(cfg: DictConfig) -> None:
    """Check every key evaluate.py reads (types, ranges, files, combinations) before anything is loaded."""
    check_settings(cfg)
    check_device(cfg)
    sources = {k: cfg[k] for k in ("checkpoint", "checkpoint_dir", "images") if cfg[k] is not None}
    if len(sources) != 1 and not (cfg.write_reference is not None and len(sources) <= 1):
        raise ConfigError("config keys 'checkpoint' and 'checkpoint_dir' (or 'images'): set exactly one "
                          f"(got checkpoint={cfg.checkpoint!r}, checkpoint_dir={cfg.checkpoint_dir!r}, "
                          f"images={cfg.images!r})")
    if cfg.images is not None and not os.path.exists(cfg.images):
        fail_file("images", cfg.images, "an image folder, a .zip of images or an .npz with arr_0 [N,H,W,3]")
    if cfg.reference.name == "auto" and (cfg.images is not None or (cfg.write_reference and not cfg.checkpoint)):
        fail("reference.name", "auto", "a named reference with images= or write_reference= (auto is a checkpoint's "
             "training data): reference.name=folder reference.folder=..., npz reference.path=... or cifar10_train")
    if cfg.write_reference is not None and not cfg.write_reference.endswith(".npz"):
        fail("write_reference", cfg.write_reference, "a path ending in .npz")
    if cfg.write_reference is not None:
        check_reference_output(cfg.write_reference, cfg.overwrite_reference)
    if cfg.write_reference is not None and (cfg.images is not None or cfg.checkpoint_dir is not None):
        fail("write_reference", cfg.write_reference, "no images= or checkpoint_dir= with it (it writes the reference "
             "statistics reference.* names; checkpoint= only supplies the training data of reference.name=auto)")
    if cfg.checkpoint is not None and not (cfg.checkpoint.startswith("hf://") or os.path.exists(cfg.checkpoint)):
        fail_file("checkpoint", cfg.checkpoint, "an existing checkpoint (teacher_*.pt or dmd2_*.pt), an export "
                  "folder or .safetensors file, or hf://owner/repo")
    if cfg.checkpoint_dir is not None and not os.path.isdir(cfg.checkpoint_dir):
        fail_file("checkpoint_dir", cfg.checkpoint_dir, "an existing folder of checkpoints")
    check_fid(cfg)


def check_reference_output(path: str, overwrite: bool) -> None:
    """FileError unless ``path`` can become the reference statistics: not a folder, no file among its parent
    folders, not an existing file (unless ``overwrite``)."""
    if os.path.isdir(path):
        fail_file("write_reference", path, "a file to write, not a folder")
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        fail_file("write_reference", path, f"a path in a folder ({parent} is a file)")
    if os.path.lexists(path) and not overwrite:
        fail_file("write_reference", path, "a new file (it exists; overwrite_reference=true replaces it)")


def checkpoint_info(path: str) -> dict[str, Any]:
    """A checkpoint's or export's step, kind and W&B run (id and group), read without loading its weights."""
    from dmd2.io.loaded import source_info

    return source_info(path)


def wandb_settings(cfg: DictConfig, training: dict[str, Any]) -> dict[str, Any]:
    """The logger settings, with ``logger.group`` null meaning the training run's group (or, when it had none,
    its run id): a training run's evaluations sit next to it in W&B; ``logger.project`` null: the training
    data's project (dmd2-cifar10, dmd2-imagenet64, ...)."""
    from dmd2.train.context import logger_settings

    settings = logger_settings(cfg, data=training.get("data") or None)
    if settings.get("name") == "wandb" and settings.get("group") is None:
        settings["group"] = training["wandb_group"] or training["wandb_run_id"]
    return settings


def checkpoints_to_evaluate(cfg: DictConfig) -> list[tuple[dict[str, Any], str]]:
    """(checkpoint_info, path) of the checkpoint, or of every *.pt in checkpoint_dir in order of step."""
    if cfg.checkpoint is not None:
        return [(checkpoint_info(cfg.checkpoint), cfg.checkpoint)]
    paths = sorted(glob.glob(os.path.join(glob.escape(cfg.checkpoint_dir), "*.pt")))
    if not paths:
        fail_file("checkpoint_dir", cfg.checkpoint_dir, "a folder containing checkpoints (*.pt)")
    return sorted(((checkpoint_info(p), p) for p in paths), key=lambda ip: (ip[0]["step"], ip[1]))


def protocol(net: Any) -> str:
    """Which published numbers a result is comparable with (README "Which FID")."""
    if not net.is_inception:
        return "FD with a custom feature network (comparable only with itself)"
    if net.resize == "legacy_tensorflow":
        return "TF-Inception (EDM / DMD2 / StyleGAN papers; clean-fid mode legacy_tensorflow)"
    return "clean-fid clean (clean-fid's leaderboards)"


def _write_json(path: str, data: Any) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()), suffix=".json")


def checkpoint_mixture(checkpoints: list[tuple[dict[str, Any], str]]) -> GaussianMixture | None:
    """The known-answer mixture the checkpoints were trained on (data=gaussian_mixture; scored exactly, with no
    feature network), or None. Checkpoints of other data, or of another mixture, in the same call are refused."""
    from dmd2.data.mixture import mixture_from_config

    datas = [info.get("data") or {} for info, _ in checkpoints]
    if all(d.get("name") != "gaussian_mixture" for d in datas):
        return None
    keys = ("name", "num_classes", "resolution", "mixture_components", "mixture_std", "mixture_seed")
    kinds = {tuple(d.get(k) for k in keys) for d in datas}
    if len(kinds) > 1:
        raise ConfigError(f"config key 'checkpoint_dir' = {checkpoints[0][1]!r}...: its checkpoints were trained on "
                          f"different data ({sorted(map(str, kinds))}); evaluate them one data set at a time")
    return mixture_from_config(datas[-1])


def feature_row(numbers: dict[str, Any], net: Any, ref: Any) -> tuple[dict[str, Any], dict[str, float]]:
    """A result row's feature-network fields (the value named with its sample count, e.g. fid@50k, and its
    bootstrap standard deviation) and the scalars to log."""
    from dmd2.eval.measure import metric_name

    row = {"metric": net.metric, "name": metric_name(net.wandb_key, numbers["num_samples"]),
           "value": numbers["value"], "std": numbers["std"], "kid": numbers["kid"], "kid_std": numbers["kid_std"],
           "feature_network": net.source, "resize": net.resize, "protocol": protocol(net),
           "reference": ref.description, "reference_stats": os.path.abspath(ref.path), "reference_meta": ref.meta()}
    scalars = {net.wandb_key: row["value"]}
    if row["std"] is not None:
        scalars[f"{net.wandb_key}_std"] = row["std"]
    if row["kid"] is not None:
        scalars["eval/kid"] = row["kid"]
    if row["kid_std"] is not None:
        scalars["eval/kid_std"] = row["kid_std"]
    add_diagnostics(row, scalars, numbers)
    return row, scalars


def add_diagnostics(row: dict[str, Any], scalars: dict[str, float], numbers: dict[str, Any]) -> None:
    """A result row's diagnostics (precision / recall / density / coverage with their k; the classifier's class
    histogram, entropy and label agreement per class) and their scalars (dmd2.eval.measure.diagnostic_scalars)."""
    from dmd2.eval.measure import diagnostic_scalars

    if numbers.get("prdc") is not None:
        row.update(prdc=numbers["prdc"], prdc_k=numbers.get("prdc_k"))
    if numbers.get("classes") is not None:
        row["classes"] = numbers["classes"]
    scalars.update(diagnostic_scalars(numbers))


def value_text(row: dict[str, Any]) -> str:
    """'FID = 3.2100 ± 0.0400 (fid@50k), KID ...' for the log."""
    noise = f" ± {row['std']:.4f}" if row.get("std") is not None else ""
    kid = ""
    if row.get("kid") is not None:
        kid = f", KID {row['kid']:.5f}" + (f" ± {row['kid_std']:.5f}" if row.get("kid_std") is not None else "")
    prdc = "".join(f", {k} {v:.3f}" for k, v in (row.get("prdc") or {}).items())
    classes = row.get("classes") or {}
    prdc += "".join(f", {k} {classes[k]:.3f}" for k in ("class_entropy", "label_agreement") if k in classes)
    return f"{row['metric']} = {row['value']:.4f}{noise}" + (f" ({row['name']})" if "name" in row else "") + kid + prdc


def measure_features(sampler: CheckpointSampler, measurement: Measurement, device: Any, d: Dist | None = None
                     ) -> tuple[dict[str, Any] | None, dict[str, float]]:
    """FID / FD (and KID) of a sampler: the result row's own fields and the scalars to log (every rank calls it
    under torchrun; (None, {}) on ranks > 0)."""
    numbers = measurement.measure(sampler, device, d)
    if numbers is None:
        return None, {}
    row, scalars = feature_row(numbers, measurement.net, measurement.ref)
    row.update(images_per_sec=numbers["images_per_sec"], generation_seconds=numbers["generation_seconds"],
               total_seconds=numbers["total_seconds"])
    return row, scalars


def measure_images(cfg: DictConfig, device: Any) -> list[dict[str, Any]]:
    """FID / FD (and KID) of the images in ``cfg.images`` (folder, .zip or .npz) against the configured
    reference: one result row (in <output_dir>/results.json), with the checks and numbers of a checkpoint's."""
    from dmd2.eval.images import load_image_set
    from dmd2.train.context import hydra_output_dir
    from dmd2.train.evaluator import feature_network_from_config, measurement_from_config

    net = feature_network_from_config(cfg.feature_network, device)  # a missing file fails before images are read
    images, labels = load_image_set(cfg.images)
    measurement = measurement_from_config(cfg, device, None, resolution=images.shape[1], data=None, num=len(images),
                                          kid=cfg.kid, num_workers=cfg.num_workers, net=net)
    log.info(f"[evaluate] {len(images)} images ({images.shape[1]}x{images.shape[2]}) from {cfg.images}: "
             f"{measurement.metric} against {measurement.against}")
    numbers = measurement.measure_images(images, labels)
    row, _ = feature_row(numbers, measurement.net, measurement.ref)
    row.update(images=os.path.abspath(cfg.images), num_samples=numbers["num_samples"],
               total_seconds=numbers["total_seconds"], device=str(device))
    output_dir = cfg.output_dir or hydra_output_dir() or os.path.join("outputs", "evaluate", "run")
    os.makedirs(output_dir, exist_ok=True)
    _write_json(os.path.join(output_dir, "results.json"), [row])
    log.info(f"[evaluate] {value_text(row)} | {cfg.images}")
    log.info(f"[evaluate] results: {os.path.join(output_dir, 'results.json')}")
    return [row]


def write_reference_file(cfg: DictConfig, device: Any) -> list[dict[str, Any]]:
    """Write the configured reference statistics (a folder's, a checkpoint's training data, ...) to
    ``cfg.write_reference``: mu, sigma (what EDM's fid.py reads) and their metadata."""
    from dmd2.eval.references import write_reference
    from dmd2.train.evaluator import feature_network_from_config, reference_from_config

    net = feature_network_from_config(cfg.feature_network, device)
    data = checkpoint_info(cfg.checkpoint)["data"] if cfg.checkpoint else None
    ref = reference_from_config(cfg.reference, net, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                data=data)
    os.makedirs(os.path.dirname(os.path.abspath(cfg.write_reference)), exist_ok=True)
    write_reference(cfg.write_reference, ref, network_file=net.source)
    log.info(f"[evaluate] wrote reference statistics of {ref.description} ({ref.num_images} images of "
             f"{ref.image_size}x{ref.image_size}, {net.metric} features, resize {net.resize}) to "
             f"{cfg.write_reference}")
    return [{"reference": cfg.write_reference, **ref.meta()}]


def measure_mixture(sampler: CheckpointSampler, measurement: Measurement, cfg: DictConfig, device: Any,
                    d: Dist | None = None) -> tuple[dict[str, Any] | None, dict[str, float]]:
    """Exact scores of a model of data=gaussian_mixture (and, for a teacher, its denoising error against the exact
    denoiser per noise level): the result row's own fields and the scalars to log (every rank calls it under
    torchrun; (None, {}) on ranks > 0, rank 0 alone measures the denoising error)."""
    from dmd2.config.names import MIXTURE_METRIC
    from dmd2.method.mixture import DENOISING_SAMPLES, DENOISING_SIGMAS, denoising_errors

    numbers = measurement.measure(sampler, device, d)
    if numbers is None:
        return None, {}
    mix, floor = measurement.mixture, measurement.floor
    scores = numbers["scores"]
    row = {"metric": MIXTURE_METRIC, "value": scores["fd"], "kid": None, "images_per_sec": numbers["images_per_sec"],
           "mixture_scores": scores, "mixture_floor": floor,
           "protocol": "exact scores of data=gaussian_mixture, pixel space (README \"Known-answer runs\")",
           "reference": "the exact mixture", "generation_seconds": numbers["generation_seconds"],
           "total_seconds": numbers["total_seconds"]}
    scalars = {f"eval/mixture_{k}": v for k, v in scores.items()}
    add_diagnostics(row, scalars, numbers)
    if sampler.kind == "teacher":
        rows = denoising_errors(sampler.net, mix, DENOISING_SIGMAS, min(cfg.num_samples, DENOISING_SAMPLES),
                                cfg.seed, cfg.batch_size, device)
        row["denoising_error"] = rows
        scalars.update({f"eval/denoise_mse/sigma_{r['sigma']:g}": r["mse"] for r in rows})
        table = "  ".join(f"{r['sigma']:g}: {r['mse']:.2e}" for r in rows)
        log.info(f"[evaluate] denoising error vs the exact denoiser, mean squared per pixel, by sigma: {table}")
    log.info(f"[evaluate] exact scores: coverage {scores['coverage']:.3f}, on a mode {scores['near']:.3f}, mode "
             f"weights TV {scores['weight_tv']:.3f}; true samples at this count: FD {floor['fd']:.4f}, coverage "
             f"{floor['coverage']:.3f}, on a mode {floor['near']:.3f}")
    return row, scalars


def evaluate(cfg: DictConfig) -> list[dict[str, Any]]:
    """Evaluate the configured checkpoint(s); return the result rows (also in <output_dir>/results.json).

    Under torchrun every rank generates and featurizes its share of the samples (whole batches, so each sample
    is the one a single process makes) and rank 0 gathers the features, computes the distance and writes the
    results and logs; the other ranks return []. ``images=`` and ``write_reference=`` run on rank 0 alone."""
    from dmd2.runtime.distributed import barrier, init_distributed, shutdown

    validate(cfg)
    d, device = init_distributed(resolve_device(cfg.device))
    try:
        if cfg.write_reference is not None or cfg.images is not None:
            if not d.is_main:
                return []
            return write_reference_file(cfg, device) if cfg.write_reference is not None else \
                measure_images(cfg, device)
        results = evaluate_checkpoints(cfg, device, d)
        barrier(d)  # the ranks leave together: a rank leaving gloo while rank 0 still scored was aborted
        return results
    finally:
        shutdown()


def measurement_setup(cfg: DictConfig, checkpoints: list[tuple[dict[str, Any], str]], mixture: Any, device: Any,
                      d: Dist) -> Measurement:
    """What every checkpoint is measured with (the evaluation inside training sets up the same): the feature
    network and (rank 0) the reference statistics of the configured reference (reference.name=auto: the
    checkpoints' training data), or the known-answer mixture's exact scores. Rank 0 computes the reference (or
    reads it from its cache) while the other ranks wait."""
    from dmd2.eval.measure import MeasureSettings, mixture_measurement
    from dmd2.train.evaluator import diagnostics_from_config, measurement_from_config

    if mixture is not None:  # known-answer data: exact scores, no feature network or reference statistics
        return mixture_measurement(mixture, MeasureSettings(cfg.num_samples, cfg.seed, cfg.batch_size,
                                                            diag=diagnostics_from_config(cfg)), d)
    data = checkpoints[-1][0].get("data") or None
    resolution = data.get("resolution") if data else None
    return measurement_from_config(cfg, device, d, resolution=None if resolution is None else int(resolution),
                                   data=data, kid=cfg.kid, num_workers=cfg.num_workers)


def measure_checkpoint(cfg: DictConfig, path: str, measurement: Measurement, device: Any, d: Dist
                       ) -> tuple[CheckpointSampler, dict[str, Any] | None, dict[str, float]]:
    """Sample and measure one checkpoint (every rank); the sampler, and on rank 0 its result row (None on the
    other ranks) and the scalars to log."""
    from dmd2.io.loaded import load_generator

    sampler = load_generator(path, device, heun_steps=cfg.sampler.steps, teacher_weights=cfg.teacher_weights,
                             generator_weights=cfg.generator_weights).sampler
    if d.is_main:
        log.info(f"[evaluate] {sampler.describe()} from {path}: {measurement.metric} of {cfg.num_samples} samples "
                 f"against {measurement.against}" + (f" ({d.world_size} processes)" if d.enabled else ""))
    if measurement.mixture is None:
        measured, scalars = measure_features(sampler, measurement, device, d)
    else:
        measured, scalars = measure_mixture(sampler, measurement, cfg, device, d)
    if measured is None:
        return sampler, None, scalars
    row = {
        **measured, "name": measured.get("name") or measurement.name,
        "num_samples": cfg.num_samples, "nfe": sampler.nfe, "checkpoint": os.path.abspath(path),
        "step": sampler.step, "kind": sampler.kind,
        "sampler_steps": sampler.heun_steps if sampler.kind == "teacher" else sampler.nfe,
        "weights": sampler.weights, "seed": cfg.seed, "device": str(device), "world_size": d.world_size,
    }
    return sampler, row, scalars


def best_summary(key: str, results: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The best row (lowest value) and the run summary made of it."""
    best = min(results, key=lambda r: r["value"])
    summary = {key: best["value"], "eval/metric": best["metric"], "eval/num_samples": best["num_samples"],
               "eval/name": best["name"], **({f"{key}_std": best["std"]} if best.get("std") is not None else {}),
               "eval/nfe": best["nfe"], "eval/images_per_sec": best["images_per_sec"],
               "eval/checkpoint": best["checkpoint"], "eval/step": best["step"], "eval/kind": best["kind"]}
    return best, summary


def evaluate_checkpoints(cfg: DictConfig, device: Any, d: Dist) -> list[dict[str, Any]]:
    """Measure every configured checkpoint (all ranks); rank 0 writes results.json and the logs."""
    from dmd2.io.loaded import is_export
    from dmd2.runtime.distributed import shared_output_dir
    from dmd2.train.context import default_run_name, hydra_output_dir
    from dmd2.train.logger import RunLogger

    checkpoints = checkpoints_to_evaluate(cfg)
    mixture = checkpoint_mixture(checkpoints)
    measurement = measurement_setup(cfg, checkpoints, mixture, device, d)
    own_dir = hydra_output_dir()
    output_dir = shared_output_dir(cfg.output_dir or own_dir or os.path.join("outputs", "evaluate", "run"), own_dir, d)
    if d.is_main:
        os.makedirs(output_dir, exist_ok=True)
    results_path = os.path.join(output_dir, "results.json")
    training = checkpoints[-1][0]
    settings = wandb_settings(cfg, training)
    config = {**to_container(cfg), "output_dir": output_dir, "logger": settings,
              "training_run_id": training["wandb_run_id"], "world_size": d.world_size}
    logger = RunLogger(output_dir, settings, config, "evaluate", cfg.run_name or default_run_name(),
                       enabled=d.is_main)
    logger.define_metric(measurement.key, summary="min")
    if cfg.kid:
        logger.define_metric("eval/kid", summary="min")
    results: list[dict[str, Any]] = []
    exit_code = 1
    try:
        for info, path in checkpoints:
            # the artifact a distillation logs of its export is generator-<run id>
            kind = "generator" if is_export(path) and info["kind"] == "dmd2" else info["kind"]
            logger.use_checkpoint(path, kind, info["wandb_run_id"],
                                  "checkpoint" if len(checkpoints) == 1 else f"checkpoint_{info['step']:06d}")
            sampler, row, scalars = measure_checkpoint(cfg, path, measurement, device, d)
            if row is None:  # ranks > 0
                continue
            if "denoising_error" in row:  # a known-answer teacher: its error by noise level against the bound
                from dmd2.io.pictures import plot_denoising_error

                row["denoising_plot"] = plot_denoising_error(
                    row["denoising_error"], os.path.join(output_dir, f"denoising_error_{sampler.step:06d}.png"),
                    f"{sampler.describe()}, {os.path.basename(path)}")
                log.info(f"[evaluate] denoising error by noise level, against the bound: {row['denoising_plot']}")
            results.append(row)
            _write_json(results_path, results)
            log.info(f"[evaluate] {value_text(row)} | {sampler.kind} step {sampler.step}, "
                     f"{sampler.nfe} NFE, {cfg.num_samples} samples, {row['images_per_sec']:.1f} images/s")
            logger.log({**scalars, "eval/nfe": row["nfe"], "eval/num_samples": row["num_samples"],
                        "eval/images_per_sec": row["images_per_sec"]}, step=sampler.step)
        if d.is_main:
            best, summary = best_summary(measurement.key, results)
            logger.summary(summary)  # eval/kid keeps its own minimum (define_metric)
        exit_code = 0
    finally:
        logger.finish(exit_code)
    if len(results) > 1:
        log.info(f"[evaluate] best: {value_text(best)} at step {best['step']} ({best['checkpoint']})")
    if d.is_main:
        log.info(f"[evaluate] results: {results_path}")
    return results


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    sys.argv = eval_group_overrides(quiet_hydra_on_other_ranks(sys.argv))
    sys.exit(run_script(main))
