"""The offline demo corpus and its tokenizer.

Owns two things that let distil_jax run end to end with no network:

* ``stdlib_docstrings``: English/technical documents made from the docstrings of the Python
  standard library on this machine, found by parsing its ``.py`` files with ``ast`` (modules are
  never imported: some have side effects on import).
* ``train_tokenizer``: a GPT-2-style byte-level BPE trained on those documents with the
  ``tokenizers`` library and wrapped as a ``transformers.PreTrainedTokenizerFast`` that
  round-trips through ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.

``write_jsonl`` writes a corpus in the ``{"text": ...}`` format that ``data.load_texts`` reads.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator

from distil_jax import fsio

# The one special token, as in GPT-2: it is bos, eos, unk and pad at once.
EOS_TOKEN = "<|endoftext|>"

# Directories of the stdlib tree that hold tests, demos, vendored or generated code, or
# third-party packages: their docstrings are either not prose or not the stdlib's.
_SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "ensurepip",
        "venv",
        "__pycache__",
        "lib-dynload",
        "encodings",  # ~100 generated codec modules with the same boilerplate docstring
        "pydoc_data",  # one generated module of help topics, not docstrings
        "__phello__",
    }
)


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    try:
        return ast.unparse(node.args)
    except Exception:  # an exotic AST on a future Python: the name alone is enough
        return "..."


def _walk_docstrings(body: list[ast.stmt], prefix: str = "") -> Iterator[str]:
    """Yields "header\\n\\ndocstring" for every documented class/def in ``body``, source order."""
    for node in body:
        if isinstance(node, ast.ClassDef):
            name = prefix + node.name
            doc = ast.get_docstring(node)
            if doc:
                yield f"class {name}\n\n{doc}"
            yield from _walk_docstrings(node.body, prefix=name + ".")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield f"def {prefix}{node.name}({_signature(node)})\n\n{doc}"
            # Nested functions are implementation details; their docstrings are rare and terse.


@functools.lru_cache(maxsize=None)
def _module_document(path: str) -> str | None:
    """The module docstring followed by its class/function docstrings, or None if unparseable.
    Cached per process: the tests build many demo workdirs, each parsing the same stdlib files."""
    try:
        with open(path, "rb") as f:
            source = f.read()
        # ast.parse on bytes honours the file's coding cookie (a few stdlib files are latin-1).
        tree = ast.parse(source, filename=path)
    except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError, OSError):
        return None
    parts = []
    module_doc = ast.get_docstring(tree)
    if module_doc:
        parts.append(module_doc)
    parts.extend(_walk_docstrings(tree.body))
    return "\n\n".join(parts) if parts else None


def _stdlib_files(root: str) -> Iterator[str]:
    """The stdlib's .py files in a deterministic (sorted, depth-first) order."""
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending; sorting makes the order machine-stable.
        dirnames[:] = sorted(
            d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(("config-", "."))
        )
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                yield os.path.join(dirpath, name)


def stdlib_docstrings(min_chars: int = 200, max_docs: int | None = None) -> list[str]:
    """Documents made from the docstrings of the Python standard library on this machine.

    One document per module (the module docstring, then each documented class and function,
    each preceded by a header line ``class Name`` or ``def Class.name(args)``), in sorted path
    order, keeping documents with at least ``min_chars`` characters. Deterministic for a given
    Python installation.

    Args:
      min_chars: drop documents shorter than this (characters).
      max_docs: stop after this many documents (None: all).
    """
    root = sysconfig.get_paths()["stdlib"]
    docs: list[str] = []
    for path in _stdlib_files(root):
        if max_docs is not None and len(docs) >= max_docs:
            break
        doc = _module_document(path)
        if doc is not None and len(doc) >= min_chars:
            docs.append(doc)
    return docs


def write_jsonl(texts: Iterable[str], path: str | os.PathLike) -> None:
    """Writes one ``{"text": ...}`` JSON object per line, atomically (``fsio.atomic_file``): a
    reader (or a concurrent writer) never sees a half-written corpus."""
    with fsio.atomic_file(path) as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False))
            f.write("\n")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, model_max_length: int = 1024):
    """Trains a GPT-2-style byte-level BPE on ``texts``.

    Byte-level pre-tokenizer (GPT-2's regex, no prefix space) and decoder, so any string encodes
    without unknown tokens and ``decode(encode(x)) == x``. ``<|endoftext|>`` (id 0) is bos, eos,
    unk and pad, as in GPT-2 (which has no pad; we set it so padding never needs a guess).

    Args:
      texts: training documents.
      vocab_size: total vocabulary size, including the 256 byte symbols and the special token.
      model_max_length: stored in the tokenizer config (the longest sequence a model accepts).

    Returns:
      a ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for a byte-level BPE: use at least "
            f"{len(alphabet) + 1} (256 bytes + {EOS_TOKEN})"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # GPT-2's post-processor: keeps offsets exact and adds no special tokens.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        # Seeding all 256 byte symbols guarantees every input is encodable, whatever the corpus.
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=model_max_length,
        # The default cleanup rewrites " ." to "." etc. and would break decode(encode(x)) == x.
        clean_up_tokenization_spaces=False,
    )
