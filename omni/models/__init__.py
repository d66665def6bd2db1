"""The model: a Hugging Face decoder with an LM head and a per-token diffusion head.

    model.py       OmniModel (embed, decoder, losses) and `load_pretrained`
    backbone.py    building, rebuilding and adapting the HF backbone (Llama, Qwen2, Chameleon)
    attention.py   the attention kernel choice and the additive mask helpers
    soft_vq.py     image token -> embedding by soft vector quantisation (the Orthus path)
    checkpoint.py  the inference checkpoint's files (safetensors, configs, tokenizers); no model code
    convert.py     `omni convert chameleon`: a HF Chameleon checkpoint -> an omni checkpoint
"""
