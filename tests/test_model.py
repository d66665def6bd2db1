"""OmniModel: parity with Hugging Face on text, gradients, bf16, checkpoints."""

import dataclasses

import pytest
import torch

from omni.layout import ImageSegment, TextSegment, layout
from omni.models.model import OmniModel, attention_bias


def _mixed_batch(model, g):
    n, d = model.image_tokenizer.num_tokens, model.image_tokenizer.token_dim
    tok = model.tokenizer
    docs = [
        [TextSegment(tok.encode("a red circle."), loss=False), ImageSegment(torch.randn(n, d, generator=g))],
        [ImageSegment(torch.randn(n, d, generator=g), loss=False), TextSegment(tok.encode("what color?"), loss=False),
         TextSegment(tok.encode("red"))],
        [TextSegment(tok.encode("the circle moves to the right."))],
    ]
    return layout([[docs[0], docs[2]], [docs[1]]], model.special, seq_len=64)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_text_logits_equal_hf(tiny_cfg, arch):
    from transformers import AutoModelForCausalLM

    tiny_cfg.model.backbone.arch = arch
    torch.manual_seed(0)
    model = OmniModel.from_config(tiny_cfg.model).eval()
    hf_cls = type(model.backbone)
    assert hf_cls.__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    ref = AutoModelForCausalLM.from_config(model.backbone.config).eval()
    ref.load_state_dict(model.backbone.state_dict())
    ids = torch.randint(0, len(model.tokenizer), (2, 17))
    with torch.no_grad():
        ours = model.text_logits(ids)
        theirs = ref(input_ids=ids).logits
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)


def test_pretrained_backbone_from_local_dir_keeps_names_and_logits(tmp_path, tiny_cfg):
    from transformers import AutoModelForCausalLM, Qwen2Config

    from omni.tokenizers.text import TextTokenizer

    vocab = len(TextTokenizer.from_pretrained(tiny_cfg.model.tokenizer))
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                                      num_attention_heads=4, num_key_value_heads=2,
                                                      intermediate_size=64))
    hf.save_pretrained(tmp_path / "qwen")
    tiny_cfg.model.backbone.pretrained = str(tmp_path / "qwen")
    model = OmniModel.from_config(tiny_cfg.model).eval()
    assert "backbone.model.layers.0.self_attn.q_proj.weight" in model.state_dict()
    ids = torch.randint(0, vocab, (1, 9))
    with torch.no_grad():
        assert torch.allclose(model.text_logits(ids), hf.eval()(input_ids=ids).logits, atol=1e-5)


def test_forward_losses_and_gradients_reach_every_parameter(tiny_model):
    g = torch.Generator().manual_seed(0)
    batch = _mixed_batch(tiny_model, g)
    out = tiny_model(batch)
    assert set(out) == {"loss", "loss_text", "loss_image", "n_text_tokens", "n_image_tokens"}
    assert out["n_image_tokens"].item() == tiny_model.image_tokenizer.num_tokens
    assert out["n_text_tokens"].item() == batch.n_text_targets > 0
    assert torch.isclose(out["loss"], out["loss_text"] + out["loss_image"])
    # The head's output layer and modulations start at zero (identity blocks): at step 0 only the
    # output layer gets a gradient, at step 1 the modulations, from step 2 on everything.
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    for _ in range(2):
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        out = tiny_model(batch)
    out["loss"].backward()
    dead = [n for n, p in tiny_model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    # Embedding rows of tokens absent from the batch get zero grad, but the matrix as a whole must not.
    assert dead == [], dead


def test_loss_weights(tiny_cfg):
    tiny_cfg.model.loss_weight_text, tiny_cfg.model.loss_weight_image = 0.5, 2.0
    torch.manual_seed(0)
    model = OmniModel.from_config(tiny_cfg.model)
    torch.manual_seed(1)
    out = model(_mixed_batch(model, torch.Generator().manual_seed(0)))
    assert torch.isclose(out["loss"], 0.5 * out["loss_text"] + 2.0 * out["loss_image"])


def test_bf16_autocast_is_finite(tiny_model):
    batch = _mixed_batch(tiny_model, torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_model(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(torch.isfinite(p.grad).all() for p in tiny_model.parameters() if p.grad is not None)


def test_packed_rows_equal_separate_rows(tiny_model):
    """Packing is exact: a document's hidden states do not depend on its row neighbours."""
    tiny_model.eval()
    tok = tiny_model.tokenizer
    n, d = tiny_model.image_tokenizer.num_tokens, tiny_model.image_tokenizer.token_dim
    a = [TextSegment(tok.encode("a red circle."))]
    b = [TextSegment(tok.encode("draw the digit 7.")), ImageSegment(torch.randn(n, d))]
    packed = layout([[a, b]], tiny_model.special)
    alone = layout([[b]], tiny_model.special)
    with torch.no_grad():
        hp = tiny_model.hidden_states(packed)[0]
        ha = tiny_model.hidden_states(alone)[0]
    la = alone.input_ids.shape[1]
    assert torch.allclose(hp[-la:], ha, atol=1e-5)


def test_save_load_identical_and_pickle_refused(tmp_path, tiny_model):
    batch = _mixed_batch(tiny_model, torch.Generator().manual_seed(0))
    tiny_model.save_pretrained(tmp_path / "ck")
    assert {p.name for p in (tmp_path / "ck").iterdir()} >= {"model.safetensors", "config.yaml", "tokenizer"}
    loaded = OmniModel.from_pretrained(tmp_path / "ck")
    tiny_model.eval()
    for a, b in zip(tiny_model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    with torch.no_grad():
        torch.manual_seed(5)
        x = tiny_model(batch)
        torch.manual_seed(5)
        y = loaded(batch)
    assert torch.equal(x["loss"], y["loss"])

    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"w": torch.zeros(1)}, bad / "pytorch_model.bin")
    with pytest.raises(ValueError, match="never unpickles"):
        OmniModel.from_pretrained(bad)
    with pytest.raises(ValueError, match="pickle file"):
        OmniModel.from_pretrained(bad / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OmniModel.from_pretrained(tmp_path / "nope")


def test_tied_embeddings_roundtrip(tmp_path, tiny_cfg):
    tiny_cfg.model.backbone.tie_word_embeddings = True
    model = OmniModel.from_config(tiny_cfg.model)
    model.save_pretrained(tmp_path / "ck")
    loaded = OmniModel.from_pretrained(tmp_path / "ck")
    assert loaded.lm_head.weight.data_ptr() == loaded.backbone.get_input_embeddings().weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_eager_attention_matches_sdpa_on_packed_rows(tiny_model, tiny_cfg):
    """The packed-document mask is additive float, which eager attention handles correctly."""
    tiny_cfg.model.backbone.attn_implementation = "eager"
    eager = OmniModel.from_config(tiny_cfg.model).eval()
    eager.load_state_dict(tiny_model.state_dict())
    batch = _mixed_batch(tiny_model, torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = tiny_model.eval().hidden_states(batch)
        b = eager.hidden_states(batch)
    real = batch.doc_ids > 0
    assert torch.allclose(a[real], b[real], atol=1e-5)


def test_flash_attention_without_package_is_a_clear_error(tiny_cfg):
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    tiny_cfg.model.backbone.attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="needs flash-attn"):
        OmniModel.from_config(tiny_cfg.model)


def test_image_cells_count_from_each_images_start(tiny_model):
    from omni.models.model import image_cells

    sp = tiny_model.special
    t = tiny_model.tokenizer.encode("a")[0]
    ids = torch.tensor([[sp.bos, t, sp.boi, sp.img, sp.img, sp.img, sp.eoi, t, sp.boi, sp.img, sp.img],
                        [sp.boi, sp.img, sp.img, sp.eoi, sp.pad, sp.pad, sp.pad, sp.pad, sp.pad, sp.pad, sp.pad]])
    assert image_cells(ids, sp.img).tolist() == [[0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 1], [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]]


def test_image_cell_embeddings_add_per_cell_train_and_round_trip(tmp_path, tiny_cfg):
    tiny_cfg.model.image_pos_embed = True
    torch.manual_seed(0)
    model = OmniModel.from_config(tiny_cfg.model)
    n = model.image_tokenizer.num_tokens
    assert model.image_pos.weight.shape == (n, tiny_cfg.model.backbone.hidden_size)
    batch = _mixed_batch(model, torch.Generator().manual_seed(0))
    emb = model.embed(batch.input_ids, batch.image_tokens, batch.image_mask)[batch.image_mask]  # (M, D)
    cells = torch.arange(n).repeat(2)  # two whole images, each cell 0..n-1 in raster order
    torch.testing.assert_close(emb, model.in_proj(batch.image_tokens) + model.image_pos.weight[cells])
    model(batch)["loss"].backward()
    assert model.image_pos.weight.grad.abs().sum(-1).gt(0).all()  # every cell learns
    model.save_pretrained(tmp_path / "ck")
    loaded = OmniModel.from_pretrained(tmp_path / "ck")
    assert torch.equal(loaded.image_pos.weight, model.image_pos.weight)
    # Positions that start inside an image cannot count their cells: the caller must pass them.
    inside = batch.input_ids[:, 3:]
    mask = inside == model.special.img
    with pytest.raises(ValueError, match="pass `cells`"):
        model.embed(inside, batch.image_tokens[: int(mask.sum())], mask)


def test_image_input_noise_perturbs_only_what_the_backbone_reads_in_training(tiny_cfg):
    tiny_cfg.model.image_input_noise = 0.5
    tiny_cfg.model.prompt_image_attention = "causal"  # `hidden_for` reads with the causal document mask
    torch.manual_seed(0)
    model = OmniModel.from_config(tiny_cfg.model)
    batch = _mixed_batch(model, torch.Generator().manual_seed(0))
    clean = batch.image_tokens.clone()

    def hidden_for(tokens):
        embeds = model.embed(batch.input_ids, tokens, batch.image_mask)
        hidden, _ = model.decoder(embeds, attention_mask=attention_bias(batch.doc_ids, embeds.dtype),
                                  position_ids=batch.position_ids)
        return hidden

    with torch.no_grad():
        model.eval()  # evaluation and generation read the tokens as they are
        torch.testing.assert_close(model.hidden_states(batch), hidden_for(clean))
        # Training reads the drawn image's tokens + 0.5 * N(0, 1) (global generator); the prompt
        # image (the VQA document's, no loss) stays clean.
        model.train()
        n = model.image_tokenizer.num_tokens
        assert batch.image_target_index.tolist() == list(range(n))  # the first image is drawn
        torch.manual_seed(1)
        noisy = model.hidden_states(batch)
        torch.manual_seed(1)
        expected = clean.clone()
        expected[:n] += 0.5 * torch.randn(n, clean.shape[1])
        torch.testing.assert_close(noisy, hidden_for(expected))
        assert not torch.allclose(noisy, hidden_for(clean), atol=1e-3)
    assert torch.equal(batch.image_tokens, clean)  # the diffusion targets stay clean
    tiny_cfg.model.image_input_noise = -0.1
    with pytest.raises(ValueError, match="image_input_noise=-0.1"):
        OmniModel.from_config(tiny_cfg.model)


def test_bidirectional_prompt_images_see_themselves_whole_and_drawn_images_stay_causal(tiny_cfg):
    """prompt_image_attention=bidirectional: a later token of a prompt image changes the hidden
    state of an earlier one; a drawn image's later token changes nothing before it; nothing leaks
    across documents or into the text before an image."""
    tiny_cfg.model.prompt_image_attention = "bidirectional"
    torch.manual_seed(0)
    model = OmniModel.from_config(tiny_cfg.model).eval()
    tok = model.tokenizer
    n, d = model.image_tokenizer.num_tokens, model.image_tokenizer.token_dim
    g = torch.Generator().manual_seed(1)
    vqa = [ImageSegment(torch.randn(n, d, generator=g), loss=False),
           TextSegment(tok.encode("what color is the square?"), loss=False), TextSegment(tok.encode("red"))]
    t2i = [TextSegment(tok.encode("a red square."), loss=False), ImageSegment(torch.randn(n, d, generator=g))]
    batch = layout([[vqa, t2i]], model.special)
    img = batch.image_mask[0].nonzero().flatten()  # positions: the prompt image's n, then the drawn one's n
    prompt_pos, drawn_pos = img[:n], img[n:]
    assert batch.image_target_index.tolist() == list(range(n, 2 * n))

    def hidden(tokens):
        with torch.no_grad():
            return model.hidden_states(dataclasses.replace(batch, image_tokens=tokens))[0]

    base = hidden(batch.image_tokens)
    last_prompt, last_drawn = batch.image_tokens.clone(), batch.image_tokens.clone()
    last_prompt[n - 1] += 1.0  # the prompt image's last token
    last_drawn[2 * n - 1] += 1.0  # the drawn image's last token
    a, b = hidden(last_prompt), hidden(last_drawn)
    moved = lambda h: (h - base).abs().amax(-1) > 1e-5  # (L,) positions whose state changed
    assert moved(a)[prompt_pos].all()  # every token of the prompt image sees its last token
    assert not moved(a)[drawn_pos[0]:].any()  # the next document does not
    assert not moved(b)[: drawn_pos[-1]].any() and moved(b)[drawn_pos[-1]]  # causal inside a drawn image
    # causal (the default): the prompt image's earlier tokens do not see its last one
    model.cfg.prompt_image_attention = "causal"
    base = hidden(batch.image_tokens)
    assert not moved(hidden(last_prompt))[prompt_pos[:-1]].any()


def test_prompt_image_blocks_number_each_prompt_image(tiny_model):
    from omni.models.model import prompt_image_blocks

    image_mask = torch.tensor([[0, 1, 1, 1, 0, 0, 1, 1, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]]).bool()
    # image tokens in row-major order: row 0 has images A (0-2), B (3-4), C (5-6); row 1 has D (7-8)
    blocks = prompt_image_blocks(image_mask, torch.tensor([3, 4]))  # B is drawn (diffusion targets)
    assert blocks.tolist() == [[0, 1, 1, 1, 0, 0, 0, 0, 0, 2, 2, 0], [0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="prompt_image_attention=bidirectional .* flash_attention_2"):
        cfg = tiny_model.cfg
        bad = dataclasses.replace(cfg, prompt_image_attention="bidirectional",
                                  backbone=dataclasses.replace(cfg.backbone, attn_implementation="flash_attention_2"))
        OmniModel(bad, tiny_model.tokenizer, tiny_model.image_tokenizer, backbone=tiny_model.backbone)


def test_decoder_cache_matches_a_full_pass_without_deprecation_warnings(tiny_cfg):
    import warnings

    model = OmniModel.from_config(tiny_cfg.model).eval()
    emb = torch.randn(1, 6, model.backbone.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers 5.2x warns on `past_key_values`
        _, cache = model.decoder(emb[:, :4], use_cache=True)
        step, cache = model.decoder(emb[:, 4:], cache=cache, use_cache=True)
        full, _ = model.decoder(emb)
    assert cache.get_seq_length() == 6
    torch.testing.assert_close(step, full[:, 4:], rtol=1e-5, atol=1e-5)
