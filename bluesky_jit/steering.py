"""Feedback for steering: the learning stage's quality as ophyd signals, and a plan that uses it.

Liu, Bicer, Kettimuthu and Foster ("Deep learning accelerated light source
experiments", 2019) motivate streaming reconstruction with "experiment
steering, e.g. early stopping"; Graas et al. (2023) close the loop ("DNNs may
be able to close the experimentation loop ... by providing automated
feedback and experimental control"). The learning stage knows how good its
output is without any ground truth:

- accuracy alpha (Graas et al. 2023, eq. 3) on hold-out pairs: 1 means no
  denoising, about 0.5 the best a Noise2Inverse denoiser can do;
- the noise of the reconstructions, from the difference of independent
  split reconstructions, and an estimate of the error left in the denoised
  image (:func:`noise_levels`).

:class:`QualitySignals` is an ophyd device with these values; the pipeline
puts new values after every metric row (:meth:`QualitySignals.publish`), and
any plan can read them. :func:`until_quality` wraps a scan plan so that it
stops taking projections (or runs an adapting plan) once the quality is good
enough, closing the run normally.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Mapping
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
from bluesky.utils import Msg
from ophyd import Component as Cpt
from ophyd import Device, Signal

from ._checks import check_int
from .errors import ConfigError
from .noise2inverse import check_strategy

Plan = Generator[Msg, Any, Any]


def noise_levels(
    quality: Mapping[str, float], *, splits: int = 2, strategy: str = "X:1"
) -> dict[str, float]:
    """Noise estimates from hold-out Noise2Inverse pairs, without ground truth.

    With K splits whose reconstructions have noise variance ``s**2`` each,
    an X:1 pair has input variance ``s**2 / (K - 1)`` and target variance
    ``s**2`` (1:X the reverse), so ``mean((u - v)**2) = s**2 K / (K - 1)``.
    Since the target's noise is independent of ``A(u)``,
    ``mean((A(u) - v)**2) = mean((A(u) - x)**2) + var(target noise)``
    (Graas et al. 2023, eq. 4), which gives the error left after denoising.

    Parameters
    ----------
    quality : mapping
        ``mse_input`` and ``mse_output`` as from
        :meth:`bluesky_jit.training.Trainer.evaluate_details`, plus ``alpha``.
    splits : int
    strategy : {"X:1", "1:X"}

    Returns
    -------
    dict
        ``alpha``; ``sigma_split`` (noise std of one split's reconstruction);
        ``sigma_fbp`` (of the reconstruction from all projections, ``s / sqrt(K)``);
        ``sigma_denoised`` (RMS error of one denoised network input; the
        Noise2Inverse mean over the K inputs is at least as good). NaN where
        the inputs are missing.
    """
    check_strategy(strategy, splits)
    alpha = float(quality.get("alpha", math.nan))
    mse_in = float(quality.get("mse_input", math.nan))
    mse_out = float(quality.get("mse_output", math.nan))
    s2 = mse_in * (splits - 1) / splits
    target_var = s2 if strategy == "X:1" else s2 / (splits - 1)
    denoised = mse_out - target_var
    return {
        "alpha": alpha,
        "sigma_split": math.sqrt(s2) if s2 >= 0 else math.nan,
        "sigma_fbp": math.sqrt(s2 / splits) if s2 >= 0 else math.nan,
        "sigma_denoised": math.sqrt(max(denoised, 0.0)) if math.isfinite(denoised) else math.nan,
    }


class QualitySignals(Device):
    """The learning stage's quality estimate as ophyd signals (read them in a plan).

    Components
    ----------
    alpha : Signal
        Hold-out accuracy alpha (Graas et al. 2023, eq. 3); NaN until known.
    sigma_fbp : Signal
        Estimated noise std of the reconstruction (1/mm).
    sigma_denoised : Signal
        Estimated RMS error of the denoised image (1/mm).
    train_step : Signal
        Optimizer steps behind these values.

    Examples
    --------
    >>> quality = QualitySignals(name="jit_quality")
    >>> quality.publish({"alpha": 0.7, "mse_input": 2e-6, "mse_output": 1.2e-6}, step=10)
    >>> round(quality.alpha.get(), 2)
    0.7
    """

    alpha = Cpt(Signal, value=math.nan, kind="hinted")
    sigma_fbp = Cpt(Signal, value=math.nan, kind="normal")
    sigma_denoised = Cpt(Signal, value=math.nan, kind="normal")
    train_step = Cpt(Signal, value=0, kind="normal")

    def publish(
        self,
        quality: Mapping[str, float],
        *,
        step: int | None = None,
        splits: int = 2,
        strategy: str = "X:1",
    ) -> dict[str, float]:
        """Put new values (e.g. ``trainer.latest_quality``); returns what was put.

        Safe to call from the pipeline's worker thread.
        """
        levels = noise_levels(quality, splits=splits, strategy=strategy)
        self.alpha.put(levels["alpha"])
        self.sigma_fbp.put(levels["sigma_fbp"])
        self.sigma_denoised.put(levels["sigma_denoised"])
        step = quality.get("step") if step is None else step
        if step is not None:
            self.train_step.put(int(step))
        return levels


def good_enough(
    alpha: float,
    sigma_denoised: float = math.nan,
    *,
    alpha_below: float | None = None,
    sigma_below: float | None = None,
) -> bool:
    """Whether every given threshold is met (NaN, i.e. unknown, never meets one)."""
    if alpha_below is None and sigma_below is None:
        raise ConfigError("Give at least one threshold: alpha_below or sigma_below.")
    checks = []
    if alpha_below is not None:
        checks.append(math.isfinite(alpha) and alpha <= alpha_below)
    if sigma_below is not None:
        checks.append(math.isfinite(sigma_denoised) and sigma_denoised <= sigma_below)
    return all(checks)


def until_quality(
    plan: Plan,
    quality: QualitySignals,
    *,
    alpha_below: float | None = 0.6,
    sigma_below: float | None = None,
    stream: str = "primary",
    min_events: int = 0,
    skip_motors: tuple[Any, ...] = (),
    on_good: Callable[[], Plan] | None = None,
    stop: bool = True,
    report: dict[str, Any] | None = None,
) -> Plan:
    """Run a scan plan until the denoised image is good enough, then stop or adapt.

    Before every event of ``stream`` (every projection) the plan reads
    ``quality``; once alpha is at most ``alpha_below`` (and/or the estimated
    error of the denoised image at most ``sigma_below``), it

    - runs ``on_good()`` once, if given (e.g. move the slice, change the
      exposure: the closed loop of Graas et al. 2023), and
    - with ``stop=True`` skips the remaining events of ``stream`` and the
      moves of ``skip_motors`` (the rotation): the rest of the plan (e.g.
      flats at the end, closing the shutter) still runs and the run ends
      with exit status "success", fewer projections than planned (the early
      stopping of Liu et al. 2019).

    Parameters
    ----------
    plan : generator
        The scan, e.g. ``tomo_continuous(...)``.
    quality : QualitySignals
        Published by the learning stage.
    alpha_below, sigma_below : float, optional
        Thresholds; at least one.
    stream : str
        The stream of projections.
    min_events : int
        Take at least this many events before checking.
    skip_motors : tuple
        Motors whose moves are skipped once stopped (the rotation stage).
    on_good : callable returning a plan, optional
    stop : bool
    report : dict, optional
        Filled with ``events`` (taken), ``good_at`` (events taken when the
        threshold was met, or None), ``skipped`` (events skipped) and
        ``alpha`` (the value that met it).

    Returns
    -------
    The wrapped plan's return value.
    """
    if alpha_below is None and sigma_below is None:
        raise ConfigError("until_quality needs alpha_below and/or sigma_below.")
    check_int("until_quality", "min_events", min_events, 0)
    state: dict[str, Any] = report if report is not None else {}
    state.update(events=0, good_at=None, skipped=0, alpha=math.nan)
    flags = {"good": False, "skipping": False}
    skip_ids = {id(m) for m in skip_motors}

    def null() -> Plan:
        return (yield Msg("null"))

    def check_then(msg: Msg) -> Plan:
        if state["events"] >= min_events:
            alpha = yield from bps.rd(quality.alpha, default_value=math.nan)
            sigma = yield from bps.rd(quality.sigma_denoised, default_value=math.nan)
            alpha = math.nan if alpha is None else float(alpha)
            sigma = math.nan if sigma is None else float(sigma)
            if good_enough(alpha, sigma, alpha_below=alpha_below, sigma_below=sigma_below):
                flags["good"] = True
                state["good_at"], state["alpha"] = state["events"], alpha
                if on_good is not None:
                    yield from on_good()
                if stop:
                    flags["skipping"] = True
                    state["skipped"] += 1
                    return (yield Msg("null"))
        state["events"] += 1
        return (yield msg)

    def process(msg: Msg):
        if msg.command == "null":  # our own placeholders (plan_mutator shows them to us too)
            return None, None
        if flags["skipping"]:  # inside a skipped event: drop everything up to its save
            if msg.command == "save":
                flags["skipping"] = False
            return null(), None
        is_event = msg.command == "create" and msg.kwargs.get("name") == stream
        if flags["good"] and stop:
            if is_event:
                flags["skipping"] = True
                state["skipped"] += 1
                return null(), None
            if msg.command == "set" and id(msg.obj) in skip_ids:
                return null(), None
            return None, None
        if is_event and not flags["good"]:
            return check_then(msg), None
        if is_event:
            state["events"] += 1
        return None, None

    return (yield from bpp.plan_mutator(plan, process))
