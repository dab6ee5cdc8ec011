"""Images from a checkpoint or an export, one per seed (as EDM's generate.py), as PNG folders or one .npz.

    python generate.py checkpoint=./checkpoints/dmd2/dmd2_final.pt seeds=0-63
    python generate.py checkpoint=./exports/dmd2-cifar10 classes=[cat,dog] seeds=0-99
    python generate.py checkpoint=./checkpoints/dmd2/dmd2_final.pt seeds=0-49999 format=npz   # for metric tools
    python generate.py checkpoint=./checkpoints/teacher/teacher_final.pt sampler.steps=18
    torchrun --standalone --nproc_per_node 8 generate.py checkpoint=... seeds=0-49999   # one process per GPU

Seed s draws its own noise, so it gives the same image in any run (up to the last bit of floating-point
rounding when the batch size differs), and seed s of all classes is evaluate.py's sample s.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image

import dmd2.config.settings  # noqa: F401  (registers the config schemas that conf/ builds on)
from dmd2.config.cli import quiet_hydra_on_other_ranks, run_script
from dmd2.config.errors import ConfigError, FileError, FormatError
from dmd2.config.seeds import parse_seeds
from dmd2.config.validate import check_settings
from dmd2.io.files import atomic_write
from dmd2.io.pictures import labelled_grid
from dmd2.runtime.progress import Progress
from dmd2.runtime.devices import check_device, resolve_device

if TYPE_CHECKING:  # torch and the generator are imported in generate(): --help and tab completion stay fast
    import torch

    from dmd2.io.loaded import Generator

log = logging.getLogger("generate")
GRID_COLUMNS = 16  # images per grid row


def chosen_classes(cfg: DictConfig, gen: Generator) -> list[int]:
    """The class ids to sample ([0] for an unconditional model)."""
    if gen.num_classes == 0:
        if cfg.classes not in (None, 0, [0]):
            raise ConfigError(f"config key 'classes' = {cfg.classes}: the model is unconditional (leave classes null)")
        return [0]
    if cfg.classes is None:
        return list(range(gen.num_classes))
    wanted = OmegaConf.to_container(cfg.classes) if OmegaConf.is_list(cfg.classes) else [cfg.classes]
    try:
        return [gen.class_id(c) for c in wanted]  # type: ignore[union-attr]
    except ConfigError as err:
        raise ConfigError(f"config key 'classes' = {wanted}: {err}") from err


MAX_FOLDER_BYTES = 200  # a class folder's name, in UTF-8 (file systems allow 255)
GRID_FILE, MANIFEST_FILE = "grid.png", "generate.json"  # written next to the class folders


def folder_name(name: str) -> str:
    """A class name as one safe path component: separators and control characters become '_', a name of dots
    only (``.``, ``..``) or nothing becomes '_', and it is cut to MAX_FOLDER_BYTES."""
    safe = "".join("_" if c in "/\\" or ord(c) < 32 or ord(c) == 127 else c for c in str(name)).strip()
    safe = safe.encode()[:MAX_FOLDER_BYTES].decode(errors="ignore").strip()
    return "_" if not safe.strip(".") else safe


def class_folders(names: list[str]) -> list[str]:
    """One distinct folder per class (index = class id): ``folder_name`` of each name; names that would share a
    folder (equal after cleaning, or differing only in case) or a file's name (grid.png, generate.json) get their
    class id appended, ``<name>-<id>``; should that still collide, every folder becomes ``<id>-<name>``."""
    bases = [folder_name(n) for n in names]
    counts: dict[str, int] = {GRID_FILE: 1, MANIFEST_FILE: 1}
    for b in bases:
        counts[b.casefold()] = counts.get(b.casefold(), 0) + 1
    folders = [b if counts[b.casefold()] == 1 else f"{b}-{i}" for i, b in enumerate(bases)]
    if len({f.casefold() for f in folders} | {GRID_FILE, MANIFEST_FILE}) < len(folders) + 2:
        folders = [f"{i}-{b}" for i, b in enumerate(bases)]
    return folders


def output_manifest(gen: Generator, folders: list[str], checkpoint: str) -> dict[str, Any]:
    """What generate.py records in <output_dir>/generate.json: the identity of the images it writes there (the
    weights' hash, sampler, resolution, class folders) and, for information only, where the model came from."""
    return {"format": "dmd2-generate", "version": 1,
            "identity": {"weights_sha256": gen.weights_sha256(), "sampler": gen.sampler.describe(),
                         "resolution": gen.resolution, "num_classes": gen.num_classes,
                         "class_folders": folders if gen.num_classes else []},
            "checkpoint": checkpoint}


def check_output_dir(folder: str, manifest: dict[str, Any], overwrite: bool) -> bool:
    """Whether ``folder`` may take this run's images: it is missing or empty, or its generate.json names the same
    model and settings (a run continuing), or ``overwrite``. FileError otherwise, naming what is there. Returns
    whether the folder already holds this model's images."""
    if not os.path.isdir(folder) or not os.listdir(folder) or overwrite:
        return False
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.isfile(path):
        entries = sorted(os.listdir(folder))
        shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
        raise FileError(f"config key 'output_dir' = {folder!r} already holds files generate.py did not write there "
                        f"(no {MANIFEST_FILE}: {shown}); choose another folder or pass overwrite=true")
    try:
        with open(path) as f:
            theirs = json.load(f).get("identity")
    except (OSError, ValueError, AttributeError) as err:
        raise FileError(f"config key 'output_dir' = {folder!r}: {MANIFEST_FILE} is unreadable ({err}); choose "
                        "another folder or pass overwrite=true") from err
    ours = manifest["identity"]
    if theirs != ours:
        differ = [k for k in ours if not isinstance(theirs, dict) or theirs.get(k) != ours[k]]
        raise FileError(f"config key 'output_dir' = {folder!r} holds images of another model or settings "
                        f"({MANIFEST_FILE} differs in {', '.join(differ) or 'its layout'}); choose another folder "
                        "or pass overwrite=true")
    return True


def write_manifest(folder: str, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=2) + "\n"
    atomic_write(os.path.join(folder, MANIFEST_FILE), lambda f: f.write(text.encode()))


def sample_share(cfg: DictConfig, gen: Generator, seeds: list[int], labels: list[int], folders: list[str],
                 progress: bool) -> tuple[dict[int, list[torch.Tensor]], list[np.ndarray]]:
    """Sample ``seeds`` (this process's share) and write each one's PNG (format=png, into its class's folder of
    ``folders``); return the first
    GRID_COLUMNS images of each class for the grid and, for format=npz, every image as [R,R,3]."""
    conditional = gen.num_classes > 0
    grid_rows: dict[int, list[torch.Tensor]] = {}
    arrays: list[np.ndarray] = []
    done = 0
    with Progress(len(seeds), "[generate]", "images", enabled=progress) as bar:
        for images, y in (gen.batches(labels, seeds, batch_size=cfg.batch_size) if seeds else ()):
            for img, label, seed in zip(images, y.tolist(), seeds[done:done + len(images)]):
                row = grid_rows.setdefault(label, [])
                if len(row) < GRID_COLUMNS:
                    row.append(img)
                if cfg.format == "npz":
                    arrays.append(img.permute(1, 2, 0).numpy())
                    continue
                folder = os.path.join(cfg.output_dir, folders[label]) if conditional else cfg.output_dir
                os.makedirs(folder, exist_ok=True)
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{seed:06d}.png"))
            done += len(images)
            bar.update(len(images))
    return grid_rows, arrays


def merge_shares(shares: list[tuple[dict[int, list[torch.Tensor]], list[np.ndarray]]]
                 ) -> tuple[dict[int, list[torch.Tensor]], list[np.ndarray]]:
    """The processes' (grid rows, images) in rank order, which is seed order: the first GRID_COLUMNS images of
    each class, every image."""
    grid_rows: dict[int, list[torch.Tensor]] = {}
    arrays: list[np.ndarray] = []
    for rows, images in shares:
        for label, imgs in rows.items():
            row = grid_rows.setdefault(label, [])
            row.extend(imgs[:GRID_COLUMNS - len(row)])
        arrays.extend(images)
    return grid_rows, arrays


def write_grid(path: str, gen: Generator, classes: list[int], grid_rows: dict[int, list[torch.Tensor]],
               names: list[str]) -> None:
    """grid.png: one row per class shown (at most GRID_MAX_CLASSES, evenly spaced), or rows of 8 images."""
    from dmd2.io.sampler import GRID_MAX_CLASSES

    shown = [c for c in classes if grid_rows.get(c)]
    if len(shown) > GRID_MAX_CLASSES:  # evenly spaced rows, as the training grids
        shown = [shown[round(i * (len(shown) - 1) / (GRID_MAX_CLASSES - 1))] for i in range(GRID_MAX_CLASSES)]
    if gen.num_classes > 0:
        grid = labelled_grid([grid_rows[c] for c in shown], [names[c] for c in shown])
    else:  # unconditional: rows of 8 images, no names
        flat = grid_rows.get(0, [])
        grid = labelled_grid([flat[i:i + 8] for i in range(0, len(flat), 8)], [""] * ((len(flat) + 7) // 8))
    grid.save(path)


def generate(cfg: DictConfig) -> dict[str, Any]:
    """Write the configured images. Under torchrun each process samples a contiguous run of whole batches of the
    seeds (each image is bitwise the one a single process makes) and writes their PNGs; rank 0 gathers the grid
    images (and, for format=npz, every image), writes grid.png / samples.npz and logs. Ranks > 0 return the
    count of their own share."""
    from dmd2.io.loaded import load_generator
    from dmd2.runtime.distributed import (barrier, batch_shard, gather_to_main, init_distributed, shared_output_dir,
                                          shutdown)
    from dmd2.train.context import hydra_output_dir

    check_settings(cfg)
    check_device(cfg)
    if os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir):
        raise ConfigError(f"config key 'output_dir' = {cfg.output_dir!r} is a file; expected a folder (it is created "
                          "when missing)")
    if not cfg.checkpoint.startswith("hf://") and not os.path.exists(cfg.checkpoint):
        raise FileError(f"config key 'checkpoint' = {cfg.checkpoint!r}: not found (a checkpoint .pt, an export "
                        "folder or .safetensors file, or hf://owner/repo)")
    d, device = init_distributed(resolve_device(cfg.device))
    try:
        shared_output_dir(cfg.output_dir, hydra_output_dir(), d)  # removes the empty Hydra folders of ranks > 0
        try:
            gen = load_generator(cfg.checkpoint, device, heun_steps=cfg.sampler.steps,
                                 teacher_weights=cfg.teacher_weights, generator_weights=cfg.generator_weights)
        except (ConfigError, FileError, FormatError) as err:  # the same error, naming the key
            raise type(err)(f"config key 'checkpoint' = {cfg.checkpoint!r}: {err}") from err
        names = list(cfg.class_names) if cfg.class_names is not None else gen.class_names
        if gen.num_classes and len(names) != gen.num_classes:
            raise ConfigError(f"config key 'class_names' has {len(names)} names; the model has {gen.num_classes} "
                              "classes")
        gen.class_names = names
        classes = chosen_classes(cfg, gen)
        seeds = parse_seeds(cfg.seeds) if cfg.seeds is not None else list(range(8 * len(classes)))
        labels = [classes[s % len(classes)] for s in seeds]
        if d.is_main:
            log.info(f"[generate] {gen.describe()} from {cfg.checkpoint}: {len(seeds)} images to {cfg.output_dir} "
                     f"({cfg.format})" + (f", {d.world_size} processes" if d.enabled else ""))
        folders = class_folders(names)
        manifest = output_manifest(gen, folders, cfg.checkpoint)
        adding = check_output_dir(cfg.output_dir, manifest, cfg.overwrite)  # every rank, before any rank writes
        barrier(d)
        if d.is_main:
            if adding:
                log.info(f"[generate] {cfg.output_dir} holds images of this model and settings ({MANIFEST_FILE}): "
                         "adding")
            os.makedirs(cfg.output_dir, exist_ok=True)
            write_manifest(cfg.output_dir, manifest)
        barrier(d)
        share = batch_shard(len(seeds), cfg.batch_size, d)
        mine = sample_share(cfg, gen, seeds[share.start:share.stop], labels[share.start:share.stop], folders,
                            progress=d.is_main)
        shares = gather_to_main(mine, d)
        if shares is None:  # ranks > 0: their PNGs are written
            result = {"kind": gen.sampler.kind, "num_images": len(share), "nfe": gen.nfe, "output_dir": cfg.output_dir}
        else:
            result = finish(cfg, gen, seeds, labels, classes, names, merge_shares(shares))
        barrier(d)  # the ranks leave together (see evaluate.py)
        return result
    finally:
        shutdown()


def finish(cfg: DictConfig, gen: Generator, seeds: list[int], labels: list[int], classes: list[int],
           names: list[str], merged: tuple[dict[int, list[torch.Tensor]], list[np.ndarray]]) -> dict[str, Any]:
    """Rank 0: grid.png, samples.npz (format=npz) and the closing log line; the result."""
    grid_rows, arrays = merged
    conditional = gen.num_classes > 0
    write_grid(os.path.join(cfg.output_dir, GRID_FILE), gen, classes, grid_rows, names)
    result: dict[str, Any] = {"kind": gen.sampler.kind, "num_images": len(seeds), "nfe": gen.nfe,
                              "output_dir": cfg.output_dir}
    if cfg.format == "npz":
        path = os.path.join(cfg.output_dir, "samples.npz")
        np.savez(path, arr_0=np.stack(arrays), arr_1=np.asarray(labels, dtype=np.int64),
                 seeds=np.asarray(seeds, dtype=np.int64), class_names=np.asarray(names if conditional else []))
        result["npz"] = path
    log.info(f"[generate] wrote {len(seeds)} images ({gen.nfe} NFE each"
             + (f", classes {', '.join(names[c] for c in classes[:10])}{' ...' if len(classes) > 10 else ''}"
                if conditional else ", unconditional") + f") to {result.get('npz', cfg.output_dir)}")
    return result


@hydra.main(config_path="conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    import torch

    torch.set_grad_enabled(False)
    generate(cfg)


if __name__ == "__main__":
    sys.argv = quiet_hydra_on_other_ranks(sys.argv)
    sys.exit(run_script(main))
