"""The one progress event the engine emits (training, cross-validation, prediction,
make-data), and the callback type that receives it. The CLI renders events live; the Python API
passes them to the user's optional callback; nothing in the engine prints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:  # only for annotations: the records live with the code that makes them
    from omnifuse_cli.engine.cv import FoldResult
    from omnifuse_cli.engine.fitting import EpochRecord

# message: a line for the user (text); warning: a line the user must not miss (text: a result
# is weaker than asked, e.g. random image weights where ImageNet ones were wanted); encode:
# frozen-backbone features done/total; batch: training batches done/total in this epoch; epoch:
# an epoch finished (record); fold: a cv fold starts (text names it); fold-done: a cv fold
# finished (fold); refit: cv's or tune's final model (text); score: patients scored done/total
# (predict, evaluate); write: patients written done/total (make-data); trial: a tune trial
# starts (done = its number, text its parameters); trial-done: it ended (trial).
EventKind = Literal[
    "message",
    "warning",
    "encode",
    "batch",
    "epoch",
    "fold",
    "fold-done",
    "refit",
    "score",
    "write",
    "trial",
    "trial-done",
]
EVENT_KINDS: tuple[str, ...] = get_args(EventKind)


@dataclass(frozen=True)
class TrialSummary:
    """A tune trial that ended: state COMPLETE, PRUNED or FAIL; value NaN when none."""

    number: int
    state: str
    value: float
    params: dict[str, Any]
    seconds: float


@dataclass(frozen=True)
class ProgressEvent:
    kind: EventKind
    done: int = 0
    total: int = 0
    text: str = ""
    record: EpochRecord | None = None
    fold: FoldResult | None = None
    trial: TrialSummary | None = None

    def __post_init__(self) -> None:
        if self.kind not in EVENT_KINDS:
            raise ValueError(f"unknown progress event kind {self.kind!r}")


EventFn = Callable[[ProgressEvent], None]


def ignore(_: ProgressEvent) -> None:
    """The callback when nobody listens."""
