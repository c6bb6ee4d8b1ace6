"""``reinforcepp compare``: several estimators x seeds on one task, then one report.

The command's usage and design are the docstring of :mod:`.cli` (its ``--help``); ``docs/compare.md``
explains every number. The package, one module per job, each importing only those listed before it:

- :mod:`.stats`: curve statistics (mean and sample std over seeds, windows) and the per-run numbers
  of the report's tables (:class:`Stat`, :func:`summarize`, ratios of means);
- :mod:`.verdicts`: the paper's claims, the rules of their verdicts (:data:`RULES`) and :func:`claims`;
- :mod:`.plots`: ``compare.png`` (:func:`plot_compare`);
- :mod:`.report`: ``report.md`` (:func:`build_report`);
- :mod:`.memory`: a run's own memory numbers (peak RSS, the tensors a trainer keeps);
- :mod:`.runner`: the runs' configs, the child processes (``python -m reinforcepp.compare SPEC``, run
  by ``__main__``) and loading finished runs;
- :mod:`.cli`: argument parsing and :func:`main` (``reinforcepp compare``).

The names below are the package's public interface (``reinforcepp.compare:main`` is the subcommand).
"""

from .cli import main
from .memory import peak_rss_mb, proc_status_mb, reset_peak_rss, state_mb
from .plots import GYM_PANELS, LM_PANELS, plot_compare
from .report import build_report
from .runner import (GYM_DEFAULTS, GYM_PRESETS, LM_DEFAULTS, OWN_DATA_KEYS, RESULT_FILE, SPEC_FILE, build_config,
                     child_main, load_runs, overrides_for_run, own_data, parse_variant, pinned_overrides,
                     resolved_summary, run_compare, run_name)
from .stats import (GYM_STATS, LM_STATS, RATIO_KEYS, TABLE_COST, TABLE_LEARNING, EstimatorSummary, RunData, Stat,
                    aggregate_curves, format_mean_std, mean_std, paired_ratios, ratio, series, stats_for, summarize,
                    window)
from .verdicts import RULES, Claim, claims, verdict_interval, verdict_ratio, verdict_spread

# the name tests/test_compare.py formats its expected table cells with
_pm = format_mean_std
