"""Export the sampling weights of a checkpoint as a small folder laid out like a Hugging Face Hub repository.

    python -m dmd2.export checkpoints/dmd2/dmd2_final.pt exports/dmd2-cifar10
    python -m dmd2.export checkpoints/dmd2/dmd2_final.pt exports/dmd2-cifar10 --push-to-hub you/dmd2-cifar10

The folder holds:
- ``model.safetensors``: the weights ``generate.py`` samples (a DMD2 checkpoint's generator EMA, else its raw
  generator; a teacher's EMA), and nothing else (no fake score network, no optimizer state). Its header repeats
  the metadata, so the file alone is loadable too.
- ``config.json``: what is needed to sample (architecture, resolution, sigma_data, the generator's noise levels
  or the teacher's Heun steps, network evaluations per image, class names) and provenance (checkpoint and its
  SHA-256, training step, teacher, hash of the training config, W&B run id, when it was exported).
- ``README.md``: a model card with the commands to use it, the license (``LICENSE``), the FID / FD the training
  run last measured (with its sample count and reference) and the sample grid.
- ``samples.png``: that grid, drawn from the exported weights (seeds 0.., one row per class).

``dmd2.load_generator(folder)`` (or ``hf://owner/repo``) loads it back; see dmd2.io.loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from typing import Any

from torch import Tensor

from dmd2.config.errors import ConfigError, FileError, run_tool
from dmd2.io.checkpoint import load_checkpoint
from dmd2.io.export_format import CONFIG_FILE, WEIGHTS_FILE, checkpoint_export_metadata
from dmd2.io.files import atomic_write, follow_umask
from dmd2.io.sampler import CheckpointSampler, grid_labels, sample_batches, sampler_from_checkpoint

LICENSE = "mit"              # the project's license (LICENSE, pyproject.toml), stated in every model card
GRID_FILE = "samples.png"    # the model card's sample grid
GRID_PER_CLASS = 6           # images per class (row) in it


def card_metric(meta: dict[str, Any], metrics: dict[str, float] | None) -> str:
    """The model card's quality line: the FID / FD the training run last logged, with its sample count and
    reference (from the run's config: eval.num_samples, eval.reference), or a note that none was measured."""
    metrics = metrics or {}
    keys = sorted(k for k in metrics if (k == "eval/fid" or k.startswith(("eval/fid_", "eval/fd_")))
                  and not k.endswith(("_std", "_best")))
    if not keys:
        return "not measured during training (`python evaluate.py checkpoint=<this folder>` measures it)"
    cfg = (meta.get("training_config") or {}).get("eval") or {}
    ref = cfg.get("reference") or {}
    where = ref.get("folder") or ref.get("path")
    reference = f"{ref.get('name', 'auto')}" + (f" ({where})" if where else "") if ref else "unknown"
    if ref.get("name") == "auto":
        reference = "the training data (reference.name=auto)"
    key = keys[0]
    std = metrics.get(f"{key}_std")
    return (f"{key.split('/', 1)[1]} = {metrics[key]:.4g}" + (f" ± {std:.2g}" if std is not None else "")
            + f" from {cfg.get('num_samples', '?')} samples against {reference}, at step {meta['provenance']['step']}")


def sample_grid(sampler: CheckpointSampler, class_names: list[str] | None, batch_size: int = 64) -> Any:
    """The model card's picture: GRID_PER_CLASS samples (seeds 0..) of each class (at most GRID_MAX_CLASSES
    rows), the class names on the left."""
    import torch

    from dmd2.io.pictures import class_rows, labelled_grid

    labels = grid_labels(sampler.num_classes, GRID_PER_CLASS, torch.device("cpu"))
    with torch.no_grad():
        images = torch.cat([x for x, _ in sample_batches(sampler, range(len(labels)), labels, batch_size)])
    rows, names = class_rows(images, labels.tolist(), class_names, GRID_PER_CLASS)
    return labelled_grid(rows, names, title=f"seeds 0-{len(labels) - 1}, {sampler.nfe} NFE")


def model_card(meta: dict[str, Any], repo_id: str | None, grid: bool = False,
               metrics: dict[str, float] | None = None) -> str:
    """README.md of an export (a Hugging Face Hub model card with its YAML header): ``grid``: samples.png is there;
    ``metrics``: the training run's last logged values (its FID / FD)."""
    what = ("a one-step" if meta["sampler"]["nfe"] == 1 else f"a {meta['sampler']['nfe']}-step") + " DMD2 generator" \
        if meta["kind"] == "dmd2" else f"an EDM teacher (Heun sampler, {meta['sampler']['nfe']} network evaluations)"
    classes = (f"{meta['num_classes']} classes: {', '.join(meta['class_names'][:20])}"
               + (", ..." if meta["num_classes"] > 20 else "")) if meta["num_classes"] else "unconditional"
    source = f"hf://{repo_id}" if repo_id else "<this folder>"
    p = meta["provenance"]
    return f"""---
library_name: dmd2
license: {LICENSE}
tags: [diffusion, distillation, dmd2, image-generation]
---
# {repo_id or 'DMD2 export'}

{what[0].upper() + what[1:]}, {meta['resolution']}x{meta['resolution']} images, {classes}.

```python
import dmd2
gen = dmd2.load_generator("{source}")
images = gen.sample(labels={'[0, 1]' if meta['num_classes'] else 'None'}, seeds=[0, 1])  # uint8 [N, 3, H, W]
```

or `python generate.py checkpoint={source} seeds=0-63`.

| | |
|---|---|
| architecture | {meta['arch']['name']} |
| sampler | {json.dumps(meta['sampler'])} |
| weights | {meta['weights']} |
| training step | {p['step']} |
| checkpoint | {p['checkpoint']} (sha256 {str(p['checkpoint_sha256'])[:16]}) |
| teacher | {p['teacher_checkpoint'] or p['imported_from'] or '-'} |
| training config hash | {p['config_sha256']} |
| W&B run | {p['wandb_run_id'] or '-'} |
| quality | {card_metric(meta, metrics)} |
| license | {LICENSE.upper()} (the dmd2 code's license; the training data and the teacher may carry their own terms) |
{chr(10) + f"![samples]({GRID_FILE})" + chr(10) if grid else ""}
The full training config is in `config.json` (`training_config`).
"""


EXPORT_FILES = (WEIGHTS_FILE, CONFIG_FILE, "README.md", GRID_FILE)


def check_export_folder(folder: str, overwrite: bool) -> None:
    """Refuse to replace a file of ``folder`` that the export would write, unless ``overwrite``."""
    if os.path.isfile(folder):
        raise FileError(f"{folder}: a file is in the way of the export folder")
    present = [name for name in EXPORT_FILES if os.path.lexists(os.path.join(folder, name))]
    if present and not overwrite:
        raise FileError(f"{folder}: {', '.join(present)} already there; the export would replace "
                        f"{'it' if len(present) == 1 else 'them'} (choose an empty or new folder, or pass "
                        "--overwrite)")


def export_generator(checkpoint: str, folder: str, *, teacher_weights: str = "ema", generator_weights: str = "ema",
                     heun_steps: int = 18, repo_id: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write ``folder`` (model.safetensors, config.json, README.md) from a training checkpoint; return its
    metadata. The files are written into a temporary folder first and moved in at the end: an interrupted
    export never leaves a half-written one under ``folder``. A file of those names already in ``folder`` is
    replaced only with ``overwrite`` (FileError naming it otherwise)."""
    check_export_folder(folder, overwrite)
    state = load_checkpoint(checkpoint)
    sampler = sampler_from_checkpoint(state, "cpu", heun_steps, teacher_weights, generator_weights)
    meta = checkpoint_export_metadata(state, sampler, checkpoint)
    weights = {k: v.detach().contiguous() for k, v in sampler.net.state_dict().items()}
    write_export(folder, meta, weights, repo_id, overwrite, grid=sample_grid(sampler, meta["class_names"]),
                 metrics=state.get("metrics"))
    return meta


def write_export(folder: str, meta: dict[str, Any], weights: dict[str, Tensor], repo_id: str | None = None,
                 overwrite: bool = False, grid: Any = None, metrics: dict[str, float] | None = None) -> None:
    """Write the export files (model.safetensors with ``meta``, config.json, README.md) into ``folder`` (``meta``
    from dmd2.io.export_format.export_metadata, the one writer of export metadata): staged in
    a temporary folder next to it and moved in at the end, so an interruption never leaves a half-written export.
    A file of those names already in ``folder`` is replaced only with ``overwrite``. ``grid``: the sample grid (a
    PIL image) written as samples.png and shown in the card; ``metrics``: the training run's last values (the
    card's FID / FD)."""
    from safetensors.torch import save_file

    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-export-", dir=parent)
    try:
        save_file(weights, os.path.join(staging, WEIGHTS_FILE), metadata={"dmd2": json.dumps(meta)})
        follow_umask(os.path.join(staging, WEIGHTS_FILE))  # safetensors creates it 0600
        for name, text in ((CONFIG_FILE, json.dumps(meta, indent=2) + "\n"),
                           ("README.md", model_card(meta, repo_id, grid is not None, metrics))):
            atomic_write(os.path.join(staging, name), lambda f, t=text: f.write(t.encode()))
        if grid is not None:
            grid.save(os.path.join(staging, GRID_FILE))
        os.makedirs(folder, exist_ok=True)
        check_export_folder(folder, overwrite)  # again: the folder may have changed while the weights were written
        for name in EXPORT_FILES:
            if os.path.exists(os.path.join(staging, name)):
                os.replace(os.path.join(staging, name), os.path.join(folder, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def push_to_hub(folder: str, repo_id: str, private: bool = False) -> str:
    """Upload an export folder to the Hugging Face Hub (needs huggingface_hub and a login); return its URL."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ConfigError("--push-to-hub needs huggingface_hub: pip install -e '.[hub]'") from None
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=folder, repo_id=repo_id, allow_patterns=list(EXPORT_FILES))
    return f"https://huggingface.co/{repo_id}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dmd2.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a dmd2_*.pt or teacher_*.pt training checkpoint")
    parser.add_argument("folder", help="the export folder to write (model.safetensors, config.json, README.md)")
    parser.add_argument("--generator-weights", default="ema", metavar="{ema,raw,ema_<decay>}",
                        help="DMD2 checkpoints: the generator EMA (when trained with one), the raw weights, or an "
                        "EMA of generator_ema_decays by name (ema_0.99995)")
    parser.add_argument("--teacher-weights", choices=("ema", "model"), default="ema", help="teacher checkpoints")
    parser.add_argument("--heun-steps", type=int, default=18, help="teacher checkpoints: Heun steps stored as the "
                        "default sampler (18 = 35 network evaluations)")
    parser.add_argument("--push-to-hub", metavar="OWNER/NAME", help="then upload the folder to this Hub repository")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repository")
    parser.add_argument("--overwrite", action="store_true", help="replace model.safetensors, config.json or "
                        "README.md already in the folder (refused otherwise)")
    args = parser.parse_args(argv)
    if args.heun_steps < 1:
        parser.error(f"--heun-steps must be >= 1, got {args.heun_steps}")
    return run_tool(parser.prog, lambda: export_command(args))


def export_command(args: argparse.Namespace) -> None:
    """``python -m dmd2.export`` with its parsed arguments: export, report, upload."""
    meta = export_generator(args.checkpoint, args.folder, teacher_weights=args.teacher_weights,
                            generator_weights=args.generator_weights, heun_steps=args.heun_steps,
                            repo_id=args.push_to_hub, overwrite=args.overwrite)
    size = os.path.getsize(os.path.join(args.folder, WEIGHTS_FILE))
    print(f"[export] {args.checkpoint} (step {meta['provenance']['step']}, {meta['weights']} weights) -> "
          f"{args.folder}: {size / 2**20:.1f} MiB, {meta['sampler']['nfe']} NFE, "
          f"{meta['num_classes'] or 'no'} classes")
    if args.push_to_hub:
        print(f"[export] uploaded: {push_to_hub(args.folder, args.push_to_hub, args.private)}")
