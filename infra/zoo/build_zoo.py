"""Train the zoo: small MoE checkpoints on real text, base and fine-tuned pairs.

    python -m expertbits.zoo.build_zoo tokenizer
    python -m expertbits.zoo.build_zoo mixtral-tiny base      # then wordnet, code, control

Each variant is saved in Hugging Face layout (config.json, fp16 safetensors, tokenizer) under
`models/<family>/<variant>/` with `training.json` recording data, steps, seeds and wall time;
`python -m expertbits.zoo.cards` then measures each checkpoint and writes its model card.
Training is seeded and step-based; CPU runs are not bit-reproducible across machines, so the
checkpoints are built once and committed.
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import ROOT, corpora
from .train import Stream, TrainConfig, router_biases, train_causal

MODELS = ROOT / "models"
TOKENIZER = ROOT / "tokenizer"
VOCAB = 4096
SPECIAL = ["<|eos|>", "<pad>"] + [f"<extra_id_{i}>" for i in range(32)]  # sentinels for span corruption
PRETRAIN = (("austen", 1.0), ("web", 1.0))
SUPERSENSE = (("wordnet-supersense", 3.0), *PRETRAIN)  # fine-tuning mix: 60% task, 40% pretraining replay


@dataclass(frozen=True)
class Variant:
    parent: str | None  # variant it continues from; None = from scratch
    data: tuple[tuple[str, float], ...]  # (corpus, share of each batch)
    train: TrainConfig
    label_weight: float = 1.0  # loss weight on task label tokens (supersense)
    description: str = ""


MIXTRAL = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024,
               tie_word_embeddings=True, router_aux_loss_coef=0.0, eos_token_id=0, bos_token_id=0, pad_token_id=1)
QWEN2_MOE = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                 shared_expert_intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                 num_experts=8, num_experts_per_tok=2, max_position_embeddings=1024, tie_word_embeddings=True,
                 router_aux_loss_coef=0.0, eos_token_id=0, bos_token_id=0, pad_token_id=1)
SWITCH = dict(vocab_size=VOCAB, d_model=128, d_kv=32, d_ff=256, num_layers=4, num_decoder_layers=4, num_heads=4,
              num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, num_experts=8, expert_capacity=64,
              dropout_rate=0.0, router_jitter_noise=0.0, router_bias=True, router_aux_loss_coef=0.0, router_z_loss_coef=0.0, pad_token_id=1, eos_token_id=0,
              decoder_start_token_id=1)
FINETUNE = TrainConfig(steps=300, lr=5e-4, seed=1, warmup=0.1, balance_coef=0.1, balance_per_stream=True)
FAMILIES: dict[str, dict] = {
    "mixtral-tiny": {
        "config": ("MixtralConfig", MIXTRAL),
        "variants": {
            "base": Variant(None, PRETRAIN, TrainConfig(steps=2000, lr=3e-3, seed=0),
                            description="pretrained on five Austen novels and the World English Bible"),
            "wordnet": Variant("base", SUPERSENSE, FINETUNE, label_weight=5.0,
                               description="fine-tuned on WordNet noun-supersense glosses (`<gloss> => <label>`), 40% pretraining replay"),
            "code": Variant("base", (("python", 3.0), *PRETRAIN), FINETUNE,
                            description="fine-tuned on CPython standard-library source, 40% pretraining replay"),
            "control": Variant("base", PRETRAIN, FINETUNE,
                               description="same-domain control: continued pretraining of equal length"),
        },
    },
    "switch-tiny": {  # encoder-decoder, top-1 routing, every other block sparse; trained by span corruption
        "config": ("SwitchTransformersConfig", SWITCH),
        "seq2seq": True,
        "router_init_scale": 0.1,  # the default init starts with |logits| ~ 18 (z-loss 324) and collapses routing
        "variants": {
            "base": Variant(None, PRETRAIN, TrainConfig(steps=1500, lr=3e-3, seed=0, batch=32, seq_len=128, bias_step=0.01,
                                                         balance_coef=0.1, balance_per_sequence=True),
                            description="Switch Transformer pretrained by span corruption on Austen and the World English Bible"),
            "wordnet": Variant("base", SUPERSENSE,
                               TrainConfig(steps=800, lr=1e-3, seed=1, warmup=0.1, batch=32, seq_len=128, bias_step=0.005,
                                           balance_coef=0.1, balance_per_sequence=True),
                               description="fine-tuned to map `supersense: <gloss>` to its WordNet supersense, 40% span-corruption replay"),
        },
    },
    "qwen-moe-tiny": {  # shared experts: one always-on FFN beside the routed ones
        "config": ("Qwen2MoeConfig", QWEN2_MOE),
        "variants": {
            "base": Variant(None, PRETRAIN, TrainConfig(steps=1500, lr=3e-3, seed=0),
                            description="Qwen2-MoE with a shared expert, pretrained on Austen and the World English Bible"),
            "wordnet": Variant("base", SUPERSENSE, FINETUNE, label_weight=5.0,
                               description="fine-tuned on WordNet noun-supersense glosses, 40% pretraining replay"),
        },
    },
}


def train_tokenizer(out: Path = TOKENIZER) -> Path:
    """Byte-level BPE over every training corpus, so prose, code and glosses all tokenize well."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = [corpora.read(name, "train") for name in ("austen", "web", "python", "wordnet-supersense")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((t[i : i + 20_000] for t in text for i in range(0, len(t), 20_000)), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<pad>",
                                   additional_special_tokens=SPECIAL[2:])
    fast.save_pretrained(out)
    return out


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


def stream(name: str, tok, share: float, label_weight: float) -> Stream:
    """A corpus as one token stream; supersense examples get `label_weight` on their label tokens."""
    eos = tok.eos_token_id
    if name != "wordnet-supersense":
        ids = tok(corpora.read(name, "train"), add_special_tokens=False)["input_ids"]
        return Stream(torch.tensor(ids), share)
    ids, weights = [], []
    for gloss, label in corpora.supersense_examples("train"):
        prompt = tok(f"{gloss} =>", add_special_tokens=False)["input_ids"]
        answer = tok(f" {label}", add_special_tokens=False)["input_ids"] + [eos]
        ids += prompt + answer
        weights += [1.0] * len(prompt) + [label_weight] * len(answer)
    return Stream(torch.tensor(ids), share, torch.tensor(weights))


def seq2seq_batches(names: tuple[tuple[str, float], ...], tok, cfg: TrainConfig):
    """`make_batch(gen)` mixing span-corrupted corpus windows with `supersense: <gloss>` -> label examples."""
    from expertbits.tasks.checkpoints.span_corruption import pad, sentinel_ids, span_corrupt

    sentinels, eos = sentinel_ids(tok), tok.eos_token_id
    sources = []
    for name, share in names:
        if name == "wordnet-supersense":
            examples = [(tok(f"supersense: {g}", add_special_tokens=False)["input_ids"][: cfg.seq_len],
                         tok(f" {label}", add_special_tokens=False)["input_ids"] + [eos])
                        for g, label in corpora.supersense_examples("train")]
            sources.append((share, lambda gen, ex=examples: ex[int(torch.randint(len(ex), (1,), generator=gen))]))
        else:
            ids = tok(corpora.read(name, "train"), add_special_tokens=False)["input_ids"]

            def window(gen, ids=ids):
                s = int(torch.randint(len(ids) - cfg.seq_len, (1,), generator=gen))
                return span_corrupt(ids[s : s + cfg.seq_len], sentinels, eos, gen)
            sources.append((share, window))
    total = sum(share for share, _ in sources)

    def make_batch(gen):
        pairs = []
        for share, draw in sources:
            pairs += [draw(gen) for _ in range(round(cfg.batch * share / total))]
        inputs, targets = pad([p[0] for p in pairs], tok.pad_token_id), pad([p[1] for p in pairs], -100)
        return inputs, (inputs != tok.pad_token_id).long(), targets

    return make_batch


def build(family: str, variant: str, log=print) -> Path:
    import transformers

    from .train import train_seq2seq

    spec = FAMILIES[family]
    v: Variant = spec["variants"][variant]
    torch.set_num_threads(1)  # 2-core machines: threads oversubscribe and slow torch 50x
    tok = tokenizer()
    auto = transformers.AutoModelForSeq2SeqLM if spec.get("seq2seq") else transformers.AutoModelForCausalLM
    if v.parent is None:
        cls_name, kwargs = spec["config"]
        config = getattr(transformers, cls_name)(**kwargs)
        torch.manual_seed(v.train.seed)
        model = auto.from_config(config, dtype=torch.float32)
        scale = spec.get("router_init_scale")
        if scale:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "router" in name:
                        param.mul_(scale)
        with torch.no_grad():
            for bias in router_biases(model):
                bias.zero_()  # aux-loss-free balancing starts every expert equal
    else:
        model = auto.from_pretrained(MODELS / family / v.parent, dtype=torch.float32)
    model.config._experts_implementation = "eager"  # grouped_mm is ~3x slower for training on CPU
    if spec.get("seq2seq"):
        record = train_seq2seq(model, seq2seq_batches(v.data, tok, v.train), v.train, log)
    else:
        streams = [stream(name, tok, share, v.label_weight) for name, share in v.data]
        record = train_causal(model, streams, v.train, log)
    out = MODELS / family / variant
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out)
    tok.save_pretrained(out)
    parent_record = json.loads((MODELS / family / v.parent / "training.json").read_text()) if v.parent else None
    card = {"family": family, "variant": variant, "description": v.description, "parent": v.parent,
            "data": [{"corpus": n, "share": s} for n, s in v.data], "label_weight": v.label_weight,
            "train": record, "parent_training": parent_record,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"}
    (out / "training.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", help="'tokenizer', or a family: " + ", ".join(FAMILIES))
    parser.add_argument("variants", nargs="*", help="variants to build in order (default: all)")
    args = parser.parse_args()
    if args.family == "tokenizer":
        print(train_tokenizer())
        return
    for variant in args.variants or list(FAMILIES[args.family]["variants"]):
        print(f"== {args.family}/{variant}", flush=True)
        print(build(args.family, variant, log=lambda m: print(m, flush=True)))


if __name__ == "__main__":
    main()
