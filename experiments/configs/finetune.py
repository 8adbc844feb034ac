"""Fine-tuning pretrained weights on your text: `--config.init_from=hf:<dir>` (or a training
workdir), or a workdir that `python -m experiments.convert` wrote; `--config.data.path=...`.

The model section is tiny.py's only so that the file stands alone (it loads and validates like
every config): the pretrained weights' config replaces it when the run starts or resumes
(deepseek_jax/train/pretrained.py), all but the implementation switches (precision, dtype,
kernels, remat, attention) and `scan_layers`, which stay as set here or on the command line. The
text is read with the weights' own tokenizer.json. The schedule is a short fine-tune's: a small
peak learning rate after a short warm-up, V3's bias speed (γ 0.001) and late MTP weight (0.1).
For a large checkpoint add what its config file sets, e.g. for DeepSeek-V3
`--config.model.dtype=bfloat16 --config.model.remat=full --config.train.loss_chunk=512` and a
mesh.
"""

from experiments.configs import tiny


def get_config():
  config = tiny.get_config()
  config.model.scan_layers = True  # pretrained models are deep: one scanned stack compiles once
  config.data.tokenizer = 'checkpoint'
  config.train.steps = 200
  config.train.learning_rate = 1e-4
  config.train.warmup_steps = 10
  config.train.eval_every = 50
  config.train.checkpoint_every = 100
  config.train.sample_tokens = 64
  config.train.bias_gamma = 1e-3
  config.train.bias_gamma_switch_step = -1
  config.train.mtp_weight = 0.1
  return config
