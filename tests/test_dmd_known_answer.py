"""The on-policy (DMD) machinery where the answer is known: a 2-D mixture of Gaussians as the teacher.

Under clora's convention ``x_s = (1 - s) x0 + s eps`` the noisy marginal of a Gaussian mixture is again
one (component means scaled by ``1 - s``, variances ``(1 - s)^2 sd^2 + s^2``), so the teacher's x0
prediction ``E[x0 | x_s]`` is exact. Students are trained by the registered ``dmd`` term, critics by the
registered ``critic_fm`` term, both called through a real :class:`LossContext`; the one-step generator
is clora's ``x0_from_velocity`` at s = 1. Nothing of the method is copied here.

DMD and its critic carry free samples (one free output per draw) from N(0, I) onto the teacher, mode
weights included: the gradient's sign, its normaliser, the noise levels and the critic's regression are
right. A one-step MLP generator needs more (measured beside these tests): from a random start DMD drops
the 10% mode, even with an exact fake score; from the regression start it needs a critic that stays
ahead of the student (a critic that starts as the teacher, several critic updates per student update, a
student learning rate far below the critic's), and with the student faster than the critic the modes
spread and the run falls apart.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable

import pytest
import torch
from helpers import plugin_manager
from torch import nn

from clora.contracts import LossTerm
from clora.distill.config import DistillConfig
from clora.distill.losses import LossContext, flow_matching_loss
from clora.plugins import Components
from clora.sampling import sigma_schedule, x0_from_velocity

WEIGHTS = torch.tensor([0.6, 0.3, 0.1])
_ANGLES = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3])
MEANS = 1.5 * torch.stack([_ANGLES.cos(), _ANGLES.sin()], 1)  # 2.6 apart: 17 standard deviations
SD = 0.15
#: RBF bandwidth of the two-sample distance (fixed, between the modes' width and their distance)
BANDWIDTH = 0.5

Fn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---- the teacher: exact ------------------------------------------------------------------------


def teacher_draws(n: int, gen: torch.Generator) -> torch.Tensor:
    k = torch.multinomial(WEIGHTS, n, replacement=True, generator=gen)
    return MEANS[k] + SD * torch.randn(n, 2, generator=gen)


def teacher_x0(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``E[x0 | x_s]``: each component's posterior mean, weighted by its responsibility for ``x_s``."""
    s = s.reshape(-1, 1).to(x)
    var = (1 - s) ** 2 * SD**2 + s**2  # every component's variance at level s  [B, 1]
    centre = (1 - s)[:, :, None] * MEANS[None]  # [B, K, 2]
    resp = (WEIGHTS.log()[None] - 0.5 * ((x[:, None] - centre) ** 2).sum(-1) / var).softmax(-1)
    post = MEANS[None] + ((1 - s) * SD**2 / var)[:, :, None] * (x[:, None] - centre)
    return (resp[..., None] * post).sum(1)


def teacher_velocity(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``(x_s - x0) / s``, the velocity whose x0 is :func:`teacher_x0`."""
    return (x - teacher_x0(x, s)) / s.reshape(-1, 1).to(x)


def teacher_ode(noise: torch.Tensor, steps: int = 200) -> torch.Tensor:
    """The teacher's own sample for each noise: Euler on its exact ODE from s = 1 to 0."""
    sigmas = sigma_schedule(steps, 3.0)
    x = noise
    for s, s_next in itertools.pairwise(sigmas):
        x = x + (s_next - s) * teacher_velocity(x, s.expand(len(x)))
    return x


# ---- the student and the critic ----------------------------------------------------------------


class Velocity(nn.Module):
    """A small MLP ``(x, s) -> v``; ``zero`` starts it at 0."""

    def __init__(self, width: int = 128, zero: bool = False) -> None:
        super().__init__()
        out = nn.Linear(width, 2)
        if zero:
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)
        self.net = nn.Sequential(
            nn.Linear(5, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
            nn.Linear(width, width), nn.SiLU(), out,
        )  # fmt: skip

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        s = s.reshape(-1, 1).to(x).expand(len(x), 1)
        return self.net(torch.cat([x, s, (2 * math.pi * s).sin(), (2 * math.pi * s).cos()], 1))


class Critic(nn.Module):
    """The fake score: the teacher's velocity plus a learned correction that starts at 0, as a critic
    LoRA starts on the frozen model (DMD starts its fake score from the real one)."""

    def __init__(self) -> None:
        super().__init__()
        self.delta = Velocity(zero=True)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return teacher_velocity(x, s) + self.delta(x, s)


def one_step(student: nn.Module, noise: torch.Tensor) -> torch.Tensor:
    """The one-step generator: x0 of the student's velocity at s = 1, from pure noise."""
    one = torch.ones(len(noise))
    return x0_from_velocity(noise, student(noise, one), one)


def terms() -> tuple[LossTerm, LossTerm]:
    comps = Components.collect(plugin_manager())
    return comps.get_loss_term("dmd"), comps.get_loss_term("critic_fm")


def loss_context(sample: torch.Tensor, gen: torch.Generator, critic: nn.Module) -> LossContext:
    """A context whose teacher is exact and whose critic is ``critic``; the student's own calls are
    unused (the sample is given)."""

    def x0_of(velocity: Fn) -> Fn:
        return lambda noisy, s: x0_from_velocity(noisy, velocity(noisy, s), s)

    def unused(noisy: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the terms under test call no student model")

    return LossContext(
        sample=sample,
        stream="general",
        targets=None,
        few_step_sigmas=torch.ones(1),
        config=DistillConfig(),
        generator=gen,
        teacher_x0=teacher_x0,
        critic_x0=x0_of(critic),
        student_x0=unused,
        student_velocity=unused,
        critic_velocity=critic,
        sampling_noise=lambda shape, g: torch.randn(shape, generator=g),
    )


# ---- measures ----------------------------------------------------------------------------------


def mmd(x: torch.Tensor) -> float:
    """Squared kernel two-sample distance (RBF, fixed bandwidth) from the samples ``x`` to the teacher
    itself: the teacher's kernel means are exact for a Gaussian mixture, so only the samples add noise
    (unbiased: about 0 +- 1e-4 for 4000 teacher draws)."""
    h2, v2 = BANDWIDTH**2, SD**2
    kxx = torch.exp(-(torch.cdist(x, x) ** 2) / (2 * h2))
    n = len(x)
    xx = float((kxx.sum() - n) / (n * (n - 1)))
    # E_y k(x, y) for y ~ N(mu_k, sd^2 I) in 2-D, and E k(y, y') for two independent teacher draws
    xy = (h2 / (h2 + v2)) * torch.exp(-(torch.cdist(x, MEANS) ** 2) / (2 * (h2 + v2)))
    yy = (h2 / (h2 + 2 * v2)) * torch.exp(-(torch.cdist(MEANS, MEANS) ** 2) / (2 * (h2 + 2 * v2)))
    return xx - 2 * float((xy @ WEIGHTS).mean()) + float(WEIGHTS @ yy @ WEIGHTS)


def mode_weights(x: torch.Tensor) -> tuple[list[float], float]:
    """The weights of the modes among samples within 3 sd of one, and the share of samples that are
    not (between the modes or far out; 1.1% of the teacher's own)."""
    dist = torch.cdist(x, MEANS)
    inside = dist.min(1).values < 3 * SD
    counts = torch.bincount(dist.argmin(1)[inside], minlength=len(MEANS)).float()
    return (counts / counts.sum()).tolist(), 1 - float(inside.float().mean())


def report(name: str, x: torch.Tensor, mmd_rows: int = 4000) -> tuple[list[float], float, float]:
    """Print and return the mode weights and outside share of ``x``, and the distance of its first
    ``mmd_rows`` rows."""
    weights, outside = mode_weights(x)
    distance = mmd(x[:mmd_rows])
    print(f"{name:>34}: weights {[round(w, 3) for w in weights]}, outside {outside:.3f}, mmd {distance:.5f}")
    return weights, outside, distance


def assert_weights(weights: list[float], tol: float) -> None:
    assert max(abs(w - t) for w, t in zip(weights, WEIGHTS.tolist(), strict=True)) < tol, weights


def descend(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad()
    loss.backward()
    opt.step()


def train_by_dmd(
    dmd: LossTerm,
    sample: Callable[[], torch.Tensor],
    critic: nn.Module,
    critic_turn: Callable[[], None],
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    *,
    steps: int,
    warmup: int,
    critic_updates: int,
    eta_min: float,
) -> None:
    """``warmup`` critic updates, then ``steps`` DMD updates of what ``sample()`` draws (the learning rate
    decaying to ``eta_min`` on a cosine), each followed by ``critic_updates`` critic updates."""
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=eta_min)
    for _ in range(warmup):
        critic_turn()
    for _ in range(steps):
        descend(opt, dmd(loss_context(sample(), gen, critic))["dmd"])
        decay.step()
        for _ in range(critic_updates):
            critic_turn()


# ---- the tests ---------------------------------------------------------------------------------


def test_the_teacher_is_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    # E[x0 | x_s] by self-normalised importance sampling over teacher draws, at noisy teacher samples
    x0 = teacher_draws(400_000, gen)
    for s in (0.1, 0.5, 0.9):
        points = (1 - s) * teacher_draws(6, gen) + s * torch.randn(6, 2, generator=gen)
        logw = -0.5 * ((points[:, None] - (1 - s) * x0[None]) ** 2).sum(-1) / s**2
        mc = logw.softmax(1) @ x0
        torch.testing.assert_close(teacher_x0(points, torch.full((6,), s)), mc, atol=0.02, rtol=0)
    # its ODE carries noise onto the mixture (20000 samples: the weights to within about 0.003)
    report("teacher draws", teacher_draws(4000, gen))
    samples = teacher_ode(torch.randn(20_000, 2, generator=gen))
    weights, outside, distance = report("teacher ODE (200 steps)", samples)
    assert_weights(weights, 0.01)
    assert outside < 0.02
    assert distance < 1e-3  # teacher draws: 0 +- 1e-4; mode weights 3 points off: 6e-4


def test_dmd_and_its_critic_carry_free_samples_onto_the_teacher() -> None:
    """The generator is one free output per draw, so only the DMD gradient and the critic decide where
    the samples go: from N(0, I) they must reach the mixture, its mode weights included."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    dmd, critic_fm = terms()
    n, steps = 1024, 400
    samples = torch.randn(n, 2, generator=gen).requires_grad_()
    critic = Critic()
    opt_critic = torch.optim.Adam(critic.parameters(), lr=1e-3)
    # the DMD loss is a mean over the n x 2 entries: this lr moves each sample 0.05 x the DMD gradient
    lr = 0.05 * samples.numel()
    opt = torch.optim.SGD([samples], lr=lr)

    def critic_turn() -> None:
        descend(opt_critic, critic_fm(loss_context(samples.detach(), gen, critic))["critic_fm"])

    train_by_dmd(
        dmd,
        lambda: samples,
        critic,
        critic_turn,
        opt,
        gen,
        steps=steps,
        warmup=100,
        critic_updates=3,
        eta_min=0.05 * lr,
    )

    report("teacher draws", teacher_draws(n, gen))
    _, _, start = report("N(0, I)", torch.randn(n, 2, generator=gen))
    weights, outside, distance = report("free samples after DMD", samples.detach())
    assert_weights(weights, 0.03)
    assert outside < 0.2  # a sparse halo is left (0.11-0.14 over seeds; the teacher's own is 0.011)
    # for scale: teacher draws give 0 +- 4e-4 at this size, mode weights 3 points off 6e-4, sd x 1.5 5e-3
    assert distance < 0.002 and distance < 0.01 * start


@pytest.mark.slow
def test_one_step_generator_dmd_after_regression() -> None:
    """The issue's setup: a one-step MLP generator, first regressed onto the teacher's ODE samples of
    the same noise (the anchoring phase), then trained on-policy by DMD with a critic that stays ahead
    of it. Measured against the regression it starts from and against more regression."""
    t0 = time.monotonic()
    dmd, critic_fm = terms()
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(4000, 2, generator=gen)
    _, teacher_outside, _ = report("teacher draws", teacher_draws(4000, gen))

    def regress(student: nn.Module, steps: int, decay: bool) -> nn.Module:
        pairs = torch.randn(8192, 2, generator=gen)
        targets = teacher_ode(pairs)
        opt = torch.optim.Adam(student.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=2e-5) if decay else None
        one = torch.ones(256)
        for _ in range(steps):
            idx = torch.randint(len(pairs), (256,), generator=gen)
            # x0 = eps - v at s = 1: flow matching there is regression of x0 onto the paired sample
            descend(opt, flow_matching_loss(student(pairs[idx], one), targets[idx], pairs[idx]))
            if sched:
                sched.step()
        return student

    torch.manual_seed(0)
    regressed = regress(Velocity(), 2000, decay=False)
    t_reg = time.monotonic()
    _, _, d_reg = report("regression (2000 steps)", one_step(regressed, noise).detach())

    student, critic = copy.deepcopy(regressed), Critic()
    batch, steps = 1024, 400
    opt_student = torch.optim.Adam(student.parameters(), lr=3e-5)
    opt_critic = torch.optim.Adam(critic.parameters(), lr=1e-3)

    def draw() -> torch.Tensor:
        return one_step(student, torch.randn(batch, 2, generator=gen))

    def critic_turn() -> None:
        with torch.no_grad():
            sample = draw()
        descend(opt_critic, critic_fm(loss_context(sample, gen, critic))["critic_fm"])

    # critic warm-up on the regressed student's samples
    train_by_dmd(
        dmd,
        draw,
        critic,
        critic_turn,
        opt_student,
        gen,
        steps=steps,
        warmup=300,
        critic_updates=5,
        eta_min=6e-7,
    )
    t_dmd = time.monotonic()
    weights, outside, d_dmd = report("regression + DMD (400 steps)", one_step(student, noise).detach())
    more = regress(copy.deepcopy(regressed), 4000, decay=True)
    _, _, d_more = report("regression + 4000 more steps", one_step(more, noise).detach())
    print(f"seconds: regression {t_reg - t0:.1f}, DMD {t_dmd - t_reg:.1f}, more regression "
          f"{time.monotonic() - t_dmd:.1f}")  # fmt: skip
    # DMD improves on the regression it starts from (by 10-45% over seeds) and keeps its mode weights
    # (it does not correct them either: the between-mode signal is weak) ...
    assert_weights(weights, 0.04)
    assert d_dmd < d_reg and d_dmd < 0.002
    # ... but the regression's between-mode samples stay (several times the teacher's share), and more
    # regression does better than DMD: in 2-D the ODE's noise -> sample map is smooth enough for the MLP,
    # so regression averages modes only at the borders of their basins, and those fade with training
    _, reg_outside = mode_weights(one_step(regressed, noise).detach())
    assert reg_outside > 3 * teacher_outside and outside > 3 * teacher_outside
    assert d_more < d_dmd
