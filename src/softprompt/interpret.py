"""What did the prompt learn? Nearest vocabulary tokens of each prompt vector (paper section 7.1).

Cosine similarity against every token's embedding as the model sees it (through the embedding module, so Gemma's
sqrt(d) scaling is included). Positions whose neighbours include one of the task's label words are flagged: the
paper found class-label-initialised prompts keep label words as neighbours.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .backbone import Backbone
from .interop import require_input_prompt
from .prompt import SoftPrompt


@dataclass
class PositionNeighbours:
    position: int
    norm: float
    tokens: list[str]
    similarities: list[float]
    label_words: list[str]  # label words among the neighbours

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def token_embedding_table(backbone: Backbone, chunk: int = 8192) -> torch.Tensor:
    """[V, d] embeddings of every token through the embedding module, float32 on CPU."""
    rows = []
    for start in range(0, backbone.vocab_size, chunk):
        ids = torch.arange(start, min(start + chunk, backbone.vocab_size), device=backbone.device)
        rows.append(backbone.embed(ids).float().cpu())
    return torch.cat(rows)


@torch.no_grad()
def nearest_tokens(backbone: Backbone, prompt: SoftPrompt, top: int = 5) -> list[PositionNeighbours]:
    prompt.check_backbone(backbone)
    require_input_prompt(prompt, "nearest-token inspection")
    table = torch.nn.functional.normalize(token_embedding_table(backbone), dim=1)
    vectors = prompt.embeddings.float()
    similarity = torch.nn.functional.normalize(vectors, dim=1) @ table.T
    values, indices = similarity.topk(top, dim=1)
    label_ids: dict[int, str] = {}
    for word in prompt.task.verbalizer or []:
        for variant in {word, word.strip(), " " + word.strip()}:
            ids = backbone.tokenize(variant)
            if len(ids) == 1:
                label_ids[ids[0]] = word.strip()
    result = []
    for position in range(prompt.length):
        ids = indices[position].tolist()
        result.append(PositionNeighbours(
            position=position,
            norm=float(vectors[position].norm()),
            tokens=[backbone.tokenizer.decode([i]) for i in ids],
            similarities=[round(float(v), 4) for v in values[position]],
            label_words=sorted({label_ids[i] for i in ids if i in label_ids}),
        ))
    return result
