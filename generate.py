"""Write samples of every class from a teacher or DMD2 checkpoint (an unconditional model: a flat folder).

    python generate.py checkpoint=./checkpoints/dmd2/dmd2_final.pt output_dir=./generated num_samples=16
    python generate.py checkpoint=./checkpoints/teacher/teacher_final.pt sampler.steps=18
"""
from __future__ import annotations

import os
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torchvision.utils import make_grid, save_image

import dmd2.settings  # noqa: F401  (registers the config schemas that conf/ builds on)
from dmd2.config import ConfigError, check_device, check_settings, resolve_device
from dmd2.sampling import generate_uint8, load_sampler

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def class_names(cfg: DictConfig, num_classes: int) -> list[str]:
    if cfg.class_names is not None:
        names = list(cfg.class_names)
        if len(names) != num_classes:
            raise ConfigError(f"config key 'class_names' has {len(names)} names; the checkpoint has {num_classes} classes")
        return names
    return CIFAR10_CLASSES if num_classes == 10 else [f"class_{c:03d}" for c in range(num_classes)]


def generate(cfg: DictConfig) -> dict[str, Any]:
    check_settings(cfg)
    check_device(cfg)
    if not os.path.isfile(cfg.checkpoint):
        raise ConfigError(f"config key 'checkpoint' = {cfg.checkpoint!r}: file not found")
    device = resolve_device(cfg.device)
    sampler = load_sampler(cfg.checkpoint, device, cfg.sampler.steps, cfg.teacher_weights, cfg.generator_weights)
    print(f"[generate] loaded {sampler.describe()} from {cfg.checkpoint}")
    os.makedirs(cfg.output_dir, exist_ok=True)
    if sampler.num_classes == 0:  # unconditional: a flat folder and one grid
        total = cfg.num_samples
        images = torch.cat([imgs for imgs, _ in generate_uint8(sampler, total, cfg.seed, cfg.batch_size, device)])
        for k, img in enumerate(images):
            save_image(img.float() / 255, os.path.join(cfg.output_dir, f"{k:06d}.png"))
        save_image(make_grid(images.float() / 255, nrow=min(8, total)), os.path.join(cfg.output_dir, "grid_all.png"))
        print(f"[generate] wrote {total} samples of an unconditional model ({sampler.nfe} NFE each) to "
              f"{cfg.output_dir}")
        return {"kind": sampler.kind, "num_images": total, "nfe": sampler.nfe, "output_dir": cfg.output_dir}

    names = class_names(cfg, sampler.num_classes)
    per_class: list[list[torch.Tensor]] = [[] for _ in names]
    total = cfg.num_samples * sampler.num_classes  # round-robin labels: num_samples of every class
    for images, labels in generate_uint8(sampler, total, cfg.seed, cfg.batch_size, device):
        for img, label in zip(images, labels.tolist()):
            per_class[label].append(img)

    for name, imgs in zip(names, per_class):
        folder = os.path.join(cfg.output_dir, name)
        os.makedirs(folder, exist_ok=True)
        for k, img in enumerate(imgs):
            save_image(img.float() / 255, os.path.join(folder, f"{k:04d}.png"))
        save_image(make_grid(torch.stack(imgs).float() / 255, nrow=min(8, len(imgs))),
                   os.path.join(cfg.output_dir, f"grid_{name}.png"))
    overview = torch.stack([img for imgs in per_class for img in imgs]).float() / 255
    save_image(make_grid(overview, nrow=cfg.num_samples), os.path.join(cfg.output_dir, "grid_all.png"))
    print(f"[generate] wrote {total} samples ({cfg.num_samples} per class, {sampler.nfe} NFE each) to {cfg.output_dir}")
    return {"kind": sampler.kind, "num_images": total, "nfe": sampler.nfe, "output_dir": cfg.output_dir}


@hydra.main(config_path="conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    generate(cfg)


if __name__ == "__main__":
    main()
