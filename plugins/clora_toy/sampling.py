"""Generic flow-matching samplers; they now live in :mod:`clora.sampling` and are re-exported here."""

from clora.sampling import (
    add_noise,
    euler_sample,
    few_step_sample,
    few_step_sigmas,
    guided_velocity,
    psnr,
    shift_sigma,
    sigma_schedule,
    x0_from_velocity,
)

__all__ = [
    "add_noise",
    "euler_sample",
    "few_step_sample",
    "few_step_sigmas",
    "guided_velocity",
    "psnr",
    "shift_sigma",
    "sigma_schedule",
    "x0_from_velocity",
]
