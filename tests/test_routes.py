"""routes.py: the planner's choice for each kind of batch, and every route giving the same numbers."""

import pytest
import torch
from test_backbone import training_batch

from softprompt.routes import Route


def test_plan_picks_each_route_from_the_batch_and_the_model():
    from softprompt.routes import BatchFacts, plan

    def facts(**changes):
        base = dict(prompts_to_run=False, prompt_slots=6, plain_tensors_fit=True,
                    checkpointing=False, drops_padding=True, rows_padded=True)
        return BatchFacts(**{**base, **changes})

    assert plan(facts(prompts_to_run=True)) == Route.PACKED  # training: the prompt changes every step
    # prompts that cannot be packed (a family without plain-tensor prompts, or past a sliding window)
    assert plan(facts(prompts_to_run=True, plain_tensors_fit=False)) == Route.CACHE_OBJECT
    assert plan(facts(prompts_to_run=True, plain_tensors_fit=False, checkpointing=True)) == Route.CONCAT
    assert plan(facts(prompts_to_run=True, checkpointing=True)) == Route.PACKED  # packing survives checkpointing
    # precomputed keys/values (evaluation, serving)
    assert plan(facts()) == Route.RAGGED  # CPU, padded rows: the padding does not run
    assert plan(facts(rows_padded=False)) == Route.PLAIN
    assert plan(facts(drops_padding=False, rows_padded=False)) == Route.PLAIN  # GPU: padding is not asked about
    assert plan(facts(plain_tensors_fit=False)) == Route.CACHE_OBJECT
    assert plan(facts(prompt_slots=0)) == Route.CACHE_OBJECT  # nothing in front (no BOS, no prompt): no cache


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_every_route_gives_the_same_scores_and_gradients(arch):
    """routes.py: prompts and tokens packed in one pass (training), precomputed prompt keys/values as plain tensors
    (evaluation, serving; the rows' padding dropped or not), the transformers DynamicCache fallback and the concat
    reference give the same log-probs and prompt gradient, with mixed prompts and padding; and the planner picks
    packed for prompt tensors and ragged for a padded batch after precomputed keys/values (CPU)."""
    from conftest import make_backbone

    from softprompt.routes import Rows, plan

    backbone = make_backbone(arch)
    assert backbone.takes_plain_prompt_tensors and backbone.drops_padding  # the CPU default
    backbone.model.config.sliding_window = 64 if arch == "gemma3" else None  # the whole prefix fits the window
    batch = training_batch(backbone)
    prompts = (torch.randn(2, 5, backbone.d_model) * 0.5).requires_grad_(True)
    index = torch.tensor([0, 1, 1, 0])
    results = []
    for route, precomputed in [(Route.PACKED, False), (Route.RAGGED, True), (Route.PLAIN, True),
                               (Route.CACHE_OBJECT, True), (Route.CACHE_OBJECT, False), (Route.CONCAT, False)]:
        cache = backbone.prompt_cache(prompts) if precomputed else None
        if route in (Route.PACKED, Route.RAGGED):  # what the planner picks on its own for these inputs
            rows = Rows(batch.input_ids, batch.attention_mask, index, None if precomputed else prompts, cache)
            assert plan(backbone.batch_facts(rows)) == route
        logprobs = backbone.target_logprobs(batch, prompts, index, cache=cache, route=route)
        (grad,) = torch.autograd.grad(-logprobs.sum(), prompts)
        results.append((logprobs.detach(), grad))
    for logprobs, grad in results[1:]:
        torch.testing.assert_close(logprobs, results[0][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grad, results[0][1], atol=1e-5, rtol=1e-4)


def test_plain_prompt_tensors_step_aside_when_a_sliding_window_is_too_short():
    from conftest import make_backbone

    from softprompt import prompt_attention

    backbone = make_backbone("gemma3")  # sliding_window=16: the existing equivalence tests run past it
    assert prompt_attention.fits(backbone.model, 16) and not prompt_attention.fits(backbone.model, 17)


def test_the_concat_route_needs_the_prompt_embeddings(llama_backbone):
    """A deep prompt (or a bank's cache) is keys/values only: the reference route has nothing to concatenate."""
    from softprompt.errors import SoftPromptError
    from softprompt.prompt import prompt_cache

    deep = llama_backbone.deep_prompt_from_embeddings(torch.randn(3, llama_backbone.d_model))
    cache = prompt_cache(llama_backbone, "prefix", deep)
    with pytest.raises(SoftPromptError, match="the concat route puts prompt embeddings in front of the tokens"):
        llama_backbone.target_logprobs(training_batch(llama_backbone), cache=cache, route=Route.CONCAT)
