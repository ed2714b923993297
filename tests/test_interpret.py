import torch

from softprompt.interpret import nearest_tokens, token_embedding_table
from softprompt.prompt import SoftPrompt
from softprompt.tasks import TaskSpec

TASK = TaskSpec(template="Review: {text}\nSentiment:", labels=["negative", "positive"], verbalizer=[" dog", " fox"])


def test_a_token_embedding_is_its_own_nearest_neighbour(tiny_backbone):
    ids = [tiny_backbone.tokenize(" dog")[0], tiny_backbone.tokenize("the")[0]]
    vectors = tiny_backbone.embed(torch.tensor(ids)).float() * 3  # scale does not matter to cosine
    prompt = SoftPrompt(vectors, tiny_backbone.name, tiny_backbone.fingerprint, TASK)
    rows = nearest_tokens(tiny_backbone, prompt, top=3)
    assert [row.tokens[0] for row in rows] == [" dog", "the"]
    assert abs(rows[0].similarities[0] - 1) < 1e-4
    assert rows[0].label_words == ["dog"] and rows[1].label_words == []


def test_table_goes_through_the_embedding_module():
    from conftest import make_backbone

    gemma = make_backbone("gemma3")  # scales embeddings inside the module
    table = token_embedding_table(gemma, chunk=100)
    torch.testing.assert_close(table, gemma.embed(torch.arange(gemma.vocab_size)).float())
    assert not torch.allclose(table, gemma.model.get_input_embeddings().weight.float())
