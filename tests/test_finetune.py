"""Fine-tuning from a Hugging Face checkpoint: `--config.init_from=hf:DIR` and
`experiments.convert` -> `experiments.run` both start at the imported model's loss on the first
batch (not a random model's), a resumed run ignores `init_from` and says so, the pretrained
tokenizer.json (byte-level BPE with DeepSeek-style special tokens) reads the text, and bad
sources are named.

The checkpoint is a tiny transformers DeepseekV3ForCausalLM trained for a few steps on the test
text (so the imported loss is far below a random model's), written with `save_pretrained`.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip('torch')
pytest.importorskip('transformers')
tokenizers = pytest.importorskip('tokenizers')

from deepseek_jax import checkpoint as ckpt_lib  # noqa: E402
from deepseek_jax import model as model_lib  # noqa: E402
from deepseek_jax import sharding  # noqa: E402
from deepseek_jax.convert import hf as hf_lib  # noqa: E402
from deepseek_jax.data import pipeline as data_lib  # noqa: E402
from deepseek_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from deepseek_jax.train import loop  # noqa: E402
from deepseek_jax.train import loss as loss_lib  # noqa: E402
from deepseek_jax.train import pretrained as pretrained_lib  # noqa: E402
from deepseek_jax.train.config import resolve  # noqa: E402
from experiments.configs import finetune  # noqa: E402
from tests.test_hf_parity import hf_model  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
HF = dict(vocab_size=320, num_hidden_layers=2, first_k_dense_replace=1)  # D 64, E 8, K 3
SPECIAL = ['<｜begin▁of▁sentence｜>', '<｜end▁of▁sentence｜>']  # as DeepSeek's tokenizer.json
WORDS = ('the of and to in is was for on with as by at from that this model expert token layer '
         'weight attention latent cache router').split()
SMALL_TRAIN = dict(steps=3, batch_size=4, seq_len=32, warmup_steps=1, log_every=1,
                   eval_every=1000, checkpoint_every=1000, eval_batches=1, sample_tokens=0)

CONFIG_FILE = '''
from experiments.configs import finetune

def get_config():
  config = finetune.get_config()
  config.train.update(TRAIN)
  config.data.path = CORPUS
  config.data.heldout_fraction = 0.25
  config.mesh.data = 1  # one device
  return config
'''


def small_config(corpus: pathlib.Path, **train):
  config = finetune.get_config()
  config.train.update({**SMALL_TRAIN, **train})
  config.data.path = str(corpus)
  config.data.heldout_fraction = 0.25
  config.mesh.data = 1
  return config


def make_tokenizer(texts: list[str]):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      special_tokens=SPECIAL, show_progress=False))
  return tokenizer


def pretrain_(model, ids: np.ndarray, steps: int = 12, seed: int = 0) -> None:
  """A few Adam steps on random windows of the text, so the weights know something."""
  rng = np.random.default_rng(seed)
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
  model.train()
  for _ in range(steps):
    starts = rng.integers(0, len(ids) - 33, 8)
    window = torch.from_numpy(np.stack([ids[s:s + 33] for s in starts]).astype(np.int64))
    logits = model(window[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             window[:, 1:].reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
  model.eval()


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """(HF directory with tokenizer.json, corpus directory): 40 small documents."""
  root = tmp_path_factory.mktemp('pretrained')
  rng = np.random.default_rng(0)
  corpus = root / 'corpus'
  corpus.mkdir()
  texts = [' '.join(rng.choice(WORDS, 100)) + '.\n' for _ in range(40)]
  for i, text in enumerate(texts):
    (corpus / f'doc{i:02d}.txt').write_text(text)
  tokenizer = make_tokenizer(texts)
  ids = np.concatenate([tokenizer.encode(t, add_special_tokens=False).ids for t in texts])
  model = hf_model(**HF)
  pretrain_(model, ids)
  directory = root / 'hf'
  model.save_pretrained(directory)
  tokenizer.save(str(directory / tokenizer_lib.TOKENIZER_FILE))
  return directory, corpus


def first_batch(config, workdir: pathlib.Path) -> dict:
  """The loop's first training batch (one process): its data, tokenizer and seed."""
  data = data_lib.prepare(config.data, str(workdir), HF['vocab_size'])
  t = config.train
  return next(data_lib.train_iterator(data.train_tokens, t.seq_len, t.batch_size, config.seed))


def losses(workdir: pathlib.Path) -> dict[int, float]:
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {row['step']: row['loss'] for row in rows if 'loss' in row}


@pytest.fixture(scope='module')
def from_hf(pretrained, tmp_path_factory):
  """A 3-step run with init_from=hf:DIR, in this process, and the loss the imported model
  (`load_pretrained`, eagerly) has on the run's first batch, computed as the train step does."""
  directory, corpus = pretrained
  workdir = tmp_path_factory.mktemp('from_hf')
  config = small_config(corpus)
  config.init_from = f'hf:{directory}'
  loop.train(config, workdir)
  batch = first_batch(config, workdir)
  _, model = hf_lib.load_pretrained(directory)
  mask = jnp.ones(batch['targets'].shape, jnp.float32)
  expected, _ = loss_lib.total_loss(model(jnp.asarray(batch['inputs'])),
                                    jnp.asarray(batch['targets']), mask, 0,
                                    resolve(config).train, model.logits)
  return workdir, config, float(expected)


def test_init_from_hf_starts_at_the_imported_models_loss(from_hf, pretrained, tmp_path):
  workdir, config, expected = from_hf
  directory, corpus = pretrained
  first = losses(workdir)
  assert sorted(first) == [1, 2, 3]
  assert first[1] == pytest.approx(expected, rel=1e-5)
  assert (workdir / 'tokenizer.json').read_bytes() == (directory / 'tokenizer.json').read_bytes()
  checkpoints = ckpt_lib.Checkpoints(workdir / 'checkpoints', read_only=True)
  meta = checkpoints.read_meta(3)
  checkpoints.close()
  assert meta['init_from'] == f'hf:{directory}'
  assert meta['model']['hidden_size'] == 64 and meta['model']['vocab_size'] == 320
  # The same model, randomly initialised: the imported weights' first loss is far below it.
  random_dir = tmp_path / 'random'
  random_dir.mkdir()
  shutil.copy(directory / 'tokenizer.json', random_dir)
  random = small_config(corpus)
  random.model.update({k: v for k, v in meta['model'].items()
                       if k not in ('scan_layers', 'moe_matmul', 'attention', 'remat')})
  loop.train(random, random_dir)
  random_first = losses(random_dir)[1]
  assert random_first > np.log(320) - 0.1  # about uniform over the vocabulary
  assert first[1] < random_first - 2.0, (first[1], random_first)


def test_resume_ignores_init_from_and_says_so(from_hf, tmp_path, capsys):
  workdir, config, _ = from_hf
  resumed = tmp_path / 'resumed'
  shutil.copytree(workdir, resumed)
  config = small_config(pathlib.Path(config.data.path), steps=4)
  config.init_from = 'hf:/nonexistent'  # not even looked at: the workdir has a checkpoint
  result = loop.train(config, resumed)
  out = capsys.readouterr().out
  assert (f"init_from={config.init_from!r} ignored: resuming from "
          f"{resumed / 'checkpoints' / '3'}") in out
  assert f"model: from checkpoint {resumed / 'checkpoints' / '3'}" in out
  assert result['step'] == 4
  assert {s: v for s, v in losses(resumed).items() if s <= 3} == losses(workdir)


CLI_ENV = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')


def cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=CLI_ENV,
                        capture_output=True, text=True, timeout=240)


def test_convert_then_run_continues_from_step_0(from_hf, pretrained, tmp_path):
  _, _, expected = from_hf
  directory, corpus = pretrained
  config_path = tmp_path / 'small.py'
  config_path.write_text(CONFIG_FILE.replace('TRAIN', repr(SMALL_TRAIN))
                         .replace('CORPUS', repr(str(corpus))))
  workdir = tmp_path / 'converted'
  done = cli('experiments.convert', f'--hf={directory}', f'--workdir={workdir}',
             f'--config={config_path}')
  assert done.returncode == 0, done.stdout + done.stderr
  assert f'wrote {workdir / "checkpoints" / "0"}' in done.stdout
  assert (workdir / 'tokenizer.json').read_bytes() == (directory / 'tokenizer.json').read_bytes()
  checkpoints = ckpt_lib.Checkpoints(workdir / 'checkpoints', read_only=True)
  assert checkpoints.latest_step() == 0
  meta = checkpoints.read_meta(0)
  checkpoints.close()
  cfg = hf_lib.config_from_hf(json.loads((directory / 'config.json').read_text()), mtp_depth=0)
  assert {k: meta['model'][k] for k in ('vocab_size', 'hidden_size', 'num_layers',
                                        'n_routed_experts', 'mtp_depth')} == {
      'vocab_size': cfg.vocab_size, 'hidden_size': cfg.hidden_size, 'num_layers': 2,
      'n_routed_experts': 8, 'mtp_depth': 0}
  # init_from=<workdir>: its latest checkpoint's weights (here step 0, the HF ones), in this
  # process, before the converted workdir trains on
  other = tmp_path / 'from_workdir'
  config = small_config(corpus)
  config.init_from = str(workdir)
  loop.train(config, other)
  assert losses(other)[1] == pytest.approx(expected, rel=1e-5)
  done = cli('experiments.run', f'--config={config_path}', f'--workdir={workdir}')
  assert done.returncode == 0, done.stdout + done.stderr
  assert f'resumed from {workdir / "checkpoints" / "0"}' in done.stdout
  first = losses(workdir)
  assert sorted(first) == [1, 2, 3]
  assert first[1] == pytest.approx(expected, rel=1e-5)
  assert losses(other) == first  # the same start, the same batches


def test_a_workdirs_weights_load_into_the_other_layout(from_hf):
  """init_from=<workdir> converts between stacked and per-layer decoder layers."""
  workdir, _, _ = from_hf  # scan_layers=True (finetune.py)
  source = pretrained_lib.parse(str(workdir))
  cfg = pretrained_lib.source_config(source)
  assert cfg.scan_layers
  unrolled = cfg.replace(scan_layers=False)
  mesh = sharding.make_mesh(1, 1, 1, jax.devices()[:1])
  loaded = pretrained_lib.load_tree(source, unrolled, mesh, sharding.rules())
  checkpoints = ckpt_lib.Checkpoints(workdir / 'checkpoints', read_only=True)
  saved = checkpoints.restore_tree(3, model_lib.split_trainable(model_lib.abstract(cfg))[1])
  checkpoints.close()
  assert ('layers', 1, 'ffn', 'router_bias') in loaded['router_bias']
  for kind, state in saved.items():
    restacked = model_lib.relayout(loaded[kind], unrolled)
    flat = dict(nnx.to_flat_state(state))
    assert set(restacked) == set(flat)
    for path, variable in flat.items():
      np.testing.assert_array_equal(np.asarray(restacked[path]),
                                    np.asarray(variable.get_value()))


# ---- bad input ---------------------------------------------------------------------------------

def test_a_missing_hf_directory_is_named(pretrained, tmp_path):
  _, corpus = pretrained
  config = small_config(corpus)
  config.init_from = f'hf:{tmp_path / "nowhere"}'
  with pytest.raises(ValueError, match=f'{tmp_path / "nowhere" / "config.json"} not found'):
    loop.train(config, tmp_path / 'run')
  assert not (tmp_path / 'run').exists()  # refused before anything is written
  with pytest.raises(ValueError, match=f'{tmp_path / "nowhere" / "config.json"} not found'):
    loop.convert(config, tmp_path / 'nowhere', tmp_path / 'converted')
  assert not (tmp_path / 'converted').exists()


def test_init_from_neither_hf_nor_a_workdir_is_named(pretrained, tmp_path):
  directory, corpus = pretrained
  config = small_config(corpus)
  config.init_from = str(tmp_path)
  with pytest.raises(ValueError, match=rf"init_from='{tmp_path}' is neither hf:<Hugging Face "
                                       rf"dir> nor a training workdir with a checkpoint"):
    loop.train(config, tmp_path / 'run')
  config.init_from = str(directory)  # an HF directory without the prefix
  with pytest.raises(ValueError, match=f'did you mean hf:{directory}'):
    loop.train(config, tmp_path / 'run')
  assert not (tmp_path / 'run').exists()


def test_a_command_line_model_field_the_weights_contradict_is_named(pretrained, tmp_path):
  directory, corpus = pretrained
  config = small_config(corpus)
  config.init_from = f'hf:{directory}'
  with pytest.raises(ValueError, match=r'fixes model\.hidden_size=64; the command line sets '
                                       r'hidden_size=128'):
    loop.train(config, tmp_path / 'run', explicit_model={'hidden_size', 'precision'})


def test_missing_pretrained_tokenizer_is_named(pretrained, tmp_path):
  directory, corpus = pretrained
  bare = tmp_path / 'bare'
  shutil.copytree(directory, bare, ignore=shutil.ignore_patterns('tokenizer.json'))
  config = small_config(corpus)
  config.init_from = f'hf:{bare}'
  with pytest.raises(ValueError, match=rf"data.tokenizer='checkpoint': init_from hf:{bare} has "
                                       r'no tokenizer.json'):
    loop.train(config, tmp_path / 'run')
  config.init_from = ''  # finetune.py on a fresh workdir without pretrained weights
  with pytest.raises(ValueError, match=r"data.tokenizer='checkpoint': .*tokenizer.json not "
                                       r'found.*--config.init_from=hf:'):
    loop.train(config, tmp_path / 'scratch')


def test_convert_refuses_a_workdir_with_checkpoints(from_hf, pretrained):
  workdir, config, _ = from_hf
  with pytest.raises(ValueError, match=f'{workdir / "checkpoints"} already holds a checkpoint'):
    loop.convert(config, pretrained[0], workdir)


# ---- the pretrained tokenizer ------------------------------------------------------------------

def test_pretrained_tokenizer_counts_bytes_and_round_trips(pretrained):
  directory, _ = pretrained
  tokenizer = tokenizer_lib.load_file(str(directory / 'tokenizer.json'))
  assert isinstance(tokenizer, tokenizer_lib.FileTokenizer)  # special tokens: not pure BPE
  assert tokenizer.vocab_size == 300
  text = f'the latent cache — {SPECIAL[1]} héllo wörld\n\n'
  ids = tokenizer.encode(text)
  assert tokenizer.decode(ids) == text
  assert int(tokenizer.bytes_per_token[ids].sum()) == len(text.encode('utf-8'))
  assert tokenizer.bytes_per_token[1] == len(SPECIAL[1].encode('utf-8'))  # matched literally
  assert [a.tolist() for a in tokenizer.encode_batch([text, 'expert'])] == [
      ids.tolist(), tokenizer.encode('expert').tolist()]


@pytest.mark.slow
def test_two_processes_convert_like_one(pretrained, tmp_path):
  """`experiments.convert` on 2 processes x 4 CPU devices (mesh 2 x 2 x 2 with FSDP): each reads
  its own blocks and writes its part of the step-0 checkpoint, process 0 alone prints; one
  process then restores exactly the weights of the plain import."""
  from tests import processes as processes_lib  # pylint: disable=import-outside-toplevel
  directory, corpus = pretrained
  config_path = tmp_path / 'small.py'
  config_path.write_text(CONFIG_FILE.replace('TRAIN', repr({**SMALL_TRAIN, 'batch_size': 8}))
                         .replace('CORPUS', repr(str(corpus))))
  workdir = tmp_path / 'converted'
  env = dict(CLI_ENV, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  outputs = processes_lib.run_entry_point('experiments.convert', [
      f'--hf={directory}', f'--workdir={workdir}', f'--config={config_path}',
      '--config.mesh.data=2', '--config.mesh.expert=2', '--config.mesh.plane=2',
      '--config.mesh.fsdp=True'], env)
  assert 'wrote' in outputs[0][0] and 'wrote' not in outputs[1][0]
  restored = ckpt_lib.restore_model(workdir / 'checkpoints')
  _, plain = hf_lib.load_pretrained(directory, scan_layers=restored.cfg.scan_layers)
  got = dict(nnx.to_flat_state(nnx.state(restored.model)))
  want = dict(nnx.to_flat_state(nnx.state(plain)))
  assert got.keys() == want.keys()
  for path, variable in want.items():
    assert np.array_equal(np.asarray(got[path].get_value()), np.asarray(variable.get_value())), path
