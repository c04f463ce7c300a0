"""What a trained model's probabilities become before anyone reads them.

After the best epoch (and the linear path) is restored, three things are fitted on the
validation split and stored in the bundle (bundle.json, key ``posthoc``): one temperature that
rescales the log-probabilities (--calibrate temperature, fitted by log loss), the operating
point of the positive class (--positive-class, --threshold), and the validation patients'
conformal scores (for predict --conformal). ``evaluate``, ``predict`` and ``cv`` apply them
through PostHoc; a bundle written before they existed loads as temperature 1, no threshold, no
conformal scores, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from omnifuse_cli.config import TrainConfig, parse_class_weight
from omnifuse_cli.engine.calibration import apply_temperature, fit_temperature
from omnifuse_cli.engine.conformal import ConformalCalibration
from omnifuse_cli.engine.metrics import metric_value
from omnifuse_cli.engine.thresholds import choose_threshold, parse_threshold_rule
from omnifuse_cli.errors import ConfigError

MIN_CALIBRATION_PATIENTS = 30  # fewer validation patients: no temperature (a note says so)
KEY = "posthoc"
PENDING = {"pending": True}  # saved with each best epoch until training finishes


@dataclass(frozen=True)
class PostHoc:
    """The fitted post-processing of one model (identity when nothing was fitted)."""

    temperature: float = 1.0
    calibration: str = "none"  # temperature | none
    positive: int | None = None  # the positive class's index (binary, or one-vs-rest)
    threshold: float | None = None  # positive when its probability >= threshold
    rule: str | None = None  # --threshold as given (youden, sens=0.9, ...)
    target_met: bool = True  # False: no validation threshold reached the rule's target
    conformal: ConformalCalibration | None = None
    validation_patients: int = 0
    notes: tuple[str, ...] = ()
    legacy: bool = False  # the bundle predates post-hoc fitting
    val_loss_before: float | None = None
    val_loss_after: float | None = None

    # -- applying ------------------------------------------------------------------------------
    def calibrate(self, log_probs: np.ndarray) -> np.ndarray:
        """Calibrated log-probabilities in float64 (renormalised: float32 model outputs sum to
        1 only within 1e-7, which scikit-learn's probability checks reject)."""
        return apply_temperature(np.asarray(log_probs, dtype=np.float64), self.temperature)

    def probabilities(self, log_probs: np.ndarray) -> np.ndarray:
        return np.exp(self.calibrate(log_probs))

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """The predicted class: the positive class when its probability reaches the threshold,
        else the most probable other class; the most probable class without a threshold."""
        pred = probs.argmax(axis=1)
        if self.threshold is None or self.positive is None:
            return pred
        others = probs.copy()
        others[:, self.positive] = -np.inf
        return np.where(
            probs[:, self.positive] >= self.threshold, self.positive, others.argmax(axis=1)
        )

    def describe(self) -> list[str]:
        """One line per fitted piece, for the CLI and the report."""
        if self.legacy:
            return [
                "this run was trained before calibration and operating points: temperature "
                "1 (uncalibrated), most probable class, no conformal sets"
            ]
        lines = list(self.notes)
        if self.calibration == "temperature":
            lines.append(
                f"temperature {self.temperature:.3f} fitted on "
                f"{self.validation_patients} validation patients (log loss "
                f"{self.val_loss_before:.4f} -> {self.val_loss_after:.4f})"
            )
        if self.threshold is not None:
            met = "" if self.target_met else " (target not reached on validation)"
            lines.append(
                f"operating point: class {self.positive} positive at probability >= "
                f"{self.threshold:.4f} ({self.rule} on validation){met}"
            )
        return lines

    # -- storing -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "calibration": self.calibration,
            "positive": self.positive,
            "threshold": self.threshold,
            "rule": self.rule,
            "target_met": self.target_met,
            "validation_patients": self.validation_patients,
            "notes": list(self.notes),
            "val_loss_before": self.val_loss_before,
            "val_loss_after": self.val_loss_after,
            "conformal": None if self.conformal is None else self.conformal.to_dict(),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> PostHoc:
        if not raw:
            return cls(legacy=True)
        if raw.get("pending"):
            return cls(
                notes=(
                    "training did not finish: the probabilities are not calibrated "
                    "and there is no operating point",
                )
            )
        conformal = raw.get("conformal")
        return cls(
            temperature=float(raw.get("temperature", 1.0)),
            calibration=str(raw.get("calibration", "none")),
            positive=None if raw.get("positive") is None else int(raw["positive"]),
            threshold=None if raw.get("threshold") is None else float(raw["threshold"]),
            rule=raw.get("rule"),
            target_met=bool(raw.get("target_met", True)),
            conformal=None if not conformal else ConformalCalibration.from_dict(conformal),
            validation_patients=int(raw.get("validation_patients", 0)),
            notes=tuple(raw.get("notes", ())),
            val_loss_before=raw.get("val_loss_before"),
            val_loss_after=raw.get("val_loss_after"),
        )

    @classmethod
    def from_bundle(cls, meta: dict[str, Any]) -> PostHoc:
        return cls.from_dict(meta.get(KEY))


def positive_index(cfg: TrainConfig, class_names: list[str]) -> int | None:
    """The class --positive-class names (binary tasks: the second class by default)."""
    if cfg.positive_class is None:
        return 1 if len(class_names) == 2 else None
    if cfg.positive_class not in class_names:
        raise ConfigError(
            f"--positive-class {cfg.positive_class!r} is not a class of this task",
            hint=f"the classes are {', '.join(class_names)}",
        )
    return class_names.index(cfg.positive_class)


def fit_posthoc(
    log_probs: np.ndarray, y: np.ndarray, cfg: TrainConfig, class_names: list[str]
) -> PostHoc:
    """Temperature, operating point and conformal scores from the validation patients'
    log-probabilities (after the best epoch and the linear path)."""
    num_classes = len(class_names)
    log_probs = np.asarray(log_probs, dtype=np.float64)
    notes: list[str] = []
    n = len(y)
    temperature, calibration = 1.0, "none"
    before = after = None
    if cfg.calibrate == "temperature":
        if n < MIN_CALIBRATION_PATIENTS or len(np.unique(y)) < 2:
            notes.append(
                f"not calibrated: the validation split has {n} patient(s) "
                f"(temperature scaling needs {MIN_CALIBRATION_PATIENTS} and two classes)"
            )
        else:
            temperature, calibration = fit_temperature(log_probs, y), "temperature"
    log_probs = apply_temperature(log_probs, 1.0)  # renormalised in float64
    calibrated = apply_temperature(log_probs, temperature)
    if n:
        before = metric_value("loss", y, np.exp(log_probs), num_classes)
        after = metric_value("loss", y, np.exp(calibrated), num_classes)
    probs = np.exp(calibrated)
    positive = positive_index(cfg, class_names)
    threshold, rule, met = None, None, True
    if positive is not None:
        y_pos = y == positive
        if y_pos.all() or not y_pos.any():
            notes.append(
                f"no operating point: the validation split lacks "
                f"{'negatives' if y_pos.all() else 'positives'} of class {positive}"
            )
        else:
            parsed = parse_threshold_rule(cfg.threshold)
            threshold, met = choose_threshold(y_pos, probs[:, positive], parsed)
            rule = str(parsed)
            if not met:
                notes.append(
                    f"--threshold {rule}: no threshold reaches the target on the "
                    f"validation split; the closest ({threshold:.4f}) is used"
                )
    conformal = ConformalCalibration.from_validation(y, probs, num_classes) if n else None
    return PostHoc(
        temperature=float(temperature),
        calibration=calibration,
        positive=positive,
        threshold=None if threshold is None else float(threshold),
        rule=rule,
        target_met=bool(met),
        conformal=conformal,
        validation_patients=n,
        notes=tuple(notes),
        val_loss_before=before,
        val_loss_after=after,
    )


def class_weights(spec: str, labels: np.ndarray, num_classes: int) -> np.ndarray | None:
    """--class-weight as one weight per class, scaled so the average training patient weighs 1
    (None: every patient 1). balanced: n / (C n_c), scikit-learn's rule."""
    parsed = parse_class_weight(spec, num_classes)
    if parsed is None:
        return None
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    if parsed == "balanced":
        present = np.flatnonzero(counts)
        weights = np.ones(num_classes)
        weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    else:
        weights = np.asarray(parsed, dtype=np.float64)
    mean = float((weights * counts).sum() / max(counts.sum(), 1.0))
    return weights / mean
