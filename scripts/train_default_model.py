"""Train the tiny default model that ships inside ``server/default_model/``.

The model is a plain ``transformers.LlamaForCausalLM`` (4 layers, hidden size 256,
8 attention heads, 4 key/value heads) with a byte-level BPE tokenizer, trained from
scratch on CPU in about ten minutes.  It is small and not clever, but it writes
English words, so a newcomer's first ``edgellm`` command shows text rather than noise.

Corpus
------
The documentation strings of the Python standard library plus the language-reference
topics in ``pydoc_data.topics``, read straight from the running interpreter's own
installation.  Both are part of CPython and are covered by the Python Software
Foundation License (PSF-2.0, permissive, GPL-compatible).  No package needs to be
installed and nothing is downloaded: every Python installation carries this text.
Doctest lines and indented code blocks are dropped; prose paragraphs are kept.

A fraction of the docstrings is also rewritten as short chat conversations
("What does json.dumps do?" -> first paragraph of its docstring), rendered with the
tokenizer's own chat template, so the model learns the role markers and ends its
turn with ``</s>``.

Regenerate with::

    .venv/bin/python scripts/train_default_model.py

Training is seeded and single-threaded, so a rerun with the same Python version
reproduces the same weights.  (Another CPython version has slightly different
docstrings and so gives a slightly different, equally usable, model.)
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import platform
import random
import re
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

log = logging.getLogger("train_default_model")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "server" / "default_model"

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, *ROLE_TOKENS]  # ids 0..6, in this order

# Rendered messages look like:
#   <s><|system|>\nYou are ...</s><|user|>\nHi</s><|assistant|>\nHello.</s>
# ``add_generation_prompt`` appends "<|assistant|>\n" so the model writes the reply.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unsupported role: ' + message['role'] + ' (use system, user or assistant)') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + (message['content'] | trim) + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a helpful assistant that explains Python.",
    "Answer briefly.",
]

# Standard-library folders whose docstrings are mostly test scaffolding or GUI code.
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo"}

_WORD = re.compile(r"[A-Za-z]+")
_CODEY = re.compile(r"[{}\[\]=<>_#`|\\@$^~]")
_SKIP_LINE_PREFIXES = (">>>", "...", "$ ", "%", "--", "==", "..", "+-", ":", "#")


def _is_prose(paragraph: str) -> bool:
    """True for a paragraph that reads as English sentences rather than code or tables."""
    lines = paragraph.splitlines()
    if lines[0].startswith((" ", "\t")):
        return False  # indented block: code sample, option table, literal text
    if any(line.lstrip().startswith(_SKIP_LINE_PREFIXES) for line in lines):
        return False
    text = " ".join(line.strip() for line in lines)
    words = _WORD.findall(text)
    if len(words) < 3:
        return False
    if len(_CODEY.findall(text)) > 0.03 * len(text):
        return False
    letters = sum(len(w) for w in words)
    return letters >= 0.6 * len(text)


def clean_doc(doc: str) -> str:
    """Keep the prose paragraphs of a docstring, each reflowed onto one line."""
    kept = []
    for raw in re.split(r"\n\s*\n", doc.strip()):
        paragraph = raw.strip("\n")
        if _is_prose(paragraph):
            kept.append(" ".join(line.strip() for line in paragraph.splitlines()))
    return "\n".join(kept)


def _iter_stdlib_docstrings(stdlib: Path) -> Iterator[tuple[str, str, str]]:
    """Yield (kind, dotted name, cleaned docstring) for modules, classes and functions."""
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        module = ".".join(parts)
        public_module = not (not module or module.startswith("_") or "._" in module)

        def walk(node: ast.AST, prefix: str, public: bool) -> Iterator[tuple[str, str, str]]:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = f"{prefix}.{child.name}"
                    child_public = public and not child.name.startswith("_")
                    doc = ast.get_docstring(child)
                    if doc:
                        kind = "class" if isinstance(child, ast.ClassDef) else "function"
                        yield (kind if child_public else "private", name, clean_doc(doc))
                    if isinstance(child, ast.ClassDef):
                        yield from walk(child, name, child_public)

        module_doc = ast.get_docstring(tree)
        if module_doc:
            yield ("module" if public_module else "private", module, clean_doc(module_doc))
        yield from walk(tree, module, public_module)


def _chat_example(kind: str, name: str, text: str, rng: random.Random) -> list[dict[str, str]] | None:
    answer = text.split("\n", 1)[0]
    if len(answer) < 20 or len(answer) > 600:
        return None
    short = name.rsplit(".", 1)[-1]
    if kind == "module":
        questions = [
            f"What is the {name} module for?",
            f"Tell me about the {name} module.",
            f"What does the {name} module do?",
        ]
    elif kind == "class":
        questions = [f"What is {name}?", f"What is the {short} class?", f"Explain the {name} class."]
    else:
        questions = [f"What does {name} do?", f"What does the {short} function do?", f"Explain {name}."]
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    messages.append({"role": "user", "content": rng.choice(questions)})
    messages.append({"role": "assistant", "content": answer})
    return messages


def gather_corpus(rng: random.Random, chat_fraction: float) -> tuple[list[str], list[list[dict[str, str]]]]:
    """Return (plain documents, chat conversations) built from CPython's own documentation."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    log.info("reading docstrings from %s (Python %s)", stdlib, platform.python_version())
    documents: list[str] = []
    chats: list[list[dict[str, str]]] = []
    for kind, name, text in _iter_stdlib_docstrings(stdlib):
        if len(text) < 40:
            continue
        documents.append(text)
        if kind != "private" and rng.random() < chat_fraction:
            example = _chat_example(kind, name, text, rng)
            if example:
                chats.append(example)
    n_docstrings = len(documents)

    from pydoc_data.topics import topics  # the language reference, as shipped with CPython

    for key in sorted(topics):
        text = clean_doc(topics[key])
        if len(text) >= 40:
            documents.append(text)
    log.info(
        "corpus: %d docstrings + %d reference topics = %.2f MB of text, %d chat examples",
        n_docstrings,
        len(documents) - n_docstrings,
        sum(len(d) for d in documents) / 1e6,
        len(chats),
    )
    return documents, chats


def train_tokenizer(documents: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer, length=len(documents))
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == i, token
    # Like Llama: encoding a text prepends <s>; apply_chat_template renders <s> itself.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A",
                pair=f"{BOS} $A {BOS}:1 $B:1",
                special_tokens=[(BOS, tok.token_to_id(BOS))],
            ),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """Save tokenizer.json and a tokenizer_config.json that any transformers >= 4.50 can read.

    The chat template goes into tokenizer_config.json (not a separate .jinja file) so that a
    server reading only that file with Jinja2 finds it, and the class is named by its
    version-neutral name, PreTrainedTokenizerFast.
    """
    tokenizer.save_pretrained(out, save_jinja_files=False)
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["add_bos_token"] = True  # carried out by tokenizer.json's post-processor
    cfg["add_eos_token"] = False
    cfg["additional_special_tokens"] = list(ROLE_TOKENS)
    cfg["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_stream(texts: list[str], tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """Tokenize texts (each already starting with <s>) and join them, each followed by </s>."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        if enc[-1] != eos:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def make_texts(
    documents: list[str], chats: list[list[dict[str, str]]], tokenizer: PreTrainedTokenizerFast
) -> list[str]:
    texts = [tokenizer.bos_token + d for d in documents]
    texts += [tokenizer.apply_chat_template(c, tokenize=False) for c in chats]
    return texts


def split_streams(
    texts: list[str], tokenizer: PreTrainedTokenizerFast
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) token streams: the first 2% of the (shuffled) texts validate."""
    n_val = max(1, len(texts) // 50)
    return build_stream(texts[n_val:], tokenizer), build_stream(texts[:n_val], tokenizer)


def adamw(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms and biases)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the training loop and the corpus that both training scripts take."""
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--chat-fraction", type=float, default=0.35)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=1)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, stream: torch.Tensor,
               args: argparse.Namespace, step: int, warmup: int, gen: torch.Generator) -> Any:
    """One optimizer step (cosine schedule, clipped gradients) on ``args.batch_size`` random
    windows of ``stream``; returns the model's output (its ``loss``, and what else it computed)."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, args.steps, args.lr, warmup)
    starts = torch.randint(0, len(stream) - args.seq_len - 1, (args.batch_size,), generator=gen).tolist()
    x = torch.stack([stream[s : s + args.seq_len] for s in starts])  # (B, T)
    out = model(input_ids=x, labels=x)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return out


@torch.no_grad()
def evaluate(
    model: LlamaForCausalLM, stream: torch.Tensor, seq_len: int, batches: int, batch_size: int
) -> float:
    model.eval()
    n = (len(stream) - 1) // seq_len
    starts = torch.arange(n)[: batches * batch_size] * seq_len
    losses = []
    for chunk in starts.split(batch_size):
        x = torch.stack([stream[s : s + seq_len] for s in chunk.tolist()])
        losses.append(model(input_ids=x, labels=x).loss.item())
    model.train()
    return sum(losses) / max(1, len(losses))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--steps", type=int, default=1100)
    parser.add_argument("--vocab-size", type=int, default=4096)
    add_training_arguments(parser)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    rng = random.Random(args.seed)
    t0 = time.monotonic()

    documents, chats = gather_corpus(rng, args.chat_fraction)
    tokenizer = train_tokenizer(documents, args.vocab_size)
    log.info("tokenizer: %d tokens (%.1fs)", len(tokenizer), time.monotonic() - t0)

    texts = make_texts(documents, chats, tokenizer)
    rng.shuffle(texts)
    train_stream, val_stream = split_streams(texts, tokenizer)
    log.info("train tokens: %d, validation tokens: %d", len(train_stream), len(val_stream))

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        initializer_range=0.02,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_bias=False,
        mlp_bias=False,
        use_cache=True,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters", n_params / 1e6)

    optimizer = adamw(model, args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    warmup = max(1, args.steps // 20)
    model.train()
    t_train = time.monotonic()
    running = None
    for step in range(args.steps):
        loss = train_step(model, optimizer, train_stream, args, step, warmup, gen).loss
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 50 == 0 or step == args.steps - 1:
            elapsed = time.monotonic() - t_train
            eta = elapsed / (step + 1) * (args.steps - step - 1)
            log.info(
                "step %d/%d loss %.3f (smoothed %.3f) lr %.2e elapsed %.0fs eta %.0fs",
                step + 1,
                args.steps,
                loss.item(),
                running,
                optimizer.param_groups[0]["lr"],
                elapsed,
                eta,
            )
    train_seconds = time.monotonic() - t_train
    val_loss = evaluate(model, val_stream, args.seq_len, batches=8, batch_size=args.batch_size)
    log.info("validation loss %.3f (perplexity %.1f)", val_loss, math.exp(val_loss))

    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=128,
        do_sample=True,
        temperature=0.7,
        top_p=0.9,
        repetition_penalty=1.1,
    )
    model.bfloat16().save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out)
    (out / "model.safetensors").chmod(0o644)  # safetensors writes 0600; keep it readable when packaged
    stats = {
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "parameters": n_params,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "train_tokens_seen": args.steps * args.batch_size * args.seq_len,
        "corpus_tokens": len(train_stream),
        "final_train_loss_smoothed": round(running or float("nan"), 4),
        "validation_loss": round(val_loss, 4),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.monotonic() - t0, 1),
    }
    log.info("training stats: %s", json.dumps(stats))
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(
        f"saved {out} ({size / 1e6:.1f} MB): {n_params / 1e6:.2f}M params, "
        f"train loss {stats['final_train_loss_smoothed']}, val loss {stats['validation_loss']}, "
        f"trained {train_seconds / 60:.1f} min"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
