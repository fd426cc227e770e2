"""A pre-training method defined outside micl, as a user would: one class and its Args. The
pipeline imports this module on the driver and the workers through `run.import_modules`
(tests/test_objectives.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from micl.config import Config
from micl.data.masking import ViewPairMasks
from micl.data.stream import StreamSpec
from micl.objectives import MethodArgs, Objective, method_error, register
from micl.objectives.losses import info_nce


@dataclass
class ToyArgs(MethodArgs):
    mask_ratio: float = 0.5
    logit_scale: float = 10.0  # this method's own field: cosine logits times this
    # A fault a test plans: the first process to reach this optimizer step raises there, and
    # creates the marker file, so that the run's next attempt (a restart) goes past it.
    fail_at_step: int = 0  # 0: never
    fail_marker: str = ""

    def check(self, cfg: Config) -> None:
        if not isinstance(self.logit_scale, int | float) or not self.logit_scale > 0:
            raise method_error("logit_scale", self.logit_scale, "must be > 0")


@register("toy_views")
class ToyViews(Objective):
    """A method defined outside micl (one class + its Args): InfoNCE between two disjoint
    views; `after_step` counts optimizer steps in a buffer (where a momentum teacher would
    update), so the test can see the hook ran once per step, and raises once where a test
    plans a failure (`fail_at_step`)."""

    Args = ToyArgs

    def __init__(self, cfg: Config, args: ToyArgs) -> None:
        super().__init__(cfg, args)
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))

    @classmethod
    def stream_spec(cls, cfg: Config, args: ToyArgs) -> StreamSpec:
        return StreamSpec(masks=(ViewPairMasks(cfg.model.num_patches, args.mask_ratio),))

    def forward(self, batch):
        z1, z2 = self.encoder.forward_views(batch["image"], [batch["view1"], batch["view2"]])
        loss = info_nce(z1, z2, 1 / self.args.logit_scale)
        return loss, {"loss_toy": loss.detach()}

    def after_step(self, step: int, total_steps: int) -> None:
        self.steps_seen += 1
        marker = Path(self.args.fail_marker)
        if step == self.args.fail_at_step and not marker.exists():
            marker.touch()
            raise RuntimeError(f"toy_views: the planned failure at step {step}")


