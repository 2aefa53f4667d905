"""What ``run.py`` adds around Hydra, so that every user mistake looks and exits alike: one
``error:`` line per problem and exit code 2, whether cnnzoo or Hydra found it.

Hydra reports its own findings (an unknown key, an unknown group option, an override it cannot
parse, a run directory it cannot create) in several lines and exits with 1. ``run_main`` asks
Hydra to raise them instead (``HYDRA_FULL_ERROR``) and shows each as one line; a real crash keeps
its traceback. A user who sets ``HYDRA_FULL_ERROR=1`` gets Hydra's full report as before.
``RunDirCheck`` (a Hydra callback) refuses a run or sweep directory that cannot be a folder
before Hydra tries to create it."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from ..core.errors import BAD_INPUT, ConfigError, exit_with

GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"


def run_main(main: Callable[[], object]) -> None:
    """Call the ``@hydra.main`` function ``main``, reporting user mistakes in one line."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        main()  # the user asked for Hydra's own report
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except BAD_INPUT as err:
        exit_with(err)
    except (ConfigCompositionException, OverrideParseException, OmegaConfBaseException) as err:
        exit_with(ConfigError(one_line(err)))


def one_line(err: Exception) -> str:
    """A Hydra or OmegaConf error as one line that names the problem and the fix."""
    if isinstance(err, MissingConfigException) and err.options:
        group = (err.missing_cfg_file or "").split("/")[0]
        return (f"{err.missing_cfg_file}: no such option; {group} is one of "
                f"{', '.join(sorted(err.options))}")
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if isinstance(err, OverrideParseException):
        tilde = (" (the shell does not expand ~ after key=: write $HOME/...)"
                 if "~" in err.override else "")
        return (f"cannot parse the override {err.override!r}{tilde}: quote values with special "
                f"characters, e.g. 'key=\"value\"' ({GRAMMAR})")
    if isinstance(err, ConfigCompositionException) and isinstance(err.__cause__,
                                                                   ConfigKeyError):
        hint = next((ln for ln in lines if ln.startswith("To append")), "")
        return (f"{lines[0].rstrip('.')}: it is not a config key ({hint[:1].lower()}{hint[1:]}; "
                "python run.py --cfg job lists every key)")
    if isinstance(err, ConfigCompositionException) and isinstance(err.__cause__,
                                                                   OmegaConfBaseException):
        cause = str(err.__cause__).splitlines()[0]
        return "; ".join(lines[:2] + [cause])
    if isinstance(err, OmegaConfBaseException):
        return lines[0] + (f" (in {err.full_key})" if getattr(err, "full_key", None) else "")
    return "; ".join(ln for ln in lines if not ln.startswith(("provider=", "Config search")))


class RunDirCheck(Callback):
    """Refuse a run (or sweep) directory that is a file or lies under one. Hydra turns a
    callback's exception into a warning, so this one exits itself."""

    def on_run_start(self, config, **kwargs) -> None:
        _check_folder(config, "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        _check_folder(config, "hydra.sweep.dir")


def _check_folder(config, key: str) -> None:
    path = OmegaConf.select(config, key, throw_on_resolution_failure=False)
    if path is None:
        return  # it cannot be resolved: Hydra reports that itself
    for p in [Path(path), *Path(path).parents]:
        if p.exists() and not p.is_dir():
            where = "is" if p == Path(path) else f"lies under {p}, which is"
            exit_with(ConfigError(f"{key}={path} {where} a file, not a folder: choose "
                                  f"another {key}"))
