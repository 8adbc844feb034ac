"""Text data for training and evaluation: corpora, tokenizers, the grain pipeline. Used by
`train/` and `inference/`; imports nothing above `config`."""
