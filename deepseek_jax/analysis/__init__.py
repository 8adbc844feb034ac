"""The papers' tables recomputed: our models' figures come from the codebase's own configs and
model (parameter counts from jax.eval_shape, no separate formula); other models are plain data."""
