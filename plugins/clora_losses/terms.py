"""The built-in loss terms (imported when the hook runs, so loading the plugin stays cheap)."""

from __future__ import annotations

import torch

from clora.contracts import LossTerm
from clora.distill.losses import LossContext, anchor_on, dmd_on, flow_matching_loss, per_sample, row_mse
from clora.sampling import add_noise, level_at, renoise_rollout


class DMDTerm(LossTerm):
    """Distribution matching on the student's own sample: teacher with CFG vs critic."""

    loss_id = "dmd"
    role = "generator"

    def __call__(self, ctx: LossContext) -> dict[str, torch.Tensor]:
        return {"dmd": dmd_on(ctx, ctx.student_sample, ctx.dmd_levels())}


class TargetSimulationTerm(LossTerm):
    """Fine: noise the teacher output to a late level, one student step, then DMD on that step."""

    loss_id = "target_sim"
    role = "generator"

    def __call__(self, ctx: LossContext) -> dict[str, torch.Tensor]:
        if ctx.targets is None:
            return {}
        s = ctx.sampler_levels(ctx.config.on_policy.target_levels)
        noisy = add_noise(ctx.targets, ctx.randn_like(ctx.targets), s)
        x0 = ctx.student_x0(noisy, s)
        return {"target_sim": dmd_on(ctx, x0, ctx.shifted(0.5, 1.0))}


class AnchorTerm(LossTerm):
    """Coarse: flow-matching regression of the student onto the teacher output at levels >= the DMD level."""

    loss_id = "anchor"
    role = "generator"
    off_policy = True  # needs only the teacher targets: it also trains in the anchoring phase

    def __call__(self, ctx: LossContext) -> dict[str, torch.Tensor]:
        if ctx.targets is None:
            return {}
        t = ctx.dmd_levels()
        return {"anchor": anchor_on(ctx, t + (1 - t) * ctx.uniform())}


class LevelAnchorTerm(LossTerm):
    """Flow-matching regression of the student onto the teacher output at the few-step sampler's own
    levels: the inputs its sampler will see (the default generator term; see DistillConfig.losses)."""

    loss_id = "level_anchor"
    role = "generator"
    off_policy = True

    def __call__(self, ctx: LossContext) -> dict[str, torch.Tensor]:
        if ctx.targets is None:
            return {}
        return {"level_anchor": anchor_on(ctx, ctx.sampler_levels())}


class SimulatedAnchorTerm(LossTerm):
    """Regression onto the teacher output at a few-step level whose input the student's own sampler
    made: the sampler runs from noise without grad to a random level, and the student's step there is
    regressed onto the target (level_anchor builds every level's input from the target instead)."""

    loss_id = "sim_anchor"
    role = "generator"
    off_policy = True  # simulates with the student itself; no teacher or critic call

    def __call__(self, ctx: LossContext) -> dict[str, torch.Tensor]:
        if ctx.targets is None:
            return {}
        levels, b = ctx.few_step_sigmas.to(ctx.targets), ctx.batch_size
        k = int(torch.randint(levels.shape[-1], (1,), generator=ctx.generator))
        x = ctx.sampler_noise_like(ctx.targets)
        with torch.no_grad():
            x = renoise_rollout(
                lambda noisy, s: ctx.student_x0(noisy, s.expand(b)), x, levels, k, ctx.sampler_noise_like
            )
        s = level_at(levels, k).expand(b)
        v = ctx.student_velocity(x, s)
        # the velocity that lands exactly on the target from this input: (x_t - y_T) / s
        return {"sim_anchor": ctx.reduce_rows(row_mse(v, (x - ctx.targets) / per_sample(s, x)))}


class CriticFlowMatchingTerm(LossTerm):
    """The critic tracks the student's output distribution: flow matching on fresh student samples."""

    loss_id = "critic_fm"
    role = "critic"

    def __call__(self, ctx: LossContext) -> dict[str, torch.Tensor]:
        x0 = ctx.student_sample.detach()
        s = ctx.shifted()
        noise = ctx.randn_like(x0)
        v = ctx.critic_velocity(add_noise(x0, noise, s), s)
        return {"critic_fm": flow_matching_loss(v, x0, noise)}
