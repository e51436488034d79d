"""The one- and few-step sampler of students of diffusers teachers: the arithmetic of diffusers' ``LCMScheduler``.

A student of a diffusers UNet teacher samples exactly as a stock ``LCMScheduler`` (latent consistency models,
Luo et al. 2023, arXiv 2310.04378; DMD2 serves its students this way) drives it, so that plain diffusers serves
the exported student and reproduces fdistill's samples bit for bit:

* the first input is unit noise ``z`` (the scheduler's ``init_noise_sigma`` is 1) at the integer timestep ``t_0``;
* each step reads the UNet's output as x0 with the scheduler's float32 ``alphas_cumprod`` and returns
  ``c_out(t) x0 + c_skip(t) x_t``, LCM's boundary condition, with ``c_skip = s^2 / ((10 t)^2 + s^2)``,
  ``c_out = 10 t / sqrt((10 t)^2 + s^2)``, ``s = 0.5`` (``c_skip`` is 2.5e-9 at ``t = 999``);
* between steps the result is re-noised to the next timestep with fresh noise,
  ``sqrt(abar_next) x0 + sqrt(1 - abar_next) eps``.

Every operation below is the scheduler's, in its order and dtypes (0-dim float32 tensors, not Python floats).
"""

from __future__ import annotations

import inspect

import torch

from fdistill.schedules import DiscreteVPSchedule

SIGMA_DATA = 0.5  # LCMScheduler's fixed sigma_data of the boundary condition
TIMESTEP_SCALING = 10.0  # LCMScheduler's default timestep_scaling
READOUTS = ("epsilon", "v_prediction", "sample")


class LCMSampling:
    """LCM's arithmetic for a UNet with ``prediction_type`` on the discrete VP ``schedule`` of a diffusers
    scheduler (whose config it keeps, so that :meth:`scheduler` rebuilds the same table)."""

    renoise_mode = "sde"

    def __init__(self, schedule: DiscreteVPSchedule, prediction_type: str):
        if prediction_type not in READOUTS:
            raise ValueError(f"unsupported prediction_type {prediction_type!r}; use one of {READOUTS}")
        self.schedule, self.prediction_type = schedule, prediction_type
        self.alphas_cumprod = schedule.alphas_cumprod

    def check_times(self, times: list[float]) -> None:
        top = len(self.alphas_cumprod) - 1  # the range itself is the Generator's check
        bad = [t for t in times if t != int(t)]
        if bad:
            raise ValueError(f"a student of a diffusers teacher samples at integer timesteps 0..{top}; {bad} are not")

    def _scalings(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scaled = timestep * TIMESTEP_SCALING
        return SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2), scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5

    def denoise(self, model_output: torch.Tensor, sample: torch.Tensor, t: int) -> torch.Tensor:
        """``c_out x0 + c_skip sample`` at integer timestep ``t`` (LCMScheduler.step's ``denoised``)."""
        timestep = torch.tensor(int(t))
        alpha_prod_t = self.alphas_cumprod[timestep]
        beta_prod_t = 1 - alpha_prod_t
        c_skip, c_out = self._scalings(timestep)
        if self.prediction_type == "epsilon":
            x0 = (sample - beta_prod_t.sqrt() * model_output) / alpha_prod_t.sqrt()
        elif self.prediction_type == "sample":
            x0 = model_output
        else:
            x0 = alpha_prod_t.sqrt() * sample - beta_prod_t.sqrt() * model_output
        return c_out * x0 + c_skip * sample

    def advance(self, model_output, sample, t: int, t_next: int, mode: str = "sde", generator=None):
        """LCMScheduler.step from ``t`` to ``t_next``: the boundary-condition x0, re-noised with fresh noise."""
        if mode != "sde":
            raise ValueError(f"a student of a diffusers teacher samples with fresh noise (renoise sde), not {mode}")
        return self.renoise(self.denoise(model_output, sample, t), t_next, generator)

    def renoise(self, denoised: torch.Tensor, t_next: int, generator: torch.Generator | None = None):
        """The next step's input (LCMScheduler.step's ``prev_sample``): fresh noise drawn from ``generator``
        on its own device, as diffusers' ``randn_tensor`` does."""
        alpha_prod_next = self.alphas_cumprod[torch.tensor(int(t_next))]
        device = generator.device if generator is not None else denoised.device
        noise = torch.randn(denoised.shape, generator=generator, device=device, dtype=denoised.dtype)
        return alpha_prod_next.sqrt() * denoised + (1 - alpha_prod_next).sqrt() * noise.to(denoised.device)

    def scheduler(self, first_timestep: int | None = None):
        """A stock ``LCMScheduler`` with this arithmetic: the teacher's scheduler config (hence the same
        ``alphas_cumprod``, checked), this prediction type, no clipping, and every integer timestep on its
        grid (``original_inference_steps = num_train_timesteps``), so custom timesteps raise no warning.

        ``first_timestep`` is for pipelines that pass no timesteps (``DiTPipeline``): ``original_inference_steps =
        first_timestep + 1`` makes ``set_timesteps(K)`` start at that timestep (for ``first_timestep >= N / 2``)
        and space its K steps evenly below it."""
        from diffusers import LCMScheduler

        accepted = inspect.signature(LCMScheduler.__init__).parameters  # the source scheduler's other keys
        config = {k: v for k, v in self.schedule.scheduler_config.items() if k in accepted}
        grid = config["num_train_timesteps"] if first_timestep is None else first_timestep + 1
        scheduler = LCMScheduler.from_config(config, prediction_type=self.prediction_type, clip_sample=False,
                                             thresholding=False, timestep_scaling=TIMESTEP_SCALING,
                                             original_inference_steps=grid)
        if not torch.equal(scheduler.alphas_cumprod, self.alphas_cumprod):
            raise ValueError("diffusers' LCMScheduler computes another alphas_cumprod from this teacher's scheduler "
                             "config; the student cannot be served by it exactly")
        return scheduler
