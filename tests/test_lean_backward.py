"""The lean backward (lean_backward.py): same scores, same prompt gradients, fewer bytes kept for backward."""

import threading

import pytest
import torch
from conftest import make_backbone
from test_backbone import TEXTS, training_batch
from torch import nn

from softprompt import lean_backward
from softprompt.routes import Route


def lean_modules(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if "forward" in m.__dict__)


def recognised_modules(model: nn.Module) -> int:
    names = set(lean_backward.NORMS) | lean_backward.GATED_MLPS
    return sum(1 for m in model.modules() if type(m).__name__ in names)


def scores_and_prompt_gradient(backbone, prompts, path):
    batch = training_batch(backbone, TEXTS)
    trainable = prompts.clone().requires_grad_(True)
    logprobs = backbone.target_logprobs(batch, trainable, torch.tensor([0, 1, 1, 0]),
                                        route=None if path == "cached" else Route.CONCAT)
    (grad,) = torch.autograd.grad(-logprobs.sum(), trainable)
    return logprobs.detach(), grad


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("path", ["cached", "concat"])
def test_same_scores_and_prompt_gradients(arch, path):
    lean, reference = make_backbone(arch), make_backbone(arch)
    lean_backward.remove(reference.model)
    assert lean_modules(lean.model) == recognised_modules(lean.model) > 0  # every norm and MLP, Gemma's q/k norms too
    assert lean_modules(reference.model) == 0
    prompts = torch.randn(2, 3, lean.d_model) * 0.5
    lean_scores, lean_grad = scores_and_prompt_gradient(lean, prompts, path)
    reference_scores, reference_grad = scores_and_prompt_gradient(reference, prompts, path)
    assert torch.equal(lean_scores, reference_scores)  # the forward arithmetic is op for op the same
    torch.testing.assert_close(lean_grad, reference_grad, atol=1e-6, rtol=1e-5)


def saved_bytes(backbone, prompts) -> int:
    """Bytes autograd keeps for the backward pass of one packed training step (weights excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in backbone.model.parameters()}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    batch = training_batch(backbone, TEXTS)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        backbone.target_logprobs(batch, prompts.requires_grad_(True), torch.tensor([0, 1, 1, 0]))
    return sum(kept.values()), batch.input_ids.numel()


def test_bf16_weights_keep_less_for_the_backward_pass():
    """Per position: each RMSNorm keeps its bf16 input instead of an fp32 copy (2 bytes less per feature), each
    MLP two of its three [positions, intermediate] bf16 tensors."""
    lean, reference = make_backbone("llama"), make_backbone("llama")
    for backbone in (lean, reference):
        backbone.model.to(torch.bfloat16)
    lean_backward.remove(reference.model)
    prompts = torch.randn(2, 3, lean.d_model)
    lean_kept, tokens = saved_bytes(lean, prompts)
    reference_kept, _ = saved_bytes(reference, prompts)
    config = lean.model.config
    positions = tokens + 2 * 3  # the packed row: both prompts, then every token row
    norms = 2 * config.num_hidden_layers + 1
    expected = positions * (norms * config.hidden_size * 2 + config.num_hidden_layers * config.intermediate_size * 2)
    assert reference_kept - lean_kept == expected
    with lean_backward.disabled():  # what benchmarks run PEFT under
        assert saved_bytes(lean, prompts)[0] == reference_kept


def test_disabled_reaches_the_threads_that_recompute_checkpointed_layers():
    """On CUDA autograd runs the backward, and so the recomputation of checkpointed layers, in its own threads: they
    must run the same forward as the pass they recompute (a lean recomputation of a plain forward keeps fewer
    tensors, and checkpointing refuses it)."""
    lean, reference = make_backbone("llama"), make_backbone("llama")
    lean_backward.remove(reference.model)
    prompts = torch.randn(2, 3, lean.d_model)
    gradients = []
    for backbone in (lean, reference):
        trainable = prompts.clone().requires_grad_(True)
        with lean_backward.disabled(), backbone.activation_checkpointing():
            logprobs = backbone.target_logprobs(training_batch(backbone, TEXTS), trainable, torch.tensor([0, 1, 1, 0]))
            backward = threading.Thread(target=logprobs.sum().backward)
            backward.start()
            backward.join()
        gradients.append(trainable.grad)
    assert gradients[0] is not None
    torch.testing.assert_close(gradients[0], gradients[1])


def test_trainable_weights_take_their_own_forward():
    """Model tuning trains the weights: the lean functions step aside and weight gradients flow as before."""
    lean, reference = make_backbone("llama"), make_backbone("llama")
    lean_backward.remove(reference.model)
    gradients = []
    for backbone in (lean, reference):
        backbone.model.requires_grad_(True)
        batch = training_batch(backbone, TEXTS)
        prompts = torch.zeros(1, 2, backbone.d_model)
        backbone.target_logprobs(batch, route=Route.CONCAT, prompts=prompts).sum().backward()
        layer = backbone.model.model.layers[0]
        gradients.append((layer.input_layernorm.weight.grad, layer.mlp.up_proj.weight.grad))
    for lean_grad, reference_grad in zip(*gradients):
        assert lean_grad is not None
        torch.testing.assert_close(lean_grad, reference_grad)


def test_a_module_with_other_arithmetic_keeps_its_own_forward():
    class LlamaRMSNorm(nn.Module):  # same name as transformers', different arithmetic
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return self.weight * x / x.abs().max()

    norm = LlamaRMSNorm()
    assert lean_backward.install(norm) == 0
    assert "forward" not in norm.__dict__


def test_compiling_hands_the_modules_back():
    backbone = make_backbone("llama")
    backbone.compile()
    assert lean_modules(backbone.model) == 0


def test_a_dropped_model_frees_its_weights_without_waiting_for_the_garbage_collector():
    # A module holding its own lean forward would be a reference cycle: every MLP's weights (half a 1B model) stayed
    # allocated after the model was dropped, until Python's next full collection.
    import gc
    import weakref

    backbone = make_backbone("llama")
    assert lean_modules(backbone.model) > 0
    mlp_weight = weakref.ref(backbone.model.model.layers[0].mlp.gate_proj.weight)
    model = weakref.ref(backbone.model)
    gc.disable()
    try:
        del backbone
        assert model() is None and mlp_weight() is None
    finally:
        gc.enable()


def test_a_deep_copied_model_runs_its_own_weights():  # model tuning trains a deep copy of the frozen model
    import copy

    backbone = make_backbone("llama")
    original = backbone.model.model.layers[0].mlp
    copied = copy.deepcopy(backbone.model).model.layers[0].mlp
    assert isinstance(copied.__dict__["forward"], lean_backward._LeanForward)
    with torch.no_grad():
        copied.down_proj.weight.zero_()
    x = torch.randn(1, 3, original.gate_proj.in_features, requires_grad=True)
    assert torch.count_nonzero(copied(x)) == 0
    assert torch.count_nonzero(original(x)) > 0
