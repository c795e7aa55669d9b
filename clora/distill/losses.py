"""What a loss term sees (:class:`LossContext`) and the math the built-in terms share.

A loss term (registered through ``register_loss_terms``) has a ``loss_id``, a ``role``
(``"generator"`` or ``"critic"``) and is called with a :class:`LossContext`; it returns named
tensors (``dict[str, Tensor]``, empty when it does not apply to the batch). The loop weighs each
term by the config and logs every name as ``loss/<name>``. A generator term with ``off_policy =
True`` reads no student sample (only the teacher targets), so it also trains in the run's cheap
anchoring phase, on every row; there the other terms run only on the rows of the on-policy effects
(``on_policy.effects``), whose sample the loop simulates for them alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from clora.sampling import add_noise, shift_sigma

if TYPE_CHECKING:
    from clora.distill.config import DistillConfig

Role = Literal["generator", "critic"]


@dataclass
class LossContext:
    """One step's sample, batch and model calls, as the loss terms see them.

    ``sample`` is the student's x0 from backward simulation (with grad on generator turns); it is
    None in the anchoring phase, where every batch has ``targets``. The model calls take noisy
    latents and per-sample noise levels ``[B]``:

    * ``teacher_x0`` - the effect's teacher (or the base) with CFG, no grad;
    * ``critic_x0`` - the critic (fake score) on the student prompt, no grad;
    * ``student_x0`` / ``student_velocity`` - the student, with grad;
    * ``critic_velocity`` - the critic, with grad (critic turn).
    """

    sample: torch.Tensor | None
    stream: Literal["effect", "general"]
    targets: torch.Tensor | None  # teacher outputs y_T of the batch's sources (effect stream)
    #: the student's few-step levels: one set ``[L]``, or one per row ``[B, L]`` when some rows'
    #: effects have their own (``student.on_policy_shift``); see :func:`clora.sampling.level_at`
    few_step_sigmas: torch.Tensor
    config: DistillConfig
    generator: torch.Generator
    teacher_x0: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    critic_x0: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    student_x0: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    student_velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    critic_velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    #: the backbone's sampling noise (``Backbone.sampling_noise``), for terms that run the student's sampler
    sampling_noise: Callable[[torch.Size, torch.Generator], torch.Tensor]
    #: values terms share within a step (e.g. the DMD noise level, reused by anchoring)
    shared: dict[str, Any] = field(default_factory=dict)
    #: per-row weights of the regression terms (``effect_balance``), mean 1; None: all rows alike
    row_weights: torch.Tensor | None = None
    #: per-row values the regression terms reduced this step (detached), for the loop's running stats
    row_losses: list[torch.Tensor] = field(default_factory=list)

    @property
    def like(self) -> torch.Tensor:
        """A tensor with the batch's shape, device and dtype (the sample, else the targets)."""
        ref = self.sample if self.sample is not None else self.targets
        if ref is None:
            raise RuntimeError("a loss context needs a student sample or teacher targets")
        return ref

    @property
    def student_sample(self) -> torch.Tensor:
        """The simulated student sample; on-policy terms only."""
        if self.sample is None:
            raise RuntimeError("no student sample in the anchoring phase; only off_policy terms run there")
        return self.sample

    @property
    def batch_size(self) -> int:
        return int(self.like.shape[0])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape, generator=self.generator, dtype=torch.float32).to(x)

    def sampler_noise_like(self, x: torch.Tensor) -> torch.Tensor:
        """Noise like ``x`` as the student's few-step sampler draws it at inference."""
        return self.sampling_noise(x.shape, self.generator).to(x)

    def uniform(self, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        """Per-sample ``U[low, high]`` on the sample's device and dtype."""
        u = torch.rand(self.batch_size, generator=self.generator, dtype=torch.float32)
        return (low + (high - low) * u).to(self.like)

    def shifted(self, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        """Per-sample ``shift(U[low, high])`` noise levels, kept inside (0.02, 0.98)."""
        return shift_sigma(self.uniform(low, high), self.config.student.shift).clamp(0.02, 0.98)

    def sampler_levels(self, last: int | None = None) -> torch.Tensor:
        """Per-sample noise levels drawn from the few-step sampler's own (its ``last`` ones, or all;
        each row's own where the rows have their own level sets)."""
        levels = self.few_step_sigmas.to(self.like)
        levels = levels[..., -(last or levels.shape[-1]) :]
        pick = torch.randint(levels.shape[-1], (self.batch_size,), generator=self.generator).to(levels.device)
        if levels.ndim == 1:
            return levels[pick]
        return levels.gather(1, pick[:, None]).squeeze(1)

    def reduce_rows(self, per_row: torch.Tensor) -> torch.Tensor:
        """The batch mean of a regression term's per-row losses ``[B]``, weighted by ``row_weights``;
        the rows are also recorded (detached) in ``row_losses``."""
        self.row_losses.append(per_row.detach())
        if self.row_weights is None:
            return per_row.mean()
        return (per_row * self.row_weights.to(per_row)).mean()

    def dmd_levels(self) -> torch.Tensor:
        """This step's DMD noise levels ``t ~ shift(U[0,1])`` (drawn once, shared by the terms)."""
        if "dmd_t" not in self.shared:
            self.shared["dmd_t"] = self.shifted()
        return self.shared["dmd_t"]


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.ndim - 1)))


def dmd_gradient(x: torch.Tensor, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """``(fake - real) / mean|x - real|`` with the mean taken per sample (DMD's normaliser)."""
    norm = (x - real).abs().flatten(1).mean(1).clamp_min(1e-8)
    return (fake - real) / per_sample(norm, x)


def dmd_loss(x: torch.Tensor, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """``0.5 * mse(x, stopgrad(x - grad))``; its gradient w.r.t. ``x`` is the DMD gradient / numel."""
    grad = dmd_gradient(x.detach(), real, fake)
    return 0.5 * torch.nn.functional.mse_loss(x, (x - grad).detach())


def dmd_on(ctx: LossContext, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The DMD loss of sample ``x`` scored at noise levels ``t``: teacher (real) vs critic (fake)."""
    noisy = add_noise(x.detach(), ctx.randn_like(x), t)
    with torch.no_grad():
        real = ctx.teacher_x0(noisy, t)
        fake = ctx.critic_x0(noisy, t)
    return dmd_loss(x, real, fake)


def anchor_on(ctx: LossContext, s: torch.Tensor) -> torch.Tensor:
    """Flow matching of the student onto the teacher targets, noised to per-sample levels ``s``."""
    if ctx.targets is None:
        raise RuntimeError("anchoring needs teacher targets; check ctx.targets first")
    noise = ctx.randn_like(ctx.targets)
    v = ctx.student_velocity(add_noise(ctx.targets, noise, s), s)
    return ctx.reduce_rows(flow_matching_rows(v, ctx.targets, noise))


def row_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each row of a batch: ``[B]``."""
    return (a - b).pow(2).reshape(a.shape[0], -1).mean(1)


def flow_matching_rows(velocity: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``mse(v, eps - x0)`` of each row ``[B]``: the rectified-flow regression onto clean ``x0``."""
    return row_mse(velocity, noise - x0)


def flow_matching_loss(velocity: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The batch mean of :func:`flow_matching_rows`."""
    return flow_matching_rows(velocity, x0, noise).mean()
