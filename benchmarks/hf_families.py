"""Hugging Face families: widen x2 / x1.5 and deepen (block copy) tiny random ``transformers`` models.

Every family is built from a small config with random weights (no hub access, no remote code), in eval mode,
float32, dropout 0, with an explicit ``attn_implementation``.  For each row (family x operation)::

    grown = graphgrow.widen(model, factor, example_inputs=(input_ids,))
    grown = graphgrow.deepen(model, after=<middle layer's path>, block="copy", example_inputs=(input_ids,))

(encoder-decoders take a dict by keyword, ``{"input_ids": ..., "decoder_input_ids": ...}``; vision models
``pixel_values``, audio ``input_values`` / ``input_features``; every comparison calls the model the same way)
the harness records: status (``exact`` / ``refused: ...`` a GraphGrowError / ``error: ...`` anything else,
VerificationError included: graphgrow caught its own wrong rewrite / ``WRONG: ...`` the returned model differs
from the original), same class, max relative error of the main output on 3 random batches (float32 decides;
the float64 figure beside it tells rounding, ~1e-7, from a real change), config consistency
(``type(model)(grown.config)`` loads ``grown.state_dict()`` strictly and computes the same), a save_pretrained /
from_pretrained round trip (bit-identical), greedy ``generate`` with the KV cache (causal LMs and
encoder-decoders), parameters, time; for a widening also the fraction of ideal (grown parameters / parameters of
the family built at the requested widths) and each frozen space's reason class (hf_ideal.py).

``--check-only`` builds each model, runs a forward and ``torch.export.export`` (strict=False) of a wrapper that
returns the main output tensor, and reports head_dim / tied-embedding facts per family.

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/hf_families.py                      # every family
    PYTHONPATH=. .venv/bin/python benchmarks/hf_families.py --families llama,gpt2 --factors 2
    PYTHONPATH=. .venv/bin/python benchmarks/hf_families.py --layers 4    # deepen copies layer 1, not layer 0
    PYTHONPATH=. .venv/bin/python benchmarks/hf_families.py --check-only
    PYTHONPATH=. .venv/bin/python benchmarks/hf_families.py -j 2 --ops widen --out /tmp/hf.md --json

Exit code 1 only when a row is WRONG.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import inspect
import json
import os
import re
import sys
import tempfile
import time
import traceback
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network: everything is built from configs
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from hf_ideal import (expert_counts, format_classes, frozen_spaces, ideal_kwargs, is_principled,  # noqa: E402
                      space_classes)
EXACT = 1e-5


def kw(*bases, drop=(), **extra) -> dict:
    """Config keyword arguments: the bases merged less ``drop``, then ``extra``."""
    return {k: v for b in bases + (extra,) for k, v in b.items() if k not in drop}


TOK = kw(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # inside every vocab: no warnings at generate
# Llama-style decoders share one tiny shape; GQA (4 query heads, 2 kv heads) wherever the family has it
DEC = kw(TOK, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
         num_key_value_heads=2, max_position_embeddings=64)
MHA = kw(DEC, drop=["num_key_value_heads"])
ENC = kw(MHA, max_position_embeddings=66, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
GPT2ISH = kw(TOK, vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=64, resid_pdrop=0.0,
             embd_pdrop=0.0, attn_pdrop=0.0)
MOE = kw(DEC, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
SEQ2SEQ = kw(TOK, vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
             dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, decoder_start_token_id=2)
VIS = kw(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
         num_labels=10)
# 400 samples -> (400 - 10) / 5 + 1 = 79 -> (79 - 3) / 2 + 1 = 39 frames
AUDIO = kw(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, conv_dim=[32, 32],
           conv_stride=[5, 2], conv_kernel=[10, 3], num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
           hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0)
SDPA, EAGER = "sdpa", "eager"

# name: (model class, config kwargs, attention implementation, what is special about the architecture).
# The config class is the model class's config_class; every family builds in well under a second.
FAMILIES = {
    "gpt2": ("GPT2LMHeadModel", GPT2ISH, SDPA, "pre-LN, Conv1D, fused c_attn"),
    "llama": ("LlamaForCausalLM", DEC, SDPA, "pre-RMSNorm, SwiGLU"),
    "mistral": ("MistralForCausalLM", kw(DEC, sliding_window=16), SDPA, "sliding window 16 (< prompt + 8)"),
    "qwen2": ("Qwen2ForCausalLM", DEC, SDPA, "qkv bias"),
    # real Qwen3 has heads * head_dim != hidden (0.6B: 16 x 128 vs 1024): mirrored by 4 x 32 vs 64
    "qwen3": ("Qwen3ForCausalLM", kw(DEC, head_dim=32), SDPA, "q/k RMSNorm, heads*hd != hidden"),
    "gemma": ("GemmaForCausalLM", kw(DEC, head_dim=16), SDPA, "embed * sqrt(hidden), (1+w) RMSNorm"),
    # Gemma2 refuses sdpa in transformers 5.24 ("does not support ... scaled_dot_product_attention yet")
    "gemma2": ("Gemma2ForCausalLM", kw(DEC, head_dim=16, query_pre_attn_scalar=16, sliding_window=16), EAGER,
               "sandwich norms, logit softcaps"),
    "gemma3": ("Gemma3ForCausalLM", kw(DEC, head_dim=16, query_pre_attn_scalar=16, sliding_window=16), SDPA,
               "sandwich norms, q/k norm, local/global"),
    "phi3": ("Phi3ForCausalLM", kw(DEC, original_max_position_embeddings=64), SDPA, "fused qkv_proj / gate_up_proj"),
    "opt": ("OPTForCausalLM", kw(MHA, drop=["intermediate_size"], ffn_dim=128, dropout=0.0), SDPA, "pre-LN"),
    # OPT-350m: post-LN and a projection around the decoder (word_embed_proj_dim != hidden, 512 vs 1024 there)
    "opt-350m-style": ("OPTForCausalLM", kw(MHA, drop=["intermediate_size"], ffn_dim=128, dropout=0.0,
                                            do_layer_norm_before=False, word_embed_proj_dim=32), SDPA,
                       "post-LN, project_in/out"),
    "gpt-neox": ("GPTNeoXForCausalLM", MHA, SDPA, "use_parallel_residual, fused qkv, partial rotary"),
    "bert": ("BertForMaskedLM", ENC, SDPA, "post-LN"),
    "roberta": ("RobertaForMaskedLM", kw(ENC, pad_token_id=1, bos_token_id=0), SDPA, "post-LN, pad-offset positions"),
    "mixtral": ("MixtralForCausalLM", kw(DEC, num_local_experts=4, num_experts_per_tok=2), SDPA, "MoE 4 experts top-2"),
    "vit": ("ViTForImageClassification", kw(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=32, patch_size=8, num_labels=10), SDPA,
            "pre-LN, CLS head"),
    # further common families
    "falcon": ("FalconForCausalLM", kw(MHA, drop=["intermediate_size"], ffn_hidden_size=128, num_kv_heads=2,
                                         new_decoder_architecture=True), SDPA,
               "parallel attn/MLP, ln_attn + ln_mlp"),
    "phi": ("PhiForCausalLM", DEC, SDPA, "parallel attn/MLP, partial rotary"),
    "stablelm": ("StableLmForCausalLM", DEC, SDPA, "LayerNorm, partial rotary"),
    "gptj": ("GPTJForCausalLM", kw(GPT2ISH, rotary_dim=8), EAGER, "parallel attn/MLP"),
    "bloom": ("BloomForCausalLM", kw(TOK, vocab_size=128, hidden_size=64, n_layer=2, n_head=4), EAGER,
              "ALiBi, embedding LN, fused qkv"),
    "gpt-bigcode": ("GPTBigCodeForCausalLM", GPT2ISH, SDPA, "multi-query"),
    "gpt-neo": ("GPTNeoForCausalLM", kw(MHA, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                                        window_size=16), EAGER, "local attention, unscaled scores"),
    "codegen": ("CodeGenForCausalLM", kw(GPT2ISH, drop=["pad_token_id"], rotary_dim=8, n_ctx=64), EAGER,
                "fused qkv (mp_num=4 blocks)"),
    "granite": ("GraniteForCausalLM", kw(DEC, embedding_multiplier=2.0, residual_multiplier=0.5,
                                         attention_multiplier=0.2, logits_scaling=4.0), SDPA, "muP multipliers"),
    "olmo": ("OlmoForCausalLM", DEC, SDPA, "non-parametric LayerNorm"),
    "olmo2": ("Olmo2ForCausalLM", DEC, SDPA, "post-norm on the branch outputs, q/k norm"),
    "cohere": ("CohereForCausalLM", DEC, SDPA, "parallel attn/MLP, LayerNorm, logit scale"),
    "starcoder2": ("Starcoder2ForCausalLM", DEC, SDPA, "LayerNorm with bias"),
    "smollm3": ("SmolLM3ForCausalLM", kw(DEC, no_rope_layer_interval=2), SDPA, "NoPE layers"),
    "helium": ("HeliumForCausalLM", kw(DEC, head_dim=16), SDPA, "llama-like"),
    "glm": ("GlmForCausalLM", kw(DEC, head_dim=16), SDPA, "partial rotary, fused gate_up"),
    "nemotron": ("NemotronForCausalLM", DEC, SDPA, "LayerNorm1P, relu2, partial rotary"),
    "qwen2-moe": ("Qwen2MoeForCausalLM", kw(MOE, shared_expert_intermediate_size=128), SDPA, "MoE + shared expert"),
    "qwen3-moe": ("Qwen3MoeForCausalLM", MOE, SDPA, "MoE, q/k norm"),
    "olmoe": ("OlmoeForCausalLM", kw(MOE, drop=["moe_intermediate_size"]), SDPA, "MoE, q/k norm"),
    "deepseek-v3": ("DeepseekV3ForCausalLM", kw(MOE, drop=["num_experts"], num_key_value_heads=4, kv_lora_rank=16,
                                                q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                                                n_routed_experts=4, n_group=1, topk_group=1, first_k_dense_replace=1),
                    SDPA, "MLA (low-rank q/kv) + MoE, layer 0 dense"),
    "exaone4": ("Exaone4ForCausalLM", kw(DEC, sliding_window=16, sliding_window_pattern=2), SDPA,
                "post-norm on the branch outputs, q/k norm"),
    "apertus": ("ApertusForCausalLM", DEC, SDPA, "xIELU MLP, no gate"),
    "arcee": ("ArceeForCausalLM", DEC, SDPA, "relu2 MLP, no gate"),
    "seed-oss": ("SeedOssForCausalLM", kw(DEC, head_dim=32, attention_dropout=0.0, residual_dropout=0.0), SDPA,
                 "heads*hd != hidden"),
    "lfm2": ("Lfm2ForCausalLM", kw(DEC, full_attn_idxs=[1], block_auto_adjust_ff_dim=False), SDPA,
             "short-conv + attention hybrid"),
    "distilbert": ("DistilBertForMaskedLM", kw(MHA, drop=["intermediate_size"], hidden_dim=128, dropout=0.0,
                                               attention_dropout=0.0), SDPA, "post-LN"),
    "electra": ("ElectraModel", kw(ENC, embedding_size=32), SDPA, "post-LN, embeddings_project 32 -> 64"),
    "xlm-roberta": ("XLMRobertaForMaskedLM", kw(ENC, pad_token_id=1, bos_token_id=0), SDPA, "post-LN"),
    "modernbert": ("ModernBertForMaskedLM", kw(MHA, local_attention=8, cls_token_id=1, sep_token_id=2), SDPA,
                   "pre-LN, local/global layers, fused Wqkv"),
    "deberta-v2": ("DebertaV2ForMaskedLM", kw(ENC, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                              max_relative_positions=16), EAGER, "post-LN, disentangled attention"),
    # 3 layers: with 2, each T5Block's own 2-entry ModuleList (attention, FF) also matches num_layers
    "t5-encoder": ("T5EncoderModel", kw(TOK, drop=["bos_token_id"], vocab_size=128, d_model=64, d_kv=16, d_ff=128,
                                        num_layers=3, num_heads=4, dropout_rate=0.0, is_encoder_decoder=False),
                   EAGER, "pre-RMSNorm, relative bias, unscaled scores"),
    # encoder-decoders: called with input_ids (or input_features) and decoder_input_ids by keyword
    "t5": ("T5ForConditionalGeneration", kw(TOK, drop=["bos_token_id"], vocab_size=128, d_model=64, d_kv=16, d_ff=128,
                                            num_layers=3, num_decoder_layers=3, num_heads=4, dropout_rate=0.0),
           EAGER, "enc-dec, relative bias, tied embeddings (rescaled logits)"),
    "bart": ("BartForConditionalGeneration", SEQ2SEQ, SDPA, "enc-dec, post-LN, learned positions (offset 2)"),
    "marian": ("MarianMTModel", kw(SEQ2SEQ, decoder_start_token_id=0), SDPA, "enc-dec, sinusoidal, scale_embedding"),
    "m2m100": ("M2M100ForConditionalGeneration", SEQ2SEQ, SDPA, "enc-dec, pre-LN, sinusoidal, scale_embedding"),
    "mbart": ("MBartForConditionalGeneration", SEQ2SEQ, SDPA, "enc-dec, pre-LN, embedding LN"),
    "pegasus": ("PegasusForConditionalGeneration", kw(SEQ2SEQ, drop=["bos_token_id"], decoder_start_token_id=0), SDPA,
                "enc-dec, pre-LN, sinusoidal"),
    # Whisper's encoder takes exactly 2 * max_source_positions frames
    "whisper": ("WhisperForConditionalGeneration", kw(SEQ2SEQ, drop=["max_position_embeddings"], num_mel_bins=16,
                                                      max_source_positions=16, max_target_positions=32,
                                                      decoder_start_token_id=1, suppress_tokens=None,
                                                      begin_suppress_tokens=None), SDPA,
                "speech enc-dec (input_features), conv stem, sinusoidal encoder"),
    "speech2text": ("Speech2TextForConditionalGeneration", kw(SEQ2SEQ, drop=["max_position_embeddings"],
                                                              max_source_positions=64, max_target_positions=64,
                                                              num_conv_layers=2, conv_kernel_sizes=[5, 5],
                                                              conv_channels=32, input_feat_per_channel=16,
                                                              input_channels=1), EAGER,
                    "speech enc-dec, conv subsampler (GLU), sinusoidal"),
    # vision and audio encoders (pixel_values / input_values) and CLIP's towers
    "deit": ("DeiTForImageClassification", VIS, SDPA, "ViT + distillation token"),
    "beit": ("BeitForImageClassification", kw(VIS, use_relative_position_bias=True), SDPA,
             "per-layer relative position bias, layer scale, mean pooling"),
    "data2vec-vision": ("Data2VecVisionForImageClassification", kw(VIS, use_shared_relative_position_bias=True), SDPA,
                        "BEiT-like, shared relative bias"),
    "dinov2": ("Dinov2Model", kw(VIS, drop=["intermediate_size", "num_labels"], mlp_ratio=2), SDPA,
               "layer scale, interpolated positions"),
    "swin": ("SwinForImageClassification", kw(image_size=32, patch_size=4, embed_dim=32, depths=[2, 2],
                                              num_heads=[2, 4], window_size=4, num_labels=10), EAGER,
             "windowed attention, relative bias table, patch merging (per-stage widths)"),
    "convnext": ("ConvNextForImageClassification", kw(image_size=32, patch_size=4, num_stages=2, hidden_sizes=[32, 64],
                                                      depths=[2, 2], num_labels=10), EAGER,
                 "depthwise conv, channels-last LN, layer scale (per-stage widths)"),
    "clip-vision": ("CLIPVisionModel", kw(VIS, drop=["num_labels"]), SDPA, "pre-LN, quick_gelu, pre/post LN"),
    "clip-text": ("CLIPTextModel", kw(TOK, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64), SDPA,
                  "causal mask, eos pooling"),
    "siglip-vision": ("SiglipVisionModel", kw(VIS, drop=["num_labels"]), SDPA, "attention-pooling head (MHA)"),
    "wav2vec2": ("Wav2Vec2Model", AUDIO, SDPA, "conv feature extractor (group norm), grouped conv positions, post-LN"),
    "hubert": ("HubertModel", kw(AUDIO, do_stable_layer_norm=True, feat_extract_norm="layer"), SDPA,
               "conv feature extractor (layer norm), pre-LN"),
    # more MoE
    "gpt-oss": ("GptOssForCausalLM", kw(DEC, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                        sliding_window=16), EAGER,
                "MoE (stacked expert weights, biased router), attention sinks"),
    "phimoe": ("PhimoeForCausalLM", kw(DEC, num_local_experts=4, num_experts_per_tok=2), SDPA,
               "MoE, sparsemixer routing, LayerNorm"),
    "granitemoe": ("GraniteMoeForCausalLM", kw(DEC, num_local_experts=4, num_experts_per_tok=2,
                                               embedding_multiplier=2.0, residual_multiplier=0.5,
                                               attention_multiplier=0.2, logits_scaling=4.0), SDPA,
                   "MoE (parallel experts), muP multipliers"),
    "granitemoe-shared": ("GraniteMoeSharedForCausalLM", kw(DEC, num_local_experts=4, num_experts_per_tok=2,
                                                            shared_intermediate_size=64), SDPA,
                          "MoE + shared expert"),
    # JetMoE: num_attention_heads = num_key_value_heads * num_experts_per_tok (mixture of attention heads)
    "jetmoe": ("JetMoeForCausalLM", kw(DEC, drop=["num_attention_heads", "pad_token_id"], kv_channels=16,
                                       num_local_experts=4, num_experts_per_tok=2), EAGER,
               "MoE MLP + mixture of attention heads"),
    "dbrx": ("DbrxForCausalLM", kw(TOK, vocab_size=128, d_model=64, n_heads=4, n_layers=2, max_seq_len=64,
                                   attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                                   ffn_config={"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2}),
             SDPA, "MoE (fused expert weights), fused Wqkv clipped at 8, LayerNorm without bias"),
    "glm4-moe": ("Glm4MoeForCausalLM", kw(MOE, drop=["num_experts"], n_routed_experts=4, n_shared_experts=1, n_group=1,
                                          topk_group=1, first_k_dense_replace=1), SDPA,
                 "MoE (sigmoid router, group top-k) + shared expert, layer 0 dense"),
    "deepseek-v2": ("DeepseekV2ForCausalLM", kw(MOE, drop=["num_experts"], num_key_value_heads=4, kv_lora_rank=16,
                                                q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                                                n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1,
                                                topk_method="greedy"), SDPA, "MLA + MoE, complex rotary"),
    # multi-query attention (one kv head)
    "llama-mqa": ("LlamaForCausalLM", kw(DEC, num_key_value_heads=1), SDPA, "MQA: 1 kv head"),
    "gemma-mqa": ("GemmaForCausalLM", kw(DEC, head_dim=16, num_key_value_heads=1), SDPA, "MQA (as Gemma-2B)"),
    "falcon-mqa": ("FalconForCausalLM", kw(MHA, drop=["intermediate_size"], ffn_hidden_size=128, multi_query=True,
                                           new_decoder_architecture=False, parallel_attn=True), SDPA,
                   "multi_query (as Falcon-7B), parallel attn/MLP, one LN"),
    # ALiBi, shared layers, sinusoidal / scaled embeddings
    "mpt": ("MptForCausalLM", kw(TOK, vocab_size=128, d_model=64, n_heads=4, n_layers=2, expansion_ratio=2,
                                 max_seq_len=64, attn_config={"alibi": True}), EAGER, "ALiBi, LayerNorm without bias"),
    "albert": ("AlbertForMaskedLM", kw(ENC, embedding_size=32, num_hidden_groups=1, inner_group_num=1), SDPA,
               "one layer shared by all, embedding 32 -> 64 projection, post-LN"),
    "xglm": ("XGLMForCausalLM", kw(TOK, vocab_size=128, d_model=64, ffn_dim=128, num_layers=2, attention_heads=4,
                                   max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
                                   activation_dropout=0.0), EAGER, "sinusoidal positions, scale_embedding, pre-LN"),
    "biogpt": ("BioGptForCausalLM", kw(MHA, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                       scale_embedding=True), SDPA, "scale_embedding, learned positions, pre-LN"),
}

# where block copy inserts its copy when the middle of the config.num_hidden_layers ModuleList is not a layer
# (Swin: the last block of a stage; a copy before a block would flip the shifted/unshifted windows after it)
DEEPEN_AT = {"swin": "swin.encoder.layers.0.blocks.1", "convnext": "convnext.encoder.stages.0.layers.0",
             "albert": "albert.encoder.albert_layer_groups.0.albert_layers.0"}  # ALBERT: the one shared layer


LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers",
              "num_decoder_layers")


def build_kwargs(name: str, layers: int | None = None) -> dict:
    kwargs = FAMILIES[name][1]
    if layers:
        kwargs = {**kwargs, **{k: layers for k in LAYER_KEYS if k in kwargs}}
    return kwargs


def make_config(cls, kwargs: dict, attn: str):
    # a config stores unknown keywords as plain attributes: a misspelt size would silently not apply
    known = set(inspect.signature(cls.config_class.__init__).parameters) | set(cls.config_class.attribute_map)
    unknown = sorted(set(kwargs) - known - {"num_labels"})
    if unknown:
        raise TypeError(f"{cls.config_class.__name__} has no field {unknown}")
    cfg = cls.config_class(**kwargs)
    cfg._attn_implementation = attn  # explicit: the default may pick flash/flex where installed
    return cfg


def kind_of(model) -> str:
    """seq2seq (encoder-decoder, called by keyword), causal, vision (pixel_values), audio (input_values /
    input_features), or encoder (input_ids)."""
    if getattr(model.config, "is_encoder_decoder", False):
        return "seq2seq"
    if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal"
    return {"pixel_values": "vision", "input_values": "audio", "input_features": "audio"}.get(
        model.main_input_name, "encoder")


def build(name: str, layers: int | None = None):
    """The family's tiny model (seed 0, eval, float32) and its kind (see kind_of).  ``layers`` overrides the
    depth (with 2, deepen copies layer 0, which some families build differently from the rest)."""
    cls_name, _, attn, _ = FAMILIES[name]
    cls = getattr(transformers, cls_name)
    cfg = make_config(cls, build_kwargs(name, layers), attn)
    torch.manual_seed(0)
    model = cls(cfg).float().eval()
    return model, kind_of(model)


def ideal_params(name: str, model, factor: float, layers: int | None = None) -> int:
    """Parameters of the family built at the requested widths (hf_ideal.ideal_kwargs), on the meta device."""
    cls = type(model)
    kwargs = ideal_kwargs(cls.config_class, build_kwargs(name, layers), model.config, factor)
    cfg = make_config(cls, kwargs, FAMILIES[name][2])
    try:
        with torch.device("meta"):
            return n_params(cls(cfg))
    except Exception:  # noqa: BLE001 - an init that computes on its weights (sinusoidal tables): build it for real
        return n_params(cls(cfg))


def batch_inputs(model, kind: str, n: int = 3, seed: int = 0) -> list[dict]:
    """``n`` random batches of keyword inputs (batch 2, seq 8..12, decoder seq 4..7), fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config

    def length(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=g))

    def ids(vocab, lo=8, hi=13):
        # tokens from 3 up: no pad (RoBERTa's position ids skip pads) and no eos (generate would stop early)
        return torch.randint(3, vocab, (2, length(lo, hi)), generator=g)

    def one() -> dict:
        main = model.main_input_name
        if main == "pixel_values":
            return {main: torch.randn(2, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g)}
        if main == "input_values":
            return {main: torch.randn(2, 400, generator=g)}
        if main == "input_features":
            if hasattr(cfg, "num_mel_bins"):  # Whisper: (batch, mel bins, exactly 2 * max_source_positions frames)
                x = torch.randn(2, cfg.num_mel_bins, 2 * cfg.max_source_positions, generator=g)
            else:  # Speech2Text: (batch, frames, features)
                x = torch.randn(2, length(16, 25), cfg.input_feat_per_channel * cfg.input_channels, generator=g)
        else:
            x = ids(cfg.vocab_size)
        inp = {main: x}
        if kind == "seq2seq":
            inp["decoder_input_ids"] = ids(getattr(cfg, "decoder_vocab_size", None) or cfg.vocab_size, 4, 8)
        return inp

    return [one() for _ in range(n)]


def batches(model, kind: str, n: int = 3, seed: int = 0) -> list:
    """batch_inputs, a single input as its bare tensor (what scripts pass as ``example_inputs=(x,)``)."""
    return [example(x)[0] if len(x) == 1 else x for x in batch_inputs(model, kind, n, seed)]


def example(inp: dict):
    """graphgrow's example_inputs: one tensor positionally (as a user passes it), several by keyword."""
    return tuple(inp.values()) if len(inp) == 1 else dict(inp)


def main_output(out) -> torch.Tensor:
    """logits, else last_hidden_state, else the first output."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        v = getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v
    return out[0]


@torch.no_grad()
def run(model, inp: dict) -> torch.Tensor:
    return main_output(model(**inp))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def layer_path(model, name: str | None = None) -> str | None:
    """Module path of the middle layer (index n//2 - 1) of the ModuleList holding config.num_hidden_layers layers
    (the encoder's for an encoder-decoder; the one with the most parameters where several have that length)."""
    if name in DEEPEN_AT:
        return DEEPEN_AT[name]
    n = getattr(model.config, "num_hidden_layers", None)
    lists = [(path, mod) for path, mod in model.named_modules()
             if isinstance(mod, torch.nn.ModuleList) and n and len(mod) == n]
    if not lists:
        return None
    path, _ = max(lists, key=lambda pm: ("encoder" in pm[0], n_params(pm[1])))
    return f"{path}.{max(n // 2 - 1, 0)}"


def first_line(exc: BaseException) -> str:
    """The message's first line (with the second where the first only announces it, as load_state_dict's does)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()] or [type(exc).__name__]
    text = lines[0] + (" " + lines[1] if lines[0].endswith(":") and len(lines) > 1 else "")
    return text[:200]


def where(exc: BaseException) -> str:
    """`` @ graphgrow/…:line``: the innermost graphgrow frame of an unexpected error, to find the bug."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/graphgrow/" in f.filename]
    return f" @ graphgrow/{frames[-1].filename.rsplit('/graphgrow/', 1)[-1]}:{frames[-1].lineno}" if frames else ""


# (label, config attributes tried in turn): the standard names first, then the family's own
CONFIG_KEYS = [("h", ("hidden_size",)), ("emb", ("word_embed_proj_dim", "embedding_size")),
               ("ff", ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "hidden_dim", "d_ff")),
               ("moe_ff", ("moe_intermediate_size",)), ("heads", ("num_attention_heads",)),
               ("kv", ("num_key_value_heads", "num_kv_heads")), ("hd", ("head_dim",)), ("L", ("num_hidden_layers",)),
               ("experts", ("num_local_experts", "num_experts"))]


def cfg_get(cfg, names):
    return next((v for v in (getattr(cfg, n, None) for n in names) if type(v) is int), None)


def config_diff(old, new) -> str:
    """``h 64→128, heads 4, ...``: the sizes the family's config has, old → new where they changed."""
    pairs = [(label, cfg_get(old, names), cfg_get(new, names)) for label, names in CONFIG_KEYS]
    return ", ".join(f"{lb} {a}" if a == b else f"{lb} {a}→{b}" for lb, a, b in pairs if (a, b) != (None, None))


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


F64_FLOOR = 1e-6  # float64 error above this is not rounding of the float32 weights (~1e-7) but a real change


def float64_err(model, grown, xs) -> float | None:
    """The same comparison in float64: float32 rounding vanishes there, a real change of the function (e.g. an
    eps rescaled for a norm that did not grow) stays.  None where a kernel is float32-only (MoE grouped_mm)."""
    try:
        m64, g64 = copy.deepcopy(model).double(), copy.deepcopy(grown).double()
        xs64 = [{k: v.double() if v.is_floating_point() else v for k, v in x.items()} for x in xs]
        return max(rel_err(run(m64, x), run(g64, x)) for x in xs64)
    except Exception:  # noqa: BLE001
        return None


def check_config(model, grown, xs, attn: str) -> str:
    """``type(model)(grown.config)`` must take ``grown.state_dict()`` (strict, same shapes) and compute the same:
    a config that only names the new shapes but leaves e.g. head_dim or rotary sizes stale fails here."""
    cfg = copy.deepcopy(grown.config)
    cfg._attn_implementation = attn
    fresh = type(model)(cfg).float().eval()
    want, have = grown.state_dict(), fresh.state_dict()
    bad = [k for k in want if k in have and want[k].shape != have[k].shape]
    if bad:
        return f"shape {bad[0]} {tuple(want[bad[0]].shape)} vs {tuple(have[bad[0]].shape)}"
    fresh.load_state_dict(want, strict=True)
    err = max(rel_err(run(grown, x), run(fresh, x)) for x in xs)
    return "ok" if err <= EXACT else f"loads, output differs {err:.1e}"


def check_reload(model, grown, xs) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        grown.save_pretrained(tmp)
        back = type(model).from_pretrained(tmp, attn_implementation=grown.config._attn_implementation).eval()
    same = all(torch.equal(run(grown, x), run(back, x)) for x in xs)
    return "identical" if same else f"differs {max(rel_err(run(grown, x), run(back, x)) for x in xs):.1e}"


@torch.no_grad()
def check_generate(model, grown, inp: dict, kind: str) -> tuple[str, bool]:
    """Greedy generation with the KV cache (an encoder-decoder's decoder from its start token); (text, is_wrong).
    A differing token is not WRONG when the original's top two logits at that step are within float32 noise (a
    tie flip, not a different function)."""
    enc = {k: v for k, v in inp.items() if k != "decoder_input_ids"}
    gen = {**enc, "max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    if "input_ids" in enc:
        gen["attention_mask"] = torch.ones_like(enc["input_ids"])
    a, b = model.generate(**gen), grown.generate(**gen)
    if a.shape == b.shape and torch.equal(a, b):
        return "same", False
    if a.shape[1] != b.shape[1]:
        return f"lengths {a.shape[1]} vs {b.shape[1]}", True
    pos = int((a != b).any(0).nonzero()[0])
    prompt = 1 if kind == "seq2seq" else enc["input_ids"].shape[1]
    prefix = {**enc, "decoder_input_ids": a[:, :pos]} if kind == "seq2seq" else {"input_ids": a[:, :pos]}
    logits = run(model, prefix)[:, -1]
    top = logits.topk(2, dim=-1).values
    tie = bool(((top[:, 0] - top[:, 1]) <= 1e-4 * logits.abs().max()).any())
    return f"differs at token {pos - prompt}" + (" (near tie)" if tie else ""), not tie


def grow(model, op: str, inp: dict, name: str | None = None):
    import graphgrow

    if op.startswith("widen"):
        return graphgrow.widen(model, float(op.split("x")[1]), example_inputs=example(inp))
    path = layer_path(model, name)
    if path is None:
        raise LookupError("no nn.ModuleList of config.num_hidden_layers layers")
    return graphgrow.deepen(model, after=re.escape(path), block="copy", example_inputs=example(inp))


def classify(exc: BaseException) -> str:
    from graphgrow.errors import GraphGrowError, VerificationError

    if isinstance(exc, GraphGrowError) and not isinstance(exc, VerificationError):
        return f"refused: {first_line(exc)}"
    return f"error: {type(exc).__name__}: {first_line(exc)}{where(exc)}"


def widen_facts(row: dict, name: str, model, grown, factor: float, layers: int | None) -> None:
    """fraction of ideal and the frozen spaces' reason classes (hf_ideal), into ``row``."""
    try:
        ideal = ideal_params(name, model, factor, layers)
        row["ideal"] = n_params(grown) / ideal
        row["ideal_s"] = f"{row['ideal']:.3f} of {ideal:,}"
    except Exception as exc:  # noqa: BLE001
        row["ideal_s"] = f"{type(exc).__name__}: {first_line(exc)}"
    report = getattr(grown, "graphgrow_report", None)
    if report is None:
        row["frozen"] = "no report"
        return
    counts = space_classes(report, factor, expert_counts(model.config))
    row["classes"] = dict(counts)
    row["spaces"] = frozen_spaces(report)
    row["notes"] = list(report.notes)
    row["frozen"] = format_classes(counts)
    row["principled"] = all(is_principled(c) for c in counts)


def grow_row(name: str, op: str, layers: int | None = None) -> dict:
    row = {"name": name, "family": f"{name} ({FAMILIES[name][2]})", "op": op}
    try:
        model, kind = build(name, layers)
    except Exception as exc:  # noqa: BLE001 - a family that does not build is a row, not a crash
        return {**row, "status": f"error: build: {type(exc).__name__}: {first_line(exc)}"}
    row["kind"] = kind
    xs = batch_inputs(model, kind)
    before = [run(model, x) for x in xs]
    row["params"] = f"{n_params(model):,}"
    t0 = time.perf_counter()
    try:
        grown = grow(model, op, xs[0], name)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded per row
        row.update(status=classify(exc), time=f"{time.perf_counter() - t0:.1f}")
        return row
    row["time"] = f"{time.perf_counter() - t0:.1f}"
    grown.eval()
    row["params"] += f" → {n_params(grown):,}"
    row["class"] = "yes" if type(grown) is type(model) else f"no: {type(grown).__name__}"
    if op.startswith("widen"):
        widen_facts(row, name, model, grown, float(op.split("x")[1]), layers)
    wrong = []
    try:
        err = max(rel_err(b, run(grown, x)) for b, x in zip(before, xs))
        row["err64"] = float64_err(model, grown, xs)
        row["err"] = f"{err:.1e} (f64 {'n/a' if row['err64'] is None else format(row['err64'], '.1e')})"
        if not err <= EXACT:
            wrong.append(f"output rel err {err:.1e}")
    except Exception as exc:  # noqa: BLE001
        row["err"] = "n/a"
        wrong.append(f"forward failed: {type(exc).__name__}: {first_line(exc)}")
    if any(not torch.equal(b, run(model, x)) for b, x in zip(before, xs)):
        wrong.append("the original model was modified")
    row["config"] = config_diff(model.config, getattr(grown, "config", model.config))
    for key, fn in (("cfg_ok", lambda: check_config(model, grown, xs, FAMILIES[name][2])),
                    ("reload", lambda: check_reload(model, grown, xs))):
        try:
            row[key] = fn()
        except Exception as exc:  # noqa: BLE001
            row[key] = f"{type(exc).__name__}: {first_line(exc)}"
    row["generate"] = "N/A"
    if kind in ("causal", "seq2seq"):
        try:
            row["generate"], bad = check_generate(model, grown, xs[0], kind)
            if bad:
                wrong.append(f"generate {row['generate']}")
        except Exception as exc:  # noqa: BLE001
            row["generate"] = f"{type(exc).__name__}: {first_line(exc)}"
    if wrong:
        row["status"] = "WRONG: " + "; ".join(wrong)
    else:
        row["status"] = "exact" + (" (nothing grew)" if n_params(grown) == n_params(model) else "")
    return row


def head_dim_note(model) -> str:
    """Whether the config carries head_dim (explicit) or the model derives hidden_size // num_attention_heads."""
    cfg = model.config
    field = inspect.signature(type(cfg).__init__).parameters.get("head_dim")
    if type(getattr(cfg, "hidden_size", None)) is not int or type(getattr(cfg, "num_attention_heads", None)) is not int:
        return "n/a (no single hidden / heads)"
    derived = cfg.hidden_size // cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None)
    if type(cfg).attribute_map.get("head_dim"):
        return f"field {type(cfg).attribute_map['head_dim']} = {hd}"
    if isinstance(getattr(type(cfg), "head_dim", None), property):
        return f"property hidden/heads = {hd}"
    if field is None and hd is None:  # the modeling code may still read an extra config.head_dim attribute
        source = inspect.getsource(sys.modules[type(model).__module__])
        return f"derived {derived}" + (" (getattr: settable)" if 'getattr(config, "head_dim"' in source else " (hard)")
    if field is None:
        return f"no field, set to {hd} in __init__"
    if field.default is None:  # __post_init__ stores hidden // heads: the grown config carries it explicitly
        return f"field, None → {hd} stored" if hd is not None else f"field None, derived {derived}"
    return f"field {hd} (default {field.default})" + ("" if hd == derived else f", ≠ {cfg.hidden_size}/"
                                                                             f"{cfg.num_attention_heads}")


def tied(model) -> str:
    out = model.get_output_embeddings()
    if out is None or not hasattr(out, "weight"):
        return "no LM head"
    return "tied" if out.weight is model.get_input_embeddings().weight else "untied"


class Wrapper(torch.nn.Module):
    """forward(*tensors) -> main output tensor, the tensors passed by keyword (``names``); use_cache=False so
    export sees no cache object."""

    def __init__(self, model, names):
        super().__init__()
        self.model, self.names = model, tuple(names)
        self.kw = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}

    def forward(self, *xs):
        return main_output(self.model(**dict(zip(self.names, xs)), **self.kw))


def check_row(name: str, layers: int | None = None) -> dict:
    row = {"family": name, "class": FAMILIES[name][0], "attn": FAMILIES[name][2], "note": FAMILIES[name][3]}
    t0 = time.perf_counter()
    try:
        model, kind = build(name, layers)
        row.update(build=f"{time.perf_counter() - t0:.2f}", params=f"{n_params(model):,}")
        x = batch_inputs(model, kind, 1)[0]
        row["forward"] = f"ok {tuple(run(model, x).shape)}"
        row.update(kind=kind, head_dim=head_dim_note(model), tied=tied(model),
                   layer=layer_path(model, name) or "none")
    except Exception as exc:  # noqa: BLE001
        row["build"] = f"error: {type(exc).__name__}: {first_line(exc)}"
        return row
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            torch.export.export(Wrapper(model, x), tuple(x.values()), strict=False)
        row["export"] = "ok"
    except Exception as exc:  # noqa: BLE001
        row["export"] = f"error: {type(exc).__name__}: {first_line(exc)}"
    row["export_s"] = f"{time.perf_counter() - t0:.1f}"
    return row


GROW_COLS = [("family", "family (attn)"), ("op", "op"), ("status", "status"), ("class", "same class"),
             ("err", "max rel err"), ("ideal_s", "fraction of ideal"), ("frozen", "frozen spaces by reason"),
             ("cfg_ok", "config reload"), ("config", "config old → new"), ("reload", "save/load"),
             ("generate", "generate"), ("params", "params"), ("time", "time s")]
CHECK_COLS = [("family", "family"), ("class", "class"), ("kind", "inputs"), ("attn", "attn"), ("params", "params"),
              ("build", "build s"), ("forward", "forward"), ("export", "export"), ("export_s", "export s"),
              ("head_dim", "head_dim"), ("tied", "embeddings"), ("layer", "deepen after"), ("note", "architecture")]
REASONS = ("a: reaches a model output, b: the config cannot state it grown, c: ALiBi, d: sinusoidal, e: post-norm "
           "stream kept to whole factors, f: expert count (router); gap(<op>): the op whose relation is missing; a "
           "pre-norm stream kept to whole factors is a gap named by its cause (one config epsilon, fill + rescale did "
           "not verify)")


def table(rows, cols) -> list[str]:
    def cell(v):
        return str(v).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    return out + ["| " + " | ".join(cell(r.get(k, "—")) for k, _ in cols) + " |" for r in rows]


def one_row(task) -> dict:
    """A row, whatever happens: a harness bug on one row must not lose the table."""
    name, op, layers, check_only = task
    try:
        return check_row(name, layers) if check_only else grow_row(name, op, layers)
    except Exception as exc:  # noqa: BLE001
        return {"name": name, "family": name, "op": op,
                "status": f"error: harness: {type(exc).__name__}: {first_line(exc)}"}


def worker_init(threads: int) -> None:
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # save/load bars would bury the rows
    torch.set_num_threads(threads)


def run_rows(tasks: list, jobs: int, report) -> list:
    """Every task's row, in task order; ``jobs`` > 1: in that many worker processes (spawned: no forked torch
    threads).  A worker that dies (a native crash) loses no other row: the rows it may have taken are rerun one
    process each, and the one that dies again is an error row."""
    if jobs <= 1:
        return [report(t, one_row(t)) for t in tasks]
    import concurrent.futures as cf
    import multiprocessing as mp

    threads = max(1, (os.cpu_count() or 1) // jobs)
    ctx = mp.get_context("spawn")
    rows: dict = {}
    lost: list = []
    with cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=worker_init, initargs=(threads,)) as pool:
        futures = {pool.submit(one_row, t): i for i, t in enumerate(tasks)}
        for fut in cf.as_completed(futures):
            i = futures[fut]
            try:
                rows[i] = report(tasks[i], fut.result())
            except cf.process.BrokenProcessPool:
                lost.append(i)
    for i in sorted(lost):
        with cf.ProcessPoolExecutor(1, mp_context=ctx, initializer=worker_init, initargs=(threads,)) as pool:
            try:
                rows[i] = report(tasks[i], pool.submit(one_row, tasks[i]).result())
            except cf.process.BrokenProcessPool:
                name, op = tasks[i][:2]
                rows[i] = report(tasks[i], {"name": name, "family": name, "op": op,
                                            "status": "error: the worker process died (native crash)"})
    return [rows[i] for i in range(len(tasks))]


def grow_summary(rows: list) -> str:
    count = {k: sum(r["status"].startswith(k) for r in rows) for k in ("exact", "refused", "WRONG", "error")}
    full = sum(r["status"].startswith("exact") and r.get("class") == "yes" and r.get("cfg_ok") == "ok"
               and r.get("reload") == "identical" and r.get("generate") in ("same", "N/A") for r in rows)
    noop = sum(r["status"] == "exact (nothing grew)" for r in rows)
    approx = sum(r["status"].startswith("exact") and (r.get("err64") or 0) > F64_FLOOR for r in rows)
    text = (f"{count['exact']} exact / {count['refused']} refused / {count['WRONG']} wrong / {count['error']} errors "
            f"(of {len(rows)} rows); of the exact: {full} pass every check (same class, config reload, save/load, "
            f"generate), {noop} grew nothing, {approx} differ in float64 by more than {F64_FLOOR:g} (under "
            f"{EXACT:g} in float32, but not rounding)")
    widen = [r for r in rows if r["op"].startswith("widen")]
    if not widen:
        return text
    # a family is principled when every widening of it is exact and each of its frozen spaces has an accepted reason
    by_family: dict = {}
    for r in widen:
        by_family.setdefault(r["name"], []).append(r)
    principled = sorted(n for n, rs in by_family.items()
                        if all(r["status"].startswith("exact") and r.get("principled") for r in rs))
    gaps: dict = {}
    for r in widen:
        for c, k in (r.get("classes") or {}).items():
            if not is_principled(c):
                gaps[c] = gaps.get(c, 0) + k
    x2 = [r for r in widen if float(r["op"].split("x")[1]) == 2 and r.get("kind") == "causal"]
    good = sorted(r["name"] for r in x2 if r["status"].startswith("exact") and (r.get("ideal") or 0) >= 0.97)
    # the target applies where nothing but the config (b) or a router (f) keeps a space: (a) is the output vocabulary,
    # and (c)/(d) (ALiBi slopes, sinusoidal tables) hold a model below it by construction
    held = {r["name"] for r in x2 if set(r.get("classes") or {}) - {"a", "b", "f"}}
    below = sorted(f"{r['name']} {r.get('frozen', '')}" for r in x2 if r["name"] not in good)
    text += (f"; widen: {len(principled)}/{len(by_family)} families have only principled frozen spaces (a-f) in "
             f"every widening; {len(good)}/{len(x2)} decoder-only families reach >= 0.97 of ideal at x2 "
             f"({len(set(good) - held)}/{len(x2) - len(held)} of those whose frozen spaces are only (b)/(f) besides "
             f"the output's (a); below: {', '.join(below) or 'none'})")
    if gaps:
        top = ", ".join(f"{c} {n}" for c, n in sorted(gaps.items(), key=lambda kv: -kv[1])[:8])
        text += f"; gap spaces by op: {top}"
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", help="comma-separated names (default: all): " + ",".join(FAMILIES))
    ap.add_argument("--factors", default="2,1.5", help="widening factors (default 2,1.5)")
    ap.add_argument("--ops", default="widen,deepen", help="comma-separated: widen (at --factors), deepen "
                    "(block copy); default both")
    ap.add_argument("--no-deepen", action="store_true", help="skip the deepen rows (as --ops widen)")
    ap.add_argument("--layers", type=int, help="depth of every model (default: each family's, mostly 2)")
    ap.add_argument("--check-only", action="store_true", help="build, forward and torch.export each model only")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="rows in N worker processes (default 1: in process)")
    ap.add_argument("--out", help="markdown output (default benchmarks/results/hf_families[_check].md)")
    ap.add_argument("--json", nargs="?", const="", metavar="PATH",
                    help="also write the rows as JSON (default: --out with .json)")
    args = ap.parse_args(argv)
    names = args.families.split(",") if args.families else list(FAMILIES)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        ap.error(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    ops_wanted = {o.strip() for o in args.ops.split(",") if o.strip()}
    if ops_wanted - {"widen", "deepen"}:
        ap.error(f"unknown ops {sorted(ops_wanted - {'widen', 'deepen'})}; known: widen, deepen")
    out = args.out or os.path.join(HERE, "results", "hf_families_check.md" if args.check_only else "hf_families.md")
    worker_init(max(1, (os.cpu_count() or 1) // max(1, args.jobs)))

    ops = ([f"widen x{float(f):g}" for f in args.factors.split(",") if f] if "widen" in ops_wanted else []) + (
        ["deepen copy"] if "deepen" in ops_wanted and not args.no_deepen else [])
    tasks = [(name, op, args.layers, args.check_only) for name in names
             for op in ([None] if args.check_only else ops)]

    def report(task, r):
        name, op = task[:2]
        print(f"{name:18s} {op or 'check':12s} " + (f"build {r.get('build')} export {r.get('export')} "
              f"{r.get('export_s', '')}s" if args.check_only else f"{r['status']}  {r.get('ideal_s', '')} "
              f"{r.get('frozen', '')}"), flush=True)
        return r

    t0 = time.perf_counter()
    rows = run_rows(tasks, args.jobs, report)
    took = time.perf_counter() - t0

    cmd = "PYTHONPATH=. .venv/bin/python benchmarks/hf_families.py " + " ".join(sys.argv[1:] if argv is None else argv)
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    head = [f"# graphgrow on Hugging Face families{' (--check-only)' if args.check_only else ''}", "",
            f"Command: `{cmd.strip()}`  ",
            f"torch {torch.__version__}, transformers {transformers.__version__}, {when}, CPU float32, random weights, "
            f"{len(names)} families, {took / 60:.1f} min with {args.jobs} job(s)", ""]
    if args.check_only:
        ok = sum(r.get("export") == "ok" for r in rows)
        built = sum("forward" in r for r in rows)
        summary = f"{built}/{len(rows)} build and run, {ok}/{len(rows)} export"
        body = table(rows, CHECK_COLS)
    else:
        summary = grow_summary(rows)
        body = ["Frozen-space classes: " + REASONS + ".  Fraction of ideal: grown parameters / parameters of the "
                "family built at the requested widths (every width field scaled, head_dim kept).", ""]
        body += table(rows, GROW_COLS)
    text = "\n".join(head + [f"**{summary}**", ""] + body) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    if args.json is not None:
        with open(args.json or os.path.splitext(out)[0] + ".json", "w") as f:
            json.dump({"command": cmd.strip(), "seconds": round(took, 1), "summary": summary, "rows": rows}, f,
                      indent=1, default=str)
    print("\n" + text)
    return 1 if any(r.get("status", "").startswith("WRONG") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
