"""The Clock Net: the bounded task frequencies omega_t that Sine-AWB and the shared decoder
modulate with."""
from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def clock_offsets(num_tasks: int, spread: float) -> np.ndarray:
  """tanh of the Clock Net's fixed pre-tanh offsets: evenly spaced in [-spread, spread]."""
  if not 0.0 <= spread < 1.0:
    raise ValueError(f"model.clock_spread must be in [0, 1), got {spread}")
  if num_tasks == 1:
    return np.zeros((1,), np.float32)
  return (spread * np.linspace(-1.0, 1.0, num_tasks)).astype(np.float32)


def clock_offsets_by_round(generations, spread: float) -> np.ndarray:
  """clock_offsets of each generation of tasks on its own (generations: per task, the generation that
  added it, in order): adding tasks to a trained model keeps the old tasks' offsets."""
  generations = tuple(generations)
  return np.concatenate([clock_offsets(generations.count(g), spread)
                         for g in sorted(set(generations))]).astype(np.float32)


class ClockNet(nn.Module):
  """omega_t = s * (tanh(W_q . ReLU(p_t) + phi_t) + c): one bounded frequency per task.

  phi_t are fixed (not learned) offsets with tanh(phi_t) evenly spaced in [-spread, spread], so
  the tasks start at distinct frequencies s (c + tanh(phi_t)) (docs/method.md, "Clock Net");
  spread = 0 is the paper's formula as written. With s > 0, omega_t lies in
  (s (c - 1), s (c + 1)) whatever the tokens are.
  """
  s_init: float = 1.0
  c_init: float = 1.0
  spread: float = 0.0
  generations: tuple[int, ...] = ()  # per task, the generation that added it (() = all 0)

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens: (T, C) task tokens -> (T,) frequencies."""
    s = self.param("s", nn.initializers.constant(self.s_init), ())
    c = self.param("c", nn.initializers.constant(self.c_init), ())
    q = nn.Dense(1, name="w_q")(jax.nn.relu(tokens))[:, 0]
    phi = np.arctanh(clock_offsets_by_round(self.generations or (0,) * tokens.shape[0],
                                            self.spread))
    return s * (jnp.tanh(q + phi) + c)
