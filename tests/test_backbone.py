import pytest
import torch

from softprompt.backbone import TokenBatch
from softprompt.data import Example, TaskTokenizer
from softprompt.routes import Route
from softprompt.tasks import TaskSpec

TASK = TaskSpec(name="sentiment", template="Review: {text}\nSentiment:", labels=["negative", "positive"])
TEXTS = ["a great movie", "dull, boring and far too long for what it is", "wit", "the lazy dog sleeps"]


def training_batch(backbone, texts=TEXTS):
    task_tokenizer = TaskTokenizer(backbone, TASK)
    examples = [Example({"text": t}, i % 2, None, f"row {i}") for i, t in enumerate(texts)]
    return task_tokenizer.training_batch(task_tokenizer.encode_all(examples))


def test_every_base_weight_is_frozen(tiny_backbone):
    assert all(not p.requires_grad for p in tiny_backbone.model.parameters())


def test_batch_is_padded(tiny_backbone):
    batch = training_batch(tiny_backbone)
    lengths = batch.attention_mask.sum(1)
    assert lengths.min() < lengths.max()  # the fast path must handle right padding


@pytest.mark.parametrize("mixed", [False, True])
def test_cached_path_equals_concat_reference(tiny_backbone, mixed):
    """Loss and prompt gradient of the cached-KV path match the plain concatenation path (atol 1e-5)."""
    batch = training_batch(tiny_backbone)
    prompts = (torch.randn(3 if mixed else 1, 5, tiny_backbone.d_model) * 0.5).requires_grad_(True)
    index = torch.tensor([0, 2, 1, 2]) if mixed else None
    results = []
    for route in [None, Route.CONCAT]:  # None: the planned route
        logprobs = tiny_backbone.target_logprobs(batch, prompts, index, route=route)
        (grad,) = torch.autograd.grad(-logprobs.sum(), prompts)
        results.append((logprobs.detach(), grad))
    (cached, cached_grad), (concat, concat_grad) = results
    torch.testing.assert_close(cached, concat, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cached_grad, concat_grad, atol=1e-5, rtol=1e-4)
    assert cached_grad.abs().sum() > 0
    if mixed:
        assert cached_grad[1].abs().sum() > 0 and cached_grad[2].abs().sum() > 0








def test_target_logprobs_equal_full_logit_scoring(tiny_backbone):
    """Logits at the target positions only == the model's own full [B, T, V] logits at those positions."""
    batch = training_batch(tiny_backbone)
    bos = tiny_backbone.bos_ids
    ids = torch.cat([torch.tensor(bos, dtype=torch.long).expand(len(TEXTS), len(bos)), batch.input_ids], 1)
    mask = torch.cat([torch.ones(len(TEXTS), len(bos), dtype=torch.long), batch.attention_mask], 1)
    with torch.no_grad():
        full = tiny_backbone.model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
        ours = tiny_backbone.target_logprobs(batch)
    expected = full[batch.target_rows, batch.target_positions + len(bos), batch.target_ids]
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def test_gradient_reaches_only_the_prompt(llama_backbone):
    batch = training_batch(llama_backbone)
    prompt = torch.nn.Parameter(torch.randn(1, 4, llama_backbone.d_model))
    loss = -llama_backbone.target_logprobs(batch, prompt).sum()
    loss.backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in llama_backbone.model.parameters())


def test_gemma_bos_goes_before_the_prompt():
    from conftest import make_backbone

    backbone = make_backbone("gemma3")
    assert backbone.bos_ids == [2]
    prefix = backbone.prompt_embeddings(torch.zeros(1, 3, backbone.d_model))
    assert prefix.shape[1] == 4
    # Gemma scales embeddings inside the module: the BOS row is the scaled one, not the raw weight.
    raw = backbone.model.get_input_embeddings().weight[2]
    assert not torch.allclose(prefix[0, 0], raw)
    torch.testing.assert_close(prefix[0, 0], backbone.embed(torch.tensor([2]))[0])





def test_a_left_padded_batch_is_refused():
    from softprompt.errors import SoftPromptError

    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(SoftPromptError, match="must be right-padded"):
        TokenBatch(ids, torch.tensor([[1, 1, 1], [0, 1, 1]]), torch.tensor([0]), torch.tensor([2]), torch.tensor([3]))
    TokenBatch(ids, torch.tensor([[1, 1, 1], [1, 1, 0]]), torch.tensor([0]), torch.tensor([2]), torch.tensor([3]))


def test_fingerprint_identifies_the_embedding_matrix():
    from conftest import make_backbone

    assert make_backbone("llama", seed=0).fingerprint == make_backbone("llama", seed=0).fingerprint
    assert make_backbone("llama", seed=0).fingerprint != make_backbone("llama", seed=1).fingerprint


def test_greedy_generation_matches_full_forward(llama_backbone):
    ids = llama_backbone.tokenize("Question: what is two plus two?\nAnswer:")
    prompt = torch.randn(3, llama_backbone.d_model)
    prefix = llama_backbone.prompt_cache(prompt.unsqueeze(0))
    (generated,) = llama_backbone.generate([ids], prefix, max_new_tokens=5, stop_ids=set())
    sequence = list(ids)
    with torch.no_grad():
        for _ in range(5):
            embeds = torch.cat([prompt.unsqueeze(0), llama_backbone.embed(torch.tensor([sequence]))], 1)
            logits = llama_backbone.model(inputs_embeds=embeds).logits
            sequence.append(int(logits[0, -1].argmax()))
    assert generated == sequence[len(ids):]


def test_batched_greedy_generation_equals_each_row_alone(tiny_backbone):
    """Rows of different lengths decoded together (right-padded, each at its own positions) produce what each
    produces alone, stop tokens included; a sliding window too short for the padded batch decodes row by row."""
    windowed = getattr(tiny_backbone.model.config, "sliding_window", None) is not None  # Gemma3's local layers
    if windowed:
        tiny_backbone.model.config.sliding_window = 64  # the batch fits: it decodes together
    with torch.no_grad():  # sharper attention than the tiny init's near-uniform one, so positions matter
        for module in tiny_backbone.model.modules():
            if hasattr(module, "q_proj"):
                module.q_proj.weight.mul_(16)
                module.k_proj.weight.mul_(16)
    long = " ".join(["Question: what is two plus two?"] * 4) + "\nAnswer:"
    rows = [tiny_backbone.tokenize(text) for text in [long, "wit", "a b c"]]
    prefix = tiny_backbone.prompt_cache(torch.randn(1, 3, tiny_backbone.d_model))
    alone = [tiny_backbone.generate([row], prefix, max_new_tokens=6, stop_ids=set())[0] for row in rows]
    assert len({tuple(tokens) for tokens in alone}) > 1  # different inputs, different answers
    assert tiny_backbone.generate(rows, prefix, max_new_tokens=6, stop_ids=set()) == alone
    stop = {alone[0][2], alone[1][0]}  # rows stop at different steps
    expected = [[token for token in tokens[: next((i for i, t in enumerate(tokens) if t in stop), len(tokens))]]
                for tokens in alone]
    assert tiny_backbone.generate(rows, prefix, max_new_tokens=6, stop_ids=stop) == expected
    if windowed:
        tiny_backbone.model.config.sliding_window = 8
        batched = []
        original = tiny_backbone.generate
        tiny_backbone.generate = lambda rows, *args: batched.append(len(rows)) or original(rows, *args)
        original(rows, prefix, 6, set())
        assert batched == [1, 1, 1]


def test_batched_generation_mixes_prompts_and_budgets(tiny_backbone):
    """Rows after different prompts (2 and 5 slots, left-padded into one cache) with their own token budgets decode
    as each does alone after its own prompt."""
    from softprompt.backbone import PromptCache

    if getattr(tiny_backbone.model.config, "sliding_window", None) is not None:
        tiny_backbone.model.config.sliding_window = 64  # the batch fits: it decodes together
    with torch.no_grad():  # sharper attention, so that positions and prompts matter
        for module in tiny_backbone.model.modules():
            if hasattr(module, "q_proj"):
                module.q_proj.weight.mul_(16)
                module.k_proj.weight.mul_(16)
    short, long = (tiny_backbone.prompt_cache(torch.randn(1, k, tiny_backbone.d_model) * 4) for k in (2, 5))
    rows = [tiny_backbone.tokenize(text) for text in ["Question: what is two plus two?\nAnswer:", "wit", "a b c"]]
    prompt_index, budgets = [1, 0, 1], [6, 3, 5]
    alone = [tiny_backbone.generate([row], (short, long)[index], budget, set())[0]
             for row, index, budget in zip(rows, prompt_index, budgets)]
    assert [len(tokens) for tokens in alone] == budgets
    assert alone[1] != tiny_backbone.generate([rows[1]], long, 3, set())[0]  # the prompt changes the answer
    mixed = tiny_backbone.generate(rows, PromptCache.stack([short, long]), budgets, set(), prompt_index)
    assert mixed == alone


@pytest.mark.parametrize("drops_padding", [True, False])
def test_prompts_of_different_lengths_share_one_padded_cache(tiny_backbone, drops_padding):
    """A bank of prompts with different K, padded into one cache, scores each row as its own prompt alone (with
    the rows' own padding dropped, the CPU default, or computed, as on a GPU)."""
    from softprompt.backbone import PromptCache

    tiny_backbone.drops_padding = drops_padding
    batch = training_batch(tiny_backbone)
    short, long = torch.randn(1, 2, tiny_backbone.d_model), torch.randn(1, 6, tiny_backbone.d_model)
    with torch.no_grad():
        stacked = PromptCache.stack([tiny_backbone.prompt_cache(short), tiny_backbone.prompt_cache(long)])
        mixed = tiny_backbone.target_logprobs(batch, prompt_index=torch.tensor([0, 1, 1, 0]), cache=stacked)
        alone = {k: tiny_backbone.target_logprobs(batch, p) for k, p in [(0, short), (1, long)]}  # packed pass
        precomputed = {k: tiny_backbone.target_logprobs(batch, cache=tiny_backbone.prompt_cache(p))
                       for k, p in [(0, short), (1, long)]}  # one prompt, no padded slot: lower-right causal
    assert stacked.padded and not tiny_backbone.prompt_cache(short).padded  # masked vs mask-free attention
    for row, prompt in enumerate([0, 1, 1, 0]):
        selected = batch.target_rows == row
        torch.testing.assert_close(mixed[selected], alone[prompt][selected], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(precomputed[prompt][selected], alone[prompt][selected], atol=1e-5, rtol=1e-4)


def test_a_device_map_with_a_layer_on_disk_scores_and_trains_like_the_plain_load(tmp_path):
    """accelerate's device_map (frozen weights split over devices, here one layer offloaded to disk) runs the same
    computation: same label scores for mixed prompts, same trained prompt."""
    from conftest import make_backbone

    from softprompt.data import Example, TaskTokenizer
    from softprompt.evaluate import label_scores
    from softprompt.loader import load_model
    from softprompt.tasks import TaskSpec
    from softprompt.train import TrainConfig, train

    saved = make_backbone("llama")
    saved.model.save_pretrained(tmp_path / "tiny")
    saved.tokenizer.save_pretrained(tmp_path / "tiny")
    plain = load_model(str(tmp_path / "tiny"), precision="fp32")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    mapped = load_model(str(tmp_path / "tiny"), precision="fp32", device_map=device_map,
                        offload_folder=str(tmp_path / "offload"))
    assert mapped.model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # really on disk

    task = TaskSpec(name="toy", template="Review: {text}\nSentiment:", labels=["negative", "positive"])
    examples = [Example({"text": f"a {w} movie"}, i % 2, None, "r") for i, w in enumerate(["great", "dull"] * 4)]
    prompts = torch.randn(2, 3, plain.d_model)
    index = torch.tensor([0, 1] * 4)
    scores = [label_scores(b, TaskTokenizer(b, task), TaskTokenizer(b, task).encode_all(examples), prompts=prompts,
                           prompt_index=index) for b in (plain, mapped)]
    torch.testing.assert_close(scores[1], scores[0], atol=1e-5, rtol=1e-5)

    config = TrainConfig(prompt_length=3, batch_size=4, steps=3, eval_every=3, patience=0, valid_limit=None, lr=0.05)
    trained = [train(b, task, examples, examples, tmp_path / f"{i}.safetensors", config, show_progress=False)
               for i, b in enumerate((plain, mapped))]
    torch.testing.assert_close(trained[1].prompt.embeddings, trained[0].prompt.embeddings, atol=1e-5, rtol=1e-5)

    # in bf16, weights a device holds are stored in bf16; offloaded ones stay as stored (accelerate loads them)
    half = load_model(str(tmp_path / "tiny"), precision="bf16", device_map={"": "cpu"})
    assert half.model.model.layers[1].self_attn.q_proj.weight.dtype == torch.bfloat16
    mapped_half = load_model(str(tmp_path / "tiny"), precision="bf16", device_map=device_map,
                             offload_folder=str(tmp_path / "offload-half"))
    assert mapped_half.model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    half_scores = [label_scores(b, TaskTokenizer(b, task), TaskTokenizer(b, task).encode_all(examples), prompts=prompts,
                                prompt_index=index) for b in (half, mapped_half)]
    assert torch.equal(half_scores[0], half_scores[1])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])  # Gemma3 ties its head to the input embeddings
def test_a_half_precision_load_stores_linear_weights_in_half_with_the_same_numbers(arch, tmp_path):
    """load_model(precision="bf16") keeps the frozen linear weights in bf16, rounded as autocast rounds fp32 weights
    at every call: log-probs and prompt gradients equal (bit for bit) those of fp32 weights under bf16 autocast,
    for the packed training pass and precomputed keys/values. The embeddings stay fp32 (same fingerprint), and a
    tied head gets its own bf16 copy."""
    from conftest import make_backbone

    from softprompt.loader import load_model

    saved = make_backbone(arch)
    saved.model.save_pretrained(tmp_path)
    saved.tokenizer.save_pretrained(tmp_path)
    reference = load_model(str(tmp_path), precision="fp32")
    reference.precision = "bf16"  # autocast over the fp32 weights
    half = load_model(str(tmp_path), precision="bf16")
    linears = [m for m in half.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    embeddings = half.model.get_input_embeddings().weight
    assert embeddings.dtype == torch.float32 and half.fingerprint == reference.fingerprint
    assert half.lm_head.weight is not embeddings and half.lm_head.weight.dtype == torch.bfloat16
    assert (reference.lm_head.weight is reference.model.get_input_embeddings().weight) == (arch == "gemma3")

    batch = training_batch(half)
    prompts = torch.randn(2, 3, half.d_model) * 0.5
    index = torch.tensor([0, 1, 1, 0])
    for precomputed in (False, True):
        results = []
        for backbone in (reference, half):
            leaf = prompts.clone().requires_grad_(True)
            kv = backbone.prompt_cache(leaf) if precomputed else None
            logprobs = backbone.target_logprobs(batch, leaf, index, cache=kv)
            (grad,) = torch.autograd.grad(-logprobs.sum(), leaf)
            results.append((logprobs.detach(), grad))
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1]), precomputed


def test_compiled_layers_give_the_same_scores_and_gradients():
    """`Backbone.compile` (regional torch.compile, dynamic shapes) changes speed, not numbers: the packed training
    pass for two batch lengths and mixed prompts, then scoring from precomputed prompt keys/values (run eagerly).
    The two decoder layers share ONE compiled graph, which is what keeps compile time flat in depth."""
    from conftest import make_backbone
    from torch._dynamo.utils import counters

    reference, compiled = make_backbone("llama"), make_backbone("llama")
    torch._dynamo.reset()
    counters.clear()
    compiled.compile()
    compiled.compile()  # a second call changes nothing
    prompts = torch.randn(2, 3, reference.d_model) * 0.5
    for texts in (TEXTS, TEXTS[:2]):
        results = []
        for backbone in (reference, compiled):
            batch = training_batch(backbone, texts)
            index = torch.tensor([0, 1, 1, 0])[: len(texts)]
            trainable = prompts.clone().requires_grad_(True)
            logprobs = backbone.target_logprobs(batch, trainable, index)
            (grad,) = torch.autograd.grad(-logprobs.sum(), trainable)
            with torch.no_grad():
                scored = backbone.target_logprobs(batch, prompt_index=index,
                                                  cache=backbone.prompt_cache(prompts))
            results.append((logprobs.detach(), grad, scored))
        for reference_result, compiled_result in zip(*results):
            torch.testing.assert_close(compiled_result, reference_result, atol=1e-5, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1


def checkpointed_step(backbone, batch, trainable, checkpointing, inputs):
    """Scores and the gradient of `trainable` (prompts, or deep prompts: `inputs()` builds target_logprobs'
    arguments), with or without activation checkpointing, and whether layer 0's attention ran again in the
    backward pass (its activations recomputed)."""
    import contextlib

    calls = []
    handle = backbone.model.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    try:
        with backbone.activation_checkpointing() if checkpointing else contextlib.nullcontext():
            logprobs = backbone.target_logprobs(batch, **inputs())
            forward_calls = len(calls)
            (grad,) = torch.autograd.grad(-logprobs.sum(), trainable)
    finally:
        handle.remove()
    return logprobs.detach(), grad, len(calls) > forward_calls


def assert_same_step(checkpointed, reference):
    torch.testing.assert_close(checkpointed[0], reference[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(checkpointed[1], reference[1], atol=1e-6, rtol=1e-5)


SHORT_TEXTS = [TEXTS[0], TEXTS[2], TEXTS[3]]  # with BOS and 3 prompt slots, within tiny Gemma3's 16-token window


def test_activation_checkpointing_recomputes_the_packed_pass_with_the_same_numbers(tiny_backbone, packed_calls):
    """Checkpointed layers keep the packed training pass (prompt and tokens in one pass, prompt keys/values as
    plain tensors): same scores and prompt gradient, every layer's packed attention run again in the backward."""
    batch = training_batch(tiny_backbone, SHORT_TEXTS)
    prompts = (torch.randn(1, 3, tiny_backbone.d_model) * 0.5).requires_grad_()
    results, packed = {}, {}
    for checkpointing in (False, True):
        packed_calls.clear()
        results[checkpointing] = checkpointed_step(tiny_backbone, batch, prompts, checkpointing,
                                                   lambda: dict(prompts=prompts))
        packed[checkpointing] = len(packed_calls)
    assert_same_step(results[True], results[False])
    assert (results[False][2], results[True][2]) == (False, True)
    layers = tiny_backbone.model.config.num_hidden_layers
    assert (packed[False], packed[True]) == (layers, 2 * layers)
    assert not any(layer.training for layer in tiny_backbone.model.model.layers)  # switched back off


def test_activation_checkpointing_where_a_prompt_needs_a_cache_object():
    """Checkpointed layers drop a transformers cache object. Prompts then take the concat path (still
    checkpointed); deep prompts, which only a cache object can carry there, run that pass without checkpointing.
    Either way the numbers are those of the run without checkpointing. Cases: a family without plain-tensor
    prefixes, and tiny Gemma3 (with BOS) with inputs past its sliding window."""
    from conftest import make_backbone

    from softprompt.prompt import prompt_cache

    no_plain_prefix = make_backbone("llama")
    no_plain_prefix.takes_plain_prompt_tensors = False
    for backbone in (no_plain_prefix, make_backbone("gemma3")):
        batch = training_batch(backbone)  # the long text runs past Gemma3's window
        prompts = (torch.randn(1, 3, backbone.d_model) * 0.5).requires_grad_()
        deep = backbone.deep_prompt_from_embeddings(prompts[0].detach()).requires_grad_()
        cases = ((prompts, lambda prompts=prompts: dict(prompts=prompts), True),
                 (deep, lambda backbone=backbone, deep=deep: dict(cache=prompt_cache(backbone, "prefix", deep)),
                  False))
        for trainable, inputs, recomputed in cases:
            reference = checkpointed_step(backbone, batch, trainable, False, inputs)
            checkpointed = checkpointed_step(backbone, batch, trainable, True, inputs)
            assert_same_step(checkpointed, reference)
            assert checkpointed[2] == recomputed, (backbone.name, recomputed)


def test_deep_prompts_are_checkpointed_where_they_reach_attention_as_plain_tensors(tiny_backbone):
    """(Gemma3's BOS keys/values come from a pass of their own, which checkpointing must not strip of its cache.)"""
    from softprompt.prompt import prompt_cache

    batch = training_batch(tiny_backbone, SHORT_TEXTS)
    deep = tiny_backbone.deep_prompt_from_embeddings(torch.randn(3, tiny_backbone.d_model) * 0.5).requires_grad_()
    results = [checkpointed_step(tiny_backbone, batch, deep, checkpointing,
                                 lambda: dict(cache=prompt_cache(tiny_backbone, "prefix", deep)))
               for checkpointing in (False, True)]
    assert_same_step(results[1], results[0])
    assert (results[0][2], results[1][2]) == (False, True)


def test_precision_choices_and_the_auto_default():
    from softprompt.backbone import cpu_has_bf16, resolve_precision
    from softprompt.errors import SoftPromptError

    cpu = torch.device("cpu")
    with pytest.warns(UserWarning, match="fp16 on a CPU is emulated"):
        assert resolve_precision("fp16", cpu) == "fp16"
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_bf16() else "fp32")
    with pytest.raises(SoftPromptError, match="unknown precision 'int8'; choose auto, bf16, fp16 or fp32"):
        resolve_precision("int8", cpu)
