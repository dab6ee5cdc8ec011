"""A trained model as a sampler you can call from Python: ``dmd2.load_generator(...)``.

    import dmd2
    gen = dmd2.load_generator("exports/dmd2-cifar10")           # an export folder (see dmd2.io.export)
    images = gen.sample(labels=["cat", "dog"], seeds=[0, 1])    # uint8 [2, 3, 32, 32]

A source is an export folder (``config.json`` + ``model.safetensors``, the layout of a Hugging Face Hub
repository), a ``.safetensors`` file written by the export (its header holds the same metadata), a training
checkpoint (``teacher_*.pt`` / ``dmd2_*.pt``), or ``hf://<owner>/<repo>`` (downloaded with ``huggingface_hub``,
the ``hub`` extra). ``generate.py`` samples through this same object, so an export and the checkpoint it came
from give bitwise the same images for the same seeds.

Seeds: the image of seed s is made from noise seeded by s alone (whatever the batch size or the other seeds);
with labels left out, seed s gets class s mod (number of classes), as in evaluate.py (its sample i, seed 0).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from dmd2.config.errors import ConfigError, FileError, FormatError
from dmd2.io.checkpoint import load_checkpoint, load_failure
from dmd2.io.export_format import CONFIG_FILE, WEIGHTS_FILE, checkpoint_export_metadata, read_export_metadata
from dmd2.io.sampler import CheckpointSampler, make_sampler, sample_batches, sampler_from_checkpoint
from dmd2.io.weights import load_denoiser

Labels = int | str | Sequence[int | str] | Tensor | None


@dataclass
class Generator:
    """A loaded model: its sampler (network + how it samples), class names ([] when unconditional) and the
    metadata it was loaded with (an export's config.json; for a checkpoint, the same fields)."""

    sampler: CheckpointSampler
    class_names: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.sampler.num_classes

    @property
    def resolution(self) -> int:
        return self.sampler.resolution

    @property
    def nfe(self) -> int:
        """Network evaluations per image."""
        return self.sampler.nfe

    @property
    def device(self) -> torch.device:
        return next(self.sampler.net.parameters()).device

    def to(self, device: torch.device | str) -> "Generator":
        self.sampler.net.to(device)
        return self

    def weights_sha256(self) -> str:
        """SHA-256 of the network's state dict (names, dtypes, shapes and bytes): the identity of the weights,
        whatever file they were loaded from."""
        digest = hashlib.sha256()
        for name, t in sorted(self.sampler.net.state_dict().items()):
            digest.update(f"{name}\t{t.dtype}\t{tuple(t.shape)}\n".encode())
            digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def describe(self) -> str:
        classes = f"{self.num_classes} classes" if self.num_classes else "unconditional"
        return f"{self.sampler.describe()}, {classes}, {self.resolution}x{self.resolution}"

    def label_ids(self, labels: Labels, seeds: Sequence[int]) -> Tensor:
        """Class ids [N] for ``seeds`` [N]: ``labels`` may be one class (id or name) for all, one per seed, or
        None (seed s gets class s mod num_classes; 0 for an unconditional model)."""
        k = max(1, self.num_classes)
        if labels is None:
            return torch.tensor([s % k for s in seeds], dtype=torch.long)
        if isinstance(labels, Tensor):
            labels = labels.reshape(-1).tolist()
        if isinstance(labels, (int, str)):
            labels = [labels] * len(seeds)
        labels = list(labels)
        if len(labels) != len(seeds):
            raise ConfigError(f"{len(labels)} labels for {len(seeds)} seeds: give one label, or one per seed")
        return torch.tensor([self.class_id(c) for c in labels], dtype=torch.long)

    def class_id(self, c: int | str) -> int:
        """A class given by id or name -> its id (ConfigError naming the valid choices)."""
        if self.num_classes == 0:
            if c in (0, "0"):
                return 0
            raise ConfigError(f"the model is unconditional: it takes no class (got {c!r})")
        if isinstance(c, str) and not c.lstrip("-").isdigit():
            if c not in self.class_names:
                raise ConfigError(f"unknown class {c!r}; the model's classes are {self.class_names[:20]}"
                                  + (" ..." if self.num_classes > 20 else ""))
            return self.class_names.index(c)
        if not 0 <= int(c) < self.num_classes:
            raise ConfigError(f"class {c} is out of range: the model has classes 0 .. {self.num_classes - 1}")
        return int(c)

    def batches(self, labels: Labels = None, seeds: Sequence[int] | int | None = None, *, batch_size: int = 256,
                dtype: torch.dtype | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Like ``sample``, one batch at a time: (uint8 images [B,3,R,R] on the CPU, labels [B])."""
        if seeds is None:
            seeds = range(len(labels) if isinstance(labels, (list, tuple, Tensor)) else 1)
        seeds = [seeds] if isinstance(seeds, int) else [int(s) for s in seeds]
        if not seeds:
            raise ConfigError("no seeds: give at least one")
        yield from sample_batches(self.sampler, seeds, self.label_ids(labels, seeds), batch_size, self.device,
                                  dtype=dtype)

    def sample(self, labels: Labels = None, seeds: Sequence[int] | int | None = None, *, batch_size: int = 256,
               device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
        """uint8 images [N,3,R,R] (CPU) for ``seeds`` (default 0 .. N-1 for N labels) of ``labels`` (ids or
        names; see ``label_ids``). ``device`` moves the model first; ``dtype`` (torch.bfloat16 / float16) runs
        the network under autocast. ``images.permute(0, 2, 3, 1).numpy()`` gives [N,R,R,3] arrays."""
        if device is not None:
            self.to(device)
        return torch.cat([images for images, _ in self.batches(labels, seeds, batch_size=batch_size, dtype=dtype)])


def read_export(folder_or_file: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(metadata, state dict) of an export: a folder with config.json + model.safetensors, or the
    .safetensors file alone. The metadata (dmd2.io.export_format.read_export_metadata, the one reader) is checked
    against the weights' shapes before any tensor is loaded or network built."""
    from safetensors.torch import load_file

    metadata, path, _ = read_export_metadata(folder_or_file)
    try:
        weights = load_file(path)
    except Exception as err:  # noqa: BLE001
        raise FormatError(f"{path}: not a readable safetensors file ({err})") from err
    return metadata, weights


def sampler_from_export(metadata: dict[str, Any], weights: dict[str, Tensor], device: torch.device | str,
                        heun_steps: int | None) -> CheckpointSampler:
    """The sampler of an export (``read_export``): its network with ``weights`` (dmd2.io.weights.load_denoiser),
    a teacher with ``heun_steps`` Heun steps (None: the export's), a generator over its stored chain."""
    net = load_denoiser(metadata["arch"], metadata["num_classes"], metadata["resolution"], metadata["sigma_data"],
                        weights)
    net = net.to(device).eval().requires_grad_(False)
    how, kind = metadata["sampler"], metadata["kind"]
    return make_sampler(kind, net, int(metadata["provenance"]["step"]), int(metadata["num_classes"]),
                        int(metadata["resolution"]), metadata["weights"],
                        (heun_steps or int(how["heun_steps"])) if kind == "teacher" else 0,
                        how["denoising_sigmas"] if kind == "dmd2" else ())


def hub_snapshot(repo_id: str) -> str:
    """Download (or find in the local cache) a Hugging Face Hub repository; return its folder."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConfigError(f"hf://{repo_id}: loading from the Hugging Face Hub needs huggingface_hub "
                          "(pip install -e '.[hub]')") from None
    return snapshot_download(repo_id=repo_id, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, "README.md"])


def is_export(source: str) -> bool:
    """Whether ``source`` names an export (folder, .safetensors file or hf://) rather than a checkpoint .pt."""
    return str(source).startswith("hf://") or os.path.isdir(source) or str(source).endswith(".safetensors")


def source_info(source: str) -> dict[str, Any]:
    """Step, kind, W&B run (id, group) and training ``data`` config of a checkpoint or an export, read without
    loading its weights (an export's metadata through read_export_metadata, a checkpoint memory-mapped through
    load_checkpoint)."""
    source = hub_snapshot(source[len("hf://"):]) if source.startswith("hf://") else source
    if is_export(source):
        meta = read_export_metadata(source)[0]
        step, kind, run_id, training = (meta["provenance"]["step"], meta["kind"], meta["provenance"]["wandb_run_id"],
                                        meta["training_config"])
    else:
        try:
            state = load_checkpoint(source, mmap=True)
        except FormatError as err:
            why = load_failure(err.__cause__) if err.__cause__ is not None else str(err)
            raise FormatError(f"{source} is not a readable checkpoint of this project: {why}") from err
        step, kind, run_id, training = state["step"], state["kind"], state["wandb_run_id"], state["config"]
    logger = training.get("logger") or {}
    return {"step": int(step), "kind": kind, "wandb_run_id": run_id, "wandb_group": logger.get("group"),
            "data": training.get("data") or {}}


def load_generator(source: str, device: torch.device | str = "cpu", *, heun_steps: int | None = None,
                   teacher_weights: str = "ema", generator_weights: str = "ema") -> Generator:
    """Load a model for sampling from an export folder or file, a training checkpoint or ``hf://owner/repo``.

    ``heun_steps``: a teacher's Heun steps (default: the export's, or 18 for a checkpoint).
    ``teacher_weights`` / ``generator_weights``: which weights of a training checkpoint (an export holds one
    set: the ones chosen when it was written)."""
    source = str(source)
    if source.startswith("hf://"):
        source = hub_snapshot(source[len("hf://"):])
    if is_export(source):
        metadata, weights = read_export(source)
        return Generator(sampler_from_export(metadata, weights, device, heun_steps), metadata["class_names"], metadata)
    if not os.path.exists(source):
        raise FileError(f"{source}: not found (expected an export folder, a .safetensors file, a checkpoint "
                        ".pt or hf://owner/repo)")
    try:
        state = load_checkpoint(source)
        sampler = sampler_from_checkpoint(state, device, heun_steps or 18, teacher_weights, generator_weights)
    except (FileError, FormatError) as err:  # the message names the source
        raise type(err)(f"{source}: {err}" if source not in str(err) else str(err)) from err
    metadata = checkpoint_export_metadata(state, sampler, source, with_checksum=False)
    return Generator(sampler, metadata["class_names"], metadata)
