"""Two processes on CPU (gloo, accelerate's debug launcher): identical replicas, rank-0-only writing, and the
same result as one process with the same global batch (there: 2 accumulation micro-batches)."""

import builtins
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import debug_launcher
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

import fdistill.run
from fdistill.errors import ConfigError
from fdistill.recipes import load_config
from fdistill.run import run_experiment
from fdistill.training.checkpoint import full_tensor
from fdistill.training.trainer import Trainer

# Every test trains in two processes launched from a fresh interpreter.
pytestmark = pytest.mark.slow

TINY = str(Path(__file__).parents[1] / "configs" / "ring_tiny.yaml")
# DMD with its GAN term: no all-reduce inside the loss, so 2 processes and 2 micro-batches sum the same terms.
COMMON = ["objective.name=dmd", "train.steps=12", "checkpoint.every=5", "train.device_batch_size=32",
          "eval.num_samples=128"]
# The digits quickstart (f-distill with a discriminator on the teacher's features), a few small steps.
DIGITS = str(Path(__file__).parents[1] / "configs" / "quickstart.yaml")
DIGITS_LORA = ["train.steps=4", "train.batch_size=8", "checkpoint.every=100", "eval.num_samples=100",
               "eval.teacher_steps=4", "log.tensorboard=false", "log.sample_every=0"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


class _RecordingTrainer(Trainer):
    """Saves this process's own final weights (student and EMAs) beside the run."""

    out: Path

    def fit(self, resume_from=None):
        summary = super().fit(resume_from)
        student = {k: full_tensor(v) for k, v in self.nets.student.state_dict().items()}
        ema = {n: {k: full_tensor(v) for k, v in e.shadow.items()} for n, e in self.ema.averages.items()}
        teacher = list(self.nets.teacher.parameters())
        held = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in teacher)
        record = {"student": student, "ema": ema, "teacher_held": held,
                  "teacher_numel": sum(p.numel() for p in teacher)}
        torch.save(record, self.out / f"rank{self.acc.process_index}.pt")
        return summary


def _worker(out: Path, config: str, overrides: list[str]):
    AcceleratorState._reset_state(True)  # the forked child must not reuse the parent's single-process state
    rank = torch.distributed.get_rank()  # the launcher's process group; accelerate's state starts in the run
    writes, real_open = [], builtins.open

    def recording_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not str(file).startswith(str(out)):
            writes.append(str(file))
        return real_open(file, mode, *args, **kwargs)

    if rank != 0:
        builtins.open = io.open = recording_open
    _RecordingTrainer.out = out
    fdistill.run.Trainer = _RecordingTrainer
    try:
        cfg, options = load_config(config, overrides)
        run_experiment(cfg, options, progress=False)
    finally:
        builtins.open = io.open = real_open
        fdistill.run.Trainer = Trainer
    (out / f"writes{rank}.json").write_text(json.dumps(writes))


def _launch(tmp_path: Path, name: str, extra: list[str], config: str = TINY, common: list[str] = COMMON) -> Path:
    """Run the debug launcher in a fresh interpreter: forking a process whose OpenMP threads already ran
    (any earlier test) leaves the children hanging in their first parallel region."""
    out = tmp_path / f"{name}_out"
    out.mkdir()
    args = [sys.executable, __file__, str(out), config, *common, f"run.dir={tmp_path / name}", *extra]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def replicated(tmp_path_factory) -> tuple[Path, Path]:
    """(launch outputs, run dir) of the 2-process run without FSDP, shared by the tests."""
    root = tmp_path_factory.mktemp("replicated")
    return _launch(root, "ddp", []), root / "ddp"


def test_two_processes_match_each_other_and_one_process(replicated, tmp_path):
    out, run = replicated
    rank0, rank1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    for k, v in rank0["student"].items():
        assert torch.equal(v, rank1["student"][k]), k
    for name, shadow in rank0["ema"].items():
        assert all(torch.equal(v, rank1["ema"][name][k]) for k, v in shadow.items()), name

    written = json.loads((out / "writes1.json").read_text())
    assert all(Path(w).name in (".write_test_1", "random_states_1.pkl") for w in written), written
    assert (run / "metrics.json").is_file() and (run / "checkpoints" / "step-00000012").is_dir()

    # one process with 2 accumulation micro-batches of 32: the same global batch and micro-batch seeds
    cfg, options = load_config(TINY, [*COMMON, f"run.dir={tmp_path / 'single'}"])
    run_experiment(cfg, options, progress=False)
    single = load_file(str(tmp_path / "single" / "student.safetensors"))
    assert single.keys() == rank0["student"].keys()
    for k, v in single.items():
        torch.testing.assert_close(v, rank0["student"][k], rtol=1e-4, atol=1e-5)


def test_a_two_process_checkpoint_resumes_on_one_process_or_is_refused(replicated, tmp_path):
    """Resuming needs the same micro-batches per step (each runs under its own seed): 2 processes x 1 becomes
    1 process x 2 with the same device batch, which continues the run; another layout is refused in one line."""
    out, run = replicated
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    step10 = str(resumed / "checkpoints" / "step-00000010")
    cfg, options = load_config(TINY, [*COMMON, f"run.dir={resumed}"])
    run_experiment(cfg, options, progress=False, resume=step10)
    rank0 = torch.load(out / "rank0.pt")
    for k, v in load_file(str(resumed / "student.safetensors")).items():
        torch.testing.assert_close(v, rank0["student"][k], rtol=1e-4, atol=1e-5)
    AcceleratorState._reset_state(True)
    layout = [c for c in COMMON if not c.startswith("train.device_batch_size")]
    cfg, options = load_config(TINY, [*layout, f"run.dir={resumed}"])
    with pytest.raises(ConfigError, match="written with 2 micro-batches per step .* this launch has 1"):
        run_experiment(cfg, options, progress=False, resume=step10)


def test_fsdp_matches_replicated_training(replicated, tmp_path):
    ddp = torch.load(replicated[0] / "rank0.pt")
    fsdp = torch.load(_launch(tmp_path, "fsdp", ["train.fsdp=true"]) / "rank0.pt")
    for k, v in ddp["student"].items():
        torch.testing.assert_close(fsdp["student"][k], v, rtol=1e-4, atol=1e-5)
    for name, shadow in ddp["ema"].items():
        for k, v in shadow.items():
            torch.testing.assert_close(fsdp["ema"][name][k], v, rtol=1e-4, atol=1e-5)
    exported = load_file(str(tmp_path / "fsdp" / "student.safetensors"))
    for k, v in exported.items():
        assert torch.equal(v, fsdp["student"][k]), k



def test_fsdp_shards_the_shared_base_and_matches_replicated_training(tmp_path):
    """LoRA student and fake score on the digits teacher's one base: with FSDP each process holds half of the
    frozen base, and the adapters end where replicated training leaves them."""
    lora = [*DIGITS_LORA, "student.lora={rank: 4}", "fake_score.lora={rank: 4}"]
    ddp = torch.load(_launch(tmp_path, "lora_ddp", [], DIGITS, lora) / "rank0.pt")
    fsdp = torch.load(_launch(tmp_path, "lora_fsdp", ["train.fsdp=true"], DIGITS, lora) / "rank0.pt")
    assert ddp["teacher_held"] == ddp["teacher_numel"]
    assert fsdp["teacher_held"] < 0.55 * fsdp["teacher_numel"]
    assert fsdp["student"].keys() == ddp["student"].keys() and all(".lora_" in k for k in ddp["student"])
    for k, v in ddp["student"].items():
        torch.testing.assert_close(fsdp["student"][k], v, rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
    debug_launcher(_worker, args=(Path(sys.argv[1]), sys.argv[2], sys.argv[3:]), num_processes=2)
