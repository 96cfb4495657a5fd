"""What a training run is told: :class:`TrainConfig` (defaults for training from scratch), the fine-tuning defaults, and
the progress events it reports."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..metrics import Scores
from ..params import FINETUNE_DEFAULTS, TrainConfig, finetune_config

__all__ = ["FINETUNE_DEFAULTS", "TrainConfig", "TrainEvent", "finetune_config"]


@dataclass
class TrainEvent:
    """Progress report: ``kind`` is 'start' (the starting model validated, before training), 'iteration',
    'epoch' (with validation), 'calibrating' (after the last epoch) or 'done'."""

    kind: str
    epoch: int
    iteration: int
    total_iterations: int
    loss: float
    elapsed: float
    device: str
    scores: Scores | None = None
    best_score: float | None = None
    improved: bool = False
    cancelled: bool = False
    saved: bool = True  # False: cancelled with nothing worth keeping, so no model was saved
    # The starting model's selection score on the validation images (None: nothing validated).
    start_score: float | None = None
    history: list[dict] = field(default_factory=list)

    def gain(self) -> tuple[str, bool | None]:
        """What validation said of a finished run, and whether it beat the starting model (None: not measured).

        The one rule for using a fine-tuned model: only when it validates better than where it started
        (the CLI says so, the Fine-tune widget switches to it), else the user's call with both numbers seen.
        """
        if self.start_score is None or self.best_score is None:
            return "the gain is unmeasured (no held-out images to validate on: correct more images to measure it)", None
        scores = f"validation score {self.best_score:.3f} against {self.start_score:.3f} for the starting model"
        better = self.best_score > self.start_score
        return (f"better: {scores}" if better else f"no better: {scores}"), better
