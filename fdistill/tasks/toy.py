"""The analytic task: a Gaussian-mixture teacher with exact scores and samples (2-D rings, mixtures in any dimension).

Students and fake scores are EDM-preconditioned MLPs (``model``); training batches are the teacher's exact
samples; the evaluation reports mode coverage, mode-weight TV, the off-mode fraction and the energy distance to
exact teacher samples, for the student at each step count and the teacher's ODE sampler.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fdistill.containers import Networks
from fdistill.data.toy import TeacherSamples
from fdistill.errors import ConfigError
from fdistill.evaluation.loop import evaluate_samplers
from fdistill.evaluation.toy import ToyJudge
from fdistill.networks.denoisers import Denoiser, GaussianMixtureDenoiser, MLPDenoiser
from fdistill.tasks.base import Task

PREVIEW_SAMPLES = 2000


def principal_plane(teacher: GaussianMixtureDenoiser) -> torch.Tensor:
    """``[D, 2]``: the directions of the largest and second-largest variance of the teacher's mixture, from its
    exact covariance ``sum_k w_k (diag(var_k) + (mu_k - m)(mu_k - m)^T)``."""
    weights = teacher.weights[:, None]
    centred = teacher.means - (weights * teacher.means).sum(0)
    covariance = torch.diag((weights * teacher.variances).sum(0)) + (weights * centred).T @ centred
    return torch.linalg.eigh(covariance)[1][:, -2:].flip(1)


class ToyTask(Task):
    unread = {"data.path": "image folders read it", "data.cache_dir": "latent pipelines read it",
              "eval.reference": "image runs read it", "eval.features": "image runs read it",
              "log.fd_every": "image runs read it",
              **{key: "text-to-image runs read it" for key in ("eval.clip_model", "eval.clip_pretrained")}}

    def trainable_copy(self) -> Denoiser:
        m = self.cfg.model
        return MLPDenoiser(self.teacher.sample_shape[0], self.teacher.schedule, m.hidden, m.depth, m.sigma_data)

    def batches(self, needs_real_data: bool, device=None):
        if self.cfg.data.kind != "teacher":
            raise ConfigError(f"data.kind={self.cfg.data.kind!r} is not available for an analytic teacher; "
                              "use teacher")
        return iter(TeacherSamples(self.teacher, self.cfg.train.batch_size, needs_real_data))

    def evaluate(self, nets: Networks, run_dir: Path, progress: bool = False) -> list[dict]:
        """The sampler loop with the toy judge: mode statistics against the mixture, energy distance against
        exact teacher samples drawn under ``eval.seed + 1``."""
        ec, teacher = self.cfg.eval, self.teacher
        reference = teacher.sample(ec.num_samples, generator=torch.Generator().manual_seed(ec.seed + 1))[0]
        judge = ToyJudge(teacher.means, teacher.variances.sqrt(), teacher.weights, reference)
        return evaluate_samplers(nets, ec, judge, run_dir, progress)

    @torch.no_grad()
    def preview(self, nets: Networks, path: Path) -> None:
        """One-step student samples over exact teacher samples, as a scatter plot; data in more than two
        dimensions are projected onto the plane of the teacher's two principal axes (none for 1-D data)."""
        if nets.student.sample_shape[0] < 2:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        seed, device = self.cfg.eval.seed, nets.device
        g = torch.Generator(device=device).manual_seed(seed)
        x = nets.student(nets.student.noise(PREVIEW_SAMPLES, generator=g, device=device)).float().cpu()
        ref = self.teacher.sample(PREVIEW_SAMPLES, generator=torch.Generator().manual_seed(seed))[0].cpu()
        title = path.stem
        if x.shape[1] > 2:
            plane = principal_plane(self.teacher).cpu().float()
            x, ref = x @ plane, ref @ plane
            title += " (teacher's principal axes 1, 2)"
        fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
        ax.scatter(ref[:, 0], ref[:, 1], s=1, c="0.75", label="teacher")
        ax.scatter(x[:, 0], x[:, 1], s=1, c="C0", label="student (1 step)")
        ax.set_aspect("equal")
        ax.legend(loc="upper right", markerscale=6, fontsize=7)
        ax.set_title(title, fontsize=8)
        fig.savefig(path)
        plt.close(fig)
