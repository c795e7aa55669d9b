"""The distillation loop. It reads top to bottom: route, batch, simulate, generator turn, critic turn,
log, checkpoint. See DESIGN.md, "The method".
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from clora.backbone import Backbone, PromptEmbeds
from clora.distill.adapters import CRITIC, STUDENT, AdapterSet
from clora.distill.config import DistillConfig
from clora.distill.losses import LossContext
from clora.distill.plan import Plan
from clora.distill.prepare import Prepared
from clora.errors import CloraError
from clora.fileio import save_torch
from clora.metrics import psnr
from clora.plugins import Components
from clora.progress import progress_bar
from clora.sampling import (
    few_step_sample,
    few_step_sigmas,
    guided_velocity,
    level_at,
    renoise_rollout,
    x0_from_velocity,
)

CHECKPOINT = "checkpoint.pt"
#: decay of the running per-effect losses (``effect_balance``), per step the effect trains
EMA = 0.98
LOG = "log.jsonl"


class NonFiniteLossError(CloraError):
    """A loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


@dataclass
class Group:
    """Rows ``start:stop`` of a batch share one teacher (``lora`` None: the base model) and one effect
    (``name`` None: the general stream)."""

    lora: str | None
    start: int
    stop: int
    name: str | None = None


def balance_weights(groups: list[Group], running: dict[str, float], power: float) -> torch.Tensor | None:
    """Per-row weights for ``effect_balance``: each group's rows get (its effect's running loss)^-power,
    normalised to mean 1 over the rows; an effect without a running loss yet counts as the mean of
    those with one. None when balancing is off or the batch holds one group."""
    if power == 0 or len(groups) < 2:
        return None
    known = [running[g.name] for g in groups if g.name in running]
    fallback = sum(known) / len(known) if known else 1.0
    w = torch.empty(groups[-1].stop, dtype=torch.float32)
    for g in groups:
        w[g.start : g.stop] = max(running.get(g.name or "", fallback), 1e-12) ** -power
    return w / w.mean()


def general_block(block: int, p_switch: float) -> bool:
    """Whether block ``block`` (0, 1, ...) is a general block: the general stream takes ``1 - p_switch``
    of the blocks evenly spaced (at 0.9, blocks 9, 19, 29, ...), so that every run and every stretch of
    one gets its share. (A coin per block, as before, gave 600-step toy runs at 0.9 from 40 to 80
    general steps, and their general edits moved 3 dB with it; benchmarks/README.md.)"""
    share = 1.0 - p_switch
    return math.floor((block + 1) * share + 1e-9) > math.floor(block * share + 1e-9)


@dataclass
class Batch:
    """One step's rows (one image size): sources, teacher targets and each row's conditioning."""

    stream: Literal["effect", "general"]
    groups: list[Group]
    source: torch.Tensor
    teacher_prompt: PromptEmbeds
    student_prompt: PromptEmbeds
    uncond: PromptEmbeds
    targets: torch.Tensor | None
    #: per-sample shape of the target latents (what the student samples)
    latent_shape: tuple[int, ...] = ()

    def __len__(self) -> int:
        return int(self.source.shape[0])

    def rows(self, idx: torch.Tensor, groups: list[Group]) -> Batch:
        """Rows ``idx`` of the batch as a batch of their own, ``groups`` rebased onto them."""
        return Batch(
            self.stream,
            groups,
            self.source[idx.to(self.source.device)],
            self.teacher_prompt.index(idx),
            self.student_prompt.index(idx),
            self.uncond.index(idx),
            None if self.targets is None else self.targets[idx.to(self.targets.device)],
            self.latent_shape,
        )

    def subset(self, names: set[str]) -> Batch | None:
        """The rows of the groups of effects ``names``, as a batch of their own (None: no such rows)."""
        keep = [g for g in self.groups if g.name in names]
        if not keep:
            return None
        groups, start = [], 0
        for g in keep:
            groups.append(Group(g.lora, start, start + g.stop - g.start, g.name))
            start += g.stop - g.start
        return self.rows(torch.cat([torch.arange(g.start, g.stop) for g in keep]), groups)

    def split(self, n: int) -> list[Batch]:
        """The batch as ``n`` micro-batches of consecutive rows (gradient accumulation)."""
        if n == 1:
            return [self]
        size, out = len(self) // n, []
        for i in range(n):
            lo, hi = i * size, (i + 1) * size
            groups = [
                Group(g.lora, max(g.start, lo) - lo, min(g.stop, hi) - lo, g.name)
                for g in self.groups
                if g.start < hi and g.stop > lo
            ]
            out.append(self.rows(torch.arange(lo, hi), groups))
        return out


@dataclass
class LoopState:
    """What a checkpoint restores besides the adapters and optimizers."""

    step: int = 0
    route: tuple[Literal["effect", "general"], tuple[str, ...]] = ("general", ())
    #: the image size (a bucket of the prepared rows) of the current block's batches
    bucket: tuple[int, int] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    #: running mean of each effect's regression loss per row (``effect_balance``)
    effect_loss: dict[str, float] = field(default_factory=dict)
    #: each effect's last ``PROBE_HISTORY`` probes, oldest first, as [times chosen by then, PSNR against
    #: its teacher] (runs that probe)
    probe_history: dict[str, list[list[float]]] = field(default_factory=dict)

    @property
    def probe_db(self) -> dict[str, float]:
        """Each effect's PSNR against its teacher at the latest probe."""
        return {name: h[-1][1] for name, h in self.probe_history.items()}


#: how many probes per effect routers are shown (``probe_history``)
PROBE_HISTORY = 4


@dataclass
class LoopResult:
    steps: int
    seconds: float
    final_losses: dict[str, float]
    teacher_loads: int
    #: wall seconds by role of the steps this process ran (see :class:`RoleTimer`)
    seconds_by_role: dict[str, float] = field(default_factory=dict)
    #: the last probe's PSNR against the teachers, by effect (empty: the run did not probe)
    probe_db: dict[str, float] = field(default_factory=dict)
    #: the run ended before its last step because every effect reached ``data.target_db``
    stopped_early: bool = False


def load_optimizer(opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load an optimizer's saved state; moments that do not fit its parameters are dropped (the state
    of a grown student covers its new components only; one saved before the student's fixed components
    became their own adapter covers all of them), so it starts those moments afresh."""
    opt.load_state_dict(state)
    params = [p for group in opt.param_groups for p in group["params"]]
    if any(opt.state[p].get("exp_avg", p).shape != p.shape for p in params if p in opt.state):
        opt.state.clear()


class RoleTimer:
    """Wall time per role of a step: ``simulation`` (student few-step rollout), ``teacher`` and
    ``critic_score`` (no-grad calls inside the generator's losses), ``generator`` (the rest of the
    generator turn: student forwards with grad, backward, optimizer) and ``critic`` (critic turn)."""

    ROLES = ("simulation", "teacher", "critic_score", "generator", "critic")

    def __init__(self, device: torch.device) -> None:
        self.seconds = dict.fromkeys(self.ROLES, 0.0)
        self.sync = device.type == "cuda"

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextmanager
    def __call__(self, role: str) -> Iterator[None]:
        t0 = self._now()
        try:
            yield
        finally:
            self.seconds[role] += self._now() - t0

    def report(self) -> dict[str, float]:
        """Seconds by role; ``generator`` excludes the teacher and critic calls made inside it."""
        out = dict(self.seconds)
        out["generator"] = max(out["generator"] - out["teacher"] - out["critic_score"], 0.0)
        return {k: round(v, 2) for k, v in out.items()}


def effect_levels(cfg: DistillConfig, on_policy: set[str]) -> dict[str, torch.Tensor]:
    """The few-step levels of the effects sampled with their own: the on-policy effects, when
    ``student.on_policy_shift`` is set and differs from ``student.shift``."""
    student = cfg.student
    shift = student.on_policy_shift
    if shift is None or shift == student.shift:
        return {}
    return {name: few_step_sigmas(student.few_steps, shift) for name in sorted(on_policy)}


class Distiller:
    """Owns the optimizers and runs steps; ``run`` is the loop."""

    def __init__(
        self,
        backbone: Backbone,
        adapters: AdapterSet,
        prepared: Prepared,
        plan: Plan,
        cfg: DistillConfig,
        components: Components,
        run_dir: Path,
    ) -> None:
        self.backbone, self.adapters, self.data, self.plan, self.cfg = backbone, adapters, prepared, plan, cfg
        self.run_dir = run_dir
        self.router = components.get_router(cfg.data.router)
        self.terms = {loss_id: components.get_loss_term(loss_id) for loss_id in cfg.losses}
        self.sigmas = few_step_sigmas(cfg.student.few_steps, cfg.student.shift).to(
            backbone.device, backbone.dtype
        )
        self.generator = torch.Generator().manual_seed(cfg.seed)
        #: effects whose rows also train on-policy in the anchoring phase (``on_policy.effects``)
        self.on_policy_effects = prepared.on_policy
        #: the few-step levels of the effects that have their own (``student.on_policy_shift``)
        self.effect_sigmas = {
            name: levels.to(backbone.device, backbone.dtype)
            for name, levels in effect_levels(cfg, self.on_policy_effects).items()
        }
        if self.on_policy_effects and CRITIC not in adapters.params:
            adapters.add_trained(CRITIC)
        opt = cfg.optimizer
        self.opt_student = torch.optim.AdamW(adapters.params[STUDENT], lr=opt.lr, betas=opt.betas)
        # a run that only anchors has no critic (see AdapterSet)
        self.opt_critic = (
            torch.optim.AdamW(adapters.params[CRITIC], lr=opt.critic_lr, betas=opt.betas)
            if CRITIC in adapters.params
            else None
        )
        self.state = LoopState(counts={e.name: 0 for e in plan.effects})
        self.effects = {e.name: e for e in plan.effects}
        self.timer = RoleTimer(torch.device(backbone.device))
        # a run that probes holds the last probe_rows sources of each effect's largest bucket out of
        # training (leaving at least one) and scores the student on them
        self.router_probes = bool(getattr(self.router, "uses_probe", False))
        self.probing = cfg.data.target_db is not None or self.router_probes
        self.held: dict[str, tuple[tuple[int, int], int]] = {}
        for name, buckets in prepared.effects.items() if self.probing else ():
            bucket = max(sorted(buckets), key=lambda b: len(buckets[b]))
            n = min(cfg.data.probe_rows, len(buckets[bucket]) - 1)
            if n > 0 and buckets[bucket].targets is not None:
                self.held[name] = (bucket, n)
        self._probe_truth: dict[str, torch.Tensor] = {}

    # ---- the loop ------------------------------------------------------------------------------

    def run(
        self, show_progress: bool = True, on_checkpoint: Callable[[int], None] | None = None
    ) -> LoopResult:
        cfg, total = self.cfg, self.cfg.steps
        start, t0, last = self.state.step, time.monotonic(), 0.0
        final: dict[str, float] = {}
        stopped = False
        with progress_bar(show_progress) as bar, open(self.run_dir / LOG, "a") as log:
            task = bar.add_task("distill", total=total, completed=start, info="")
            for step in range(start, total):
                # 0. probe (runs that route by it or stop at a target): the run ends once every effect
                # is within its target
                if self.probing and step % cfg.data.probe_every == 0 and self.probe(step, log):
                    stopped = True
                    break
                # 1. route: the block's index picks the stream; the router picks the effects
                if step % cfg.data.block_len == 0:
                    self.state.route, self.state.bucket = self.choose_route(step // cfg.data.block_len)
                stream, effects = self.state.route
                effect = ",".join(effects) or None
                # 2.-5. batch, then the phase's turns
                logged = self.train_step(step, self.make_batch(stream, effects, self.state.bucket))
                # 6. log and checkpoint
                self.state.step = step + 1
                final.update(logged)
                log.write(json.dumps({"step": step, "stream": stream, "effect": effect, **logged}) + "\n")
                if time.monotonic() - last > 0.5 or step + 1 == total:
                    last = time.monotonic()
                    info = f"{stream}:{effect or '-'} " + " ".join(
                        f"{k.removeprefix('loss/')}={v:.3g}"
                        for k, v in logged.items()
                        if k.startswith("loss/")
                    )
                    bar.update(task, completed=step + 1, info=info)
                if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total:
                    log.flush()
                    self.save_checkpoint()
                    if on_checkpoint:
                        on_checkpoint(step + 1)
            if self.probing and not stopped:
                self.probe(self.state.step, log)  # where the run ends
        return LoopResult(
            self.state.step - start,
            time.monotonic() - t0,
            final,
            self.adapters.teacher_loads,
            self.timer.report(),
            dict(self.state.probe_db),
            stopped,
        )

    def train_step(self, step: int, batch: Batch) -> dict[str, float]:
        """One step on ``batch`` in the phase ``step`` falls in: anchoring alone (cheap), then the critic's
        warm-up on student samples, then on-policy DMD; returns the logged losses and weights."""
        cfg, total = self.cfg, self.cfg.steps
        anchor_end = cfg.anchor_steps
        warm_end = anchor_end + min(cfg.on_policy.critic_warmup, (total - anchor_end) // 4)
        if step == anchor_end and anchor_end > 0 and cfg.on_policy.critic_from_student:
            self.critic_from_student()
        parts = cfg.optimizer.grad_accumulation
        micro = batch.split(parts)  # micro-batches whose gradients add up
        self.set_student_lr(step)
        logged: dict[str, float] = {}
        if step >= anchor_end:
            gen_turn = step >= warm_end and (step - warm_end) % cfg.on_policy.gen_every == 0
            self.on_policy_turns(step, micro, gen_turn, logged)
            return logged
        # the anchoring phase: regression onto the teacher targets, no simulation; the rows of the
        # on-policy effects (on_policy.effects) also train on-policy, on their own sub-batch
        sub = batch.subset(self.on_policy_effects) if self.on_policy_effects else None
        if batch.targets is not None:
            with self.timer("generator"):
                for mb in micro:
                    ctx = self.loss_context(mb, None)
                    if sub is not None:
                        ctx.row_weights = self.on_policy_row_weights(mb, ctx.row_weights)
                    self.backward(ctx, "generator", step, logged, len(micro))
                    self.track_effect_losses(mb, ctx)
        if sub is not None:
            # the critic alone learns the student's samples for the first critic_warmup steps
            warmup = min(cfg.on_policy.critic_warmup, total // 4)
            gen_turn = step >= warmup and (step - warmup) % cfg.on_policy.gen_every == 0
            n = parts if len(sub) % parts == 0 else 1
            # DMD's share of the gradient per row as in a batch that is all on-policy
            self.on_policy_turns(step, sub.split(n), gen_turn, logged, share=len(sub) / len(batch))
        elif batch.targets is not None:
            with self.timer("generator"):
                self.optimizer_step("generator")
        return logged

    def on_policy_turns(
        self,
        step: int,
        micro: list[Batch],
        gen_turn: bool,
        logged: dict[str, float],
        share: float | None = None,
    ) -> None:
        """Backward simulation on ``micro``, the generator's turn (when ``gen_turn``) and the critic's.

        ``share`` None: an on-policy step, every generator term. Else ``micro`` are the on-policy rows
        of an anchoring step, that share of its batch, whose regression terms already ran on the whole
        batch: only the on-policy terms, their loss times ``share``, added to the student's gradients."""
        contexts = []
        # 3. backward simulation; the last simulated step keeps its graph on generator turns
        for mb in micro:
            with self.timer("simulation"):
                sample = self.simulate(mb, with_grad=gen_turn)
            ctx = self.loss_context(mb, sample)
            # 4. generator turn
            if gen_turn:
                with self.timer("generator"):
                    self.backward(ctx, "generator", step, logged, len(micro), share)
                    if share is None:
                        self.track_effect_losses(mb, ctx)
            ctx.sample = sample.detach()
            contexts.append(ctx)
        if gen_turn or share is not None:  # an anchoring step's gradients are applied either way
            with self.timer("generator"):
                self.optimizer_step("generator")
        # 5. critic turn, on the same (now detached) student samples
        with self.timer("critic"):
            for ctx in contexts:
                self.backward(ctx, "critic", step, logged, len(micro))
            self.optimizer_step("critic")

    # ---- helpers, in the order the loop uses them ----------------------------------------------

    def _rng(self) -> random.Random:
        return random.Random(int(torch.randint(2**31 - 1, (1,), generator=self.generator)))

    def choose_route(
        self, block: int
    ) -> tuple[tuple[Literal["effect", "general"], tuple[str, ...]], tuple[int, int] | None]:
        """Block ``block``: general, or effect with ``effects_per_batch`` distinct effects from the router;
        and the image size its batches have. The router's first effect picks the size (one of its own
        images'); the others come from the effects that have images of that size."""
        rng = self._rng()
        data = self.cfg.data
        pool = [e.name for e in self.plan.effects if self.trains(e.name)]
        if not pool or (general_block(block, data.p_switch) and self.data.general_rows):
            return ("general", ()), self._pick_bucket({s: len(r) for s, r in self.data.general.items()}, rng)
        chosen: list[str] = []
        bucket: tuple[int, int] | None = None
        probe: dict[str, Any] = {}
        if self.router_probes:
            probe = {
                "probe_history": {n: [tuple(p) for p in h] for n, h in self.state.probe_history.items()},
            }
        for _ in range(min(data.effects_per_batch, len(pool), self.cfg.optimizer.batch_size)):
            names = [
                n for n in pool if n not in chosen and (bucket is None or bucket in self.data.effects[n])
            ]
            if not names:
                break
            new = [n for n in self.plan.new_effects if n in names]
            effect = self.router.choose(names, new, self.state.counts, self.cfg, rng, **probe)
            if effect not in names:
                raise CloraError(f"router '{data.router}' chose unknown or repeated effect '{effect}'")
            self.state.counts[effect] = self.state.counts.get(effect, 0) + 1
            chosen.append(effect)
            if bucket is None:
                bucket = self._pick_bucket({s: len(r) for s, r in self.data.effects[effect].items()}, rng)
        return ("effect", tuple(chosen)), bucket

    def trains(self, name: str) -> bool:
        """Whether effect ``name`` is routed: not when it reached ``data.target_db`` at the latest probe."""
        target = self.cfg.data.target_db
        return target is None or self.state.probe_db.get(name, -math.inf) < target

    @torch.no_grad()
    def probe(self, step: int, log: Any) -> bool:
        """Score the student's few-step samples against the teachers' outputs on each effect's held-out
        sources (PSNR, dB; the same noise at every probe), log them; True when every effect is within
        ``data.target_db``."""
        bb, gen = self.backbone, torch.Generator().manual_seed(self.cfg.seed + 1)
        self.adapters.use(STUDENT)
        for name, (bucket, n) in self.held.items():
            rows = self.data.effects[name][bucket]
            held = rows.take(torch.arange(len(rows) - n, len(rows)), bb.device, bb.dtype)
            if name not in self._probe_truth:
                assert held.targets is not None  # only effects with teacher outputs are held out
                self._probe_truth[name] = bb.decode_latents(held.targets).float()
            x = few_step_sample(
                bb, held.sources, held.student, self.levels_of(name), gen, shape=(n, *held.latent_shape)
            )
            db = round(float(psnr(bb.decode_latents(x), self._probe_truth[name]).mean()), 3)
            history = self.state.probe_history.setdefault(name, [])
            history.append([float(self.state.counts.get(name, 0)), db])
            del history[:-PROBE_HISTORY]
        bb.offload_encoders()  # a real base's VAE leaves the GPU again
        log.write(json.dumps({"step": step, "probe": self.state.probe_db}) + "\n")
        target = self.cfg.data.target_db
        return (
            target is not None
            and len(self.held) == len(self.plan.effects) > 0
            and not any(self.trains(e.name) for e in self.plan.effects)
        )

    @staticmethod
    def _pick_bucket(sizes: dict[tuple[int, int], int], rng: random.Random) -> tuple[int, int] | None:
        """An image size, with probability by its number of images (no draw when there is one)."""
        if len(sizes) <= 1:
            return next(iter(sizes), None)
        shapes = sorted(sizes)
        return rng.choices(shapes, weights=[sizes[s] for s in shapes])[0]

    def make_batch(
        self, stream: Literal["effect", "general"], effects: tuple[str, ...], bucket: tuple[int, int] | None
    ) -> Batch:
        b, device, dtype = self.cfg.optimizer.batch_size, self.backbone.device, self.backbone.dtype
        if stream == "effect" and effects:
            assert bucket is not None
            groups, parts = [], []
            for i, name in enumerate(effects):  # rows split as evenly as possible, one group per effect
                start, stop = b * i // len(effects), b * (i + 1) // len(effects)
                rows = self.data.effects[name][bucket]
                held_bucket, held = self.held.get(name, (None, 0))  # the probe's rows never train
                n_train = len(rows) - (held if held_bucket == bucket else 0)
                idx = torch.randint(n_train, (stop - start,), generator=self.generator)
                groups.append(Group(self.effects[name].lora_path, start, stop, name))
                parts.append(rows.take(idx, device, dtype))
        else:
            assert bucket is not None
            rows = self.data.general[bucket]
            idx = torch.randint(len(rows), (b,), generator=self.generator)
            groups, parts = [Group(None, 0, b)], [rows.take(idx, device, dtype)]
        targets = [p.targets for p in parts]
        return Batch(
            stream,
            groups,
            source=torch.cat([p.sources for p in parts]),
            teacher_prompt=PromptEmbeds.cat([p.teacher for p in parts]),
            student_prompt=PromptEmbeds.cat([p.student for p in parts]),
            uncond=PromptEmbeds.cat([p.uncond for p in parts]),
            targets=None if any(t is None for t in targets) else torch.cat(targets),  # type: ignore[arg-type]
            latent_shape=parts[0].latent_shape,
        )

    def levels_of(self, name: str | None) -> torch.Tensor:
        """Effect ``name``'s few-step levels (the collection's, unless it has its own)."""
        return self.effect_sigmas.get(name or "", self.sigmas)

    def batch_levels(self, batch: Batch) -> torch.Tensor:
        """The few-step levels of a batch's rows: one set ``[L]`` when every row has the collection's,
        else one set per row ``[B, L]``."""
        if not any(g.name in self.effect_sigmas for g in batch.groups):
            return self.sigmas
        return torch.cat([self.levels_of(g.name).expand(g.stop - g.start, -1) for g in batch.groups])

    def sampler_noise(self, like: torch.Tensor) -> torch.Tensor:
        """Noise as the student's few-step sampler draws it at inference."""
        return self.backbone.sampling_noise(like.shape, self.generator).to(like)

    def simulate(self, batch: Batch, with_grad: bool) -> torch.Tensor:
        """Run the student's few-step sampler from noise, stop at a random step k, return step k's x0."""
        levels = self.batch_levels(batch)
        k = int(torch.randint(levels.shape[-1], (1,), generator=self.generator))
        self.adapters.use(STUDENT)
        shape = torch.Size((len(batch), *batch.latent_shape))
        x = self.backbone.initial_noise(shape, self.generator).to(batch.source)
        with torch.no_grad():
            x = renoise_rollout(
                lambda noisy, s: x0_from_velocity(
                    noisy, self.backbone.predict_velocity(noisy, s, batch.source, batch.student_prompt), s
                ),
                x,
                levels,
                k,
                self.sampler_noise,
            )
        s = level_at(levels, k)
        with torch.set_grad_enabled(with_grad):
            v = self.backbone.predict_velocity(x, s, batch.source, batch.student_prompt)
            return x0_from_velocity(x, v, s)

    def critic_from_student(self) -> None:
        """Copy the student into the critic and restart the critic's optimizer."""
        self.adapters.load_state_dict(CRITIC, self.adapters.state_dict(STUDENT))
        assert self.opt_critic is not None  # a run with an on-policy phase has a critic
        self.opt_critic.state.clear()

    def loss_context(self, batch: Batch, sample: torch.Tensor | None) -> LossContext:
        bb, ad, cfg = self.backbone, self.adapters, self.cfg
        teachers = cfg.teachers
        guidance = teachers.guidance if teachers.guidance is not None else bb.default_guidance

        def teacher_x0(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            t = torch.as_tensor(t, dtype=noisy.dtype, device=noisy.device).expand(noisy.shape[0])
            with self.timer("teacher"):
                parts = []
                for g in batch.groups:  # one teacher per group of rows
                    rows = slice(g.start, g.stop)
                    ad.use_teacher(g.lora)
                    v = guided_velocity(
                        bb,
                        noisy[rows],
                        t[rows],
                        batch.source[rows],
                        batch.teacher_prompt.index(rows),
                        batch.uncond.index(rows),
                        teachers.general_guidance if g.lora is None else guidance,
                    )
                    parts.append(x0_from_velocity(noisy[rows], v, t[rows]))
                return torch.cat(parts)

        def velocity(adapter: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
            def call(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                ad.use(adapter)
                return bb.predict_velocity(noisy, t, batch.source, batch.student_prompt)

            return call

        def x0_of(adapter: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
            def call(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return x0_from_velocity(noisy, velocity(adapter)(noisy, t), t)

            return call

        critic_x0 = x0_of(CRITIC)

        def critic_score(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with self.timer("critic_score"):
                return critic_x0(noisy, t)

        return LossContext(
            sample=sample,
            stream=batch.stream,
            targets=batch.targets,
            few_step_sigmas=self.batch_levels(batch),
            config=cfg,
            generator=self.generator,
            teacher_x0=teacher_x0,
            critic_x0=critic_score,
            student_x0=x0_of(STUDENT),
            student_velocity=velocity(STUDENT),
            critic_velocity=velocity(CRITIC),
            sampling_noise=self.backbone.sampling_noise,
            row_weights=self.row_weights(batch),
        )

    def row_weights(self, batch: Batch) -> torch.Tensor | None:
        w = balance_weights(batch.groups, self.state.effect_loss, self.cfg.data.effect_balance)
        return None if w is None else w.to(batch.source.device)

    def track_effect_losses(self, batch: Batch, ctx: LossContext) -> None:
        """Fold this step's per-row regression losses into each effect's running mean."""
        if not ctx.row_losses or self.cfg.data.effect_balance == 0:
            return
        rows = torch.stack(ctx.row_losses).mean(0).float().cpu()
        for g in batch.groups:
            if g.name is None:
                continue
            value = float(rows[g.start : g.stop].mean())
            old = self.state.effect_loss.get(g.name)
            self.state.effect_loss[g.name] = value if old is None else EMA * old + (1 - EMA) * value

    def set_student_lr(self, step: int) -> None:
        """The student's learning rate at ``step`` (``lr_schedule``), set on its optimizer."""
        for group in self.opt_student.param_groups:
            group["lr"] = self.cfg.lr_at(step)

    def backward(
        self,
        ctx: LossContext,
        role: str,
        step: int,
        logged: dict[str, float],
        parts: int,
        share: float | None = None,
    ) -> None:
        """Add the gradients of ``role``'s weighted terms (generator: the student, critic: the critic) on
        one of ``parts`` micro-batches; :meth:`optimizer_step` applies them. ``share`` set: only the
        on-policy terms, their loss times ``share`` (the on-policy rows of an anchoring step)."""
        loss = self.weighted(ctx, role, step, logged, parts, on_policy_only=share is not None)
        if loss is not None:
            # the losses ran teachers and the critic since the trained forward: with gradient
            # checkpointing the backward pass recomputes that forward with the active adapter
            self.adapters.use(STUDENT if role == "generator" else CRITIC)
            (loss * (1.0 if share is None else share) / parts).backward()

    def on_policy_row_weights(self, batch: Batch, weights: torch.Tensor | None) -> torch.Tensor:
        """The regression terms' row weights with the on-policy effects' rows times
        ``on_policy.anchor_weight``."""
        w = torch.ones(len(batch)) if weights is None else weights.detach().float().cpu().clone()
        for g in batch.groups:
            if g.name in self.on_policy_effects:
                w[g.start : g.stop] *= self.cfg.on_policy.anchor_weight
        return w.to(batch.source.device)

    def optimizer_step(self, role: str) -> None:
        """One optimizer step of ``role`` on the gradients gathered since the last one."""
        adapter, opt = (STUDENT, self.opt_student) if role == "generator" else (CRITIC, self.opt_critic)
        assert opt is not None  # the critic's turn comes only in runs that have one
        params = self.adapters.params[adapter]
        if all(p.grad is None for p in params):
            return
        torch.nn.utils.clip_grad_norm_(params, self.cfg.optimizer.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def weighted(
        self,
        ctx: LossContext,
        role: str,
        step: int,
        logged: dict[str, float],
        parts: int = 1,
        on_policy_only: bool = False,
    ) -> torch.Tensor | None:
        """Sum of the config's weighted terms of ``role`` (``on_policy_only``: those that read the
        student's sample); every named loss is logged (the mean over ``parts`` micro-batches)."""
        total: torch.Tensor | None = None
        for loss_id, term in self.terms.items():
            if getattr(term, "role", "generator") != role:
                continue
            off_policy = getattr(term, "off_policy", False)
            if (ctx.sample is None and not off_policy) or (on_policy_only and off_policy):
                continue
            weight = self.cfg.losses[loss_id].at(step, self.cfg.steps)
            if weight == 0:
                continue
            for name, value in term(ctx).items():
                v = float(value.detach())
                if not math.isfinite(v):
                    raise NonFiniteLossError(self.non_finite_message(name, v, step))
                logged[f"loss/{name}"] = logged.get(f"loss/{name}", 0.0) + v / parts
                logged[f"weight/{name}"] = weight
                total = value * weight if total is None else total + value * weight
        return total

    def non_finite_message(self, name: str, value: float, step: int) -> str:
        """Why the run stopped and what is left of it (a checkpoint only when one was written)."""
        fix = "check the teachers or lower the learning rate (--set optimizer.lr=...)"
        last = self.last_checkpoint_step()
        if not last:
            return (
                f"loss '{name}' became {value} at step {step}, before the run's first checkpoint, so "
                f"nothing was kept; {fix} and run `clora distill` again"
            )
        return (
            f"loss '{name}' became {value} at step {step}; the run stopped and kept its last good "
            f"checkpoint (step {last}); {fix} and start over with `clora distill --fresh`, or continue "
            "from it as it was with `clora distill --resume`"
        )

    # ---- checkpoints ---------------------------------------------------------------------------

    def last_checkpoint_step(self) -> int:
        path = self.run_dir / CHECKPOINT
        if not path.exists():
            return 0
        return int(torch.load(path, weights_only=True, map_location="cpu")["step"])

    def training_state(self) -> dict[str, Any]:
        """The trained adapters and their optimizers (what an incremental run starts from)."""
        state: dict[str, Any] = {
            "student": self.adapters.state_dict(STUDENT),
            "opt_student": self.opt_student.state_dict(),
        }
        if self.opt_critic is not None:
            state["critic"] = self.adapters.state_dict(CRITIC)
            state["opt_critic"] = self.opt_critic.state_dict()
        return state

    def save_checkpoint(self) -> None:
        save_torch(
            {
                "step": self.state.step,
                "route": [self.state.route[0], list(self.state.route[1])],
                "bucket": list(self.state.bucket) if self.state.bucket else [],
                "counts": dict(self.state.counts),
                "effect_loss": dict(self.state.effect_loss),
                "probe_history": {n: [list(p) for p in h] for n, h in self.state.probe_history.items()},
                "generator": self.generator.get_state(),
                **self.training_state(),
                "config": self.cfg.model_dump_json(),
            },
            self.run_dir / CHECKPOINT,
        )

    def load_checkpoint(self) -> bool:
        """Restore the last checkpoint of this run; False if there is none."""
        path = self.run_dir / CHECKPOINT
        if not path.exists():
            return False
        ck: dict[str, Any] = torch.load(path, weights_only=True, map_location="cpu")
        self.adapters.load_state_dict(STUDENT, ck["student"])
        load_optimizer(self.opt_student, ck["opt_student"])
        if self.opt_critic is not None:
            self.adapters.load_state_dict(CRITIC, ck["critic"])
            self.opt_critic.load_state_dict(ck["opt_critic"])
        self.generator.set_state(ck["generator"])
        stream, effects = ck["route"]
        self.state = LoopState(
            step=int(ck["step"]),
            route=(stream, tuple(effects)),
            bucket=tuple(ck["bucket"]) if ck.get("bucket") else None,
            counts=dict(ck["counts"]),
            effect_loss=dict(ck.get("effect_loss", {})),
            probe_history={n: [list(p) for p in h] for n, h in ck.get("probe_history", {}).items()},
        )
        self._truncate_log(self.state.step)
        return True

    def _truncate_log(self, step: int) -> None:
        """Drop log lines of steps after the checkpoint, which the resumed run will redo."""
        path = self.run_dir / LOG
        if not path.exists():
            return
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < step]
        path.write_text("".join(ln + "\n" for ln in keep))

    def init_from(self, state: dict[str, Any], scale: float = 1.0) -> None:
        """Start student and critic (and their optimizers) from a parent collection's saved state.

        A student that grows (``plan.frozen_rank``: the parent's rank) takes the parent's components as
        its leading ones, ``scale`` its alpha/rank over the child's; both optimizers start fresh. A
        critic the parent never trained starts as this student (it would be copied from it anyway)."""
        critic = self.opt_critic is not None
        parent_critic = state.get("critic", state["student"])
        if self.plan.frozen_rank:
            self.adapters.load_leading(STUDENT, state["student"], scale)
            if critic:
                self.adapters.load_leading(CRITIC, parent_critic, scale)
            return
        self.adapters.load_state_dict(STUDENT, state["student"])
        load_optimizer(self.opt_student, state["opt_student"])
        if critic:
            self.adapters.load_state_dict(CRITIC, parent_critic)
            if "opt_critic" in state:
                self.opt_critic.load_state_dict(state["opt_critic"])  # type: ignore[union-attr]
        opt = self.cfg.optimizer
        for optimizer, lr in ((self.opt_student, opt.lr), (self.opt_critic, opt.critic_lr)):
            for group in optimizer.param_groups if optimizer is not None else []:
                group["lr"] = lr
