"""The scripts' entry point: errors caused by input end the run with a message and a documented exit status.

    if __name__ == "__main__":
        sys.exit(run_script(main))      # main: the script's @hydra.main function

An error caused by the config, a file, a checkpoint's format, the evaluation setup, or a training without a result
is printed as one message, without a Python traceback, and gives the exit status of its class
(``dmd2.config.errors.EXIT_STATUSES``, the table every entry point uses; README "Exit statuses"). HYDRA_FULL_ERROR=1
prints the traceback as well. Any other exception is a bug and propagates with its full traceback (status 1).

This module imports no torch: the scripts' --help and tab completion stay fast.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import traceback
from typing import Any, Callable

from hydra._internal import hydra as hydra_app
from hydra.errors import ConfigCompositionException, HydraException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from dmd2.config import errors
from dmd2.config.errors import ConfigError
from dmd2.config.settings import DistillSettings, TeacherSettings, TrainSettings


# Run folders Hydra is about to create for this invocation (they did not exist when hydra.run.dir was resolved):
# a refused start removes them again when they hold only Hydra's own files (``remove_refused_run_dir``)
NEW_RUN_DIRS: dict[str, str | None] = {}  # run folder -> the outermost of its folders that did not exist yet


def run_dir(output_dir: Any, default: str) -> str:
    """The resolver ``${dmd2_run_dir:${output_dir},<default>}`` of ``hydra.run.dir``: the run's ``output_dir``
    when set (train.log and .hydra/ go into the run's own folder), else ``default`` (outputs/<date>/<time>)."""
    path = str(output_dir) if output_dir not in (None, "", "None") else default
    leaf = top = os.path.abspath(path)
    if leaf not in NEW_RUN_DIRS:
        if os.path.exists(leaf):
            NEW_RUN_DIRS[leaf] = None
            KEPT_HYDRA_FILES[leaf] = hydra_files(leaf)
        else:
            while not os.path.exists(os.path.dirname(top)):
                top = os.path.dirname(top)
            NEW_RUN_DIRS[leaf] = top
    return path


OmegaConf.register_new_resolver("dmd2_run_dir", run_dir, replace=True)
HYDRA_FILES = (".hydra",)  # with <script>.log: all a run folder holds before the run itself writes anything
# an existing run folder's Hydra files as they were before this invocation: path -> (bytes of .hydra/*, log sizes)
KEPT_HYDRA_FILES: dict[str, tuple[dict[str, bytes], dict[str, int]]] = {}


def hydra_files(folder: str) -> tuple[dict[str, bytes], dict[str, int]]:
    """The contents of ``folder``/.hydra/* (a few small YAML files) and the sizes of its *.log files."""
    hydra_dir = os.path.join(folder, ".hydra")
    saved = {}
    for name in sorted(os.listdir(hydra_dir)) if os.path.isdir(hydra_dir) else []:
        with open(os.path.join(hydra_dir, name), "rb") as f:
            saved[name] = f.read()
    logs = {n: os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(".log")}
    return saved, logs


def restore_hydra_files(folder: str, kept: tuple[dict[str, bytes], dict[str, int]]) -> None:
    """Put an existing run folder's Hydra files back as ``hydra_files`` found them: a refused start into the
    folder of an earlier run leaves that run's record (.hydra/, its log) as it was."""
    saved, logs = kept
    hydra_dir = os.path.join(folder, ".hydra")
    for name in os.listdir(hydra_dir) if os.path.isdir(hydra_dir) else []:
        if name not in saved:
            os.remove(os.path.join(hydra_dir, name))
    for name, data in saved.items():
        with open(os.path.join(hydra_dir, name), "wb") as f:
            f.write(data)
    if not saved and os.path.isdir(hydra_dir) and not os.listdir(hydra_dir):
        os.rmdir(hydra_dir)
    for name in [n for n in os.listdir(folder) if n.endswith(".log")]:
        path = os.path.join(folder, name)
        if name in logs:
            os.truncate(path, logs[name])
        else:
            os.remove(path)


def remove_refused_run_dir() -> None:
    """After a refused start: remove the run folders this invocation made that hold nothing but Hydra's files
    (.hydra/ and the script's log), so a refused start leaves no folder behind. A folder that existed before, or
    that holds anything else (another run's lock or checkpoints), is left alone."""
    import shutil

    for path, kept in KEPT_HYDRA_FILES.items():
        try:
            restore_hydra_files(path, kept)
        except OSError:
            pass  # an unwritable folder (the refusal may be just that): nothing was written there either
    for path, top in NEW_RUN_DIRS.items():
        if top is None or not os.path.isdir(path):
            continue
        if all(name in HYDRA_FILES or name.endswith(".log") for name in os.listdir(path)):
            shutil.rmtree(path, ignore_errors=True)
            while path != top and os.path.isdir(os.path.dirname(path)) and not os.listdir(os.path.dirname(path)):
                path = os.path.dirname(path)  # the folders made for it (outputs/<date>/), when left empty
                os.rmdir(path)


def stage_of_key(key: str) -> str | None:
    """The stage ("teacher" or "distill") whose settings alone have the top-level ``key``, else None."""
    shared = {f.name for f in dataclasses.fields(TrainSettings)}
    for stage, schema in (("teacher", TeacherSettings), ("distill", DistillSettings)):
        if key in {f.name for f in dataclasses.fields(schema)} - shared:
            return stage
    return None


def composition_message(err: HydraException, script: str) -> str:
    """Hydra's message for a config it could not compose, with a hint that fits this project: an unknown key is
    named as a key of the other stage when it is one, and Hydra's advice to append it with +key is left out
    (the scripts read only the keys of their schemas: an appended key would be ignored)."""
    cause = err.__cause__
    unknown_key = isinstance(err, ConfigCompositionException) and isinstance(cause, (ConfigAttributeError,
                                                                                     ConfigKeyError))
    if unknown_key and cause.full_key:
        key = cause.full_key
        stage = stage_of_key(key)
        if stage is not None:
            return f"`{key}` is a `stage={stage}` key: add stage={stage}"
        return f"unknown config key '{key}' (python {script} --help lists every key)"
    return str(err) + (f"\n{cause}" if cause is not None else "")


def plain_message(err: BaseException) -> str:
    """The error's message; for an error re-raised from a DataLoader worker (whose message carries the worker's
    traceback) only the original message, e.g. the file that could not be read."""
    text = str(err)
    marker = f"{type(err).__name__}: "
    if "DataLoader worker process" in text and "Traceback" in text and marker in text:
        return text.rstrip().rsplit(marker, 1)[1]
    return text


def exit_status(err: BaseException) -> int | None:
    """The exit status of an error caused by input (``dmd2.config.errors.EXIT_STATUSES``, README "Exit
    statuses"), or None for any other exception. A config Hydra could not compose is a ConfigError."""
    if isinstance(err, HydraException):
        return errors.EXIT_STATUSES[ConfigError]
    return errors.exit_status(err)


def skip_hydra_group_listing() -> None:
    """Make ``--help`` cheap: Hydra builds its own config-group listing ($APP_CONFIG_GROUPS) for every help text,
    recomposing the config once per group option (about 120 copies of the ConfigStore, 75 % of --help's CPU
    time). This project's help templates list their groups themselves (``dmd2.config.settings.help_template``) and use
    only $CONFIG, so that listing is never shown and is skipped. (Hydra 1.3's ``Hydra.format_config_groups``; a
    Hydra without it is left alone.)"""
    if hasattr(hydra_app.Hydra, "format_config_groups"):
        hydra_app.Hydra.format_config_groups = lambda self, predicate, compact=True: ""


def run_script(main: Callable[[], Any]) -> int:
    """Run a script's Hydra ``main``; return 0, or the exit status of an input error after printing its message.

    Hydra prints errors itself (exit status 1) unless HYDRA_FULL_ERROR=1, when it raises them: it is set while
    ``main`` runs so that the errors reach this function, which then prints the traceback only if the user had set
    HYDRA_FULL_ERROR=1."""
    asks_help = "--help" in sys.argv[1:] or "-h" in sys.argv[1:]
    if asks_help:
        skip_hydra_group_listing()
    show_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except BrokenPipeError:
        if not asks_help:
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # `--help | head`: the reader left
    except Exception as err:
        status = exit_status(err)
        if status is None:
            raise
        remove_refused_run_dir()
        if show_traceback:
            traceback.print_exc()
        script = os.path.basename(sys.argv[0])
        message = composition_message(err, script) if isinstance(err, HydraException) else plain_message(err)
        sys.stderr.write(f"Error: {message}\n")
        if not show_traceback:
            sys.stderr.write(f"(exit status {status}; set HYDRA_FULL_ERROR=1 for the traceback)\n")
        return status
    finally:
        if previous is None:
            del os.environ["HYDRA_FULL_ERROR"]
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
    return 0


def eval_group_overrides(argv: list[str]) -> list[str]:
    """evaluate.py takes train.py's ``eval`` config group with its keys at the top level (conf/evaluate.yaml:
    ``eval@_global_``); ``eval=featnet`` on its command line means that group, as it does for train.py."""
    return [f"eval@_global_={a[len('eval='):]}" if a.startswith("eval=") else a for a in argv]


def quiet_hydra_on_other_ranks(argv: list[str]) -> list[str]:
    """Under torchrun, ranks > 0 write no Hydra files: they all use rank 0's output folder."""
    if int(os.environ.get("RANK", "0")) > 0:
        return [*argv, "hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    return argv
