"""Each key's policy (may it change on resume, does it name a run, does it split groups in dmd2.compare) comes from
the schema (dmd2.config.policy). The keys each policy holds for are compared with the hand-kept lists they
replaced, copied here as the expected values: a schema change that alters a key's policy fails here, on purpose
(update the expected lists with it)."""
from __future__ import annotations

import dataclasses

import pytest

from dmd2.config.policy import NAMED, TRAINING, declared, key_policy, names_a_run, resume_safe, splits_groups
from dmd2.config.settings import OTHER_KEYS, SCHEMAS, Policy

# dmd2/train/context.py's RESUME_SAFE, matched as key.startswith(RESUME_SAFE)
RESUME_SAFE = ("lr", "generator_lr", "guidance_lr", "weight_decay", "adam_betas", "grad_clip", "warmup_steps",
               "discriminator_lr",  # added with the setting (FastGen's discriminator)
               "ema_decay", "generator_ema_decay", "max_steps", "num_epochs", "save_every", "log_every",
               "sample_every", "samples_per_class", "sample_steps", "keep_last", "on_nonfinite", "eval_every",
               "eval.", "logger.", "perf.", "paths.", "run_name", "device", "data.num_workers", "data_dir",
               "optimized_metric", "resume", "resume_allow_changes", "output_dir", "world_size", "global_batch_size",
               "teacher_sha256",
               "eval_weights", "progress", "generator_ema_warmup", "fake_warmup_steps",
               "data.max_unreadable",  # keys added since, resume-safe by their schema entry
               "health.")  # the health diagnostics' thresholds and panels (HealthSettings)
# dmd2/config/names.py's UNNAMED: the key, or a key inside it (after "." or "/")
UNNAMED = ("output_dir", "data_dir", "run_name", "resume", "device", "data.num_workers", "hydra", "logger", "paths",
           "local",
           "progress")  # added with the setting: how a run shows its progress, not what it computes
# dmd2/eval/compare.py's IGNORED: the key, or (ending in ".") a key inside the section
IGNORED = ("seed", "output_dir", "run_name", "resume", "data_dir", "logger.", "data.root", "data.num_workers",
           "teacher_checkpoint", "device", "paths.",
           "progress")  # added with the setting


def was_resume_safe(key: str) -> bool:
    return key.startswith(RESUME_SAFE)


def was_named(key: str) -> bool:
    return not any(key == u or key.startswith(u + ".") or key.startswith(u + "/") for u in UNNAMED)


def was_ignored(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in IGNORED)


def schema_keys(node: type, prefix: str = "") -> tuple[set[str], set[str]]:
    """(leaf keys, section keys) of ``node``, every option of a chosen section (arch, data, logger) included."""
    leaves, sections = set(), set()
    for f in dataclasses.fields(node):
        key = prefix + f.name
        factory = f.default_factory
        inner = ([n for path, n in SCHEMAS.items() if path.split("/")[1] == f.name] if f.metadata.get("chosen")
                 else [factory] if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory) else [])
        if not inner:
            leaves.add(key)
            continue
        sections.add(key)
        for sub in inner:
            more, deeper = schema_keys(sub, key + ".")
            leaves |= more
            sections |= deeper
    return leaves, sections


def keys_of(roots: tuple[type, ...]) -> tuple[set[str], set[str]]:
    leaves, sections = set(), set()
    for root in roots:
        more, deeper = schema_keys(root)
        leaves |= more
        sections |= deeper
    return leaves, sections


STORED_EXTRAS = {"world_size", "global_batch_size", "teacher_sha256"}  # beside the settings in a run's config
UNKNOWN = {"arch.no_such_key", "logger.no_such_key", "eval.no_such_key", "data.no_such_key", "no_such_key"}
TRAINING_LEAVES = keys_of(TRAINING)[0]
# a stored config (resume) and a run's config.yaml (compare): its leaves, flattened
STORED = TRAINING_LEAVES | STORED_EXTRAS | UNKNOWN
# command-line overrides of train.py and evaluate.py: keys, sections, group choices, Hydra's keys
OVERRIDES = set().union(*keys_of(NAMED)) | UNKNOWN | {
    "hydra.run.dir", "hydra.sweep.dir", "hydra.sweeper.n_trials", "hydra/launcher", "hydra/sweeper", "local",
    "experiment", "debug", "debug_stage", "hparams_search", "protocol", "eval", "arch", "data", "logger", "stage"}


def test_the_universes_hold_every_kind_of_key():
    assert {"lr", "generator_lr", "arch.channels", "arch.channel_mult", "data.root", "logger.project", "eval.seed",
            "eval.reference.cache_dir", "perf.compile", "paths.featnet"} <= STORED
    assert {"checkpoint", "num_workers", "feature_network.name", "sampler.steps", "eval.feature_network"} <= OVERRIDES


def test_resume_safe_keys_are_those_of_the_former_list():
    assert {k for k in STORED if resume_safe(k)} == {k for k in STORED if was_resume_safe(k)}
    assert resume_safe("lr") and resume_safe("eval.reference.name") and resume_safe("teacher_sha256")
    assert not resume_safe("batch_size") and not resume_safe("data.root") and not resume_safe("arch.channels")
    assert not resume_safe("seed") and not resume_safe("teacher_checkpoint")


def test_keys_left_out_of_run_names_are_those_of_the_former_list():
    assert {k for k in OVERRIDES if not names_a_run(k)} == {k for k in OVERRIDES if not was_named(k)}
    assert not names_a_run("hydra/launcher") and not names_a_run("logger") and not names_a_run("paths.featnet")
    assert names_a_run("data.root") and names_a_run("resume_allow_changes") and names_a_run("num_workers")


def test_keys_that_do_not_split_groups_are_those_of_the_former_list():
    assert {k for k in STORED if not splits_groups(k)} == {k for k in STORED if was_ignored(k)}
    assert not splits_groups("seed") and splits_groups("eval.seed") and splits_groups("teacher_sha256")
    assert splits_groups("resume_allow_changes") and not splits_groups("logger.mode")


@pytest.mark.parametrize("roots, flag", [(TRAINING, "resume_safe"), (TRAINING, "splits_compare"),
                                         (NAMED, "names_run")])
def test_a_key_has_one_policy_in_every_schema_that_has_it(roots, flag):
    """The policy lookup takes the first schema (or chosen option) that has a key: all the schemas a policy is
    read from (training: resume, compare; train.py and evaluate.py: run names) must agree on it."""
    leaves, sections = keys_of(roots)
    for key in sorted(leaves | sections):
        parts = key.split(".")
        for depth in range(1, len(parts) + 1):
            seen = {getattr(p, flag) for root in roots for p in policies_at(root, parts[:depth])}
            assert len(seen) <= 1, (".".join(parts[:depth]), flag, seen)


def policies_at(node: type, parts: list[str]) -> list[Policy]:
    """The policy of the field at ``parts`` in every schema (and chosen option) below ``node`` that has it."""
    field = next((f for f in dataclasses.fields(node) if f.name == parts[0]), None)
    if field is None:
        return []
    if len(parts) == 1:
        return [field.metadata.get("policy", Policy())]
    inner = ([n for path, n in SCHEMAS.items() if path.split("/")[1] == field.name] if field.metadata.get("chosen")
             else [field.default_factory])
    return [p for sub in inner for p in policies_at(sub, parts[1:])]


def test_other_keys_are_no_schema_key_and_decide_every_flag():
    leaves, sections = keys_of(tuple(SCHEMAS.values()))
    tops = {k.split(".")[0] for k in leaves | sections}
    for key, policy in OTHER_KEYS.items():
        assert key not in tops, key
        assert None not in dataclasses.astuple(policy), key
    assert declared("hydra.run.dir", TRAINING) == [OTHER_KEYS["hydra"]]
    assert key_policy("no_such_key", TRAINING) == Policy(resume_safe=False, names_run=True, splits_compare=True)
