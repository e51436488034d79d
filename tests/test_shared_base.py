"""One frozen base for teacher, student and fake score (``student.lora``, ``fake_score.lora``): every objective's
steps equal those of separate copies, with activation checkpointing on and off; the base's weights are stored once;
frozen weights in low precision keep the trained weights in float32."""

import copy

import pytest
import torch
from torch.utils.checkpoint import CheckpointError

from fdistill.containers import Networks
from fdistill.networks.denoisers import DiffusersDenoiser
from fdistill.networks.lora import AdapterDenoiser, is_adapter_weight
from fdistill.objectives import OBJECTIVES
from tests.helpers import batches, randomise_adapters, tiny_unet_experiment

ADAPTERS = ["student.lora.rank=2"]
FAKE_SCORE_ADAPTER = ["fake_score.lora.rank=2"]


def lora_experiment(name, *overrides):
    fake = FAKE_SCORE_ADAPTER if OBJECTIVES[name][0].needs_fake_score else []
    return tiny_unet_experiment(name, *ADAPTERS, *fake, *overrides)


def unwrapped(net):
    """The denoiser inside a student generator, a TrigFlow wrapper or guidance."""
    while isinstance(getattr(net, "net", None), torch.nn.Module):
        net = net.net
    return net


def separate_copies(nets: Networks) -> Networks:
    """The same networks, each with its own copy of the frozen weights and no activation checkpointing."""
    separate = Networks(**{name: copy.deepcopy(net) for name, net in nets.present().items()})
    for net in separate.present().values():
        net = unwrapped(net)
        inner = net.base.denoiser if isinstance(net, AdapterDenoiser) else net
        if isinstance(inner, DiffusersDenoiser):
            inner.read_features(inner.feature_blocks)  # a deep copy's feature hooks still feed the original
            if inner.network.is_gradient_checkpointing:
                inner.network.disable_gradient_checkpointing()
    return separate


def trained(nets: Networks) -> dict[str, torch.nn.Parameter]:
    return {f"{name}.{n}": p for name, net in nets.trainable().items() for n, p in net.named_parameters()}


def step(objective, nets: Networks, kind: str, step_index: int = 0):
    """One step's loss, logs and gradients of every trained parameter, from a fixed seed."""
    for p in trained(nets).values():
        p.grad = None
    torch.manual_seed(step_index + 1)
    batch = next(batches())
    loss_fn = objective.generator_loss if kind == "generator" else objective.critic_loss
    loss, logs = loss_fn(batch, nets, step_index)
    loss.backward()
    return loss.detach(), logs, {n: p.grad for n, p in trained(nets).items() if p.grad is not None}


def assert_same_step(objective, shared: Networks, separate: Networks, kind: str) -> None:
    loss, logs, grads = step(copy.deepcopy(objective), shared, kind)
    loss_ref, logs_ref, grads_ref = step(copy.deepcopy(objective), separate, kind)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys() and grads, kind
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-4, atol=1e-6, msg=f"{kind}: {name}")


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_steps_on_the_shared_base_as_on_separate_copies(name, checkpointing):
    cfg, (nets, objective) = lora_experiment(name, f"train.gradient_checkpointing={checkpointing}")
    assert nets.teacher.network.is_gradient_checkpointing == checkpointing
    for seed, net in enumerate(nets.trainable().values()):
        randomise_adapters(net, seed)  # nonzero adapters, unlike one another
    separate = separate_copies(nets)
    assert unwrapped(separate.student).network is not unwrapped(separate.teacher).network
    for kind in {objective.step_kind(index) for index in range(10)}:  # sCM has no critic
        assert_same_step(objective, nets, separate, kind)


def test_checkpointing_recomputes_with_the_adapter_each_block_ran_with():
    """DMD's generator step runs the student with gradient, then the fake score; the backward pass recomputes the
    student's blocks. Recomputed with whatever adapter is active then (the stock checkpointing function), its
    gradient is wrong; the shared base's own function gives that of separate copies."""
    _, (nets, objective) = lora_experiment("dmd", "train.gradient_checkpointing=true")
    for seed, net in enumerate(nets.trainable().values()):
        randomise_adapters(net, seed)
    separate = separate_copies(nets)
    assert_same_step(objective, nets, separate, "generator")
    nets.teacher.network.enable_gradient_checkpointing()  # diffusers' default: recomputes with no adapter
    _, _, grads_ref = step(copy.deepcopy(objective), separate, "generator")
    try:
        _, _, grads = step(copy.deepcopy(objective), nets, "generator")
    except CheckpointError:  # torch noticed that the recomputed pass differs from the one that ran
        return
    assert any(not torch.allclose(g, grads_ref[n], rtol=1e-3, atol=1e-6) for n, g in grads.items())


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def test_the_shared_base_holds_each_frozen_weight_once():
    _, (nets, _) = lora_experiment("dmd")
    _, (full, _) = tiny_unet_experiment("dmd")
    everything = [p for net in nets.present().values() for p in net.parameters()]
    base = [p for n, p in nets.teacher.named_parameters() if not is_adapter_weight(n)]
    adapters = [p for net in nets.trainable().values() for p in net.parameters()]
    assert all(is_adapter_weight(n) for net in nets.trainable().values() for n, _ in net.named_parameters())
    assert storage_bytes(everything) == storage_bytes(base) + storage_bytes(adapters)
    copies = [p for net in full.present().values() for p in net.parameters()]
    assert storage_bytes(copies) == 3 * storage_bytes(base)  # teacher, student and fake score each hold them
    with torch.no_grad():  # the student computes with the teacher's weights: change one, and its output changes
        x, t = torch.randn(2, 3, 8, 8), torch.full((2,), 500.0)
        before = nets.student.net(x, t)
        base[0].add_(1.0)
        assert not torch.equal(nets.student.net(x, t), before)


def test_the_teacher_runs_with_no_adapter_and_each_network_with_its_own():
    _, (nets, _) = lora_experiment("dmd")
    x, t = torch.randn(2, 3, 8, 8), torch.full((2,), 500.0)
    with torch.no_grad():
        teacher = nets.teacher(x, t)
        assert torch.equal(nets.student.net(x, t), teacher)  # adapters start with a zero output
        randomise_adapters(nets.student, 0)
        student = nets.student.net(x, t)
        assert not torch.equal(student, teacher)
        assert torch.equal(nets.teacher(x, t), teacher)
        assert torch.equal(nets.fake_score(x, t), teacher)
        randomise_adapters(nets.fake_score, 1)
        assert not torch.equal(nets.fake_score(x, t), student)
        assert torch.equal(nets.student.net(x, t), student)


def test_low_precision_frozen_weights_keep_float32_adapters_and_times():
    _, (nets, objective) = lora_experiment("dmd", "teacher.dtype=bf16")
    model = nets.teacher.network
    assert {p.dtype for n, p in model.named_parameters() if not is_adapter_weight(n)} == {torch.bfloat16}
    assert {p.dtype for net in nets.trainable().values() for p in net.parameters()} == {torch.float32}
    x, t = torch.randn(2, 3, 8, 8), torch.full((2,), 999.0)
    with torch.no_grad():  # the timestep reaches the model unrounded (bfloat16 would make 999 into 1000)
        expected = model(x.bfloat16(), torch.full((2,), 999.0)).sample
        assert torch.equal(nets.teacher.network_output(x, t), expected)
        assert not torch.equal(model(x.bfloat16(), torch.full((2,), 1000.0)).sample, expected)
    for kind in ("critic", "generator"):
        loss, _, grads = step(objective, nets, kind)
        assert torch.isfinite(loss) and grads and all(g.dtype == torch.float32 for g in grads.values())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_an_in_place_merge_gives_the_copy_merge_weights_without_a_second_base(dtype):
    from fdistill.networks.lora import _tuner_layers, merged_network

    _, (nets, _) = lora_experiment("dmd", f"teacher.dtype={dtype}")
    randomise_adapters(nets.student, 0)
    student = nets.student.net
    copied = merged_network(student).state_dict()
    base = {id(p) for p in student.network.parameters()}
    in_place = merged_network(student, in_place=True)
    assert in_place is student.network and not _tuner_layers(in_place)
    assert {id(p) for p in in_place.parameters()} <= base  # no weight was copied
    assert in_place.state_dict().keys() == copied.keys()
    assert all(torch.equal(v, copied[k]) for k, v in in_place.state_dict().items())
