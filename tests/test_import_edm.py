"""Importing NVIDIA EDM network pickles (python -m dmd2.import_edm), unconditional models end to end, and FID as
EDM reports it (TF-Inception, a reference .npz). CPU, tiny networks, no network access.

The pickles are built here in EDM's on-disk structure: a stand-in ``torch_utils.persistence`` module records, as
EDM's does, every network object as (class name, module source, __dict__ state) behind its
``_reconstruct_persistent_obj`` global, and the snapshot is ``pickle.dump(dict(ema=..., loss_fn=...,
augment_pipe=..., dataset_kwargs=...))`` as EDM's training loop writes it. The stand-in ``SongUNet`` holds our
edm_unet's layers, whose parameter names are SongUNet's (checked against NVlabs/edm's own classes outside the
test suite).
"""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import evaluate as evaluate_script
from dmd2.config.errors import EvaluationError, FileError
from dmd2.config.settings import arch_settings
from dmd2.eval.features import batch_features, build_feature_network
from dmd2.eval.references import npz_stats
from dmd2.io.checkpoint import load_checkpoint, network_from_checkpoint
from dmd2.io.files import file_sha256
from dmd2.io.import_edm import EDMImportError, import_edm
from dmd2.io.import_edm import main as import_main
from dmd2.io.weights import build_denoiser
from dmd2.networks.precond import EDMPrecond
from tests.conftest import HANG_GUARD_S, ROOT, SMOKE, compose_cfg, run_cli, train_eval_args

# SongUNet's constructor defaults in NVlabs/edm (training/networks.py); a pickle records only passed arguments.
EDM_SONGUNET_DEFAULTS = dict(augment_dim=0, model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4,
                             num_blocks=4, attn_resolutions=[16], dropout=0.10, label_dropout=0,
                             embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                             decoder_type="standard", resample_filter=[1, 1])
# EDM's train.py --arch presets (the -vp files are ddpmpp, the -ve files ncsnpp), at tiny width
ARCH_PRESETS = {
    "ddpmpp": dict(embedding_type="positional", encoder_type="standard", decoder_type="standard",
                   channel_mult_noise=1, resample_filter=[1, 1]),
    "ncsnpp": dict(embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1]),
}
TINY = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[16], dropout=0.13)


# ------------------------------------------------------------------------------------------------ EDM stand-in


def persistence_module(module_src: str) -> types.ModuleType:
    """A stand-in for EDM's torch_utils.persistence, registered in sys.modules so that pickle can name its
    reconstruct function. ``module_src`` is what every persistent object records as its class's module source."""
    package = sys.modules.setdefault("torch_utils", types.ModuleType("torch_utils"))
    module = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # what EDM runs on load; the importer must never call it
        raise AssertionError("EDM's reconstruct function was called")

    _reconstruct_persistent_obj.__module__ = module.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    module.module_src = module_src
    module.classes = {}
    sys.modules[module.__name__] = package.persistence = module  # type: ignore[attr-defined]
    return module


def make_persistent(obj: nn.Module, persistence: types.ModuleType, class_name: str | None = None,
                    init_kwargs: dict | None = None) -> nn.Module:
    """Give ``obj`` EDM's persistent pickling: (reconstruct, (dict(type, version, module_src, class_name,
    state=__dict__),)). Its class keeps its behaviour (a subclass of the original)."""
    name = class_name or type(obj).__name__
    key = (type(obj), name)
    if key not in persistence.classes:
        def __reduce__(self):
            meta = dict(type="class", version=6, module_src=persistence.module_src, class_name=self._edm_name,
                        state=dict(self.__dict__))
            return persistence._reconstruct_persistent_obj, (meta,)
        persistence.classes[key] = type(name, (type(obj),), {"__reduce__": __reduce__, "_edm_name": name})
    obj.__class__ = persistence.classes[key]
    obj._init_args, obj._init_kwargs = (), dict(init_kwargs or {})
    return obj


class EDMPrecondStandIn(nn.Module):
    def __init__(self, model: nn.Module, **attrs) -> None:
        super().__init__()
        for k, v in attrs.items():
            setattr(self, k, v)
        self.model = model


def edm_snapshot(path: Path, arch: str, label_dim: int, precond: str = "EDMPrecond", model_type: str = "SongUNet",
                 module_src: str = "raise RuntimeError('EDM source must never run')", **extra) -> EDMPrecond:
    """Write an EDM network snapshot to ``path``; return the same network as our EDMPrecond (for reference)."""
    persistence = persistence_module(module_src)
    model_kwargs = {**ARCH_PRESETS[arch], **TINY, **({"augment_dim": 9} if label_dim else {}), **extra}
    recorded = {**EDM_SONGUNET_DEFAULTS, **model_kwargs}
    ours = arch_settings("edm_unet", **{k: recorded[k] for k in EDM_SONGUNET_DEFAULTS})
    torch.manual_seed(0)
    reference = build_denoiser(ours, label_dim, 32, 0.5)
    with torch.no_grad():  # random weights everywhere (EDM zero-initialises some output layers)
        for p in reference.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    net = reference.net
    for module in list(net.modules())[1:]:
        if not isinstance(module, (nn.ModuleDict, nn.ModuleList)):
            make_persistent(module, persistence)
    make_persistent(net, persistence, model_type, dict(img_resolution=32, in_channels=3, out_channels=3,
                                                       label_dim=label_dim, **model_kwargs))
    ema = EDMPrecondStandIn(net, img_resolution=32, img_channels=3, label_dim=label_dim, use_fp16=False,
                            sigma_min=0, sigma_max=float("inf"), sigma_data=0.5)
    make_persistent(ema, persistence, precond, dict(img_resolution=32, img_channels=3, label_dim=label_dim,
                                                    use_fp16=False, model_type=model_type, **model_kwargs))
    loss_fn = make_persistent(nn.Module(), persistence, "EDMLoss", dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5))
    data = dict(ema=ema, loss_fn=loss_fn, augment_pipe=None,
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="cifar10-32x32.zip"))
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return reference.eval()


def outputs(net: EDMPrecond, label_dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    sigma = torch.tensor([0.002, 0.1, 1.0, 10.0, 80.0, 0.5])
    x = torch.randn(6, 3, 32, 32, generator=g) * sigma.view(-1, 1, 1, 1)
    with torch.no_grad():
        return net(x, sigma, torch.arange(6) % max(1, label_dim))


# ------------------------------------------------------------------------------------------------ import


@pytest.mark.parametrize("arch", ["ddpmpp", "ncsnpp"])
@pytest.mark.parametrize("label_dim", [10, 0])
def test_imported_weights_reproduce_the_network_and_the_arch_comes_from_the_recorded_kwargs(arch, label_dim,
                                                                                            tmp_path):
    marker = tmp_path / "source-ran"
    pkl = tmp_path / "network-snapshot-000000.pkl"
    reference = edm_snapshot(pkl, arch, label_dim, module_src=f"open({str(marker)!r}, 'w').write('ran')")
    state = import_edm(str(pkl))
    assert not marker.exists(), "the module source stored in the pickle was executed"
    a = state["arch"]
    assert (a["embedding_type"], a["encoder_type"], a["channel_mult_noise"], a["resample_filter"]) == (
        ARCH_PRESETS[arch]["embedding_type"], ARCH_PRESETS[arch]["encoder_type"],
        ARCH_PRESETS[arch]["channel_mult_noise"], ARCH_PRESETS[arch]["resample_filter"])
    assert (a["model_channels"], a["channel_mult"], a["num_blocks"], a["dropout"]) == (16, [1, 2], 1, 0.13)
    assert a["channel_mult_emb"] == 4 and a["augment_dim"] == (9 if label_dim else 0)  # unrecorded: EDM's default
    assert (state["kind"], state["num_classes"], state["resolution"], state["sigma_data"]) == ("teacher", label_dim,
                                                                                              32, 0.5)
    assert state["provenance"]["sha256"] == file_sha256(str(pkl))
    assert state["provenance"]["source"] == pkl.name
    imported = network_from_checkpoint(state, "ema").eval()
    torch.testing.assert_close(outputs(imported, label_dim), outputs(reference, label_dim), rtol=0, atol=0)


def test_arguments_not_recorded_take_songunets_defaults(tmp_path):
    """A pickle that passed fewer arguments: the rest are SongUNet's defaults, not this project's edm_unet's."""
    pkl = tmp_path / "net.pkl"
    reference = edm_snapshot(pkl, "ddpmpp", 10, channel_mult=[1, 2], dropout=0.10)
    state = import_edm(str(pkl))
    assert state["arch"]["dropout"] == 0.10 and state["arch"]["label_dropout"] == 0
    torch.testing.assert_close(outputs(network_from_checkpoint(state, "ema").eval(), 10), outputs(reference, 10))


def test_cli_writes_an_ordinary_teacher_checkpoint(tmp_path, capsys):
    pkl = tmp_path / "edm-cifar10-32x32-cond-vp.pkl"
    edm_snapshot(pkl, "ddpmpp", 10)
    out = tmp_path / "ckpt" / "edm_cond_vp.pt"
    assert import_main([str(pkl), str(out)]) == 0
    assert "DDPM++" in capsys.readouterr().out
    state = load_checkpoint(str(out), kind="teacher")  # weights-only load
    assert state["ema"].keys() == state["model"].keys() and state["config"]["arch"] == state["arch"]


def test_a_pickle_with_any_other_global_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)

    pkl = tmp_path / "evil.pkl"
    pkl.write_bytes(pickle.dumps(dict(ema=Payload())))
    with pytest.raises(EDMImportError, match=r"evil\.pkl.*refusing the global '(posix|os)\.system'"):
        import_edm(str(pkl))
    assert not marker.exists()
    # a torch module class EDM networks never contain is refused the same way (only containers are allowed)
    pkl.write_bytes(pickle.dumps({"ema": 1, "x": [torch.nn.Linear(2, 2)]}))
    with pytest.raises(EDMImportError, match="torch.nn.modules.linear.Linear"):
        import_edm(str(pkl))


def test_truncated_and_wrong_files_are_refused_naming_the_file(tmp_path):
    pkl = tmp_path / "edm.pkl"
    edm_snapshot(pkl, "ddpmpp", 10)
    data = pkl.read_bytes()
    (tmp_path / "half.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(EDMImportError, match=r"half\.pkl: not a readable EDM network pickle"):
        import_edm(str(tmp_path / "half.pkl"))
    torch.save({"kind": "teacher"}, tmp_path / "ours.pt")
    with pytest.raises(EDMImportError, match=r"ours\.pt"):
        import_edm(str(tmp_path / "ours.pt"))
    with pytest.raises(FileError, match="file not found"):
        import_edm(str(tmp_path / "missing.pkl"))


@pytest.mark.parametrize("precond,model_type,message", [
    ("VPPrecond", "SongUNet", "VP preconditioning"), ("VEPrecond", "SongUNet", "VE preconditioning"),
    ("iDDPMPrecond", "DhariwalUNet", "iDDPM preconditioning"), ("EDMPrecond", "MyUNet", "unknown architecture"),
])
def test_other_preconditionings_and_architectures_are_refused(precond, model_type, message, tmp_path):
    pkl = tmp_path / "baseline.pkl"
    edm_snapshot(pkl, "ddpmpp", 10, precond=precond, model_type=model_type)
    with pytest.raises(EDMImportError, match=message):
        import_edm(str(pkl))


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
@pytest.mark.parametrize("label_dim", [10, 0])
def test_an_imported_teacher_distills_generates_and_evaluates(label_dim, tiny_data, featnet, tmp_path):
    """python -m dmd2.import_edm in a fresh process (no module of the EDM pickle's own code is loaded there), then
    train.py's distillation, generate.py and evaluate.py (their functions, in this process) on its teacher."""
    pkl = tmp_path / "edm.pkl"
    edm_snapshot(pkl, "ncsnpp" if label_dim else "ddpmpp", label_dim)
    teacher = tmp_path / "edm.pt"
    proc = subprocess.run([sys.executable, "-m", "dmd2.import_edm", str(pkl), str(teacher)], cwd=ROOT,
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import generate as generate_script
    from train import train

    data = ["data=image_folder", f"data.root={tiny_data}", f"data.num_classes={label_dim}"]
    out = tmp_path / "distill"
    train(compose_cfg([*SMOKE, "stage=distill", "arch=from_teacher", *data, f"teacher_checkpoint={teacher}",
                       "gan_classifier=true", "dfake_gen_update_ratio=2", "max_steps=2", f"output_dir={out}"]))
    gen = tmp_path / "generated"
    with torch.no_grad():  # as generate.py's main
        generate_script.generate(compose_cfg([f"checkpoint={out / 'dmd2_final.pt'}", f"output_dir={gen}",
                                              f"seeds=0-{3 * max(label_dim, 1) - 1}", "device=cpu"],
                                             config_name="generate"))
    if label_dim:  # the imported teacher names no classes: the distillation took the dataset's
        assert len(list(gen.glob("*/*.png"))) == 30 and (gen / "class00" / "000010.png").exists()
    else:  # unconditional: a flat folder and one grid
        assert sorted(p.name for p in gen.iterdir()) == ["000000.png", "000001.png", "000002.png", "generate.json",
                                                         "grid.png"]
    if label_dim:
        return  # evaluate.py on an imported conditional teacher: as on any teacher (tests/test_evaluate.py)
    evaluate_script.evaluate(compose_cfg([f"checkpoint={teacher}", "sampler.steps=1", "logger=none",
                                          *train_eval_args(featnet, tiny_data, tmp_path / "fid_stats", num=20,
                                                           prefix=""),
                                          f"output_dir={tmp_path / 'eval'}"], config_name="evaluate"))
    (row,) = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert row["kind"] == "teacher" and np.isfinite(row["value"])


@pytest.mark.slow
def test_unconditional_teacher_training_from_scratch(tiny_data, tmp_path):
    """data.num_classes=0 trains a label-free teacher on any folder tree; its sample grid is one row."""
    proc = run_cli("train.py", *SMOKE, "stage=teacher", "data=image_folder", f"data.root={tiny_data}",
                   "data.num_classes=0", f"output_dir={tmp_path}", f"hydra.run.dir={tmp_path}/hydra")
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_checkpoint(str(tmp_path / "teacher_final.pt"), kind="teacher")
    assert state["num_classes"] == 0 and not any("label_emb" in k for k in state["ema"])


# ------------------------------------------------------------------------------------------------ EDM's FID protocol


class FakeInceptionBase(nn.Module):
    """Stands in for inception-2015-12-05.pt: ``forward(x, return_features=True)`` is what the TF-Inception
    protocol calls on images at their own size; ``layers`` what the clean protocol calls after its resize."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(3, 2048, 1))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x) + float(x.shape[-1])  # the input size shows in the features


def fake_inception(tmp_path: Path) -> Path:
    weights = tmp_path / "weights" / "inception-2015-12-05.pt"
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(FakeInceptionBase().eval()).save(str(weights))
    return weights


def test_edm_protocol_feeds_inception_the_images_at_their_own_size_and_reads_a_reference_npz(
        teacher_ckpt, tmp_path, monkeypatch):
    weights = fake_inception(tmp_path)
    net = build_feature_network("inception", torch.device("cpu"), inception_weights=str(weights),
                                resize="legacy_tensorflow")
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected = torch.jit.load(str(weights))(images.float(), return_features=True).view(2, 2048)
    np.testing.assert_allclose(batch_features(images, net), expected.numpy(), rtol=1e-6)  # no resize outside
    np.savez(tmp_path / "cifar10-32x32.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    monkeypatch.setattr("dmd2.eval.statistics.gaussian_frechet_distance",  # a 2048-d sqrtm takes minutes on 2 cores
                        lambda mu1, s1, mu2, s2: float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)))
    cfg = compose_cfg([f"checkpoint={teacher_ckpt}", "protocol=edm", f"reference.path={tmp_path / 'cifar10-32x32.npz'}",
                       f"feature_network.inception_weights={weights}", "num_samples=4", "batch_size=2",
                       "allow_few_samples=true", "uncertainty_resamples=0",
                       "sampler.steps=1", "logger=none", f"output_dir={tmp_path / 'out'}"], config_name="evaluate")
    (row,) = evaluate_script.evaluate(cfg)
    assert row["metric"] == "FID (TF-Inception protocol)" and row["resize"] == "legacy_tensorflow"
    assert "TF-Inception" in row["protocol"] and "cifar10-32x32.npz" in row["reference"]
    assert "eval/fid_tf" in (tmp_path / "out" / "metrics.jsonl").read_text()


@pytest.mark.parametrize("arrays,message", [
    (dict(mu=np.zeros(4)), "expected arrays 'mu' and 'sigma'"),
    (dict(mu=np.zeros(4), sigma=np.eye(3)), r"expected mu \[D\] and sigma \[D,D\]"),
    (dict(mu=np.full(4, np.nan), sigma=np.eye(4)), "NaN or inf"),
    (None, "not a readable .npz"),
    (dict(mu=np.zeros(2), sigma=np.array([[1.0, 2.0], [2.0, 1.0]])), "negative eigenvalue"),  # not PSD
    (dict(mu=np.zeros(2), sigma=np.array([[1.0, 0.5], [0.0, 1.0]])), "not symmetric"),
    (dict(mu=np.zeros(9000), sigma=np.eye(2)), r"D at most 8192"),  # 9000 x 9000 float64 would be 650 MB
    (dict(mu=np.array([1, "x"], dtype=object), sigma=np.eye(2)), "holds Python objects"),
])
def test_a_malformed_reference_npz_is_refused(arrays, message, featnet, tmp_path):
    path = tmp_path / "ref.npz"
    if arrays is None:
        path.write_bytes(b"not a zip")
    else:
        np.savez(path, **arrays)
    net = build_feature_network("torchscript", torch.device("cpu"), path=str(featnet), resize="none")
    with pytest.raises(EvaluationError, match=rf"reference.path = .*ref\.npz.*{message}"):
        npz_stats(str(path), net)
    np.savez(path, mu=np.ones(8), sigma=np.eye(8))
    stats = npz_stats(str(path), net)
    assert stats.mu.shape == (8,) and stats.feats is None
