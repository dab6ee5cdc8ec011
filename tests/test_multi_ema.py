"""Several EMAs of the generator: the update rule, naming, validation, checkpoints, exact resume and the choice
of weights by name in export, load_generator and evaluations."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import dmd2
from dmd2.config.errors import CONFIG_ERROR, ConfigError
from dmd2.config.settings import ema_decays, ema_name, is_ema_name
from dmd2.io.checkpoint import load_checkpoint
from dmd2.io.export import export_generator, main
from dmd2.train.distill import generator_sampler, restore_emas
from dmd2.train.optim import EMA, LRSchedule, Updater
from tests.conftest import SMOKE, build_once, compose_cfg

DECAYS = [0.5, 0.99]
EXTRA = [ema_name(d) for d in DECAYS]  # ema_0.5, ema_0.99


def test_each_extra_ema_is_named_by_its_decay():
    assert ema_name(0.99995) == "ema_0.99995" and ema_name(0.9996) == "ema_0.9996"
    assert is_ema_name("ema_0.99995") and not is_ema_name("ema_1.0") and not is_ema_name("ema_x")
    assert not is_ema_name("ema_0.999950")  # one spelling per decay: the one ema_name writes
    assert list(ema_decays(0.9999, [0.99995, 0.9996])) == ["ema", "ema_0.99995", "ema_0.9996"]
    assert ema_decays(None, []) == {}


def test_every_ema_follows_the_closed_form_of_a_constant_model_step():
    """The model moves by delta each update (SGD on a linear loss): after k updates an EMA of decay d started
    at w0 is w0 + k delta - delta d (1 - d^k) / (1 - d)."""
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    model = torch.nn.ParameterList([w])
    decays = [0.9, 0.5, 0.99]
    copies = [torch.nn.ParameterList([torch.nn.Parameter(w.detach().clone())]) for _ in decays]
    emas = [EMA(c, model, lambda _, d=d: d) for c, d in zip(copies, decays)]
    lr, slope = 0.1, torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    upd = Updater("loss", [w], torch.optim.SGD([w], lr=lr), lr, LRSchedule(0), None, "stop", emas[0], emas[1:])
    k = 7
    for step in range(k):
        upd.update((slope * w).sum(), step)
    delta = -lr * slope
    assert torch.allclose(w.detach(), k * delta)
    for copy, d in zip(copies, decays):
        expected = k * delta - delta * d * (1 - d ** k) / (1 - d)
        assert torch.allclose(copy[0].detach(), expected, rtol=0, atol=1e-12), d


@pytest.mark.parametrize("overrides, key", [
    (["generator_ema_decays=[0.5,0.5]"], "generator_ema_decays"),
    (["generator_ema_decays=[1.0]"], "generator_ema_decays"),
    (["generator_ema_decays=[0.0]"], "generator_ema_decays"),
    (["generator_ema_decay=0.9", "generator_ema_decays=[0.9]"], "generator_ema_decays"),
    (["generator_ema_decays=[0.5]", "eval_weights=ema_0.7"], "eval_weights"),
    (["eval_weights=best"], "eval_weights"),
])
def test_bad_ema_settings_are_refused_naming_the_key(overrides, key):
    from dmd2.config.validate import validate

    base = [*SMOKE, "stage=distill", f"teacher_checkpoint={__file__}"]
    with pytest.raises(ConfigError, match=f"'{key}'"):
        validate(compose_cfg(base + overrides))
    validate(compose_cfg(base + ["generator_ema_decays=[0.5,0.99]", "eval_weights=ema_0.99"]))


def test_evaluations_measure_the_chosen_weights():
    model = SimpleNamespace(generator="G", num_steps=1, denoising_sigmas=[80.0])
    emas = {"ema": "E", "ema_0.5": "E5"}
    pick = lambda emas, w: (lambda s: (s.net, s.weights))(generator_sampler(model, emas, 3, 10, 32, w))
    assert pick(emas, "ema") == ("E", "ema") and pick(emas, "raw") == ("G", "raw")
    assert pick(emas, "ema_0.5") == ("E5", "ema_0.5")
    assert pick({"ema_0.5": "E5"}, "ema") == ("G", "raw")  # no default EMA: the raw weights, as before


def distill(out: Path, teacher: Path, data: Path, steps: int, *extra: str) -> None:
    """A distillation keeping the default EMA and two more, trained in this process."""
    from train import train

    train(compose_cfg([*SMOKE, "stage=distill", "data=image_folder", f"data.root={data}",
                       f"teacher_checkpoint={teacher}", f"output_dir={out}", f"max_steps={steps}", "save_every=2",
                       "sample_every=0", "dfake_gen_update_ratio=2", "generator_ema_decay=0.9",
                       f"generator_ema_decays=[{','.join(map(str, DECAYS))}]", *extra]))


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory, teacher_ckpt, tiny_data) -> Path:
    """A 6-step distillation keeping the default EMA and two more."""
    return build_once(tmp_path_factory, "multi_ema", lambda out: distill(out, teacher_ckpt, tiny_data, 6))


def test_checkpoints_keep_every_ema_and_a_resume_continues_them_exactly(multi_run, teacher_ckpt, tiny_data,
                                                                        tmp_path):
    straight = load_checkpoint(str(multi_run / "dmd2_final.pt"))
    assert sorted(straight["generator_emas"]) == sorted(EXTRA) and "generator_ema" in straight
    out = tmp_path / "resumed"
    distill(out, teacher_ckpt, tiny_data, 3)
    distill(out, teacher_ckpt, tiny_data, 6, "resume=auto")
    resumed = load_checkpoint(str(out / "dmd2_final.pt"))
    assert resumed["step"] == straight["step"] == 6
    pairs = [(straight["generator"], resumed["generator"]), (straight["generator_ema"], resumed["generator_ema"])]
    pairs += [(straight["generator_emas"][n], resumed["generator_emas"][n]) for n in EXTRA]
    for a, b in pairs:
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = straight["generator_emas"][EXTRA[0]]
    assert any(not torch.equal(first[k], straight["generator_emas"][EXTRA[1]][k]) for k in first)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def test_load_generator_and_export_choose_an_ema_by_name(multi_run, tmp_path):
    path = str(multi_run / "dmd2_final.pt")
    state = load_checkpoint(path)
    for name in EXTRA:
        gen = dmd2.load_generator(path, generator_weights=name)
        assert gen.metadata["weights"] == name
        assert same_weights(gen.sampler.net.state_dict(), state["generator_emas"][name])
    meta = export_generator(path, str(tmp_path / "export"), generator_weights=EXTRA[1])
    assert meta["weights"] == EXTRA[1]
    exported = dmd2.load_generator(str(tmp_path / "export"))
    assert same_weights(exported.sampler.net.state_dict(), state["generator_emas"][EXTRA[1]])
    assert same_weights(dmd2.load_generator(path).sampler.net.state_dict(), state["generator_ema"])


def test_an_unknown_ema_name_is_refused_listing_the_checkpoints_names(multi_run, tmp_path, capfd):
    path = str(multi_run / "dmd2_final.pt")
    with pytest.raises(ConfigError, match=r"'ema_0\.7'.*holds the generator weights ema, raw, ema_0\.5, ema_0\.99"):
        dmd2.load_generator(path, generator_weights="ema_0.7")
    assert main([path, str(tmp_path / "x"), "--generator-weights", "ema_0.7"]) == CONFIG_ERROR
    assert "ema_0.5, ema_0.99" in capfd.readouterr().err


def test_a_checkpoint_without_extra_emas_loads_and_a_new_ema_starts_from_the_generator(multi_run, tmp_path):
    state = torch.load(multi_run / "dmd2_final.pt", weights_only=True)
    del state["generator_emas"]  # as written before extra EMAs existed
    torch.save(state, tmp_path / "old.pt")
    old = load_checkpoint(str(tmp_path / "old.pt"))
    assert old["generator_emas"] == {}
    with pytest.raises(ConfigError, match="holds the generator weights ema, raw$"):
        dmd2.load_generator(str(tmp_path / "old.pt"), generator_weights="ema_0.5")
    net = dmd2.load_generator(str(tmp_path / "old.pt"), generator_weights="raw").sampler.net
    ema = dmd2.load_generator(str(tmp_path / "old.pt")).sampler.net
    restore_emas(old, {"ema": ema, "ema_0.5": net})
    assert same_weights(net.state_dict(), old["generator"]) and same_weights(ema.state_dict(), old["generator_ema"])
