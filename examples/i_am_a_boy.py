"""The Elman RNN on "i am a boy": one word per step, each step taking the previous state.

    h_t = tanh(x_t W_x + b_x + h_{t-1} W_h + b_h)

Run: python examples/i_am_a_boy.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxrnn


def main() -> None:
    sentence = "i am a boy".split()
    vocab = {word: i for i, word in enumerate(sorted(set(sentence)))}
    embed_size, hidden_size = 4, 3
    key_embed, key_cell = jax.random.split(jax.random.PRNGKey(0))
    embedding = jax.random.normal(key_embed, (len(vocab), embed_size))
    xs = embedding[jnp.array([vocab[w] for w in sentence])]  # (time=4, embed_size)

    cell = jaxrnn.elman(hidden_size)
    params = cell.init(key_cell, embed_size)

    print("Step by step, h_t = cell.step(params, h_{t-1}, x_t):")
    h = cell.initial_carry()
    by_hand = []
    for t, word in enumerate(sentence):
        h, _ = cell.step(params, h, xs[t])
        by_hand.append(h)
        print(f"  h{t} after {word!r:6} = {np.array2string(np.asarray(h), precision=4)}")

    ys, h_last = jaxrnn.unroll(cell, params, xs)
    print("\nThe same with jaxrnn.unroll (one lax.scan over the four words):")
    for t, word in enumerate(sentence):
        print(f"  h{t} after {word!r:6} = {np.array2string(np.asarray(ys[t]), precision=4)}")
    diff = float(jnp.max(jnp.abs(ys - jnp.stack(by_hand))))
    print(f"max |step-by-step - unroll| = {diff:.2e}")
    assert diff < 1e-6 and bool(jnp.allclose(h_last, by_hand[-1]))

    z = jnp.linspace(-5.0, 5.0, 1001)
    dtanh = jax.vmap(jax.grad(jnp.tanh))(z)
    print(
        f"\ntanh'(z) = 1 - tanh(z)^2: max over z in [-5, 5] = {float(dtanh.max()):.4f} (at z = 0)"
        f", {float(dtanh[0]):.2e} at z = -5 -> each step through tanh can only shrink a gradient,"
        " which is why it vanishes over long sequences."
    )
    assert float(dtanh.max()) <= 1.0


if __name__ == "__main__":
    main()
