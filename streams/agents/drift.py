"""drift: watches the population posterior of every measure.

The population agent compares each new posterior with its detector's reference
(monitoring.drift.PosteriorShiftDetector: KL divergence of q(θ), shift of the
population effect in posterior-sd units) and its recent-window fit with the
all-time fit (WindowShiftDetector), and records the verdict in the message.
This agent, one owner per partition of the compacted
population-posterior topic, exports those statistics as metrics and turns a
detected drift into an alert on the alerts topic (keyed by measure). Workers
republish every score when a posterior says ``rescore`` (streams.app).
Prior-data conflict alerts (``conflict_alert``) are raised by the patients
agent, which sees the readings.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import faust
from pydantic import ValidationError

from monitoring.drift import PriorDataConflictDetector
from streams.schemas import Alert, PopulationPosterior, json_bytes
from streams.telemetry import Telemetry
from streams.topics import Topics

log = logging.getLogger(__name__)


def drift_alert(message: PopulationPosterior) -> Alert | None:
    """The alert a posterior calls for, or None. Its event id is a function of
    the posterior version, so a replay republishes the same alert."""
    if not message.drift_detected:
        return None
    effect = message.summary.get("effect")
    where = (
        f" (now {effect.mean:.3g}, 90% {effect.lower:.3g} to {effect.upper:.3g})" if effect else ""
    )
    reasons = []
    if "posterior_shift" in message.drift_kinds or not message.drift_kinds:
        reasons.append(
            f"effect moved {message.drift.get('shift', 0.0):+.2f} posterior sd, "
            f"KL {message.drift.get('kl', 0.0):.2f}"
        )
    if "window_shift" in message.drift_kinds:
        reasons.append(
            f"recent-window effect {message.drift.get('recent_effect_mean', 0.0):.3g} is "
            f"{message.drift.get('window_shift', 0.0):+.2f} combined sd from the all-time fit"
        )
    return Alert(
        event_id=f"drift:{message.measure}:{message.version}",
        event_time=message.event_time,
        kind="drift",
        severity="warning",
        measure=message.measure,
        message=(f"population posterior of {message.measure} drifted: {'; '.join(reasons)}{where}"),
        population_version=message.version,
        statistics=dict(message.drift),
    )


def conflict_alert(
    measure: str, detector: PriorDataConflictDetector, population_version: int, origin: str
) -> Alert:
    """The alert of a prior-data conflict detection: this worker's readings of
    ``measure`` keep falling on one side of their posterior predictive.
    ``origin`` (topic:partition:offset of the reading that tipped the CUSUM)
    makes the event id unique and reproducible under a replay."""
    side = "above" if detector.direction > 0 else "below"
    return Alert(
        event_id=f"conflict:{measure}:{population_version}:{origin}",
        event_time=datetime.now(UTC),
        kind="prior_data_conflict",
        severity="warning",
        measure=measure,
        message=(
            f"readings of {measure} run {side} their posterior predictive under population "
            f"v{population_version}: CUSUM {detector.statistic:.1f} > {detector.threshold:g}"
        ),
        population_version=population_version,
        statistics={
            "cusum": detector.statistic,
            "direction": float(detector.direction),
            "threshold": detector.threshold,
        },
    )


def register(app: faust.App, topics: Topics, telemetry: Telemetry) -> None:
    async def drift(stream: faust.StreamT) -> None:
        async for value in stream:
            try:
                message = PopulationPosterior.model_validate_json(value)
            except ValidationError as error:
                log.warning("drift: ignoring an invalid population posterior: %s", error)
                continue
            telemetry.drift(message)
            alert = drift_alert(message)
            if alert is not None:
                log.warning("%s", alert.message)
                await topics.alerts.send(key=message.measure.encode(), value=json_bytes(alert))

    app.agent(topics.population_posterior, name="drift")(drift)
