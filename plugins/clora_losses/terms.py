"""The built-in loss terms (imported when the hook runs, so loading the plugin stays cheap)."""

from __future__ import annotations

import torch

from clora.distill.losses import LossContext, anchor_on, dmd_on, flow_matching_loss
from clora.sampling import add_noise


class DMDTerm:
    """Distribution matching on the student's own sample: teacher with CFG vs critic."""

    loss_id = "dmd"
    role = "generator"

    def __call__(self, ctx: LossContext) -> dict[str, torch.Tensor]:
        return {"dmd": dmd_on(ctx, ctx.student_sample, ctx.dmd_levels())}


class TargetSimulationTerm:
    """Fine: noise the teacher output to a late level, one student step, then DMD on that step."""

    loss_id = "target_sim"
    role = "generator"

    def __call__(self, ctx: LossContext) -> dict[str, torch.Tensor]:
        if ctx.targets is None:
            return {}
        s = ctx.sampler_levels(ctx.config.target_levels)
        noisy = add_noise(ctx.targets, ctx.randn_like(ctx.targets), s)
        x0 = ctx.student_x0(noisy, s)
        return {"target_sim": dmd_on(ctx, x0, ctx.shifted(0.5, 1.0))}


class AnchorTerm:
    """Coarse: flow-matching regression of the student onto the teacher output at levels >= the DMD level."""

    loss_id = "anchor"
    role = "generator"
    off_policy = True  # needs only the teacher targets: it also trains in the anchoring phase

    def __call__(self, ctx: LossContext) -> dict[str, torch.Tensor]:
        if ctx.targets is None:
            return {}
        t = ctx.dmd_levels()
        return {"anchor": anchor_on(ctx, t + (1 - t) * ctx.uniform())}


class LevelAnchorTerm:
    """Flow-matching regression of the student onto the teacher output at the few-step sampler's own
    levels: the inputs its sampler will see (the default generator term; see DistillConfig.losses)."""

    loss_id = "level_anchor"
    role = "generator"
    off_policy = True

    def __call__(self, ctx: LossContext) -> dict[str, torch.Tensor]:
        if ctx.targets is None:
            return {}
        return {"level_anchor": anchor_on(ctx, ctx.sampler_levels())}


class CriticFlowMatchingTerm:
    """The critic tracks the student's output distribution: flow matching on fresh student samples."""

    loss_id = "critic_fm"
    role = "critic"

    def __call__(self, ctx: LossContext) -> dict[str, torch.Tensor]:
        x0 = ctx.student_sample.detach()
        s = ctx.shifted()
        noise = ctx.randn_like(x0)
        v = ctx.critic_velocity(add_noise(x0, noise, s), s)
        return {"critic_fm": flow_matching_loss(v, x0, noise)}
