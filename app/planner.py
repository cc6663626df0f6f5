"""How each task group of a batch runs, priced with costs measured on this device at warm-up.

Three forms, all exact (they differ only by rounding):

- merged: the task's folded weights from the cache through one plain timm forward. Only for a
  batch that is ONE cached task: then it is the plain model's speed, nothing added.
- segmented: every such group in ONE pass of `MultiTaskViT(mode="segmented")`: attention, norms
  and GELU once over the whole batch, each rescaled linear one matmul per group with that task's
  W ⊙ (1 + l cᵀ) (cached, or folded just in time into a reused buffer: `segment` seconds per
  group; ~0 on CUDA, where the Triton kernel folds in registers).
- unmerged: rows in one pass of the two-matmul form (no fold at all, ~2x the FLOPs per row); rows
  of tasks without a two-sided l cᵀ term (LoRA, BitFit, IA³: its l cᵀ varies on one side only, a
  per-row scale of the output or the input) share one base GEMM plus per-segment low-rank
  shrink/expand (Punica / S-LoRA), priced at `plain_row` while no rescaling task is in the pass.

`Settings.strategy` forces one form for every group (`merged` then folds every task into the
cache, as the server did before segments existed). The numbers behind the rule: bench/README.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Form = Literal["merged", "segmented", "unmerged"]
FORMS: tuple[Form, ...] = ("merged", "segmented", "unmerged")


@dataclass
class Costs:
    """Seconds a plan is priced with; `Engine.warm_up` measures them on the serving device.

    The defaults are priors from ViT-S/16 on 2 CPU cores (bench/README.md), used only until the
    warm-up has measured this backbone on this device.

    Attributes:
        merged_row: Plain forward of folded weights, per image.
        merged_call: Plain forward, fixed cost per call.
        segmented_row: Segmented forward, per image.
        segmented_call: Segmented forward, fixed cost per call (one per batch).
        segment: What one more task group adds to a segmented pass (its just-in-time fold, split matmuls).
        unmerged_row: Two-matmul forward, per image.
        unmerged_call: Two-matmul forward, fixed cost per call.
        plain_row: Unmerged forward of a task with no l cᵀ term (one GEMM + shrink/expand), per image.
        fold: Folding one task into the cache (a whole backbone's weights).
    """

    merged_row: float = 0.05
    merged_call: float = 0.002
    segmented_row: float = 0.052
    segmented_call: float = 0.002
    segment: float = 0.003
    unmerged_row: float = 0.1
    unmerged_call: float = 0.002
    plain_row: float = 0.055
    fold: float = 0.05


class Planner:
    """Chooses a form per task group of a batch.

    Args:
        strategy: `auto`, or one form forced for every group.
        costs: What the `auto` rule prices plans with (updated in place by the engine).
    """

    def __init__(self, strategy: str, costs: Costs | None = None) -> None:
        if strategy != "auto" and strategy not in FORMS:
            raise ValueError(f"strategy must be auto or one of {FORMS}, not {strategy!r}")
        self.strategy = strategy
        self.costs = costs or Costs()

    def plan(self, counts: dict[str, int], cached: set[str], force: Form | None = None,
             plain: set[str] | frozenset[str] = frozenset()) -> dict[str, Form]:
        """The form each task group runs in.

        Args:
            counts: Task key -> rows of the batch with that task.
            cached: Keys whose folded weights are in the cache now.
            force: A form for every group (overrides the strategy).
            plain: Keys whose tasks have no l cᵀ term (their unmerged rows need no second GEMM).
        """
        force = force or (None if self.strategy == "auto" else self.strategy)  # type: ignore[assignment]
        if force is not None:
            return dict.fromkeys(counts, force)
        if len(counts) == 1 and set(counts) <= cached:
            return dict.fromkeys(counts, "merged")  # one cached task: exactly the plain model's forward
        c = self.costs
        # Per group: segmented costs its rows plus a just-in-time fold unless cached; unmerged costs
        # its rows at the two-matmul price. Compare all-segmented, all-unmerged and the per-group
        # cheaper choice, each with its passes' fixed costs; ties go to segmented.
        row = {k: c.plain_row if k in plain else c.unmerged_row for k in counts}
        greedy: dict[str, Form] = {
            k: "unmerged" if n * row[k] < n * c.segmented_row + self._segment(k, cached) else "segmented"
            for k, n in counts.items()}
        plans = [dict.fromkeys(counts, "segmented"), greedy, dict.fromkeys(counts, "unmerged")]
        return min(plans, key=lambda p: self.cost(p, counts, cached, plain))

    def cost(self, plan: dict[str, Form], counts: dict[str, int], cached: set[str],
             plain: set[str] | frozenset[str] = frozenset()) -> float:
        """Predicted seconds of a plan.

        Args:
            plan: Task key -> form.
            counts: Task key -> rows.
            cached: Keys whose folded weights are cached.
            plain: Keys whose tasks have no l cᵀ term.
        """
        c, total = self.costs, 0.0
        seg = [k for k, f in plan.items() if f == "segmented"]
        unm = [k for k, f in plan.items() if f == "unmerged"]
        for k, f in plan.items():
            if f == "merged":
                total += c.merged_call + counts[k] * c.merged_row + (0.0 if k in cached else c.fold)
        if seg:
            total += c.segmented_call + sum(counts[k] * c.segmented_row + self._segment(k, cached) for k in seg)
        if unm:  # one rescaling task makes the pass compute the second GEMM for all its rows
            row = c.plain_row if set(unm) <= set(plain) else c.unmerged_row
            total += c.unmerged_call + sum(counts[k] for k in unm) * row
        return total

    def _segment(self, key: str, cached: set[str]) -> float:
        return 0.0 if key in cached else self.costs.segment
