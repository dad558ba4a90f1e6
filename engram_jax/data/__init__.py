"""Everything between text and the model's inputs, on the host.

  tokenizer    Hugging Face tokenizers, and the offline default byte-level BPE
  compression  token id -> compressed id, as the reference demo
  hashing      n-gram hash ids, bit-identical to the reference demo (int64 numpy)
  corpus       documents of every source, and the fixed train / validation split
  prepare      the corpus tokenised into one cached stream per split
  shards       ArrayRecord shards of a tokenised corpus, written and read
  pipeline     windows, shuffling, batches per process and their hash ids (grain)
"""
