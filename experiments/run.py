"""The main job. Until the training loop lands (issue #3) it builds the configured model and prints
its summary: parameter counts from jax.eval_shape and the parameter tree.

  python -m experiments.run [--config=experiments/configs/tiny.py] [--config.model.x=y]
"""

from absl import app

from experiments.summary import main  # defines --config and --shapes

if __name__ == '__main__':
  app.run(main)
