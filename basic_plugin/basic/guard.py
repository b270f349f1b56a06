"""BASIC's guard: one clear line (or a stop) when, over a window of logging steps, the image
tokens collapse or BASIC's terms out-weigh the language-model loss.

Thresholds (flags; docs/RESULTS.md, "The guard's thresholds", says where they come from):
- collapse: the mean pairwise cosine of the projector's image tokens (``basic_v_pairwise_cos``)
  above ``--basic_guard_collapse`` (0.9; in the 200-step grid's runs the largest 5-step mean was
  0.80, a dropped-channel run's, the baselines' up to 0.74);
- dominance: BASIC's share of the loss (``basic_share``) above ``--basic_guard_share`` (0.75: the
  terms weigh three times the caption loss). At the paper's weights the share passes 0.5 late in
  every run of the grid (largest 5-step means 0.51-0.59) while those runs beat the baseline on
  test: as the caption loss falls, the direction term's 1 - cos stays near 0.4, so a share of one
  half is the paper's setting working, not a failure.
Both sit above every run of the grid: the guard catches gross failures (a collapse, terms that
swamp the caption loss); a slow loss of accuracy shows only against a monitor-only run.
"""
from __future__ import annotations

from collections import deque
from typing import Mapping, Optional

from basic_plugin.api import Verdict
from basic_plugin.basic.arguments import flag_default


class Guard:
    """Keeps the last ``window`` logged values and judges their means."""

    def __init__(self, mode: str = flag_default("basic_guard"), window: int = flag_default("basic_guard_window"),
                 collapse: float = flag_default("basic_guard_collapse"), share: float = flag_default("basic_guard_share")):
        self.mode, self.window, self.collapse, self.share = mode, window, collapse, share
        self.history: deque = deque(maxlen=window)
        self.quiet_until = 0  # logging steps: one line per window while a problem lasts
        self.seen = 0

    @classmethod
    def from_flags(cls, flags) -> "Guard":
        """The guard ``--basic_guard*`` ask for."""
        return cls(mode=flags.basic_guard, window=flags.basic_guard_window, collapse=flags.basic_guard_collapse,
                   share=flags.basic_guard_share)

    def review(self, logged: Mapping[str, float]) -> Optional[Verdict]:
        if self.mode == "off" or "basic_share" not in logged:
            return None
        self.seen += 1
        self.history.append((logged.get("basic_v_pairwise_cos", 0.0), logged["basic_share"]))
        if len(self.history) < self.window or self.seen < self.quiet_until:
            return None
        cos = sum(h[0] for h in self.history) / len(self.history)
        share = sum(h[1] for h in self.history) / len(self.history)
        problems = []
        if cos > self.collapse:
            problems.append(f"image tokens collapse (mean pairwise cosine {cos:.3f} > --basic_guard_collapse "
                            f"{self.collapse}; lower --basic_lambda_das or raise --basic_depth)")
        if share > self.share:
            problems.append(f"BASIC's terms out-weigh the caption loss (share {share:.2f} of the loss > "
                            f"--basic_guard_share {self.share}; lower --basic_lambda_das / --basic_lambda_sds)")
        if not problems:
            return None
        self.quiet_until = self.seen + self.window
        what = "; ".join(problems)
        return Verdict(f"BASIC guard, last {self.window} logging steps: {what} "
                       f"(--basic_guard {self.mode}{'' if self.mode == 'stop' else '; stop to end the run'})",
                       stop=self.mode == "stop")
