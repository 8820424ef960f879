"""Moved: io/corpora.py (documents, Brown, splits, prepare_corpus), io/tokenizers.py,
io/tokens.py (TokenFile, BlockLoader, token-file writing), io/cache.py (cache_dir).
Re-exports for callers until the lead removes this module."""

from kforcing.io.cache import cache_dir  # noqa: F401  (moved; re-export for callers)
from kforcing.io.corpora import (  # noqa: F401  (moved; re-export for callers)
    Document,
    PreparedCorpus,
    Splits,
    chunk_documents,
    clean_brown,
    fetch_brown,
    load_documents,
    prepare_corpus,
    split_documents,
)
from kforcing.io.tokenizers import (  # noqa: F401  (moved; re-export for callers)
    EOS_TOKEN,
    eos_id,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from kforcing.io.tokens import (  # noqa: F401  (moved; re-export for callers)
    BlockLoader,
    TokenFile,
    encode_documents,
    token_dtype,
    write_token_file,
)
