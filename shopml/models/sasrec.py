"""SASRec: a causal Transformer that predicts a user's next item from their history.

Follows Kang & McAuley, "Self-Attentive Sequential Recommendation" (ICDM 2018), and the
split of RecBole's ``sequential_recommender/sasrec.py``: the forward pass, the
training loss and full ranking are separate methods. The blocks are written out here in
dependency order (attention, block, encoder, model), pre-LayerNorm as in GPT-2.

Optional item-text tower (``text_dim > 0``): every item's title is embedded once by a
frozen sentence encoder (shopml.models.text), and a learned projection of that vector
is added to the item's id embedding, in the spirit of UniSRec (Hou et al., KDD 2022).
An item nobody interacted with still has a meaningful representation, so it can be
recommended (cold start). ``id_dropout`` hides the id part of random items during
training so the model also learns to rank from text alone.

Optional cosine scoring (``normalize``): item representations and the encoder output
are L2-normalised and the logits scaled by a learned inverse temperature, as in
contrastive and normalised-softmax recommenders. On a sparse catalog this keeps
frequent items from winning by embedding norm and rare items' embeddings from
drifting. Two regularisers for short histories act in training only: label
smoothing of the full softmax and random hiding of history items (in the spirit of
CL4SRec's item masking, Xie et al., ICDE 2022).

Conventions: item index 0 is padding and never an item; real items are ``1..n_items``.
Sequences are left-padded with 0 and hold the newest item last, so the last position is
always the one that predicts the next item. Shapes use B batch, L sequence length,
H hidden size, N items (``n_items + 1`` columns including padding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (PyTorch convention)
from torch import Tensor, nn

from shopml.models.cooccurrence import cooccurrence_neighbors

LOSSES = ("ce", "sampled", "bce")


@dataclass
class SASRecConfig:
    """Architecture and loss of a SASRec model; saved as the artifact's ``config.json``.

    Attributes:
        n_items: number of real items; index 0 is padding, items are ``1..n_items``.
        max_seq_len: longest history the model reads (older items are dropped).
        hidden_size: width H of embeddings and every block.
        n_heads: attention heads per block; must divide ``hidden_size``.
        n_layers: number of Transformer blocks.
        dropout: dropout on embeddings, attention weights and residual branches.
        loss: ``"ce"`` full softmax over all items (default, best quality),
            ``"sampled"`` softmax over ``n_negatives`` shared random items (large
            catalogs), ``"bce"`` one negative per position as in the paper.
        n_negatives: negatives per batch for the ``"sampled"`` loss.
        text_dim: width of the item text embeddings fed to the text tower (384 for
            MiniLM); 0 builds an id-only model.
        id_dropout: probability that an item's id embedding is hidden during a
            training step (text tower only), so the model learns to use text alone.
        normalize: score by cosine similarity: item representations and the
            encoder's output are L2-normalised and the logits scaled by a learned
            inverse temperature (``1 / temperature`` at first), so rare items cannot
            win by norm alone. Off by default: on Amazon Scientific it learned twice
            as fast but did not end higher (figures in
            ``tests/integration/test_recommender_amazon.py``).
        temperature: initial temperature of the cosine logits (``normalize`` only).
        label_smoothing: label smoothing of the full-softmax loss (``"ce"`` only).
        item_mask_prob: sequence augmentation: during training each input item is
            hidden (its embedding zeroed, its position kept) with this probability,
            so the model does not lean on any single history item.
        reverse_prob: sequence augmentation: during training each window (its
            inputs followed by its last target) is read backwards with this
            probability, so item-to-item relations are learnt in both directions
            (the order of reviews within a history is noisy on Amazon data).
        popularity_adjust: logit adjustment (Menon et al., ICLR 2021): in training
            the full-softmax logits get ``popularity_adjust * log(1 + count)`` of each
            item's training count added, so the learnt scores rank with that much
            of the training-period popularity taken out (0.5 discounts it like
            ItemKNN's cosine does).
        cooccurrence_mix: graph smoothing of the item table: each item's
            representation becomes ``1 - mix`` of its own plus ``mix`` of the
            weighted mean of its ``cooccurrence_neighbors`` most co-occurring items
            in the training histories (:mod:`shopml.models.cooccurrence`), one hop
            of a graph convolution as in LightGCN (He et al., SIGIR 2020). An item
            seen by few users borrows the representation of the items bought with
            it from the first step, instead of waiting for its own id to be learnt.
            The graph is fixed before training; gradients reach every item through
            its neighbours. 0 (default) turns it off.
        cooccurrence_neighbors: links kept per item for ``cooccurrence_mix``.
    """

    n_items: int
    max_seq_len: int = 50
    hidden_size: int = 64
    n_heads: int = 2
    n_layers: int = 2
    dropout: float = 0.2
    loss: str = "ce"
    n_negatives: int = 256
    text_dim: int = 0
    id_dropout: float = 0.0
    normalize: bool = False
    temperature: float = 0.1
    label_smoothing: float = 0.0
    item_mask_prob: float = 0.0
    reverse_prob: float = 0.0
    popularity_adjust: float = 0.0
    cooccurrence_mix: float = 0.0
    cooccurrence_neighbors: int = 20

    def __post_init__(self) -> None:
        for name in (
            "n_items",
            "max_seq_len",
            "n_layers",
            "n_negatives",
            "cooccurrence_neighbors",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.hidden_size < 1 or self.n_heads < 1 or self.hidden_size % self.n_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be a positive multiple of "
                f"n_heads={self.n_heads}"
            )
        if self.loss not in LOSSES:
            raise ValueError(
                f"loss={self.loss!r} is not supported; use one of {LOSSES}"
            )
        if self.text_dim < 0:
            raise ValueError(f"text_dim={self.text_dim} must be 0 (no text) or more")
        for name in (
            "dropout",
            "id_dropout",
            "label_smoothing",
            "item_mask_prob",
            "reverse_prob",
            "cooccurrence_mix",
        ):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.popularity_adjust < 0:
            raise ValueError(
                f"popularity_adjust={self.popularity_adjust} must be 0 or more"
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be positive")

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a JSON-ready dictionary."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SASRecConfig:
        """Build a configuration from :meth:`to_dict` output.

        Raises:
            ValueError: a key is not a configuration field, or a value is invalid.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown SASRecConfig keys {unknown}; known keys: {sorted(known)}"
            )
        return cls(**d)


def left_pad(
    item_seqs: Sequence[Sequence[int] | np.ndarray], max_seq_len: int
) -> Tensor:
    """Pack item-index histories into the model's input layout.

    Args:
        item_seqs: one history per user, oldest first, item indices in ``1..n_items``.
        max_seq_len: width L of the result; longer histories keep their newest items.

    Returns:
        Long tensor [B, L], left-padded with 0, newest item in the last column.
    """
    out = torch.zeros((len(item_seqs), max_seq_len), dtype=torch.long)
    for row, seq in enumerate(item_seqs):
        tail = list(seq)[-max_seq_len:]
        if tail:
            out[row, max_seq_len - len(tail) :] = torch.as_tensor(
                tail, dtype=torch.long
            )
    return out


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position i sees positions <= i, never padding."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        """Attend over earlier positions.

        Args:
            x: float [B, L, H].
            attn_mask: bool [B, 1, L, L], True where a query may attend to a key.

        Returns:
            float [B, L, H].
        """
        b, length, h = x.shape
        q, k, v = self.qkv(x).split(h, dim=2)  # 3 x [B, L, H]
        # [B, L, H] -> [B, heads, L, H / heads]
        q = q.view(b, length, self.n_heads, h // self.n_heads).transpose(1, 2)
        k = k.view(b, length, self.n_heads, h // self.n_heads).transpose(1, 2)
        v = v.view(b, length, self.n_heads, h // self.n_heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
        )  # [B, heads, L, H / heads]
        y = y.transpose(1, 2).contiguous().view(b, length, h)  # [B, L, H]
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    """Position-wise two-layer MLP with GELU, four times wider inside."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.hidden_size, 4 * config.hidden_size)
        self.proj = nn.Linear(4 * config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Map float [B, L, H] to float [B, L, H]."""
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """One pre-LN Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden_size)
        self.mlp = FeedForward(config)

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        """Map float [B, L, H] to float [B, L, H]; see :class:`CausalSelfAttention`."""
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    """A stack of blocks followed by a final LayerNorm."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size)

    def forward(self, x: Tensor, attn_mask: Tensor) -> Tensor:
        """Map float [B, L, H] to float [B, L, H]."""
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.ln_f(x)


class SASRec(nn.Module):
    """Self-attentive sequential recommender with shared input/output item embeddings.

    Args:
        config: architecture and loss; ``config.n_items`` fixes the item vocabulary.
        item_text: float [n_items + 1, text_dim] frozen text embedding of every item
            (row 0, padding, is ignored) when ``config.text_dim > 0``; ``None`` gives
            zeros, to be filled by ``load_state_dict``.

    Raises:
        ValueError: ``item_text`` does not match ``n_items`` and ``text_dim``.
    """

    item_text: Tensor  # buffer [N, text_dim], registered only with a text tower
    item_seen: Tensor  # buffer bool [N], registered only with a text tower
    log_count: Tensor  # buffer [N], registered only with popularity_adjust
    neighbor_index: Tensor  # buffer long [N, k], registered only with cooccurrence_mix
    neighbor_weight: Tensor  # buffer [N, k], registered only with cooccurrence_mix

    def __init__(self, config: SASRecConfig, item_text: Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.item_embedding = nn.Embedding(config.n_items + 1, h, padding_idx=0)
        self.position_embedding = nn.Embedding(config.max_seq_len, h)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.encoder = Encoder(config)
        self.text_proj: nn.Linear | None = None
        self.logit_scale: nn.Parameter | None = None
        if config.normalize:  # log of the inverse temperature, learned
            self.logit_scale = nn.Parameter(torch.tensor(-math.log(config.temperature)))
        if config.text_dim > 0:
            self.text_proj = nn.Linear(config.text_dim, h)
            self.register_buffer("item_text", _check_text(item_text, config))
            # Items seen in training; the others have untrained ids (see set_seen_items).
            seen = torch.ones(config.n_items + 1, dtype=torch.bool)
            self.register_buffer("item_seen", seen)
        if config.popularity_adjust > 0:
            self.register_buffer("log_count", torch.zeros(config.n_items + 1))
        if config.cooccurrence_mix > 0:
            # Until set_seen_items links items, every item is its own neighbour.
            shape = (config.n_items + 1, config.cooccurrence_neighbors)
            index = torch.zeros(shape, dtype=torch.long)
            index[:, 0] = torch.arange(config.n_items + 1)
            weight = torch.zeros(shape)
            weight[1:, 0] = 1.0
            self.register_buffer("neighbor_index", index)
            self.register_buffer("neighbor_weight", weight)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Small normal weights as in RecBole (initializer_range 0.02), zero biases.
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()

    def set_seen_items(self, item_seqs: Sequence[np.ndarray]) -> None:
        """Mark the items that occur in the training histories, and count them.

        Text tower: an unseen item keeps no id embedding (its id was never trained:
        it scores by its text alone) and is left out of the full-softmax loss, which
        would otherwise teach the model that it is never the next item. With
        ``popularity_adjust`` the counts feed the logit adjustment; with
        ``cooccurrence_mix`` the histories link co-occurring items.
        """
        if self.config.cooccurrence_mix > 0:
            index, weight = cooccurrence_neighbors(
                item_seqs, self.config.n_items, self.config.cooccurrence_neighbors
            )
            self.neighbor_index.copy_(index)
            self.neighbor_weight.copy_(weight)
        if self.config.popularity_adjust > 0:
            counts = torch.zeros(self.config.n_items + 1)
            for seq in item_seqs:
                counts += torch.bincount(
                    torch.as_tensor(np.asarray(seq), dtype=torch.long),
                    minlength=self.config.n_items + 1,
                ).float()
            self.log_count.copy_(torch.log1p(counts))
        if self.text_proj is None:
            return
        seen = torch.zeros_like(self.item_seen)
        for seq in item_seqs:
            seen[torch.as_tensor(np.asarray(seq), dtype=torch.long)] = True
        seen[0] = False
        self.item_seen.copy_(seen)

    def item_table(self) -> Tensor:
        """Float [N, H]: every item's representation, row 0 (padding) all zeros.

        Id-only: the id embeddings. With the text tower: id embedding plus projected
        text; in training, each item's id part is hidden with probability
        ``id_dropout``. With ``cooccurrence_mix`` every row is then mixed with its
        neighbours' rows. With ``normalize`` every row has unit length.
        """
        table = self.item_embedding.weight  # [N, H]
        if self.text_proj is not None:
            table = table * self.item_seen[:, None]  # unseen items: text only
            if self.training and self.config.id_dropout > 0:
                keep = torch.rand(table.size(0), 1, device=table.device)
                table = table * (keep >= self.config.id_dropout)
            table = table + self.text_proj(self.item_text)  # [N, H]
        mix = self.config.cooccurrence_mix
        if mix > 0:
            neighbors = F.embedding_bag(
                self.neighbor_index,
                table,
                per_sample_weights=self.neighbor_weight,
                mode="sum",
            )  # [N, H]
            table = (1 - mix) * table + mix * neighbors
        if self.config.normalize:
            table = F.normalize(table, dim=-1)
        if self.text_proj is None and not self.config.normalize and mix == 0:
            return table
        return torch.cat([torch.zeros_like(table[:1]), table[1:]])

    def forward(self, item_seq: Tensor, table: Tensor | None = None) -> Tensor:
        """Encode every position of left-padded histories.

        Args:
            item_seq: long [B, L], L <= max_seq_len, left-padded with 0, newest last.
            table: float [N, H] item representations from :meth:`item_table`;
                computed when ``None``.

        Returns:
            float [B, L, H]; position i summarises items up to and including i. Padding
            positions hold zeros. With ``normalize`` every non-padding row has the
            length of the learned inverse temperature, so ``hidden @ table.T`` (as a
            server computes it from the exported item matrix) are the scaled cosine
            logits.

        Raises:
            ValueError: ``item_seq`` is not 2-D or longer than ``max_seq_len``.
        """
        if item_seq.dim() != 2 or item_seq.size(1) > self.config.max_seq_len:
            raise ValueError(
                f"item_seq must be [B, L] with L <= "
                f"max_seq_len={self.config.max_seq_len}, "
                f"got shape {tuple(item_seq.shape)}"
            )
        table = self.item_table() if table is None else table
        length = item_seq.size(1)
        is_item = item_seq > 0  # [B, L]

        # Positions count from the right: the newest item always has the last one.
        start = self.config.max_seq_len - length
        positions = torch.arange(start, start + length, device=item_seq.device)  # [L]
        x = F.embedding(item_seq, table) * math.sqrt(self.config.hidden_size)
        if self.training and self.config.item_mask_prob > 0:
            hide = (
                torch.rand(item_seq.shape, device=x.device) < self.config.item_mask_prob
            )
            x = x * ~hide.unsqueeze(-1)  # hidden items keep only their position
        x = self.emb_dropout(x + self.position_embedding(positions))  # [B, L, H]

        x = self.encoder(x, self._attention_mask(is_item))  # [B, L, H]
        if self.logit_scale is not None:
            scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
            x = F.normalize(x, dim=-1) * scale
        return x * is_item.unsqueeze(-1)

    @staticmethod
    def _attention_mask(is_item: Tensor) -> Tensor:
        """Bool [B, 1, L, L]: causal, keys are items, and every query sees itself.

        Letting a padding query see itself keeps its softmax finite; its output is
        zeroed afterwards and never used.
        """
        length = is_item.size(1)
        causal = torch.ones(
            length, length, dtype=torch.bool, device=is_item.device
        ).tril()
        diagonal = torch.eye(length, dtype=torch.bool, device=is_item.device)
        mask = (causal & is_item[:, None, :]) | diagonal  # [B, L, L]
        return mask.unsqueeze(1)

    def _item_logits(self, hidden: Tensor, table: Tensor | None = None) -> Tensor:
        """Scores of every item column: float [..., H] -> [..., N], column 0 = -inf."""
        table = self.item_table() if table is None else table
        logits = hidden @ table.T
        logits[..., 0] = float("-inf")
        return logits

    def calculate_loss(
        self, item_seq: Tensor, pos_items: Tensor, neg_items: Tensor | None = None
    ) -> Tensor:
        """Next-item loss at every position that has a target.

        Args:
            item_seq: long [B, L] histories, left-padded with 0.
            pos_items: long [B, L], the item that follows each position; 0 where
                there is no target (padding), those positions are ignored.
            neg_items: optional negatives; ``"bce"``: long [B, L], ``"sampled"``:
                long [K] shared by the batch. Drawn uniformly from ``1..n_items`` when
                omitted; unused by ``"ce"``.

        Returns:
            Scalar mean loss over the positions with a target.
        """
        if self.training and self.config.reverse_prob > 0:
            item_seq, pos_items = self._reverse_some(item_seq, pos_items)
        table = self.item_table()  # [N, H]
        hidden = self.forward(item_seq, table)  # [B, L, H]
        has_target = pos_items > 0  # [B, L]
        hidden, pos_items = hidden[has_target], pos_items[has_target]  # [T, H], [T]

        if self.config.loss == "ce":
            logits = self._item_logits(hidden, table)  # [T, N]
            if self.text_proj is not None:  # unseen items are no negatives
                logits = logits.masked_fill(~self.item_seen, float("-inf"))
            if self.config.popularity_adjust > 0 and self.training:
                logits = logits + self.config.popularity_adjust * self.log_count
            return self._cross_entropy(logits.float(), pos_items)
        if self.config.loss == "sampled":
            return self._sampled_softmax_loss(hidden, pos_items, neg_items, table)
        if neg_items is None:
            neg_items = self._sample_items(pos_items.shape, pos_items.device)
        else:
            neg_items = neg_items[has_target]
        return self._bce_loss(hidden, pos_items, neg_items, table)

    def _reverse_some(
        self, item_seq: Tensor, pos_items: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Read a random share (``reverse_prob``) of the windows backwards.

        A window's items are its inputs followed by its last target; reversed, they
        give new left-padded inputs [B, L] and targets [B, L] (0 where no input).
        """
        b, length = item_seq.shape
        full = torch.cat([item_seq, pos_items[:, -1:]], dim=1)  # [B, L + 1]
        n_items = (full > 0).sum(1, keepdim=True)  # [B, 1]
        columns = torch.arange(length + 1, device=full.device).expand(b, -1)
        # Inside the items (columns >= first), column j takes column first + last - j.
        first = length + 1 - n_items
        source = torch.where(columns >= first, first + length - columns, columns)
        backwards = full.gather(1, source)  # [B, L + 1]
        flip = torch.rand(b, 1, device=full.device) < self.config.reverse_prob
        full = torch.where(flip, backwards, full)
        inputs, targets = full[:, :-1], full[:, 1:]
        return inputs, targets * (inputs > 0)

    def _cross_entropy(self, logits: Tensor, pos_items: Tensor) -> Tensor:
        """Full-softmax loss of logits [T, N] (``-inf`` where no item), targets [T].

        With ``label_smoothing`` = e the target gets 1 - e of the mass and e is spread
        evenly over the candidate items only (finite logits: never padding, never
        unseen items).
        """
        smoothing = self.config.label_smoothing
        if smoothing == 0:
            return F.cross_entropy(logits, pos_items)
        log_probs = F.log_softmax(logits, dim=-1)  # [T, N]
        nll = -log_probs.gather(1, pos_items[:, None]).squeeze(1)  # [T]
        candidates = torch.isfinite(logits)  # [T, N]
        spread = -(log_probs.masked_fill(~candidates, 0.0).sum(1)) / candidates.sum(1)
        return ((1 - smoothing) * nll + smoothing * spread).mean()

    def _sample_items(
        self, shape: torch.Size | tuple[int, ...], device: torch.device
    ) -> Tensor:
        return torch.randint(1, self.config.n_items + 1, shape, device=device)

    def _sampled_softmax_loss(
        self,
        hidden: Tensor,
        pos_items: Tensor,
        neg_items: Tensor | None,
        table: Tensor,
    ) -> Tensor:
        """Softmax over the target and K shared negatives; hidden [T, H], pos [T]."""
        if neg_items is None:
            neg_items = self._sample_items((self.config.n_negatives,), hidden.device)
        pos_emb = table[pos_items]  # [T, H]
        neg_emb = table[neg_items]  # [K, H]
        pos_logit = (hidden * pos_emb).sum(-1, keepdim=True)  # [T, 1]
        neg_logits = hidden @ neg_emb.T  # [T, K]
        # A negative that happens to be the target is no negative.
        neg_logits = neg_logits.masked_fill(
            neg_items[None, :] == pos_items[:, None], -1e4
        )
        logits = torch.cat([pos_logit, neg_logits], dim=1).float()  # [T, 1 + K]
        target = torch.zeros(logits.size(0), dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, target)

    def _bce_loss(
        self, hidden: Tensor, pos_items: Tensor, neg_items: Tensor, table: Tensor
    ) -> Tensor:
        """Binary loss with one negative per target; hidden [T, H], pos and neg [T]."""
        pos_logit = (hidden * table[pos_items]).sum(-1).float()  # [T]
        neg_logit = (hidden * table[neg_items]).sum(-1).float()  # [T]
        pos_loss = F.binary_cross_entropy_with_logits(
            pos_logit, torch.ones_like(pos_logit)
        )
        neg_loss = F.binary_cross_entropy_with_logits(
            neg_logit, torch.zeros_like(neg_logit)
        )
        return pos_loss + neg_loss

    def full_sort_scores(self, item_seq: Tensor) -> Tensor:
        """Score every item as the next one after each history.

        Args:
            item_seq: long [B, L] histories, left-padded with 0, newest last.

        Returns:
            float [B, n_items + 1]; column 0 (padding) is ``-inf``. History items are
            not masked here: callers exclude what they must.
        """
        table = self.item_table()  # [N, H]
        hidden = self.forward(item_seq, table)[:, -1, :]  # [B, H]
        return self._item_logits(hidden, table)


def _check_text(item_text: Tensor | None, config: SASRecConfig) -> Tensor:
    """The text buffer: ``item_text`` checked, or zeros to be loaded later."""
    shape = (config.n_items + 1, config.text_dim)
    if item_text is None:
        return torch.zeros(shape)
    if tuple(item_text.shape) != shape:
        raise ValueError(
            f"item_text has shape {tuple(item_text.shape)}, expected {shape} = "
            "(n_items + 1, text_dim)"
        )
    return item_text.detach().float().clone()
