"""The Optuna sweeper's search space, in Hydra's override syntax (as hydra-optuna-sweeper had it):

    optim.lr: tag(log, interval(1e-4, 1e-1))   a float, log-uniform
    arch.width: tag(int, interval(8, 64))        an integer (tag(int, log, ...) also)
    data.batch_size: choice(16, 32, 64)          one of the values
    trainer.max_epochs: range(2, 10, 2)          2, 4, 6, 8 (Hydra's range: the end excluded)

``hydra.sweeper.params`` and the sweep overrides of the command line make the space; a plain
``key=value`` on the command line fixes that key for every trial.
"""
from __future__ import annotations

from dataclasses import dataclass

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from ..core.errors import ConfigError


@dataclass
class SearchSpace:
    distributions: dict[str, BaseDistribution]  # override key -> what Optuna samples
    fixed: list[str]                             # overrides every trial gets as they are

    def overrides(self, params: dict) -> list[str]:
        """A trial's command-line overrides: the fixed ones, then its sampled values."""
        return [*self.fixed, *(f"{key}={_text(value)}" for key, value in params.items())]

    def grid(self) -> dict[str, list]:
        """Every value of every parameter, for the grid sampler (choices and ranges only)."""
        grid, continuous = {}, []
        for key, dist in self.distributions.items():
            if isinstance(dist, CategoricalDistribution):
                grid[key] = list(dist.choices)
            elif dist.step is not None and not getattr(dist, "log", False):
                count = round((dist.high - dist.low) / dist.step) + 1
                grid[key] = [dist.low + i * dist.step for i in range(count)]
            else:
                continuous.append(key)
        if continuous:
            raise ConfigError(f"hydra/sweeper/sampler=grid needs every parameter as a choice or "
                              f"a range; {', '.join(continuous)} is an interval: use choice(...) "
                              f"or range(...), or another sampler")
        return grid


def search_space(params: dict | None, arguments: list[str]) -> SearchSpace:
    """The space of ``params`` (the config's) and the command line's ``arguments``; a later
    override of a key replaces an earlier one. One ConfigError line per key Optuna cannot
    sample (an empty or reversed interval, a log scale reaching 0)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    texts = [f"{key}={value}" for key, value in (params or {}).items()] + list(arguments)
    parser = OverridesParser.create()
    distributions, fixed, errors = {}, {}, []
    for text in texts:
        override = parser.parse_override(text)
        key = override.get_key_element()
        distributions.pop(key, None)
        fixed.pop(key, None)
        if not override.is_sweep_override():
            fixed[key] = text
            continue
        try:
            distributions[key] = _distribution(override)
        except (ValueError, NotImplementedError) as err:
            errors.append(f"Optuna search space {text!r}: {str(err).splitlines()[0]}")
    if errors:
        raise ConfigError("\n".join(errors))
    return SearchSpace(distributions, list(fixed.values()))


def _distribution(override) -> BaseDistribution:
    from hydra.core.override_parser.types import Transformer

    value = override.value()
    if override.is_choice_sweep():
        raw = list(override.sweep_iterator())
        numbers = all(isinstance(v, (int, float, bool)) for v in raw)
        return CategoricalDistribution(raw if numbers else
                                       list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        if value.shuffle:
            raise NotImplementedError("shuffle(range(...)) means nothing to Optuna: drop shuffle")
        values = list(override.sweep_iterator())
        if not values:
            raise ValueError(f"range({value.start}, {value.stop}, {value.step}) is empty")
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            return IntDistribution(values[0], values[-1], step=value.step)
        return FloatDistribution(values[0], values[-1], step=value.step)
    if override.is_interval_sweep():
        log = "log" in value.tags
        if "int" in value.tags:
            return IntDistribution(int(value.start), int(value.end), log=log)
        return FloatDistribution(value.start, value.end, log=log)
    raise NotImplementedError(f"{override.input_line} is not a sweep Optuna can sample: use "
                              f"choice, range or interval")


def _text(value) -> str:
    """A sampled value as an override's value (strings came encoded by Hydra already)."""
    return str(value).lower() if isinstance(value, bool) else str(value)
