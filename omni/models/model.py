"""OmniModel: a Hugging Face decoder over interleaved text tokens and continuous image tokens.

    input_ids, image tokens --embed--> (B, L, D) --backbone--> hidden (B, L, D)
        hidden --lm_head--> next text token            (cross-entropy)
        hidden[p_j - 1] --diffusion head--> image token j   (per-token diffusion loss)

Shape legend: B rows, L positions, D backbone width, V vocabulary, M image tokens in the batch,
K image tokens with a loss, d image-token dim.

The backbone keeps its Hugging Face parameter names under `backbone.` so pretrained weights load
unchanged; everything new (in_proj, head) lives beside it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from omni.config import ModelConfig, parse_group_choices
from omni.heads.diffusion import DiffusionHead
from omni.heads.lm import lm_loss
from omni.layout import Batch, SpecialIds
from omni.models import checkpoint
from omni.models.attention import (
    FLEX,
    VARLEN,
    additive_mask,
    document_block_mask,
    document_groups,
    mask_kind,
    see_own_block,
    varlen_kwargs,
)
from omni.models.backbone import (
    build_backbone,
    cache_kwarg,
    prepare_chameleon_backbone,
    rebuild_backbone,
    tied_elsewhere,
)
from omni.tokenizers.base import ImageTokenizer
from omni.tokenizers.image import build_image_tokenizer
from omni.tokenizers.text import TextTokenizer


def attention_bias(doc_ids: torch.Tensor, dtype: torch.dtype, blocks: torch.Tensor | None = None,
                   queries: torch.Tensor | None = None) -> torch.Tensor | None:
    """Causal, document-local additive mask (B, 1, L, L); None when a plain causal mask does.

    `blocks` (B, L): positions with the same positive number also see each other in both
    directions (the tokens of one prompt image, `prompt_image_blocks`). `queries` (B, L) bool:
    position queries (parallel decoding), which no other position sees.
    """
    # Given blocks or queries, the mask is built whatever they hold (all-zero blocks and no query
    # change nothing): deciding from their values would read the device. Else one read decides
    # whether the plain causal mask does (every row one document).
    bidirectional, has_queries = blocks is not None, queries is not None
    if not bidirectional and not has_queries and bool((doc_ids == 1).all()):
        return None
    L = doc_ids.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=doc_ids.device).tril()  # (L, L)
    same = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, L, L)
    allowed = same & causal & (doc_ids[:, None, :] > 0)
    if bidirectional:
        allowed = see_own_block(allowed, blocks, blocks)
    if has_queries:
        allowed = allowed & ~queries[:, None, :]  # the diagonal comes back below
    allowed |= torch.eye(L, dtype=torch.bool, device=doc_ids.device)  # padding attends to itself
    return additive_mask(allowed, dtype)  # (B, 1, L, L)


def prompt_image_blocks(image_mask: torch.Tensor, image_target_index: torch.Tensor,
                        n_tokens: int | None = None) -> torch.Tensor:
    """(B, L) long: 1, 2, ... per prompt image (image positions that are not diffusion targets),
    numbered per row; 0 at every other position. Images are runs of image positions (<boi> and
    <eoi> separate two images), and a target image has every token a target. `n_tokens`: the
    number of image positions when the caller knows it (a shape: then nothing is read back)."""
    flat = image_mask.flatten()
    n = int(flat.sum()) if n_tokens is None else n_tokens
    is_prompt = torch.ones(n, dtype=torch.bool, device=image_mask.device)
    is_prompt[image_target_index] = False
    prompt = torch.zeros_like(flat).masked_scatter(flat, is_prompt)  # no nonzero(): no device wait
    prompt = prompt.view_as(image_mask)  # (B, L)
    before = torch.nn.functional.pad(prompt[:, :-1], (1, 0))  # the previous position's flag
    run = (prompt & ~before).long().cumsum(-1)
    return torch.where(prompt, run, 0)


def change_weight(target: torch.Tensor, tokens: torch.Tensor, ref_index: torch.Tensor, weight: float,
                  tol: float = 1e-3) -> torch.Tensor:
    """(K,) diffusion-loss weights (model.image_change_weight): `weight` for a target (K, d) that
    differs by more than `tol` in some value from the token at its cell of the previous picture
    (`tokens` (M, d) indexed by `ref_index` (K,), -1 where there is none), 1 for the rest. Pure
    tensor arithmetic: no host read."""
    ref = tokens[ref_index.clamp(min=0)]  # (K, d)
    changed = (ref_index >= 0) & ((target.float() - ref.float()).abs().amax(-1) > tol)
    return torch.where(changed, weight, 1.0)


def image_cells(input_ids: torch.Tensor, img_id: int) -> torch.Tensor:
    """(B, L) -> (B, L): each image position's index in its image (0 right after <boi>); 0 elsewhere.

    An image is one run of `img_id` placeholders in raster order, so the cell is the distance to
    the last position that is not a placeholder, minus one. (Parallel decoding puts queries inside
    an image's run and may commit out of raster order: it uses `image_cells_from_positions`.)
    """
    L = input_ids.shape[-1]
    is_img = input_ids == img_id
    where = torch.arange(L, device=input_ids.device).expand_as(input_ids)
    last_other = torch.where(is_img, -1, where).cummax(dim=-1).values  # (B, L)
    return torch.where(is_img, where - last_other - 1, 0)


def image_cells_from_positions(input_ids: torch.Tensor, position_ids: torch.Tensor, boi_id: int,
                               img_id: int) -> torch.Tensor:
    """(B, L) -> (B, L): each image position's cell as its position id minus that of its image's
    <boi>, minus one; 0 elsewhere. Holds whatever the sequence order of an image's tokens (a
    strided parallel order commits them out of raster order, each with its raster position id)."""
    L = input_ids.shape[-1]
    where = torch.arange(L, device=input_ids.device).expand_as(input_ids)
    last_boi = torch.where(input_ids == boi_id, where, 0).cummax(dim=-1).values  # (B, L) index of the last <boi>
    cells = position_ids - position_ids.gather(-1, last_boi) - 1
    return torch.where(input_ids == img_id, cells, 0)


class OmniModel(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        tokenizer: TextTokenizer,
        image_tokenizer: ImageTokenizer,
        backbone: nn.Module | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.image_tokenizer = image_tokenizer
        self.backbone = backbone if backbone is not None else build_backbone(cfg, len(tokenizer))
        if self.backbone.config.model_type == "chameleon":
            prepare_chameleon_backbone(self.backbone)  # its VQGAN lives in the image tokenizer
        hidden = self.backbone.config.hidden_size
        token_dim = image_tokenizer.token_dim
        self.in_proj = self._build_in_proj(token_dim, hidden)
        if cfg.image_input_noise < 0:
            raise ValueError(f"model.image_input_noise={cfg.image_input_noise} must be >= 0 (0 turns it off)")
        if cfg.prompt_image_attention == "bidirectional" and cfg.backbone.attn_implementation == "flash_attention_2":
            raise ValueError("model.prompt_image_attention=bidirectional needs an attention mask that flash_attention_2 "
                             "cannot take; use model.backbone.attn_implementation=sdpa (the default), flex_attention "
                             "or eager")
        self.image_pos = None
        if cfg.image_pos_embed:
            self.image_pos = nn.Embedding(image_tokenizer.num_tokens, hidden)  # (N, D), cell -> vector
        self.head = DiffusionHead(cfg.head, token_dim=token_dim, cond_dim=hidden)
        self.image_ref = None
        if cfg.image_reference:  # the previous picture's token at the drawn cell -> the head's condition
            self.image_ref = nn.Linear(token_dim, hidden, bias=False)  # (d -> D); no reference = a zero token
        # None: one image token per pass; else the schedules trained (alternatives: one per image) and
        # the one drawn with by default (the first)
        self.group_choices = parse_group_choices(cfg.parallel_image)
        self.groups = self.group_choices[0] if self.group_choices else None
        self.order = cfg.parallel_order  # the cells' order under parallel decoding (config.draw_order)
        self.query_embed = None
        if self.groups is not None:
            if cfg.backbone.attn_implementation in VARLEN:
                raise ValueError(f"model.parallel_image={cfg.parallel_image!r} needs a mask that hides the position "
                                 f"queries, which {cfg.backbone.attn_implementation} cannot take; use "
                                 "model.backbone.attn_implementation=sdpa (the default) or flex_attention")
            self.query_embed = nn.Embedding(image_tokenizer.num_tokens, hidden)  # (N, D), target cell -> query
        self.initialize_weights()
        self.special = SpecialIds(
            bos=tokenizer.bos_id,
            eos=tokenizer.eos_id,
            pad=tokenizer.pad_id,
            boi=tokenizer.boi_id,
            eoi=tokenizer.eoi_id,
            img=tokenizer.img_id,
        )

    def _build_in_proj(self, token_dim: int, hidden: int) -> nn.Module:
        if self.cfg.in_proj == "linear":
            return nn.Linear(token_dim, hidden)
        from omni.models.soft_vq import SoftVQEmbedding

        return SoftVQEmbedding.from_model(self, token_dim)

    def initialize_weights(self) -> None:
        """Every initialisation rule of what OmniModel adds to the backbone, in one place (the
        backbone keeps its pretrained or Hugging Face initialisation)."""
        if isinstance(self.in_proj, nn.Linear):
            # Image embeddings start at the scale of the token embeddings: the std of W x for a
            # unit-variance token of d values is 0.02 * sqrt(D), like a row of embed_tokens.
            token_dim, hidden = self.in_proj.in_features, self.in_proj.out_features
            nn.init.normal_(self.in_proj.weight, std=0.02 / max(token_dim, 1) ** 0.5 * hidden**0.5)
            nn.init.zeros_(self.in_proj.bias)
        # soft-vq in_proj starts from the backbone's own image-token embeddings (SoftVQEmbedding.from_model).
        if self.image_pos is not None:
            # Small, like a token embedding, so the cell vector nudges rather than drowns the token.
            nn.init.normal_(self.image_pos.weight, std=0.02)
        if self.query_embed is not None:  # a query is a position's whole input, like a token embedding
            nn.init.normal_(self.query_embed.weight, std=0.02)
        if self.image_ref is not None:  # untrained, the reference changes nothing
            nn.init.zeros_(self.image_ref.weight)
        # The head's rules (zero adaLN modulation and output: the untrained head is the identity
        # plus a zero prediction) live with the head, which is also used on its own.
        self.head.net.initialize_weights()

    @classmethod
    def from_config(cls, cfg: ModelConfig, root: str | Path | None = None) -> OmniModel:
        """Fresh model: tokenizer from `cfg.tokenizer`, image tokenizer from `cfg.image`."""
        if cfg.tokenizer is None:
            raise ValueError(
                "model.tokenizer is not set: train one with `omni data tokenizer` or point it at a "
                "local Hugging Face tokenizer directory"
            )
        tok_path = Path(cfg.tokenizer)
        if root is not None and not tok_path.is_absolute():
            tok_path = Path(root) / tok_path
        return cls(cfg, TextTokenizer.from_pretrained(tok_path), build_image_tokenizer(cfg.image, root=root))

    # ------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def lm_head(self) -> nn.Module:
        return self.backbone.get_output_embeddings()

    def embed(self, input_ids: torch.Tensor, image_tokens: torch.Tensor, image_mask: torch.Tensor,
              cells: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image positions replaced by in_proj(image token): (B, L, D).

        With `model.image_pos_embed`, each image token also gets its grid cell's embedding; `cells`
        (B, L) gives every position's cell (`image_cells`), computed from `input_ids` when not given
        (a caller feeding only the tail of a sequence passes the cells of the whole one, sliced).
        """
        emb = self.backbone.get_input_embeddings()(input_ids)  # (B, L, D)
        if image_tokens.shape[0] == 0:
            return emb
        img = self.in_proj(image_tokens.to(emb.device, torch.float32)).to(emb.dtype)  # (M, D)
        mask = image_mask[..., None].to(emb.device)  # (B, L, 1)
        emb = emb.masked_scatter(mask, img)
        if self.image_pos is not None:
            if cells is None:
                if bool(image_mask[:, 0].any()):
                    raise ValueError("these positions start inside an image, so its cells cannot be counted "
                                     "from them; pass `cells` computed on the whole sequence (image_cells)")
                cells = image_cells(input_ids, self.special.img)
            pos = self.image_pos(cells.to(emb.device)).to(emb.dtype)  # (B, L, D): every position, no nonzero()
            emb = emb + torch.where(mask, pos, 0.0)
        return emb

    def embed_queries(self, embeds: torch.Tensor, query_cells: torch.Tensor) -> torch.Tensor:
        """Put the position queries' inputs (query_cells >= 0: their target cell) into embeds (B, L, D)."""
        is_query = query_cells >= 0  # (B, L)
        q = self.query_embed(query_cells.clamp(min=0)).to(embeds.dtype)  # (B, L, D)
        return torch.where(is_query[..., None], q, embeds)

    def decoder(self, embeds, attention_mask=None, position_ids=None, cache=None, use_cache=False, **attn_kwargs):
        """The backbone's transformer without its LM head -> (hidden (B, L, D), KV cache).

        `attn_kwargs` reach the attention kernel (the varlen lengths of `packed_attention`)."""
        name = cache_kwarg(type(self.backbone.model))
        out = self.backbone.model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{name: cache},
            **attn_kwargs,
        )
        return out.last_hidden_state, getattr(out, name)

    def read_tokens(self, batch: Batch) -> torch.Tensor:
        """The image tokens as the backbone reads them (M, d): in training, drawn images (diffusion
        targets) with the read-back noise, since they are read back from samples at generation time;
        prompt images (captioning, VQA, an edit's source) stay clean, as they are when read."""
        tokens = batch.image_tokens  # (M, d)
        if self.training and self.cfg.image_input_noise > 0:
            idx = batch.image_target_index  # (K,) rows of image_tokens that are targets
            noise = torch.randn(idx.shape[0], tokens.shape[1], device=tokens.device, dtype=tokens.dtype)
            tokens = tokens.index_add(0, idx, self.cfg.image_input_noise * noise)
        return tokens

    def reference(self, cond: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        """cond (n, D) + the projection of each one's reference token refs (n, d) (zeros: none)."""
        w = self.image_ref.weight
        return cond + self.image_ref(refs.to(w.device, w.dtype)).to(cond.dtype)

    def hidden_states(self, batch: Batch, tokens: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.read_tokens(batch) if tokens is None else tokens  # (M, d)
        queries = None
        if self.query_embed is not None:
            queries = batch.query_cells >= 0  # (B, L)
        # A training batch holds whole sequences, so the cells count from each row's start.
        cells = None
        if self.image_pos is not None:
            cells = (image_cells(batch.input_ids, self.special.img) if queries is None else
                     image_cells_from_positions(batch.input_ids, batch.position_ids, self.special.boi, self.special.img))
        embeds = self.embed(batch.input_ids, tokens, batch.image_mask, cells=cells)
        if queries is not None:
            embeds = self.embed_queries(embeds, batch.query_cells)
        blocks = None
        if self.cfg.prompt_image_attention == "bidirectional":
            blocks = prompt_image_blocks(batch.image_mask, batch.image_target_index, batch.image_tokens.shape[0])
        mask, attn_kwargs = self.packed_attention(batch.doc_ids, embeds.dtype, blocks, queries)
        layout = attn_kwargs.get("doc_groups")
        if layout is None:
            hidden, _ = self.decoder(embeds, attention_mask=mask, position_ids=batch.position_ids, **attn_kwargs)
            return hidden  # (B, L, D)
        # grouped: the rows run as one sequence, which the kernel splits into its documents; a 4D
        # mask is taken as made, so transformers does not draw the (1, 1, N, N) mask of packed
        # sequences it would find in the position ids
        B, L, D = embeds.shape
        no_mask = embeds.new_zeros(1, 1, 1, 1)
        hidden, _ = self.decoder(embeds.reshape(1, B * L, D), attention_mask=no_mask,
                                 position_ids=batch.position_ids.reshape(1, B * L), **attn_kwargs)
        return hidden.view(B, L, D)

    def packed_attention(self, doc_ids: torch.Tensor, dtype: torch.dtype, blocks: torch.Tensor | None = None,
                         queries: torch.Tensor | None = None):
        """The document structure of packed rows in the form the backbone's kernel reads -> (mask, kwargs).

        sdpa / eager: the dense additive (B, 1, L, L) mask (None when every row is one document);
        flex_attention: a BlockMask (only the 128 x 128 tiles some query can see are computed);
        flash_attention_2: no mask, varlen lengths (causal only: __init__ refuses bidirectional);
        grouped: no mask, the documents' layout for `grouped_attention`.
        """
        kind = mask_kind(self.backbone.config._attn_implementation)
        if kind == "flex":
            if doc_ids.device.type == "cpu" and self.training and torch.is_grad_enabled():
                raise ValueError(
                    "model.backbone.attn_implementation=flex_attention cannot train on the CPU: PyTorch's "
                    "FlexAttention has no CPU backward. Train on CPU with sdpa (the default); flex_attention "
                    "is for GPUs (its CPU forward serves parity tests and evaluation)"
                )
            return document_block_mask(doc_ids, blocks, queries=queries), {}
        if kind == "varlen":
            return None, varlen_kwargs(doc_ids)
        if kind == "grouped":
            return None, {"doc_groups": document_groups(doc_ids, blocks, queries)}
        return attention_bias(doc_ids, dtype, blocks, queries), {}

    def text_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text-only forward -> logits (B, L, V); what the parity tests compare with HF."""
        empty = torch.zeros((0, self.image_tokenizer.token_dim), device=input_ids.device)
        embeds = self.embed(input_ids, empty, torch.zeros_like(input_ids, dtype=torch.bool))
        hidden, _ = self.decoder(embeds, attention_mask=attention_mask)
        return self.lm_head(hidden)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        tokens = self.read_tokens(batch)  # (M, d)
        hidden = self.hidden_states(batch, tokens)  # (B, L, D)
        loss_text, n_text = lm_loss(self.lm_head, hidden, batch.labels)
        cond = hidden.flatten(0, 1)[batch.image_cond_index]  # (K, D)
        if self.image_ref is not None:  # the previous picture's token at each target's cell, as it was read
            idx = batch.image_ref_index  # (K,) -1: none
            refs = tokens[idx.clamp(min=0)] * (idx >= 0)[:, None]  # (K, d)
            cond = self.reference(cond, refs)
        target = batch.image_tokens[batch.image_target_index]  # (K, d)
        groups = (batch.image_group_index, batch.image_group_pos) if self.head.cfg.group_attention else None
        weight = None
        if self.cfg.image_change_weight != 1.0:
            weight = change_weight(target, batch.image_tokens, batch.image_ref_index, self.cfg.image_change_weight)
        loss_image = self.head.loss(target, cond, groups, weight)
        loss = self.cfg.loss_weight_text * loss_text + self.cfg.loss_weight_image * loss_image
        return {
            "loss": loss,
            "loss_text": loss_text.detach(),
            "loss_image": loss_image.detach(),
            "n_text_tokens": n_text,  # a device tensor: counting reads nothing back
            "n_image_tokens": torch.tensor(target.shape[0]),
        }

    # persistence ----------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        checkpoint.save_pretrained(self, path, state_dict=state_dict, config=getattr(self, "run_config", None))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> OmniModel:
        return load_pretrained(path, device=device)


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> OmniModel:
    """Rebuild an OmniModel from a checkpoint directory written by `save_pretrained` (no pickle)."""
    path = checkpoint.check_checkpoint_dir(path)
    cfg = checkpoint.load_config_from_checkpoint(path)
    mcfg: ModelConfig = cfg.model
    # FlexAttention is a training kernel for packed rows; generation (KV cache, dense step masks) runs SDPA.
    attn = "sdpa" if mcfg.backbone.attn_implementation == FLEX else mcfg.backbone.attn_implementation
    backbone = rebuild_backbone(path, attn)
    tokenizer = TextTokenizer.from_pretrained(path / "tokenizer")
    image_tokenizer = build_image_tokenizer(mcfg.image, root=path)
    model = OmniModel(mcfg, tokenizer, image_tokenizer, backbone=backbone)
    state = checkpoint.load_weights_file(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not tied_elsewhere(model, k, state)]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.run_config = cfg  # generation defaults and the recipe it was trained with
    model.checkpoint_path = str(path)  # recorded in every generation result's settings
    model.image_tokenizer.to(device)  # not a submodule: VAE / VQGAN follow the model by hand
    return model.to(device).eval()
