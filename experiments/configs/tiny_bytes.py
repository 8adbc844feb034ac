"""The tiny model on raw bytes (vocab 256), the data pipeline's default tokenizer: the same
compute sees about a third as much text as the BPE-tokenized `tiny.py`."""

from experiments.configs import tiny


def get_config():
  config = tiny.get_config()
  config.model.vocab_size = 256
  config.data.tokenizer = 'byte'
  return config
